"""One runner per shard: a lease object next to the shard's manifest, taken and renewed with
conditional writes (S3 If-None-Match / If-Match; an exclusive create in a local directory).

A zombie pod and its retry must not both run a shard's items. The runner that creates the
lease (or replaces an expired one) holds it while it renews it every `ttl / 3` seconds; a
renewal that finds the object changed means another runner took over, and this one must stop
at once and write nothing more. A runner that cannot reach the store to renew gives the lease
up by itself just before it would expire, so the two never write in the same period as long as
their clocks differ by less than `SAFETY` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from .errors import BulkjobError, LeaseHeld, PreconditionFailed
from .store import Store

log = logging.getLogger("bulkjob.lease")

#: Default seconds a lease lasts without renewal: how long a restart after a hard crash
#: (SIGKILL, OOM, node loss) waits before it may take the shard over.
DEFAULT_TTL = 30.0
#: Seconds before its expiry at which a runner that could not renew considers the lease lost
#: (a quarter of the TTL if that is less); covers clock skew between two runners' hosts and the
#: time of one store request.
SAFETY = 5.0


def holder_identity() -> dict[str, Any]:
    """Who holds a lease: pod name (HOSTNAME in Kubernetes), host and pid."""
    return {"pod": os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname(),
            "host": socket.gethostname(), "pid": os.getpid()}


@dataclass(frozen=True, slots=True)
class LeaseState:
    """What a lease object says."""

    holder: dict[str, Any]
    token: str
    acquired_at: float
    expires_at: float

    def describe(self) -> str:
        h = self.holder
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.acquired_at))
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.expires_at))
        return f"pod {h.get('pod')} (host {h.get('host')}, pid {h.get('pid')}) since {since}Z, expires {until}Z"


def parse_lease(data: bytes) -> LeaseState | None:
    """The lease in an object, or None if it cannot be read (treated as expired)."""
    try:
        doc = json.loads(data)
        return LeaseState(dict(doc["holder"]), str(doc["token"]), float(doc["acquired_at"]),
                          float(doc["expires_at"]))
    except (ValueError, KeyError, TypeError):
        return None


class Lease:
    """This runner's lease on one shard."""

    def __init__(self, store: Store, key: str, *, ttl: float = DEFAULT_TTL) -> None:
        self.store = store
        self.key = key
        self.ttl = ttl
        self.token = secrets.token_hex(8)
        self.holder = holder_identity()
        self.acquired_at = 0.0
        self.expires_at = 0.0
        self._etag: str | None = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self, now: float) -> bytes:
        self.expires_at = now + self.ttl
        return json.dumps({"holder": self.holder, "token": self.token, "acquired_at": self.acquired_at,
                           "renewed_at": now, "expires_at": self.expires_at}).encode()

    def acquire(self, *, now: float | None = None) -> None:
        """Take the lease, or raise LeaseHeld naming the live holder."""
        now = time.time() if now is None else now
        self.acquired_at = now
        found = self.store.get(self.key)
        try:
            if found is None:
                self._etag = self.store.put_new(self.key, self._body(now))
                return
            current = parse_lease(found[0])
            if current is not None and current.expires_at > now:
                raise LeaseHeld(f"another runner holds this shard: {current.describe()}; "
                                f"it expires unless renewed (lease {self.key})")
            self._etag = self.store.put_replacing(self.key, self._body(now), found[1])
            if current is not None:
                log.warning("took over an expired lease from %s", current.describe())
        except PreconditionFailed:
            found = self.store.get(self.key)
            current = parse_lease(found[0]) if found else None
            what = current.describe() if current else "unknown"
            raise LeaseHeld(f"another runner took this shard at the same moment: {what}") from None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    @property
    def valid_until(self) -> float:
        """Wall-clock time after which this runner must not start items or write."""
        return self.expires_at - min(SAFETY, self.ttl / 4)

    def valid(self) -> bool:
        """True while this runner may still write: not lost, and not about to expire."""
        if self._lost.is_set():
            return False
        if time.time() > self.valid_until:
            self._mark_lost("it could not be renewed before it expired")
            return False
        return True

    def _mark_lost(self, why: str) -> None:
        if not self._lost.is_set():
            log.error("lost the lease on this shard (%s): stopping without writing more", why)
            self._lost.set()

    def renew(self) -> None:
        """Extend the lease; marks it lost if another runner replaced it, or if it is already
        past its validity (a runner stalled that long may have been taken over, and must not
        extend a lease that another runner could be about to take)."""
        if not self.valid():
            return
        try:
            self._etag = self.store.put_replacing(self.key, self._body(time.time()), self._etag or "")
        except PreconditionFailed:
            self._mark_lost("another runner replaced it")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="bulkjob-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        period = self.ttl / 3
        while not self._stop.wait(period) and not self._lost.is_set():
            try:
                self.renew()
            except BulkjobError as e:
                log.warning("could not renew the lease (will retry): %s", e)
            self.valid()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours, so a rerun need not wait."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._lost.is_set():
            return
        try:
            found = self.store.get(self.key)
            if found is not None and found[1] == self._etag:
                self.store.delete([self.key])
        except BulkjobError as e:
            log.warning("could not release the lease (it expires by itself): %s", e)
