"""Example handlers, used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import hashlib
import time

from . import Permanent, Retryable


def noop(item, ctx):
    """Does nothing: measures the job's own cost per item."""
    return None


def sleep(item, ctx):
    """Waits `payload.seconds` (default 0.02), like a database round trip."""
    time.sleep(float(item.payload.get("seconds", 0.02)))
    return None


def checksum(item, ctx):
    """A little CPU work: returns the SHA-256 of the payload's `text` repeated `rounds` times.

    Payload `fail`: "permanent" raises Permanent; "flaky" raises Retryable on the first
    attempt, as a transient error would.
    """
    fail = item.payload.get("fail")
    if fail == "permanent":
        raise Permanent(f"item {item.id} is marked as bad", code="DEMO-1")
    if fail == "flaky" and ctx.attempt == 1:
        raise Retryable("transient failure, will succeed on retry", code="DEMO-2")
    digest = item.payload.get("text", item.id).encode()
    for _ in range(int(item.payload.get("rounds", 1000))):
        digest = hashlib.sha256(digest).digest()
    return {"sha256": digest.hex()[:16]}


def generate(count: int, *, flaky_every: int = 97, bad_every: int = 1000):
    """Demo items: every `flaky_every`-th fails once, every `bad_every`-th fails for good."""
    import json

    for i in range(1, count + 1):
        payload = {"text": f"record {i}", "rounds": 200}
        if i % bad_every == 0:
            payload["fail"] = "permanent"
        elif i % flaky_every == 0:
            payload["fail"] = "flaky"
        yield json.dumps({"id": f"item-{i:06d}", "payload": payload})


if __name__ == "__main__":
    import sys

    for line in generate(int(sys.argv[1]) if len(sys.argv) > 1 else 3000):
        print(line)
