"""Test handlers that leave a ledger: one SQLite row per applied attempt.

The ledger lives outside the job (path in $LEDGER_DB), so tests can check from it that every
item was applied at least once and how often items were repeated, whatever the job recorded.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time

from bulkjob import Permanent, Retryable

_conn = None


def _ledger():
    global _conn
    if _conn is None:
        conn = sqlite3.connect(os.environ["LEDGER_DB"], timeout=60, isolation_level=None)
        for _ in range(200):  # workers race to create the file; switching to WAL needs it alone
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("CREATE TABLE IF NOT EXISTS applied (item_id TEXT, attempt INT, pid INT, at REAL, "
                             "runner TEXT)")
                conn.execute("CREATE TABLE IF NOT EXISTS tried (item_id TEXT, attempt INT, pid INT, at REAL, "
                             "runner TEXT)")
                break
            except sqlite3.OperationalError:
                time.sleep(0.05)
        _conn = conn
    return _conn


def applied(path) -> dict[str, int]:
    """item id -> how many times it was applied."""
    conn = sqlite3.connect(path, timeout=60)
    try:
        rows = conn.execute("SELECT item_id, COUNT(*) FROM applied GROUP BY item_id").fetchall()
    except sqlite3.OperationalError:
        rows = []
    conn.close()
    return dict(rows)


def handle(item, ctx):
    """Payload: track (log every attempt's start in `tried`), seconds (sleep first), crash_on
    (attempts on which the worker SIGKILLs itself), kill_group (SIGKILL the whole run, with
    LEDGER_MAY_KILL_GROUP=1), unreachable_until (raise ConnectionRefusedError before that time),
    fail_until (raise Retryable before that attempt), permanent, hang, error (raise that builtin)."""
    p = item.payload
    if p.get("track"):
        _ledger().execute("INSERT INTO tried VALUES (?, ?, ?, ?, ?)",
                          (item.id, ctx.attempt, os.getpid(), time.time(), os.environ.get("LEDGER_RUNNER")))
    if ctx.attempt in p.get("crash_on", ()):
        os.kill(os.getpid(), signal.SIGKILL)
    if p.get("kill_group") and os.environ.get("LEDGER_MAY_KILL_GROUP") == "1":
        # As an OOM kill on cgroup v2 does: every process of the run at once, the parent too.
        os.killpg(os.getpgrp(), signal.SIGKILL)
    if time.time() < p.get("unreachable_until", 0):
        raise ConnectionRefusedError("the service this item needs refused the connection")
    if p.get("allocate_mb") and ctx.attempt <= p.get("allocate_attempts", 99):
        hog = bytearray(p["allocate_mb"] * 1024 * 1024)  # noqa: F841 - held until the handler returns
    if p.get("hang"):
        while True:
            time.sleep(1)
    if p.get("seconds"):
        time.sleep(p["seconds"])
    if ctx.attempt < p.get("fail_until", 0):
        raise Retryable(f"not yet (attempt {ctx.attempt})", code="T-RETRY")
    if p.get("permanent"):
        raise Permanent("bad item", code="T-PERM")
    if p.get("error"):
        raise {"TimeoutError": TimeoutError, "ConnectionError": ConnectionError,
               "KeyError": KeyError}[p["error"]]("raised by the test handler")
    _ledger().execute("INSERT INTO applied VALUES (?, ?, ?, ?, ?)",
                      (item.id, ctx.attempt, os.getpid(), time.time(), os.environ.get("LEDGER_RUNNER")))
    return {"attempt": ctx.attempt}
