"""End-to-end runs of the real CLI, with the manifest in a local directory and in S3."""

import csv
import io
import json
import os
import re
import signal
import sqlite3
import time

import pytest
from conftest import run_bulkjob, start_bulkjob, status_of, summary_of, write_items
from ledger import applied


@pytest.fixture(params=["local", "s3"])
def manifest(request, tmp_path):
    """(manifest URL, env) for each backend."""
    if request.param == "local":
        return str(tmp_path / "state"), {}
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs", dict(server.env)


def bulk(tmp_path, manifest, items, *extra, run_id="r1", handler="ledger:handle"):
    url, env = manifest
    env = {**env, "LEDGER_DB": str(tmp_path / "ledger.db")}
    path = items if isinstance(items, str) else str(write_items(tmp_path / "items.jsonl", items))
    proc = run_bulkjob("run", "--items", path, "--handler", handler, "--manifest", url, "--run-id", run_id,
                       "--metrics-port", "0", "--backoff", "0.05", *extra, env=env)
    return proc


def test_all_items_done_exactly_once(tmp_path, manifest):
    proc = bulk(tmp_path, manifest, [{"id": f"it-{i}", "payload": {"n": i}} for i in range(500)], "--workers", "3")
    assert proc.returncode == 0, proc.stderr
    summary = summary_of(proc)
    assert {k: summary[k] for k in ("total", "done", "failed", "pending", "retries", "exit_code")} == \
        {"total": 500, "done": 500, "failed": 0, "pending": 0, "retries": 0, "exit_code": 0}
    counts = applied(tmp_path / "ledger.db")
    assert len(counts) == 500 and set(counts.values()) == {1}
    status = status_of(manifest[0], "r1", env=manifest[1])
    assert (status["total"], status["done"], status["failed"], status["pending"]) == (500, 500, 0, 0)
    assert status["shards"][0]["attempts"] == 500 and status["started_at"] <= status["updated_at"]


def test_resume_skips_done_items(tmp_path, manifest):
    items = [{"id": i} for i in range(50)]
    assert bulk(tmp_path, manifest, items).returncode == 0
    proc = bulk(tmp_path, manifest, items + [{"id": i} for i in range(50, 60)])
    summary = summary_of(proc)
    assert (summary["skipped_already_done"], summary["done"], summary["total"]) == (50, 60, 60)
    assert len(applied(tmp_path / "ledger.db")) == 60
    assert set(applied(tmp_path / "ledger.db").values()) == {1}


def test_transient_failures_succeed_on_a_later_attempt(tmp_path, manifest):
    items = [{"id": i, "payload": {"fail_until": 3 if i % 5 == 0 else 0}} for i in range(40)]
    proc = bulk(tmp_path, manifest, items, "--max-attempts", "3")
    assert proc.returncode == 0, proc.stderr
    summary = summary_of(proc)
    assert summary["done"] == 40 and summary["retries"] == 16 and summary["attempts"] == 56


@pytest.mark.parametrize("error, max_attempts, state", [
    ("TimeoutError", 2, "retried"),
    ("ConnectionError", 2, "retried"),
    ("KeyError", 2, "permanent"),
])
def test_builtin_errors_are_classified(tmp_path, manifest, error, max_attempts, state):
    proc = bulk(tmp_path, manifest, [{"id": "x", "payload": {"error": error}}], "--max-attempts", str(max_attempts))
    assert proc.returncode == 1
    report = run_bulkjob("report", "--manifest", manifest[0], "--run-id", "r1", env=manifest[1])
    (row,) = map(json.loads, report.stdout.splitlines())
    assert row["error_class"] == error
    assert row["attempts"] == (max_attempts if state == "retried" else 1)


def test_permanent_failures_and_max_failures(tmp_path, manifest):
    items = [{"id": i, "payload": {"permanent": i < 3}} for i in range(20)]
    proc = bulk(tmp_path, manifest, items, "--max-failures", "2")
    assert proc.returncode == 1
    assert summary_of(proc)["status"] == "failed"
    proc = bulk(tmp_path, manifest, items, "--max-failures", "3", run_id="r2")
    assert proc.returncode == 0
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"], summary["retries"]) == (17, 3, 0)
    report = run_bulkjob("report", "--manifest", manifest[0], "--run-id", "r2", "--format", "csv", env=manifest[1])
    rows = list(csv.DictReader(io.StringIO(report.stdout)))
    assert sorted(r["id"] for r in rows) == ["0", "1", "2"]
    assert {(r["error_class"], r["error_code"], r["attempts"]) for r in rows} == {("Permanent", "T-PERM", "1")}
    assert all(re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["last_attempt_at"]) for r in rows)


def test_retry_failed_tries_failed_items_again(tmp_path, manifest):
    items = [{"id": i, "payload": {"permanent": i == 7}} for i in range(10)]
    assert bulk(tmp_path, manifest, items).returncode == 1
    again = bulk(tmp_path, manifest, [{"id": i} for i in range(10)])
    assert again.returncode == 1  # still failed: not retried without the flag
    assert summary_of(again)["attempts"] == 0
    fixed = bulk(tmp_path, manifest, [{"id": i} for i in range(10)], "--retry-failed")
    assert fixed.returncode == 0, fixed.stderr
    assert (summary_of(fixed)["attempts"], summary_of(fixed)["done"]) == (1, 10)
    assert status_of(manifest[0], "r1", env=manifest[1])["failed"] == 0


def test_backoff_waits_in_the_parent_without_blocking_other_items(tmp_path):
    # One worker: if the retry's backoff were slept in the worker, no other item could run
    # between the two attempts of "slow".
    items = [{"id": "slow", "payload": {"fail_until": 2, "track": True}}] + \
        [{"id": i, "payload": {"seconds": 0.02, "track": True}} for i in range(40)]
    proc = bulk(tmp_path, (str(tmp_path / "state"), {}), items, "--workers", "1", "--backoff", "0.8",
                "--max-backoff", "0.8", "--log-level", "DEBUG")
    assert proc.returncode == 0, proc.stderr
    delay = float(re.search(r"retry in ([0-9.]+)s", proc.stderr).group(1))
    conn = sqlite3.connect(tmp_path / "ledger.db")
    tried = conn.execute("SELECT item_id, attempt, at FROM tried ORDER BY at").fetchall()
    first, second = [at for item_id, _, at in tried if item_id == "slow"]
    assert second - first >= delay  # the backoff was honoured
    between = [item_id for item_id, _, at in tried if first < at < second]
    assert len(between) >= min(40, int(delay / 0.05))  # and others ran meanwhile
    assert len(applied(tmp_path / "ledger.db")) == 41


def test_items_from_stdin_and_from_s3(tmp_path, s3_server, s3_bucket):
    lines = "".join(json.dumps({"id": i}) + "\n" for i in range(30))
    s3_server.client().put_object(Bucket=s3_bucket, Key="in/items.jsonl", Body=lines.encode())
    env = {**s3_server.env, "LEDGER_DB": str(tmp_path / "ledger.db")}
    proc = run_bulkjob("run", "--items", f"s3://{s3_bucket}/in/items.jsonl", "--handler", "ledger:handle",
                       "--manifest", f"s3://{s3_bucket}/m", "--run-id", "from-s3", "--metrics-port", "0", env=env)
    assert proc.returncode == 0, proc.stderr
    assert summary_of(proc)["done"] == 30
    proc = run_bulkjob("run", "--items", "-", "--handler", "ledger:handle", "--manifest", str(tmp_path / "st"),
                       "--run-id", "from-stdin", "--metrics-port", "0", env=env, stdin=lines)
    assert proc.returncode == 0, proc.stderr
    assert summary_of(proc)["done"] == 30
    missing = run_bulkjob("run", "--items", f"s3://{s3_bucket}/nope.jsonl", "--handler", "ledger:handle",
                          "--manifest", str(tmp_path / "st"), "--run-id", "x", "--metrics-port", "0", env=env)
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr


def test_summary_is_written_for_airflow(tmp_path):
    xcom = tmp_path / "xcom" / "return.json"
    xcom.parent.mkdir()
    proc = bulk(tmp_path, (str(tmp_path / "state"), {}), [{"id": 1, "payload": {"permanent": True}}, {"id": 2}],
                "--xcom-path", str(xcom))
    assert proc.returncode == 1
    written = json.loads(xcom.read_text())
    assert written == summary_of(proc)
    assert written["failed"] == 1 and written["exit_code"] == 1


def test_shards_split_the_work_and_status_adds_them_up(tmp_path, manifest):
    items = [{"id": f"k{i}"} for i in range(90)]
    dones = []
    for index in range(3):
        proc = bulk(tmp_path, manifest, items, "--shard-count", "3", "--shard-index", str(index))
        assert proc.returncode == 0, proc.stderr
        dones.append(summary_of(proc)["done"])
    assert sum(dones) == 90 and min(dones) > 10
    status = status_of(manifest[0], "r1", env=manifest[1])
    assert status["done"] == 90 and [s["done"] for s in status["shards"]] == dones
    assert set(applied(tmp_path / "ledger.db").values()) == {1}


def test_handler_results_are_kept_in_the_manifest(tmp_path):
    proc = bulk(tmp_path, (str(tmp_path / "state"), {}), [{"id": "a", "payload": {"text": "x", "rounds": 1}}],
                handler="job.examples:checksum")
    assert proc.returncode == 0
    from job.manifest import ShardManifest
    from job.store import LocalStore

    record = ShardManifest(LocalStore(tmp_path / "state"), "", "r1", 0, 1).load().latest()["a"]
    assert record["state"] == "done" and len(record["result"]["sha256"]) == 16


def test_status_and_report_of_an_unknown_run(tmp_path):
    proc = run_bulkjob("status", "--manifest", str(tmp_path), "--run-id", "nope")
    assert proc.returncode == 2 and "no manifest for run 'nope'" in proc.stderr


def test_run_rides_out_an_s3_outage(tmp_path, s3_server, s3_bucket):
    from netproxy import TcpProxy

    proxy = TcpProxy(s3_server.port)
    env = {**s3_server.env, "AWS_ENDPOINT_URL": proxy.url, "LEDGER_DB": str(tmp_path / "ledger.db")}
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"seconds": 0.02}} for i in range(300)])

    proc = start_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "ledger:handle",
                         "--manifest", f"s3://{s3_bucket}/m", "--run-id", "outage", "--metrics-port", "0",
                         "--checkpoint-interval", "0.2", "--workers", "2", env=env)
    time.sleep(1.5)
    proxy.cut()
    time.sleep(2.5)
    proxy.restore()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "checkpoint" in err and "will retry" in err
    assert json.loads(out.splitlines()[-1])["done"] == 300
    status = status_of(f"s3://{s3_bucket}/m", "outage", env=s3_server.env)
    assert status["done"] == 300


FINISHED_BEFORE = "was finished by an earlier run on this same input"


def test_a_rerun_of_a_finished_shard_on_the_same_input_ends_at_once(tmp_path, manifest):
    """Every item finished (one failed for good): a rerun on the same bytes reads no record,
    runs nothing and ends as the first did; any change of the input or of what the end depends
    on (--retry-failed, --max-item-bytes) takes the full path."""
    items = [{"id": i, "payload": {"permanent": i == 7}} for i in range(30)]
    first = bulk(tmp_path, manifest, items, "--max-failures", "1")
    assert first.returncode == 0, first.stderr
    again = bulk(tmp_path, manifest, items, "--max-failures", "1")
    assert again.returncode == 0 and FINISHED_BEFORE in again.stderr, again.stderr
    summary = summary_of(again)
    assert {k: summary[k] for k in ("total", "done", "failed", "skipped_already_done", "attempts", "pending")} == \
        {"total": 30, "done": 29, "failed": 1, "skipped_already_done": 29, "attempts": 0, "pending": 0}
    strict = bulk(tmp_path, manifest, items)  # the same end, judged by this run's --max-failures
    assert strict.returncode == 1 and FINISHED_BEFORE in strict.stderr
    assert sum(applied(tmp_path / "ledger.db").values()) == 29  # nothing ran again

    for extra in (("--max-item-bytes", "5000"), ("--retry-failed",)):
        full = bulk(tmp_path, manifest, items, "--max-failures", "1", *extra)
        assert FINISHED_BEFORE not in full.stderr and "already done" in full.stderr, (extra, full.stderr)
    assert summary_of(full)["attempts"] == 1  # --retry-failed ran item 7 again
    # The same items, one byte different: read in full (and the end remembered again).
    changed = [dict(i, payload=dict(i["payload"], note=" ")) if i["id"] == 0 else i for i in items]
    moved = bulk(tmp_path, manifest, changed, "--max-failures", "1")
    assert FINISHED_BEFORE not in moved.stderr and summary_of(moved)["attempts"] == 0
    assert FINISHED_BEFORE in bulk(tmp_path, manifest, changed, "--max-failures", "1").stderr
    assert FINISHED_BEFORE not in bulk(tmp_path, manifest, items, "--max-failures", "1").stderr


def test_skipped_invalid_lines_are_remembered_with_the_end(tmp_path):
    url = str(tmp_path / "state")
    path = write_items(tmp_path / "items.jsonl", [{"id": 1}, "not json", {"id": 2}])

    def run(*extra):
        return run_bulkjob("run", "--items", str(path), "--handler", "ledger:handle", "--manifest", url,
                           "--run-id", "r1", "--metrics-port", "0", "--max-failures", "1", *extra,
                           env={"LEDGER_DB": str(tmp_path / "ledger.db")})

    assert run("--skip-invalid").returncode == 0
    assert FINISHED_BEFORE in run("--skip-invalid").stderr
    refused = run()  # without --skip-invalid the input is refused, as it was before it ran
    assert refused.returncode == 2 and FINISHED_BEFORE not in refused.stderr and "not json" not in refused.stdout


def test_a_run_that_starts_forgets_the_earlier_end_before_it_writes(tmp_path):
    """A rerun on another input is SIGKILLed mid-run: its records are in the manifest, so the
    first input, byte for byte as when it finished, is read in full again."""
    url = str(tmp_path / "state")
    env = {"LEDGER_DB": str(tmp_path / "ledger.db")}
    items = write_items(tmp_path / "items.jsonl", [{"id": i} for i in range(20)])
    argv = ("run", "--handler", "ledger:handle", "--manifest", url, "--run-id", "r1", "--metrics-port", "0",
            "--checkpoint-interval", "0.2")
    assert run_bulkjob(*argv, "--items", str(items), env=env).returncode == 0
    meta = tmp_path / "state" / "r1" / "shard-00000-of-00001" / "meta.json"
    assert "finished" in json.loads(meta.read_text())
    other = write_items(tmp_path / "other.jsonl", [{"id": i} for i in range(20)] + [{"id": 20, "payload": {"hang": True}}])
    proc = start_bulkjob(*argv, "--items", str(other), env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while json.loads(meta.read_text()).get("state") != "running":
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.05)
    assert "finished" not in json.loads(meta.read_text())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    again = run_bulkjob(*argv, "--items", str(items), env=env)
    assert again.returncode == 0 and FINISHED_BEFORE not in again.stderr
    assert summary_of(again)["skipped_already_done"] == 20


def test_a_record_object_gone_since_the_end_means_reading_the_records(tmp_path):
    url = str(tmp_path / "state")
    env = {"LEDGER_DB": str(tmp_path / "ledger.db")}
    items = write_items(tmp_path / "items.jsonl", [{"id": i} for i in range(40)])
    argv = ("run", "--handler", "ledger:handle", "--manifest", url, "--run-id", "r1", "--metrics-port", "0",
            "--items", str(items))
    assert run_bulkjob(*argv, env=env).returncode == 0
    shard = tmp_path / "state" / "r1" / "shard-00000-of-00001"
    segments = sorted(shard.glob("seg-*"))
    assert segments and FINISHED_BEFORE in run_bulkjob(*argv, env=env).stderr
    segments[0].unlink()  # its items' records with it: they run again
    again = run_bulkjob(*argv, env=env)
    assert again.returncode == 0 and FINISHED_BEFORE not in again.stderr
    assert summary_of(again)["attempts"] > 0


def test_an_input_found_valid_is_trusted_only_byte_for_byte(tmp_path):
    """A resume counts the unfinished lines of the input its shard found valid instead of
    parsing them; the same input with one unfinished line made invalid is checked in full and
    refused, with nothing run."""
    url = str(tmp_path / "state")
    env = {"LEDGER_DB": str(tmp_path / "ledger.db")}
    items = [{"id": i, "payload": {"permanent": i == 5}} for i in range(20)]
    path = write_items(tmp_path / "items.jsonl", items)
    argv = ("run", "--handler", "ledger:handle", "--manifest", url, "--run-id", "r1", "--metrics-port", "0",
            "--items", str(path), "--log-level", "debug")
    assert run_bulkjob(*argv, env=env).returncode == 1  # item 5 failed for good
    trusted = run_bulkjob(*argv, "--retry-failed", env=env)
    assert "its unfinished lines were counted, not parsed" in trusted.stderr, trusted.stderr
    assert summary_of(trusted)["attempts"] == 1
    write_items(path, [dict(i, payload=[1]) if i["id"] == 5 else i for i in items])
    refused = run_bulkjob(*argv, "--retry-failed", env=env)
    assert refused.returncode == 2 and "counted, not parsed" not in refused.stderr
    assert '"payload" must be an object' in refused.stderr
    assert sum(applied(tmp_path / "ledger.db").values()) == 19  # item 5 never applied, nothing again
