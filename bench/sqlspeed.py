"""The SQL steps handler at the database's speed: a steps file run by the job against the same
statements in a hand-written psycopg loop (bench/sqlloop.py) over as many connections as the
job has workers, a commit per item, on the private PostgreSQL of the tests (tests/pg.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time

from .common import PYTHON, ROOT, clean_env, median, pg_server

_TICKS = os.sysconf("SC_CLK_TCK")

#: (name, steps file, the loop's statements): an upsert alone, and an upsert, an insert and an
#: update of the upserted row, each its own step. Every item touches rows of its own, so no
#: item waits for another's lock.
FILES = (
    ("one", "-- step: upsert\nINSERT INTO kv (k, v) VALUES (:k, :v)\n"
            "ON CONFLICT (k) DO UPDATE SET v = excluded.v;\n",
     ["INSERT INTO kv (k, v) VALUES (%(k)s, %(v)s) ON CONFLICT (k) DO UPDATE SET v = excluded.v"]),
    ("three", "-- step: upsert\nINSERT INTO kv (k, v) VALUES (:k, :v)\n"
              "ON CONFLICT (k) DO UPDATE SET v = excluded.v;\n"
              "-- step: log\nINSERT INTO kv_log (k, v) VALUES (:k, :v);\n"
              "-- step: count\nUPDATE kv SET n = n + 1 WHERE k = :k;\n",
     ["INSERT INTO kv (k, v) VALUES (%(k)s, %(v)s) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
      "INSERT INTO kv_log (k, v) VALUES (%(k)s, %(v)s)",
      "UPDATE kv SET n = n + 1 WHERE k = %(k)s"]),
)
SCHEMA = ("CREATE TABLE kv (k text PRIMARY KEY, v int NOT NULL, n int NOT NULL DEFAULT 0);"
          "CREATE TABLE kv_log (k text NOT NULL, v int NOT NULL)")


def sql_speed(b, *, count: int = 20000, workers: int = 4, runs: int = 3) -> dict:
    """For each file, the job and the loop alternate `runs` times on emptied tables; medians of
    the items/s (first to last item done) and their ratio. The rows are checked after each run."""
    server, skipped = pg_server()
    if server is None:
        return {"skipped": skipped}
    try:
        name = server.create_database("sqlspeed")
        with server.connect(name) as conn:
            conn.execute(SCHEMA)
        items = b.items(f"sqlspeed-{count}", count, lambda i: {"k": f"k{i:07d}", "v": i})
        env = {"BULKJOB_DB_PASSWORD": server.password}
        out: dict = {"items": count, "workers": workers, "runs": runs}
        for label, text, statements in FILES:
            steps = b.work / f"sqlspeed-{label}.sql"
            steps.write_text(text)
            job_rates, loop_rates, job_server, loop_server, parent, loop_cpu = [], [], [], [], [], []
            for _ in range(runs):
                _empty(server, name)
                b.s3.reset()
                before = _server_cpu(server)
                run = b.job(items, f"sql:{steps}", name=f"sqlspeed-{label}", workers=workers,
                            extra=("--db", server.url(name)), env=env)
                job_server.append(1e6 * (_server_cpu(server) - before) / count)
                if run.summary.get("done") != count or run.items != count:
                    raise RuntimeError(f"sqlspeed {label}: {run.summary}")
                _check(server, name, count, len(statements))
                job_rates.append(run.steady_rate)
                if run.parent:
                    parent.append(1e6 * (run.parent["cpu_user_s"] + run.parent["cpu_system_s"]) / count)
                _empty(server, name)
                before = _server_cpu(server)
                rate, cpu = _loop(server, name, items, workers, statements)
                loop_server.append(1e6 * (_server_cpu(server) - before) / count)
                loop_rates.append(rate)
                loop_cpu.append(1e6 * cpu / count)
                _check(server, name, count, len(statements))
            job, loop = median(job_rates), median(loop_rates)
            out[label] = {"statements": len(statements), "job_rates": job_rates, "loop_rates": loop_rates,
                          "job_rate": job, "loop_rate": loop, "ratio": job / loop,
                          "ratios": [j / lo for j, lo in zip(job_rates, loop_rates, strict=True)],
                          "server_cpu_us": {"job": median(job_server), "loop": median(loop_server)},
                          "job_parent_cpu_us": median(parent), "loop_cpu_us": median(loop_cpu)}
        return out
    finally:
        server.stop()


def _server_cpu(server) -> float:
    """CPU seconds the PostgreSQL server has used so far: the postmaster's, its own children's
    (background processes) and those of the children it has reaped (the sessions that ended).
    Waits (up to 10 s) until no session is left open, so that none is counted twice or not at
    all while it is being reaped."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    deadline = time.monotonic() + 10
    while True:
        children = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline") as f:
                    title = f.read()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                children[title] = fields
        sessions = [t for t in children if "(" in t]  # "postgres: USER DB HOST(PORT) STATE"
        if not sessions or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    with open(f"/proc/{postmaster}/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in own[11:15]) + sum(int(c[11]) + int(c[12]) for c in children.values())
    return ticks / _TICKS


def _empty(server, name: str) -> None:
    with server.connect(name) as conn:
        conn.execute("TRUNCATE kv, kv_log")


def _check(server, name: str, count: int, statements: int) -> None:
    """Every item's row is there, with as many log rows and counts as the file has steps."""
    with server.connect(name) as conn:
        rows, counted = conn.execute("SELECT count(*), coalesce(sum(n), 0) FROM kv").fetchone()
        logged = conn.execute("SELECT count(*) FROM kv_log").fetchone()[0]
    expected = (count, count, count) if statements == 3 else (count, 0, 0)
    if (rows, logged, counted) != expected:
        raise RuntimeError(f"sqlspeed: rows, log rows, counts = {(rows, logged, counted)}, expected {expected}")


def _loop(server, name: str, items, workers: int, statements: list[str]) -> tuple[float, float]:
    """(items/s, CPU seconds of the loop's processes) of one run of bench.sqlloop."""
    from pg import PG_USER

    conninfo = f"host=127.0.0.1 port={server.port} user={PG_USER} dbname={name}"
    proc = subprocess.run([PYTHON, "-m", "bench.sqlloop", conninfo, str(items), str(workers), json.dumps(statements)],
                          cwd=ROOT, env=clean_env({"PGPASSWORD": server.password}), capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.sqlloop failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    return result["steady_rate"], result["cpu_seconds"]
