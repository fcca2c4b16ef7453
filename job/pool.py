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
import selectors
import signal
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from . import worker as worker_module
from .scheduler import Task

#: Start method for workers: forkserver forks from a clean single-threaded server process, so the
#: parent's threads (checkpoint writer, metrics server) and their locks never leak into a worker,
#: and starting a replacement costs a fork, not a new interpreter.
START_METHOD = "forkserver"
#: A task is handed over ahead of time only if it is this small: a worker reads its pipe only
#: between items, so a large task would block the parent's send until the current item ends.
PREFETCH_MAX_BYTES = 32 * 1024
#: What a selector key of the pool stands for.
ANSWER, DEATH, EXTRA = "answer", "death", "extra"
#: Seconds to wait for workers to exit after being told to, before they are killed.
EXIT_GRACE = 5.0


#: Bytes taken from a worker's pipe per read: a few hundred answers.
READ_BYTES = 1 << 16
_SIZE = struct.Struct("!i")
_LONG_SIZE = struct.Struct("!Q")


class Answers:
    """A worker's messages, read from its pipe in bulk: one read takes every message queued,
    where Connection.recv makes two system calls per message (its header, then its body).
    Reads only the framing that Connection.send_bytes writes."""

    def __init__(self, conn: Any) -> None:
        # A second descriptor of the same socket, read without blocking (MSG_DONTWAIT) while
        # the Connection keeps its blocking one for sending.
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))
        self._buf = bytearray()
        #: The worker's end is closed: nothing more will come.
        self.ended = False

    def read(self) -> list[Any]:
        """The messages that came whole since the last read (unpickled), [] if none; sets
        `ended` when the pipe is closed (a message cut short by the worker's death is lost)."""
        if self.ended:
            return []
        buf = self._buf
        while True:
            try:
                chunk = self._sock.recv(READ_BYTES, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                self.ended = True
                break
            buf += chunk
            if len(chunk) < READ_BYTES:
                break
        messages, at = [], 0
        while len(buf) - at >= 4:
            (size,) = _SIZE.unpack_from(buf, at)
            start = at + 4
            if size == -1:
                if len(buf) - start < 8:
                    break
                (size,) = _LONG_SIZE.unpack_from(buf, start)
                start += 8
            if len(buf) - start < size:
                break
            messages.append(pickle.loads(memoryview(buf)[start:start + size]))
            at = start + size
        del buf[:at]
        return messages

    def close(self) -> None:
        self._sock.close()


@dataclass(slots=True)
class WorkerHandle:
    process: Any
    conn: Any
    answers: Answers
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
        #: Tasks a ready worker may hold, the running one included; the run adapts it to the
        #: items' duration unless --prefetch fixed it.
        self.depth = max(1, prefetch)
        # One selector for the pool's life: building one per wait (as multiprocessing's
        # wait() does) cost more than the rest of the parent's work per item.
        self._selector = selectors.DefaultSelector()
        self._ctx: Any = multiprocessing.get_context(START_METHOD)
        if preload:
            self._ctx.set_forkserver_preload(list(preload))
        self._stop_flag = self._ctx.RawValue("b", 0)
        self._start_deadline = self._ctx.RawValue("d", float("inf"))
        #: Grows when an outage begins: a worker drops database sessions opened before it.
        self._environment = self._ctx.RawValue("i", 0)
        self.workers: list[WorkerHandle] = []
        self.started = 0

    def start(self) -> None:
        for _ in range(self.size):
            self.workers.append(self._spawn())

    def _spawn(self) -> WorkerHandle:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=worker_module.main,
                                    args=(child_end, self.settings, self._stop_flag, self._start_deadline,
                                          self._environment),
                                    name="bulkjob-worker", daemon=True)
        process.start()
        child_end.close()
        self.started += 1
        handle = WorkerHandle(process, parent_end, Answers(parent_end))
        self._selector.register(parent_end.fileno(), selectors.EVENT_READ, (ANSWER, handle))
        self._selector.register(process.sentinel, selectors.EVENT_READ, (DEATH, handle))
        return handle

    def watch(self, obj: Any) -> None:
        """Also wake wait() when `obj` (a socket, a file descriptor) becomes readable."""
        self._selector.register(obj, selectors.EVENT_READ, (EXTRA, obj))

    def bump_environment(self) -> None:
        """An outage began: sessions opened before it are suspect, so every worker opens a new
        one before its next item (a server restarted meanwhile would fail the first statement
        on an old session, and that failure would look like a new outage)."""
        self._environment.value += 1

    def stop_starting_items(self) -> None:
        """Tell workers not to start items already handed to them (they are sent back)."""
        self._stop_flag.value = 1

    def start_items_until(self, deadline: float) -> None:
        """Workers start no item after this time (the lease's `valid_until`, on the monotonic
        clock, which every process of a Linux host shares) unless it is moved on."""
        self._start_deadline.value = deadline

    def free(self) -> list[WorkerHandle]:
        """Workers that can take another task now."""
        return [w for w in self.workers if not w.broken and len(w.inflight) < self.room(w)]

    def room(self, handle: WorkerHandle) -> int:
        """How many tasks `handle` may hold: one until it is ready, then the pool's depth."""
        return self.depth if handle.ready else 1

    def submit(self, handle: WorkerHandle, tasks: list[Task]) -> int:
        """Hand `tasks` to `handle` in one message; returns how many were sent (the first ones).

        A batch too big for the pipe's buffer is cut to one task, and that one is sent only to
        an idle worker: a worker reads its pipe only between items, so a large send to a busy
        one would block the parent until its current item ends. Nothing is sent to a worker
        that is gone."""
        data = pickle.dumps([t.wire() for t in tasks], protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > PREFETCH_MAX_BYTES:
            if handle.inflight:
                return 0
            tasks = tasks[:1]
            data = pickle.dumps([tasks[0].wire()], protocol=pickle.HIGHEST_PROTOCOL)
        try:
            handle.conn.send_bytes(data)
        except OSError:
            # The worker died and its death is not yet collected; wait() will report it.
            handle.broken = True
            return 0
        if not handle.inflight:
            handle.head_started = time.monotonic()
        handle.inflight.extend(tasks)
        return len(tasks)

    def queued_everywhere(self) -> bool:
        """Every worker is ready and holds a task beyond the one it runs: none can run out of
        work soon."""
        return all(w.ready and not w.broken and len(w.inflight) >= 2 for w in self.workers)

    def busy(self) -> int:
        return sum(len(w.inflight) for w in self.workers)

    def wait(self, timeout: float) -> tuple[list[Finished | Died], list[Any]]:
        """Wait up to `timeout` seconds for answers and deaths; also returns which watched
        objects (for example the signal wake-up socket) became ready."""
        events: list[Finished | Died] = []
        extra: list[Any] = []
        dying: list[WorkerHandle] = []
        for key, _ in self._selector.select(timeout):
            kind, obj = key.data
            if kind == ANSWER:
                # What is queued now, in one read; the selector is level-triggered, so the next
                # wait() returns at once if more came meanwhile.
                events.extend(self._receive(obj))
                if obj.answers.ended:
                    # The pipe is closed: the worker is dead or dying. Stop watching the pipe
                    # (it would stay readable) and let its sentinel report the death.
                    obj.broken = True
                    self._forget(obj.conn.fileno())
            elif kind == DEATH:
                dying.append(obj)
            else:
                extra.append(obj)
        for handle in dying:
            if handle in self.workers:
                # Answers written just before the death are still in the pipe: take them first.
                events.extend(self._receive(handle))
                events.append(self._bury(handle))
        return events, extra

    def _receive(self, handle: WorkerHandle) -> list[Finished]:
        """Read what `handle` has sent: its answers, in the order it ran them."""
        found: list[Finished] = []
        for message in handle.answers.read():
            if isinstance(message, tuple):
                if message[0] == worker_module.READY:
                    handle.ready = True
                    handle.head_started = time.monotonic()
                elif message[0] == worker_module.RETIRING:
                    handle.retiring = handle.broken = True
                continue
            found.append(Finished(handle, handle.inflight.popleft(), message))
            handle.items_run += 1
        if found:
            handle.head_started = time.monotonic()
        return found

    def _bury(self, handle: WorkerHandle) -> Died:
        handle.process.join(timeout=1)
        running = handle.inflight.popleft() if handle.inflight and handle.ready and not handle.retiring else None
        unstarted = list(handle.inflight)
        handle.inflight.clear()
        self._forget(handle.conn.fileno())
        self._forget(handle.process.sentinel)
        handle.conn.close()
        handle.answers.close()
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
            self._forget(handle.conn.fileno())
            self._forget(handle.process.sentinel)
            handle.conn.close()
            handle.answers.close()
        self.workers.clear()

    def _forget(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass
