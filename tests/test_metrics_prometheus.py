"""Metrics against real servers: a Prometheus scraping the job, promtool, and a Pushgateway."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
from conftest import ROOT, free_port, need, start_bulkjob, status_of, write_items
from ledger import applied
from promservers import (
    Prometheus,
    Pushgateway,
    descendants,
    in_flight_by_pid,
    metrics_dir_of,
    parse,
    scrape,
    wait_for_metrics,
)

pytestmark = pytest.mark.slow

DASHBOARD = ROOT / "k8s" / "grafana-dashboard.json"
RULES = ROOT / "tests" / "prometheus" / "rules.yaml"
#: Grafana's variables in the dashboard's queries, as Grafana would fill them in for all pods.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$namespace": ".*", "$pod": ".*"}


def _promtool() -> str:
    exe = shutil.which("promtool")
    need(exe is not None, "promtool is not installed (apt-get install prometheus)")
    return exe


class ObservedRun:
    """What the module's run left: the servers, the run's numbers at two moments, its end."""


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """A run of 40 ledger items (retries, permanent failures, two worker crashes) whose last
    item hangs: while it hangs, every other count is final; then SIGTERM interrupts the run."""
    tmp = tmp_path_factory.mktemp("observed")
    run = ObservedRun()
    run.pushgateway = Pushgateway(tmp / "pg")
    run.port = free_port()
    run.prometheus = Prometheus(tmp / "prom", [f"127.0.0.1:{run.port}"])
    items = ([{"id": f"ok-{n}", "payload": {"seconds": 0.05}} for n in range(30)]
             + [{"id": f"flaky-{n}", "payload": {"seconds": 0.05, "fail_until": 2}} for n in range(4)]
             + [{"id": f"bad-{n}", "payload": {"permanent": True}} for n in range(3)]
             + [{"id": f"crash-{n}", "payload": {"crash_on": [1]}} for n in range(2)]
             + [{"id": "hang", "payload": {"hang": True}}])
    write_items(tmp / "items.jsonl", items)
    run.run_id, run.manifest, run.ledger = "observed", str(tmp / "manifest"), tmp / "ledger.db"
    env = {"LEDGER_DB": str(run.ledger), "TMPDIR": str(tmp)}
    proc = start_bulkjob("run", "--items", str(tmp / "items.jsonl"), "--handler", "ledger:handle",
                         "--manifest", run.manifest, "--run-id", run.run_id, "--workers", "2",
                         "--backoff", "0.05", "--checkpoint-interval", "0.2", "--drain-timeout", "1",
                         # nothing may wait behind the hanging item in its worker's queue
                         "--prefetch", "1",
                         "--metrics-port", str(run.port), "--pushgateway", run.pushgateway.url, env=env)
    try:
        wait_for_metrics(run.port, proc)
        prom = run.prometheus
        prom.wait_until("bulkjob_items_pending", 1)
        prom.wait_until("sum(bulkjob_items_in_flight)", 1)
        deadline = time.monotonic() + 30
        while (status := status_of(run.manifest, run.run_id))["pending"] != 1:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        run.status = status
        # Rates need two samples in their window: let Prometheus scrape the live run a few times.
        deadline = time.monotonic() + 30
        while (prom.value("count_over_time(bulkjob_items_pending[1m])") or 0) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.25)
        run.live_at = time.time()
        run.exposition = scrape(run.port)
        run.metrics_dir_files = sorted(os.listdir(metrics_dir_of(tmp, proc.pid)))
        run.prom_values = {
            "done": prom.value('bulkjob_items_finished_total{outcome="done"}'),
            "failed": prom.value('bulkjob_items_finished_total{outcome="failed"}'),
            "attempts": prom.value("sum(bulkjob_attempts_total)"),
            "retries": prom.value("sum(bulkjob_retries_total)"),
            "crashes": prom.value('bulkjob_worker_restarts_total{cause="crash"}'),
            "pending": prom.value("bulkjob_items_pending"),
            "total": prom.value("bulkjob_shard_items"),
            "info": prom.value(f'bulkjob_run_info{{run_id="{run.run_id}",shard="0",total="40"}}'),
            "ok_attempts": prom.value('bulkjob_attempts_total{outcome="ok"}'),
            "permanent": prom.value('sum(bulkjob_attempts_total{outcome="permanent"})'),
        }
        proc.send_signal(signal.SIGTERM)
        run.stdout, run.stderr = proc.communicate(timeout=60)
        run.returncode = proc.returncode
        run.tmp = tmp
        yield run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        run.prometheus.stop()
        run.pushgateway.stop()


def test_prometheus_scraped_the_counts_the_manifest_holds(observed):
    status, got = observed.status, observed.prom_values
    assert (status["total"], status["done"], status["failed"], status["pending"]) == (40, 36, 3, 1)
    assert got["done"] == status["done"] and got["failed"] == status["failed"]
    assert got["pending"] == status["pending"] and got["total"] == status["total"]
    # Every ended attempt: 30 + 4 x 2 (one retry) + 3 + 2 x 2 (one crash); the manifest keeps
    # each item's attempts, the hanging item has none yet.
    assert got["attempts"] == status["attempts"] == 45
    assert got["ok_attempts"] == 36 and got["permanent"] == 3
    assert got["retries"] == 6 and got["crashes"] == 2
    assert got["info"] == 1
    assert len(applied(observed.ledger)) == status["done"]


def test_the_exposition_passes_promtool(observed):
    proc = subprocess.run([_promtool(), "check", "metrics"], input=observed.exposition, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr
    # The workers' files are merged in: items in flight and the error labels are there.
    samples = parse(observed.exposition)
    assert samples["bulkjob_items_in_flight", ()] == 1
    assert samples["bulkjob_attempts_total", (("error", "T-RETRY"), ("outcome", "retryable"))] == 4
    assert samples["bulkjob_attempts_total", (("error", "WorkerCrashed"), ("outcome", "crashed"))] == 2


def test_counters_never_went_backwards_across_worker_restarts(observed):
    prom = observed.prometheus
    assert prom.query("resets(bulkjob_attempts_total[10m]) > 0") == []
    assert prom.query("resets(bulkjob_items_finished_total[10m]) > 0") == []
    assert prom.value('max_over_time(bulkjob_worker_restarts_total{cause="crash"}[10m])') == 2
    # Two crashed workers were replaced; their live files went with them.
    assert len([f for f in observed.metrics_dir_files if f.startswith("gauge_livesum_")]) == 2


def test_the_pushgateway_received_the_interrupted_run(observed):
    assert observed.returncode == 3, observed.stderr[-3000:]
    pushed = observed.pushgateway.samples(job="bulkjob", run_id=observed.run_id, shard="0")
    assert pushed["bulkjob_items_finished_total", (("outcome", "done"),)] == 36
    assert pushed["bulkjob_items_finished_total", (("outcome", "failed"),)] == 3
    assert pushed["bulkjob_items_pending", ()] == 1
    assert pushed["bulkjob_run_exit_code", ()] == 3
    assert pushed["bulkjob_run_end_time_seconds", ()] >= pushed["bulkjob_run_start_time_seconds", ()]
    # Only the run's own numbers are pushed: nothing a worker held when the run stopped, and no
    # progress time that would keep a stall alert firing on the Pushgateway's copy forever.
    assert not [name for name, _ in pushed if name.startswith(("bulkjob_items_in_flight", "bulkjob_last_progress"))]


def test_the_metrics_directory_is_removed_at_exit(observed):
    assert not list(observed.tmp.glob("bulkjob-metrics-*"))


def test_a_killed_worker_stops_counting_in_flight_and_its_counters_stay(tmp_path):
    """Two items wait on a file; one worker is SIGKILLed: items in flight go from 2 to 1 at once
    (not after the run), and the handler's own counter keeps the dead worker's count."""
    port = free_port()
    prom = Prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"])
    release = tmp_path / "release"
    write_items(tmp_path / "items.jsonl", [{"id": f"wait-{n}", "payload": {"wait_for": str(release)}}
                                           for n in range(2)])
    proc = start_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "obs_handler:handle",
                         "--manifest", str(tmp_path / "manifest"), "--run-id", "killed", "--workers", "2",
                         "--prefetch", "1", "--max-attempts", "1", "--metrics-port", str(port),
                         env={"TMPDIR": str(tmp_path)})
    try:
        wait_for_metrics(port, proc)
        prom.wait_until("sum(bulkjob_items_in_flight)", 2)
        directory = metrics_dir_of(tmp_path, proc.pid)
        busy = [pid for pid, n in in_flight_by_pid(directory).items() if n == 1]
        assert len(busy) == 2 and set(busy) <= set(descendants(proc.pid))
        os.kill(busy[0], signal.SIGKILL)
        prom.wait_until('bulkjob_worker_restarts_total{cause="crash"}', 1)
        prom.wait_until("sum(bulkjob_items_in_flight)", 1)
        samples = parse(scrape(port))
        assert samples["bulkjob_items_in_flight", ()] == 1
        assert samples["obs_handler_calls_total", ()] == 2
        assert samples["bulkjob_attempts_total", (("error", "WorkerCrashed"), ("outcome", "crashed"))] == 1
        left = os.listdir(directory)
        assert not [f for f in left if f.endswith(f"_{busy[0]}.db")], left
        assert "counter_merged.db" in left
        release.touch()
        proc.communicate(timeout=60)
        assert proc.returncode == 1  # the killed item failed for good (--max-attempts 1)
        assert prom.query("resets(obs_handler_calls_total[10m]) > 0") == []
        assert prom.value("max_over_time(obs_handler_calls_total[10m])") == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        prom.stop()


def test_the_directory_stays_small_however_many_workers_are_replaced(tmp_path):
    """Twelve worker crashes: the dead workers' files are folded, their counts kept, and the
    final numbers of the (successful) run reach the Pushgateway."""
    pushgateway = Pushgateway(tmp_path / "pg")
    port = free_port()
    release = tmp_path / "release"
    items = [{"id": f"crash-{n}", "payload": {"crash_on": [1]}} for n in range(12)]
    items.append({"id": "last", "payload": {"wait_for": str(release)}})
    write_items(tmp_path / "items.jsonl", items)
    proc = start_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "obs_handler:handle",
                         "--manifest", str(tmp_path / "manifest"), "--run-id", "many", "--workers", "2",
                         "--backoff", "0.01", "--prefetch", "1", "--metrics-port", str(port),
                         "--pushgateway", pushgateway.url,
                         env={"TMPDIR": str(tmp_path)})
    try:
        wait_for_metrics(port, proc)
        deadline = time.monotonic() + 60
        # Until the crashing items are all done and the last item has reached the handler.
        while True:
            samples = parse(scrape(port))
            if samples.get(("bulkjob_items_pending", ())) == 1 and samples.get(("obs_handler_calls_total", ()), 0) >= 25:
                break
            assert time.monotonic() < deadline, samples
            time.sleep(0.2)
        assert samples["bulkjob_worker_restarts_total", (("cause", "crash"),)] == 12
        # 12 crashed attempts, 12 retries that succeeded, the waiting item: each counted once.
        assert samples["obs_handler_calls_total", ()] == 25
        files = os.listdir(metrics_dir_of(tmp_path, proc.pid))
        # Two live workers' files (counter, in-flight gauge), the parent's counter file (it
        # imported the handler to check it), the merged counters: nothing per dead worker.
        assert len(files) <= 6, files
        assert "counter_merged.db" in files
        release.touch()
        proc.communicate(timeout=60)
        assert proc.returncode == 0
        pushed = pushgateway.samples(job="bulkjob", run_id="many", shard="0")
        assert pushed["bulkjob_items_finished_total", (("outcome", "done"),)] == 13
        assert pushed["bulkjob_run_exit_code", ()] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        pushgateway.stop()


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [(v["name"], v["definition"]) for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries


def _exported_names(exposition: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    names = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def test_the_dashboard_and_the_alerts_use_only_metrics_the_job_exports(observed):
    yaml = pytest.importorskip("yaml")
    rules = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    used = set(re.findall(r"\bbulkjob_[a-z0-9_]+", " ".join([q for _, q in _dashboard_queries()] + rules)))
    assert len(used) >= 12
    assert used <= _exported_names(observed.exposition), used - _exported_names(observed.exposition)


def test_every_dashboard_panel_shows_data_of_a_live_run(observed):
    """Each panel query, as Grafana sends it for all pods, parses and returns series for the
    moment when the run was live."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert {"Progress", "Throughput by outcome", "Attempt duration", "Retries by error", "Workers",
            "Checkpoint latency"} <= {p["title"] for p in dashboard["panels"]}
    for title, expr in _dashboard_queries():
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        result = observed.prometheus.api("query", query=expr, time=observed.live_at)
        assert result["status"] == "success", (title, expr, result)
        assert result["data"]["result"], (title, expr)
