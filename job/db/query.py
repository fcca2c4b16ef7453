"""Items from a query (`--items-sql`): read once by the parent into a temporary JSON Lines file
(validation reads the items twice, a query cannot be), then run like any input, with a manifest.

Also what the command line checks of the database item options (`db_items`), and how a row
becomes an item line (`item_line`), which a work table's claims share.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass

from ..errors import BulkjobError, ConfigError, UsageError
from ..manifest import DONE, FAILED, ItemStates
from ..outcome import CONFIG, OUTAGE, RETRYABLE
from ..retry import classify
from . import DatabaseUnavailable, DbSettings, classifiers, dialect_of, plain_sql, read_password
from .stepsfile import is_identifier

#: Rows fetched per round trip when reading items.
FETCH_ROWS = 1000


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
    """The ItemSource (job.sources) of `--items-sql`: the rows read once into a file, and their
    ids, to tell which recorded items the query no longer returns."""

    name = "items-sql"
    #: A query that finds nothing to do is not a mistake.
    may_be_empty = True

    def __init__(self, path: str, ids: frozenset[str]) -> None:
        self.path = path
        self.ids = ids

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Iterator[bytes]]:
        with open(self.path, "rb") as f:
            yield iter(f)

    def finished_earlier(self, latest: ItemStates, *, retry_failed: bool) -> int:
        """Items this run finished (and wrote back) before a restart: the query no longer
        returns them, yet they are part of the shard's total."""
        return sum(1 for item_id, known in latest.items() if item_id not in self.ids
                   and (known.state == DONE or (known.state == FAILED and not retry_failed)))


@contextlib.contextmanager
def open_db_items(settings: DbSettings, items: DbItems, *, retry_on=(), outage_on=()
                  ) -> Iterator[ItemLines]:
    """Yield the ItemSource of --items-sql: its rows, read once.

    A failure raises what `database_error` says (the caller waits on DatabaseUnavailable).
    """
    dialect = dialect_of(settings)
    with tempfile.TemporaryDirectory(prefix="bulkjob-items-") as tmpdir:
        path = os.path.join(tmpdir, "items.jsonl")
        ids: set[str] = set()
        try:
            with closing(dialect.connect(settings, read_password(settings))) as conn:
                with closing(dialect.items_cursor(conn)) as cur, open(path, "wb") as out:
                    cur.arraysize = FETCH_ROWS
                    cur.execute(items.sql)
                    while rows := cur.fetchmany(FETCH_ROWS):
                        for row in rows:
                            if row and row[0] is not None:
                                ids.add(str(row[0]))
                            out.write(item_line(row))
                conn.rollback()
        except Exception as e:
            raise database_error(e, items.name, settings, retry_on=retry_on, outage_on=outage_on) from e
        yield ItemLines(path, frozenset(ids))


def database_error(exc: BaseException, what: str, settings: DbSettings, *, retry_on=(), outage_on=()
                   ) -> BulkjobError:
    """The error to raise for a failure of the parent's own query (`what` names it), classified
    as a worker's would be (`retry_on`, `outage_on` are --retry-on and --outage-on):
    DatabaseUnavailable for an outage or a passing error (a lock, ORA-01555 with --retry-on
    ORA-01555), for the caller to wait and try again; ConfigError when the database refuses our
    settings; UsageError for anything else (a bad query, a missing table)."""
    failure = classify(exc, retry_on=retry_on, outage_on=outage_on, classifiers=classifiers(settings))
    code = f" {failure.code}" if failure.code else ""
    text = f"{what}: {failure.error_class}{code}: {_first_line(failure.message)}"
    if failure.kind in (OUTAGE, RETRYABLE):
        return DatabaseUnavailable(text)
    if failure.kind == CONFIG:
        return ConfigError(f"{text} (the database refused bulkjob's settings)")
    return UsageError(text)


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""
