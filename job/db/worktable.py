"""Items from the database: `--items-sql QUERY`, or a work table (`--work-table NAME`) whose
rows bulkjob marks RUNNING, DONE or ERR as items go, so the table tells the truth even without
the manifest.

The parent reads the rows once into a temporary JSON Lines file (validation reads the items
twice, a query cannot be). State changes go back in batches from a thread of the parent, one
executemany per batch, never one round trip per item.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, Fenced, UsageError
from ..manifest import DONE, FAILED, ItemStates
from ..outcome import CONFIG, OUTAGE, PERMANENT, RETRYABLE
from ..retry import classify
from ..writer import BackgroundWriter
from . import (
    DatabaseUnavailable,
    DbSettings,
    batches,
    bind_marker,
    classifiers,
    close_quietly,
    dialect_of,
    plain_sql,
    read_password,
)
from .stepsfile import is_identifier

log = logging.getLogger("bulkjob.worktable")

PENDING, RUNNING, TABLE_DONE, ERR = "PENDING", "RUNNING", "DONE", "ERR"
#: Seconds between write-back batches: the table lags the items by about this much.
WRITEBACK_INTERVAL = 2.0
#: A batch is written at once when this many state changes are waiting.
WRITEBACK_BATCH = 500
#: Backoff between failed write-back batches, seconds: the database may be failing over.
WRITEBACK_RETRY_BASE = 1.0
WRITEBACK_RETRY_CAP = 30.0
#: Rows fetched per round trip when reading items.
FETCH_ROWS = 1000
#: Longest error text written to the table's optional `error` column (VARCHAR2(4000) in bytes);
#: a narrower column's own width is read when the items are.
MAX_ERROR_CHARS = 1000
#: Longest a write-back round trip may take (where the driver can bound it: Oracle's
#: call_timeout): the connection sits idle between batches, and one a firewall dropped would
#: otherwise hang the next batch until TCP gives up.
WRITEBACK_CALL_TIMEOUT = 60.0

#: The work table, per database. `error` is optional: bulkjob fills it when the column exists.
DDL = {
    "oracle": """\
CREATE TABLE bulk_work (
  work_id    VARCHAR2(512) PRIMARY KEY,
  state      VARCHAR2(8) DEFAULT 'PENDING' NOT NULL
             CHECK (state IN ('PENDING', 'RUNNING', 'DONE', 'ERR')),
  payload    CLOB CHECK (payload IS JSON),
  updated_at TIMESTAMP DEFAULT SYSTIMESTAMP NOT NULL,
  error      VARCHAR2(4000)
);
CREATE INDEX bulk_work_state ON bulk_work (state);
""",
    "postgres": """\
CREATE TABLE bulk_work (
  work_id    text PRIMARY KEY,
  state      text NOT NULL DEFAULT 'PENDING'
             CHECK (state IN ('PENDING', 'RUNNING', 'DONE', 'ERR')),
  payload    jsonb,
  updated_at timestamptz NOT NULL DEFAULT now(),
  error      text
);
CREATE INDEX bulk_work_state ON bulk_work (state);
""",
    "sqlite": """\
CREATE TABLE bulk_work (
  work_id    TEXT PRIMARY KEY,
  state      TEXT NOT NULL DEFAULT 'PENDING'
             CHECK (state IN ('PENDING', 'RUNNING', 'DONE', 'ERR')),
  payload    TEXT,
  updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  error      TEXT
);
CREATE INDEX bulk_work_state ON bulk_work (state);
""",
}


@dataclass(frozen=True, slots=True)
class DbItems:
    """Where items come from in the database: a query of (id, payload), or a work table."""

    sql: str | None = None
    table: str | None = None

    @property
    def name(self) -> str:
        return f"work-table:{self.table}" if self.table else "items-sql"


def db_items(*, items: str | None, items_sql: str | None, work_table: str | None,
             db: DbSettings | None) -> DbItems | None:
    """The CLI's item source options checked: exactly one of --items, --items-sql, --work-table."""
    given = [name for name, value in (("--items", items), ("--items-sql", items_sql),
                                      ("--work-table", work_table)) if value]
    if len(given) != 1:
        raise UsageError("give exactly one of --items, --items-sql and --work-table"
                         + (f" (got {', '.join(given)})" if given else ""))
    if items:
        return None
    if db is None:
        raise UsageError(f"{given[0]} needs --db")
    if work_table is not None and not is_identifier(work_table):
        raise UsageError(f"--work-table {work_table!r}: expected a table name (schema.table allowed)")
    return DbItems(sql=plain_sql(items_sql, db.dialect) if items_sql else None, table=work_table)


def items_query(items: DbItems, *, retry_failed: bool) -> str:
    """The query that reads the items. A work table gives PENDING rows, RUNNING ones (left by
    a run that stopped before writing them back) and, with --retry-failed, ERR ones."""
    if items.sql:
        return items.sql
    states = [PENDING, RUNNING] + ([ERR] if retry_failed else [])
    listed = ", ".join(f"'{s}'" for s in states)
    return f"SELECT work_id, payload FROM {items.table} WHERE state IN ({listed}) ORDER BY work_id"


def item_line(row: tuple) -> bytes:
    """One JSON Lines item from a row (id, payload): payload is JSON text, a JSON value the
    driver already decoded, or NULL. What is not an object is left for validation to report."""
    item_id = row[0]
    payload = row[1] if len(row) > 1 else None
    if hasattr(payload, "read"):  # an Oracle LOB
        payload = payload.read()
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = bytes(payload).decode("utf-8", "replace")
    if isinstance(payload, str):
        try:
            payload = json.loads(payload) if payload.strip() else None
        except ValueError:
            pass  # kept as text: "payload must be an object" names the item
    if item_id is not None and not isinstance(item_id, (str, int)):
        item_id = str(item_id)
    return json.dumps({"id": item_id, "payload": payload}, default=str).encode() + b"\n"


class ItemLines:
    """Opens the items read from the database (like job.sources' openers), and knows their ids."""

    def __init__(self, path: str, ids: frozenset[str], settings: DbSettings, items: DbItems,
                 error_column: bool, error_width: int | None = None) -> None:
        self.path = path
        self.ids = ids
        self.settings = settings
        self.items = items
        self.error_column = error_column
        #: The `error` column's width (characters or bytes, as the driver reports it), or None.
        self.error_width = error_width

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Iterator[bytes]]:
        with open(self.path, "rb") as f:
            yield iter(f)

    def finished_earlier(self, latest: ItemStates, *, retry_failed: bool) -> int:
        """Items this run finished (and wrote back) before a restart: the query no longer
        returns them, yet they are part of the shard's total."""
        return sum(1 for item_id, known in latest.items() if item_id not in self.ids
                   and (known.state == DONE or (known.state == FAILED and not retry_failed)))

    def writeback(self, fence: Callable[[], bool] | None = None) -> WorkTableWriter | None:
        """A started writer of states for a work table, writing only while `fence()` allows
        (the lease); None for --items-sql."""
        if not self.items.table:
            return None
        writer = WorkTableWriter(self.settings, self.items.table, error_column=self.error_column,
                                 error_width=self.error_width, fence=fence)
        writer.start()
        return writer


@contextlib.contextmanager
def open_db_items(settings: DbSettings, items: DbItems, *, retry_failed: bool, retry_on=(), outage_on=()
                  ) -> Iterator[tuple[str, ItemLines]]:
    """Yield (source name, ItemLines) for the rows of --items-sql or --work-table.

    A failure is classified as a worker's would be (`retry_on`, `outage_on` are --retry-on and
    --outage-on): DatabaseUnavailable for an outage or a passing error (a lock, ORA-01555 with
    --retry-on ORA-01555), for the caller to wait and try again; ConfigError when the database
    refuses our settings; UsageError for anything else (a bad query, a missing table).
    """
    dialect = dialect_of(settings)
    with tempfile.TemporaryDirectory(prefix="bulkjob-items-") as tmpdir:
        path = os.path.join(tmpdir, "items.jsonl")
        ids: set[str] = set()
        try:
            with closing(dialect.connect(settings, read_password(settings))) as conn:
                error_column, error_width = _error_column(conn, items.table, settings) if items.table else (False, None)
                with closing(dialect.items_cursor(conn)) as cur, open(path, "wb") as out:
                    cur.arraysize = FETCH_ROWS
                    cur.execute(items_query(items, retry_failed=retry_failed))
                    while rows := cur.fetchmany(FETCH_ROWS):
                        for row in rows:
                            if row and row[0] is not None:
                                ids.add(str(row[0]))
                            out.write(item_line(row))
                conn.rollback()
        except Exception as e:
            failure = classify(e, retry_on=retry_on, outage_on=outage_on, classifiers=classifiers(settings))
            code = f" {failure.code}" if failure.code else ""
            text = f"{items.name}: {failure.error_class}{code}: {_first_line(failure.message)}"
            if failure.kind in (OUTAGE, RETRYABLE):
                raise DatabaseUnavailable(text) from e
            if failure.kind == CONFIG:
                raise ConfigError(f"{text} (the database refused bulkjob's settings)") from e
            raise UsageError(text) from e
        yield items.name, ItemLines(path, frozenset(ids), settings, items, error_column, error_width)


def _error_column(conn, table: str, settings: DbSettings) -> tuple[bool, int | None]:
    """Whether the work table has an `error` column, and its width when the driver says (the
    smaller of display and internal size: characters and bytes, for Oracle's BYTE and CHAR
    semantics alike); None for an unbounded one (CLOB, text)."""
    try:
        with closing(conn.cursor()) as cur:
            cur.execute(f"SELECT error FROM {table} WHERE 1 = 0")
            description = cur.description
            cur.fetchall()
    except Exception as e:
        if classify(e, classifiers=classifiers(settings)).kind != PERMANENT:
            raise  # not "no such column": the connection, a lock ... (classified by the caller)
        conn.rollback()  # PostgreSQL refuses every statement after an error until then
        return False, None
    sizes = [size for size in (description[0][2], description[0][3]) if isinstance(size, int) and size > 0]
    return True, min(sizes) if sizes else None


def update_sql(table: str, *, paramstyle: str, now: str, error_column: bool) -> str:
    """The UPDATE that writes one item's state back (run with executemany)."""
    def b(name):
        return bind_marker(name, paramstyle)

    error = f", error = {b('error')}" if error_column else ""
    # A DONE row never changes again: a runner that lost its lease cannot turn another's DONE
    # into RUNNING or ERR, and a rerun that writes DONE again changes nothing.
    return (f"UPDATE {table} SET state = {b('state')}, updated_at = {now}{error} "
            f"WHERE work_id = {b('work_id')} AND state <> 'DONE'")


class WorkTableWriter(BackgroundWriter[dict[str, tuple[str, str | None]]]):
    """Writes item states to the work table from a thread of the parent, in batches.

    Built on job.writer: changes to one item coalesce (RUNNING then DONE before a flush is one
    write); each batch of WRITEBACK_BATCH rows is checked against `fence` (the lease) and
    committed on its own; a failed write keeps its rows (a newer state wins) and is tried
    again with backoff on a new connection. The UPDATE never changes a DONE row.
    """

    def __init__(self, settings: DbSettings, table: str, *, error_column: bool, error_width: int | None = None,
                 interval: float = WRITEBACK_INTERVAL, batch: int = WRITEBACK_BATCH,
                 fence: Callable[[], bool] | None = None) -> None:
        super().__init__(name="worktable", interval=interval, retry_base=WRITEBACK_RETRY_BASE,
                         retry_cap=WRITEBACK_RETRY_CAP, fence=fence)
        self.settings = settings
        self.table = table
        self.dialect = dialect_of(settings)
        self.error_column = error_column
        self.error_width = error_width
        self.sql = update_sql(table, paramstyle=self.dialect.PARAMSTYLE, now=self.dialect.NOW,
                              error_column=error_column)
        self.batch = batch
        self._pending: dict[str, tuple[str, str | None]] = {}
        self._conn = None
        self.rows_written = 0

    def taken(self, item_id: str) -> None:
        self._add(item_id, RUNNING, None)

    def finished(self, item_id: str, state: str, error: dict[str, Any] | None = None) -> None:
        """Record a manifest state (done or failed) for the item's row."""
        if state == DONE:
            self._add(item_id, TABLE_DONE, None)
        elif state == FAILED:
            self._add(item_id, ERR, error_text(error, self.error_width))

    @property
    def unsaved(self) -> int:
        with self.lock:
            return len(self._pending)

    def close(self, timeout: float) -> bool:
        """Write what is left (for up to `timeout` seconds); whether everything was written.
        Call it before the lease is released: nothing is written once the fence is closed."""
        ok = super().close(timeout)
        if self._conn is not None and not self.alive:
            self._drop()
        return ok

    def _add(self, item_id: str, state: str, error: str | None) -> None:
        with self.lock:
            self._pending[item_id] = (state, error)
            self._ticket()
            full = len(self._pending) >= self.batch
        if full:
            self.wake()

    def _collect(self):
        if not self._pending:
            return None
        pending, self._pending = self._pending, {}
        return pending, self._added

    def _write(self, pending: dict[str, tuple[str, str | None]]) -> None:
        rows = []
        for item_id, (state, error) in pending.items():
            row = {"work_id": item_id, "state": state}
            if self.error_column:
                row["error"] = error
            rows.append(row)
        try:
            if self._conn is None:
                self._conn = self.dialect.connect(self.settings, read_password(self.settings))
                self.dialect.limit_calls(self._conn, WRITEBACK_CALL_TIMEOUT)
            first = True
            for _, chunk in batches(rows, self.batch):
                if not first:
                    self.check_fence()
                first = False
                with closing(self._conn.cursor()) as cur:
                    cur.executemany(self.sql, chunk)
                self._conn.commit()
        except Fenced:
            raise
        except Exception:
            self._drop()
            raise

    def _written(self, pending: dict[str, tuple[str, str | None]]) -> None:
        self.rows_written += len(pending)

    def _kept(self, pending: dict[str, tuple[str, str | None]]) -> None:
        for item_id, value in pending.items():
            self._pending.setdefault(item_id, value)  # a newer state wins

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        close_quietly(conn)


def error_text(error: dict[str, Any] | None, width: int | None = None) -> str | None:
    """The text for the `error` column: code, class and message, cut to MAX_ERROR_CHARS and to
    the column's `width` in characters and in UTF-8 bytes (Oracle counts bytes unless the
    column says CHAR), so that a narrow column never refuses the batch (ORA-12899)."""
    if not error:
        return None
    head = " ".join(str(error[k]) for k in ("code", "class") if error.get(k))
    text = f"{head}: {error.get('message', '')}" if head else str(error.get("message", ""))
    limit = MAX_ERROR_CHARS if width is None else min(MAX_ERROR_CHARS, width)
    text = text[:limit]
    if width is not None:
        text = text.encode("utf-8")[:width].decode("utf-8", "ignore")
    return text


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""
