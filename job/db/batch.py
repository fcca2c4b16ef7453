"""Batch DML (`ctx.executemany`): rows in batches, and the savepoint replay that finds the rows refused.

Oracle reports a batch's bad rows itself (job.db.oracle); PostgreSQL and SQLite run each batch
under a savepoint and replay a failing one row by row (`executemany_with_savepoints`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .dialect import Binds, Connection, Cursor

#: Default rows per executemany round trip: large enough to amortise the round trip, small
#: enough that one batch's bind buffers stay a few megabytes.
DEFAULT_BATCH_SIZE = 1000

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RowError:
    """One row of a batch that the database refused: its offset in the rows given, and why."""

    offset: int
    code: str | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "code": self.code, "message": self.message}


def batches(rows: Iterable[T], size: int) -> Iterator[tuple[int, list[T]]]:
    """(offset of the first row, rows) for consecutive batches of at most `size` rows."""
    batch: list[T] = []
    start = 0
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield start, batch
            start += size
            batch = []
    if batch:
        yield start, batch


def executemany_with_savepoints(conn: Connection, sql: str, rows: Iterable[Binds], *, batch_size: int,
                                row_error: Callable[[BaseException], tuple[str | None, str] | None],
                                run_batch: Callable[[Cursor, str, list[Binds]], None] | None = None,
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
