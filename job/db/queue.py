"""This runner's claims on a work table: the rows it takes, the heartbeat that keeps them, and
the fence that says whether it may still act on them (job.db.claim has the decisions and the
statements; docs/design.md, Guarantees, the arithmetic).

One thread of the parent, on a connection of its own, extends every claim the runner holds
once per heartbeat and claims a batch whenever the rows claimed and not yet run fall below
about a second of work. The run takes rows through `tasks()`, which never blocks: NOT_YET when
a claim is still to come, the end when nothing is left (no PENDING row, no expired claim to
take over, and no row that another runner holds: while other runners' claims are live it
waits, polling with backoff, so that it can take over the rows of one that dies).

The object is the run's fence in claim mode, as the lease is for a shard: VALID while the last
extension the database acknowledged was sent less than the validity ago (TTL - TTL/4), then
SUSPENDED (nothing starts, nothing is written) until an extension is acknowledged again. Rows
that another runner took over meanwhile (their claims had expired) are lost one by one: the
run discards them (`lost`) and goes on with the rest.
"""

from __future__ import annotations

import logging
import random
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..lease import RENEWAL_WARNING_EVERY, VALID, holder_identity, lease_timing
from ..scheduler import NOT_YET, Task
from ..writer import describe
from .claim import (
    POLL_CAP,
    RATE_WINDOW,
    TAKEOVER_AHEAD,
    ClaimedRow,
    claim_size,
    claim_sql,
    claims_status,
    decide_row,
    lost_rows,
    poll_delay,
    row_id,
    runner_id,
    smoothed_rate,
)
from .claimtable import ClaimTable
from .dialect import dialect_of
from .parent import database_error

if TYPE_CHECKING:
    from ..scheduler import NotYet
    from .url import DbSettings
    from .worktable import Columns

log = logging.getLogger("bulkjob.queue")


class ClaimQueue:
    """This runner's claims on `table`: a source of tasks for the scheduler, and the fence."""

    def __init__(self, settings: DbSettings, table: str, *, columns: Columns, workers: int, max_attempts: int,
                 max_item_bytes: int, ttl: float, retry_on: Iterable[str] = (), outage_on: Iterable[str] = (),
                 clock: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random,
                 holder: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.table = table
        self.ttl = float(ttl)
        self.timing = lease_timing(self.ttl)
        self.runner = runner_id(holder or holder_identity(), secrets.token_hex(4))
        self.sql = claim_sql(table, dialect_of(settings), error_column=columns.error, result_column=columns.result)
        self._table = ClaimTable(settings, self.sql, runner=self.runner, ttl=self.ttl,
                                 call_timeout=self.timing.request_timeout)
        self.workers = workers
        self.max_attempts = max_attempts
        self.max_item_bytes = max_item_bytes
        self._retry_on, self._outage_on = tuple(retry_on), tuple(outage_on)
        self._clock = clock
        self._rand = rand
        self._lock = threading.Lock()
        #: Held by the write-back while a chunk of this runner's rows is locked in its
        #: transaction: the extension takes it first (for one request's time at most) rather
        #: than queue in the database behind its own runner's row locks, where a loaded server
        #: could spend its request timeout and let live claims expire.
        self.writing = threading.Lock()
        #: Rows claimed and not yet written DONE or ERR (nor given back, nor lost).
        self._held: set[str] = set()
        #: Held rows taken over from an expired claim whose end the run has not recorded yet.
        self._suspects: set[str] = set()
        #: The last take-over found as many rows as it asked for: there may be more.
        self._takeover_due = True
        #: Held rows whose final state the run has recorded (being written).
        self._finishing: set[str] = set()
        #: Rows another runner took over from this one.
        self._lost: set[str] = set()
        #: Claimed rows the run has not taken yet.
        self._buffer: deque[ClaimedRow] = deque()
        self._exhausted = False
        self._draining = False
        self._acked_sent: float | None = None
        self._released = False
        #: A claim failed after it may have landed: the next extension reads back what is ours.
        self._ambiguous = False
        self._polls = 0
        self._next_claim = 0.0
        self._said_waiting = False
        self._pulled = 0
        self._rate = 0.0
        self._rate_at = clock()
        self._warned_at = float("-inf")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Readable when rows were claimed (or the queue ran out): the run's loop watches it.
        self.wakeup, self._wakeup_w = socket.socketpair()
        self.wakeup.setblocking(False)
        self._wakeup_w.setblocking(False)
        #: Since when (monotonic) claims have been failing, while they are; and why.
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.taken_over = 0
        self.given_back = 0
        #: Rows finished here whose final state found them another runner's (the write-back counts).
        self.overtaken = 0

    # -- the fence -------------------------------------------------------------------------

    def status(self) -> str:
        return claims_status(self._acked_sent, self._clock(), self.timing, released=self._released)

    @property
    def valid_until(self) -> float:
        """Monotonic time after which no row starts and nothing is written (-inf before the
        first acknowledged extension)."""
        sent = self._acked_sent
        return float("-inf") if sent is None else sent + self.timing.validity

    @property
    def hard_deadline(self) -> float:
        """Monotonic time before which no other runner can take these rows over: the send of
        the last acknowledged extension plus the TTL (the database set the claims' expiry to
        its own clock plus the TTL after that send)."""
        sent = self._acked_sent
        return float("-inf") if sent is None else sent + self.ttl

    def writable(self) -> bool:
        return self.status() == VALID

    def fence(self) -> bool:
        """The write-back's fence: True while VALID. A row taken over is lost by itself, never
        the runner's end, so this never raises LeaseLost."""
        return self.status() == VALID

    @property
    def lost_because(self) -> str | None:
        return None

    def lost(self, work_id: str) -> bool:
        """Whether another runner took this row over from this one."""
        return work_id in self._lost

    # -- the run's side --------------------------------------------------------------------

    def start(self) -> None:
        """Extend once (holding nothing yet, which proves that the database answers and starts
        the validity), then start the heartbeat. Raises DatabaseUnavailable (the caller waits),
        ConfigError or UsageError as `parent.database_error` classifies the failure."""
        try:
            self._extend()
        except Exception as e:
            self._table.drop()
            raise database_error(e, f"--work-table {self.table}", self.settings, retry_on=self._retry_on,
                                 outage_on=self._outage_on) from e
        self._thread = threading.Thread(target=self._heartbeat, name="bulkjob-claims", daemon=True)
        self._thread.start()

    def tasks(self) -> Iterator[ClaimedRow | NotYet]:
        """What the run does next, as the scheduler pulls it: a Task, a Crashed or Refused row
        (the run records it failed), NOT_YET while a claim is to come, and the end once the
        table has nothing left for this runner."""
        while True:
            with self._lock:
                decision = self._buffer.popleft() if self._buffer else None
                if decision is not None:
                    self._pulled += 1
                ended = decision is None and self._exhausted
                low = claim_size(len(self._buffer), self._rate, self.workers) > 0
            if low and not ended:
                self._wake.set()
            if decision is not None:
                yield decision
            elif ended:
                return
            else:
                yield NOT_YET

    def finishing(self, work_id: str) -> None:
        """The run recorded the row's final state (done or failed); it is being written. A row
        taken over makes room for the next one."""
        with self._lock:
            self._finishing.add(work_id)
            freed = work_id in self._suspects
            self._suspects.discard(work_id)
        if freed and self._takeover_due:
            self._wake.set()

    def forget(self, work_ids: Iterable[str]) -> None:
        """These rows' final states are written: they are no longer this runner's."""
        with self._lock:
            for work_id in work_ids:
                self._held.discard(work_id)
                self._finishing.discard(work_id)
                self._suspects.discard(work_id)

    def stop_claiming(self) -> None:
        """The run is draining: claim nothing more (claims go on being extended)."""
        self._draining = True

    def drain_wakeups(self) -> None:
        try:
            while self.wakeup.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def release(self) -> bool:
        """Stop the heartbeat and give back (PENDING again) the rows claimed and not finished:
        the ones never run, and those cut short by a drain. Call after the write-back's last
        flush; nothing is given back unless the claims are still valid. True if released."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timing.request_timeout + 1.0)
        if self._released:
            return False
        with self._lock:
            rows = sorted(self._held - self._finishing)
        hung = self._thread is not None and self._thread.is_alive()
        if rows and not hung and self.status() == VALID:
            try:
                self._table.give_back(rows)
                self.given_back = len(rows)
                log.info("gave back %d claimed row(s) that did not run to their end: PENDING again", len(rows))
            except Exception as e:
                self._table.drop()
                log.warning("could not give back %d claimed row(s) (%s: %s); other runners take them over once "
                            "their claims expire, within %gs", len(rows), type(e).__name__, describe(e), self.ttl)
        elif rows:
            log.warning("%d claimed row(s) not given back (the claims are not valid now); other runners take "
                        "them over once their claims expire, within %gs", len(rows), self.ttl)
        self._released = True
        if not hung:
            self._table.drop()
        self.wakeup.close()
        self._wakeup_w.close()
        return True

    # -- the thread ------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        next_extension = self._clock() + self.timing.period
        while not self._stop.is_set():
            now = self._clock()
            if now >= next_extension:
                next_extension = now + self.timing.period  # counted send to send
                self._attempt("extend the claims", self._extend)
            if self._claim_due(self._clock()):
                self._attempt("claim rows", self._claim, claiming=True)
            wait = next_extension - self._clock()
            if not self._exhausted and self._next_claim > self._clock():
                wait = min(wait, self._next_claim - self._clock())
            self._wake.wait(max(0.0, wait))
            self._wake.clear()

    def _attempt(self, what: str, fn: Callable[[], None], *, claiming: bool = False) -> None:
        """Run one of the thread's operations; a failure is logged (once a minute at most),
        drops the connection, and, for a claim, delays the next one with backoff."""
        try:
            fn()
        except Exception as e:
            self._table.drop()
            now = self._clock()
            self.last_error = f"{type(e).__name__}: {describe(e)}"
            if claiming:
                self._ambiguous = True
                self.failing_since = self.failing_since if self.failing_since is not None else now
                self._polls += 1
                self._next_claim = now + poll_delay(self._polls, ttl=self.ttl, rand=self._rand())
            if now - self._warned_at >= RENEWAL_WARNING_EVERY:
                self._warned_at = now
                log.warning("could not %s on work table %s (%s); the claims stay valid for %.1fs more, then "
                            "nothing starts until the database answers", what, self.table, self.last_error,
                            max(0.0, self.valid_until - now))
            return
        if claiming and self.failing_since is not None:
            log.warning("claiming rows of work table %s again after %.1fs of failures", self.table,
                        self._clock() - self.failing_since)
            self.failing_since = None

    def _claim_due(self, now: float) -> bool:
        if self._exhausted or self._draining or self._stop.is_set() or now < self._next_claim \
                or self.status() != VALID:
            return False
        with self._lock:
            return (claim_size(len(self._buffer), self._rate, self.workers) > 0
                    or (self._takeover_due and len(self._suspects) < TAKEOVER_AHEAD))

    def _extend(self) -> None:
        """Extend every claim this runner holds; a count that differs from what it holds (or a
        claim whose answer was lost, or a lapse past the hard deadline) reads back which rows
        are its own: those another runner took are lost, those it did not know of (a claim that
        landed unheard) are given back. Validity moves only after that."""
        with self._lock:
            expected = set(self._held)
        lapsed = self._clock() >= self.hard_deadline
        self._table.connect()
        quiet = self.writing.acquire(timeout=self.timing.request_timeout)
        try:
            sent = self._clock()  # after connecting: validity counts from the extension's send
            count = self._table.extend()
        finally:
            if quiet:
                self.writing.release()
        if count != len(expected) or self._ambiguous or lapsed:
            self._reconcile(expected, self._table.mine())
            self._ambiguous = False
        with self._lock:
            if self._acked_sent is None or sent > self._acked_sent:
                self._acked_sent = sent

    def _reconcile(self, expected: set[str], running: set[str]) -> None:
        with self._lock:
            lost = lost_rows(expected & self._held, running, self._finishing)
            unknown = running - self._held
            for work_id in lost:
                self._held.discard(work_id)
                self._suspects.discard(work_id)
                self._lost.add(work_id)
            if lost:
                self._buffer = deque(d for d in self._buffer if row_id(d) not in lost)
        if lost:
            shown = ", ".join(sorted(lost)[:5]) + (" ..." if len(lost) > 5 else "")
            log.warning("%d row(s) that this runner held were taken over by another runner while their claims "
                        "had expired (%s): not run here", len(lost), shown)
        if unknown:
            self._table.give_back(sorted(unknown))
            log.info("gave back %d row(s) claimed by a claim whose answer was lost", len(unknown))

    def _claim(self) -> None:
        """Take over rows of expired claims (a few at a time: they run alone, first) and claim
        fresh rows when the buffer is low; with nothing at all, see whether anything is left."""
        now = self._clock()
        with self._lock:
            if now - self._rate_at > RATE_WINDOW:
                self._rate = smoothed_rate(self._rate, self._pulled, now - self._rate_at)
                self._pulled, self._rate_at = 0, now
            want = claim_size(len(self._buffer), self._rate, self.workers)
            room = TAKEOVER_AHEAD - len(self._suspects)
        taken: list[ClaimedRow] = []
        if room > 0 and (want > 0 or self._takeover_due):
            rows = self._table.claim(take_over=True, limit=room)
            self._takeover_due = len(rows) == room
            taken = [decide_row(*row, taken_over=True, max_attempts=self.max_attempts,
                                max_item_bytes=self.max_item_bytes) for row in rows]
        fresh: list[ClaimedRow] = []
        if want > 0:
            fresh = [decide_row(*row, taken_over=False, max_attempts=self.max_attempts,
                                max_item_bytes=self.max_item_bytes)
                     for row in self._table.claim(take_over=False, limit=want)]
        if taken or fresh:
            with self._lock:
                for decision in taken + fresh:
                    work_id = row_id(decision)
                    self._held.add(work_id)
                    if isinstance(decision, Task) and decision.suspect:
                        self._suspects.add(work_id)
                # Rows taken over go first: each waits for the workers to empty and runs alone,
                # so that they follow one another rather than each waiting out a full queue.
                self._buffer.extendleft(reversed(taken))
                self._buffer.extend(fresh)
            self.taken_over += len(taken)
            self._polls, self._next_claim, self._said_waiting = 0, 0.0, False
            self._notify()
            return
        if want > 0:
            self._nothing_to_claim()

    def _nothing_to_claim(self) -> None:
        """No row could be claimed: end if none is PENDING and no other runner holds any, else
        poll again later (and say once that the runner waits on other runners' rows)."""
        pending, others = self._table.left()
        if not pending and not others:
            self._exhausted = True
            log.info("work table %s: nothing left to claim (no PENDING row, no claim to take over)", self.table)
            self._notify()
            return
        self._polls += 1
        delay = poll_delay(self._polls, ttl=self.ttl, rand=self._rand())
        self._next_claim = self._clock() + delay
        if others and not pending and not self._said_waiting:
            self._said_waiting = True
            log.info("work table %s: nothing to claim now; %d row(s) are claimed by other runners: waiting to "
                     "take over the rows of any that dies (polling every %.0fs or less)", self.table, others,
                     min(POLL_CAP, self.ttl / 3))

    def _notify(self) -> None:
        try:
            self._wakeup_w.send(b"\0")
        except OSError:
            pass  # full (the loop has wake-ups waiting already) or closed

