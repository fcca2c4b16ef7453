"""The one shape of the parent's background writers (the manifest's checkpoints, the work
table's write-back): a thread that writes what the run added, in batches, on a timer.

The run only adds; writing happens here, so a slow or unreachable store never stalls the
dispatch of items. Every write is preceded by the fence (the lease's `fence`: False holds the
writes back, LeaseLost ends them for good: nothing is written by a runner that may no longer
hold the shard). A failed write keeps its batch and is tried again
with the one backoff of job.retry; every exception is caught, so that an error such as ENOSPC
never ends the thread silently, and a failure that persists shows in `failing_since`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import BulkjobError, Fenced, LeaseLost
from .retry import backoff_delay

log = logging.getLogger("bulkjob.writer")

#: Seconds between looks at a closed fence: the lease may come back at any renewal.
FENCE_POLL = 0.5
#: The random part of the backoff between failed writes: equal jitter, so that a store that
#: comes back is tried again within the step and writers of many pods do not retry together.
RETRY_JITTER = 0.5

Batch = TypeVar("Batch")


class BackgroundWriter(Generic[Batch]):
    """A writer thread. Subclasses keep the buffer, guarded by `self.lock`, and implement:

    - `_collect() -> Batch | None` (lock held): what to write next, or None when there is nothing;
    - `_write(batch)` (lock not held): the I/O; raises on failure; a subclass that makes several
      writes calls `check_fence()` before each one after the first;
    - `_written(batch)` (lock held): after the batch is durable;
    - `_kept(batch)` (lock held): after a failure or a closed fence: keep it for the next try;
    - optionally `_after()` (lock not held): more work after a successful write (a compaction);
      what it raises is logged, and never undoes the write;
    - `unsaved` (property): how many things added are not durable yet.

    Each add takes a ticket (`_ticket()`, lock held); a batch carries the last ticket it covers
    (`upto`, passed to `_written`), so that `flush()` knows when everything added before it
    is durable.
    """

    def __init__(self, *, name: str, interval: float, retry_base: float, retry_cap: float,
                 fence: Callable[[], bool] | None = None, clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random) -> None:
        self.name = name
        self.interval = interval
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.fence = fence or (lambda: True)
        self.clock = clock
        self._rand = rand
        self.lock = threading.Lock()
        self._cond = threading.Condition(self.lock)
        self._wake = threading.Event()
        self._added = 0
        self._durable = 0
        self._wanted = 0
        self._closing = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: Successful writes and failed attempts (a closed fence is neither).
        self.writes = 0
        self.failures = 0
        #: Monotonic time of the first failure of the current streak, None once a write succeeds.
        self.failing_since: float | None = None
        #: Monotonic time since when the fence has held writes back, None while it is open.
        self.fenced_since: float | None = None
        self.last_error: str | None = None
        #: Why nothing will ever be written again (the lease was lost), or None.
        self.gone: str | None = None

    # -- for subclasses --------------------------------------------------------------------

    def _ticket(self) -> int:
        """A new ticket for something just added (call with the lock held)."""
        self._added += 1
        return self._added

    def check_fence(self) -> None:
        """Raise Fenced if the fence is closed (LeaseLost if for good): call before each further
        write of a batch."""
        if not self.fence():
            raise Fenced(f"{self.name}: the lease does not allow writing now")

    def _collect(self) -> tuple[Batch, int] | None:
        raise NotImplementedError

    def _write(self, batch: Batch) -> None:
        raise NotImplementedError

    def _written(self, batch: Batch) -> None:
        raise NotImplementedError

    def _kept(self, batch: Batch) -> None:
        raise NotImplementedError

    def _after(self) -> None:
        return None

    @property
    def unsaved(self) -> int:
        raise NotImplementedError

    # -- for the run -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"bulkjob-{self.name}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Write now instead of at the next interval."""
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Write everything added so far now; True if it is all durable within `timeout`."""
        deadline = time.monotonic() + timeout
        with self.lock:
            target = self._added
            self._wanted = max(self._wanted, target)
        self._wake.set()
        with self.lock:
            while self._durable < target:
                left = deadline - time.monotonic()
                if left <= 0 or self.gone is not None or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self, timeout: float) -> bool:
        """Flush for up to `timeout` seconds and stop the thread; True if nothing added was left
        unwritten. A write under way when the time is up is not waited for."""
        self._closing = True
        ok = self.flush(timeout)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=0.5 if ok else 0.1)
        return ok and self.unsaved == 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.interval
        streak = 0
        while not self._stopping:
            self._wake.wait(delay)
            self._wake.clear()
            if self._stopping:
                return
            outcome = self._cycle()
            if outcome == "gone":
                with self.lock:
                    self._cond.notify_all()
                return
            if outcome == "failed":
                streak += 1
                delay = backoff_delay(streak, base=self.retry_base, cap=self.retry_cap, rand=self._rand(),
                                      jitter=RETRY_JITTER)
                continue
            streak = 0
            if outcome == "fenced":
                delay = min(self.interval, FENCE_POLL)
            elif outcome == "written" and self._durable < self._wanted:
                delay = 0.0  # a flush is waiting for records added after this batch was taken
            else:
                delay = self.interval

    def _cycle(self) -> str:
        """One try: "idle" (nothing to write), "written", "fenced", "failed" or "gone"."""
        try:
            with self.lock:
                collected = self._collect()
                if collected is None:
                    self._durable = self._added
                    self._cond.notify_all()
                    return "idle"
            batch, upto = collected
            try:
                open_now = self.fence()
            except LeaseLost as e:
                return self._gone(batch, e)
            if not open_now:
                with self.lock:
                    self._kept(batch)
                if self.fenced_since is None:
                    self.fenced_since = self.clock()
                return "fenced"
            self.fenced_since = None
            try:
                self._write(batch)
            except LeaseLost as e:
                return self._gone(batch, e)
            except Fenced:
                with self.lock:
                    self._kept(batch)
                if self.fenced_since is None:
                    self.fenced_since = self.clock()
                return "fenced"
            except Exception as e:
                with self.lock:
                    self._kept(batch)
                self._on_failure(e)
                return "failed"
            failing_since = self.failing_since
            with self.lock:
                self._written(batch)
                self._durable = max(self._durable, upto)
                self.writes += 1
                self.failing_since = None
                self.last_error = None
                self._cond.notify_all()
            if failing_since is not None:
                log.warning("%s: writing again after %.1fs of failures", self.name, self.clock() - failing_since)
            try:
                self._after()
            except (Fenced, LeaseLost):
                pass
            except Exception:
                log.exception("%s: unexpected error after a write (will try again)", self.name)
            return "written"
        except Exception:
            # A bug in the buffer handling: say so loudly, keep the thread and try again later.
            log.exception("%s: unexpected error in the writer thread (will try again)", self.name)
            self.failures += 1
            if self.failing_since is None:
                self.failing_since = self.clock()
            return "failed"

    def _gone(self, batch: Batch, exc: LeaseLost) -> str:
        with self.lock:
            self._kept(batch)
        self.gone = str(exc)
        log.error("%s: writing nothing more, %d unsaved: %s", self.name, self.unsaved, exc)
        return "gone"

    def _on_failure(self, exc: BaseException) -> None:
        self.failures += 1
        first = self.failing_since is None
        if first:
            self.failing_since = self.clock()
        self.last_error = f"{type(exc).__name__}: {describe(exc)}"
        known = isinstance(exc, (BulkjobError, OSError))
        log.warning("%s: write failed (%s); %d kept, will retry", self.name, self.last_error, self.unsaved,
                    exc_info=None if known or not first else exc)


def describe(exc: BaseException) -> str:
    """The first line of an exception's message (drivers put details on later lines)."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
