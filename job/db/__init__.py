"""Databases: settings from `--db`, the worker's connection, error classification, batch DML.

The dialect modules own the drivers: only `oracle` imports oracledb, only `postgres` imports
psycopg, only `sqlite` imports sqlite3. Nothing here connects at import. The parent connects
for the preflight and to read items from the database; workers open their own connection
after they start.

Each dialect module provides the same names: PARAMSTYLE, NOW and TRIVIAL_QUERY;
`check_settings(settings)` (the driver's reading of the URL, UsageError if it cannot),
`connect(settings, password)`, `usable(conn)`, `uncommitted(conn)`,
`run_transaction(conn, statements)` (statements as one transaction, committed, in as few round
trips as the driver allows), `classify(exc)`, `executemany(conn, sql, rows, batch_size=)`,
`items_cursor(conn)` (a cursor that fetches large text as str) and `limit_calls(conn, seconds)`
(a client-side bound on each round trip, where the driver has one). For a work table's claims
(job.db.claim, job.db.queue): CLAIM_CLOCK and CLAIM_EXPIRY (the database's time, and that plus a
`ttl` bind), `claim_sql(table, where)`, `claim(conn, statements, runner=, ttl=, limit=)` and
`first_row_sql(table, where)`.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ..errors import EXIT_UNAVAILABLE, BulkjobError, HandlerError, Permanent, Unreachable, UsageError
from ..outcome import CONFIG, DATABASE, INVALID, OUTAGE, PERMANENT, Failure

#: Default seconds to wait for a connection, TCP connect and login together: a listener that
#: accepts and never answers must cost a worker this long, not forever.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Default rows per executemany round trip: large enough to amortise the round trip, small
#: enough that one batch's bind buffers stay a few megabytes.
DEFAULT_BATCH_SIZE = 1000
#: Where the password comes from when --db-password-file is not given.
PASSWORD_ENV = "BULKJOB_DB_PASSWORD"

COMMIT_ITEM = "item"
COMMIT_STEP = "step"

#: URL scheme -> dialect module name.
_SCHEMES = {"oracle": "oracle", "oracle+oracledb": "oracle", "oracle+tcps": "oracle",
            "oracle+oracledb+tcps": "oracle", "postgresql": "postgres", "postgres": "postgres",
            "sqlite": "sqlite"}
#: Schemes that connect over TLS (Oracle's `tcps` protocol; PostgreSQL says it with ?sslmode=).
_TLS_SCHEMES = frozenset({"oracle+tcps", "oracle+oracledb+tcps"})
_DEFAULT_PORTS = {"oracle": 1521, "postgres": 5432}
#: A query parameter whose name holds one of these (lower case, without `_`, `-` and `.`) is a
#: password: libpq's `password` and `sslpassword`, Oracle's `wallet_password`, JDBC's
#: `javax.net.ssl.keyStorePassword`, and the short forms `passwd` and `pwd`.
_PASSWORD_WORDS = ("password", "passwd", "pwd")


class ConnectTimeout(BulkjobError, TimeoutError):
    """Raised when connecting to the database took longer than --connect-timeout."""

    exit_code = EXIT_UNAVAILABLE


class DatabaseUnavailable(Unreachable):
    """Raised in the parent when the database could not be reached (preflight, reading items),
    or its own query met a passing error (a lock, --retry-on): the caller may wait and retry."""


class InvalidPayload(HandlerError):
    """Raised before any SQL runs when an item's payload cannot fill the SQL (a missing bind, an
    identifier outside its declaration): the item fails as `invalid`, at once."""


@dataclass(frozen=True, slots=True)
class DbSettings:
    """Where and how to connect; the password is not here (workers read it themselves)."""

    dialect: str
    url: str
    user: str | None = None
    host: str | None = None
    port: int | None = None
    #: Oracle service name, PostgreSQL database name, or SQLite file path.
    database: str = ""
    #: Extra driver parameters from the URL's query string.
    params: tuple[tuple[str, str], ...] = ()
    password_file: str | None = None
    #: Connect over TLS (`oracle+tcps://`).
    tls: bool = False
    session_sql: tuple[str, ...] = ()
    statement_timeout: float | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    commit: str = COMMIT_ITEM


@dataclass(frozen=True, slots=True)
class RowError:
    """One row of a batch that the database refused: its offset in the rows given, and why."""

    offset: int
    code: str | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "code": self.code, "message": self.message}


def parse_db_url(url: str, **options: Any) -> DbSettings:
    """DbSettings from `--db URL` plus the other database options (keyword arguments).

    `oracle://user@host:port/service_name` (`oracle+tcps://` for TLS),
    `postgresql://user@host:port/dbname` and `sqlite:///relative/path` or
    `sqlite:////absolute/path`. A password in the URL, in its authority part or as a query
    parameter (`?password=`, `?sslpassword=`, `?wallet_password=` ...), is refused without
    being echoed: it would show in `ps`, in pod specs and in logs.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise UsageError(f"--db {_safe(url)}: expected oracle://, oracle+tcps://, postgresql:// or "
                         "sqlite:/// URL")
    dialect = _SCHEMES[scheme]
    try:
        has_password = parts.password is not None
    except ValueError:  # an unparseable authority: say nothing of what it holds
        raise UsageError("--db: the URL's user@host:port part cannot be read") from None
    if has_password:
        raise UsageError("--db: put the password in BULKJOB_DB_PASSWORD or --db-password-file, "
                         "never in the URL")
    params = tuple(parse_qsl(parts.query, keep_blank_values=True))
    for name, _ in params:
        if is_password_parameter(name):
            raise UsageError(f"--db: the query parameter {name!r} is a password; put it in "
                             "BULKJOB_DB_PASSWORD or --db-password-file (a wallet's in "
                             "BULKJOB_DB_WALLET_PASSWORD), never in the URL")
    if dialect == "sqlite":
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if parts.netloc or not path or path == ":memory:":
            raise UsageError(f"--db {url}: expected sqlite:///PATH (a file that every worker opens)")
        return DbSettings(dialect, url, database=path, params=params, **options)
    try:
        port = parts.port or _DEFAULT_PORTS[dialect]
    except ValueError:
        raise UsageError(f"--db {_safe(url)}: bad port") from None
    database = unquote(parts.path.lstrip("/"))
    if not parts.hostname and not any(k == "host" for k, _ in params):
        raise UsageError(f"--db {_safe(url)}: no host")
    if not database:
        what = "service name" if dialect == "oracle" else "database name"
        raise UsageError(f"--db {_safe(url)}: no {what} after the host")
    return DbSettings(dialect, url, user=unquote(parts.username) if parts.username else None,
                      host=parts.hostname, port=port, database=database, params=params,
                      tls=scheme in _TLS_SCHEMES, **options)


def is_password_parameter(name: str) -> bool:
    """Whether a URL query parameter's name says that its value is a password."""
    folded = name.lower().replace("_", "").replace("-", "").replace(".", "")
    return any(word in folded for word in _PASSWORD_WORDS)


def _safe(url: str) -> str:
    """The URL for a message: nothing between `//` and `@` (a password may be there), and no
    query string (a password-like parameter may be there)."""
    head, sep, rest = url.partition("://")
    rest = rest.split("?", 1)[0]
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{head}://***@{rest.split('@', 1)[1]}"
    return f"{head}{sep}{rest}"


def plain_sql(sql: str, dialect: str) -> str:
    """SQL given on the command line (--items-sql, --session-sql) as the driver takes it: a
    trailing `;` (and a SQL*Plus `/` line) pasted from a script is dropped, since Oracle refuses
    it (ORA-00933, ORA-03048), except at the end of an Oracle PL/SQL block, which needs it."""
    text = sql.strip()
    lines = text.splitlines()
    if len(lines) > 1 and lines[-1].strip() == "/":
        text = "\n".join(lines[:-1]).rstrip()
    if dialect == "oracle" and _PLSQL_BLOCK.match(text):
        return text
    while text.endswith(";"):
        text = text[:-1].rstrip()
    return text


#: An Oracle PL/SQL block, whose last `;` belongs to it: DECLARE, BEGIN or a <<label>> first.
_PLSQL_BLOCK = re.compile(r"\s*(?:<<\s*\w+\s*>>\s*)*(?:DECLARE|BEGIN)\b", re.IGNORECASE)


def db_settings(url: str | None, *, password_file: str | None = None, session_sql: Iterable[str] = (),
                statement_timeout: float | None = None, connect_timeout: float | None = None,
                commit: str = COMMIT_ITEM) -> DbSettings | None:
    """The CLI's database options as DbSettings, or None without --db."""
    session_sql = tuple(sql for sql in session_sql if sql.strip())
    if url is None:
        if password_file or session_sql or statement_timeout:
            raise UsageError("--db-password-file, --session-sql and --statement-timeout need --db")
        return None
    if password_file is not None and not os.path.isfile(password_file):
        raise UsageError(f"--db-password-file {password_file}: no such file")
    settings = parse_db_url(url, password_file=password_file, session_sql=session_sql,
                            statement_timeout=statement_timeout,
                            connect_timeout=connect_timeout or DEFAULT_CONNECT_TIMEOUT, commit=commit)
    settings = replace(settings, session_sql=tuple(plain_sql(sql, settings.dialect) for sql in session_sql))
    # The driver's own reading of the connection parameters: a typo is a usage error now, not
    # a failed connect in every worker.
    dialect_of(settings).check_settings(settings)
    return settings


def read_password(settings: DbSettings, environ: dict[str, str] | None = None) -> str | None:
    """The password: BULKJOB_DB_PASSWORD, else the first line of --db-password-file, else None."""
    env = os.environ if environ is None else environ
    if env.get(PASSWORD_ENV):
        return env[PASSWORD_ENV]
    if settings.password_file:
        try:
            with open(settings.password_file, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        except OSError as e:
            raise UsageError(f"--db-password-file: cannot read it: {e.strerror}") from None
    return None


def dialect_of(settings: DbSettings) -> ModuleType:
    """The dialect module (`job.db.oracle`, `.postgres`, `.sqlite`); imports its driver."""
    try:
        return importlib.import_module(f"{__name__}.{settings.dialect}")
    except ImportError as e:
        extra = " (pip install 'bulkjob[postgres]')" if settings.dialect == "postgres" else ""
        raise UsageError(f"--db {settings.dialect}: driver not installed: {e}{extra}") from None


def classify_common(exc: BaseException) -> Failure | None:
    """Errors of ours, whatever the dialect: a connect that outlasted --connect-timeout is an
    outage; a payload that cannot fill the SQL is an invalid item."""
    if isinstance(exc, ConnectTimeout):
        return Failure(OUTAGE, "ConnectTimeout", str(exc), code="CONNECT-TIMEOUT", reconnect=True,
                       system=DATABASE, connecting=True)
    if isinstance(exc, InvalidPayload):
        return Failure(INVALID, type(exc).__name__, str(exc), code=exc.code)
    return None


def classifiers(settings: DbSettings) -> tuple[Callable[[BaseException], Failure | None], ...]:
    """The classifiers `retry.classify` consults before its generic rules."""
    return (classify_common, dialect_of(settings).classify)


def preflight(settings: DbSettings) -> None:
    """What the parent checks before the first item: connect as a worker does (--session-sql and
    the statement timeout applied), run the dialect's TRIVIAL_QUERY, roll back, close.

    Raises what the driver raised, or ConnectTimeout when the connect or the query takes longer
    than --connect-timeout; `preflight_failure` turns that into a Failure.
    """
    dialect = dialect_of(settings)
    conn = dialect.connect(settings, read_password(settings))
    try:
        def trivial_query() -> None:
            cur = conn.cursor()
            try:
                cur.execute(dialect.TRIVIAL_QUERY)
                cur.fetchall()
            finally:
                cur.close()
            conn.rollback()

        call_with_timeout(trivial_query, settings.connect_timeout, f"{dialect.TRIVIAL_QUERY} (preflight)")
    finally:
        close_quietly(conn)


def preflight_failure(settings: DbSettings, exc: BaseException, *, retry_on: Iterable[str] = (),
                      outage_on: Iterable[str] = ()) -> Failure:
    """The Failure for an exception `preflight(settings)` raised, with `connecting=True`.

    `kind` is OUTAGE (the database cannot be reached: wait and try again), or CONFIG (it refused
    our settings: a wrong password, a missing database, a bad --session-sql: stop with exit 2).
    A trivial query cannot fail for an item's reason, so a permanent error is CONFIG too; a
    passing one (a lock, --retry-on) stays RETRYABLE: try again as for an outage.
    """
    from ..retry import classify

    failure = classify(exc, retry_on=retry_on, outage_on=outage_on, classifiers=classifiers(settings))
    kind = CONFIG if failure.kind in (PERMANENT, INVALID) else failure.kind
    return replace(failure, kind=kind, system=DATABASE, connecting=True)


class Database:
    """A worker's database: one connection, opened on first use and reused for every item."""

    def __init__(self, settings: DbSettings) -> None:
        self.settings = settings
        self.dialect = dialect_of(settings)
        self._conn = None
        #: Whether the last call of connection() failed while opening a session (in the
        #: dialect's connect: TCP, TLS, login, --session-sql), not in the middle of an item.
        #: False again once connection() returns; a worker may clear it before an attempt.
        self.connect_failed = False

    def connection(self):
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

    def executemany(self, sql: str, rows: Iterable[Any], *,
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


def batches(rows: Iterable[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    """(offset of the first row, rows) for consecutive batches of at most `size` rows."""
    batch: list[Any] = []
    start = 0
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield start, batch
            start += size
            batch = []
    if batch:
        yield start, batch


def close_quietly(conn) -> None:
    """Close a connection that may be dead: a dead session may refuse even to close, and it
    is gone either way."""
    if conn is not None:
        try:
            conn.close()
        except Exception:
            pass


def prepare_session(conn, statements, *, execute, driver_error, classify) -> None:
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


def executemany_with_savepoints(conn, sql: str, rows: Iterable[Any], *, batch_size: int,
                                row_error: Callable[[BaseException], tuple[str | None, str] | None],
                                run_batch: Callable[[Any, str, list[Any]], None] | None = None,
                                ) -> list[RowError]:
    """Batch DML where the driver has no batch errors: each batch runs under a savepoint; a
    batch with a bad row is rolled back and replayed row by row, each row under its own
    savepoint, so the good rows are applied and the bad ones reported. `row_error(exc)` gives
    (code, message) when an error is the row's fault, else None and the error is raised.
    `run_batch(cursor, sql, batch)` sends a whole batch (default: the cursor's executemany)."""
    errors: list[RowError] = []
    cur = conn.cursor()
    try:
        for start, batch in batches(rows, batch_size):
            cur.execute("SAVEPOINT bulkjob_batch")
            try:
                if run_batch is None:
                    cur.executemany(sql, batch)
                else:
                    run_batch(cur, sql, batch)
            except Exception as exc:
                if row_error(exc) is None:
                    raise
                cur.execute("ROLLBACK TO SAVEPOINT bulkjob_batch")
                for i, row in enumerate(batch):
                    cur.execute("SAVEPOINT bulkjob_row")
                    try:
                        cur.execute(sql, row)
                    except Exception as row_exc:
                        found = row_error(row_exc)
                        if found is None:
                            raise
                        cur.execute("ROLLBACK TO SAVEPOINT bulkjob_row")
                        errors.append(RowError(start + i, *found))
                    else:
                        cur.execute("RELEASE SAVEPOINT bulkjob_row")
            cur.execute("RELEASE SAVEPOINT bulkjob_batch")
    finally:
        cur.close()
    return errors


class _Alarm(BaseException):
    """Raised by the SIGALRM handler of call_with_timeout: not an Exception, and not a
    TimeoutError, which a driver may take for its own socket timeout and wait on."""


def call_with_timeout(fn: Callable[[], Any], seconds: float, what: str) -> Any:
    """Call `fn()` and raise ConnectTimeout if it has not returned within `seconds`.

    In a process's main thread (a worker) a SIGALRM interrupts the blocked call, so nothing is
    left behind. Elsewhere the call runs in a daemon thread that is abandoned on timeout; it
    ends when the server finally closes the socket.
    """
    message = f"{what}: no answer within {seconds:g}s (--connect-timeout)"
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        fired = False

        def on_alarm(signum, frame):
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
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=target, name="bulkjob-connect", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise ConnectTimeout(message)
    if "error" in box:
        raise box["error"]
    return box["value"]


def bind_marker(name: str, paramstyle: str) -> str:
    """How a named bind is written for a driver: `:name` (oracledb, sqlite3) or `%(name)s`."""
    return f"%({name})s" if paramstyle == "pyformat" else f":{name}"
