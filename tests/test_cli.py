"""The command line as a new user meets it: help for every option, messages that say what to do
next, times in one format, and nothing printed for a run that never starts."""

from __future__ import annotations

import json
import re
import urllib.request

import click
import pytest
from conftest import free_port, run_bulkjob, start_bulkjob, status_of, stderr_lines, summary_of, write_items

from job.cli import main

ISO = re.compile(r"^20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_option_has_help(command):
    missing = [p.name for p in main.commands[command].params
               if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert missing == []


def _run(tmp_path, items, *args, run_id="r1"):
    write_items(tmp_path / "items.jsonl", items)
    return run_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "ledger:handle", "--manifest",
                       str(tmp_path / "state"), *(["--run-id", run_id] if run_id else []), "--metrics-port", "0",
                       *args, env={"LEDGER_DB": str(tmp_path / "ledger.db")})


def test_a_usage_error_prints_no_run_id_and_no_metrics_address(tmp_path):
    # Metrics on, no --run-id: a run that starts would print both; this one never starts.
    proc = run_bulkjob("run", "--items", str(tmp_path), "--handler", "ledger:handle", "--manifest",
                       str(tmp_path / "state"), "--metrics-port", str(free_port()))
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("bulkjob: error: --items")
    started = _run(tmp_path, [{"id": 1}], run_id=None)
    run_id = summary_of(started)["run_id"]
    assert f"a new run: pass --run-id {run_id} to resume it" in started.stderr


def test_metrics_listen_on_the_address_given(tmp_path):
    write_items(tmp_path / "items.jsonl", [{"id": 1, "payload": {"seconds": 30}}])
    port = free_port()
    proc = start_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "job.examples:sleep",
                         "--manifest", str(tmp_path / "state"), "--run-id", "m", "--metrics-host", "127.0.0.1",
                         "--metrics-port", str(port))
    try:
        line = proc.stderr.readline()
        while "metrics on" not in line:
            assert line, "the run ended without serving metrics"
            line = proc.stderr.readline()
        assert f"metrics on http://127.0.0.1:{port}/metrics" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert b"bulkjob_run_info" in response.read()
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 3


def test_a_failed_rerun_says_how_to_retry_and_retry_failed_says_how_many(tmp_path):
    items = [{"id": i, "payload": {"permanent": i in (3, 7)}} for i in range(10)]
    first = _run(tmp_path, items, "--manifest", str(tmp_path / "state"))
    assert first.returncode == 1
    again = _run(tmp_path, [{"id": i} for i in range(10)])
    assert again.returncode == 1 and summary_of(again)["attempts"] == 0
    last = stderr_lines(again)[-1]
    assert last.startswith("bulkjob: failed: 2 item(s) failed for good in an earlier run, not tried again (--max-failures 0).")
    assert f"bulkjob report --manifest {tmp_path / 'state'} --run-id r1" in last and "--retry-failed" in last
    retried = _run(tmp_path, [{"id": i} for i in range(10)], "--retry-failed")
    assert retried.returncode == 0, retried.stderr
    assert "10 items, 8 already done, retrying 2 that failed (--retry-failed)" in retried.stderr


def test_status_json_times_are_iso_8601_like_the_report(tmp_path):
    _run(tmp_path, [{"id": 1, "payload": {"permanent": True}}, {"id": 2}])
    status = status_of(str(tmp_path / "state"), "r1")
    for doc in (status, *status["shards"]):
        assert ISO.match(doc["started_at"]) and ISO.match(doc["updated_at"]), doc
        assert doc["started_at"] <= doc["updated_at"]
    report = run_bulkjob("report", "--manifest", str(tmp_path / "state"), "--run-id", "r1")
    assert ISO.match(json.loads(report.stdout)["last_attempt_at"])


def test_an_unknown_run_lists_the_runs_that_exist(tmp_path):
    for run_id in ("alpha", "beta"):
        _run(tmp_path, [{"id": 1}], run_id=run_id)
    for command in ("status", "report"):
        proc = run_bulkjob(command, "--manifest", str(tmp_path / "state"), "--run-id", "gamma")
        assert proc.returncode == 2
        assert f"no manifest for run 'gamma' in {tmp_path / 'state'}; runs there: alpha, beta" in proc.stderr
    empty = run_bulkjob("status", "--manifest", str(tmp_path / "nothing"), "--run-id", "gamma")
    assert empty.returncode == 2 and "it holds no runs" in empty.stderr
