"""The run's decisions: which task goes to a worker next, what a failed attempt leads to, when
dispatch pauses for an outage and when it probes, how many tasks wait at each worker.

Pure: no processes, no I/O, no sleeping. The clock is the `now` passed to each call
(monotonic seconds) and randomness comes from the `rand` callable, so every decision is
tested with plain values. `job.engine` feeds it the pool's events and carries out its answers.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .outcome import CONFIG, Failure
from .retry import RetryPolicy, backoff_delay

#: Adaptive depth (--prefetch 0): the work queued at each worker, in seconds of item time.
#: Enough that a worker finishing a short item finds the next one waiting instead of a round
#: trip through the parent; little enough that a drain or the run's uneven tail costs at most
#: that much. Bounded by MIN_DEPTH (the running item plus one) and MAX_DEPTH tasks.
QUEUED_SECONDS = 0.02
MIN_DEPTH = 2
MAX_DEPTH = 64
#: Weight of the newest item in the moving average of item time.
DEPTH_SMOOTHING = 0.1

#: Environment failures from this many different items in a row (no success between) open
#: the breaker; one failed connect opens it at once. A single session killed in mid-item is
#: not an outage: that item goes straight back to the queue.
OUTAGE_ITEMS = 2
#: Probes while paused: the first after about PROBE_BASE s, each wait PROBE_FACTOR times the
#: last, never more than PROBE_CAP s, half of each wait random (workers of many pods must not
#: probe a recovering database in step). A factor below 2 keeps the time from the database's
#: return to the next probe short: at most about a third of the outage so far.
PROBE_BASE = 0.5
PROBE_FACTOR = 1.5
PROBE_CAP = 30.0
PROBE_JITTER = 0.5
#: An item whose environment failures keep coming while every other item succeeds is not
#: meeting an outage: after this many refunds outside an outage, its failures spend attempts.
MAX_REFUNDS = 5


class NotYet:
    """The type of NOT_YET."""

    def __repr__(self) -> str:
        return "NOT_YET"


#: What an item source yields when it has nothing now but may have more later (a work table's
#: claim queue waiting for its next batch): the scheduler asks again at its next take.
NOT_YET = NotYet()


@dataclass(slots=True)
class Task:
    """One attempt of one item, handed to a worker: the pool sends `wire()`."""

    item_id: str
    payload: dict[str, Any]
    #: This attempt's number (1-based), counted across restarts of the run.
    attempt: int
    progress: dict[str, Any] | None = None
    #: The attempt from which this item's --max-attempts are counted: 1, or later when
    #: --retry-failed gives a failed item a new set of attempts.
    budget_from: int = 1
    #: Environment failures refunded outside an outage so far (in this process).
    refunds: int = 0
    #: The run died while this item ran: it runs alone, its start recorded first.
    suspect: bool = False
    #: Its start must be durable in the manifest before it is handed out (see `careful`).
    record_start: bool = False

    def wire(self) -> tuple[str, dict[str, Any], int, dict[str, Any] | None]:
        return (self.item_id, self.payload, self.attempt, self.progress)

    @property
    def spent(self) -> int:
        """Attempts of the current budget used once this one ends."""
        return self.attempt - self.budget_from + 1


# What a failed attempt leads to.
RETRY = "retry"      # try again after `delay` seconds; the attempt counts
FAIL = "fail"        # record the item failed for good
REFUND = "refund"    # an environment failure: back to the queue, the attempt does not count
STOP = "stop"        # a configuration error: stop the run (exit 2), the attempt does not count


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str
    delay: float = 0.0
    #: The breaker opened with this failure.
    opened: bool = False
    #: The breaker closed with this failure (an item failure answered a probe).
    closed: Outage | None = None


@dataclass(slots=True)
class Outage:
    """One pause of dispatch: when, how long, why."""

    started: float
    reason: str
    system: str | None
    ended: float | None = None
    probes: int = 0
    refunded: int = 0

    def seconds(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.started


@dataclass(slots=True)
class Breaker:
    """The outage breaker: closed while the environment answers; open (dispatch paused) from
    the moment environment failures say it does not, until a probe succeeds."""

    outage: Outage | None = None
    #: Items whose environment failures arrived in a row, since the last success.
    streak: set[str] = field(default_factory=set)
    probe_at: float = 0.0
    #: The item sent as the probe, while it runs.
    probe: str | None = None
    history: list[Outage] = field(default_factory=list)

    @property
    def open(self) -> bool:
        return self.outage is not None

    def failed(self, item_id: str, failure: Failure, now: float, rand: float) -> bool:
        """An environment failure arrived; True when it opens the breaker."""
        if self.outage is not None:
            self.outage.refunded += 1
            if item_id == self.probe:
                self.probe = None
                self._schedule_probe(now, rand)
            return False
        self.streak.add(item_id)
        if not (failure.connecting or len(self.streak) >= OUTAGE_ITEMS):
            return False
        reason = f"{failure.error_class}{f' {failure.code}' if failure.code else ''}: {failure.message}"
        self.outage = Outage(now, reason.splitlines()[0][:200], failure.system, refunded=len(self.streak))
        self.streak.clear()
        self._schedule_probe(now, rand)
        return True

    def answered(self, now: float) -> Outage | None:
        """The environment answered (a success, or a failure that is the item's own); the
        outage that this ends, if one was open."""
        self.streak.clear()
        if self.outage is None:
            return None
        ended, self.outage = self.outage, None
        ended.ended = now
        self.probe = None
        self.history.append(ended)
        return ended

    def probe_due(self, now: float) -> bool:
        return self.outage is not None and self.probe is None and now >= self.probe_at

    def probe_sent(self, item_id: str) -> None:
        assert self.outage is not None
        self.probe = item_id
        self.outage.probes += 1

    def probe_unsent(self, item_id: str) -> None:
        """The probe never ran (sent back unstarted): another is due at once."""
        if item_id == self.probe:
            self.probe = None

    def _schedule_probe(self, now: float, rand: float) -> None:
        assert self.outage is not None
        self.probe_at = now + backoff_delay(self.outage.probes + 1, base=PROBE_BASE, cap=PROBE_CAP,
                                            rand=rand, jitter=PROBE_JITTER, factor=PROBE_FACTOR)


class Scheduler:
    """The unstarted queue, the retry heap, the outage breaker and the adaptive depth."""

    def __init__(self, todo: Iterator[Task | NotYet], *, policy: RetryPolicy, rand: Callable[[], float],
                 fixed_depth: int | None = None) -> None:
        self._todo = todo
        self.policy = policy
        self._rand = rand
        self._retries: list[tuple[float, int, Task]] = []
        #: Tasks to send before new items: sent back unstarted, refunded, or suspects.
        self._queue: deque[Task] = deque()
        self._sequence = 0
        #: The next new item, read ahead so that `finished()` can tell whether any are left.
        self._peeked: Task | None = None
        self._exhausted = False
        self.breaker = Breaker()
        #: Tasks refunded while the breaker was closed, since the environment last answered:
        #: if the failures in a row open the breaker, theirs were an outage's too.
        self._unproven: list[Task] = []
        self.fixed_depth = fixed_depth
        self.depth = fixed_depth or MIN_DEPTH
        self._item_seconds: float | None = None
        #: Tasks still to hand out one per worker with their start recorded first: after a run
        #: that died without a word, so that an item that kills the whole pod is caught in the act.
        self.careful = 0
        #: A suspect waiting for the workers to empty, and the one running alone.
        self._held: Task | None = None
        self._alone: str | None = None

    # -- what goes out next -----------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self.breaker.open

    @property
    def worker_depth(self) -> int:
        """Tasks a worker may hold now: one while starts are recorded first (every task handed
        out is then running, so a crash is charged only to what ran), else the depth."""
        return 1 if self.careful or self._alone is not None else self.depth

    def take(self, room: int, now: float, *, busy: int = 0) -> list[Task]:
        """Up to `room` tasks to hand out now, `busy` tasks being out already: the queue, then
        retries that are due, then new items. While paused, only a probe when one is due. A
        suspect goes out alone, once nothing else is out, and nothing follows it until it ends."""
        if room < 1 or self._alone is not None:
            return []
        if self._held is not None:
            if busy:
                return []
            task, self._held = self._held, None
            return self._mark([self._go_alone(task)])
        if self.breaker.open:
            if not self.breaker.probe_due(now):
                return []
            probe = self._next(now)
            if probe is None:
                return []
            if probe.suspect and busy:
                self._held = probe
                return []
            self.breaker.probe_sent(probe.item_id)
            return self._mark([self._go_alone(probe) if probe.suspect else probe])
        batch: list[Task] = []
        while len(batch) < room:
            found = self._next(now)
            if found is None:
                break
            if found.suspect:
                if busy or batch:
                    self._held = found
                    break
                return self._mark([self._go_alone(found)])
            batch.append(found)
        return self._mark(batch)

    def _go_alone(self, task: Task) -> Task:
        self._alone = task.item_id
        return task

    def _mark(self, batch: list[Task]) -> list[Task]:
        for task in batch:
            task.record_start = task.suspect or self.careful > 0
            self.careful = max(0, self.careful - 1)
        return batch

    def _ended(self, task: Task) -> None:
        if task.item_id == self._alone:
            self._alone = None

    def _next(self, now: float) -> Task | None:
        if self._queue:
            return self._queue.popleft()
        if self._retries and self._retries[0][0] <= now:
            return heapq.heappop(self._retries)[2]
        if self._peek():
            task, self._peeked = self._peeked, None
            return task
        return None

    def _peek(self) -> bool:
        """Whether a new item is ready now (reading one ahead if needed); a source that says
        NOT_YET is asked again next time."""
        if self._peeked is None and not self._exhausted:
            found = next(self._todo, None)
            if isinstance(found, NotYet):
                return False
            self._peeked = found
            self._exhausted = found is None
        return self._peeked is not None

    def put_back(self, tasks: list[Task]) -> None:
        """Tasks that never started (sent back by a draining worker, left queued at a dead one,
        or not accepted by a worker's pipe): they go out again first, in their order, with
        their attempt unchanged."""
        self._queue.extendleft(reversed(tasks))
        for task in tasks:
            self.breaker.probe_unsent(task.item_id)
            self._ended(task)

    def discard(self, task: Task) -> None:
        """A task taken but not to be run after all (its work-table claim went to another
        runner): forget it, as if it had ended."""
        self.breaker.probe_unsent(task.item_id)
        self._ended(task)

    def finished(self) -> bool:
        """Nothing left to hand out: new items, retries and the queue are all used up, and the
        source has said it has no more."""
        return (not self._retries and not self._queue and self._held is None and not self._peek()
                and self._exhausted)

    def next_wake(self, now: float) -> float | None:
        """Seconds until a retry or a probe falls due (None: nothing is waiting on time)."""
        times = []
        if self._retries:
            times.append(self._retries[0][0])
        if self.breaker.open and self.breaker.probe is None:
            times.append(self.breaker.probe_at)
        return max(0.0, min(times) - now) if times else None

    @property
    def waiting_retries(self) -> int:
        return len(self._retries)

    # -- what an ended attempt leads to -------------------------------------------------------

    def succeeded(self, task: Task, seconds: float, now: float) -> Outage | None:
        """An attempt ended well; returns the outage this ends, if one was open."""
        self._ended(task)
        if self.fixed_depth is None:
            self._adapt_depth(seconds)
        self._unproven.clear()
        return self.breaker.answered(now)

    def failed(self, task: Task, failure: Failure, now: float, *,
               progress: dict[str, Any] | None = None) -> Verdict:
        """What to do after `task` failed with `failure`; `progress` is what the attempt kept
        (for example its last committed step), carried to the next attempt."""
        self._ended(task)
        if progress is not None:
            task.progress = progress
        if failure.kind == CONFIG:
            return Verdict(STOP)
        if failure.environment:
            opened = self.breaker.failed(task.item_id, failure, now, self._rand())
            if opened:
                # The failures in a row before this one were the outage's, not their items'.
                for earlier in self._unproven:
                    earlier.refunds = max(0, earlier.refunds - 1)
                self._unproven.clear()
            # During an outage the item is not to blame, however often it meets it; outside
            # one, only so often (see MAX_REFUNDS).
            if self.breaker.open or task.refunds < MAX_REFUNDS:
                if not self.breaker.open:
                    task.refunds += 1
                    self._unproven.append(task)
                self._queue.appendleft(task)
                return Verdict(REFUND, opened=opened)
        self._unproven.clear()
        closed = self.breaker.answered(now)
        if failure.environment:
            failure = Failure("retryable", failure.error_class, failure.message, code=failure.code)
        delay = self.policy.next_delay(task.spent, failure, rand=self._rand())
        if delay is None:
            return Verdict(FAIL, closed=closed)
        retry = Task(task.item_id, task.payload, task.attempt + 1, task.progress, task.budget_from,
                     task.refunds, suspect=task.suspect)
        self._sequence += 1
        heapq.heappush(self._retries, (now + delay, self._sequence, retry))
        return Verdict(RETRY, delay=delay, closed=closed)

    def _adapt_depth(self, seconds: float) -> None:
        """Queue about QUEUED_SECONDS of work at each worker, by a moving average of item time."""
        if self._item_seconds is None:
            self._item_seconds = seconds
        else:
            self._item_seconds += DEPTH_SMOOTHING * (seconds - self._item_seconds)
        self.depth = max(MIN_DEPTH, min(MAX_DEPTH, math.ceil(QUEUED_SECONDS / max(self._item_seconds, 1e-6))))
