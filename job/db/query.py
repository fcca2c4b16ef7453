"""Items from a query (`--items-sql`), read once by the parent into a temporary JSON Lines file.

Validation reads the items twice, a query cannot be; the file then runs like any input, with a
manifest.

Also what the command line checks of the database item options (`db_items`), and how a row
becomes an item line (`item_line`), which a work table's claims share.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..manifest import DONE, FAILED
from .dialect import dialect_of
from .parent import reading
from .stepsfile import is_identifier
from .url import plain_sql

if TYPE_CHECKING:
    from ..manifest import ItemStates
    from .url import DbSettings

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


def item_line(row: tuple[Any, ...]) -> bytes:
    """One JSON Lines item from a row (id, payload): payload is JSON text, a JSON value the
    driver already decoded, or NULL. What is not an object is left for validation to report."""
    item_id = row[0]
    payload: Any = row[1] if len(row) > 1 else None
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
def open_db_items(settings: DbSettings, items: DbItems, *, retry_on: Iterable[str] = (),
                  outage_on: Iterable[str] = ()) -> Iterator[ItemLines]:
    """Yield the ItemSource of --items-sql: its rows, read once.

    A failure raises what `database_error` says (the caller waits on DatabaseUnavailable).
    """
    if items.sql is None:
        raise ValueError("open_db_items reads the rows of --items-sql, not a work table")
    dialect = dialect_of(settings)
    with tempfile.TemporaryDirectory(prefix="bulkjob-items-") as tmpdir:
        path = os.path.join(tmpdir, "items.jsonl")
        ids: set[str] = set()
        with reading(settings, items.name, retry_on=retry_on, outage_on=outage_on) as conn, \
                closing(dialect.items_cursor(conn)) as cur, open(path, "wb") as out:
            cur.arraysize = FETCH_ROWS
            cur.execute(items.sql)
            while rows := cur.fetchmany(FETCH_ROWS):
                for row in rows:
                    if row and row[0] is not None:
                        ids.add(str(row[0]))
                    out.write(item_line(row))
        yield ItemLines(path, frozenset(ids))
