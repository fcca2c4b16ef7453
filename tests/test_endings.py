"""Every way `bulkjob run` can end is a defined ending: the code from job/exits.py, the JSON
summary on stdout (and nothing else there) and at the XCom path, a one-line `error`, and no
bare traceback on stderr; an internal error logs its traceback once, a handler that cannot be
imported logs its traceback once, at the end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, bulkjob_env, run_bulkjob, stderr_lines, write_items

from job.exits import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, code_of_exception, status_of


def ended(proc, tmp_path, code: int) -> dict:
    """Check the ending every run must have, and return its summary."""
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # the summary, and nothing else
    summary = json.loads(lines[0])
    assert (summary["status"], summary["exit_code"]) == (status_of(code), code)
    if code != EXIT_OK:
        assert summary["error"] and "\n" not in summary["error"]
        assert stderr_lines(proc)[-1].startswith(f"bulkjob: {status_of(code)}: ")
    else:
        stderr_lines(proc)
    xcom = tmp_path / "xcom.json"
    if xcom.exists():
        assert json.loads(xcom.read_text()) == summary
    return summary


def bulk(tmp_path, *args, handler="ledger:handle", items=None, env=None):
    path = write_items(tmp_path / "items.jsonl", items if items is not None else [{"id": i} for i in range(5)])
    env = {"LEDGER_DB": str(tmp_path / "ledger.db"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "tests")]), **(env or {})}
    return run_bulkjob("run", "--items", str(path), "--handler", handler, "--manifest", str(tmp_path / "state"),
                       "--run-id", "r1", "--metrics-port", "0", "--xcom-path", str(tmp_path / "xcom.json"),
                       *args, env=env)


@pytest.mark.parametrize("exc, code", [
    (KeyboardInterrupt(), EXIT_INTERRUPTED),
    (RuntimeError("a bug"), EXIT_INTERNAL),
    (type("Claims1", (Exception,), {"exit_code": 1})(), EXIT_INTERNAL),  # 1 only comes from counting
    (type("Claims2", (Exception,), {"exit_code": 2})(), EXIT_USAGE),
    (type("ClaimsTrue", (Exception,), {"exit_code": True})(), EXIT_INTERNAL),
    (SystemExit(0), EXIT_INTERNAL),
])
def test_the_code_of_an_ending_by_exception(exc, code):
    assert code_of_exception(exc) == code


HANDLERS = {
    "syntax": ("def handle(item, ctx)\n    return None\n", r"SyntaxError at \S*badh\.py line 1: expected ':'"),
    "raises": ("import os\n\nraise RuntimeError('no config')\n", r"RuntimeError at \S*badh\.py line 3: no config$"),
    "dependency": ("import no_such_dependency_xyz\n", r"ModuleNotFoundError at \S*badh\.py line 1: No module"),
    "exits": ("import sys\nsys.exit(3)\n", r"SystemExit at \S*badh\.py line 2: 3$"),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("kind", sorted(HANDLERS))
def test_a_handler_that_cannot_be_imported_is_a_usage_error(tmp_path, kind, dry_run):
    source, where = HANDLERS[kind]
    (tmp_path / "badh.py").write_text(source)
    proc = bulk(tmp_path, *(["--dry-run"] if dry_run else []), handler="badh:handle")
    summary = ended(proc, tmp_path, EXIT_USAGE)
    assert re.search(where, summary["error"]) and summary["error"].startswith("--handler 'badh:handle': cannot import")
    records = [line for line in stderr_lines(proc) if "the handler's import failed" in line]
    assert len(records) == 1 and "badh.py" in records[0]  # the traceback, once, at the end
    assert stderr_lines(proc)[-2] == records[0]
    assert "importlib" not in records[0]  # the handler's frames, not the import machinery's
    assert not (tmp_path / "state").exists() and not (tmp_path / "ledger.db").exists()


def test_a_missing_handler_module_says_where_it_was_looked_for(tmp_path):
    summary = ended(bulk(tmp_path, handler="no_such_module:handle"), tmp_path, EXIT_USAGE)
    assert "no module named 'no_such_module' in the current directory or on the Python path" in summary["error"]


def test_workers_that_die_before_they_start_end_as_a_usage_error(tmp_path):
    # Imports in the parent, dies in every worker: the run gives up instead of restarting them forever.
    (tmp_path / "dies.py").write_text("import multiprocessing, os\n\nif multiprocessing.parent_process() is not None:\n"
                                      "    os._exit(3)\n\n\ndef handle(item, ctx):\n    return None\n")
    summary = ended(bulk(tmp_path, "--workers", "2", handler="dies:handle"), tmp_path, EXIT_USAGE)
    assert "workers keep dying before they start" in summary["error"]
    assert summary["done"] == 0 and summary["pending"] == 5


def inject(tmp_path, where, *args):
    write_items(tmp_path / "items.jsonl", [{"id": i} for i in range(20)])
    argv = [sys.executable, str(ROOT / "tests" / "inject.py"), where, "run", "--items", str(tmp_path / "items.jsonl"),
            "--handler", "ledger:handle", "--manifest", str(tmp_path / "state"), "--run-id", "r1",
            "--metrics-port", "0", "--workers", "1", "--prefetch", "1", "--xcom-path", str(tmp_path / "xcom.json"),
            *args]
    return subprocess.run(argv, env=bulkjob_env({"LEDGER_DB": str(tmp_path / "ledger.db")}), capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("where", ["bug-before-loop", "bug-in-loop", "bug-after-loop"])
def test_a_bug_anywhere_is_an_internal_error_with_its_traceback_logged_once(tmp_path, where):
    proc = inject(tmp_path, where)
    summary = ended(proc, tmp_path, EXIT_INTERNAL)
    assert summary["error"].startswith("internal error (a bug in bulkjob)")
    tracebacks = [line for line in stderr_lines(proc) if "Traceback (most recent call last)" in line]
    assert len(tracebacks) == 1 and "RuntimeError: injected bug" in tracebacks[0]
    assert tracebacks[0].split(" ")[1] == "ERROR"
    if where != "bug-before-loop":
        assert summary["done"] >= 1  # the counts of a run that got going


@pytest.mark.parametrize("where, name", [("sigint-at-start", "SIGINT"), ("sigterm-at-start", "SIGTERM")])
def test_a_signal_before_the_run_handles_signals_is_an_interruption(tmp_path, where, name):
    summary = ended(inject(tmp_path, where), tmp_path, EXIT_INTERRUPTED)
    assert summary["error"] == f"interrupted by {name} before the first item; nothing ran"
    assert not (tmp_path / "ledger.db").exists()


def test_a_signal_while_the_summary_is_written_does_not_cut_it_short(tmp_path):
    summary = ended(inject(tmp_path, "sigterm-at-end"), tmp_path, EXIT_OK)
    assert summary["done"] == 20


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "Invalid value for '--workers'"),
    (["--no-such-option"], "--no-such-option"),
    (["--shard-index", "2", "--shard-count", "2"], "--shard-index 2 is not below --shard-count 2"),
])
def test_a_refused_option_ends_with_a_summary_and_prints_no_run_or_metrics_line(tmp_path, args, message):
    proc = bulk(tmp_path, *args)
    summary = ended(proc, tmp_path, EXIT_USAGE)
    assert message in summary["error"] and summary["run_id"] == "r1"
    assert len(proc.stderr.splitlines()) == 1  # the last line only: no "metrics on", no "a new run"
    assert "metrics on" not in proc.stderr


def test_a_missing_required_option_ends_with_a_summary(tmp_path):
    proc = run_bulkjob("run", "--items", "x.jsonl", "--xcom-path", str(tmp_path / "xcom.json"))
    summary = ended(proc, tmp_path, EXIT_USAGE)
    assert "--handler" in summary["error"] and summary["run_id"] is None
