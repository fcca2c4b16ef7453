"""SIGTERM and SIGINT in the parent: the first starts a drain, the second cuts it short.

The handler only counts; the run loop acts. A wake-up socket makes the loop's wait return at
once when a signal arrives, instead of at its next tick.
"""

from __future__ import annotations

import signal
import socket
from typing import Any


class Signals:
    """SIGTERM/SIGINT: the first starts a drain, the second cuts it short."""

    def __init__(self) -> None:
        self.count = 0
        self.last: int | None = None
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self._previous: dict[int, Any] = {}
        self._previous_fd = -1

    def _on_signal(self, signum, frame) -> None:
        self.count += 1
        self.last = signum

    def install(self) -> None:
        # The wake-up fd makes the pool's wait() return at once on a signal.
        self._previous_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def drain_wakeups(self) -> None:
        try:
            while self.reader.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self.reader.close()
        self.writer.close()
