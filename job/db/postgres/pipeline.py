"""One PostgreSQL transaction in one round trip, sent with libpq's own pipeline calls.

psycopg's pipeline mode (a cursor per statement, a generator polling the socket twice per
statement) cost a worker about 230 us of CPU per item for three statements on loopback, three
times the same messages sent here with libpq's calls and read back directly (about 70 us).
The messages are those of psycopg's pipeline: Parse (as a named prepared statement, when a
text and its parameter types come back a second time in a session), Bind, Execute for each
statement, BEGIN and COMMIT around them when asked, and one Sync. Parameters are adapted by
psycopg's Transformer, as psycopg's cursors do; errors are psycopg's own classes.

Part of job.db.postgres, the package that owns PostgreSQL; nothing else calls it.
"""

from __future__ import annotations

import re
import select
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors, pq
from psycopg.adapt import PyFormat, Transformer

from ..session import close_quietly

if TYPE_CHECKING:
    from psycopg.abc import Buffer

    from ..dialect import BoundStatement

#: Named prepared statements a session keeps at most (psycopg's own default is 100); a text
#: beyond them is sent unnamed, parsed by the server each time.
PREPARED_MAX = 100
#: A text is prepared when it comes back for the second time in a session: one that differs per
#: item (a `{placeholder}` filled with a table name) is not worth a name.
PREPARE_AFTER = 2
#: Texts whose uses are counted per session, at most: beyond, new texts are sent unnamed.
COUNTED_MAX = 1000

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%|%")
_BEGIN, _COMMIT = b"BEGIN", b"COMMIT"


@dataclass
class _Prepared:
    """A session's named statements: (text, parameter types) -> name, and uses so far."""

    names: dict[tuple[bytes, tuple[int, ...]], bytes] = field(default_factory=dict)
    uses: dict[tuple[bytes, tuple[int, ...]], int] = field(default_factory=dict)
    #: Names handed out so far: a name is never given twice, so a Parse that the server skipped
    #: (after an error earlier in its pipeline) cannot leave a name that clashes later.
    issued: int = 0

    def new_name(self) -> bytes:
        self.issued += 1
        return f"bulkjob_{self.issued}".encode()


#: Per psycopg connection (weakly: a closed and dropped session takes its entry with it; the
#: values hold no reference back).
_sessions: weakref.WeakKeyDictionary[Any, _Prepared] = weakref.WeakKeyDictionary()


@lru_cache(maxsize=1024)
def numbered(sql: str) -> tuple[bytes, tuple[str, ...]]:
    """A statement in psycopg's `%(name)s` style as PostgreSQL's `$1` style, and the bind name of
    each number. `%%` is a percent sign; a lone `%` is refused as psycopg refuses it."""
    names: list[str] = []

    def marker(m: re.Match[str]) -> str:
        if m.group(0) == "%%":
            return "%"
        if m.group(1) is None:
            raise psycopg.ProgrammingError(f"only '%(name)s' placeholders are allowed here: {sql[:200]!r}")
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    return _PLACEHOLDER.sub(marker, sql).encode(), tuple(names)


@dataclass(frozen=True, slots=True)
class _Message:
    """One statement ready to send: its text, its name if prepared (or to be), its parameters."""

    sql: bytes
    name: bytes | None
    #: The name is new: a Parse goes first, and the name is kept once the server answers it.
    prepare: tuple[bytes, tuple[int, ...]] | None
    params: Sequence[Buffer | None] | None
    types: tuple[int, ...]
    formats: Sequence[Any] | None


def transaction(conn: psycopg.Connection[Any], statements: Sequence[BoundStatement], *, explicit: bool) -> int:
    """Send `statements` (with BEGIN and COMMIT when `explicit`, else as one implicit
    transaction: a lone statement) and one Sync; returns the rows they affected.

    A server error is raised as psycopg raises it, after the rest of the pipeline is read: the
    server skipped everything after it, so nothing was committed, and the session is idle (an
    explicit transaction is rolled back here). A session lost on the way is closed and an
    OperationalError raised (an outage), unless COMMIT's own answer came back first: then the
    transaction is committed, the rows are returned and only the session is closed.
    """
    if conn.pgconn.transaction_status != pq.TransactionStatus.IDLE:
        # BEGIN would only warn, and a lone statement would join that transaction uncommitted.
        raise psycopg.ProgrammingError("a transaction is already open on this session")
    prepared = _sessions.get(conn)
    if prepared is None:
        prepared = _sessions[conn] = _Prepared()
    messages = _messages(conn, statements, prepared)  # adapted before anything is sent
    #: Each query sent, in order: (its key, its name) for a Parse, else None.
    sent: list[tuple[tuple[bytes, tuple[int, ...]], bytes] | None] = []
    pgconn = conn.pgconn
    try:
        pgconn.enter_pipeline_mode()
        if explicit:
            pgconn.send_query_params(_BEGIN, None)
            sent.append(None)
        for m in messages:
            if m.name is None:
                pgconn.send_query_params(m.sql, m.params, param_formats=m.formats, param_types=m.types)
                sent.append(None)
                continue
            if m.prepare is not None:
                pgconn.send_prepare(m.name, m.sql, param_types=m.types)
                sent.append((m.prepare, m.name))
            pgconn.send_query_prepared(m.name, m.params, param_formats=m.formats)
            sent.append(None)
        if explicit:
            pgconn.send_query_params(_COMMIT, None)
            sent.append(None)
        pgconn.pipeline_sync()
        _flush(pgconn)
        rows, error, committed, answered = _read(conn)
        for index in answered:
            parsed = sent[index]
            if parsed is not None:
                prepared.names[parsed[0]] = parsed[1]
        if pgconn.status == pq.ConnStatus.OK:
            pgconn.exit_pipeline_mode()
    except BaseException:
        # Sending failed (libpq's OperationalError: the session is lost), or the pipeline was
        # left half read: the session cannot be trusted any more.
        close_quietly(conn)
        raise
    if pgconn.status != pq.ConnStatus.OK:
        # Lost on the way. COMMIT's own answer came back: committed, whatever came after.
        close_quietly(conn)
        if committed:
            return rows
        raise error or _lost(conn)
    if error is None:
        return rows
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        conn.rollback()  # the explicit transaction the error aborted
    raise error


def _messages(conn: psycopg.Connection[Any], statements: Sequence[BoundStatement],
              prepared: _Prepared) -> list[_Message]:
    tx = Transformer.from_context(conn)
    out = []
    for sql, binds in statements:
        if binds is None:
            out.append(_Message(sql.encode(), None, None, None, (), None))
            continue
        text, names = numbered(sql)
        params = tx.dump_sequence([binds[n] for n in names], [PyFormat.AUTO] * len(names))
        types, formats = tuple(tx.types or ()), list(tx.formats or ())
        key = (text, types)
        name = prepared.names.get(key)
        prepare = None
        if name is None and len(prepared.names) < PREPARED_MAX:
            uses = prepared.uses.get(key, 0) + 1
            if uses >= PREPARE_AFTER and not any(m.prepare == key for m in out):
                name, prepare = prepared.new_name(), key
                prepared.uses.pop(key, None)
            elif len(prepared.uses) < COUNTED_MAX or key in prepared.uses:
                prepared.uses[key] = uses
        out.append(_Message(text, name, prepare, params, types, formats))
    return out


def _flush(pgconn: pq.abc.PGconn) -> None:
    """Send what libpq holds (the connection is non-blocking, as psycopg keeps it)."""
    while pgconn.flush():
        _wait(pgconn.socket, select.POLLIN | select.POLLOUT)
        pgconn.consume_input()  # libpq may need the server's answers read to go on sending


def _wait(fd: int, events: int) -> None:
    """Until `fd` is ready: in poll(), without the GIL (libpq's blocking calls would hold it,
    and stop every other thread of the process meanwhile)."""
    poller = select.poll()
    poller.register(fd, events)
    poller.poll()


def _read(conn: psycopg.Connection[Any]) -> tuple[int, psycopg.Error | None, bool, list[int]]:
    """Every result up to the Sync's, or until the session is lost: (rows affected, the first
    error, whether COMMIT's own answer said COMMIT, which queries (by their order) succeeded).
    libpq ends each query's results with None; the Sync's result ends the pipeline."""
    pgconn = conn.pgconn
    rows, error, committed = 0, None, False
    answered: list[int] = []
    index = 0
    while True:
        try:
            while pgconn.is_busy():
                _wait(pgconn.socket, select.POLLIN)
                pgconn.consume_input()
        except psycopg.OperationalError as e:
            return rows, error or e, committed, answered
        result = pgconn.get_result()
        if result is None:
            if pgconn.status != pq.ConnStatus.OK:
                return rows, error or _lost(conn), committed, answered
            index += 1
            continue
        status = result.status
        if status == pq.ExecStatus.PIPELINE_SYNC:
            return rows, error, committed, answered
        if status == pq.ExecStatus.FATAL_ERROR:
            if error is None:
                error = _error(conn, result)
            if pgconn.status != pq.ConnStatus.OK:
                return rows, error, committed, answered
        elif status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            answered.append(index)
            if result.command_status == _COMMIT:
                committed = True
            elif result.command_tuples is not None:
                rows += result.command_tuples


def _error(conn: psycopg.Connection[Any], result: pq.abc.PGresult) -> psycopg.Error:
    """The server's error as psycopg raises it; one without a SQLSTATE is libpq's own (the
    session was lost): an OperationalError, as psycopg reports it."""
    if result.error_field(pq.DiagnosticField.SQLSTATE) is None:
        return _lost(conn, result.error_message)
    return errors.error_from_result(result, encoding=conn.info.encoding)


def _lost(conn: psycopg.Connection[Any], message: bytes | None = None) -> psycopg.OperationalError:
    text = (message or conn.pgconn.error_message or b"").decode("utf-8", "replace").strip()
    return psycopg.OperationalError(f"consuming input failed: {text or 'server closed the connection unexpectedly'}")

