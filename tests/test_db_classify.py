"""Database settings and error classification, over the drivers' real exception objects.

Oracle's are built as python-oracledb builds them (its private `_Error`, so these tests are
pinned to the major version they were checked with), and come from real connects to a closed
port, to a socket that accepts and closes, and to a socket that never answers.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import threading
import time

import pytest

from job.db import ConnectTimeout, DbSettings, call_with_timeout, classifiers, db_settings, parse_db_url, read_password
from job.errors import UsageError
from job.outcome import CONFIG, DATABASE, OUTAGE, PERMANENT, RETRYABLE
from job.retry import classify

oracledb = pytest.importorskip("oracledb")
from job.db import oracle  # noqa: E402  (needs oracledb)

#: The python-oracledb major version whose private error constructor these tests use.
ORACLEDB_MAJOR = "26"
private_api = pytest.mark.skipif(not oracledb.__version__.startswith(ORACLEDB_MAJOR + "."),
                                 reason=f"built with oracledb {ORACLEDB_MAJOR}.x's private _Error")

ORACLE = parse_db_url("oracle://scott@db.example:1521/ORCLPDB1")


def ora(number: int, text: str):
    """A real oracledb exception as the driver raises it for `ORA-<number>: text`."""
    error = oracledb._Error(f"ORA-{number:05d}: {text}", code=number)
    return error.exc_type(error)


def dpy(number: int, text: str):
    """A real oracledb exception for a driver error `DPY-<number>: text`."""
    error = oracledb._Error(f"DPY-{number}: {text}")
    return error.exc_type(error)


def oracle_failure(exc, retry_on=()):
    return classify(exc, retry_on=retry_on, classifiers=classifiers(ORACLE))


@private_api
@pytest.mark.parametrize("number, text, kind, reconnect, code", [
    (54, "resource busy and acquire with NOWAIT specified or timeout expired", RETRYABLE, False, "ORA-00054"),
    (60, "deadlock detected while waiting for resource", RETRYABLE, False, "ORA-00060"),
    (8177, "can't serialize access for this transaction", RETRYABLE, False, "ORA-08177"),
    (30006, "resource busy; acquire with WAIT timeout expired", RETRYABLE, False, "ORA-30006"),
    (12170, "TNS:Connect timeout occurred", RETRYABLE, True, "ORA-12170"),
    (12514, "TNS:listener does not currently know of service", RETRYABLE, True, "ORA-12514"),
    (12541, "TNS:no listener", RETRYABLE, True, "ORA-12541"),
    # Thin mode turns dead-session errors into DPY-4011 and keeps the ORA number in .code.
    (3113, "end-of-file on communication channel", RETRYABLE, True, "DPY-4011/ORA-03113"),
    (3135, "connection lost contact", RETRYABLE, True, "DPY-4011/ORA-03135"),
    (28, "your session has been killed", RETRYABLE, True, "DPY-4011/ORA-00028"),
    (942, "table or view does not exist", PERMANENT, False, "ORA-00942"),
    (1, "unique constraint (APP.PK) violated", PERMANENT, False, "ORA-00001"),
    (904, '"X": invalid identifier', PERMANENT, False, "ORA-00904"),
    (1722, "invalid number", PERMANENT, False, "ORA-01722"),
    # isrecoverable is about the transaction, not about trying again: this stays permanent.
    (376, "file 5 cannot be read at this time", PERMANENT, False, "ORA-00376"),
])
def test_oracle_codes(number, text, kind, reconnect, code):
    failure = oracle_failure(ora(number, text))
    assert (failure.kind, failure.reconnect, failure.code) == (kind, reconnect, code)


@private_api
@pytest.mark.parametrize("number, text", [
    (1001, "not connected to database"),
    (4005, "timed out waiting for the connection pool to return a connection"),
    (4011, "the database or network closed the connection"),
    (4024, "call timeout of 1500 ms exceeded"),
    (6000, "Listener refused connection. (Similar to ORA-12506)"),
    (6001, "Service \"X\" is not registered with the listener at host \"db\" port 1521."),
    (6005, "cannot connect to database (CONNECTION_ID=abc)."),
])
def test_oracle_driver_connection_errors_reconnect(number, text):
    failure = oracle_failure(dpy(number, text))
    assert failure.kind == RETRYABLE and failure.reconnect and failure.code == f"DPY-{number}"


@private_api
def test_retry_on_extends_the_retryable_codes():
    snapshot_too_old = ora(1555, "snapshot too old: rollback segment number 9 too small")
    assert oracle_failure(snapshot_too_old).kind == PERMANENT
    failure = oracle_failure(snapshot_too_old, retry_on=("ORA-01555",))
    assert failure.kind == RETRYABLE and failure.code == "ORA-01555"
    assert oracle_failure(ora(942, "table or view does not exist"), retry_on=("ORA-01555",)).kind == PERMANENT


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Listener:
    """A TCP socket on loopback that accepts and then closes at once, or never answers."""

    def __init__(self, *, answer_close: bool) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.close_at_once = answer_close
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.close_at_once:
                conn.close()
            else:
                self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def oracle_at(port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> DbSettings:
    return parse_db_url(f"oracle://scott@{host}:{port}/FREEPDB1", connect_timeout=timeout)


def test_real_connect_to_closed_port_is_dpy_6005():
    with pytest.raises(oracledb.OperationalError) as e:
        oracle.connect(oracle_at(closed_port()), "tiger")
    failure = oracle_failure(e.value)
    assert failure.code == "DPY-6005" and failure.kind == RETRYABLE and failure.reconnect


def test_real_connect_to_socket_that_closes_is_dpy_6005_from_4011():
    listener = Listener(answer_close=True)
    try:
        with pytest.raises(oracledb.OperationalError) as e:
            oracle.connect(oracle_at(listener.port), "tiger")
    finally:
        listener.close()
    assert e.value.args[0].full_code == "DPY-6005"
    assert e.value.__cause__ is not None and e.value.__cause__.args[0].full_code == "DPY-4011"
    failure = oracle_failure(e.value)
    assert failure.kind == RETRYABLE and failure.reconnect


@pytest.mark.parametrize("in_thread", [False, True], ids=["main-thread", "other-thread"])
def test_connect_to_silent_listener_times_out(in_thread):
    listener = Listener(answer_close=False)
    box = {}
    alarm_before = signal.getitimer(signal.ITIMER_REAL)[0]

    def attempt():
        started = time.monotonic()
        try:
            oracle.connect(oracle_at(listener.port, timeout=1.0), "tiger")
        except BaseException as e:
            box["error"] = e
        box["seconds"] = time.monotonic() - started

    try:
        if in_thread:
            thread = threading.Thread(target=attempt)
            thread.start()
            thread.join(30)
        else:
            attempt()
    finally:
        listener.close()
    assert isinstance(box.get("error"), ConnectTimeout), box
    assert box["seconds"] < 5
    failure = oracle_failure(box["error"])
    assert (failure.kind, failure.code, failure.reconnect, failure.connecting) == (OUTAGE, "CONNECT-TIMEOUT", True, True)
    # An alarm set before (pytest-timeout's) is put back, not lost.
    alarm_after = signal.getitimer(signal.ITIMER_REAL)[0]
    assert (alarm_after > 0) == (alarm_before > 0) and alarm_after <= alarm_before


def test_unresolvable_host_is_gaierror_and_retryable():
    with pytest.raises(socket.gaierror) as e:
        oracle.connect(oracle_at(1521, host="db.nonexistent.invalid"), "tiger")
    failure = oracle_failure(e.value)
    assert failure.kind == RETRYABLE and failure.reconnect and failure.code.startswith("EAI_")


def test_call_with_timeout_returns_and_raises():
    assert call_with_timeout(lambda: 42, 1.0, "x") == 42
    with pytest.raises(KeyError):
        call_with_timeout(lambda: {}["k"], 1.0, "x")
    with pytest.raises(ConnectTimeout, match=r"no answer within 0\.2s"):
        call_with_timeout(lambda: time.sleep(5), 0.2, "sleeping")


# -- PostgreSQL and SQLite ---------------------------------------------------------------------

def pg_failure(exc):
    return classify(exc, classifiers=classifiers(parse_db_url("postgresql://app@localhost/app")))


@pytest.mark.parametrize("state, message, kind, reconnect", [
    ("40001", "could not serialize access due to concurrent update", RETRYABLE, False),
    ("40P01", "deadlock detected", RETRYABLE, False),
    ("55P03", 'could not obtain lock on relation "t"', RETRYABLE, False),
    ("57014", "canceling statement due to statement timeout", RETRYABLE, False),
    ("57014", "canceling statement due to user request", PERMANENT, False),
    ("57P01", "terminating connection due to administrator command", OUTAGE, True),
    ("08006", "connection failure", OUTAGE, True),
    ("28P01", 'password authentication failed for user "app"', CONFIG, False),
    ("3D000", 'database "nope" does not exist', CONFIG, False),
    ("23505", 'duplicate key value violates unique constraint "t_pkey"', PERMANENT, False),
    ("42P01", 'relation "nope" does not exist', PERMANENT, False),
])
def test_postgres_sqlstates(state, message, kind, reconnect):
    psycopg = pytest.importorskip("psycopg")
    failure = pg_failure(psycopg.errors.lookup(state)(message))
    assert (failure.kind, failure.reconnect, failure.code) == (kind, reconnect, state)


def test_postgres_connection_errors_without_sqlstate():
    psycopg = pytest.importorskip("psycopg")
    closed = pg_failure(psycopg.OperationalError("the connection is closed"))
    assert closed.kind == OUTAGE and closed.reconnect and closed.system == DATABASE
    login = pg_failure(psycopg.OperationalError('FATAL:  password authentication failed for user "app"'))
    assert login.kind == CONFIG
    missing = pg_failure(psycopg.OperationalError('connection failed: FATAL:  database "x" does not exist'))
    assert missing.kind == CONFIG


def test_sqlite_locked_is_retryable_and_constraint_permanent(tmp_path):
    path = tmp_path / "x.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    holder.execute("INSERT INTO t VALUES (1)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0)
    settings = parse_db_url(f"sqlite:///{path}")
    with pytest.raises(sqlite3.OperationalError) as locked:
        other.execute("INSERT INTO t VALUES (2)")
    holder.execute("COMMIT")
    with pytest.raises(sqlite3.IntegrityError) as duplicate:
        other.execute("INSERT INTO t VALUES (1)")
    busy = classify(locked.value, classifiers=classifiers(settings))
    assert busy.kind == RETRYABLE and busy.code == "SQLITE_BUSY" and not busy.reconnect
    integrity = classify(duplicate.value, classifiers=classifiers(settings))
    assert integrity.kind == PERMANENT and integrity.code == "SQLITE_CONSTRAINT_PRIMARYKEY"


# -- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("oracle://scott@db:1522/ORCLPDB1", ("oracle", "scott", "db", 1522, "ORCLPDB1")),
    ("oracle://scott@db/FREEPDB1", ("oracle", "scott", "db", 1521, "FREEPDB1")),
    ("postgresql://app@pg.example/sales", ("postgres", "app", "pg.example", 5432, "sales")),
    ("postgres://a%40b@[::1]:6543/x", ("postgres", "a@b", "::1", 6543, "x")),
    ("sqlite:///rel/demo.db", ("sqlite", None, None, None, "rel/demo.db")),
    ("sqlite:////abs/demo.db", ("sqlite", None, None, None, "/abs/demo.db")),
])
def test_db_urls(url, expected):
    s = parse_db_url(url)
    assert (s.dialect, s.user, s.host, s.port, s.database) == expected


@pytest.mark.parametrize("url, message", [
    ("oracle://scott:tiger@db/ORCL", "never in the URL"),
    ("mysql://a@b/c", "expected oracle://"),
    ("oracle://scott@db", "no service name"),
    ("postgresql://app@/", "no host"),
    ("sqlite://", "expected sqlite:///PATH"),
    ("sqlite:///:memory:", "expected sqlite:///PATH"),
])
def test_bad_db_urls(url, message):
    with pytest.raises(UsageError, match=message) as e:
        parse_db_url(url)
    assert "tiger" not in str(e.value)


def test_oracle_dsn_and_call_timeout():
    s = parse_db_url("oracle://scott@db.example:1522/ORCLPDB1?transport_connect_timeout=3",
                     statement_timeout=2.5)
    assert oracle.dsn(s) == "db.example:1522/ORCLPDB1?transport_connect_timeout=3"
    assert oracle.call_timeout_ms(s) == 2500
    assert oracle.call_timeout_ms(ORACLE) == 0
    assert oracle.dsn(parse_db_url("oracle://u@[::1]/S")) == "[::1]:1521/S"


def test_postgres_session_statements_and_conninfo():
    postgres = pytest.importorskip("job.db.postgres")
    s = parse_db_url("postgresql://app@pg:5433/sales?sslmode=require", statement_timeout=1.5,
                     session_sql=("SET search_path = app",), connect_timeout=0.5)
    assert postgres.session_statements(s) == ["SET statement_timeout = 1500", "SET search_path = app"]
    info = postgres.conninfo(s, "s3cret")
    for part in ("host=pg", "port=5433", "dbname=sales", "user=app", "password=s3cret", "connect_timeout=2",
                 "sslmode=require"):
        assert part in info


def test_password_from_env_then_file(tmp_path):
    pwfile = tmp_path / "pw"
    pwfile.write_text("from-file\n")
    s = db_settings("postgresql://app@pg/db", password_file=str(pwfile))
    assert read_password(s, {"BULKJOB_DB_PASSWORD": "from-env"}) == "from-env"
    assert read_password(s, {}) == "from-file"
    assert read_password(parse_db_url("postgresql://app@pg/db"), {}) is None


def test_db_settings_checks_options(tmp_path):
    assert db_settings(None) is None
    with pytest.raises(UsageError, match="need --db"):
        db_settings(None, session_sql=("SET x = 1",))
    with pytest.raises(UsageError, match="no such file"):
        db_settings("postgresql://app@pg/db", password_file=str(tmp_path / "missing"))
    s = db_settings("oracle://u@h/S", session_sql=["ALTER SESSION SET NLS_DATE_FORMAT = 'YYYY-MM-DD'"],
                    commit="step")
    assert s.session_sql == ("ALTER SESSION SET NLS_DATE_FORMAT = 'YYYY-MM-DD'",) and s.commit == "step"
    assert s.connect_timeout == 10.0


@pytest.mark.parametrize("sql, copy", [
    ("INSERT INTO t (a, b) VALUES (%s, %s)", "COPY t (a, b) FROM STDIN"),
    ("insert into s.t(a,b,c) values (%s,%s,%s);", "COPY s.t (a, b, c) FROM STDIN"),
    ("INSERT INTO t (a) VALUES (%s) ON CONFLICT DO NOTHING", None),
    ("INSERT INTO t (a, b) VALUES (%s, now())", None),
    ("INSERT INTO t (a, b) VALUES (%(a)s, %(b)s)", None),
    ("INSERT INTO t (a, b) VALUES (%s)", None),
    ("INSERT INTO t (a) VALUES (%s) RETURNING id", None),
    ("UPDATE t SET a = %s", None),
])
def test_plain_inserts_go_through_copy(sql, copy):
    from job.db.postgres import copy_target

    assert copy_target(sql) == copy
