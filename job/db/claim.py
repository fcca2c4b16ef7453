"""The work table as a claim queue: the decisions and the SQL, without I/O.

A row's life (`job.db.queue` runs it, `job.db.worktable` writes it):

- `PENDING` -> `RUNNING`: a runner claims a batch atomically (`SELECT ... FOR UPDATE SKIP
  LOCKED`, then an UPDATE setting `claimed_by` to the runner and `claim_expires` to the
  database's clock plus the TTL; SQLite takes its one write lock first, `BEGIN IMMEDIATE`).
- While it works, the runner extends every claim it holds once per heartbeat (TTL/6); its own
  validity counts on its monotonic clock from the send of the last extension the database
  acknowledged, as the lease's does (`job.lease.lease_timing` gives the numbers).
- `RUNNING` -> `DONE` or `ERR`: written only under the runner's claim (`... WHERE work_id = :id
  AND claimed_by = :me AND state = 'RUNNING'`), so that a runner whose claim was taken over
  writes nothing over the new claimant's work. `attempts` counts the attempts started, written
  while they run (as the manifest's `running` records are) and with the final state.
- `RUNNING` -> `PENDING`: rows claimed but not run when the runner stops (a drain) are given
  back under the same guard.
- A `RUNNING` row whose claim expired (its runner died, or could not reach the database for a
  whole TTL) is claimed again by another runner; it may be what killed its runner, so it runs
  alone with its start recorded first, and once it has used its --max-attempts it is failed
  as crashed instead of killing runners forever.

Expiry is judged by the database's clock only (`claim_expires` against its `now`): runners'
clocks never meet, so skew between hosts changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from ..items import Invalid, Item, parse_line
from ..lease import LOST, SUSPENDED, VALID, LeaseTiming
from ..outcome import INVALID, Failure
from ..plan import Crashed, Refused
from ..retry import backoff_delay
from ..scheduler import Task
from .dialect import bind_marker
from .query import item_line

if TYPE_CHECKING:
    from .dialect import Connection, Dialect

PENDING, RUNNING, DONE, ERR = "PENDING", "RUNNING", "DONE", "ERR"

#: What every work table has, and what claims add to it.
BASE_COLUMNS = ("work_id", "state", "payload", "updated_at")
CLAIM_COLUMNS = ("claimed_by", "claim_expires", "attempts")
#: How each database spells the claim columns, for the ALTER TABLE a table without them needs.
CLAIM_COLUMN_TYPES = {
    "postgres": {"claimed_by": "text", "claim_expires": "timestamptz", "attempts": "integer NOT NULL DEFAULT 0"},
    "oracle": {"claimed_by": "VARCHAR2(200)", "claim_expires": "TIMESTAMP",
               "attempts": "NUMBER(10) DEFAULT 0 NOT NULL"},
    "sqlite": {"claimed_by": "TEXT", "claim_expires": "TIMESTAMP", "attempts": "INTEGER NOT NULL DEFAULT 0"},
}

#: Claim about this many seconds of work ahead (at the rate the run takes rows): enough that
#: workers never wait for a claim's round trip, little enough that a runner holds few rows
#: that others could be running at the end of the table.
CLAIM_AHEAD = 1.0
#: At least this many rows per worker in a claim, and never more than MAX_CLAIM (one round
#: trip's rows, kept in memory until they run).
MIN_CLAIM_PER_WORKER = 2
MAX_CLAIM = 1000
#: Rows taken over from expired claims that a runner holds at once: each runs alone, one after
#: another, so a few keep one runner busy while other runners take over the rest.
TAKEOVER_AHEAD = 8
#: Polls for work while other runners hold rows (one of them may die and leave its rows to
#: take over): the first after POLL_BASE s, growing by POLL_FACTOR to at most a third of the
#: TTL (a dead runner's rows are taken within that of their expiry) and POLL_CAP, half random
#: (runners of many pods must not poll in step).
POLL_BASE = 0.5
POLL_FACTOR = 1.5
POLL_CAP = 10.0
POLL_JITTER = 0.5
#: Seconds over which the rate the run takes rows is measured, at least: a shorter span (two
#: claims in quick succession) says little about the rate.
RATE_WINDOW = 0.05

#: What a claimed row comes to: a task to run, or a row to record failed without running.
ClaimedRow: TypeAlias = Task | Crashed | Refused


def runner_id(holder: dict[str, Any], token: str) -> str:
    """The runner's name in `claimed_by`: pod (or host), pid and a random token, unique to this
    process, at most 200 characters."""
    return f"{holder.get('pod')}:{holder.get('pid')}:{token}"[-200:]


# -- what a claimed row comes to ------------------------------------------------------------

def decide_row(work_id: Any, payload: Any, attempts: Any, *, taken_over: bool, max_attempts: int,
               max_item_bytes: int) -> ClaimedRow:
    """What a row this runner just claimed comes to.

    `attempts` is the table's count of attempts started on the row; its next attempt continues
    the count. `taken_over`: the row was claimed from an expired claim, so its runner died (or
    lost the database) while holding it: a suspect, which runs alone with its start recorded
    first, and which is failed as crashed once it has used its `max_attempts`. A row whose id
    or payload is not an item's (a payload that is not a JSON object) is refused: failed as
    invalid without running.
    """
    count = int(attempts or 0)
    parsed = parse_line(item_line((work_id, payload)).rstrip(b"\n"), 0, max_bytes=max_item_bytes)
    if parsed is None or isinstance(parsed, Invalid):
        reason = parsed.reason if parsed is not None else "empty row"
        return Refused(Item(str(work_id)), Failure(INVALID, "InvalidItem", f"work table row: {reason}"))
    if taken_over and count >= max_attempts:
        return Crashed(parsed, count, None)
    return Task(parsed.id, parsed.payload, count + 1, suspect=taken_over)


def row_id(row: ClaimedRow) -> str:
    """The work_id of a claimed row."""
    return row.item_id if isinstance(row, Task) else row.item.id


def claim_size(buffered: int, rate: float, workers: int) -> int:
    """How many rows to claim now, `buffered` being claimed and not yet taken by the run and
    `rate` the rows it takes per second: CLAIM_AHEAD seconds of work (MIN_CLAIM_PER_WORKER per
    worker at least, MAX_CLAIM at most), once the buffer is down to half of that; else 0."""
    target = max(MIN_CLAIM_PER_WORKER * workers, min(MAX_CLAIM, math.ceil(rate * CLAIM_AHEAD)))
    return target - buffered if buffered <= target // 2 else 0


def smoothed_rate(rate: float, taken: int, elapsed: float) -> float:
    """The rows per second the run takes: `taken` in the last `elapsed` seconds, averaged with
    the last estimate `rate` (0 before the first)."""
    now = taken / elapsed
    return now if rate == 0 else (rate + now) / 2


def poll_delay(polls: int, *, ttl: float, rand: float) -> float:
    """Seconds before poll number `polls` (1-based) for work, while there is none to claim."""
    return backoff_delay(polls, base=POLL_BASE, cap=min(POLL_CAP, ttl / 3), rand=rand, jitter=POLL_JITTER,
                         factor=POLL_FACTOR)


# -- whether the claims still hold -----------------------------------------------------------

def claims_status(acked_sent: float | None, now: float, timing: LeaseTiming, *, released: bool) -> str:
    """VALID (rows may start, states may be written), SUSPENDED (neither, until an extension
    is acknowledged again) or LOST (released at the end: for good). Validity counts from the
    send of the last extension the database acknowledged, as the lease's does."""
    if released:
        return LOST
    if acked_sent is None or now >= acked_sent + timing.validity:
        return SUSPENDED
    return VALID


def lost_rows(expected: Iterable[str], running: set[str], finished: set[str]) -> set[str]:
    """Rows this runner held when it extended its claims that the table no longer shows
    RUNNING under its name, other than those it finished itself: another runner took them
    over (their claims had expired)."""
    return {work_id for work_id in expected if work_id not in running and work_id not in finished}


# -- the SQL ---------------------------------------------------------------------------------

def guard(paramstyle: str) -> str:
    """The condition of every write under a claim: the row is still this runner's."""
    return (f"work_id = {bind_marker('work_id', paramstyle)} AND claimed_by = {bind_marker('runner', paramstyle)} "
            "AND state = 'RUNNING'")


def claimable(clock: str, *, taken_over: bool) -> str:
    """The rows a claim takes: PENDING ones, or RUNNING ones whose claim expired by the
    database's `clock` (or that have none: set RUNNING by hand, or by an older bulkjob)."""
    if taken_over:
        return f"state = 'RUNNING' AND (claim_expires IS NULL OR claim_expires < {clock})"
    return "state = 'PENDING'"


@dataclass(frozen=True, slots=True)
class ClaimSql:
    """Every statement a runner sends to its work table, for one dialect."""

    #: The dialect's claim (see its `claim`): fresh rows, and rows whose claim expired.
    claim: tuple[str, ...]
    take_over: tuple[str, ...]
    extend: str
    #: The runner's RUNNING rows, when an extension did not find what it expected.
    mine: str
    #: Whether any row is PENDING, and how many other runners' rows are RUNNING.
    pending: str
    others: str
    done: str
    err: str
    #: An attempt started (running), and one that failed and will be retried (with its error).
    started: str
    retrying: str
    give_back: str


def claim_sql(table: str, dialect: Dialect[Connection], *, error_column: bool, result_column: bool) -> ClaimSql:
    """The statements for `table` on `dialect`: binds in its paramstyle, times by its clock
    (`CLAIM_CLOCK`, `CLAIM_EXPIRY`, `NOW`)."""
    style = dialect.PARAMSTYLE

    def b(name: str) -> str:
        return bind_marker(name, style)

    ours = guard(style)
    now = dialect.NOW
    ending = f"claim_expires = NULL, updated_at = {now}, attempts = {b('attempts')}"
    return ClaimSql(
        claim=dialect.claim_sql(table, claimable(dialect.CLAIM_CLOCK, taken_over=False)),
        take_over=dialect.claim_sql(table, claimable(dialect.CLAIM_CLOCK, taken_over=True)),
        extend=(f"UPDATE {table} SET claim_expires = {dialect.CLAIM_EXPIRY} "
                f"WHERE claimed_by = {b('runner')} AND state = 'RUNNING'"),
        mine=f"SELECT work_id FROM {table} WHERE claimed_by = {b('runner')} AND state = 'RUNNING'",
        pending=dialect.first_row_sql(table, "state = 'PENDING'"),
        others=(f"SELECT COUNT(*) FROM {table} WHERE state = 'RUNNING' "
                f"AND (claimed_by IS NULL OR claimed_by <> {b('runner')})"),
        done=(f"UPDATE {table} SET state = 'DONE', {ending}" + (", error = NULL" if error_column else "")
              + (f", result = {b('result')}" if result_column else "") + f" WHERE {ours}"),
        err=(f"UPDATE {table} SET state = 'ERR', {ending}" + (f", error = {b('error')}" if error_column else "")
             + f" WHERE {ours}"),
        started=f"UPDATE {table} SET attempts = {b('attempts')} WHERE {ours}",
        retrying=(f"UPDATE {table} SET attempts = {b('attempts')}" + (f", error = {b('error')}" if error_column else "")
                  + f" WHERE {ours}"),
        give_back=(f"UPDATE {table} SET state = 'PENDING', claimed_by = NULL, claim_expires = NULL, "
                   f"updated_at = {now} WHERE {ours}"),
    )


def alter_sql(dialect: str, table: str, missing: Iterable[str]) -> str:
    """The ALTER TABLE that adds the claim columns `missing` from `table`, on one line."""
    types = CLAIM_COLUMN_TYPES[dialect]
    columns = [f"{name} {types[name]}" for name in missing]
    if dialect == "oracle":
        return f"ALTER TABLE {table} ADD ({', '.join(columns)});"
    if dialect == "postgres":
        return f"ALTER TABLE {table} " + ", ".join(f"ADD COLUMN {c}" for c in columns) + ";"
    return " ".join(f"ALTER TABLE {table} ADD COLUMN {c};" for c in columns)
