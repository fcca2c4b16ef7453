"""Metrics without servers: labels, histograms, the exposition, and the multiprocess directory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from job.metrics import (
    MAX_ERROR_LABELS,
    OTHER,
    ErrorLabels,
    Histogram,
    RunMetrics,
    error_label,
)
from job.metricsfiles import DIR_PREFIX, fold_dead_process, prepare_directory
from job.outcome import CRASHED, PERMANENT, RETRYABLE, Failure


@pytest.mark.parametrize("failure, label", [
    (None, "none"),
    (Failure(RETRYABLE, "DatabaseError", "deadlock", code="ORA-00060"), "ORA-00060"),
    (Failure(RETRYABLE, "ClientError", "slow down", code="SlowDown"), "SlowDown"),
    (Failure(PERMANENT, "KeyError", "'x'"), "KeyError"),
    (Failure(CRASHED, "WorkerCrashed", "killed"), "WorkerCrashed"),
    (Failure(PERMANENT, "Permanent", "bad", code="no spaces allowed"), "Permanent"),
    (Failure(PERMANENT, "", "bad", code="x" * 200), OTHER),
])
def test_error_label_is_a_plain_code_or_class(failure, label):
    assert error_label(failure) == label


def test_error_labels_fold_new_values_into_other_after_the_limit():
    labels = ErrorLabels()
    seen = {labels(Failure(PERMANENT, "E", "m", code=f"CODE-{n}")) for n in range(MAX_ERROR_LABELS + 30)}
    assert len(seen) == MAX_ERROR_LABELS + 1 and OTHER in seen
    # The parent's own labels are never folded, however many codes came first.
    assert labels(Failure(CRASHED, "WorkerCrashed", "killed")) == "WorkerCrashed"
    assert labels(Failure(PERMANENT, "E", "m", code="CODE-3")) == "CODE-3"


def test_histogram_buckets_are_cumulative_and_le_inclusive():
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(value)
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (float("inf"), 5)]
    assert h.sum == pytest.approx(8.65)


def _exposition(metrics: RunMetrics) -> dict[tuple[str, tuple], float]:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    registry.register(metrics)
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_run_metrics_count_what_the_loop_reports():
    clock = iter(range(1000, 2000)).__next__
    m = RunMetrics(run_id="r1", shard=2, shard_count=4, clock=clock)
    m.run_started(total=10, pending=7, workers=2)
    deadlock = Failure(RETRYABLE, "DatabaseError", "deadlock", code="ORA-00060")
    m.attempt_failed(deadlock, 0.02)
    m.retry_scheduled(deadlock)
    m.item_finished("done", 0.03, None)
    m.attempt_failed(Failure(PERMANENT, "KeyError", "k"), 2.0)
    m.item_finished("failed", 2.0, Failure(PERMANENT, "KeyError", "k"))
    m.worker_restarted("crash", 12345)
    m.checkpoint(0.004, True, 300)
    m.checkpoint(1.5, False, 0)
    m.progress(total=12, done=4, failed=1, pending=5, in_flight=2, workers=2)
    s = _exposition(m)
    assert s["bulkjob_shard_items", ()] == 12  # a work table's total grows with its claims
    assert s["bulkjob_items_pending", ()] == 5
    assert s["bulkjob_items_finished_total", (("outcome", "done"),)] == 1
    assert s["bulkjob_items_finished_total", (("outcome", "failed"),)] == 1
    assert s["bulkjob_items_finished_total", (("outcome", "skipped"),)] == 3
    assert s["bulkjob_attempts_total", (("error", "ORA-00060"), ("outcome", "retryable"))] == 1
    assert s["bulkjob_attempts_total", (("error", "KeyError"), ("outcome", "permanent"))] == 1
    assert s["bulkjob_attempts_total", (("error", "none"), ("outcome", "ok"))] == 1
    assert s["bulkjob_retries_total", (("error", "ORA-00060"),)] == 1
    assert s["bulkjob_worker_restarts_total", (("cause", "crash"),)] == 1
    assert s["bulkjob_worker_restarts_total", (("cause", "recycle"),)] == 0
    assert s["bulkjob_checkpoint_writes_total", (("result", "failed"),)] == 1
    assert s["bulkjob_checkpoint_written_bytes_total", ()] == 300
    assert s["bulkjob_checkpoint_duration_seconds_bucket", (("le", "0.005"),)] == 1
    assert s["bulkjob_attempt_duration_seconds_bucket", (("le", "0.025"), ("outcome", "failed"))] == 1
    assert s["bulkjob_attempt_duration_seconds_count", (("outcome", "failed"),)] == 2
    assert s["bulkjob_items_pending", ()] == 5
    assert s["bulkjob_shard_items", ()] == 12
    assert s["bulkjob_run_info", (("run_id", "r1"), ("shard", "2"), ("shard_count", "4"), ("total", "10"))] == 1
    assert s["bulkjob_run_start_time_seconds", ()] == 1000
    assert s["bulkjob_last_progress_timestamp_seconds", ()] == 1005
    assert ("bulkjob_run_exit_code", ()) not in s
    m.run_finished({"pending": 5, "exit_code": 3})
    s = _exposition(m)
    assert s["bulkjob_run_exit_code", ()] == 3 and s["bulkjob_workers_alive", ()] == 0


def test_pauses_are_a_gauge_and_a_counter_of_seconds():
    now = [100.0]
    m = RunMetrics(run_id="r1", shard=0, shard_count=1, clock=lambda: 5000.0, monotonic=lambda: now[0])
    m.run_started(total=10, pending=10, workers=2)
    s = _exposition(m)
    assert s["bulkjob_paused", (("system", ""),)] == 0 and s["bulkjob_paused_seconds_total", ()] == 0
    m.paused("database")
    now[0] = 112.5
    s = _exposition(m)
    assert s["bulkjob_paused", (("system", "database"),)] == 1
    assert s["bulkjob_paused_seconds_total", ()] == 12.5  # an ongoing pause counts as it goes
    m.resumed(12.5)
    now[0] = 200.0
    m.paused("S3")
    now[0] = 203.0
    m.resumed(3.0)
    s = _exposition(m)
    assert s["bulkjob_paused", (("system", ""),)] == 0 and s["bulkjob_paused_seconds_total", ()] == 15.5


_WRITE_FILES = textwrap.dedent("""
    import os, sys
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
    from prometheus_client import Counter, Gauge, Histogram
    n = int(sys.argv[2])
    Counter("t_items", "items", ["kind"]).labels("a").inc(n)
    Histogram("t_seconds", "s", buckets=(1, 10)).observe(n)
    Gauge("t_peak", "max", multiprocess_mode="max").set(n)
    Gauge("t_last", "pid", multiprocess_mode="all").set(n)
    Gauge("t_live", "live", multiprocess_mode="livesum").set(n)
""")


def _collect(path) -> dict[tuple[str, tuple], float]:
    from prometheus_client.multiprocess import MultiProcessCollector

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in MultiProcessCollector(None, path=str(path)).collect() for s in family.samples}


def test_a_dead_process_files_are_folded_without_changing_any_total(tmp_path):
    from prometheus_client.multiprocess import mark_process_dead

    pids = []
    for n in (3, 20, 5):
        proc = subprocess.Popen([sys.executable, "-c", _WRITE_FILES, str(tmp_path), str(n)])
        assert proc.wait(60) == 0
        pids.append(proc.pid)
    before = _collect(tmp_path)
    assert before["t_items_total", (("kind", "a"),)] == 28
    for pid in pids:
        mark_process_dead(pid, str(tmp_path))
        fold_dead_process(str(tmp_path), pid)
        assert not [f for f in os.listdir(tmp_path) if f.endswith(f"_{pid}.db")]
    after = _collect(tmp_path)
    # Counters, histograms and max gauges keep their values; per-process gauges go with the process.
    expected = {k: v for k, v in before.items() if k[0] not in ("t_last", "t_live")}
    assert after == expected
    assert after["t_seconds_bucket", (("le", "10.0"),)] == 2 and after["t_peak", ()] == 20
    assert sorted(os.listdir(tmp_path)) == ["counter_merged.db", "gauge_max_merged.db", "histogram_merged.db"]


def test_the_directory_is_fresh_per_process_and_stale_ones_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    stale = tmp_path / f"{DIR_PREFIX}{dead.pid}-abc"
    alive = tmp_path / f"{DIR_PREFIX}{os.getppid()}-def"
    for d in (stale, alive):
        d.mkdir()
        (d / "counter_1.db").write_bytes(b"x")
    path = prepare_directory(str(tmp_path))
    assert os.path.basename(path).startswith(f"{DIR_PREFIX}{os.getpid()}-")
    assert os.listdir(path) == []
    assert not stale.exists() and alive.exists()
    assert prepare_directory(str(tmp_path)) != path and not os.path.exists(path)
