"""A work table (`--work-table NAME`) as the run's record: its columns, the write-back of what
becomes of the rows this runner claimed, and what `bulkjob status` and `bulkjob report` read.

The claims themselves are job.db.queue's; the statements are job.db.claim's. The write-back is
built on job.writer: the run adds records as items end, a thread of the parent writes them in
batches (one executemany per statement and batch, never one round trip per item), each batch
behind the claims' fence, and every write guarded by the claim (`claimed_by = :me AND state =
'RUNNING'`), so that a runner whose claim was taken over changes nothing.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import Fenced, UsageError
from ..manifest import DONE, FAILED, PARTIAL, RUNNING
from ..writer import BackgroundWriter
from .batch import batches
from .claim import BASE_COLUMNS, CLAIM_COLUMNS, ERR, ClaimSql, alter_sql
from .dialect import dialect_of
from .parent import ParentConnection, reading

if TYPE_CHECKING:
    from .queue import ClaimQueue
    from .url import DbSettings

log = logging.getLogger("bulkjob.worktable")

#: A batch is written at once when this many rows changed; else every --checkpoint-interval.
WRITE_BATCH = 500
#: Backoff between failed batches, seconds: the database may be failing over.
RETRY_BASE = 1.0
RETRY_CAP = 30.0
#: Longest error text written to the table's optional `error` column (VARCHAR2(4000) in bytes);
#: a narrower column's own width is read when the run starts.
MAX_ERROR_CHARS = 1000
#: Longest a write-back round trip may take (where the driver can bound it: Oracle's
#: call_timeout): the connection sits idle between batches, and one a firewall dropped would
#: otherwise hang the next batch until TCP gives up.
WRITE_CALL_TIMEOUT = 60.0
#: A final state written this long after the run recorded it (or --checkpoint-interval times
#: LAG_INTERVALS, if longer) is logged as a warning: the rows a runner that dies runs again are
#: those finished within the last write's lag, not within the interval.
LAG_WARNING = 5.0
LAG_INTERVALS = 10

#: The work table, per database. `error` is optional: bulkjob fills it when the column exists;
#: so is `result` (not here), which keeps each done row's result as JSON.
DDL = {
    "oracle": """\
CREATE TABLE bulk_work (
  work_id       VARCHAR2(512) PRIMARY KEY,
  state         VARCHAR2(8) DEFAULT 'PENDING' NOT NULL
                CHECK (state IN ('PENDING', 'RUNNING', 'DONE', 'ERR')),
  payload       CLOB CHECK (payload IS JSON),
  updated_at    TIMESTAMP DEFAULT SYSTIMESTAMP NOT NULL,
  claimed_by    VARCHAR2(200),
  claim_expires TIMESTAMP,
  attempts      NUMBER(10) DEFAULT 0 NOT NULL,
  error         VARCHAR2(4000)
);
CREATE INDEX bulk_work_state ON bulk_work (state, claim_expires);
""",
    "postgres": """\
CREATE TABLE bulk_work (
  work_id       text PRIMARY KEY,
  state         text NOT NULL DEFAULT 'PENDING'
                CHECK (state IN ('PENDING', 'RUNNING', 'DONE', 'ERR')),
  payload       jsonb,
  updated_at    timestamptz NOT NULL DEFAULT now(),
  claimed_by    text,
  claim_expires timestamptz,
  attempts      integer NOT NULL DEFAULT 0,
  error         text
);
CREATE INDEX bulk_work_state ON bulk_work (state, claim_expires);
""",
    "sqlite": """\
CREATE TABLE bulk_work (
  work_id       TEXT PRIMARY KEY,
  state         TEXT NOT NULL DEFAULT 'PENDING'
                CHECK (state IN ('PENDING', 'RUNNING', 'DONE', 'ERR')),
  payload       TEXT,
  updated_at    TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  claimed_by    TEXT,
  claim_expires TIMESTAMP,
  attempts      INTEGER NOT NULL DEFAULT 0,
  error         TEXT
);
CREATE INDEX bulk_work_state ON bulk_work (state, claim_expires);
""",
}


@dataclass(frozen=True, slots=True)
class Columns:
    """What the work table has beyond the columns every work table needs."""

    error: bool = False
    #: The `error` column's width (characters or bytes, as the driver reports it), or None.
    error_width: int | None = None
    result: bool = False


def read_columns(settings: DbSettings, table: str, *, retry_on: Iterable[str] = (),
                 outage_on: Iterable[str] = ()) -> Columns:
    """The work table's columns, checked before anything is claimed.

    Raises UsageError naming what is missing: a table without the claim columns gets the
    ALTER TABLE that adds them; DatabaseUnavailable or ConfigError as `parent.database_error`
    says for a failure to read it (no such table is a UsageError)."""
    with reading(settings, f"--work-table {table}", retry_on=retry_on, outage_on=outage_on) as conn, \
            closing(conn.cursor()) as cur:
        cur.execute(f"SELECT * FROM {table} WHERE 1 = 0")
        description = cur.description or ()
        cur.fetchall()
    found = {column[0].lower(): column for column in description}
    absent = [name for name in BASE_COLUMNS if name not in found]
    if absent:
        raise UsageError(f"--work-table {table} is not a work table: it has no {', '.join(absent)} "
                         "column(s) (docs/databases.md shows one)")
    missing = [name for name in CLAIM_COLUMNS if name not in found]
    if missing:
        raise UsageError(f"--work-table {table} lacks the column(s) that claims need ({', '.join(missing)}); "
                         f"add them: {alter_sql(settings.dialect, table, missing)}")
    error = found.get("error")
    width = None
    if error is not None:
        # The smaller of display and internal size: characters and bytes, for Oracle's BYTE
        # and CHAR semantics alike; None for an unbounded column (CLOB, text).
        sizes = [size for size in (error[2], error[3]) if isinstance(size, int) and size > 0]
        width = min(sizes) if sizes else None
    return Columns(error=error is not None, error_width=width, result="result" in found)


#: One row's pending change: (manifest state, attempts, error text, result JSON).
Change = tuple[str, int, str | None, str | None]


class ClaimRecorder(BackgroundWriter[dict[str, Change]]):
    """What becomes of this runner's rows, written to the work table from a thread of the
    parent: the run calls it as it would the checkpointer (`add`, `set_running`, `write_now`,
    `close`, `unsaved`, `failing_since`, `last_error`).

    A done record makes the row DONE (its result in `result` when the table has that column),
    a failed one ERR (the error's code, class and message in `error`), a partial one (an
    attempt failed, the row will be tried again while still claimed) writes its attempts and
    error, and an attempt running at a write has its start counted in `attempts`. Changes to
    one row coalesce (a final state is never replaced); each batch is checked against the
    claims' fence and committed on its own; a failed batch is kept and tried again with
    backoff on a new connection.
    """

    def __init__(self, settings: DbSettings, sql: ClaimSql, claims: ClaimQueue, *, columns: Columns,
                 interval: float, batch: int = WRITE_BATCH) -> None:
        super().__init__(name="worktable", interval=interval, retry_base=RETRY_BASE, retry_cap=RETRY_CAP,
                         fence=claims.fence)
        self.settings = settings
        self.sql = sql
        self.claims = claims
        self.columns = columns
        self.batch = batch
        self._pending: dict[str, Change] = {}
        self._inflight: dict[str, Change] | None = None
        self._running: list[dict[str, Any]] = []
        #: Attempts written for rows still held: a running attempt is written once.
        self._recorded: dict[str, int] = {}
        self._db = ParentConnection(settings, call_timeout=WRITE_CALL_TIMEOUT)
        #: Rows of the batch being written whose chunk is committed already.
        self._landed: list[str] = []
        #: Rows of the batch being written that came from the running list, not from `add`.
        self._starts: set[str] = set()
        #: When (monotonic) the oldest change in `_pending`, and in the batch being written, was
        #: added; and the lag of the last batch written (seconds from its oldest add to durable).
        self._pending_since: float | None = None
        self._batch_since: float | None = None
        self.lag = 0.0
        self._lag_warned_at = float("-inf")

    # -- what the run calls ----------------------------------------------------------------

    def add(self, record: dict[str, Any]) -> None:
        state, work_id = record["state"], record["id"]
        if state in (DONE, FAILED):
            self.claims.finishing(work_id)
        error = error_text(record.get("error"), self.columns.error_width) if self.columns.error else None
        result = None
        if state == DONE and self.columns.result and record.get("result") is not None:
            result = json.dumps(record["result"], default=str)
        change: Change = (state, int(record.get("attempts", 0)), error, result)
        with self.lock:
            old = self._pending.get(work_id)
            if old is not None and old[0] in (DONE, FAILED):
                return  # a final state stays final
            if old is not None and old[0] == PARTIAL and state == RUNNING:
                change = (PARTIAL, change[1], old[2], None)  # keep the error of the failed attempt
            if self._pending_since is None:
                self._pending_since = self.clock()
            self._pending[work_id] = change
            self._ticket()
            full = len(self._pending) >= self.batch
        if full:
            self.wake()

    def set_running(self, records: list[dict[str, Any]]) -> None:
        """The attempts running now (`{"id", "state": "running", "attempts"}`): each write
        counts the start of those not counted yet. Call with a new list each time."""
        self._running = records

    def write_now(self, records: list[dict[str, Any]], timeout: float) -> bool:
        """Add `records` and wait until they (and everything added before) are written; False
        if that took longer than `timeout` (they stay queued)."""
        for record in records:
            self.add(record)
        return self.flush(timeout)

    @property
    def unsaved(self) -> int:
        with self.lock:
            return len(self._pending) + len(set(self._inflight or ()) - self._starts)

    def close(self, timeout: float) -> bool:
        ok = super().close(timeout)
        if not self.alive:
            self._db.drop()
        return ok

    # -- the writer's hooks ----------------------------------------------------------------

    def _collect(self) -> tuple[dict[str, Change], int] | None:
        batch = dict(self._pending)
        # Starts of attempts running now: rebuilt from the running list at every write, never
        # kept (no ticket waits on them; an attempt that ended has its final state instead).
        self._starts = set()
        for record in self._running:
            work_id = record["id"]
            if work_id not in batch and self._recorded.get(work_id, 0) < record["attempts"]:
                batch[work_id] = (RUNNING, record["attempts"], None, None)
                self._starts.add(work_id)
        if not batch:
            return None
        self._pending = {}
        self._inflight = batch
        self._batch_since, self._pending_since = self._pending_since, None
        return batch, self._added

    def _write(self, batch: dict[str, Change]) -> None:
        statements: dict[str, list[dict[str, Any]]] = {}
        for work_id, (state, attempts, error, result) in batch.items():
            row: dict[str, Any] = {"work_id": work_id, "runner": self.claims.runner, "attempts": attempts}
            if state == DONE:
                sql = self.sql.done
                if self.columns.result:
                    row["result"] = result
            elif state in (FAILED, PARTIAL):
                sql = self.sql.err if state == FAILED else self.sql.retrying
                if self.columns.error:
                    row["error"] = error
            else:
                sql = self.sql.started
            statements.setdefault(sql, []).append(row)
        self._landed = []
        try:
            first = True
            for sql, rows in statements.items():
                for _, chunk in batches(rows, self.batch):
                    if not first:
                        self.check_fence()
                    first = False
                    with self.claims.writing:  # the heartbeat's extension waits for these row locks
                        changed = self._db.execute_many(sql, chunk)
                    if sql in (self.sql.done, self.sql.err) and 0 <= changed < len(chunk):
                        self._overtaken(len(chunk) - changed)
                    self._landed += [row["work_id"] for row in chunk]
        except Fenced:
            raise
        except Exception:
            self._db.drop()
            raise

    def _overtaken(self, count: int) -> None:
        """Final states that landed nowhere: the rows were no longer this runner's (another
        runner took them over once their claims expired, and may have run them again)."""
        self.claims.overtaken += count
        log.warning("%d row(s) finished here had been taken over by another runner (their claims expired while "
                    "this runner could not extend them): they may have run twice, and the table keeps the other "
                    "runner's outcome", count)

    def _written(self, batch: dict[str, Change]) -> None:
        self._settle(batch)
        self._inflight = None
        since, self._batch_since = self._batch_since, None
        if since is None:
            return
        self.lag = self.clock() - since
        log.debug("wrote %d row state(s); the oldest was recorded %.2fs ago", len(batch), self.lag)
        if self.lag > max(LAG_WARNING, LAG_INTERVALS * self.interval) and self.clock() >= self._lag_warned_at + 60:
            self._lag_warned_at = self.clock()
            log.warning("the work table's row states are written %.1fs after the rows end (--checkpoint-interval "
                        "%.1fs): the database or this machine is slow; a runner that dies runs again the rows it "
                        "finished within that time", self.lag, self.interval)

    def _kept(self, batch: dict[str, Change]) -> None:
        """A batch cut short (a failure, the fence closing between chunks): the committed chunks
        are settled, the rest is kept for the next try."""
        landed = set(self._landed)
        self._settle({work_id: batch[work_id] for work_id in landed})
        self._inflight = None
        since, self._batch_since = self._batch_since, None
        if since is not None and (self._pending_since is None or since < self._pending_since):
            self._pending_since = since  # the kept changes are as old as their batch
        for work_id, change in batch.items():
            if work_id not in landed and work_id not in self._starts:
                self._pending.setdefault(work_id, change)  # a newer change wins

    def _settle(self, changes: dict[str, Change]) -> None:
        finished = []
        for work_id, (state, attempts, _error, _result) in changes.items():
            if state in (DONE, FAILED):
                finished.append(work_id)
                self._recorded.pop(work_id, None)
            else:
                self._recorded[work_id] = attempts
        self._landed = []
        self.claims.forget(finished)


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


# -- what status and report read -------------------------------------------------------------

def table_status(settings: DbSettings, table: str) -> dict[str, Any]:
    """Rows of the work table by state; RUNNING ones split into live claims (per runner) and
    expired ones (their runner died, or lost the database: another runner takes them over)."""
    clock = dialect_of(settings).CLAIM_CLOCK
    read_columns(settings, table)
    with reading(settings, f"--work-table {table}") as conn, closing(conn.cursor()) as cur:
        cur.execute(f"SELECT state, COUNT(*), COALESCE(SUM(attempts), 0) FROM {table} GROUP BY state")
        by_state = {state: (int(count), int(attempts)) for state, count, attempts in cur.fetchall()}
        cur.execute(f"SELECT claimed_by, COUNT(*) FROM {table} WHERE state = 'RUNNING' "
                    f"AND claim_expires >= {clock} GROUP BY claimed_by ORDER BY claimed_by")
        runners = [{"runner": runner, "rows": int(count)} for runner, count in cur.fetchall()]
    counts = {state.lower(): by_state.get(state, (0, 0))[0] for state in ("PENDING", "RUNNING", "DONE", ERR)}
    live = sum(r["rows"] for r in runners)
    return {"work_table": table, "total": sum(c for c, _ in by_state.values()), "pending": counts["pending"],
            "running": counts["running"], "expired": counts["running"] - live, "done": counts["done"],
            "failed": counts["err"], "attempts": sum(a for _, a in by_state.values()), "runners": runners}


def failed_table_rows(settings: DbSettings, table: str) -> list[dict[str, Any]]:
    """One row per ERR row of the work table: id, attempts, error text, when it was written and
    by which runner."""
    columns = read_columns(settings, table)
    error = "error" if columns.error else "NULL"
    with reading(settings, f"--work-table {table}") as conn, closing(conn.cursor()) as cur:
        cur.execute(f"SELECT work_id, attempts, {error}, updated_at, claimed_by FROM {table} "
                    "WHERE state = 'ERR' ORDER BY work_id")
        rows = cur.fetchall()
    return [{"id": str(work_id), "attempts": int(attempts or 0), "error": text, "updated_at": _iso(at),
             "runner": runner} for work_id, attempts, text, at, runner in rows]


def _iso(value: Any) -> str | None:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return None if value is None else str(value)
