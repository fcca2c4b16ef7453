"""The Dialect protocol that `oracle.py`, `postgres.py` and `sqlite.py` implement, and the one that --db names.

A dialect is a module: its functions and constants are the protocol's members, and nothing else
in it is part of the contract. Modules rather than a class per database, because a dialect has
no state (a connection is the driver's object, handed back to the dialect's functions), and
because mypy checks a module passed where a Protocol is expected member by member (names,
kinds, signatures): `_load` below takes each module as a `Dialect` of its own driver's
connection type (the module's `Connection`), which is the check, with no registration and no
`self` to thread through.
`tests/test_db_dialect.py` checks the same at run time.

Callers see `Dialect[Connection]`: a connection is a DB-API Connection to them (see `_erased`).

Pure: nothing here connects; `dialect_of` imports the dialect module and so its driver.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar, cast

from ..errors import UsageError

if TYPE_CHECKING:
    from ..outcome import Failure
    from .batch import RowError
    from .url import DbSettings

#: The values of one statement's binds: by name, or by position.
Binds: TypeAlias = dict[str, Any] | list[Any] | tuple[Any, ...]
#: One statement of a transaction: SQL, and its binds by name or None.
BoundStatement: TypeAlias = tuple[str, dict[str, Any] | None]


class Cursor(Protocol):
    """What bulkjob uses of a DB-API 2 cursor (python-oracledb, psycopg and sqlite3 have it)."""

    arraysize: int

    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Sequence[Any] | None: ...

    def execute(self, sql: str, params: Binds = ..., /) -> object: ...

    def executemany(self, sql: str, rows: Iterable[Binds], /) -> object: ...

    def fetchone(self) -> Any: ...

    def fetchmany(self, size: int = ..., /) -> Sequence[Any]: ...

    def fetchall(self) -> Sequence[Any]: ...

    def close(self) -> None: ...


class Connection(Protocol):
    """What bulkjob uses of a DB-API 2 connection outside the dialect that made it."""

    def cursor(self) -> Cursor: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...


#: A dialect's own connection type (oracledb.Connection, psycopg.Connection, sqlite3.Connection).
C = TypeVar("C", bound=Connection)


class Dialect(Protocol[C]):
    """What a database module provides, `C` being its driver's connection type."""

    #: How the driver writes a named bind: "named" (`:name`) or "pyformat" (`%(name)s`).
    PARAMSTYLE: str
    #: The database's current time, in SQL.
    NOW: str
    #: What the preflight runs to see that a session works.
    TRIVIAL_QUERY: str
    #: The database's clock for a work table's claims, and a claim's expiry: that clock plus a
    #: `ttl` bind in seconds (job.db.claim).
    CLAIM_CLOCK: str
    CLAIM_EXPIRY: str

    def check_settings(self, settings: DbSettings) -> None:
        """The URL as the driver reads it, before any connect; UsageError if it cannot be used."""

    def connect(self, settings: DbSettings, password: str | None) -> C:
        """A new session (not autocommit) with --statement-timeout and --session-sql applied and
        committed. Raises the driver's error, ConnectTimeout past --connect-timeout, or
        Permanent naming a --session-sql statement the database refused."""

    def usable(self, conn: C) -> bool:
        """False when the driver already knows the session is dead (no round trip)."""

    def uncommitted(self, conn: C) -> bool:
        """Whether the session holds changes that are neither committed nor rolled back."""

    def run_transaction(self, conn: C, statements: Sequence[BoundStatement]) -> int:
        """Run `statements` in order as one transaction and commit it, in as few round trips as
        the driver allows; returns the rows they affected. Raises the failing statement's
        error with nothing committed; the caller rolls back."""

    def classify(self, exc: BaseException) -> Failure | None:
        """A Failure for the driver's errors; None for an exception it does not know."""

    def executemany(self, conn: C, sql: str, rows: Iterable[Binds], *, batch_size: int) -> list[RowError]:
        """Run `sql` for every row, in batches; returns the rows refused for their data. The
        other rows stay applied in the open transaction; any other error is raised."""

    def items_cursor(self, conn: C) -> Cursor:
        """A cursor that fetches large text as str (a payload in a LOB, one round trip per row
        otherwise)."""

    def limit_calls(self, conn: C, seconds: float) -> None:
        """Bound every round trip on `conn` client-side, where the driver can."""

    def claim_sql(self, table: str, where: str) -> tuple[str, ...]:
        """The statements that claim the rows of `table` matching `where` (see `claim`)."""

    def claim(self, conn: C, statements: tuple[str, ...], *, runner: str, ttl: float,
              limit: int) -> list[tuple[Any, ...]]:
        """Claim up to `limit` rows with the statements of `claim_sql` for `runner` until the
        database's clock plus `ttl`, and commit; returns (work_id, payload, attempts) rows,
        payloads read as text."""

    def first_row_sql(self, table: str, where: str) -> str:
        """A query that returns one row when any row of `table` matches `where`, else none."""


def dialect_of(settings: DbSettings) -> Dialect[Connection]:
    """The dialect module that --db names (`job.db.oracle`, `.postgres`, `.sqlite`); imports its
    driver. UsageError when the driver is not installed."""
    try:
        return _load(settings.dialect)
    except ImportError as e:
        extra = " (pip install 'bulkjob[postgres]')" if settings.dialect == "postgres" else ""
        raise UsageError(f"--db {settings.dialect}: driver not installed: {e}{extra}") from None


def _load(name: str) -> Dialect[Connection]:
    # Each module is taken as a Dialect of its own connection type: here mypy checks it against
    # the protocol, member by member.
    if name == "oracle":
        from . import oracle

        oracle_dialect: Dialect[oracle.Connection] = oracle
        return _erased(oracle_dialect)
    if name == "postgres":
        from . import postgres

        postgres_dialect: Dialect[postgres.Connection] = postgres
        return _erased(postgres_dialect)
    if name == "sqlite":
        from . import sqlite

        sqlite_dialect: Dialect[sqlite.Connection] = sqlite
        return _erased(sqlite_dialect)
    raise UsageError(f"--db {name}: no such database")


def _erased(dialect: Dialect[C]) -> Dialect[Connection]:
    """A dialect as its callers see it, its connections DB-API Connections. Sound because a
    dialect is only ever handed back the connections that its own `connect` made."""
    return cast("Dialect[Connection]", dialect)


def bind_marker(name: str, paramstyle: str) -> str:
    """How a named bind is written for a driver: `:name` (oracledb, sqlite3) or `%(name)s`."""
    return f"%({name})s" if paramstyle == "pyformat" else f":{name}"


def milliseconds(seconds: float) -> int:
    """A timeout in whole milliseconds, at least 1 (0 would mean none to the database)."""
    return max(1, round(seconds * 1000))


def claimed_binds(rows: Iterable[tuple[Any, ...]], *, runner: str, ttl: float) -> list[dict[str, Any]]:
    """The binds of the UPDATE that makes the rows a claim read this runner's, for the dialects
    whose claim reads first and then updates by id (Oracle's, SQLite's)."""
    return [{"runner": runner, "ttl": ttl, "work_id": row[0]} for row in rows]
