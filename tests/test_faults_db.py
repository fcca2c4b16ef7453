"""Fault scenario 8: the database misbehaves under a running job (real PostgreSQL).

The job runs a steps file whose every item locks a row NOWAIT and writes a ledger row in the
same transaction, so the ledger in the database shows exactly what was committed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from conftest import start_bulkjob, summary_of, write_items
from pg import PgDatabase, PgServer

pytestmark = [pytest.mark.faults, pytest.mark.slow]

STEPS = """\
-- step: lock
SELECT k FROM hot WHERE k = :k FOR UPDATE NOWAIT;
-- step: work
SELECT pg_sleep(:seconds);
INSERT INTO ledger (item_id, backend) VALUES (:item, pg_backend_pid());
"""


@pytest.fixture
def own_server():
    """A server of this test's own: these scenarios restart it and kill its sessions."""
    server = PgServer()
    yield server
    server.stop()


@pytest.fixture
def db(own_server, tmp_path):
    database = PgDatabase(own_server, "faults")
    database.execute("CREATE TABLE hot (k int PRIMARY KEY)")
    database.execute("INSERT INTO hot SELECT generate_series(0, 49)")
    database.execute("CREATE TABLE ledger (item_id text, backend int, at timestamptz DEFAULT clock_timestamp())")
    (tmp_path / "steps.sql").write_text(STEPS)
    return database


def start(tmp_path, db, n, *extra):
    items = write_items(tmp_path / "items.jsonl",
                        [{"id": f"i-{i}", "payload": {"k": i % 50, "seconds": 0.02, "item": f"i-{i}"}}
                         for i in range(n)])
    return start_bulkjob("run", "--items", str(items), "--handler", f"sql:{tmp_path / 'steps.sql'}",
                         "--db", db.url, "--manifest", str(tmp_path / "state"), "--run-id", "db",
                         "--metrics-port", "0", "--workers", "3", "--max-attempts", "15",
                         "--backoff", "0.3", "--max-backoff", "1.5", "--statement-timeout", "10", *extra,
                         env=db.env)


def ledger(db) -> Counter:
    return Counter(item_id for (item_id,) in db.execute("SELECT item_id FROM ledger"))


def finish(proc, db, n):
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    summary = summary_of(type("P", (), {"stdout": out, "stderr": err}))
    assert (summary["done"], summary["failed"]) == (n, 0)
    counts = ledger(db)
    assert len(counts) == n and set(counts.values()) == {1}  # committed exactly once each
    return summary, err


def test_8a_sessions_killed_mid_item(tmp_path, db):
    proc = start(tmp_path, db, 400)
    killed = 0
    for _ in range(8):
        time.sleep(0.5)
        rows = db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                          "AND backend_type = 'client backend'")
        killed += sum(1 for (ok,) in rows if ok)
    summary, _err = finish(proc, db, 400)
    # Killed sessions are given back (refunded); only lock contention spends attempts.
    assert killed >= 8 and summary["refunded"] >= 1
    assert summary["attempts"] == summary["done"] + summary["retries"]
    backends = {b for (b,) in db.execute("SELECT DISTINCT backend FROM ledger")}
    assert len(backends) > 3  # sessions were reopened after each kill


def test_8b_database_restarted_mid_run(tmp_path, db, own_server):
    proc = start(tmp_path, db, 400)
    time.sleep(2)
    own_server.restart()
    summary, _err = finish(proc, db, 400)
    assert summary["refunded"] >= 1
    assert summary["attempts"] == summary["done"] + summary["retries"]


def test_8c_lock_held_for_5_seconds(tmp_path, db):
    holder = db.connect(autocommit=False)
    holder.execute("SELECT k FROM hot FOR UPDATE")  # every row, until the commit below
    release = threading.Timer(5.0, holder.commit)
    release.start()
    started = time.monotonic()
    proc = start(tmp_path, db, 100, "--log-level", "DEBUG")  # each retry is logged with its code at DEBUG
    _summary, err = finish(proc, db, 100)
    release.join()
    holder.close()
    assert time.monotonic() - started >= 5
    assert "55P03" in err  # NOWAIT refused while the lock was held, then retried
