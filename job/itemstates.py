"""What a resuming run knows of each item, in bounded memory.

The run asks the manifest only through `ItemStates`: `get(id) -> ItemState | None`,
`count(state)`, `items(state=None)`, `len()`, and `finished(states)` for the first pass over
the input (`Finished`: which ids need no run, looked up a block at a time). `ItemStates` itself
keeps a dict (fine for tests and small manifests); `PackedItemStates`, built by `StatesBuilder`
while the manifest is read, keeps about 20 bytes per item: an item is a 64-bit hash of its id
(Python's string hash) in a sorted array, with 32 bits of a second hash, its state and its
attempts packed beside it, and the position of its last record. Items that are partial or
running (and failed ones with progress) keep their whole state in a dict: there are few. Two
different ids share all 96 bits with a probability below 1e-16 in a run of a million items;
the hashes never leave the process.
"""

from __future__ import annotations

import json
from array import array
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, compress, count, pairwise, repeat, starmap
from operator import add, and_, eq, lshift, ne, not_, or_, rshift
from typing import Any

DONE = "done"
FAILED = "failed"
PARTIAL = "partial"
RUNNING = "running"
STATES = frozenset({DONE, FAILED, PARTIAL, RUNNING})

#: States packed into 3 bits.
_CODES = {DONE: 1, FAILED: 2, PARTIAL: 3, RUNNING: 4}
_NAMES = {code: name for name, code in _CODES.items()}
#: Attempts kept in the packed value (29 bits); more is kept as this many.
_MAX_ATTEMPTS = (1 << 29) - 1
_OFFSET = 1 << 63
#: Lookups start from the first 16 bits of the hash (a 256 KiB table).
_PREFIXES = 1 << 16
_PREFIX_SHIFT = 48
_LOW32 = 0xFFFFFFFF
_HIGH32 = _LOW32 << 32


@dataclass(frozen=True, slots=True)
class ItemState:
    """What the run needs to know of an item recorded earlier: its state, the attempts it has
    used, the progress to resume from, and the error (kept only for items whose whole record
    is kept: see PackedItemStates)."""

    state: str
    attempts: int
    progress: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def item_state(record: dict[str, Any]) -> ItemState:
    return ItemState(record["state"], int(record.get("attempts") or 0), record.get("progress"),
                     record.get("error"))


class ItemStates:
    """The last state of each recorded item: what a resuming run asks of the manifest."""

    def __init__(self, states: dict[str, ItemState]) -> None:
        self._states = states

    def get(self, item_id: str) -> ItemState | None:
        return self._states.get(item_id)

    def __len__(self) -> int:
        return len(self._states)

    def count(self, state: str) -> int:
        return sum(1 for s in self._states.values() if s.state == state)

    def items(self, state: str | None = None) -> Iterator[tuple[str, ItemState]]:
        """(id, ItemState) pairs, all or those in `state`."""
        return ((i, s) for i, s in self._states.items() if state is None or s.state == state)

    def finished(self, states: Collection[str]) -> Finished:
        """The items whose state is one of `states`, as the input's first pass asks (job.items)."""
        finished = (i for i, s in self._states.items() if s.state in states)
        return _DictFinished({i: n for n, i in enumerate(finished)})


class Finished:
    """The items a resume does not run again, as the first pass over the input asks: each has a
    slot (a number below `size` that no other item has), and is taken when its line is met,
    so that a second line with its id is known for a repeat without a set of ids."""

    size: int

    def slot(self, item_id: str) -> int | None:
        """The item's slot if it is finished, else None."""
        raise NotImplementedError

    def take_one(self, item_id: str) -> bool:
        """Take a finished item; False if it was taken before."""
        raise NotImplementedError

    def take(self, ids: list[str]) -> list[bool] | None:
        """For a block of ids: which are finished (those are taken), which are not; or None if
        a finished one was taken before or repeats in the block (nothing is taken then: ask
        one by one)."""
        raise NotImplementedError


class _DictFinished(Finished):
    def __init__(self, slots: dict[str, int]) -> None:
        self._slots = slots
        self._left = set(slots)
        self.size = len(slots)

    def slot(self, item_id: str) -> int | None:
        return self._slots.get(item_id)

    def take_one(self, item_id: str) -> bool:
        if item_id not in self._left:
            return False
        self._left.discard(item_id)
        return True

    def take(self, ids: list[str]) -> list[bool] | None:
        flags = list(map(self._left.__contains__, ids))
        taken = _take(self._left, list(compress(ids, flags)))
        if taken is None:
            return None
        if any(map(self._slots.__contains__, compress(ids, map(not_, flags)))):
            self._left.update(taken)  # a finished id met before: a repeat
            return None
        return flags


def _take(left: set[Any], keys: list[Any]) -> list[Any] | None:
    """Remove `keys` (all in `left`) from `left`, and return them; None, with `left` as it
    was, if one repeats."""
    before = len(left)
    left.difference_update(keys)
    if before - len(left) != len(keys):
        left.update(keys)
        return None
    return keys


class _PackedFinished(Finished):
    """Slots are positions in PackedItemStates' arrays. What is not taken yet is a set of the
    items' 96-bit keys (hash and second hash), and a bitmap of their hashes' low bits tells
    most ids that are not finished from those taken before: the set is made on the first take,
    the bitmap when an id is not in the set.
    A block of ids is looked up in C-level loops (map over the set, the bitmap)."""

    def __init__(self, states: PackedItemStates, codes: frozenset[int]) -> None:
        self._states = states
        self._codes = codes
        self._left: set[int] | None = None
        self._bits = bytearray()
        self._mask = 0
        #: The last block held few finished items: look at the bitmap first.
        self._sparse = False
        self.size = len(states)

    def slot(self, item_id: str) -> int | None:
        i = self._states._find(item_id)
        return i if i is not None and self._states._vals[i] & 7 in self._codes else None

    def _not_taken(self) -> set[int]:
        if self._left is None:
            keys, vals = self._states._keys, self._states._vals
            all_keys = map(or_, map(lshift, keys, repeat(32)), map(rshift, vals, repeat(32)))
            if sum(self._states.count(_NAMES[code]) for code in self._codes) == len(keys):
                self._left = set(all_keys)  # every item is finished (the common resume)
            else:
                self._left = set(compress(all_keys, map(self._codes.__contains__, map(and_, vals, repeat(7)))))
        return self._left

    def _marked(self, hashes: Iterable[int]) -> Iterator[int]:
        """Per hash: whether the bitmap of finished items' hashes has its bit (a finished item
        has it; most others do not). The bitmap is made on the first call: a resume whose
        lines are all finished never needs it."""
        if not self._bits:
            keys, vals = self._states._keys, self._states._vals
            size = 1 << max(10, (16 * len(keys)).bit_length())  # 1/16 of its bytes set at most
            self._bits, self._mask = bytearray(size), size - 1
            wanted = map(self._codes.__contains__, map(and_, vals, repeat(7)))
            deque(map(self._bits.__setitem__, map(and_, compress(keys, wanted), repeat(self._mask)), repeat(1)),
                  maxlen=0)
        return map(self._bits.__getitem__, map(and_, hashes, repeat(self._mask)))

    def take_one(self, item_id: str) -> bool:
        left = self._not_taken()
        key = (hash(item_id) << 32) | _second_hash(item_id)
        if key not in left:
            return False
        left.discard(key)
        return True

    def take(self, ids: list[str]) -> list[bool] | None:
        left = self._not_taken()
        hashes = list(map(hash, ids))
        if self._sparse:
            # Few finished items lately (the part of a resume not run yet): the bitmap first,
            # and the keys only of the ids it marks (every finished one, a sixteenth of others).
            look = list(compress(range(len(ids)), self._marked(hashes)))
            some, some_hashes = list(map(ids.__getitem__, look)), list(map(hashes.__getitem__, look))
        else:
            some, some_hashes = ids, hashes
        seconds = map(and_, map(hash, map(add, some, repeat("\x00"))), repeat(_LOW32))
        keys = list(map(or_, map(lshift, some_hashes, repeat(32)), seconds))
        found = list(map(left.__contains__, keys))
        taken = _take(left, list(compress(keys, found)))
        if taken is None:
            return None
        if len(taken) < len(some):
            # Not there: not finished, or finished and taken before (a repeat: line by line).
            others, others_hashes = compress(some, map(not_, found)), compress(some_hashes, map(not_, found))
            if not self._sparse:
                others = compress(others, self._marked(others_hashes))
            if self._any_finished(list(others)):
                left.update(taken)
                return None
        self._sparse = 2 * len(taken) < len(ids)
        if some is ids:
            return found
        flags = [False] * len(ids)
        for i in compress(look, found):
            flags[i] = True
        return flags

    def _any_finished(self, ids: list[str]) -> bool:
        """Whether one of `ids` is finished: bisected for in C-level loops, and looked up one
        by one only where the 64-bit hash is there."""
        if not ids:
            return False
        keys, starts = self._states._keys, self._states._starts
        hashes = list(map(hash, ids))
        prefixes = list(map(rshift, map(add, hashes, repeat(_OFFSET)), repeat(_PREFIX_SHIFT)))
        at = map(min, map(bisect_left, repeat(keys), hashes, map(starts.__getitem__, prefixes),
                          map(starts.__getitem__, map(add, prefixes, repeat(1)))), repeat(len(keys) - 1))
        near = compress(ids, map(eq, map(keys.__getitem__, at), hashes))
        return any(self.slot(item_id) is not None for item_id in near)


def _second_hash(item_id: str) -> int:
    return hash(item_id + "\x00") & 0xFFFFFFFF


def keeps_whole(state: str, record: dict[str, Any]) -> bool:
    """Whether an item's state needs more than its state and attempts: partial and running
    items resume from their progress, and so does a failed one under --retry-failed."""
    return state in (PARTIAL, RUNNING) or (state == FAILED and bool(record.get("progress")))


class StatesBuilder:
    """Collects records in write order (the last one of an id wins) and builds PackedItemStates.

    A record's ordinal is its position in write order, so that `items()` can read the manifest
    again and recognise the last record of each id. The bulk paths (`add_done`) and `build`
    work in C-level loops (map, sorted, array): about 1 us per record.
    """

    def __init__(self) -> None:
        self._keys = array("q")
        self._vals = array("Q")
        self._whole: dict[str, ItemState] = {}

    @property
    def records(self) -> int:
        return len(self._keys)

    def add(self, item_id: str, state: str, attempts: int, record: dict[str, Any] | None = None) -> None:
        """One record. `record` (the parsed record) is needed only when `keeps_whole`."""
        if record is not None and keeps_whole(state, record):
            self._whole[item_id] = item_state(record)
        elif self._whole:
            self._whole.pop(item_id, None)
        self._keys.append(hash(item_id))
        self._vals.append((_second_hash(item_id) << 32) | (min(attempts, _MAX_ATTEMPTS) << 3) | _CODES[state])

    def add_done(self, ids: list[str], attempts: int | list[int]) -> None:
        """Many done records: `attempts` for all of them, or one count each."""
        if self._whole:
            for item_id in ids:
                self._whole.pop(item_id, None)
        self._keys.extend(map(hash, ids))
        seconds = map(lshift, map(and_, map(hash, map(add, ids, repeat("\x00"))), repeat(_LOW32)), repeat(32))
        if isinstance(attempts, int):
            self._vals.extend(map(or_, seconds, repeat((min(attempts, _MAX_ATTEMPTS) << 3) | _CODES[DONE])))
        else:
            low = map(or_, map(lshift, map(min, attempts, repeat(_MAX_ATTEMPTS)), repeat(3)), repeat(_CODES[DONE]))
            self._vals.extend(map(or_, seconds, low))

    def build(self, replay: Callable[[], Iterator[tuple[int, str, dict[str, Any] | None]]] | None = None
              ) -> PackedItemStates:
        """The item states; `replay` yields (ordinal, id, record or None) for every record again
        in the same order (for `items()`)."""
        keys, vals = self._keys, self._vals
        # One int per record, (hash, second hash, ordinal), sorted; the last of each item wins.
        # (Negative hashes shift and mask like two's complement: the order is the hash's.)
        packed = sorted(map(or_, map(lshift, keys, repeat(64)), map(or_, map(and_, vals, repeat(_HIGH32)), count())))
        last_of_item = chain(starmap(ne, pairwise(map(rshift, packed, repeat(32)))), (True,))
        ordinals = array("L", map(and_, compress(packed, last_of_item), repeat(_LOW32)))
        del packed
        final_keys = array("q", map(keys.__getitem__, ordinals))
        final_vals = array("Q", map(vals.__getitem__, ordinals))
        self._keys, self._vals = array("q"), array("Q")
        codes = Counter(map(and_, final_vals, repeat(7)))
        attempts = sum(map(and_, map(rshift, final_vals, repeat(3)), repeat(_MAX_ATTEMPTS)))
        counts = {name: codes.get(code, 0) for code, name in _NAMES.items()}
        return PackedItemStates(final_keys, final_vals, ordinals, self._whole, counts, attempts, replay)


class PackedItemStates(ItemStates):
    """Item states in about 20 bytes per item (see the module's docstring)."""

    def __init__(self, keys: array[int], vals: array[int], ordinals: array[int], whole: dict[str, ItemState],
                 counts: dict[str, int], attempts: int,
                 replay: Callable[[], Iterator[tuple[int, str, dict[str, Any] | None]]] | None) -> None:
        self._keys = keys
        self._vals = vals
        self._ordinals = ordinals
        # Where each 16-bit prefix of the hash starts in `keys`: a lookup bisects a few entries.
        self._starts = array("L", (bisect_left(keys, (p << _PREFIX_SHIFT) - _OFFSET) for p in range(_PREFIXES + 1)))
        self._cache: dict[int, ItemState] = {}
        self._whole = whole
        self._counts = counts
        self._len = len(keys)
        self._replay = replay
        #: The attempts of every item, summed (for `bulkjob status`).
        self.attempts = attempts

    def _find(self, item_id: str) -> int | None:
        h = hash(item_id)
        keys = self._keys
        prefix = (h + _OFFSET) >> _PREFIX_SHIFT
        n = self._starts[prefix + 1]
        i = bisect_left(keys, h, self._starts[prefix], n)
        if i == n or keys[i] != h:
            return None
        second = _second_hash(item_id)
        vals = self._vals
        while i < n and keys[i] == h:
            if vals[i] >> 32 == second:
                return i
            i += 1
        return None

    def get(self, item_id: str) -> ItemState | None:
        if self._whole:
            whole = self._whole.get(item_id)
            if whole is not None:
                return whole
        i = self._find(item_id)
        if i is None:
            return None
        value = self._vals[i] & _LOW32
        state = self._cache.get(value)
        if state is None:
            state = self._cache[value] = ItemState(_NAMES[value & 7], value >> 3)
        return state

    def __len__(self) -> int:
        return self._len

    def count(self, state: str) -> int:
        return self._counts.get(state, 0)

    def items(self, state: str | None = None) -> Iterator[tuple[str, ItemState]]:
        """(id, ItemState) pairs, all or those in `state`. Items kept whole come from memory; the
        others are read again from the manifest's objects (a second pass: use sparingly)."""
        if state in (PARTIAL, RUNNING):
            yield from ((i, s) for i, s in self._whole.items() if s.state == state)
            return
        if self._replay is None:
            raise RuntimeError("these item states cannot list their ids")
        for ordinal, item_id, _record in self._replay():
            if not self.is_last(item_id, ordinal):
                continue
            current = self.get(item_id)
            if current is not None and (state is None or current.state == state):
                yield item_id, current

    def is_last(self, item_id: str, ordinal: int) -> bool:
        """Whether the record at write-order position `ordinal` is the last one of `item_id`."""
        i = self._find(item_id)
        return i is not None and self._ordinals[i] == ordinal

    def finished(self, states: Collection[str]) -> Finished:
        # An item kept whole has the same state in `_vals` (its last record's): no need to look.
        return _PackedFinished(self, frozenset(_CODES[s] for s in states))

    def ordinals(self) -> array[int]:
        """The write-order position of each item's last record (for compaction)."""
        return self._ordinals


def parse_done_ids(lines: list[bytes]) -> list[str]:
    """The ids of a block of done-section lines, decoded in one call."""
    return json.loads(b"[" + b",".join(lines) + b"]") if lines else []
