"""Outages, configuration errors and the preflight against a real PostgreSQL (tests/pg.py): a
refused connection, a server stopped and started again with pg_ctl, a session ended with
pg_terminate_backend, a wrong password, a database that does not exist; what the worker's
Database says about its session; the parent's own reads of the items.
"""

from __future__ import annotations

import json

import pytest
from conftest import free_port, run_bulkjob, summary_of, write_items
from pg import PgDatabase, PgServer

from job.db import Database, DatabaseUnavailable, parse_db_url, preflight, preflight_failure
from job.db.query import DbItems, open_db_items
from job.db.worktable import DDL
from job.errors import ConfigError, Permanent, UsageError
from job.outcome import CONFIG, DATABASE, OUTAGE
from job.retry import classify

pytestmark = pytest.mark.slow
psycopg = pytest.importorskip("psycopg")


@pytest.fixture
def password(pg_db, monkeypatch):
    monkeypatch.setenv("BULKJOB_DB_PASSWORD", pg_db.server.password)
    return pg_db.server.password


def settings_of(url: str, **options):
    return parse_db_url(url, connect_timeout=3, **options)


def failure_of(settings, exc):
    from job.db import classifiers

    return classify(exc, classifiers=classifiers(settings))


def test_preflight_passes_and_applies_the_session_settings(pg_db, password):
    preflight(settings_of(pg_db.url, session_sql=("SET search_path = public",), statement_timeout=2))


@pytest.mark.parametrize("case, kind, code", [
    ("refused", OUTAGE, "08001"),
    ("wrong-password", CONFIG, "28P01"),
    ("no-password", CONFIG, "28P01"),
    ("missing-database", CONFIG, "3D000"),
    ("bad-session-sql", CONFIG, "42704"),
])
def test_preflight_failures(pg_db, monkeypatch, case, kind, code):
    url = pg_db.url
    monkeypatch.setenv("BULKJOB_DB_PASSWORD", pg_db.server.password)
    options = {}
    if case == "refused":
        url = f"postgresql://bulkjob@127.0.0.1:{free_port()}/x"
    elif case == "wrong-password":
        monkeypatch.setenv("BULKJOB_DB_PASSWORD", "not-the-password")
    elif case == "no-password":
        monkeypatch.delenv("BULKJOB_DB_PASSWORD")
    elif case == "missing-database":
        url = pg_db.server.url("no_such_database")
    else:
        options["session_sql"] = ("SET no_such_setting = 1",)
    settings = settings_of(url, **options)
    with pytest.raises((psycopg.Error, Permanent)) as e:
        preflight(settings)
    failure = preflight_failure(settings, e.value)
    assert (failure.kind, failure.code, failure.system, failure.connecting) == (kind, code, DATABASE, True)
    assert "not-the-password" not in failure.message and pg_db.server.password not in failure.message


def test_connect_failed_says_where_the_failure_happened(pg_db, monkeypatch):
    monkeypatch.setenv("BULKJOB_DB_PASSWORD", "not-the-password")
    database = Database(settings_of(pg_db.url))
    with pytest.raises(psycopg.OperationalError) as e:
        database.connection()
    assert database.connect_failed and failure_of(database.settings, e.value).kind == CONFIG
    monkeypatch.setenv("BULKJOB_DB_PASSWORD", pg_db.server.password)
    conn = database.connection()
    assert database.connect_failed is False
    with pytest.raises(psycopg.errors.UndefinedTable):
        conn.execute("SELECT * FROM no_such_table")
    assert database.connect_failed is False  # failed in mid-item, not while connecting
    database.close()


def test_killed_session_is_an_outage_and_the_next_connection_works(pg_db, password):
    database = Database(settings_of(pg_db.url))
    conn = database.connection()
    pid = conn.info.backend_pid
    assert pg_db.execute("SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]
    with pytest.raises(psycopg.OperationalError) as e:
        conn.execute("SELECT 1")
    failure = failure_of(database.settings, e.value)
    assert (failure.kind, failure.code, failure.reconnect, failure.system) == (OUTAGE, "57P01", True, DATABASE)
    with pytest.raises(psycopg.OperationalError) as again:
        conn.execute("SELECT 1")
    assert failure_of(database.settings, again.value).kind == OUTAGE  # "the connection is closed"
    database.after_failure(failure)
    fresh = database.connection()
    assert fresh.info.backend_pid != pid and fresh.execute("SELECT 1").fetchone() == (1,)
    database.close()


def test_server_stopped_then_started_again(password, tmp_path, monkeypatch):
    server = PgServer()
    try:
        db = PgDatabase(server, "stopped")
        monkeypatch.setenv("BULKJOB_DB_PASSWORD", server.password)
        settings = settings_of(db.url)
        database = Database(settings)
        conn = database.connection()
        server._pg("pg_ctl", "-D", str(server.data), "-w", "-m", "fast", "stop")
        with pytest.raises(psycopg.OperationalError) as cut:
            conn.execute("SELECT 1")
        failure = failure_of(settings, cut.value)
        assert (failure.kind, failure.reconnect) == (OUTAGE, True)  # 57P01 admin shutdown, or the socket closed
        database.after_failure(failure)
        with pytest.raises(psycopg.OperationalError) as refused:
            database.connection()
        assert database.connect_failed
        assert (failure_of(settings, refused.value).kind, failure_of(settings, refused.value).code) == (OUTAGE, "08001")
        with pytest.raises(psycopg.OperationalError) as e:
            preflight(settings)
        assert preflight_failure(settings, e.value).kind == OUTAGE
        server._pg("pg_ctl", "-D", str(server.data), "-l", str(server.dir / "server.log"), "-w", "-o",
                   f"-p {server.port} -k {server.dir} -c listen_addresses=127.0.0.1", "start")
        preflight(settings)
        assert database.connection().execute("SELECT 1").fetchone() == (1,)
        assert database.connect_failed is False
        database.close()
    finally:
        server.stop()


def test_in_transaction_on_postgres(pg_db, password):
    pg_db.execute("CREATE TABLE t (k int)")
    database = Database(settings_of(pg_db.url))
    assert database.in_transaction() is False  # no session yet
    conn = database.connection()
    conn.execute("SELECT * FROM t").fetchall()
    assert database.in_transaction() is False  # a read leaves nothing to commit (and is ended)
    conn.execute("INSERT INTO t VALUES (1)")
    assert database.in_transaction() is True
    conn.commit()
    assert database.in_transaction() is False
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("UPDATE t SET k = k / 0")
    assert database.in_transaction() is True  # a failed transaction must still be rolled back
    conn.rollback()
    assert database.in_transaction() is False
    conn.execute("INSERT INTO t VALUES (2)")
    database.discard()  # closing the session drops the uncommitted row
    assert database.in_transaction() is False
    assert pg_db.execute("SELECT k FROM t") == [(1,)]


# -- the parent's own reads ------------------------------------------------------------------------

def read_items(settings, items, **options):
    with open_db_items(settings, items, **options) as lines, lines() as it:
        return [json.loads(line) for line in it]


def test_items_read_classified_like_a_workers_failure(pg_db, password, monkeypatch):
    pg_db.execute("CREATE TABLE todo (id int, payload text); INSERT INTO todo VALUES (1, '{\"k\": 1}')")
    settings = settings_of(pg_db.url, session_sql=("SET lock_timeout = '5s'",))
    assert read_items(settings, DbItems(sql="SELECT id, payload FROM todo")) == [{"id": 1, "payload": {"k": 1}}]
    # A row lock held by another session (NOWAIT): a passing error, waited out by the caller.
    holder = pg_db.connect(autocommit=False)
    holder.execute("SELECT * FROM todo FOR UPDATE")
    with pytest.raises(DatabaseUnavailable, match="55P03"):
        read_items(settings, DbItems(sql="SELECT id, payload FROM todo FOR UPDATE NOWAIT"))
    holder.rollback()
    holder.close()
    # A permanent error of the query is a usage error, unless --retry-on names it.
    bad = DbItems(sql="SELECT id, payload FROM todo WHERE 1 / 0 = 1")
    with pytest.raises(UsageError, match="22012") as e:
        read_items(settings, bad)
    assert not isinstance(e.value, DatabaseUnavailable)
    with pytest.raises(DatabaseUnavailable, match="22012"):
        read_items(settings, bad, retry_on=("22012",))
    # The database refuses our login: a configuration error; cannot be reached: an outage.
    monkeypatch.setenv("BULKJOB_DB_PASSWORD", "not-the-password")
    with pytest.raises(ConfigError, match="28P01") as refused:
        read_items(settings, DbItems(sql="SELECT id, payload FROM todo"))
    assert "not-the-password" not in str(refused.value)
    with pytest.raises(DatabaseUnavailable, match="08001"):
        read_items(settings_of(f"postgresql://bulkjob@127.0.0.1:{free_port()}/x"), DbItems(sql="SELECT 1, NULL"))


def test_work_table_error_column_narrower_than_the_error(tmp_path, pg_db):
    pg_db.execute(DDL["postgres"].replace("error         text", "error         varchar(24)"))
    pg_db.execute("CREATE TABLE out (k text PRIMARY KEY CHECK (k <> 'bad'))")
    with pg_db.connect() as conn:
        conn.cursor().executemany("INSERT INTO bulk_work (work_id, payload) VALUES (%s, %s)",
                                  [(f"w{i}", json.dumps({"k": f"k{i}"})) for i in range(5)]
                                  + [("w-bad", json.dumps({"k": "bad"}))])
    (tmp_path / "steps.sql").write_text("-- step: one\nINSERT INTO out VALUES (:k);\n")
    proc = run_bulkjob("run", "--work-table", "bulk_work", "--handler", f"sql:{tmp_path / 'steps.sql'}",
                       "--db", pg_db.url, "--metrics-port", "0", "--max-failures", "1", env=pg_db.env)
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"], proc.returncode) == (5, 1, 0), proc.stderr[-3000:]
    # Every state was written back: the narrow column did not refuse the batch (22001).
    assert dict(pg_db.execute("SELECT state, COUNT(*) FROM bulk_work GROUP BY state")) == {"DONE": 5, "ERR": 1}
    [(error,)] = pg_db.execute("SELECT error FROM bulk_work WHERE work_id = 'w-bad'")
    assert error == "23514 CheckViolation: new"[:24] and "could not write" not in proc.stderr


def test_true_as_an_identifier_fails_invalid_and_changes_no_row(tmp_path, pg_db):
    pg_db.execute("CREATE TABLE t (k int, j int, v text); INSERT INTO t SELECT i, i, 'old' FROM generate_series(1, 5) i")
    (tmp_path / "steps.sql").write_text("-- allow col: /[a-z_]+/\n-- step: one\n"
                                        "UPDATE t SET v = 'new' WHERE {col} = :id;\n")
    write_items(tmp_path / "items.jsonl", [{"id": "true", "payload": {"col": "true", "id": 1}},
                                           {"id": "TRUE", "payload": {"col": "TRUE", "id": 1}},
                                           {"id": "schema", "payload": {"col": "pg_catalog.pg_authid", "id": 1}},
                                           {"id": "ok", "payload": {"col": "j", "id": 3}}])
    proc = run_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", f"sql:{tmp_path / 'steps.sql'}",
                       "--db", pg_db.url, "--manifest", str(tmp_path / "state"), "--run-id", "r1",
                       "--metrics-port", "0", "--max-failures", "5", env=pg_db.env)
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"]) == (1, 3), proc.stderr[-3000:]
    assert pg_db.execute("SELECT k FROM t WHERE v = 'new'") == [(3,)]  # only the item that named column j
    report = run_bulkjob("report", "--manifest", str(tmp_path / "state"), "--run-id", "r1", "--format", "jsonl")
    failed = {r["id"]: r for r in map(json.loads, report.stdout.splitlines())}
    for item in ("true", "TRUE", "schema"):
        assert failed[item]["error_kind"] == "invalid" and failed[item]["attempts"] == 1
