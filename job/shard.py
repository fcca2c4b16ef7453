"""Sharding: which shard of N an item belongs to, stable across processes, hosts and versions."""

from __future__ import annotations

import hashlib


def shard_of(item_id: str, shard_count: int) -> int:
    """The shard (0-based) of `item_id` among `shard_count`: blake2b of the UTF-8 id, mod N.

    Python's `hash()` is salted per process, so it cannot be used: every pod of an Indexed Job
    must agree on the split without talking to the others.
    """
    if shard_count == 1:
        return 0
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard_count
