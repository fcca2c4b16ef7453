"""PostgreSQL through psycopg 3: this package is the only one that imports psycopg (its
`pipeline` module sends a steps transaction).

Errors are told apart by SQLSTATE. A connection that failed or was cut comes as an
OperationalError without one ("connection is closed", "server closed the connection"), and so
does a login the server refused: libpq reports those as text, which is matched here.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from ...errors import UsageError
from ...outcome import CONFIG, OUTAGE, PERMANENT, RETRYABLE, Failure
from ..batch import RowError, executemany_with_savepoints
from ..dialect import milliseconds
from ..errors import environment
from ..session import prepare_session
from . import pipeline

if TYPE_CHECKING:
    from ..dialect import Binds, BoundStatement, Cursor
    from ..url import DbSettings

#: The connections this dialect makes and is handed back (see job.db.dialect): rows as tuples.
Connection: TypeAlias = psycopg.Connection[TupleRow]

PARAMSTYLE = "pyformat"
NOW = "now()"
#: What the preflight runs to see that a session works.
TRIVIAL_QUERY = "SELECT 1"
APPLICATION_NAME = "bulkjob"

#: Worth another attempt after the transaction is rolled back.
PASSING = frozenset({
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available (NOWAIT, lock_timeout)
})
#: The server ended the session or cannot take one now: an outage. Class 08 (connection
#: exceptions) too.
UNREACHABLE = frozenset({
    "57P01",  # admin_shutdown (also pg_terminate_backend)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (starting up, recovering)
    "53300",  # too_many_connections: wait for others to leave
})
#: The server refuses our settings: trying again cannot help.
REFUSED = frozenset({
    "28P01",  # invalid_password
    "28000",  # invalid_authorization_specification (no such role, no pg_hba.conf entry)
    "3D000",  # invalid_catalog_name: the database does not exist
})
#: What libpq says, without a SQLSTATE, when a connect fails or a session is cut: (pattern,
#: kind, the SQLSTATE the server would have sent). The first that matches the message wins.
_CONNECTION_TEXTS = tuple((re.compile(pattern, re.IGNORECASE), kind, code) for pattern, kind, code in (
    ("password authentication failed", CONFIG, "28P01"),
    ("no password supplied", CONFIG, "28P01"),
    ("no pg_hba.conf entry", CONFIG, "28000"),
    ('role ".*" does not exist', CONFIG, "28000"),
    ('database ".*" does not exist', CONFIG, "3D000"),
    ("certificate verify failed", CONFIG, "08001"),
    ("server does not support SSL", CONFIG, "08001"),
    ("too many clients", OUTAGE, "53300"),
    ("remaining connection slots are reserved", OUTAGE, "53300"),
    ("the database system is", OUTAGE, "57P03"),  # starting up, shutting down, in recovery mode
    ("terminating connection", OUTAGE, "57P01"),
    ("connection refused", OUTAGE, "08001"),
    ("could not connect", OUTAGE, "08001"),
    ("failed to resolve host", OUTAGE, "08001"),
    ("could not translate host name", OUTAGE, "08001"),
    ("no route to host", OUTAGE, "08001"),
    ("network is unreachable", OUTAGE, "08001"),
    ("timeout expired", OUTAGE, "08001"),
    ("connection timed out", OUTAGE, "08006"),
    ("server closed the connection", OUTAGE, "08006"),
    ("connection is closed", OUTAGE, "08003"),
    ("connection is lost", OUTAGE, "08006"),
    ("connection reset", OUTAGE, "08006"),
    ("broken pipe", OUTAGE, "08006"),
    ("consuming input failed", OUTAGE, "08006"),
    ("sending query failed", OUTAGE, "08006"),
    ("could not receive data", OUTAGE, "08006"),
    ("could not send data", OUTAGE, "08006"),
    ("ssl syscall error", OUTAGE, "08006"),
    ("ssl connection has been closed", OUTAGE, "08006"),
    ("eof detected", OUTAGE, "08006"),
))
#: A 57014 query_canceled is ours to retry only when our statement_timeout caused it; a cancel
#: by an operator (pg_cancel_backend) means stop.
_STATEMENT_TIMEOUT_TEXT = "statement timeout"


def conninfo(settings: DbSettings, password: str | None) -> str:
    """libpq connection string; URL query parameters (sslmode, host=/socket/dir ...) pass through."""
    params: dict[str, Any] = {"host": settings.host, "port": settings.port, "dbname": settings.database,
                              "user": settings.user, "password": password,
                              "connect_timeout": max(2, math.ceil(settings.connect_timeout)),
                              "application_name": APPLICATION_NAME}
    params.update(settings.params)
    return make_conninfo("", **{k: v for k, v in params.items() if v is not None})


def session_statements(settings: DbSettings) -> list[str]:
    """SQL run once per new connection: the statement timeout, then --session-sql."""
    statements = []
    if settings.statement_timeout:
        statements.append(f"SET statement_timeout = {milliseconds(settings.statement_timeout)}")
    return statements + list(settings.session_sql)


def check_settings(settings: DbSettings) -> None:
    """The URL's query parameters as libpq reads them; UsageError for one it does not know."""
    try:
        conninfo(settings, None)
    except psycopg.Error as e:
        raise UsageError(f"--db: {e}") from None


def connect(settings: DbSettings, password: str | None) -> Connection:
    """A new connection (not autocommit) with the session statements run and committed.

    libpq's connect_timeout bounds the whole handshake, login included, so no extra timer.
    """
    conn = psycopg.connect(conninfo(settings, password))
    prepare_session(conn, session_statements(settings), execute=conn.execute, driver_error=psycopg.Error,
                    classify=classify)
    return conn


def usable(conn: Connection) -> bool:
    """False when psycopg already knows the connection is closed or broken (no round trip)."""
    return not conn.closed and not conn.broken


def uncommitted(conn: Connection) -> bool:
    """A transaction that wrote something (it has a transaction id), or one that failed. A
    transaction that only read is rolled back here: there is nothing in it to lose."""
    status = conn.info.transaction_status
    if status == psycopg.pq.TransactionStatus.INERROR:
        return True
    if status != psycopg.pq.TransactionStatus.INTRANS:
        return False
    row = conn.execute("SELECT txid_current_if_assigned() IS NOT NULL").fetchone()
    wrote = row is not None and bool(row[0])
    if not wrote:
        conn.rollback()
    return wrote


#: First words of the statements that run alone in autocommit mode exactly as between BEGIN and
#: COMMIT: queries and DML. In autocommit the server wraps a statement in a transaction of its
#: own, committed at the statement's Sync (a deferred constraint fails there, as the statement's
#: error). Others (DDL, SET, LOCK, CALL, DO, VACUUM ...) may need a transaction block, refuse
#: one (VACUUM, CREATE DATABASE: today they fail under BEGIN, alone they would run) or commit
#: on their own, so they always get BEGIN and COMMIT.
SELF_CONTAINED = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "WITH", "VALUES", "TABLE"})
#: The first word, after blanks, `--` comments, `/* */` comments without a nested `/*`
#: (PostgreSQL nests them: such a statement is not recognised, and gets BEGIN and COMMIT) and
#: opening parentheses.
_FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*(?:(?!/\*).)*?\*/)*[\s(]*([A-Za-z]+)", re.S)


@functools.lru_cache(maxsize=256)
def self_contained(sql: str) -> bool:
    """Whether a statement (of SELF_CONTAINED's kinds) may run alone in autocommit mode as the
    whole of a transaction."""
    m = _FIRST_WORD.match(sql)
    return m is not None and m.group(1).upper() in SELF_CONTAINED


def run_transaction(conn: Connection, statements: Sequence[BoundStatement]) -> int:
    """Run `statements` ((sql, binds or None), in order) as one transaction and commit it, in
    one round trip; returns the rows they affected. Raises the error of the statement that
    failed, with nothing of the transaction committed and the session out of it (rolled
    back); a session lost on the way raises libpq's error (an outage), and is closed.

    A transaction of one query or DML statement (see SELF_CONTAINED) is that statement alone,
    committed at its Sync as in autocommit mode. Any other is sent as BEGIN, the statements and
    COMMIT, without waiting, and their results come back together at one Sync (job.db.postgres.pipeline).
    """
    lone = len(statements) == 1 and self_contained(statements[0][0])
    return pipeline.transaction(conn, statements, explicit=not lone)


def limit_calls(conn: Connection, seconds: float) -> None:
    """psycopg has no client-side bound on a round trip: libpq's TCP keepalives (on by default,
    tuned with `?keepalives_idle=`) are what notices a dropped connection."""


def items_cursor(conn: Connection) -> psycopg.Cursor[TupleRow]:
    """psycopg fetches text and JSON as Python values already."""
    return conn.cursor()


def classify(exc: BaseException) -> Failure | None:
    """A Failure for psycopg errors, by SQLSTATE (or libpq's text when there is none); None for
    anything else."""
    if not isinstance(exc, psycopg.Error):
        return None
    state = getattr(exc, "sqlstate", None)
    name = type(exc).__name__
    message = str(exc)
    if state is None:
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            for pattern, kind, code in _CONNECTION_TEXTS:
                if pattern.search(message):
                    return environment(kind, name, message, code)
            return Failure(RETRYABLE, name, message, reconnect=True)
        return Failure(PERMANENT, name, message)
    if state in REFUSED:
        return environment(CONFIG, name, message, state)
    if state.startswith("08") or state in UNREACHABLE:
        return environment(OUTAGE, name, message, state)
    if state in PASSING or (state == "57014" and _STATEMENT_TIMEOUT_TEXT in message):
        return Failure(RETRYABLE, name, message, code=state)
    return Failure(PERMANENT, name, message, code=state)


def _row_error(exc: BaseException) -> tuple[str | None, str] | None:
    """Data exceptions (22) and integrity violations (23) are a row's fault; others are not."""
    state = getattr(exc, "sqlstate", None) or ""
    if isinstance(exc, psycopg.Error) and state[:2] in ("22", "23"):
        return state, str(exc)
    return None


#: A plain INSERT of positional parameters, which COPY can do: `INSERT INTO [schema.]table
#: (col, ...) VALUES (%s, ...)`. Anything else (ON CONFLICT, RETURNING, expressions, named
#: parameters) goes through executemany.
_IDENT = r"[A-Za-z_][A-Za-z0-9_$]*"
_PLAIN_INSERT = re.compile(
    rf"\s*INSERT\s+INTO\s+({_IDENT}(?:\.{_IDENT})?)\s*\(\s*({_IDENT}(?:\s*,\s*{_IDENT})*)\s*\)"
    rf"\s*VALUES\s*\(\s*(%s(?:\s*,\s*%s)*)\s*\)\s*;?\s*", re.IGNORECASE)


def copy_target(sql: str) -> str | None:
    """`COPY table (cols) FROM STDIN` for a plain INSERT whose placeholders match its columns."""
    m = _PLAIN_INSERT.fullmatch(sql)
    if m is None:
        return None
    columns = [c.strip() for c in m.group(2).split(",")]
    if len(columns) != m.group(3).count("%s"):
        return None
    return f"COPY {m.group(1)} ({', '.join(columns)}) FROM STDIN"


def _copy_batch(cur: Cursor, sql: str, batch: list[Binds]) -> None:
    """A batch with COPY when the INSERT allows (and the cursor is psycopg's, as every cursor
    of a connection from `connect` is), else with executemany."""
    target = copy_target(sql)
    positional = [row for row in batch if isinstance(row, (tuple, list))] if target is not None else []
    if target is None or len(positional) != len(batch) or not isinstance(cur, psycopg.Cursor):
        cur.executemany(sql, batch)
        return
    with cur.copy(target) as copy:
        for row in positional:
            copy.write_row(row)


def executemany(conn: Connection, sql: str, rows: Iterable[Binds], *, batch_size: int) -> list[RowError]:
    """PostgreSQL has no batch errors: a failing batch is replayed row by row under savepoints.
    A plain INSERT is sent with COPY, several times faster than executemany; a batch that COPY
    refuses is replayed row by row with INSERTs, which finds the bad rows."""
    return executemany_with_savepoints(conn, sql, rows, batch_size=batch_size, row_error=_row_error,
                                       run_batch=_copy_batch)


# -- the work table's claims (job.db.claim holds the statements they share) --------------------

#: The database's clock for claims, and a claim's expiry: the statement's own time plus the
#: TTL, never the transaction's start (which may come before the runner's clock read).
CLAIM_CLOCK = "now()"
CLAIM_EXPIRY = "clock_timestamp() + %(ttl)s * interval '1 second'"


def claim_sql(table: str, where: str) -> tuple[str]:
    """One statement that claims up to %(limit)s rows matching `where`: the CTE locks them,
    skipping rows another runner's claim has locked, and the UPDATE makes them this runner's."""
    return (f"WITH picked AS (SELECT work_id FROM {table} WHERE {where} LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
            f"UPDATE {table} AS w SET state = 'RUNNING', claimed_by = %(runner)s, claim_expires = {CLAIM_EXPIRY}, "
            f"updated_at = {NOW} FROM picked WHERE w.work_id = picked.work_id "
            "RETURNING w.work_id, w.payload, w.attempts",)


def first_row_sql(table: str, where: str) -> str:
    return f"SELECT 1 FROM {table} WHERE {where} LIMIT 1"


def claim(conn: Connection, statements: tuple[str, ...], *, runner: str, ttl: float,
          limit: int) -> list[tuple[Any, ...]]:
    """Run the claim of `claim_sql` and commit; returns (work_id, payload, attempts) rows."""
    (sql,) = statements
    rows = conn.execute(sql, {"runner": runner, "ttl": ttl, "limit": limit}).fetchall()
    conn.commit()
    return rows
