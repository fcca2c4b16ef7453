"""Progress for people: a bar on a terminal, a line every N seconds in pod logs."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("bulkjob.progress")

#: Seconds between redraws of the terminal bar.
BAR_REFRESH = 0.2
BAR_WIDTH = 30


def eta_seconds(remaining: int, rate: float) -> float | None:
    return remaining / rate if rate > 0 else None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(*, done: int, failed: int, pending: int, total: int, rate: float, retrying: int = 0,
                  paused: str | None = None) -> str:
    """The one-line report: counts, rate and ETA; or that the run is paused, and why."""
    counts = f"{done + failed}/{total} ({done} done, {failed} failed, {pending} pending"
    counts += f", {retrying} waiting to retry)" if retrying else ")"
    if paused:
        return f"progress: {counts}, paused: {paused}"
    return f"progress: {counts}, {rate:.1f} items/s, eta {format_duration(eta_seconds(pending, rate))}"


def progress_bar(*, done: int, failed: int, pending: int, total: int, rate: float, retrying: int = 0,
                 paused: str | None = None) -> str:
    finished = done + failed
    fraction = finished / total if total else 1.0
    filled = int(fraction * BAR_WIDTH)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    tail = f"paused: {paused}" if paused else f"{rate:.1f}/s eta {format_duration(eta_seconds(pending, rate))}"
    return f"[{bar}] {fraction:6.1%} {finished}/{total} failed {failed} {tail}"


class Progress:
    """Reports progress on `stream`, as a bar if it is a terminal, else as periodic lines."""

    def __init__(self, total: int, *, interval: float, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = BAR_REFRESH if self.tty else interval
        self.started = time.monotonic()
        self._last = self.started
        self._base: int | None = None

    def update(self, *, done: int, failed: int, pending: int, retrying: int = 0, paused: str | None = None,
               force: bool = False) -> None:
        now = time.monotonic()
        if self._base is None:
            self._base = done + failed  # items finished before this run do not count for the rate
        if not force and (self.interval <= 0 or now - self._last < self.interval):
            return
        self._last = now
        rate = (done + failed - self._base) / max(now - self.started, 1e-9)
        if self.tty:
            self.stream.write("\r" + progress_bar(done=done, failed=failed, pending=pending, total=self.total,
                                                  rate=rate, retrying=retrying, paused=paused) + "\x1b[K")
        else:
            # A log record, not a bare line: with --log-format json every line of the pod's log
            # must be JSON for the collector.
            log.info("%s", progress_line(done=done, failed=failed, pending=pending, total=self.total, rate=rate,
                                         retrying=retrying, paused=paused))
            return
        self.stream.flush()

    def finish(self, *, done: int, failed: int, pending: int, paused: str | None = None) -> None:
        self.update(done=done, failed=failed, pending=pending, paused=paused, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
