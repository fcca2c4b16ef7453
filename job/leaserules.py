"""The lease's rules: its timing arithmetic, what its object holds, and a taker's judgement of a
held lease. Pure: the clock's readings and the object's bytes are passed in (job.lease acts).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

VALID = "valid"
SUSPENDED = "suspended"
LOST = "lost"

#: Default seconds a lease lasts without renewal: how long a restart after a hard crash
#: (SIGKILL, OOM, node loss) waits before it may take the shard over.
DEFAULT_TTL = 30.0
#: The heartbeat sends a renewal every TTL/6 (5 s by default): three renewals fit in the
#: validity, so two in a row may fail or be slow without the lease running out.
PERIOD_SHARE = 1 / 6
#: Longest one store request may take (connect + read timeout, one attempt), TTL/6 (5 s):
#: shorter than the margin, so a write sent before `valid_until` lands before `hard_deadline`.
REQUEST_SHARE = 1 / 6
#: Seconds between two warnings about renewals that keep failing (one per period is noise).
RENEWAL_WARNING_EVERY = 60.0
#: The margin between `valid_until` and `hard_deadline`, TTL/4 (7.5 s): one request's time
#: plus TTL/12 (2.5 s) for the thread between its check and its send, and for the drift of
#: two hosts' monotonic clocks (at most 500 ppm under NTP: 15 ms in 30 s).
MARGIN_SHARE = 1 / 4


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """The lease's numbers for one TTL, in seconds."""

    ttl: float
    #: Between two renewals (send to send).
    period: float
    #: Longest one store request may take: what the store must be opened with.
    request_timeout: float
    #: `hard_deadline - valid_until`.
    margin: float

    @property
    def validity(self) -> float:
        """How long after a renewal's send the holder may still start items and write."""
        return self.ttl - self.margin


def lease_timing(ttl: float) -> LeaseTiming:
    """The heartbeat period, request timeout and margin for a lease of `ttl` seconds.

    With a renewal sent every `period` and each taking at most `request_timeout`, validity
    (`ttl - margin`) covers `period * 3 + request_timeout`, so it never runs out while the
    store answers; and `margin > request_timeout`, so a write that starts before
    `valid_until` ends before `hard_deadline`.
    """
    return LeaseTiming(ttl=ttl, period=ttl * PERIOD_SHARE, request_timeout=ttl * REQUEST_SHARE,
                       margin=ttl * MARGIN_SHARE)


def default_wait(ttl: float) -> float:
    """How long a starting runner watches a held lease by default (`--lease-wait`): a full TTL
    of watching, plus a first look, a last look and the takeover's write, plus one period."""
    t = lease_timing(ttl)
    return ttl + 3 * t.request_timeout + t.period


def holder_identity() -> dict[str, Any]:
    """Who holds a lease: pod name (HOSTNAME in Kubernetes), host and pid."""
    return {"pod": os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname(),
            "host": socket.gethostname(), "pid": os.getpid()}


@dataclass(frozen=True, slots=True)
class LeaseState:
    """What a lease object says. The wall-clock times are the writer's, for people only."""

    holder: dict[str, Any]
    token: str
    generation: int
    ttl: float
    renewal: int
    acquired_at: float
    renewed_at: float
    released: bool = False

    def describe(self) -> str:
        h = self.holder
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.acquired_at))
        renewed = time.strftime("%H:%M:%S", time.gmtime(self.renewed_at))
        what = "released by" if self.released else "held by"
        return (f"{what} pod {h.get('pod')} (host {h.get('host')}, pid {h.get('pid')}), generation "
                f"{self.generation}, since {since}Z, last renewed {renewed}Z by its clock")


def parse_lease(data: bytes) -> LeaseState | None:
    """The lease in an object, or None if it cannot be read."""
    try:
        doc = json.loads(data)
        return LeaseState(dict(doc["holder"]), str(doc["token"]), int(doc.get("generation", 0)),
                          float(doc.get("ttl", 0.0)), int(doc.get("renewal", 0)),
                          float(doc.get("acquired_at", 0.0)),
                          float(doc.get("renewed_at", doc.get("acquired_at", 0.0))),
                          bool(doc.get("released", False)))
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True, slots=True)
class Watch:
    """A taker's observation of a held lease: the ETag and token it saw, and since when (its
    own monotonic clock, taken after the read that first showed them)."""

    etag: str
    token: str | None
    since: float


def judge_held(watch: Watch | None, etag: str, state: LeaseState | None, now: float, ttl: float
               ) -> tuple[bool, Watch]:
    """Whether a taker may take over a held lease now, and what it has watched so far.

    It may when it has seen the same ETag and token for `ttl` seconds (the longer of its own
    TTL and the holder's); anything that changed starts the watch again. A released lease is
    not "held": the caller takes it at once. An unreadable one is watched like any other.
    """
    token = state.token if state is not None else None
    if watch is None or watch.etag != etag or watch.token != token:
        return False, Watch(etag, token, now)
    held_ttl = max(ttl, state.ttl if state is not None else 0.0)
    return now - watch.since >= held_ttl, watch
