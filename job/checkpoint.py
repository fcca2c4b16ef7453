"""The checkpoint writer: a thread of the parent that flushes new manifest records on a timer.

The run loop only appends records; writing happens here, so a slow or unreachable store never
stalls the dispatch of items. A failed write keeps its records and is retried with backoff;
records that arrive meanwhile go into the same next object.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import BulkjobError
from .manifest import COMPACT_EVERY, Loaded, ShardManifest, encode_record
from .retry import backoff_delay

log = logging.getLogger("bulkjob.checkpoint")

#: Backoff between failed checkpoint writes: first wait about 1 s, never more than 30 s, so a
#: store that comes back is used again soon.
RETRY_BASE = 1.0
RETRY_CAP = 30.0


class Checkpointer:
    """Writes records added with `add()` to the manifest every `interval` seconds."""

    def __init__(self, manifest: ShardManifest, loaded: Loaded, *, interval: float,
                 observe: Callable[[float, bool, int], None] | None = None,
                 may_write: Callable[[], bool] = lambda: True) -> None:
        self.manifest = manifest
        self.interval = interval
        self._observe = observe or (lambda seconds, ok, size: None)
        self._may_write = may_write
        self._lock = threading.Lock()
        self._pending: list[bytes] = []
        self._unwritten: list[bytes] = []
        self._running: list[dict[str, Any]] = []
        #: The running records the last checkpoint held: a change alone is worth a checkpoint
        #: (an item that runs for minutes, alone, must leave its trace too).
        self._running_written: list[dict[str, Any]] = []
        self._seq = loaded.seq
        self._snapshot = loaded.snapshot_gz
        self._since_snapshot = list(loaded.lines_since_snapshot)
        self._segments = loaded.segments_since_snapshot
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._failures_in_row = 0
        self.writes = 0
        self.failures = 0
        self.bytes_written = 0
        self.last_written_at: float | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bulkjob-checkpoint", daemon=True)
        self._thread.start()

    def add(self, record: dict[str, Any]) -> None:
        line = encode_record(record)
        with self._lock:
            self._pending.append(line)
            self._idle.clear()

    def set_running(self, records: list[dict[str, Any]]) -> None:
        """The attempts running now, one `running` record each: every checkpoint writes them
        first, so that a run killed with them leaves a trace of what it was doing, and any
        record added since (done, failed) comes after them and wins."""
        self._running = records

    def write_now(self, records: list[dict[str, Any]], timeout: float) -> bool:
        """Add `records` and wait until they are durable; False if that took over `timeout`."""
        for record in records:
            self.add(record)
        return self.flush(timeout)

    @property
    def unsaved(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._unwritten)

    def flush(self, timeout: float) -> bool:
        """Write everything added so far now; True if it is all durable within `timeout`."""
        self._wake.set()
        return self._idle.wait(timeout)

    def close(self, timeout: float) -> bool:
        """Flush and stop the thread; True if nothing added was left unwritten."""
        self._closing = True
        ok = self.flush(timeout)
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        return ok

    def _run(self) -> None:
        delay = self.interval
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            if self._write_once():
                self._failures_in_row = 0
                delay = self.interval
            else:
                self._failures_in_row += 1
                delay = backoff_delay(self._failures_in_row, base=RETRY_BASE, cap=RETRY_CAP,
                                      rand=0.5 + random.random() / 2)
            if self._closing and self._idle.is_set():
                return

    def _write_once(self) -> bool:
        with self._lock:
            self._unwritten.extend(self._pending)
            self._pending.clear()
            # Read after the pending lines: a record that ends a running attempt is either
            # among `lines` (written after this list) or not yet added, and then it was running.
            running_now = self._running
            if not self._unwritten and running_now == self._running_written:
                self._idle.set()
                return True
            lines = list(self._unwritten)
        running = [encode_record(r) for r in running_now]
        if not self._may_write():
            return False
        seq = self._seq + 1
        started = time.monotonic()
        try:
            written = running + lines
            if self._segments + 1 >= COMPACT_EVERY:
                self._snapshot, size = self.manifest.write_snapshot(seq, self._snapshot,
                                                                    self._since_snapshot + written)
                since, segments = [], 0
            else:
                size = self.manifest.write_segment(seq, written, written_at=time.time())
                since, segments = self._since_snapshot + written, self._segments + 1
        except BulkjobError as e:
            self.failures += 1
            self._observe(time.monotonic() - started, False, 0)
            log.warning("checkpoint %d failed (%d records kept, will retry): %s", seq, len(lines), e)
            return False
        self._observe(time.monotonic() - started, True, size)
        with self._lock:
            self._running_written = running_now
            del self._unwritten[:len(lines)]
            self._seq, self._since_snapshot, self._segments = seq, since, segments
            self.writes += 1
            self.bytes_written += size
            self.last_written_at = time.time()
            if not self._pending and not self._unwritten:
                self._idle.set()
        return True
