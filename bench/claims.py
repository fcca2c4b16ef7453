"""A work table as a claim queue: 1, 2 and 4 runners on one table of the test PostgreSQL
(tests/pg.py), rows per second in all and per runner, and the 4-runner over 1-runner ratio.

The items wait on the database (`pg_sleep`), not on the CPU: the machine has 2 shared cores,
so CPU-bound items could not get faster with more runners whatever the queue does. Waiting
items measure the queue: claims, extensions and the guarded write-back of many runners at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from .common import PYTHON, ROOT, clean_env, free_port

STEPS = """\
-- step: work
SELECT pg_sleep(:sleep);
INSERT INTO ledger (item) VALUES (:item);
"""


def claim_scaling(b, *, rows: int = 1600, runners=(1, 2, 4), workers: int = 4, sleep: float = 0.05) -> dict:
    """`rows` rows of `sleep` seconds each, claimed by each number of `runners` (of `workers`
    workers each) started together, on a fresh table each time."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from pg import PgServer
    except ImportError as e:
        return {"skipped": f"tests/pg.py (the PostgreSQL test server) cannot be imported: {e}"}
    try:
        server = PgServer()
    except BaseException as e:  # the fixture skips (a pytest outcome) when PostgreSQL is missing
        if isinstance(e, KeyboardInterrupt):
            raise
        return {"skipped": f"PostgreSQL could not be started: {e}"}
    from job.db.worktable import DDL

    steps = b.work / "claims.sql"
    steps.write_text(STEPS)
    out: dict = {"rows": rows, "workers": workers, "item_seconds": sleep, "runs": []}
    try:
        name = server.create_database("claims")
        for count in runners:
            with server.connect(name) as conn:
                conn.execute("DROP TABLE IF EXISTS bulk_work, ledger")
                conn.execute(DDL["postgres"])
                conn.execute("CREATE TABLE ledger (item text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())")
                conn.execute("INSERT INTO bulk_work (work_id, payload) SELECT 'w' || lpad(i::text, 6, '0'), "
                             "json_build_object('item', 'w' || lpad(i::text, 6, '0'), 'sleep', %s::float) "
                             "FROM generate_series(1, %s) i", (sleep, rows))
            out["runs"].append(_run(server, name, steps, count, workers, rows))
        one = next(r for r in out["runs"] if r["runners"] == 1)
        most = max(out["runs"], key=lambda r: r["runners"])
        out["ratio"] = most["rate"] / one["rate"]
        out["ratio_runners"] = most["runners"]
        return out
    finally:
        server.stop()


def _run(server, name: str, steps, count: int, workers: int, rows: int) -> dict:
    cmd = [PYTHON, "-m", "job", "run", "--work-table", "bulk_work", "--handler", f"sql:{steps}",
           "--db", server.url(name), "--workers", str(workers)]
    env = clean_env({"BULKJOB_DB_PASSWORD": server.password})
    started = time.time()
    procs = [subprocess.Popen([*cmd, "--metrics-port", str(free_port())], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]
    summaries = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"a runner exited {proc.returncode}:\n{stderr[-3000:]}")
        summaries.append(json.loads(lines[-1]))
    ended = time.time()
    with server.connect(name) as conn:
        done = conn.execute("SELECT COUNT(*) FROM bulk_work WHERE state = 'DONE'").fetchone()[0]
        committed, distinct, span = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT item), EXTRACT(EPOCH FROM MAX(at) - MIN(at)) FROM ledger").fetchone()
    if (done, committed, distinct) != (rows, rows, rows):
        raise RuntimeError(f"{count} runner(s): {done} rows DONE, {committed} commits of {distinct} rows; "
                           f"expected {rows} of each")
    if sum(s["done"] for s in summaries) != rows:
        raise RuntimeError(f"{count} runner(s): the summaries count {sum(s['done'] for s in summaries)} rows")
    span = float(span)
    # Rows per second between the first and the last commit (start-up and the end left out, as
    # for the other workloads), and each runner's share over the same span.
    return {"runners": count, "rate": (rows - 1) / span if span > 0 else float("nan"),
            "per_runner": [s["done"] / span for s in summaries], "wall": ended - started,
            "taken_over": sum(s["taken_over"] for s in summaries)}
