"""A PostgreSQL transaction sent with libpq's pipeline calls (job/db/postgres/pipeline.py): the
placeholder conversion as a pure function, and against the real server what it keeps per
session (prepared statements), what it must never do (hold the GIL while it waits) and what a
lost session comes to."""

from __future__ import annotations

import threading
import time

import pytest

from job.db import postgres
from job.db.postgres import pipeline as pgpipeline
from job.outcome import OUTAGE

psycopg = pytest.importorskip("psycopg")


@pytest.mark.parametrize("sql, text, names", [
    ("SELECT 1", b"SELECT 1", ()),
    ("INSERT INTO t VALUES (%(a)s, %(b)s)", b"INSERT INTO t VALUES ($1, $2)", ("a", "b")),
    ("UPDATE t SET a = %(a)s WHERE b = %(b)s OR a = %(a)s", b"UPDATE t SET a = $1 WHERE b = $2 OR a = $1", ("a", "b")),
    ("SELECT %(x)s WHERE 'a%%b' LIKE 'a%%'", b"SELECT $1 WHERE 'a%b' LIKE 'a%'", ("x",)),
])
def test_numbered_turns_named_binds_into_positions(sql, text, names):
    assert pgpipeline.numbered(sql) == (text, names)


@pytest.mark.parametrize("sql", ["SELECT %(x)s, 5 % 2", "SELECT %s", "SELECT %(x)d"])
def test_numbered_refuses_a_lone_percent_as_psycopg_does(sql):
    with pytest.raises(psycopg.ProgrammingError):
        pgpipeline.numbered(sql)


@pytest.fixture
def conn(pg_db):
    pg_db.execute("CREATE TABLE kv (k text PRIMARY KEY, v int)")
    with psycopg.connect(pg_db.server.conninfo(pg_db.name)) as c:
        yield c


def prepared_names(conn) -> list[str]:
    conn.autocommit = True
    return [r[0] for r in conn.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE 'bulkjob%'")]


UPSERT = "INSERT INTO kv VALUES (%(k)s, %(v)s) ON CONFLICT (k) DO UPDATE SET v = excluded.v"


def test_a_statement_is_prepared_when_it_comes_back_and_reused(conn):
    postgres.run_transaction(conn, [(UPSERT, {"k": "a", "v": 1})])
    assert prepared_names(conn) == []  # once: not worth a name
    for n in range(2, 6):
        assert postgres.run_transaction(conn, [(UPSERT, {"k": "a", "v": n})]) == 1
    assert prepared_names(conn) == ["bulkjob_1"]  # prepared at the second use, reused after
    assert conn.execute("SELECT v FROM kv").fetchall() == [(5,)]


def test_the_same_text_with_other_parameter_types_is_prepared_apart(conn):
    sql = "SELECT %(x)s::text"
    for value in (1, 2, "a", "b", 3):
        postgres.run_transaction(conn, [(sql, {"x": value})])
    assert sorted(prepared_names(conn)) == ["bulkjob_1", "bulkjob_2"]


def test_a_parse_skipped_after_an_error_is_not_taken_as_prepared(conn):
    """The server skips everything after a failed statement up to the Sync, a Parse too: the
    next transaction must not execute a name the server never made."""
    postgres.run_transaction(conn, [(UPSERT, {"k": "a", "v": 1})])  # first use
    with pytest.raises(psycopg.errors.DivisionByZero):
        postgres.run_transaction(conn, [("SELECT 1 / %(z)s", {"z": 0}), (UPSERT, {"k": "b", "v": 2})])
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert postgres.run_transaction(conn, [("SELECT 1", None), (UPSERT, {"k": "c", "v": 3})]) == 2
    assert postgres.run_transaction(conn, [(UPSERT, {"k": "d", "v": 4})]) == 1
    assert conn.execute("SELECT k FROM kv ORDER BY k").fetchall() == [("a",), ("c",), ("d",)]


def test_a_session_keeps_at_most_prepared_max_statements(conn, monkeypatch):
    monkeypatch.setattr(pgpipeline, "PREPARED_MAX", 5)
    for n in range(12):
        for _ in range(2):
            postgres.run_transaction(conn, [(f"SELECT %(x)s::int + {n}", {"x": n})])
    assert len(prepared_names(conn)) == 5


def test_waiting_for_the_server_leaves_other_threads_running(conn):
    """libpq's blocking calls would hold the GIL for the whole round trip."""
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.01)

    thread = threading.Thread(target=tick)
    started = time.monotonic()
    thread.start()
    try:
        postgres.run_transaction(conn, [("SELECT pg_sleep(%(s)s)", {"s": 0.5})])
    finally:
        stop.set()
        thread.join()
    during = [t for t in ticks if started + 0.1 < t < started + 0.45]
    assert len(during) >= 10, len(during)


def test_a_session_ended_by_the_server_mid_transaction_is_an_outage_and_closed(conn, pg_db):
    pid = conn.info.backend_pid
    killer = threading.Timer(0.3, lambda: pg_db.execute("SELECT pg_terminate_backend(%s)", (pid,)))
    killer.start()
    try:
        with pytest.raises(psycopg.OperationalError) as raised:
            postgres.run_transaction(conn, [("SELECT pg_sleep(5)", None), (UPSERT, {"k": "a", "v": 1})])
    finally:
        killer.cancel()
    failure = postgres.classify(raised.value)
    assert failure is not None and failure.kind == OUTAGE, failure
    assert not postgres.usable(conn)
    assert pg_db.execute("SELECT count(*) FROM kv") == [(0,)]


def test_a_session_with_a_transaction_open_is_refused_not_joined(conn, pg_db):
    """BEGIN inside an open transaction only warns, and a lone statement would join it
    uncommitted: the item must fail instead of being recorded done."""
    conn.execute("SELECT 1")  # psycopg opens a transaction (the session is not in autocommit)
    with pytest.raises(psycopg.ProgrammingError):
        postgres.run_transaction(conn, [(UPSERT, {"k": "a", "v": 1})])
    conn.rollback()
    assert postgres.run_transaction(conn, [(UPSERT, {"k": "a", "v": 1})]) == 1
    assert pg_db.execute("SELECT k, v FROM kv") == [("a", 1)]
