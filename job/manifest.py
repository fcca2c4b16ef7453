"""The progress manifest: what each item of a run's shard came to, kept in a Store.

Layout, under `<prefix>/<run id>/shard-<index>-of-<count>/`:

- `meta.json`: the shard's identity (run id, shard, items source, total) and its start time.
- `seg-<seq>.jsonl`: one object per checkpoint, holding only the records that changed since
  the previous one: a header line `{"seq", "records", "written_at"}`, then one record a line.
- `snap-<seq>.jsonl.gz`: every record up to checkpoint `seq`. Every `COMPACT_EVERY` checkpoints
  one is written in place of a segment (the earlier snapshot's gzip members plus the new lines,
  so nothing is recompressed), and the segments it covers are deleted: resuming reads one
  snapshot and a few segments, not thousands of small objects.

A record is `{"id", "state", "attempts", "at", ...}` with `state` one of `done`, `failed`,
`partial` (an attempt failed and the item will be tried again; `progress` keeps what it
committed, such as the last SQL step) or `running` (an attempt was running when the checkpoint
was written: if no later record follows, the runner died with it), plus `result` (done),
`error` (failed, partial) or `progress`. When an id has several records, the last wins.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import ManifestCorrupt, ManifestError, StoreUnavailable, UsageError
from .store import Store

#: Manifest format version, in meta.json; a newer one is refused rather than misread.
FORMAT = 1
#: A snapshot replaces a segment every this many checkpoints: bounds the objects a resume reads
#: (at most this many segments plus one snapshot) while keeping the snapshot rewrite rare.
COMPACT_EVERY = 64

DONE = "done"
FAILED = "failed"
PARTIAL = "partial"
RUNNING = "running"
STATES = frozenset({DONE, FAILED, PARTIAL, RUNNING})

_SEG = re.compile(r"seg-(\d{10})\.jsonl$")
_SNAP = re.compile(r"snap-(\d{10})\.jsonl\.gz$")
_SHARD_DIR = re.compile(r"shard-(\d{5})-of-(\d{5})/")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,199}$")


def check_run_id(run_id: str) -> str:
    """Refuse run ids that could escape the manifest prefix or are awkward in keys and labels."""
    if not _RUN_ID.match(run_id) or ".." in run_id:
        raise UsageError(
            f"run id {run_id!r}: use 1-200 characters of letters, digits and . _ : + - "
            "(starting with a letter or digit)")
    return run_id


def encode_record(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), default=str).encode() + b"\n"


def shard_dir(prefix: str, run_id: str, shard_index: int, shard_count: int) -> str:
    base = f"{prefix}/" if prefix else ""
    return f"{base}{run_id}/shard-{shard_index:05d}-of-{shard_count:05d}/"


@dataclass(frozen=True, slots=True)
class ItemState:
    """What the run needs to know of an item recorded earlier: its state, the attempts it has
    used, the progress to resume from, and the error of a failed item (for the work table)."""

    state: str
    attempts: int
    progress: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def item_state(record: dict[str, Any]) -> ItemState:
    return ItemState(record["state"], int(record.get("attempts") or 0), record.get("progress"),
                     record.get("error"))


@dataclass(slots=True)
class Loaded:
    """What a shard's manifest holds, as read at start (or by status/report)."""

    meta: dict[str, Any] | None
    #: Records in write order; fold by id, last wins.
    records: list[dict[str, Any]] = field(default_factory=list)
    #: Highest checkpoint sequence number found (0 when none).
    seq: int = 0
    #: The newest snapshot's bytes (gzip members) and the segment lines after it, kept so that
    #: the next snapshot appends instead of rewriting.
    snapshot_gz: bytes = b""
    lines_since_snapshot: list[bytes] = field(default_factory=list)
    updated_at: float | None = None
    segments_since_snapshot: int = 0
    #: Records in the newest checkpoint: about what one checkpoint interval held before a restart.
    last_checkpoint_records: int = 0

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last record of each item."""
        folded: dict[str, dict[str, Any]] = {}
        for record in self.records:
            folded[record["id"]] = record
        return folded

    def states(self) -> ItemStates:
        """The state of every recorded item, for the run's decisions."""
        return ItemStates({item_id: item_state(r) for item_id, r in self.latest().items()})


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

    def items(self, state: str | None = None):
        """(id, ItemState) pairs, all or those in `state`."""
        return ((i, s) for i, s in self._states.items() if state is None or s.state == state)


def _parse_lines(data: bytes, key: str, *, first_line: int = 1) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(data.splitlines(), start=first_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ManifestCorrupt(f"{key}: line {number} is not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) \
                or record.get("state") not in STATES:
            raise ManifestCorrupt(f"{key}: line {number} is not a manifest record")
        yield record


def parse_segment(data: bytes, key: str) -> tuple[dict[str, Any], list[bytes], list[dict[str, Any]]]:
    """Header, raw record lines and parsed records of one segment; ManifestCorrupt if damaged."""
    header_line, _, body = data.partition(b"\n")
    try:
        header = json.loads(header_line)
        expected = int(header["records"])
    except (ValueError, KeyError, TypeError):
        raise ManifestCorrupt(f"{key}: the header line is damaged") from None
    lines = [line for line in body.split(b"\n") if line]
    if len(lines) != expected:
        raise ManifestCorrupt(f"{key}: truncated, {len(lines)} of {expected} records")
    records = list(_parse_lines(body, key, first_line=2))
    return header, [line + b"\n" for line in lines], records


def parse_snapshot(data: bytes, key: str) -> list[dict[str, Any]]:
    try:
        text = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise ManifestCorrupt(f"{key}: not a complete gzip stream ({e})") from None
    return list(_parse_lines(text, key))


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

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.store.put(self.dir + "meta.json", json.dumps({"format": FORMAT, **meta}, indent=1).encode())

    def load(self, *, repair: bool = False) -> Loaded:
        """Read meta, the newest snapshot and the segments after it.

        With `repair`, damaged objects are skipped (their readable records kept) instead of
        raising ManifestCorrupt; the caller writes a fresh snapshot afterwards.
        """
        keys = self.store.list(self.dir)
        try:
            meta = self.read_meta()
        except ManifestCorrupt:
            if not repair:
                raise
            meta = None  # the run writes a new one
        snaps = sorted((int(m.group(1)), k) for k in keys if (m := _SNAP.search(k)))
        segs = sorted((int(m.group(1)), k) for k in keys if (m := _SEG.search(k)))
        loaded = Loaded(meta=meta)
        snap_seq = 0
        for seq, key in reversed(snaps):
            found = self.store.get(key)
            if found is None:
                continue
            try:
                loaded.records = parse_snapshot(found[0], key)
            except ManifestCorrupt:
                if not repair:
                    raise
                continue
            loaded.snapshot_gz = found[0]
            snap_seq = seq
            break
        loaded.seq = snap_seq
        for seq, key in segs:
            if seq <= snap_seq:
                continue
            found = self.store.get(key)
            if found is None:
                continue
            try:
                header, lines, records = parse_segment(found[0], key)
            except ManifestCorrupt:
                if not repair:
                    raise
                lines, records = _salvage(found[0])
                header = {}
            loaded.records.extend(records)
            loaded.last_checkpoint_records = len(records)
            loaded.lines_since_snapshot.extend(lines)
            loaded.segments_since_snapshot += 1
            loaded.seq = max(loaded.seq, seq)
            loaded.updated_at = header.get("written_at", loaded.updated_at)
        return loaded

    def repair(self) -> tuple[int, int]:
        """Fold every record that can still be read into one new snapshot, replacing all
        snapshots and segments (damaged ones included). Returns (records kept, objects read)."""
        keys = self.store.list(self.dir)
        numbered = [int(m.group(1)) for k in keys if (m := _SEG.search(k)) or (m := _SNAP.search(k))]
        loaded = self.load(repair=True)
        lines = [encode_record(record) for record in loaded.latest().values()]
        self.write_snapshot(max(numbered, default=0) + 1, b"", lines)
        try:
            self.read_meta()
        except ManifestCorrupt:
            self.store.delete([self.dir + "meta.json"])  # the run writes a new one
        return len(lines), len(numbered)

    def write_segment(self, seq: int, lines: list[bytes], *, written_at: float) -> int:
        """Write checkpoint `seq` holding `lines`; returns the bytes written."""
        header = json.dumps({"seq": seq, "records": len(lines), "written_at": written_at}).encode()
        body = header + b"\n" + b"".join(lines)
        self.store.put(f"{self.dir}seg-{seq:010d}.jsonl", body)
        return len(body)

    def write_snapshot(self, seq: int, snapshot_gz: bytes, lines: list[bytes]) -> tuple[bytes, int]:
        """Write snapshot `seq` = old snapshot + `lines`, then delete what it covers.

        Returns the new snapshot's bytes (kept for the next one) and the bytes written.
        """
        data = snapshot_gz + gzip.compress(b"".join(lines), compresslevel=5) if lines else snapshot_gz
        self.store.put(f"{self.dir}snap-{seq:010d}.jsonl.gz", data)
        # Delete only after the snapshot is safely written: a crash in between leaves objects
        # that load() ignores (their seq is not above the snapshot's).
        try:
            covered = []
            for key in self.store.list(self.dir):
                if (m := _SEG.search(key)) and int(m.group(1)) <= seq:
                    covered.append(key)
                elif (m := _SNAP.search(key)) and int(m.group(1)) < seq:
                    covered.append(key)
            self.store.delete(covered)
        except (StoreUnavailable, ManifestError):
            pass  # leftovers are ignored by load() and deleted by the next snapshot
        return data, len(data)


def _salvage(data: bytes) -> tuple[list[bytes], list[dict[str, Any]]]:
    """The records of a damaged segment that still parse (for --manifest-repair)."""
    lines, records = [], []
    for line in data.split(b"\n")[1:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), str) and record.get("state") in STATES:
            lines.append(line + b"\n")
            records.append(record)
    return lines, records


def list_shards(store: Store, prefix: str, run_id: str) -> list[tuple[int, int]]:
    """The (index, count) of every shard that has written anything for the run."""
    base = f"{prefix}/" if prefix else ""
    found = set()
    for key in store.list(f"{base}{check_run_id(run_id)}/"):
        m = _SHARD_DIR.search(key)
        if m:
            found.add((int(m.group(1)), int(m.group(2))))
    return sorted(found)
