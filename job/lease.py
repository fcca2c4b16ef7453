"""One runner per shard: a lease object next to the shard's manifest, taken and renewed with
conditional writes (S3 If-None-Match / If-Match; on a local directory an exclusive create and a
locked compare-and-replace), and judged only on the runner's own monotonic clock.

- **Holding.** The holder's validity is measured from when it *sent* the last renewal that the
  store acknowledged: it may start items and write until `valid_until` (that send time plus
  the TTL minus a margin), and nobody can take over before `hard_deadline` (the send time
  plus the TTL). A renewal that fails moves nothing; when validity runs out the lease is
  SUSPENDED (nothing starts, nothing is written) until a renewal with If-Match on the same
  ETag succeeds again (VALID), or the lease turns out to be another runner's (LOST, for good).
- **Taking over.** A runner takes a lease that does not exist or was released at once; a held
  one only after it has itself seen it unchanged (same ETag and token) for a full TTL by its
  own clock, as Kubernetes leader election does. Wall-clock fields in the object are for
  people: clock skew between hosts changes nothing.
- **Generation.** Each acquisition writes `generation` + 1 (1 for the first holder); the
  manifest puts it in the keys of what this runner writes, so that a runner that lost its
  lease can neither overwrite nor delete another generation's records. A release keeps the
  object (marked released) so that the next holder continues the count.
- **Ambiguous writes.** A write that timed out may have landed; a 412 on a lease this runner
  was creating or renewing is resolved by reading it back and recognising its own token and
  renewal number.

The timing (see `lease_timing` and docs/design.md, Guarantees) makes sure that one slow
request cannot carry a write past `hard_deadline`.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import BulkjobError, LeaseHeld, LeaseLost, PreconditionFailed
from .leaserules import (
    DEFAULT_TTL,
    LOST,
    RENEWAL_WARNING_EVERY,
    SUSPENDED,
    VALID,
    LeaseState,
    LeaseTiming,
    Watch,
    default_wait,
    holder_identity,
    judge_held,
    lease_timing,
    parse_lease,
)
from .store import Store

__all__ = ["DEFAULT_TTL", "LOST", "SUSPENDED", "VALID", "Lease", "LeaseState", "LeaseTiming", "Watch",
           "default_wait", "holder_identity", "judge_held", "lease_timing", "parse_lease"]

log = logging.getLogger("bulkjob.lease")

class Lease:
    """This runner's lease on one shard. `clock` is monotonic; nothing here reads the wall
    clock for a decision."""

    def __init__(self, store: Store, key: str, *, ttl: float = DEFAULT_TTL,
                 clock: Callable[[], float] = time.monotonic,
                 generation_floor: Callable[[], int] | None = None,
                 holder: dict[str, Any] | None = None) -> None:
        """`generation_floor` returns the highest generation already used in the shard (the
        manifest's keys): a lease object deleted by hand must not make a generation repeat."""
        self.store = store
        self.key = key
        self.ttl = ttl
        self.timing = lease_timing(ttl)
        bound = getattr(store, "request_timeout", None)
        if bound is not None and bound > self.timing.request_timeout + 1e-9:
            raise ValueError(
                f"the store's requests may take {bound:g}s, more than the {self.timing.request_timeout:g}s "
                f"a {ttl:g}s lease allows: open it with request_timeout=lease_timing(ttl).request_timeout")
        self.clock = clock
        self.token = secrets.token_hex(8)
        self.holder = holder or holder_identity()
        self.generation = 0
        self._floor = generation_floor or (lambda: 0)
        self._acquired_at_wall = 0.0
        self._etag: str | None = None
        self._acked_sent: float | None = None
        self._renewal = 0
        #: Renewal number -> monotonic send time, for writes not yet acknowledged.
        self._unacked: dict[int, float] = {}
        self._lost: str | None = None
        self._released = False
        self._was_valid = False
        self._warned_at = float("-inf")
        self._lock = threading.RLock()
        self._stop = threading.Event()
        #: Never set: acquire() waits on it (a sleep that libfaketime and signals leave alone).
        self._pause = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the run asks -----------------------------------------------------------------

    @property
    def valid_until(self) -> float:
        """Monotonic time after which no item starts and nothing is written (-inf when not held)."""
        sent = self._acked_sent
        return float("-inf") if sent is None else sent + self.timing.validity

    @property
    def hard_deadline(self) -> float:
        """Monotonic time before which no other runner can take over: the send time of the last
        acknowledged renewal plus the TTL. Items still running then must be stopped."""
        sent = self._acked_sent
        return float("-inf") if sent is None else sent + self.ttl

    def status(self) -> str:
        """VALID (may start items and write), SUSPENDED (may not, may become VALID again) or
        LOST (another runner has the shard, or this one released it: for good)."""
        if self._lost is not None or self._released:
            return LOST
        if self._acked_sent is None:
            return SUSPENDED
        return VALID if self.clock() < self.valid_until else SUSPENDED

    def writable(self) -> bool:
        """True while the lease is VALID: items may start and writes may go out."""
        return self.status() == VALID

    def fence(self) -> bool:
        """The fence of the background writers (job.writer): True while VALID, False while
        SUSPENDED (hold the writes), and LeaseLost once LOST (never write again)."""
        status = self.status()
        if status == LOST:
            raise LeaseLost(f"the lease on this shard is gone ({self._lost or 'released'})")
        return status == VALID

    @property
    def suspended_since(self) -> float | None:
        """Monotonic time validity ran out, while SUSPENDED; else None."""
        if self._lost is not None or self._released or self._acked_sent is None:
            return None
        until = self.valid_until
        return until if self.clock() >= until else None

    @property
    def lost_because(self) -> str | None:
        return self._lost

    # -- taking it -------------------------------------------------------------------------

    def acquire(self, *, wait: float = 0.0, on_wait: Callable[[LeaseState | None], None] | None = None) -> None:
        """Take the lease, watching a held one for up to `wait` seconds.

        Creates it (If-None-Match), takes over a released one at once, or one this runner has
        seen unchanged for a full TTL. Raises LeaseHeld naming the holder when another runner
        keeps renewing past `wait`; StoreUnavailable when the store cannot be reached (the
        caller treats it as an outage and may call acquire again: an earlier write of ours
        that landed is recognised). `on_wait(state)` is called about every heartbeat period
        while watching.
        """
        deadline = self.clock() + wait
        watch: Watch | None = None
        noted = float("-inf")
        while True:
            found = self.store.get(self.key)
            now = self.clock()
            if found is None:
                if self._write_lease(None, max(1, self._floor() + 1)):
                    return
                continue
            data, etag = found
            state = parse_lease(data)
            if state is not None and state.token == self.token and self._adopt(state, etag):
                return
            take = state is not None and state.released
            if not take:
                take, watch = judge_held(watch, etag, state, now, self.ttl)
            if take:
                generation = max(state.generation if state else 0, self._floor()) + 1
                if self._write_lease(etag, generation, previous=state):
                    return
                watch = None
                continue
            if now >= deadline:
                what = state.describe() if state else "an unreadable lease object"
                raise LeaseHeld(f"another runner holds this shard: {what}; watched for {wait:.0f}s and it "
                                f"was renewed or is not yet {max(self.ttl, state.ttl if state else 0):g}s old "
                                f"(lease {self.key})")
            if on_wait is not None and now - noted >= self.timing.period:
                noted = now
                on_wait(state)
            pause = min(self.timing.period, deadline - now)
            if watch is not None:
                pause = min(pause, watch.since + max(self.ttl, state.ttl if state else 0.0) - now)
            self._pause.wait(max(pause, 0.01))

    def _body(self, renewal: int, *, released: bool = False) -> bytes:
        return json.dumps({"holder": self.holder, "token": self.token, "generation": self.generation,
                           "ttl": self.ttl, "renewal": renewal, "acquired_at": self._acquired_at_wall,
                           "renewed_at": time.time(), "released": released}).encode()

    def _write_lease(self, etag: str | None, generation: int, previous: LeaseState | None = None) -> bool:
        """Create (etag None) or take over the lease with `generation`; True if it is ours."""
        with self._lock:
            self.generation = generation
            self._acquired_at_wall = time.time()
            self._renewal += 1
            renewal = self._renewal
            sent = self.clock()
            self._unacked[renewal] = sent
            try:
                if etag is None:
                    new_etag = self.store.put_new(self.key, self._body(renewal))
                else:
                    new_etag = self.store.put_replacing(self.key, self._body(renewal), etag)
            except PreconditionFailed:
                found = self.store.get(self.key)
                if found is None:
                    return False
                state = parse_lease(found[0])
                return state is not None and state.token == self.token and self._adopt(state, found[1])
            self._ack(renewal, new_etag)
        if previous is not None and not previous.released:
            log.warning("took over the lease (generation %d) after watching it unchanged for %gs: %s",
                        generation, max(self.ttl, previous.ttl), previous.describe())
        else:
            log.debug("took the lease on this shard (generation %d)", generation)
        return True

    def _adopt(self, state: LeaseState, etag: str) -> bool:
        """A lease object holding our token: a write of ours that landed although we did not
        hear back. True if it is one we sent (its validity counts from that send)."""
        with self._lock:
            sent = self._unacked.get(state.renewal)
            if sent is None or state.released:
                return False
            self.generation = state.generation
            self._ack(state.renewal, etag)
            return True

    def _ack(self, renewal: int, etag: str) -> None:
        sent = self._unacked[renewal]
        self._etag = etag
        if self._acked_sent is None or sent > self._acked_sent:
            self._acked_sent = sent
        for n in [n for n in self._unacked if n <= renewal]:
            del self._unacked[n]

    # -- keeping it ------------------------------------------------------------------------

    def renew(self) -> str:
        """Send one renewal (If-Match the last ETag we wrote); returns the status after it.

        A store that cannot be reached changes nothing (validity runs out on its own); a 412
        is resolved by reading the lease back: our token means one of our writes landed, any
        other means another runner took the shard (LOST)."""
        with self._lock:
            if self._lost is not None or self._released or self._etag is None:
                return self.status()
            self._renewal += 1
            renewal = self._renewal
            self._unacked[renewal] = self.clock()
            try:
                etag = self.store.put_replacing(self.key, self._body(renewal), self._etag)
            except PreconditionFailed:
                self._resolve_conflict()
            except (BulkjobError, OSError) as e:
                now = self.clock()
                if now - self._warned_at >= RENEWAL_WARNING_EVERY:
                    self._warned_at = now
                    log.warning("could not renew the lease (%s); it stays valid for %.1fs more, then suspends",
                                e, max(0.0, self.valid_until - now))
            else:
                self._ack(renewal, etag)
                self._warned_at = float("-inf")
        return self._note_status()

    def _resolve_conflict(self) -> None:
        try:
            found = self.store.get(self.key)
        except (BulkjobError, OSError) as e:
            log.warning("a renewal met a conflict and the lease could not be read back (%s)", e)
            return
        if found is None:
            self._mark_lost("the lease object is gone")
            return
        state = parse_lease(found[0])
        if state is not None and state.token == self.token and self._adopt(state, found[1]):
            return
        self._mark_lost(f"another runner took it: {state.describe() if state else 'unreadable lease object'}")

    def _mark_lost(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
            log.error("lost the lease on this shard (%s): stopping without writing more", why)

    def _note_status(self) -> str:
        status = self.status()
        if status == VALID and not self._was_valid:
            self._was_valid = True
        elif status == SUSPENDED and self._was_valid:
            self._was_valid = False
            log.error("the lease could not be renewed in time: starting no item and writing nothing "
                      "until the store answers (lease %s)", self.key)
        return status

    def start(self) -> None:
        """Start the heartbeat thread: a renewal every `timing.period`, counted send to send."""
        self._was_valid = self.status() == VALID
        self._thread = threading.Thread(target=self._heartbeat, name="bulkjob-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        next_send = self.clock() + self.timing.period
        while not self._stop.wait(max(0.0, next_send - self.clock())):
            if self._lost is not None:
                return
            next_send = self.clock() + self.timing.period
            try:
                before = self.status()
                after = self.renew()
                if before == SUSPENDED and after == VALID:
                    log.warning("the lease is renewed again: going on where the run stopped")
            except Exception:
                log.exception("lease heartbeat: unexpected error (will try again)")

    def release(self) -> bool:
        """Stop the heartbeat and mark the lease released if it is still ours, so that the next
        runner takes it at once and continues the generation count. True if released."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timing.request_timeout + 1.0)
        with self._lock:
            if self._lost is not None or self._released or self._etag is None:
                return False
            for _ in range(2):
                self._renewal += 1
                renewal = self._renewal
                self._unacked[renewal] = self.clock()
                try:
                    self.store.put_replacing(self.key, self._body(renewal, released=True), self._etag)
                except PreconditionFailed:
                    self._resolve_conflict()
                    if self._lost is not None:
                        return False
                    continue
                except (BulkjobError, OSError) as e:
                    log.warning("could not release the lease (it expires by itself): %s", e)
                    return False
                self._released = True
                return True
        return False
