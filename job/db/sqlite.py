"""SQLite through the standard library: the embedded database of the demo and the tests.

Every worker opens the same file. SQLite has one writer at a time: a writer waits for the lock
up to the busy timeout (--statement-timeout, else DEFAULT_BUSY_TIMEOUT), then fails with
SQLITE_BUSY ("database is locked"), which is retryable.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import quote

from ..outcome import CONFIG, PERMANENT, RETRYABLE, Failure
from .batch import RowError, executemany_with_savepoints
from .dialect import claimed_binds
from .errors import environment
from .session import prepare_session, run_statement

if TYPE_CHECKING:
    from .dialect import Binds, BoundStatement
    from .url import DbSettings

#: The connections this dialect makes and is handed back (see job.db.dialect).
Connection: TypeAlias = sqlite3.Connection

PARAMSTYLE = "named"
NOW = "CURRENT_TIMESTAMP"
#: What the preflight runs to see that a session works: it reads the schema, so a file that is
#: not a database fails here (SELECT 1 would not even read the file).
TRIVIAL_QUERY = "SELECT COUNT(*) FROM sqlite_master"

#: Default seconds a statement waits for another connection's lock before SQLITE_BUSY: a few
#: short items of other workers may commit meanwhile.
DEFAULT_BUSY_TIMEOUT = 5.0
#: Primary result codes for "another connection holds the lock".
_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
#: Primary result codes for a file we may not use as configured: it is missing or cannot be
#: opened (the directory, permissions), is not a database, or refuses writes.
_REFUSED_CODES = frozenset({
    3,   # SQLITE_PERM
    8,   # SQLITE_READONLY
    14,  # SQLITE_CANTOPEN
    23,  # SQLITE_AUTH
    26,  # SQLITE_NOTADB
})


def busy_timeout(settings: DbSettings) -> float:
    return settings.statement_timeout or DEFAULT_BUSY_TIMEOUT


def connect(settings: DbSettings, password: str | None) -> sqlite3.Connection:
    """Open the existing file (mode=rw: a mistyped path is an error, not a new empty database)."""
    uri = f"file:{quote(settings.database)}?mode=rw"
    # check_same_thread=False: the parent's write-back thread may reconnect on its own.
    conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout(settings), check_same_thread=False)
    prepare_session(conn, settings.session_sql, execute=conn.execute, driver_error=sqlite3.Error,
                    classify=classify)
    return conn


def check_settings(settings: DbSettings) -> None:
    """Nothing to check before opening the file: a missing one is found by the preflight."""


def usable(conn: sqlite3.Connection) -> bool:
    return True


def uncommitted(conn: sqlite3.Connection) -> bool:
    """Python's sqlite3 opens a transaction before the first INSERT, UPDATE or DELETE only (and
    bulkjob's `begin` with BEGIN IMMEDIATE)."""
    return conn.in_transaction


def limit_calls(conn: sqlite3.Connection, seconds: float) -> None:
    """A local file: the busy timeout already bounds the wait for a lock."""


def items_cursor(conn: sqlite3.Connection) -> sqlite3.Cursor:
    """sqlite3 fetches text as str already."""
    return conn.cursor()


def begin(conn: sqlite3.Connection) -> None:
    """Take the write lock up front (BEGIN IMMEDIATE): waiting happens here, under the busy
    timeout, and never in the middle of a transaction that already read (which SQLite cannot
    always resolve by waiting)."""
    if not conn.in_transaction:
        conn.execute("BEGIN IMMEDIATE")


def run_transaction(conn: sqlite3.Connection, statements: Sequence[BoundStatement]) -> int:
    """Run `statements` ((sql, binds or None), in order) as one transaction begun with `begin`
    and commit it; returns the rows they affected. A local file has no round trips to save.
    Raises the failing statement's error with the transaction still open: the caller rolls
    back."""
    begin(conn)
    with closing(conn.cursor()) as cur:
        rows = 0
        for sql, params in statements:
            run_statement(cur, sql, params)
            rows += max(cur.rowcount, 0)
    conn.commit()
    return rows


def classify(exc: BaseException) -> Failure | None:
    """Busy/locked is retryable; a file that cannot be opened or used is a configuration error
    (SQLite has no server that could be unreachable); every other sqlite3 error is permanent."""
    if not isinstance(exc, sqlite3.Error):
        return None
    name = type(exc).__name__
    code = getattr(exc, "sqlite_errorname", None)
    number = getattr(exc, "sqlite_errorcode", None)
    message = str(exc)
    busy = (number is not None and number & 0xFF in _BUSY_CODES) or "database is locked" in message \
        or "database table is locked" in message
    if busy:
        return Failure(RETRYABLE, name, message, code=code or "SQLITE_BUSY")
    if (number is not None and number & 0xFF in _REFUSED_CODES) or "unable to open database file" in message:
        return environment(CONFIG, name, message, code or "SQLITE_CANTOPEN")
    return Failure(PERMANENT, name, message, code=code)


def _row_error(exc: BaseException) -> tuple[str | None, str] | None:
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError)):
        return getattr(exc, "sqlite_errorname", None), str(exc)
    return None


def executemany(conn: sqlite3.Connection, sql: str, rows: Iterable[Binds], *, batch_size: int) -> list[RowError]:
    """SQLite has no batch errors: a failing batch is replayed row by row under savepoints."""
    if not conn.in_transaction:
        # A savepoint outside a transaction would start one that its RELEASE commits.
        conn.execute("BEGIN")
    return executemany_with_savepoints(conn, sql, rows, batch_size=batch_size, row_error=_row_error)


# -- the work table's claims (job.db.claim holds the statements they share) --------------------

#: The database's clock for claims, and a claim's expiry, as text to the millisecond (SQLite
#: has no time type; text of one format compares in time order).
CLAIM_CLOCK = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
CLAIM_EXPIRY = "strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+.3f seconds', :ttl))"


def claim_sql(table: str, where: str) -> tuple[str, str]:
    """Read up to :limit rows matching `where`, then make each this runner's: both under the one
    write lock that `claim` takes first, so that no other runner reads the same rows."""
    return (f"SELECT work_id, payload, attempts FROM {table} WHERE {where} LIMIT :limit",
            f"UPDATE {table} SET state = 'RUNNING', claimed_by = :runner, claim_expires = {CLAIM_EXPIRY}, "
            f"updated_at = {NOW} WHERE work_id = :work_id")


def first_row_sql(table: str, where: str) -> str:
    return f"SELECT 1 FROM {table} WHERE {where} LIMIT 1"


def claim(conn: sqlite3.Connection, statements: tuple[str, ...], *, runner: str, ttl: float,
          limit: int) -> list[tuple[Any, ...]]:
    """BEGIN IMMEDIATE (the write lock, waited for up to the busy timeout), read, update,
    commit; returns (work_id, payload, attempts) rows."""
    select, update = statements
    begin(conn)
    rows = conn.execute(select, {"limit": limit}).fetchall()
    if rows:
        conn.executemany(update, claimed_binds(rows, runner=runner, ttl=ttl))
    conn.commit()
    return rows
