"""A worker's database session (Database), how a new session is set up, and the timer that bounds a connect.

The parent connects for the preflight and its own reads (job.db.preflight, job.db.parent);
workers open their own session after they start, on first use, and keep it across items.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import Permanent
from ..outcome import PERMANENT, Failure
from .batch import DEFAULT_BATCH_SIZE, RowError
from .dialect import dialect_of
from .errors import ConnectTimeout
from .settings import read_password

if TYPE_CHECKING:
    from .dialect import Binds, Connection, Cursor
    from .url import DbSettings

T = TypeVar("T")


class Database:
    """A worker's database: one connection, opened on first use and reused for every item."""

    def __init__(self, settings: DbSettings) -> None:
        self.settings = settings
        self.dialect = dialect_of(settings)
        self._conn: Connection | None = None
        #: Whether the last call of connection() failed while opening a session (in the
        #: dialect's connect: TCP, TLS, login, --session-sql), not in the middle of an item.
        #: False again once connection() returns; a worker may clear it before an attempt.
        self.connect_failed = False

    def connection(self) -> Connection:
        """The open DB-API connection; (re)connects when there is none or it is known dead."""
        if self._conn is not None and not self.dialect.usable(self._conn):
            self.discard()
        if self._conn is None:
            self.connect_failed = True
            self._conn = self.dialect.connect(self.settings, read_password(self.settings))
        self.connect_failed = False
        return self._conn

    def in_transaction(self) -> bool:
        """Whether the session holds changes that are neither committed nor rolled back (sqlite3
        `in_transaction`, psycopg's transaction status with a transaction id assigned,
        python-oracledb `transaction_in_progress`). False without a session. A session that
        cannot even say is dropped (its changes went with it) and the answer is False."""
        if self._conn is None:
            return False
        try:
            return bool(self.dialect.uncommitted(self._conn))
        except Exception:
            self.discard()
            return False

    def after_failure(self, failure: Failure) -> None:
        """Leave no half-done transaction for the next item; drop a dead session."""
        if self._conn is None:
            return
        if failure.reconnect:
            self.discard()
            return
        try:
            self._conn.rollback()
        except Exception:
            self.discard()

    def executemany(self, sql: str, rows: Iterable[Binds], *,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> list[RowError]:
        """Run `sql` for every row in batches of `batch_size`; returns the rows refused.

        Rows a database refuses for their data (constraint, conversion) are returned with their
        offset; the others stay applied in the open transaction, and the caller commits or
        rolls back. Any other error (connection, lock, deadlock, missing table) is raised.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        return self.dialect.executemany(self.connection(), sql, rows, batch_size=batch_size)

    def discard(self) -> None:
        """Drop the session without ending its transaction (closing rolls it back); the next
        connection() opens a new one."""
        conn, self._conn = self._conn, None
        close_quietly(conn)

    def close(self) -> None:
        self.discard()


def close_quietly(conn: Connection | None) -> None:
    """Close a connection that may be dead: a dead session may refuse even to close, and it
    is gone either way."""
    if conn is not None:
        try:
            conn.close()
        except Exception:
            pass


def run_statement(cursor: Cursor, sql: str, params: dict[str, Any] | None) -> None:
    """Run one statement, its binds by name or None: sqlite3 refuses None for no binds."""
    if params is None:
        cursor.execute(sql)
    else:
        cursor.execute(sql, params)


def rollback_quietly(conn: Connection) -> None:
    """Undo the open transaction after a failure; a dead session has nothing left to undo."""
    try:
        conn.rollback()
    except Exception:
        pass


def prepare_session(conn: Connection, statements: Iterable[str], *, execute: Callable[[str], object],
                    driver_error: type[Exception], classify: Callable[[BaseException], Failure | None]) -> None:
    """Run the --session-sql `statements` on a new connection with `execute` and commit them
    (a SET rolled back with a later transaction would be undone). A permanent error names the
    statement; on any error the connection is closed before the error goes on."""
    try:
        for sql in statements:
            try:
                execute(sql)
            except driver_error as e:
                failure = classify(e)
                if failure is not None and failure.kind == PERMANENT:
                    raise Permanent(f"--session-sql {sql!r}: {failure.message}", code=failure.code) from e
                raise
        conn.commit()
    except BaseException:
        conn.close()
        raise


class _Alarm(BaseException):
    """Raised by the SIGALRM handler of call_with_timeout: not an Exception, and not a
    TimeoutError, which a driver may take for its own socket timeout and wait on."""


def call_with_timeout(fn: Callable[[], T], seconds: float, what: str) -> T:
    """Call `fn()` and raise ConnectTimeout if it has not returned within `seconds`.

    In a process's main thread (a worker) a SIGALRM interrupts the blocked call, so nothing is
    left behind. Elsewhere the call runs in a daemon thread that is abandoned on timeout; it
    ends when the server finally closes the socket.
    """
    message = f"{what}: no answer within {seconds:g}s (--connect-timeout)"
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        fired = False

        def on_alarm(signum: int, frame: FrameType | None) -> None:
            nonlocal fired
            fired = True
            raise _Alarm()

        previous = signal.signal(signal.SIGALRM, on_alarm)
        started = time.monotonic()
        outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn()
        except BaseException:
            # A driver may wrap our exception in its own (oracledb: DPY-6005 caused by it).
            if fired:
                raise ConnectTimeout(message) from None
            raise
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if outer:  # someone else's alarm was pending: put it back, less the time spent
                signal.setitimer(signal.ITIMER_REAL, max(0.001, outer - (time.monotonic() - started)))
    values: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            values.append(fn())
        except BaseException as e:  # handed to the caller below
            errors.append(e)

    thread = threading.Thread(target=target, name="bulkjob-connect", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise ConnectTimeout(message)
    if errors:
        raise errors[0]
    return values[0]
