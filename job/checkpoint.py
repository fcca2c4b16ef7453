"""The checkpoint writer: a thread of the parent that writes new manifest records on a timer.

Built on job.writer: the run only adds records; each checkpoint is one segment of this
runner's generation, created with If-None-Match, written only while the lease's fence is open.
A failed write keeps its segment, byte for byte, and tries it again with backoff (a write
that landed although we did not hear back is recognised by its bytes); records that arrive
meanwhile go into the next one. Every COMPACT_EVERY segments the manifest is folded into a
snapshot (job.compaction) after the segment is durable, so a compaction that fails holds no
record back; it is tried again later, and deletes only the objects it folded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from . import manifest as manifest_module
from .compaction import Folded, fold
from .errors import LeaseLost
from .manifest import Loaded, ShardManifest
from .records import Unit, encode_record, encode_segment, segment_name, snapshot_name
from .retry import backoff_delay
from .writer import RETRY_JITTER, BackgroundWriter

log = logging.getLogger("bulkjob.checkpoint")

#: Backoff between failed checkpoint writes: first wait about 1 s, never more than 30 s, so a
#: store that comes back is used again soon.
RETRY_BASE = 1.0
RETRY_CAP = 30.0
#: Backoff between failed compactions, seconds: a snapshot that cannot be written (too big for
#: the request timeout, a store refusing it) is tried again rarely, while segments go on.
COMPACT_RETRY_BASE = 30.0
COMPACT_RETRY_CAP = 600.0


class _Segment:
    """One checkpoint: its lines are fixed when taken, so that a retry writes the same bytes."""

    __slots__ = ("data", "lines", "running", "seq", "upto", "written_at")

    def __init__(self, lines: list[bytes], running: list[dict[str, Any]], upto: int) -> None:
        self.lines = lines
        self.running = running
        self.upto = upto
        self.seq = 0
        self.data: bytes | None = None
        self.written_at = 0.0


class Checkpointer(BackgroundWriter[_Segment]):
    """Writes the records added with `add()` to the manifest every `interval` seconds, as
    segments of `generation`, while `fence()` allows."""

    def __init__(self, manifest: ShardManifest, loaded: Loaded, *, generation: int, interval: float,
                 fence: Callable[[], bool] | None = None,
                 observe: Callable[[float, bool, int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if loaded.max_generation > generation:
            raise LeaseLost(f"{manifest.url} holds generation {loaded.max_generation}, newer than this "
                            f"runner's lease ({generation}): another runner has the shard")
        super().__init__(name="checkpoint", interval=interval, retry_base=RETRY_BASE, retry_cap=RETRY_CAP,
                         fence=fence, clock=clock)
        self.manifest = manifest
        self.generation = generation
        self._observe = observe or (lambda seconds, ok, size: None)
        self._pending: list[bytes] = []
        self._running: list[dict[str, Any]] = []
        self._running_written: list[dict[str, Any]] = []
        self._inflight: _Segment | None = None
        self._seq = loaded.seqs.get(generation, 0)
        self._units: list[Unit] = list(loaded.units)
        self._carried = list(loaded.carried)
        self._segments = sum(1 for u in loaded.units if u.kind == "segment")
        self._updated_at = loaded.updated_at
        self._compaction: tuple[int, Folded, list[Unit]] | None = None
        self._compact_failures = 0
        self._compact_after = 0.0
        self.bytes_written = 0
        self.last_written_at: float | None = None
        self.compactions = 0

    def start(self) -> None:
        removed = self.manifest.remove_leftovers()
        if removed:
            log.info("removed %d temporary file(s) left by a crashed writer in %s", len(removed), self.manifest.url)
        super().start()

    # -- what the run calls ----------------------------------------------------------------

    def add(self, record: dict[str, Any]) -> None:
        line = encode_record(record)
        with self.lock:
            self._pending.append(line)
            self._ticket()

    def set_running(self, records: list[dict[str, Any]]) -> None:
        """The attempts running now, as records `{"id", "state": "running", "attempts": n}`:
        each checkpoint writes them first, then the records added since the last one. Call
        from the loop thread with a new list each time (it is kept, not copied)."""
        self._running = records

    def write_now(self, records: list[dict[str, Any]], timeout: float) -> bool:
        """Add `records` and wait until they (and everything added before) are durable;
        False if that took longer than `timeout` (they stay queued)."""
        for record in records:
            self.add(record)
        return self.flush(timeout)

    @property
    def unsaved(self) -> int:
        with self.lock:
            return len(self._pending) + (len(self._inflight.lines) if self._inflight is not None else 0)

    # -- the writer's hooks ----------------------------------------------------------------

    def _collect(self) -> tuple[_Segment, int] | None:
        if self._inflight is not None:
            return self._inflight, self._inflight.upto
        # Pending lines before the running list: a done record taken here was added before
        # the running list we read next dropped its item, so a stale running record is always
        # followed by the record that ends it.
        pending = self._pending
        running = self._running
        if not pending and (not running or running == self._running_written):
            return None
        self._pending = []
        segment = _Segment([encode_record(r) for r in running] + pending, running, self._added)
        self._inflight = segment
        return segment, segment.upto

    def _write(self, segment: _Segment) -> None:
        if segment.data is None:
            segment.seq = self._seq + 1
            segment.written_at = time.time()
            segment.data = encode_segment(self.generation, segment.seq, segment.lines,
                                          written_at=segment.written_at)
        started = time.monotonic()
        try:
            size = self.manifest.write_segment(self.generation, segment.seq, segment.data)
        except Exception:
            self._observe(time.monotonic() - started, False, 0)
            raise
        self._observe(time.monotonic() - started, True, size)

    def _written(self, segment: _Segment) -> None:
        assert segment.data is not None
        self._seq = segment.seq
        self._units.append(Unit(self.manifest.dir + segment_name(self.generation, segment.seq), self.generation,
                                segment.seq, "segment", 0, segment.data, 0, len(segment.data),
                                expected=len(segment.lines)))
        self._segments += 1
        self._running_written = segment.running
        self._updated_at = max(self._updated_at or 0.0, segment.written_at)
        self.bytes_written += len(segment.data)
        self.last_written_at = time.time()
        self._inflight = None

    def _kept(self, segment: _Segment) -> None:
        self._inflight = segment

    def _after(self) -> None:
        if self._compaction is None and self._segments < manifest_module.COMPACT_EVERY:
            return
        if self.clock() < self._compact_after:
            return
        self.check_fence()
        self._compact()

    # -- compaction ------------------------------------------------------------------------

    def _compact(self) -> None:
        """Fold every live object into a snapshot (or write the one that failed before), then
        delete what it folded."""
        if self._compaction is None:
            folded_units = list(self._units)
            self._seq += 1  # a snapshot takes a sequence number of its own
            seq = self._seq
            base = self.manifest.dir
            covers = {u.key[len(base):] for u in folded_units} | {k[len(base):] for k in self._carried}
            key = base + snapshot_name(self.generation, seq)
            folded = fold(folded_units, key=key, generation=self.generation, seq=seq, covers=sorted(covers),
                          updated_at=self._updated_at)
            self._compaction = (seq, folded, folded_units)
        seq, folded, folded_units = self._compaction
        started = time.monotonic()
        try:
            self.check_fence()
            size = self.manifest.write_snapshot(self.generation, seq, folded.data)
        except Exception as e:
            self._observe(time.monotonic() - started, False, 0)
            self._compact_failures += 1
            wait = backoff_delay(self._compact_failures, base=COMPACT_RETRY_BASE, cap=COMPACT_RETRY_CAP,
                                 rand=self._rand(), jitter=RETRY_JITTER)
            self._compact_after = self.clock() + wait
            log.warning("compaction into snapshot %d failed (%s: %s); checkpoints go on, next try in %.0fs",
                        seq, type(e).__name__, e, wait)
            return
        self._observe(time.monotonic() - started, True, size)
        self._compaction = None
        self._compact_failures = 0
        self.compactions += 1
        self.bytes_written += size
        done_keys = {id(u) for u in folded_units}
        newer = [u for u in self._units if id(u) not in done_keys]
        with self.lock:
            self._units = folded.units + newer
            self._segments = sum(1 for u in newer if u.kind == "segment")
        # Delete only after the snapshot is durable, and only what it folded: a crash in
        # between leaves objects that the snapshot covers, which a load skips.
        doomed = sorted({u.key for u in folded_units} | set(self._carried))
        try:
            self.check_fence()
            self.manifest.store.delete(doomed)
            self._carried = []
        except Exception as e:
            self._carried = doomed
            log.warning("could not delete %d object(s) folded into snapshot %d (%s); the next compaction will",
                        len(doomed), seq, e)
