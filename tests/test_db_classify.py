"""Database settings and error classification, over the drivers' real exception objects.

Oracle's are built as python-oracledb builds them (its private `_Error` and `_create_exception`,
so these tests are pinned to the major version they were checked with); test_oracle_connect.py
gets more from real thin-mode connects. PostgreSQL's are psycopg's own classes with the texts a
real server gives (test_db_preflight.py gets them from one).
"""

from __future__ import annotations

import importlib
import sqlite3
import time

import pytest

from job.db import (
    ConnectTimeout,
    call_with_timeout,
    classifiers,
    db_settings,
    parse_db_url,
    plain_sql,
    read_password,
)
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
@pytest.mark.parametrize("number, text, kind, code", [
    # Lock contention and passing conflicts belong to the item: retried after a rollback.
    (54, "resource busy and acquire with NOWAIT specified or timeout expired", RETRYABLE, "ORA-00054"),
    (60, "deadlock detected while waiting for resource", RETRYABLE, "ORA-00060"),
    (8177, "can't serialize access for this transaction", RETRYABLE, "ORA-08177"),
    (30006, "resource busy; acquire with WAIT timeout expired", RETRYABLE, "ORA-30006"),
    (2049, "timeout: distributed transaction waiting for lock", RETRYABLE, "ORA-02049"),
    (4020, "deadlock detected while trying to lock object", RETRYABLE, "ORA-04020"),
    (4068, "existing state of packages has been discarded", RETRYABLE, "ORA-04068"),
    (4061, 'existing state of package body "APP.P" has been invalidated', RETRYABLE, "ORA-04061"),
    (63302, "Transaction must roll back", RETRYABLE, "ORA-63302"),
    (1555, "snapshot too old: rollback segment number 9 too small", RETRYABLE, "ORA-01555"),
    # The database cannot be reached, or ended the session: an outage.
    (12170, "TNS:Connect timeout occurred", OUTAGE, "ORA-12170"),
    (12514, "TNS:listener does not currently know of service", OUTAGE, "ORA-12514"),
    (12541, "TNS:no listener", OUTAGE, "ORA-12541"),
    (18, "maximum number of sessions exceeded", OUTAGE, "ORA-00018"),
    (20, "maximum number of processes (300) exceeded", OUTAGE, "ORA-00020"),
    (1090, "shutdown in progress - connection is not permitted", OUTAGE, "ORA-01090"),
    (1033, "ORACLE initialization or shutdown in progress", OUTAGE, "ORA-01033"),
    # Thin mode turns dead-session errors into DPY-4011 and keeps the ORA number in .code.
    (3113, "end-of-file on communication channel", OUTAGE, "DPY-4011/ORA-03113"),
    (3114, "not connected to ORACLE", OUTAGE, "DPY-4011/ORA-03114"),
    (3135, "connection lost contact", OUTAGE, "DPY-4011/ORA-03135"),
    (12537, "TNS:connection closed", OUTAGE, "DPY-4011/ORA-12537"),
    (28, "your session has been killed", OUTAGE, "DPY-4011/ORA-00028"),
    (1012, "not logged on", OUTAGE, "DPY-4011/ORA-01012"),
    # The database refuses our settings: one attempt, then the run stops (exit 2).
    (1017, "invalid credential or not authorized; logon denied", CONFIG, "ORA-01017"),
    (28000, "The account is locked.", CONFIG, "ORA-28000"),
    (28001, "the password has expired", CONFIG, "ORA-28001"),
    (1045, "Login denied. User APP does not have CREATE SESSION privilege.", CONFIG, "ORA-01045"),
    # The item's own fault.
    (942, "table or view does not exist", PERMANENT, "ORA-00942"),
    (1, "unique constraint (APP.PK) violated", PERMANENT, "ORA-00001"),
    (904, '"X": invalid identifier', PERMANENT, "ORA-00904"),
    (1722, "invalid number", PERMANENT, "ORA-01722"),
    (1745, "invalid host/bind variable name", PERMANENT, "ORA-01745"),
    # isrecoverable is about the transaction, not about trying again: this stays permanent.
    (376, "file 5 cannot be read at this time", PERMANENT, "ORA-00376"),
])
def test_oracle_codes(number, text, kind, code):
    failure = oracle_failure(ora(number, text))
    assert (failure.kind, failure.code) == (kind, code)
    environment = kind in (OUTAGE, CONFIG)
    assert failure.reconnect is environment and failure.system == (DATABASE if environment else None)


@private_api
@pytest.mark.parametrize("number, text, kind, reconnect", [
    (1001, "not connected to database", RETRYABLE, True),
    (4005, "timed out waiting for the connection pool to return a connection", RETRYABLE, True),
    (4024, "call timeout of 1500 ms exceeded", RETRYABLE, True),
    (4011, "the database or network closed the connection", OUTAGE, True),
    (4033, "the database closed the connection because the connection's idle time has been exceeded",
     OUTAGE, True),
    (6000, "Listener refused connection. (Similar to ORA-12506)", OUTAGE, True),
    (6001, "Service \"X\" is not registered with the listener at host \"db\" port 1521.", OUTAGE, True),
    (6005, "cannot connect to database (CONNECTION_ID=abc).", OUTAGE, True),
    (4001, "no credentials specified", CONFIG, True),
    (2018, "wallet file /w/ewallet.pem was not found", CONFIG, True),
    (6002, "The distinguished name (DN) on the server certificate does not match", CONFIG, True),
    (2040, 'parameters "batcherrors" and "arraydmlrowcounts" may only be true when used with insert, '
           "update, delete and merge statements", PERMANENT, False),
    (4010, 'no bind value for "1"', PERMANENT, False),
])
def test_oracle_driver_errors(number, text, kind, reconnect):
    failure = oracle_failure(dpy(number, text))
    assert (failure.kind, failure.reconnect, failure.code) == (kind, reconnect, f"DPY-{number}")


@private_api
def test_native_network_encryption_under_dpy_6005_is_a_configuration_error():
    # Built as thin mode builds it: DPY-3001 raised while connecting, wrapped in DPY-6005.
    errors = importlib.import_module("oracledb.errors")
    nne = errors._create_exception(errors.ERR_FEATURE_NOT_SUPPORTED,
                                   feature="Native Network Encryption and Data Integrity", driver_type="thick")
    wrapped = errors._create_exception(errors.ERR_CONNECTION_FAILED, cause=nne, connection_id="x")
    assert wrapped.args[0].full_code == "DPY-6005" and "DPY-3001" in str(wrapped)
    failure = oracle_failure(wrapped)
    assert (failure.kind, failure.code, failure.system) == (CONFIG, "DPY-6005", DATABASE)
    # The same wrapper around a closed connection is an outage.
    closed = errors._create_exception(errors.ERR_CONNECTION_FAILED, cause=dpy(4011, "closed"), connection_id="x")
    assert oracle_failure(closed).kind == OUTAGE


@private_api
def test_retry_on_extends_the_retryable_codes():
    temp_full = ora(1652, "unable to extend temp segment by 128 in tablespace TEMP")
    assert oracle_failure(temp_full).kind == PERMANENT
    failure = oracle_failure(temp_full, retry_on=("ORA-01652",))
    assert failure.kind == RETRYABLE and failure.code == "ORA-01652"
    assert oracle_failure(ora(942, "table or view does not exist"), retry_on=("ORA-01652",)).kind == PERMANENT
    # --retry-on never turns a configuration error into something retried per item.
    assert oracle_failure(ora(1017, "logon denied"), retry_on=("ORA-01017",)).kind == CONFIG


def test_connect_timeout_is_an_outage():
    failure = oracle_failure(ConnectTimeout("connecting to Oracle at db:1521: no answer within 1s"))
    assert (failure.kind, failure.code, failure.reconnect, failure.system) == (OUTAGE, "CONNECT-TIMEOUT", True,
                                                                               DATABASE)


def test_call_with_timeout_returns_and_raises():
    assert call_with_timeout(lambda: 42, 1.0, "x") == 42
    with pytest.raises(KeyError):
        call_with_timeout(lambda: {}["k"], 1.0, "x")
    with pytest.raises(ConnectTimeout, match=r"no answer within 0\.2s"):
        call_with_timeout(lambda: time.sleep(5), 0.2, "sleeping")


# -- PostgreSQL and SQLite ---------------------------------------------------------------------

def pg_failure(exc):
    return classify(exc, classifiers=classifiers(parse_db_url("postgresql://app@localhost/app")))


@pytest.mark.parametrize("state, message, kind", [
    ("40001", "could not serialize access due to concurrent update", RETRYABLE),
    ("40P01", "deadlock detected", RETRYABLE),
    ("55P03", 'could not obtain lock on relation "t"', RETRYABLE),
    ("57014", "canceling statement due to statement timeout", RETRYABLE),
    ("57014", "canceling statement due to user request", PERMANENT),
    ("57P01", "terminating connection due to administrator command", OUTAGE),
    ("57P02", "terminating connection because of crash of another server process", OUTAGE),
    ("57P03", "the database system is starting up", OUTAGE),
    ("08006", "connection failure", OUTAGE),
    ("08001", "could not connect", OUTAGE),
    ("53300", "sorry, too many clients already", OUTAGE),
    ("28P01", 'password authentication failed for user "app"', CONFIG),
    ("28000", 'no pg_hba.conf entry for host "10.0.0.1"', CONFIG),
    ("3D000", 'database "nope" does not exist', CONFIG),
    ("23505", 'duplicate key value violates unique constraint "t_pkey"', PERMANENT),
    ("42P01", 'relation "nope" does not exist', PERMANENT),
    ("42501", "permission denied for table t", PERMANENT),
])
def test_postgres_sqlstates(state, message, kind):
    psycopg = pytest.importorskip("psycopg")
    failure = pg_failure(psycopg.errors.lookup(state)(message))
    assert (failure.kind, failure.code) == (kind, state)
    environment = kind in (OUTAGE, CONFIG)
    assert failure.reconnect is environment and failure.system == (DATABASE if environment else None)


@pytest.mark.parametrize("message, kind, code", [
    # What libpq says (without a SQLSTATE) for a connect that failed or a session that was cut;
    # the texts are the ones a real server gives (see test_db_preflight.py).
    ('connection failed: connection to server at "127.0.0.1", port 5432 failed: Connection refused\n'
     "\tIs the server running on that host and accepting TCP/IP connections?", OUTAGE, "08001"),
    ("failed to resolve host 'db.invalid': [Errno -2] Name or service not known", OUTAGE, "08001"),
    ('connection failed: connection to server at "10.0.0.9", port 5432 failed: timeout expired', OUTAGE, "08001"),
    ("consuming input failed: server closed the connection unexpectedly", OUTAGE, "08006"),
    ("the connection is closed", OUTAGE, "08003"),
    ('connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  the database system '
     "is shutting down", OUTAGE, "57P03"),
    ('connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  sorry, too many clients '
     "already", OUTAGE, "53300"),
    ('connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  password '
     'authentication failed for user "app"', CONFIG, "28P01"),
    ('connection failed: connection to server at "127.0.0.1", port 5432 failed: fe_sendauth: no password '
     "supplied", CONFIG, "28P01"),
    ('connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  database "nope" '
     "does not exist", CONFIG, "3D000"),
    ('connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  role "x" does not '
     "exist", CONFIG, "28000"),
    ('connection failed: connection to server at "db", port 5432 failed: SSL error: certificate verify '
     "failed", CONFIG, "08001"),
])
def test_postgres_connection_errors_without_sqlstate(message, kind, code):
    psycopg = pytest.importorskip("psycopg")
    failure = pg_failure(psycopg.OperationalError(message))
    assert (failure.kind, failure.code, failure.reconnect, failure.system) == (kind, code, True, DATABASE)


def test_postgres_unknown_operational_error_reconnects_and_retries():
    psycopg = pytest.importorskip("psycopg")
    failure = pg_failure(psycopg.OperationalError("something odd happened"))
    assert (failure.kind, failure.reconnect) == (RETRYABLE, True)


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


@pytest.mark.parametrize("make, code", [
    pytest.param(lambda p: None, "SQLITE_CANTOPEN", id="missing-file"),
    pytest.param(lambda p: p.mkdir(), "SQLITE_CANTOPEN", id="a-directory"),
    pytest.param(lambda p: p.write_bytes(b"not a database, but long enough to be read as a header" * 20),
                 "SQLITE_NOTADB", id="not-a-database"),
])
def test_sqlite_file_that_cannot_be_used_is_a_configuration_error(tmp_path, make, code):
    from job.db import preflight, preflight_failure, sqlite

    path = tmp_path / "x.db"
    make(path)
    settings = parse_db_url(f"sqlite:///{path}")
    with pytest.raises(sqlite3.Error) as e:
        preflight(settings)
    failure = classify(e.value, classifiers=classifiers(settings))
    assert (failure.kind, failure.code, failure.system) == (CONFIG, code, DATABASE)
    assert preflight_failure(settings, e.value).connecting
    assert sqlite.classify(e.value).kind == CONFIG


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
    ("oracle://scott:tiger-secret@db/ORCL", "never in the URL"),
    ("mysql://a:tiger-secret@b/c?x=tiger-secret", "expected oracle://"),
    ("oracle://scott@db?password=tiger-secret", "'password' is a password"),
    ("postgresql://app@/?sslpassword=tiger-secret", "'sslpassword' is a password"),
    ("postgresql://app@/", "no host"),
    ("postgresql://app@db:99999/x?passwd=tiger-secret", "'passwd' is a password"),
    ("sqlite://", "expected sqlite:///PATH"),
    ("sqlite:///:memory:", "expected sqlite:///PATH"),
])
def test_bad_db_urls(url, message):
    with pytest.raises(UsageError, match=message) as e:
        parse_db_url(url)
    assert "tiger" not in str(e.value)


@pytest.mark.parametrize("query", [
    "password=tiger-secret", "PASSWORD=tiger-secret", "passwd=tiger-secret", "pwd=tiger-secret",
    "sslpassword=tiger-secret", "wallet_password=tiger-secret", "walletpassword=tiger-secret",
    "javax.net.ssl.keyStorePassword=tiger-secret", "oracle.net.wallet_password=tiger-secret",
    "sslmode=require&Password=tiger-secret",
])
@pytest.mark.parametrize("base", ["postgresql://app@pg/db", "oracle://app@db/SVC", "oracle+tcps://app@db/SVC",
                                  "sqlite:///x.db"])
def test_password_like_query_parameters_are_refused_unechoed(base, query):
    with pytest.raises(UsageError, match="is a password") as e:
        parse_db_url(f"{base}?{query}")
    assert "tiger" not in str(e.value)


def test_oracle_dsn_and_call_timeout():
    s = parse_db_url("oracle://scott@db.example:1522/ORCLPDB1?transport_connect_timeout=3",
                     statement_timeout=2.5)
    assert oracle.dsn(s) == "db.example:1522/ORCLPDB1?transport_connect_timeout=3"
    assert oracle.call_timeout_ms(s) == 2500
    assert oracle.call_timeout_ms(ORACLE) == 0
    assert oracle.dsn(parse_db_url("oracle://u@[::1]/S")) == "[::1]:1521/S"
    tls = parse_db_url('oracle+tcps://u@db:2484/S?ssl_server_cert_dn=CN=db, O=Example&wallet_location=/w')
    assert tls.tls and oracle.dsn(tls) == 'tcps://db:2484/S?ssl_server_cert_dn="CN=db, O=Example"&wallet_location=/w'


@pytest.mark.parametrize("url, expected", [
    # expire_time (minutes of idleness before TCP keepalive probes) is on unless the URL says.
    ("oracle://u@db/S", ("tcp", "db", 1521, "S", 1, None, None)),
    ("oracle://u@db/S?expire_time=7", ("tcp", "db", 1521, "S", 7, None, None)),
    ("oracle://u@db/S?expire_time=0", ("tcp", "db", 1521, "S", 0, None, None)),
    ("oracle+tcps://u@db.example:2484/S?wallet_location=/w&ssl_server_cert_dn=CN=db.example, O=Example",
     ("tcps", "db.example", 2484, "S", 1, "/w", "CN=db.example, O=Example")),
])
def test_oracle_connect_params(url, expected):
    params = oracle.connect_params(parse_db_url(url, connect_timeout=4))
    assert (params.protocol, params.host, params.port, params.service_name, params.expire_time,
            params.wallet_location, params.ssl_server_cert_dn) == expected
    assert params.tcp_connect_timeout == 4


@pytest.mark.parametrize("url, message", [
    ("oracle://u@db/S?expire_time=soon", "DPY-4018: cannot parse connect string"),
    ("oracle+tcps://u@db/S?wallet_location=/nonexistent", "cannot read /nonexistent/ewallet.pem"),
    ("postgresql://u@db/x?sslmod=require", 'invalid connection option "sslmod"'),
])
def test_connection_parameters_the_driver_refuses_are_usage_errors(url, message):
    with pytest.raises(UsageError, match=message):
        db_settings(url)


@pytest.mark.parametrize("sql, dialect, expected", [
    ("SELECT id, payload FROM todo;", "oracle", "SELECT id, payload FROM todo"),
    ("SELECT id, payload FROM todo ;\n", "postgres", "SELECT id, payload FROM todo"),
    ("SELECT 1 FROM dual;;", "oracle", "SELECT 1 FROM dual"),
    ("ALTER SESSION SET NLS_DATE_FORMAT = 'YYYY-MM-DD';\n/\n", "oracle",
     "ALTER SESSION SET NLS_DATE_FORMAT = 'YYYY-MM-DD'"),
    ("BEGIN dbms_session.set_identifier('bulkjob'); END;", "oracle", "BEGIN dbms_session.set_identifier('bulkjob'); END;"),
    ("<<l>> DECLARE n NUMBER; BEGIN NULL; END;\n/", "oracle", "<<l>> DECLARE n NUMBER; BEGIN NULL; END;"),
    ("SET search_path = app;", "postgres", "SET search_path = app"),
    ("PRAGMA synchronous = NORMAL;", "sqlite", "PRAGMA synchronous = NORMAL"),
    ("SELECT ';'", "oracle", "SELECT ';'"),
])
def test_plain_sql_drops_a_pasted_terminator(sql, dialect, expected):
    assert plain_sql(sql, dialect) == expected


def test_session_and_items_sql_lose_their_terminator():
    from job.db.query import db_items

    s = db_settings("oracle://u@h/S", session_sql=["ALTER SESSION SET TIME_ZONE = 'UTC';"])
    assert s.session_sql == ("ALTER SESSION SET TIME_ZONE = 'UTC'",)
    items = db_items(items=None, items_sql="SELECT id, payload FROM todo;\n", work_table=None, db=s)
    assert items.sql == "SELECT id, payload FROM todo"


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


@pytest.mark.parametrize("url", [
    "postgresql://app@127.0.0.1:1/app?sslmode=require&password=hunter2-secret",
    "oracle+tcps://app@127.0.0.1:1/SVC?wallet_password=hunter2-secret",
])
def test_a_password_in_the_query_string_exits_2_without_echoing_it(tmp_path, url):
    from conftest import run_bulkjob, write_items

    write_items(tmp_path / "items.jsonl", [{"id": 1, "payload": {"k": 1}}])
    (tmp_path / "s.sql").write_text("-- step: one\nSELECT :k;\n")
    proc = run_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", f"sql:{tmp_path / 's.sql'}",
                       "--db", url, "--manifest", str(tmp_path / "state"), "--metrics-port", "0")
    assert proc.returncode == 2 and "is a password" in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").rglob("*.jsonl"))
