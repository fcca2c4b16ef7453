"""The Airflow DAG tests (tests/airflow/dag_checks.py), run in their own virtualenv.

Airflow pins hundreds of packages; keeping it out of the job's test venv
means those pins never decide the job's own versions. `make airflow-venv`
builds `.venv-airflow` (Airflow 3 and the cncf.kubernetes provider), and this
test runs pytest there, handing over summaries that the real job wrote so the
DAG's last task is checked against the real shape, and job/exits.py's exit-code
table, which the DAG keeps a copy of.
"""

import dataclasses
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, need, run_bulkjob, summary_of, write_items

from job.db.worktable import DDL
from job.exits import ENDINGS

AIRFLOW_VENV = ROOT / ".venv-airflow"
AIRFLOW_PYTHON = AIRFLOW_VENV / "bin" / "python"
AIRFLOW_TESTS = ROOT / "tests" / "airflow" / "dag_checks.py"


def _make_airflow_venv() -> None:
    proc = subprocess.run(["make", "-s", "airflow-venv"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
    need(proc.returncode == 0 and AIRFLOW_PYTHON.exists(),
         f"could not build {AIRFLOW_VENV.name} (make airflow-venv):\n{tail}")


def _job_summaries(folder: Path) -> Path:
    """Run the real job three ways and keep the summary each wrote to its XCom path."""
    folder.mkdir()
    cases = {
        "ok": ([{"id": f"i{n}", "payload": {}} for n in range(20)], "job.examples:noop"),
        "items-failed": ([{"id": "good", "payload": {}}, {"id": "bad", "payload": {"fail": "permanent"}}],
                         "job.examples:checksum"),
        "bad-input": (['{"id": "a"}', '{"id": '], "job.examples:noop"),
    }
    for name, (items, handler) in cases.items():
        path = write_items(folder / f"{name}.jsonl", items)
        proc = run_bulkjob("run", "--items", str(path), "--handler", handler, "--manifest",
                           str(folder / "state"), "--run-id", f"airflow-{name}", "--workers", "1",
                           "--metrics-port", "0", "--xcom-path", str(folder / f"{name}.json"))
        assert proc.returncode == summary_of(proc)["exit_code"], proc.stderr
        path.unlink()
    # A runner of a work table, as the DAG's work_table param starts it: one row fails.
    table = folder / "work.db"
    with sqlite3.connect(table) as conn:
        conn.executescript(DDL["sqlite"])
        conn.executemany("INSERT INTO bulk_work (work_id, payload) VALUES (?, ?)",
                         [(f"w{n}", json.dumps({"fail": "permanent"} if n == 3 else {})) for n in range(10)])
    proc = run_bulkjob("run", "--work-table", "bulk_work", "--db", f"sqlite:///{table}", "--handler",
                       "job.examples:checksum", "--run-id", "manual__2026-11-25T08:12:24+00:00", "--workers", "1",
                       "--metrics-port", "0", "--xcom-path", str(folder / "work-table-failed.json"))
    assert proc.returncode == 1 and summary_of(proc)["work_table"] == "bulk_work", proc.stderr
    assert sorted(p.stem for p in folder.glob("*.json")) == sorted([*cases, "work-table-failed"])
    return folder


@pytest.mark.timeout(1200)
def test_airflow_dag_suite_passes_in_its_own_venv(tmp_path):
    _make_airflow_venv()
    summaries = _job_summaries(tmp_path / "summaries")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    endings = tmp_path / "endings.json"
    endings.write_text(json.dumps([dataclasses.asdict(e) for e in ENDINGS]))
    env.update(BULKJOB_SUMMARIES_DIR=str(summaries), BULKJOB_ENDINGS_FILE=str(endings),
               AIRFLOW_HOME=str(tmp_path / "airflow-home"))
    # --confcutdir keeps the job's tests/conftest.py (and its imports) out of the Airflow venv.
    proc = subprocess.run(
        [str(AIRFLOW_PYTHON), "-m", "pytest", str(AIRFLOW_TESTS), "-q", "-rs", "-p", "no:cacheprovider",
         "--confcutdir", str(AIRFLOW_TESTS.parent)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, f"Airflow DAG tests failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1]
