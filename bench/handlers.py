"""Handlers the benchmarks run. Each does what the job's example handlers do (nothing, or a
sleep) and, with BENCH_STATS_DIR set, has its worker record its own peak RSS and CPU seconds
when the worker exits normally (a multiprocessing finalizer, run as the worker process ends)."""

from __future__ import annotations

import os
import signal
import time

from bulkjob import Permanent

#: Rows inserted per item by the database handlers (the payload's `rows` overrides it).
ROWS_PER_ITEM = 1000
INSERT_SQL = "INSERT INTO bench_rows (item_id, n, note) VALUES (%s, %s, %s)"

_watching = False


def _watch() -> None:
    """On a worker's first item: arrange for its stats to be written when it exits."""
    global _watching
    if _watching:
        return
    _watching = True
    directory = os.environ.get("BENCH_STATS_DIR")
    if directory:
        from multiprocessing import util

        from .procstats import write_stats

        util.Finalize(None, write_stats, args=(directory, "worker"), exitpriority=100)


def noop(item, ctx):
    """Does nothing: what is measured is the job's own cost per item."""
    _watch()
    return None


def sleep(item, ctx):
    """Waits `payload.seconds` (default 0.02), like a database round trip."""
    _watch()
    time.sleep(float(item.payload.get("seconds", 0.02)))
    return None


def noop_then_stop(item, ctx):
    """A no-op; the item whose payload says `stop` also sends SIGTERM to the job's parent (its
    pid is in the file BENCH_PARENT_PIDFILE), as Kubernetes does when it evicts a pod."""
    _watch()
    if item.payload.get("stop"):
        with open(os.environ["BENCH_PARENT_PIDFILE"]) as f:
            os.kill(int(f.read()), signal.SIGTERM)
    return None


def _rows(item) -> list[tuple]:
    count = int(item.payload.get("rows", ROWS_PER_ITEM))
    return [(item.id, n, f"row {n}") for n in range(count)]


def insert_batch(item, ctx):
    """Inserts the item's rows with the batch helper (`ctx.executemany`), then commits."""
    _watch()
    rows = _rows(item)
    refused = ctx.executemany(INSERT_SQL, rows)
    if refused:
        raise Permanent(f"{len(refused)} row(s) refused: {refused[0].message}")
    ctx.db.commit()
    return {"rows": len(rows)}


def insert_each(item, ctx):
    """Inserts the same rows one statement at a time on the worker's connection, then commits."""
    _watch()
    rows = _rows(item)
    conn = ctx.db
    with conn.cursor() as cur:
        for row in rows:
            cur.execute(INSERT_SQL, row)
    conn.commit()
    return {"rows": len(rows)}
