"""The parent's own connections to the database: one-off reads, a background thread's connection, what a failure means.

A worker's session is job.db.session's. The parent reads items (--items-sql), a work table's
columns and states (`bulkjob status`, `bulkjob report`) with `reading`; the threads that claim
rows and write their states back each keep a ParentConnection. A failure of the parent's own
query is classified as a worker's would be (`database_error`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from typing import TYPE_CHECKING

from ..errors import BulkjobError, ConfigError, UsageError
from ..outcome import CONFIG, OUTAGE, RETRYABLE
from ..retry import classify
from .dialect import dialect_of
from .errors import DatabaseUnavailable, classifiers, first_line
from .session import close_quietly
from .settings import read_password

if TYPE_CHECKING:
    from .dialect import Binds, Connection
    from .url import DbSettings


@contextlib.contextmanager
def reading(settings: DbSettings, what: str, *, retry_on: Iterable[str] = (),
            outage_on: Iterable[str] = ()) -> Iterator[Connection]:
    """A new connection for one of the parent's reads, rolled back after the block and closed.
    A failure to connect, in the block or in ending it raises what `database_error` says
    (`what` names the read)."""
    dialect = dialect_of(settings)
    try:
        with closing(dialect.connect(settings, read_password(settings))) as conn:
            yield conn
            conn.rollback()
    except Exception as e:
        raise database_error(e, what, settings, retry_on=retry_on, outage_on=outage_on) from e


def database_error(exc: BaseException, what: str, settings: DbSettings, *, retry_on: Iterable[str] = (),
                   outage_on: Iterable[str] = ()) -> BulkjobError:
    """The error to raise for a failure of the parent's own query (`what` names it), classified
    as a worker's would be (`retry_on`, `outage_on` are --retry-on and --outage-on):
    DatabaseUnavailable for an outage or a passing error (a lock, ORA-01555 with --retry-on
    ORA-01555), for the caller to wait and try again; ConfigError when the database refuses our
    settings; UsageError for anything else (a bad query, a missing table)."""
    failure = classify(exc, retry_on=retry_on, outage_on=outage_on, classifiers=classifiers(settings))
    code = f" {failure.code}" if failure.code else ""
    text = f"{what}: {failure.error_class}{code}: {first_line(failure.message)}"
    if failure.kind in (OUTAGE, RETRYABLE):
        return DatabaseUnavailable(text)
    if failure.kind == CONFIG:
        return ConfigError(f"{text} (the database refused bulkjob's settings)")
    return UsageError(text)


class ParentConnection:
    """The connection a thread of the parent keeps (the claims' heartbeat, the write-back):
    opened on first use with every round trip bounded by `call_timeout` seconds where the
    driver can (`limit_calls`: the connection sits idle between uses, and one that a firewall
    dropped would otherwise hang the next call until TCP gives up), and dropped by the thread
    after any failure, so that the next use opens a new one."""

    def __init__(self, settings: DbSettings, *, call_timeout: float) -> None:
        self.settings = settings
        self.dialect = dialect_of(settings)
        self.call_timeout = call_timeout
        self._conn: Connection | None = None

    def get(self) -> Connection:
        """The open connection; connects when there is none."""
        if self._conn is None:
            self._conn = self.dialect.connect(self.settings, read_password(self.settings))
            self.dialect.limit_calls(self._conn, self.call_timeout)
        return self._conn

    def execute_many(self, sql: str, rows: Sequence[Binds]) -> int:
        """Run `sql` for every row and commit; the rows it changed in all (-1 if the driver
        cannot tell)."""
        conn = self.get()
        with closing(conn.cursor()) as cur:
            cur.executemany(sql, rows)
            changed = cur.rowcount
        conn.commit()
        return changed if isinstance(changed, int) else -1

    def drop(self) -> None:
        """Close the connection (it may be dead); the next `get` opens a new one."""
        conn, self._conn = self._conn, None
        close_quietly(conn)
