"""The progress manifest: what each item of a run's shard came to, kept in a Store.

Layout, under `<prefix>/<run id>/shard-<index>-of-<count>/`:

- `meta.json`: the shard's identity (run id, shard, items source, total) and its start time;
  after a run that finished every item, FINISHED: what of its input and options a rerun must
  find unchanged to end at once without reading the records (job.startup).
- `lease.json`: the shard's lease (job.lease).
- `seg-g<generation>-<seq>.jsonl.gz`: one object per checkpoint, holding only the records that
  changed since the previous one: a header line `{"format", "gen", "seq", "records",
  "written_at"}`, then one record a line, gzip-compressed.
- `snap-g<generation>-<seq>.jsonl.gz`: a compaction, one record per item. A header (its own
  gzip member) lists the objects it `covers` and its sections, each a gzip member: per
  generation, a `records` section (whole records) and `done` sections (ids only: the items
  done with no result, one section per attempts count).

`generation` is the lease's (job.lease): every object a runner writes carries its generation
and is created with If-None-Match, so a runner that lost its lease cannot overwrite another
generation's records, and a compaction deletes only what it folded. Records are applied in the
order (generation, seq): a later generation wins for the same item. An object that a snapshot
covers is not read again; every other object is. Objects of the first format (`seg-<seq>.jsonl`,
`snap-<seq>.jsonl.gz`) are read as generation 0.

A record is `{"id", "state", "attempts", "at", ...}` with `state` one of `done`, `failed`,
`partial` (an attempt failed and the item will be tried again; `progress` keeps what it
committed, such as the last SQL step) or `running` (an attempt was running when the checkpoint
was written: if no later record follows, the runner died with it), plus `result` (done),
`error` (failed, partial) or `progress`. When an id has several records, the last wins.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ManifestCorrupt, ManifestError, PreconditionFailed, UsageError
from .itemstates import (
    DONE,
    FAILED,
    PARTIAL,
    RUNNING,
    STATES,
    ItemState,
    ItemStates,
    PackedItemStates,
    StatesBuilder,
    item_state,
)
from .records import (
    FORMAT,
    ObjectName,
    Section,
    Unit,
    as_record,
    encode_record,
    feed,
    parse_name,
    salvage_segment,
    salvage_snapshot,
    salvaged,
    segment_header,
    segment_name,
    snapshot_header,
    snapshot_name,
    unit_records,
)
from .store import Store

if TYPE_CHECKING:
    from .lease import Lease

__all__ = ["COMPACT_EVERY", "DONE", "FAILED", "FORMAT", "PARTIAL", "RUNNING", "STATES", "ItemState",
           "ItemStates", "Loaded", "ShardManifest", "Unit", "check_run_id", "encode_record", "item_state",
           "list_shards", "segment_name", "shard_dir", "snapshot_name"]

#: A compaction folds the manifest once this many segments are live: bounds the objects a
#: resume reads while keeping the rewrite of every item rare.
COMPACT_EVERY = 64
#: The key of meta.json that says a run finished every item of the shard: {"input": the
#: digest of the input's bytes, "lines", "max_item_bytes", "invalid", "total", "done",
#: "failed", "records": the digest of the record objects it left}. Removed by the next run's
#: start, before it writes any record.
FINISHED = "finished"
#: The key of meta.json for an input found wholly valid (no invalid line, no repeated id) by
#: the first pass of the run that wrote it: {"input": its digest, "max_item_bytes"}. A resume
#: on the same bytes counts the lines of the common shape instead of parsing them again.
VALID_INPUT = "valid_input"
_SHARD_DIR = re.compile(r"shard-(\d{5})-of-(\d{5})/")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,199}$")


def check_run_id(run_id: str) -> str:
    """Refuse run ids that could escape the manifest prefix or are awkward in keys and labels."""
    if not _RUN_ID.match(run_id) or ".." in run_id:
        raise UsageError(
            f"run id {run_id!r}: use 1-200 characters of letters, digits and . _ : + - "
            "(starting with a letter or digit)")
    return run_id


def shard_dir(prefix: str, run_id: str, shard_index: int, shard_count: int) -> str:
    base = f"{prefix}/" if prefix else ""
    return f"{base}{run_id}/shard-{shard_index:05d}-of-{shard_count:05d}/"


@dataclass(slots=True)
class Loaded:
    """What a shard's manifest holds, as read at start (or by status/report)."""

    meta: dict[str, Any] | None
    #: The live objects' records in the order they apply (their compressed bytes are kept: a
    #: compaction folds them, and `records` and `items()` read them again).
    units: list[Unit] = field(default_factory=list)
    #: Keys covered by the live snapshots that still exist: the next compaction deletes them.
    carried: list[str] = field(default_factory=list)
    #: The highest sequence number of each generation found.
    seqs: dict[int, int] = field(default_factory=dict)
    updated_at: float | None = None
    #: Records in the newest checkpoint: about what one checkpoint interval held before a restart.
    last_checkpoint_records: int = 0
    #: Objects skipped as damaged (with --manifest-repair).
    damaged: list[str] = field(default_factory=list)
    _states: PackedItemStates | None = None

    def states(self) -> ItemStates:
        """The state of every recorded item, for the run's decisions (about 20 bytes per item)."""
        if self._states is None:
            builder = StatesBuilder()
            for unit in self.units:
                feed(builder, unit)
            self._states = builder.build(self._replay_ids)
        return self._states

    def _replay_ids(self) -> Iterator[tuple[int, str, dict[str, Any] | None]]:
        ordinal = 0
        for unit in self.units:
            for item_id, _state, _attempts, record, _raw in unit_records(unit):
                yield ordinal, item_id, record
                ordinal += 1

    @property
    def records(self) -> Iterator[dict[str, Any]]:
        """Every record of the live objects in write order, not folded (read again each time)."""
        for unit in self.units:
            for item_id, state, attempts, record, _raw in unit_records(unit, whole=True):
                yield as_record(item_id, state, attempts, record)

    def last_records(self, state: str | None = None) -> Iterator[dict[str, Any]]:
        """The last record of each item, whole, all or those in `state`, read again from the
        objects one at a time (for reports: failed items are few)."""
        states = self.states()
        assert isinstance(states, PackedItemStates)
        ordinal = 0
        for unit in self.units:
            for item_id, record_state, attempts, record, _raw in unit_records(unit, whole=True):
                if (state is None or record_state == state) and states.is_last(item_id, ordinal):
                    yield as_record(item_id, record_state, attempts, record)
                ordinal += 1

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last record of each item (whole records in memory: for tools and tests)."""
        folded: dict[str, dict[str, Any]] = {}
        for record in self.records:
            folded[record["id"]] = record
        return folded

    @property
    def max_generation(self) -> int:
        return max(self.seqs, default=0)

    @property
    def seq(self) -> int:
        """The highest sequence number of the newest generation (0 when none)."""
        return self.seqs.get(self.max_generation, 0)

    def next_seq(self, generation: int) -> int:
        return self.seqs.get(generation, 0) + 1


class ShardManifest:
    """One shard's part of a run's manifest. Only the parent process touches it."""

    def __init__(self, store: Store, prefix: str, run_id: str, shard_index: int, shard_count: int) -> None:
        self.store = store
        self.run_id = check_run_id(run_id)
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.dir = shard_dir(prefix, run_id, shard_index, shard_count)

    @property
    def url(self) -> str:
        return f"{self.store.url.rstrip('/')}/{self.dir}"

    @property
    def lease_key(self) -> str:
        return self.dir + "lease.json"

    def lease(self, **kwargs: Any) -> Lease:
        """The shard's Lease (job.lease): its generations continue above the manifest's."""
        from .lease import Lease

        return Lease(self.store, self.lease_key, generation_floor=self.max_generation, **kwargs)

    def max_generation(self) -> int:
        """The highest generation among the manifest's objects (0 when none)."""
        return max((n.gen for k in self.store.list(self.dir) if (n := parse_name(k))), default=0)

    def read_meta(self) -> dict[str, Any] | None:
        found = self.store.get(self.dir + "meta.json")
        if found is None:
            return None
        try:
            meta = json.loads(found[0])
        except ValueError:
            raise ManifestCorrupt(f"{self.dir}meta.json is not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("format", 0) > FORMAT:
            raise ManifestCorrupt(f"{self.dir}meta.json: unknown manifest format")
        return meta

    def records_digest(self) -> str | None:
        """A digest of the shard's segments and snapshots, names and bytes (one listing, then
        each object read, not parsed: a few MB for a million items); None if one vanished
        while they were read."""
        hasher = hashlib.blake2b(digest_size=16)
        for key in self.store.list(self.dir):
            if not parse_name(key):
                continue
            found = self.store.get(key)
            if found is None:
                return None
            hasher.update(f"{key[len(self.dir):]} {len(found[0])}\n".encode())
            hasher.update(found[0])
        return hasher.hexdigest()

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.store.put(self.dir + "meta.json", json.dumps({**meta, "format": FORMAT}, indent=1).encode())

    def remove_leftovers(self) -> list[str]:
        """Remove temporary files a crashed writer left in the shard's directory (a local store)."""
        remove = getattr(self.store, "remove_leftovers", None)
        return remove(self.dir) if remove is not None else []

    def load(self, *, repair: bool = False) -> Loaded:
        """Read meta and every live object (see the module's docstring), and check each.

        With `repair`, damaged objects are skipped (their readable records kept where they can
        be told apart) instead of raising ManifestCorrupt; the caller folds what was read into
        a new snapshot afterwards (`repair()`).
        """
        keys = self.store.list(self.dir)
        try:
            meta = self.read_meta()
        except ManifestCorrupt:
            if not repair:
                raise
            meta = None  # the run writes a new one
        names = [n for k in keys if (n := parse_name(k))]
        loaded = Loaded(meta=meta)
        for n in names:
            loaded.seqs[n.gen] = max(loaded.seqs.get(n.gen, 0), n.seq)
        existing = set(keys)
        snapshots: dict[str, tuple[ObjectName, bytes, dict[str, Any], list[Section]]] = {}
        rescued: list[Unit] = []
        covered: set[str] = set()
        for n in names:
            if n.kind != "snap":
                continue
            found = self.store.get(n.key)
            if found is None:
                continue
            try:
                header, sections = snapshot_header(found[0], n)
            except ManifestCorrupt:
                if not repair:
                    raise
                loaded.damaged.append(n.key)
                rescued.append(salvage_snapshot(n, found[0]))
                continue
            snapshots[n.key] = (n, found[0], header, sections)
            if n.fmt == 1:
                covered.update(m.key for m in names if m.fmt == 1 and m.seq <= n.seq and m.key != n.key)
            else:
                covered.update(self.dir + c for c in header.get("covers", ()))
        loaded.carried = sorted(covered & existing)
        units: list[Unit] = list(rescued)
        for key, (_name, data, header, sections) in snapshots.items():
            if key in covered:
                continue
            updated = header.get("updated_at")
            if updated is not None:
                loaded.updated_at = max(loaded.updated_at or 0.0, float(updated))
            for s in sections:
                units.append(Unit(key, s.gen, s.upto, s.kind, s.attempts, data, s.offset, s.offset + s.length,
                                  expected=s.records))
        for n in names:
            if n.kind != "seg" or n.key in covered:
                continue
            found = self.store.get(n.key)
            if found is None:
                continue
            try:
                header = segment_header(found[0], n)
            except ManifestCorrupt:
                if not repair:
                    raise
                loaded.damaged.append(n.key)
                units.append(salvage_segment(n, found[0]))
                continue
            written = header.get("written_at")
            if written is not None:
                loaded.updated_at = max(loaded.updated_at or 0.0, float(written))
            units.append(Unit(n.key, n.gen, n.seq, "segment", 0, found[0], 0, len(found[0]),
                              compressed=n.fmt == 2, expected=int(header["records"])))
        units.sort(key=lambda u: u.order)
        loaded.units = units
        segments = [u for u in units if u.kind == "segment"]
        if segments:
            loaded.last_checkpoint_records = max(segments[-1].expected, 0)
        builder = StatesBuilder()
        for unit in units:
            try:
                feed(builder, unit)
            except ManifestCorrupt:
                if not repair:
                    raise
                loaded.damaged.append(unit.key)
        if repair and loaded.damaged:
            # Keep only what reads cleanly, unit by unit, for the fold that follows.
            loaded.units = [salvaged(u) for u in units]
            builder = StatesBuilder()
            for unit in loaded.units:
                feed(builder, unit)
        loaded._states = builder.build(loaded._replay_ids)
        return loaded

    def write_segment(self, generation: int, seq: int, data: bytes) -> int:
        """Create segment (generation, seq) from `encode_segment` bytes; returns the bytes written.

        A 412 means the name exists: a write of ours that landed though we did not hear back
        (nobody else writes this generation), recognised by its bytes."""
        return self._create(self.dir + segment_name(generation, seq), data)

    def write_snapshot(self, generation: int, seq: int, data: bytes) -> int:
        """Create snapshot (generation, seq) from compaction bytes; returns the bytes written."""
        return self._create(self.dir + snapshot_name(generation, seq), data)

    def _create(self, key: str, data: bytes) -> int:
        try:
            self.store.put_new(key, data)
        except PreconditionFailed:
            found = self.store.get(key)
            if found is None or found[0] != data:
                raise ManifestError(f"{key} exists with other content: two runners share a generation") from None
        return len(data)

    def repair(self, *, generation: int) -> tuple[int, int]:
        """Fold every record that can still be read into one new snapshot of `generation` (the
        lease's, taken first), replacing every snapshot and segment, damaged ones included.
        Returns (items kept, objects read)."""
        from .compaction import fold

        keys = self.store.list(self.dir)
        objects = [k for k in keys if parse_name(k)]
        loaded = self.load(repair=True)
        seq = loaded.next_seq(generation)
        key = self.dir + snapshot_name(generation, seq)
        folded = fold(loaded.units, key=key, generation=generation, seq=seq,
                      covers=[k[len(self.dir):] for k in objects], updated_at=loaded.updated_at)
        self.write_snapshot(generation, seq, folded.data)
        self.store.delete(objects)
        try:
            self.read_meta()
        except ManifestCorrupt:
            self.store.delete([self.dir + "meta.json"])  # the run writes a new one
        return folded.items, len(objects)


def list_shards(store: Store, prefix: str, run_id: str) -> list[tuple[int, int]]:
    """The (index, count) of every shard that has written anything for the run."""
    base = f"{prefix}/" if prefix else ""
    found = set()
    for key in store.list(f"{base}{check_run_id(run_id)}/"):
        m = _SHARD_DIR.search(key)
        if m:
            found.add((int(m.group(1)), int(m.group(2))))
    return sorted(found)
