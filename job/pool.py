"""The worker pool: starts worker processes, hands them items, and notices every death.

`multiprocessing.Pool` loses the task of a killed worker and `ProcessPoolExecutor` breaks on
one, so the pool is a small supervisor: each worker has its own pipe, and the parent waits on
all pipes and all process sentinels at once, so it knows which item a dead worker held.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from . import worker as worker_module

#: Start method for workers: forkserver forks from a clean single-threaded server process, so the
#: parent's threads (checkpoint writer, metrics server) and their locks never leak into a worker,
#: and starting a replacement costs a fork, not a new interpreter.
START_METHOD = "forkserver"
#: A task is handed over ahead of time only if it is this small: a worker reads its pipe only
#: between items, so a large task would block the parent's send until the current item ends.
PREFETCH_MAX_BYTES = 32 * 1024
#: Seconds to wait for workers to exit after being told to, before they are killed.
EXIT_GRACE = 5.0


@dataclass(slots=True)
class Task:
    """An attempt handed to a worker."""

    item_id: str
    payload: dict[str, Any]
    attempt: int
    progress: dict[str, Any] | None = None

    def wire(self) -> bytes:
        return pickle.dumps((self.item_id, self.payload, self.attempt, self.progress),
                            protocol=pickle.HIGHEST_PROTOCOL)


@dataclass(slots=True)
class WorkerHandle:
    process: Any
    conn: Any
    ready: bool = False
    #: Tasks sent and not yet answered, in the order the worker runs them.
    inflight: deque[Task] = field(default_factory=deque)
    #: When the task at the head of `inflight` started (monotonic), for --item-timeout.
    head_started: float = 0.0
    items_run: int = 0
    #: Its pipe is broken: the process is dead or dying, so nothing more is sent to it.
    broken: bool = False
    #: It said it exits after its last answer: whatever it still holds was never started.
    retiring: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass(frozen=True, slots=True)
class Finished:
    """A worker answered: `outcome` is a job.outcome.Outcome."""

    handle: WorkerHandle
    task: Task
    outcome: Any


@dataclass(frozen=True, slots=True)
class Died:
    """A worker process ended without being asked to; `running` is the item it held, if any."""

    handle: WorkerHandle
    running: Task | None
    unstarted: list[Task]
    exitcode: int | None


class Pool:
    """A fixed number of worker processes, replaced as they die."""

    def __init__(self, size: int, settings: Any, *, prefetch: int = 2, preload: tuple[str, ...] = ()) -> None:
        self.size = size
        self.settings = settings
        self.prefetch = max(1, prefetch)
        self._ctx = multiprocessing.get_context(START_METHOD)
        if preload:
            self._ctx.set_forkserver_preload(list(preload))
        self._stop_flag = self._ctx.RawValue("b", 0)
        self._start_deadline = self._ctx.RawValue("d", float("inf"))
        self.workers: list[WorkerHandle] = []
        self.started = 0

    def start(self) -> None:
        for _ in range(self.size):
            self.workers.append(self._spawn())

    def _spawn(self) -> WorkerHandle:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=worker_module.main, args=(child_end, self.settings, self._stop_flag, self._start_deadline),
                                    name="bulkjob-worker", daemon=True)
        process.start()
        child_end.close()
        self.started += 1
        return WorkerHandle(process, parent_end)

    def stop_starting_items(self) -> None:
        """Tell workers not to start items already handed to them (they are sent back)."""
        self._stop_flag.value = 1

    def start_items_until(self, deadline: float) -> None:
        """Workers start no item after this wall-clock time (the lease's end) unless moved on."""
        self._start_deadline.value = deadline

    def free(self) -> list[WorkerHandle]:
        """Workers that can take another task now."""
        return [w for w in self.workers
                if not w.broken and len(w.inflight) < (self.prefetch if w.ready else 1)]

    def submit(self, handle: WorkerHandle, task: Task) -> bool:
        """Hand `task` to `handle`; False (nothing sent) if it is too big to send ahead of time
        or the worker is gone."""
        data = task.wire()
        if handle.inflight and len(data) > PREFETCH_MAX_BYTES:
            return False
        try:
            handle.conn.send_bytes(data)
        except OSError:
            # The worker died and its death is not yet collected; wait() will report it.
            handle.broken = True
            return False
        if not handle.inflight:
            handle.head_started = time.monotonic()
        handle.inflight.append(task)
        return True

    def busy(self) -> int:
        return sum(len(w.inflight) for w in self.workers)

    def wait(self, timeout: float, extra: list[Any] = ()) -> tuple[list[Finished | Died], list[Any]]:
        """Wait up to `timeout` seconds for answers and deaths; also returns which of `extra`
        (for example the signal wake-up socket) became ready."""
        by_conn = {w.conn: w for w in self.workers}
        by_sentinel = {w.process.sentinel: w for w in self.workers}
        ready = multiprocessing.connection.wait([*by_conn, *by_sentinel, *extra], timeout)
        events: list[Finished | Died] = []
        dead: set[int] = set()
        for obj in ready:
            handle = by_conn.get(obj)
            if handle is not None:
                events.extend(self._drain(handle))
        for obj in ready:
            handle = by_sentinel.get(obj)
            if handle is not None and id(handle) not in dead:
                dead.add(id(handle))
                # Answers written just before the death are still in the pipe: take them first.
                events.extend(self._drain(handle))
                events.append(self._bury(handle))
        return events, [obj for obj in ready if obj in extra]

    def _drain(self, handle: WorkerHandle) -> list[Finished]:
        events = []
        try:
            while handle.conn.poll():
                message = handle.conn.recv()
                if isinstance(message, tuple) and message and message[0] == worker_module.READY:
                    handle.ready = True
                    handle.head_started = time.monotonic()
                    continue
                if isinstance(message, tuple) and message and message[0] == worker_module.RETIRING:
                    handle.retiring = handle.broken = True
                    continue
                task = handle.inflight.popleft()
                handle.items_run += 1
                handle.head_started = time.monotonic()
                events.append(Finished(handle, task, message))
        except (EOFError, OSError):
            pass
        return events

    def _bury(self, handle: WorkerHandle) -> Died:
        handle.process.join(timeout=1)
        running = handle.inflight.popleft() if handle.inflight and handle.ready and not handle.retiring else None
        unstarted = list(handle.inflight)
        handle.inflight.clear()
        handle.conn.close()
        self.workers.remove(handle)
        return Died(handle, running, unstarted, handle.process.exitcode)

    def kill(self, handle: WorkerHandle) -> None:
        """SIGKILL a worker; its death is reported by the next wait()."""
        try:
            os.kill(handle.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def replace(self) -> WorkerHandle:
        handle = self._spawn()
        self.workers.append(handle)
        return handle

    def overdue(self, item_timeout: float, now: float) -> list[WorkerHandle]:
        """Workers whose current item has run longer than `item_timeout`."""
        return [w for w in self.workers if w.ready and w.inflight and now - w.head_started > item_timeout]

    def next_deadline(self, item_timeout: float) -> float | None:
        starts = [w.head_started for w in self.workers if w.ready and w.inflight]
        return min(starts) + item_timeout if starts else None

    def close(self, *, kill: bool = False) -> None:
        """End every worker: politely (finish, then exit) unless `kill`."""
        for handle in self.workers:
            if kill:
                self.kill(handle)
            else:
                try:
                    handle.conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + EXIT_GRACE
        for handle in self.workers:
            handle.process.join(max(0.0, deadline - time.monotonic()))
            if handle.process.is_alive():
                self.kill(handle)
                handle.process.join(1)
            handle.conn.close()
        self.workers.clear()
