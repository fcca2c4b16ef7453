"""What the run loop reports as it goes: the seam where metrics plug in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .outcome import Failure


class Observer(Protocol):
    """Receives the run's events in the parent process; must not block."""

    def run_started(self, *, total: int, pending: int, workers: int) -> None: ...
    def item_finished(self, state: str, seconds: float, failure: Failure | None) -> None: ...
    def attempt_failed(self, failure: Failure, seconds: float) -> None: ...
    def retry_scheduled(self, failure: Failure) -> None: ...
    # `pid` is the dead worker's: whatever it left behind (metric files) can be cleaned up.
    def worker_restarted(self, cause: str, pid: int) -> None: ...
    def checkpoint(self, seconds: float, ok: bool, size: int) -> None: ...
    def progress(self, *, total: int, done: int, failed: int, pending: int, in_flight: int,
                 workers: int) -> None: ...
    # Dispatch paused for an outage of `system` (database, S3, environment), and resumed.
    def paused(self, system: str) -> None: ...
    def resumed(self, seconds: float) -> None: ...
    def run_finished(self, summary: dict[str, Any]) -> None: ...


class NullObserver:
    """Observes nothing."""

    def run_started(self, *, total: int, pending: int, workers: int) -> None:
        pass

    def item_finished(self, state: str, seconds: float, failure: Failure | None) -> None:
        pass

    def attempt_failed(self, failure: Failure, seconds: float) -> None:
        pass

    def retry_scheduled(self, failure: Failure) -> None:
        pass

    def worker_restarted(self, cause: str, pid: int) -> None:
        pass

    def checkpoint(self, seconds: float, ok: bool, size: int) -> None:
        pass

    def progress(self, *, total: int, done: int, failed: int, pending: int, in_flight: int,
                 workers: int) -> None:
        pass

    def paused(self, system: str) -> None:
        pass

    def resumed(self, seconds: float) -> None:
        pass

    def run_finished(self, summary: dict[str, Any]) -> None:
        pass


class OnStart:
    """Passes every event on to `inner`, and calls `on_start` first when the run really starts
    (its first item is about to go out): what must not happen for a run that never starts, such
    as serving /metrics or telling the new run's id."""

    def __init__(self, inner: Observer, on_start: Callable[[], None]) -> None:
        self.inner = inner
        self._on_start = on_start

    def run_started(self, *, total: int, pending: int, workers: int) -> None:
        self._on_start()
        self.inner.run_started(total=total, pending=pending, workers=workers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
