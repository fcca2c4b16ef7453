"""Oracle through python-oracledb in thin mode (no Oracle Client libraries): the only module
that imports oracledb.

Error classification follows what thin mode really raises: dead sessions come as DPY-4011
with the ORA number kept in `.code`, connection failures as DPY-6000/6001/6005, call timeouts
as DPY-4024; an unresolvable host is a `socket.gaierror` from the standard library.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

import oracledb

from ..outcome import PERMANENT, RETRYABLE, Failure
from . import DbSettings, RowError, batches, call_with_timeout, prepare_session

PARAMSTYLE = "named"
SAVEPOINT = "SAVEPOINT {name}"
ROLLBACK_TO = "ROLLBACK TO SAVEPOINT {name}"
#: Oracle has no RELEASE SAVEPOINT: savepoints live until the transaction ends.
RELEASE = None
#: What the preflight runs to see that a session works.
TRIVIAL_QUERY = "SELECT 1 FROM DUAL"
NOW = "SYSTIMESTAMP"

#: The session is gone or was never made: reconnect, then retry. Thin mode raises most of
#: these as DPY codes; the ORA numbers are what a server (or thick mode) sends as they are.
RECONNECT = frozenset({
    "DPY-1001",  # not connected
    "DPY-4005",  # timed out waiting for a pooled connection
    "DPY-4011",  # the database or network closed the connection (ORA-03113, 03135, 00028 ...)
    "DPY-4024",  # call timeout (--statement-timeout) exceeded: the round trip was abandoned
    "DPY-6000",  # the listener refused the connection
    "DPY-6001",  # the service is not registered with the listener
    "DPY-6005",  # cannot connect (no listener, reset, TLS ...)
    "ORA-00028", "ORA-01012", "ORA-01033", "ORA-01034", "ORA-01089", "ORA-01092", "ORA-02396",
    "ORA-03113", "ORA-03114", "ORA-03135", "ORA-12170", "ORA-12514", "ORA-12537", "ORA-12541",
    "ORA-12570", "ORA-12571", "ORA-25408",
})
#: Worth retrying on the same session after a rollback (to the step's savepoint).
SAME_SESSION = frozenset({
    "ORA-00051",  # timeout waiting for a resource
    "ORA-00054",  # resource busy and acquire with NOWAIT specified or timeout expired
    "ORA-00060",  # deadlock detected: the statement was rolled back, the transaction was not
    "ORA-04021",  # timeout waiting to lock an object
    "ORA-08177",  # can't serialize access for this transaction
    "ORA-30006",  # resource busy; acquire with WAIT timeout expired
})
#: Retryable, but only with a new transaction: the serializable snapshot is the transaction's.
RESTART_TRANSACTION = frozenset({"ORA-08177"})

_EAI_NAMES = {getattr(socket, n): n for n in dir(socket) if n.startswith("EAI_")}


def dsn(settings: DbSettings) -> str:
    """Easy Connect string `host:port/service_name[?params]` for oracledb."""
    host = settings.host or ""
    if ":" in host:
        host = f"[{host}]"
    query = "&".join(f"{k}={v}" for k, v in settings.params)
    return f"{host}:{settings.port}/{settings.database}" + (f"?{query}" if query else "")


def call_timeout_ms(settings: DbSettings) -> int:
    """`Connection.call_timeout` (milliseconds; 0 is none) from --statement-timeout (seconds)."""
    if not settings.statement_timeout:
        return 0
    return max(1, round(settings.statement_timeout * 1000))


def connect(settings: DbSettings, password: str | None):
    """A new thin-mode connection with --statement-timeout and --session-sql applied."""
    def login():
        return oracledb.connect(user=settings.user, password=password, dsn=dsn(settings),
                                tcp_connect_timeout=settings.connect_timeout)

    conn = call_with_timeout(login, settings.connect_timeout,
                             f"connecting to Oracle at {settings.host}:{settings.port}")
    conn.call_timeout = call_timeout_ms(settings)

    def execute(sql: str) -> None:
        with conn.cursor() as cur:
            cur.execute(sql)

    prepare_session(conn, settings.session_sql, execute=execute, driver_error=oracledb.Error,
                    classify=classify)
    return conn


def usable(conn) -> bool:
    """False when the driver already knows the session is dead (no round trip)."""
    return conn.is_healthy()


def uncommitted(conn) -> bool:
    """Oracle opens a transaction with the first DML statement, not with a query."""
    return conn.transaction_in_progress


def begin(conn) -> None:
    """Oracle starts a transaction with the first DML statement: nothing to do."""


def classify(exc: BaseException) -> Failure | None:
    """A Failure for oracledb errors and unresolvable hosts; None for anything else.

    `isrecoverable` is not used: it says whether the transaction can be recovered, not
    whether trying again makes sense.
    """
    if isinstance(exc, socket.gaierror):
        return Failure(RETRYABLE, "gaierror", f"cannot resolve the database host: {exc}",
                       code=_EAI_NAMES.get(exc.errno, "EAI"), reconnect=True)
    if not isinstance(exc, oracledb.Error):
        return None
    error = exc.args[0] if exc.args else None
    full_code = str(getattr(error, "full_code", "") or "")
    number = int(getattr(error, "code", 0) or 0)
    ora = f"ORA-{number:05d}" if number else None
    code = full_code or ora
    if full_code.startswith("DPY-") and ora:
        code = f"{full_code}/{ora}"
    name = type(exc).__name__
    message = str(exc)
    if full_code in RECONNECT or ora in RECONNECT:
        return Failure(RETRYABLE, name, message, code=code, reconnect=True)
    if full_code in SAME_SESSION:
        return Failure(RETRYABLE, name, message, code=code)
    return Failure(PERMANENT, name, message, code=code)


def executemany(conn, sql: str, rows: Iterable[Any], *, batch_size: int) -> list[RowError]:
    """Batches with `batcherrors=True`: Oracle applies the good rows of a batch and reports the
    bad ones; the transaction stays open for the caller to commit or roll back."""
    errors: list[RowError] = []
    with conn.cursor() as cur:
        for start, batch in batches(rows, batch_size):
            cur.executemany(sql, batch, batcherrors=True)
            for error in cur.getbatcherrors():
                errors.append(RowError(start + error.offset, error.full_code, error.message))
    return errors
