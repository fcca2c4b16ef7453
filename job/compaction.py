"""Compaction: fold a shard's live manifest objects into one snapshot, one record per item.

Two passes over the objects' records, so that memory stays about 20 bytes per record whatever
the size of the manifest: the first finds the last record of each item (the ItemStates
structure, job.itemstates), the second writes those and only those. A folded record keeps what
a resume or a report needs: a done item's id and attempts (its result only when not empty;
without one it goes to a `done` section, ids only), a failed item's error, progress and time,
a partial or running item's progress. Times and durations of done items do not earn their
bytes there.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from .itemstates import DONE, FAILED, StatesBuilder
from .records import FORMAT, Unit, encode_record, feed, unit_blocks

#: gzip level of snapshots: written once per COMPACT_EVERY checkpoints, so small rather than quick.
SNAPSHOT_LEVEL = 6
#: A done record with nothing worth keeping beyond its id and attempts, as encode_record writes it.
_DONE_PLAIN = re.compile(
    rb'\{"id":"((?:[^"\\]|\\.)*)","state":"done","attempts":(\d+)(?:,"at":[-+0-9.eE]+)?(?:,"seconds":[-+0-9.eE]+)?\}')
#: Fields a folded record of each state drops.
_DROPPED = {DONE: ("at", "seconds"), FAILED: ("seconds",)}
_DROPPED_DEFAULT = ("at", "seconds")


@dataclass(slots=True)
class Folded:
    """A snapshot's bytes, ready to write, and what it holds."""

    data: bytes
    #: Items in the snapshot.
    items: int
    #: The snapshot's sections as units (for the next compaction and for reading it again).
    units: list[Unit] = field(default_factory=list)


def slim(record: dict[str, Any]) -> dict[str, Any] | None:
    """The folded form of a record; None for a done record with no result (a done section's id)."""
    state = record["state"]
    if state == DONE and record.get("result") in (None, {}, [], ""):
        return None
    dropped = _DROPPED.get(state, _DROPPED_DEFAULT)
    out = {k: v for k, v in record.items() if k not in dropped}
    if state == DONE:
        out = {"id": record["id"], "state": DONE, "attempts": record.get("attempts", 0), "result": record["result"]}
    return out


class _Sections:
    """The sections of one snapshot being written, one generation at a time."""

    def __init__(self) -> None:
        self.meta: list[dict[str, Any]] = []
        self.members: list[bytes] = []
        self.items = 0
        self._gen: int | None = None
        self._upto = 0
        self._open: dict[tuple[str, int], tuple[Any, list[bytes], list[int]]] = {}

    def generation(self, gen: int, upto: int) -> None:
        if gen != self._gen:
            self._close()
            self._gen, self._upto = gen, upto
        self._upto = max(self._upto, upto)

    def add(self, kind: str, attempts: int, line: bytes) -> None:
        slot = self._open.get((kind, attempts))
        if slot is None:
            slot = self._open[(kind, attempts)] = (zlib.compressobj(SNAPSHOT_LEVEL, zlib.DEFLATED, 31), [], [0])
        compressor, chunks, count = slot
        chunks.append(compressor.compress(line))
        count[0] += 1
        self.items += 1

    def _close(self) -> None:
        for (kind, attempts) in sorted(self._open, key=lambda k: (k[0] != "records", k[1])):
            compressor, chunks, count = self._open[(kind, attempts)]
            chunks.append(compressor.flush())
            member = b"".join(chunks)
            self.members.append(member)
            self.meta.append({"gen": self._gen, "upto": self._upto, "kind": kind, "attempts": attempts,
                              "records": count[0], "bytes": len(member)})
        self._open = {}

    def finish(self) -> None:
        self._close()


def fold(units: list[Unit], *, key: str, generation: int, seq: int, covers: list[str],
         updated_at: float | None) -> Folded:
    """Fold `units` (in the order they apply) into the bytes of snapshot `key`, (generation,
    seq), that `covers` the named objects (names relative to the shard's directory).
    ManifestCorrupt if a unit cannot be read."""
    builder = StatesBuilder()
    for unit in units:
        feed(builder, unit)
    total = builder.records
    last = builder.build()
    winners = bytearray((total + 7) // 8)
    for ordinal in last.ordinals():
        winners[ordinal >> 3] |= 1 << (ordinal & 7)
    del last, builder
    out = _Sections()
    ordinal = 0
    for unit in units:
        out.generation(unit.gen, unit.upto)
        for block in unit_blocks(unit):
            for line in block:
                if winners[ordinal >> 3] & (1 << (ordinal & 7)):
                    _emit(out, unit, line)
                ordinal += 1
    out.finish()
    header = {"format": FORMAT, "gen": generation, "seq": seq, "written_at": time.time(),
              "updated_at": updated_at, "covers": sorted(set(covers)), "sections": out.meta}
    head = zlib.compressobj(SNAPSHOT_LEVEL, zlib.DEFLATED, 31)
    head_member = head.compress(json.dumps(header).encode() + b"\n") + head.flush()
    data = head_member + b"".join(out.members)
    folded = Folded(data, out.items)
    offset = len(head_member)
    for meta in out.meta:
        folded.units.append(Unit(key, meta["gen"], meta["upto"], meta["kind"], meta["attempts"], data,
                                 offset, offset + meta["bytes"], expected=meta["records"]))
        offset += meta["bytes"]
    return folded


def _emit(out: _Sections, unit: Unit, line: bytes) -> None:
    if unit.kind == "done":
        out.add("done", unit.attempts, line + b"\n")
        return
    m = _DONE_PLAIN.fullmatch(line)
    if m is not None:
        out.add("done", int(m.group(2)), b'"' + m.group(1) + b'"\n')
        return
    record = json.loads(line)
    folded = slim(record)
    if folded is None:
        out.add("done", int(record.get("attempts") or 0), json.dumps(record["id"]).encode() + b"\n")
    else:
        out.add("records", 0, encode_record(folded))
