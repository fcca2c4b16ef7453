"""Outages are pauses, not failures: a real PostgreSQL stopped and started under a running job,
a store that cannot be reached at start, a service a handler needs that refuses connections,
configuration errors found by the preflight, and an item that kills its whole run.

The steps file commits one ledger row per item in the database itself, so the ledger shows
exactly what was committed: every item once, whatever the outage did.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import bulkjob_cmd, bulkjob_env, free_port, run_bulkjob, start_bulkjob, status_of, summary_of, write_items
from ledger import applied
from pg import PgDatabase, PgServer

pytestmark = [pytest.mark.faults, pytest.mark.slow]

STEPS = """\
-- step: work
SELECT pg_sleep(:seconds);
INSERT INTO ledger (item_id, backend) VALUES (:item, pg_backend_pid());
"""


@pytest.fixture
def own_server():
    """A server of this test's own: these scenarios stop it."""
    server = PgServer()
    yield server
    server.stop()


@pytest.fixture
def db(own_server, tmp_path):
    database = PgDatabase(own_server, "outage")
    database.execute("CREATE TABLE ledger (item_id text, backend int, at timestamptz DEFAULT clock_timestamp())")
    (tmp_path / "steps.sql").write_text(STEPS)
    return database


def args(tmp_path, db, n, *extra, seconds=0.01):
    items = tmp_path / "items.jsonl"
    if not items.exists():
        write_items(items, [{"id": f"i-{i}", "payload": {"seconds": seconds, "item": f"i-{i}"}} for i in range(n)])
    return ("run", "--items", str(items), "--handler", f"sql:{tmp_path / 'steps.sql'}", "--db", db.url,
            "--manifest", str(tmp_path / "state"), "--run-id", "outage", "--metrics-port", "0",
            "--workers", "4", "--progress-interval", "1", *extra)


def ledger(db) -> Counter:
    return Counter(item_id for (item_id,) in db.execute("SELECT item_id FROM ledger"))


def wait_for_rows(db, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(ledger(db).values()) < n:
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.1)


def completed(proc, timeout: float = 300):
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ride_out(tmp_path, db, server, n: int, down: float) -> tuple[dict, str]:
    proc = start_bulkjob(*args(tmp_path, db, n), env=db.env)
    wait_for_rows(db, n // 10)
    server.shutdown()
    time.sleep(down)
    server.start()
    done = completed(proc, timeout=down + 240)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = ledger(db)
    assert len(counts) == n and set(counts.values()) == {1}  # every item committed exactly once
    summary = summary_of(done)
    assert (summary["done"], summary["failed"], summary["retries"]) == (n, 0, 0)
    assert summary["attempts"] == n  # no attempt was spent on the outage
    assert summary["refunded"] >= 1
    [outage] = summary["outages"]
    assert outage["system"] == "database" and not outage["ongoing"]
    assert down * 0.7 <= outage["seconds"] <= down + 35
    assert "pausing: database unavailable" in done.stderr and "resuming: database is back" in done.stderr
    assert "paused: database unavailable since" in done.stderr  # the progress line says so
    return summary, done.stderr


def test_a_10_second_database_outage_fails_no_item(tmp_path, db, own_server):
    ride_out(tmp_path, db, own_server, 3000, 10.0)


def test_a_90_second_database_outage_fails_no_item(tmp_path, db, own_server):
    summary, _ = ride_out(tmp_path, db, own_server, 1500, 90.0)
    assert summary["outages"][0]["probes"] >= 5


def test_an_outage_past_the_timeout_exits_5_and_the_rerun_finishes(tmp_path, db, own_server):
    n = 1500
    proc = start_bulkjob(*args(tmp_path, db, n, "--outage-timeout", "5"), env=db.env)
    wait_for_rows(db, 100)
    own_server.shutdown()
    started = time.monotonic()
    stopped = completed(proc, timeout=120)
    assert stopped.returncode == 5, stopped.stderr[-3000:]
    assert time.monotonic() - started < 60
    summary = summary_of(stopped)
    assert (summary["status"], summary["exit_code"], summary["failed"]) == ("unavailable", 5, 0)
    assert "--outage-timeout" in summary["error"]
    status = status_of(str(tmp_path / "state"), "outage")
    assert status["done"] == summary["done"] > 0 and status["failed"] == 0  # progress saved
    own_server.start()
    again = run_bulkjob(*args(tmp_path, db, n), env=db.env, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    counts = ledger(db)
    assert len(counts) == n and set(counts.values()) == {1}


def test_a_session_killed_mid_item_is_retried_without_spending_an_attempt(tmp_path, db):
    n = 600
    proc = start_bulkjob(*args(tmp_path, db, n, seconds=0.05), env=db.env)
    wait_for_rows(db, 50)
    killed = 0
    for _ in range(6):
        rows = db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                          "AND backend_type = 'client backend' AND state = 'active'")
        killed += sum(1 for (ok,) in rows if ok)
        time.sleep(0.4)
    done = completed(proc)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = summary_of(done)
    assert killed >= 3
    assert (summary["done"], summary["failed"], summary["attempts"]) == (n, 0, n)
    assert summary["refunded"] >= 1
    counts = ledger(db)
    assert len(counts) == n and set(counts.values()) == {1}


def test_a_lock_held_for_30_seconds_is_ridden_out_with_the_default_options(tmp_path, db):
    db.execute("CREATE TABLE hot (k int PRIMARY KEY)")
    db.execute("INSERT INTO hot SELECT generate_series(0, 9)")
    (tmp_path / "steps.sql").write_text("-- step: lock\nSELECT k FROM hot WHERE k = :k FOR UPDATE NOWAIT;\n"
                                        "-- step: work\nINSERT INTO ledger (item_id) VALUES (:item);\n")
    write_items(tmp_path / "items.jsonl", [{"id": f"i-{i}", "payload": {"k": i % 10, "item": f"i-{i}"}}
                                           for i in range(40)])
    holder = db.connect(autocommit=False)
    holder.execute("SELECT k FROM hot FOR UPDATE")
    try:
        proc = start_bulkjob(*args(tmp_path, db, 40), env=db.env)
        time.sleep(30)
        holder.commit()
    finally:
        holder.close()
    done = completed(proc)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = summary_of(done)
    assert (summary["done"], summary["failed"]) == (40, 0) and summary["retries"] >= 40
    assert "55P03" in done.stderr or summary["retries"] >= 40
    counts = ledger(db)
    assert len(counts) == 40 and set(counts.values()) == {1}


@pytest.mark.parametrize("what", ["wrong password", "missing database", "missing sqlite file"])
def test_a_configuration_error_exits_2_within_seconds_and_charges_no_item(tmp_path, pg_server, what):
    if what == "missing sqlite file":
        url, env = f"sqlite:///{tmp_path / 'no-such.db'}", {}
    else:
        name = pg_server.create_database("cfg") if what == "wrong password" else "no_such_database"
        url = pg_server.url(name)
        env = {"BULKJOB_DB_PASSWORD": "not-the-password" if what == "wrong password" else pg_server.password}
    write_items(tmp_path / "items.jsonl", [{"id": i} for i in range(100)])
    (tmp_path / "steps.sql").write_text("-- step: one\nSELECT 1;\n")
    started = time.monotonic()
    proc = run_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", f"sql:{tmp_path / 'steps.sql'}",
                       "--db", url, "--manifest", str(tmp_path / "state"), "--run-id", "cfg",
                       "--metrics-port", "0", env=env)
    assert time.monotonic() - started < 5
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bulkjob: error:")]
    assert len(lines) == 1 and "--db" in lines[0]
    assert "Traceback" not in proc.stderr and "not-the-password" not in proc.stderr
    summary = summary_of(proc)
    assert (summary["status"], summary["exit_code"]) == ("error", 2) and summary["error"]
    assert not (tmp_path / "state").exists()  # the manifest untouched


def test_an_unreachable_manifest_store_at_start_is_an_outage(tmp_path):
    write_items(tmp_path / "items.jsonl", [{"id": i} for i in range(10)])
    port = free_port()  # nothing listens there
    started = time.monotonic()
    proc = run_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "job.examples:noop",
                       "--manifest", "s3://bucket/state", "--s3-endpoint-url", f"http://127.0.0.1:{port}",
                       "--run-id", "s3", "--metrics-port", "0", "--outage-timeout", "4",
                       env={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "secret-key-1"}, timeout=120)
    assert proc.returncode == 5, proc.stderr
    assert 4 <= time.monotonic() - started < 60
    assert "waiting up to 4 s" in proc.stderr and "Traceback" not in proc.stderr
    assert summary_of(proc)["exit_code"] == 5


def test_a_service_refusing_connections_for_8_seconds_fails_no_item(tmp_path):
    n = 3000
    until = time.time() + 8
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"unreachable_until": until if i >= 100 else 0}}
                                           for i in range(n)])
    proc = run_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "ledger:handle",
                       "--manifest", str(tmp_path / "state"), "--run-id", "svc", "--metrics-port", "0",
                       "--workers", "4", env={"LEDGER_DB": str(tmp_path / "ledger.db")}, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"], summary["attempts"]) == (n, 0, n)
    # One pause, or a few: items that do not need the service succeed meanwhile and resume dispatch.
    outages = summary["outages"]
    assert outages and all(o["system"] is None for o in outages)
    assert sum(o["seconds"] for o in outages) >= 4
    assert set(applied(tmp_path / "ledger.db").values()) == {1}


def test_an_item_that_kills_its_whole_run_fails_as_crashed_across_restarts(tmp_path):
    items = [{"id": f"i-{i}", "payload": {"seconds": 0.01}} for i in range(300)]
    items.insert(150, {"id": "poison", "payload": {"kill_group": True}})
    write_items(tmp_path / "items.jsonl", items)
    env = bulkjob_env({"LEDGER_DB": str(tmp_path / "ledger.db"), "LEDGER_MAY_KILL_GROUP": "1"})
    cmd = bulkjob_cmd("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "ledger:handle",
                      "--manifest", str(tmp_path / "state"), "--run-id", "poison", "--metrics-port", "0",
                      "--workers", "3", "--max-attempts", "3", "--lease-ttl", "2", "--checkpoint-interval", "0.2")
    codes = []
    for _ in range(8):
        # A session of its own: the poison item kills its process group, never the test's.
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).parent.parent, start_new_session=True)
        codes.append(proc.returncode)
        if proc.returncode >= 0:
            break
        time.sleep(2.5)  # the dead run's lease expires
    assert codes[-1] == 1, (codes, proc.stderr[-3000:])
    assert all(code == -signal.SIGKILL for code in codes[:-1]) and len(codes) <= 3 + 2
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"]) == (300, 1)
    report = run_bulkjob("report", "--manifest", str(tmp_path / "state"), "--run-id", "poison")
    [row] = [json.loads(line) for line in report.stdout.splitlines()]
    assert (row["id"], row["error_kind"], row["attempts"]) == ("poison", "crashed", 3)
    assert set(applied(tmp_path / "ledger.db")) == {f"i-{i}" for i in range(300)}


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_a_handler_that_returns_with_uncommitted_changes_fails_the_item(tmp_path, pg_server, dialect):
    if dialect == "sqlite":
        path = tmp_path / "db.sqlite"
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE t (id TEXT)")
        url, env, sql = f"sqlite:///{path}", {}, "INSERT INTO t VALUES (?)"

        def rows():
            with sqlite3.connect(path) as conn:
                return conn.execute("SELECT COUNT(*) FROM t").fetchone()[0]
    else:
        database = PgDatabase(pg_server, "uncommitted")
        database.execute("CREATE TABLE t (id text)")
        url, env, sql = database.url, database.env, "INSERT INTO t VALUES (%s)"

        def rows():
            return database.execute("SELECT COUNT(*) FROM t")[0][0]
    write_items(tmp_path / "items.jsonl", [{"id": f"r{i}", "payload": {"sql": sql}} for i in range(3)])
    proc = run_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "db_handlers:insert_no_commit",
                       "--db", url, "--manifest", str(tmp_path / "state"), "--run-id", "u", "--metrics-port", "0",
                       "--workers", "1", env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"]) == (0, 3)
    assert "returned with uncommitted changes; commit or roll back in the handler" in proc.stderr
    assert rows() == 0  # nothing was committed behind the handler's back
