"""The designs bulkjob replaces, run on the same items: GNU parallel with one Python process per
item, and Airflow with one mapped task per item."""

from __future__ import annotations

import csv
import shutil
import sqlite3
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from .common import PYTHON, ROOT, clean_env, median

AIRFLOW_VENV = ROOT / ".venv-airflow"


class Skipped(Exception):
    """Raised when a peer cannot be run here (its tool is missing); the message says why."""


def gnu_parallel(items: Path, *, jobs: int) -> dict:
    """`parallel -j JOBS --joblog` starting `python -m bench.one_item ITEM` for every line."""
    exe = shutil.which("parallel")
    if exe is None:
        raise Skipped("GNU parallel is not installed (scripts/install-system-deps.sh parallel)")
    count = sum(1 for line in open(items) if line.strip())
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        joblog = Path(tmp) / "joblog.tsv"
        started = time.time()
        proc = subprocess.run([exe, "--will-cite", "--joblog", str(joblog), "-j", str(jobs), "-a", str(items),
                               PYTHON, "-m", "bench.one_item", "{}"],
                              cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=900)
        wall = time.time() - started
        if proc.returncode != 0:
            raise RuntimeError(f"parallel exited {proc.returncode}: {proc.stderr[-2000:]}")
        with open(joblog) as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    runtimes = [float(r["JobRuntime"]) for r in rows]
    failed = sum(1 for r in rows if r["Exitval"] != "0")
    if len(rows) != count or failed:
        raise RuntimeError(f"parallel ran {len(rows)} of {count} items, {failed} failed")
    return {"items": count, "jobs": jobs, "wall_seconds": wall, "seconds_per_item": wall / count,
            "median_job_runtime": median(runtimes)}


def airflow(items: Path) -> dict:
    """`airflow dags test` of bench/airflow_dag.py in .venv-airflow, with its own AIRFLOW_HOME
    (SQLite, `airflow db migrate` first, not timed). Per item: the span of the mapped task
    instances (first start to last end) over their number, read from Airflow's database."""
    exe = AIRFLOW_VENV / "bin" / "airflow"
    if not exe.exists():
        raise Skipped(f"{exe} not found (make airflow-venv)")
    count = sum(1 for line in open(items) if line.strip())
    with tempfile.TemporaryDirectory(prefix="bench-airflow-") as tmp:
        home = Path(tmp)
        dags = home / "dags"
        dags.mkdir()
        shutil.copy(Path(__file__).parent / "airflow_dag.py", dags / "bench_mapped.py")
        env = {k: v for k, v in clean_env().items() if k != "PYTHONPATH"}
        env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(dags),
                   AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__MAX_MAP_LENGTH=str(max(1024, count)),
                   BENCH_ITEMS_FILE=str(items))
        migrate = subprocess.run([str(exe), "db", "migrate"], env=env, cwd=tmp, capture_output=True,
                                 text=True, timeout=600)
        if migrate.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed: {migrate.stderr[-2000:]}")
        started = time.time()
        proc = subprocess.run([str(exe), "dags", "test", "bench_mapped"], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=1800)
        wall = time.time() - started
        if proc.returncode != 0:
            raise RuntimeError(f"airflow dags test failed: {proc.stderr[-2000:]}")
        with sqlite3.connect(home / "airflow.db") as db:
            n, done, first, last = db.execute(
                "SELECT count(*), sum(state = 'success'), min(start_date), max(end_date) "
                "FROM task_instance WHERE task_id = 'handle'").fetchone()
    if n != count or done != count:
        raise RuntimeError(f"airflow ran {n} mapped tasks for {count} items, {done} succeeded")
    span = _ts(last) - _ts(first)
    return {"items": count, "wall_seconds": wall, "mapped_span_seconds": span,
            "seconds_per_item": span / count, "wall_per_item": wall / count}


def _ts(text: str) -> float:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()
