"""Oracle through python-oracledb in thin mode (no Oracle Client libraries): the only module
that imports oracledb.

Error classification follows what thin mode really raises: dead sessions come as DPY-4011
with the ORA number kept in `.code`, connection failures as DPY-6000/6001/6005 (whose message
and cause carry the reason, such as DPY-3001 for native network encryption), call timeouts as
DPY-4024; an unresolvable host is a `socket.gaierror` from the standard library.

Thin mode's limits that matter here: no native network encryption (use TLS, `oracle+tcps://`),
no Transparent Application Failover and no Application Continuity (a session lost mid-item is
an outage: the item runs again on a new session).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import oracledb

from ..errors import UsageError
from ..outcome import CONFIG, OUTAGE, Failure
from .batch import RowError, batches
from .dialect import claimed_binds, milliseconds
from .errors import environment, first_line
from .oracle_codes import DATA_ERRORS, judge, ora_code, shown_code
from .session import call_with_timeout, prepare_session, run_statement
from .transaction import commit_with_last

if TYPE_CHECKING:
    from .dialect import Binds, BoundStatement
    from .url import DbSettings

#: The connections this dialect makes and is handed back (see job.db.dialect).
Connection: TypeAlias = oracledb.Connection

PARAMSTYLE = "named"
NOW = "SYSTIMESTAMP"
#: What the preflight runs to see that a session works.
TRIVIAL_QUERY = "SELECT 1 FROM DUAL"
#: Minutes an idle connection waits before thin mode's TCP keepalive probes start
#: (`expire_time`): a firewall or load balancer that drops idle connections (an AWS NLB after
#: 350 s) is then noticed in about two minutes, not when TCP gives up after fifteen. `?expire_time=N`
#: in the URL overrides it (0 turns it off).
DEFAULT_EXPIRE_TIME = 1
#: Where the password of an encrypted PEM wallet (ewallet.pem, for mutual TLS) comes from: never
#: the URL.
WALLET_PASSWORD_ENV = "BULKJOB_DB_WALLET_PASSWORD"

#: Statements that accept `batcherrors=True` (DPY-2040 for anything else, a PL/SQL block too).
_BATCH_ERROR_STATEMENTS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE"})
_FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*\(*\s*([A-Za-z]+)", re.S)
_CODE_IN_TEXT = re.compile(r"\b(?:DPY|ORA)-\d{4,5}\b")
#: An Easy Connect parameter value that needs no double quotes.
_PLAIN_VALUE = re.compile(r"[\w./:@+-]*")
_EAI_NAMES = {getattr(socket, n): n for n in dir(socket) if n.startswith("EAI_")}


def dsn(settings: DbSettings) -> str:
    """Easy Connect string `[tcps://]host:port/service_name[?params]` for oracledb."""
    host = settings.host or ""
    if ":" in host:
        host = f"[{host}]"
    query = "&".join(f"{k}={_ezconnect_value(v)}" for k, v in settings.params)
    protocol = "tcps://" if settings.tls else ""
    return f"{protocol}{host}:{settings.port}/{settings.database}" + (f"?{query}" if query else "")


def _ezconnect_value(value: str) -> str:
    """A parameter value as Easy Connect takes it: double-quoted when it holds `=`, `,`, spaces
    and the like (a certificate DN)."""
    if _PLAIN_VALUE.fullmatch(value) or (len(value) > 1 and value[0] == value[-1] == '"'):
        return value
    return f'"{value}"'


def connect_params(settings: DbSettings) -> oracledb.ConnectParams:
    """The ConnectParams every connection is made with: the DSN (TLS, wallet and DN settings
    from the URL's query string), `expire_time` (DEFAULT_EXPIRE_TIME unless the URL gives one)
    and `tcp_connect_timeout` from --connect-timeout."""
    params = oracledb.ConnectParams(expire_time=DEFAULT_EXPIRE_TIME, tcp_connect_timeout=settings.connect_timeout)
    # Parameters in the connect string override the ones set above.
    params.parse_connect_string(dsn(settings))
    return params


def check_settings(settings: DbSettings, environ: Mapping[str, str] | None = None) -> None:
    """The URL as the driver reads it, and the wallet it names; UsageError for what cannot be
    used, before any connect."""
    try:
        params = connect_params(settings)
    except oracledb.Error as e:
        raise UsageError(f"--db: {first_line(str(e))}") from None
    wallet = params.wallet_location
    if wallet and wallet.upper() != "SYSTEM":
        _check_wallet(os.path.join(wallet, "ewallet.pem"),
                      (os.environ if environ is None else environ).get(WALLET_PASSWORD_ENV))


def _check_wallet(path: str, password: str | None) -> None:
    """A PEM wallet thin mode can use: there, and its private key (mutual TLS) readable with the
    password given. Without this, a wrong password shows only as the server closing the TLS
    handshake (an outage), and a missing one makes OpenSSL prompt on the worker's terminal."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            has_key = "PRIVATE KEY" in f.read()
    except OSError as e:
        raise UsageError(f"--db: wallet_location: cannot read {path}: {e.strerror} (thin mode reads the PEM "
                         "wallet ewallet.pem; leave wallet_location out to use the system's CA "
                         "certificates)") from None
    if not has_key:
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(path, password=lambda: password or "")
    except (ssl.SSLError, OSError):
        given = "set" if password else "not set"
        raise UsageError(f"--db: the private key in {path} cannot be loaded with {WALLET_PASSWORD_ENV} "
                         f"({given}): a wrong password, or a key that does not match its certificate") from None


def call_timeout_ms(settings: DbSettings) -> int:
    """`Connection.call_timeout` (milliseconds; 0 is none) from --statement-timeout (seconds)."""
    return milliseconds(settings.statement_timeout) if settings.statement_timeout else 0


def connect(settings: DbSettings, password: str | None,
            environ: Mapping[str, str] | None = None) -> oracledb.Connection:
    """A new thin-mode connection with --statement-timeout and --session-sql applied."""
    params = connect_params(settings)
    wallet_password = (os.environ if environ is None else environ).get(WALLET_PASSWORD_ENV)
    if wallet_password:
        params.set(wallet_password=wallet_password)

    def login() -> oracledb.Connection:
        return oracledb.connect(params=params, user=settings.user, password=password)

    conn = call_with_timeout(login, settings.connect_timeout,
                             f"connecting to Oracle at {settings.host}:{settings.port}")
    conn.call_timeout = call_timeout_ms(settings)

    def execute(sql: str) -> None:
        with conn.cursor() as cur:
            cur.execute(sql)

    prepare_session(conn, settings.session_sql, execute=execute, driver_error=oracledb.Error,
                    classify=classify)
    return conn


def usable(conn: oracledb.Connection) -> bool:
    """False when the driver already knows the session is dead (no round trip)."""
    return conn.is_healthy()


def uncommitted(conn: oracledb.Connection) -> bool:
    """Oracle opens a transaction with the first DML statement (or SELECT FOR UPDATE), not with
    a query."""
    return conn.transaction_in_progress


def run_transaction(conn: oracledb.Connection, statements: Sequence[BoundStatement]) -> int:
    """Run `statements` ((sql, binds or None), in order) as one transaction and commit it;
    returns the rows they affected. The commit travels with the last statement's round trip
    (`autocommit` on for that one call: python-oracledb sends the commit as a flag of the
    execute, and the server commits only if the statement succeeds), so a transaction of N
    statements costs N round trips, not N + 1. Raises the failing statement's error with
    nothing committed; the caller rolls back. See job.db.transaction."""
    with conn.cursor() as cur:
        return commit_with_last(_Session(conn, cur), statements)


class _Session:
    """A job.db.transaction.Session on a python-oracledb connection and one of its cursors."""

    def __init__(self, conn: oracledb.Connection, cursor: oracledb.Cursor) -> None:
        self.conn = conn
        self.cursor = cursor

    def execute(self, sql: str, params: dict[str, Any] | None, *, commit: bool) -> int:
        if commit:
            self.conn.autocommit = True
        try:
            run_statement(self.cursor, sql, params)
        finally:
            if commit:
                try:
                    self.conn.autocommit = False
                except oracledb.Error:
                    pass  # a closed session: it is dropped, and its mode with it
        return max(self.cursor.rowcount or 0, 0)

    def in_transaction(self) -> bool:
        return bool(self.conn.transaction_in_progress)

    def commit(self) -> None:
        self.conn.commit()


def limit_calls(conn: oracledb.Connection, seconds: float) -> None:
    """Bound every round trip on `conn` (DPY-4024 past it): a call on a connection that a
    firewall dropped would otherwise hang until TCP gives up."""
    conn.call_timeout = milliseconds(seconds)


def items_cursor(conn: oracledb.Connection) -> oracledb.Cursor:
    """A cursor that fetches CLOBs as str and BLOBs as bytes (`fetch_lobs=False`): a payload
    in a CLOB would otherwise cost a round trip per row to read."""
    cur = conn.cursor()

    def as_value(cursor: oracledb.Cursor, metadata: oracledb.FetchInfo) -> oracledb.Var | None:
        if metadata.type_code in (oracledb.DB_TYPE_CLOB, oracledb.DB_TYPE_NCLOB):
            return cursor.var(oracledb.DB_TYPE_LONG, arraysize=cursor.arraysize)
        if metadata.type_code is oracledb.DB_TYPE_BLOB:
            return cursor.var(oracledb.DB_TYPE_LONG_RAW, arraysize=cursor.arraysize)
        return None

    cur.outputtypehandler = as_value
    return cur


def classify(exc: BaseException) -> Failure | None:
    """A Failure for oracledb errors and unresolvable hosts; None for anything else.

    `isrecoverable` is not used: it says whether the transaction can be recovered, not
    whether trying again makes sense.
    """
    if isinstance(exc, socket.gaierror):
        return environment(OUTAGE, "gaierror", f"cannot resolve the database host: {exc}",
                           _EAI_NAMES.get(exc.errno, "EAI"))
    if not isinstance(exc, oracledb.Error):
        return None
    full_code, ora = _codes(exc)
    code = shown_code(full_code, ora)
    name = type(exc).__name__
    kind, reconnect = judge(full_code, ora, _codes_within(exc), tls_refused=_tls_refused(exc))
    if kind in (OUTAGE, CONFIG):
        return environment(kind, name, str(exc), code)
    return Failure(kind, name, str(exc), code=code, reconnect=reconnect)


def _codes(exc: BaseException) -> tuple[str, str | None]:
    """(full code such as `DPY-4011` or `ORA-00060`, `ORA-nnnnn` from `.code` or None)."""
    error = exc.args[0] if exc.args else None
    full_code = str(getattr(error, "full_code", "") or "")
    return full_code, ora_code(int(getattr(error, "code", 0) or 0))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what caused it, as the driver chains them (DPY-6005 from DPY-3001)."""
    current: BaseException | None = exc
    for _ in range(10):  # a bound, should a chain ever loop
        if current is None:
            return
        yield current
        current = current.__cause__ or current.__context__


def _codes_within(exc: BaseException) -> set[str]:
    """The driver and server codes of the errors this one carries: its causes', and those the
    driver wrote into its message (the cause's text follows the first line)."""
    found = set(_CODE_IN_TEXT.findall(str(exc)))
    for cause in _chain(exc):
        if isinstance(cause, oracledb.Error):
            found.update(c for c in _codes(cause) if c)
    return found


def _tls_refused(exc: BaseException) -> bool:
    """A TLS handshake that failed for a reason of configuration (a certificate that does not
    verify, a protocol mismatch), not because the connection was cut."""
    cut = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
    return any(isinstance(e, ssl.SSLError) and not isinstance(e, cut) for e in _chain(exc))


def is_dml(sql: str) -> bool:
    """Whether a statement is INSERT, UPDATE, DELETE or MERGE (the ones batch errors work for)."""
    m = _FIRST_WORD.match(sql)
    return m is not None and m.group(1).upper() in _BATCH_ERROR_STATEMENTS


def split_batch_errors(errors: Iterable[oracledb._Error], start: int) -> tuple[list[RowError], BaseException | None]:
    """The batch errors of a batch starting at row `start`: the data errors as RowErrors, and
    the exception to raise for the first error that is not about its row's data (a lock, a
    deadlock), or None."""
    rows: list[RowError] = []
    for error in errors:
        if int(getattr(error, "code", 0) or 0) not in DATA_ERRORS:
            exc_type = getattr(error, "exc_type", oracledb.DatabaseError)
            return rows, exc_type(error)
        rows.append(RowError(start + error.offset, error.full_code, error.message))
    return rows, None


def executemany(conn: oracledb.Connection, sql: str, rows: Iterable[Binds], *, batch_size: int) -> list[RowError]:
    """INSERT, UPDATE, DELETE and MERGE run with `batcherrors=True`: Oracle applies the good
    rows of a batch and reports the bad ones; a reported error that is not about its row's data
    is raised. Anything else (a PL/SQL block) runs without batch errors, and its first error is
    raised. The transaction stays open for the caller to commit or roll back."""
    dml = is_dml(sql)
    errors: list[RowError] = []
    with conn.cursor() as cur:
        for start, batch in batches(rows, batch_size):
            if not dml:
                cur.executemany(sql, batch)
                continue
            cur.executemany(sql, batch, batcherrors=True)
            found, other = split_batch_errors(cur.getbatcherrors(), start)
            if other is not None:
                raise other
            errors += found
    return errors


# -- the work table's claims (job.db.claim holds the statements they share) --------------------

#: The database's clock for claims, and a claim's expiry, in UTC as plain TIMESTAMPs: a
#: TIMESTAMP column compared with SYSTIMESTAMP would be converted with each session's time
#: zone, and sessions of different runners may differ.
CLAIM_CLOCK = "SYS_EXTRACT_UTC(SYSTIMESTAMP)"
CLAIM_EXPIRY = "SYS_EXTRACT_UTC(SYSTIMESTAMP) + NUMTODSINTERVAL(:ttl, 'SECOND')"


def claim_sql(table: str, where: str) -> tuple[str, str]:
    """A cursor over the rows matching `where` with FOR UPDATE SKIP LOCKED and no row limit,
    then an UPDATE by id. Oracle's SQL reference refuses a row_limiting_clause (FETCH FIRST)
    together with the for_update_clause (ORA-02014 on many versions), and a ROWNUM limit is
    applied before the lock check, so that under contention a claim would find fewer or no
    rows; with SKIP LOCKED rows are locked as the cursor fetches them, so `claim` fetches just
    the rows it wants."""
    return (f"SELECT work_id, payload, attempts FROM {table} WHERE {where} FOR UPDATE SKIP LOCKED",
            f"UPDATE {table} SET state = 'RUNNING', claimed_by = :runner, claim_expires = {CLAIM_EXPIRY}, "
            f"updated_at = {NOW} WHERE work_id = :work_id")


def first_row_sql(table: str, where: str) -> str:
    return f"SELECT 1 FROM {table} WHERE {where} AND ROWNUM = 1"


def claim(conn: oracledb.Connection, statements: tuple[str, ...], *, runner: str, ttl: float,
          limit: int) -> list[tuple[Any, ...]]:
    """Fetch up to `limit` rows of the locking cursor (prefetch and array size both `limit`, so
    that no more are locked), update them by id, commit; returns (work_id, payload, attempts)
    rows, payloads read as text."""
    select, update = statements
    cur = items_cursor(conn)
    try:
        cur.arraysize = limit
        cur.prefetchrows = limit
        cur.execute(select)
        rows = cur.fetchmany(limit)
    finally:
        # Closing the cursor keeps the locks of the rows it fetched until the commit.
        cur.close()
    if rows:
        with conn.cursor() as cur:
            cur.executemany(update, claimed_binds(rows, runner=runner, ttl=ttl))
    conn.commit()
    return rows
