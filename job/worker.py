"""The worker process: runs one attempt of one item at a time and sends back its Outcome.

A worker decides nothing: it does not retry, sleep on a backoff or write the manifest. It
keeps what is worth keeping between items (the handler, a database session) and sends back
plain values only; no exception object crosses the process boundary.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pickle import HIGHEST_PROTOCOL, dumps
from typing import TYPE_CHECKING, Any

from .errors import BulkjobError, HandlerImportError, Permanent, UsageError
from .items import Item
from .logs import add_secrets, redact_std_streams, set_item
from .outcome import CRASHED, PERMANENT, Failure, Outcome
from .redact import env_secrets, field_values, scrub_outcome, secrets_of
from .retry import classify
from .tracebacks import handler_traceback, import_failure_at

if TYPE_CHECKING:
    from .db import Database

#: Largest result a handler may return: results live in the manifest, bulk output belongs in S3.
MAX_RESULT_BYTES = 64 * 1024

#: Message tags on the worker's pipe: the worker is ready for items; the worker exits after the
#: item it just answered (out of memory, or --max-items-per-worker reached).
READY = "ready"
RETIRING = "retiring"

Handler = Callable[[Item, "Context"], "dict[str, Any] | None"]


def load_handler(spec: str, db: Any = None) -> Handler:
    """Import `module:function`, or build the SQL steps handler for `sql:PATH` (for `db`)."""
    if spec.startswith("sql:"):
        from .db.steps import steps_handler

        return steps_handler(spec[4:], db)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--handler {spec!r}: expected MODULE:FUNCTION or sql:PATH")
    module = _import_handler_module(spec, module_name)
    try:
        handler = getattr(module, attr)
    except AttributeError:
        if module_name == "job":
            raise UsageError(f"--handler {spec!r}: `job` is bulkjob's own package, so a handler module cannot "
                             "be called job; rename your job.py") from None
        raise UsageError(f"--handler {spec!r}: {module_name} has no attribute {attr!r}") from None
    if not callable(handler):
        raise UsageError(f"--handler {spec!r}: {attr!r} is not callable")
    return handler


def _import_handler_module(spec: str, module_name: str):
    """Import the handler's module; any failure (not found, a syntax error, an exception raised
    at import, even SystemExit) is a HandlerImportError naming the file and line."""
    try:
        return importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        if isinstance(e, ModuleNotFoundError) and e.name and (module_name + ".").startswith(e.name + "."):
            raise HandlerImportError(
                f"--handler {spec!r}: cannot import {module_name!r}: no module named {e.name!r} in the "
                "current directory or on the Python path") from None
        where = import_failure_at(e)
        text = str(e.msg if isinstance(e, SyntaxError) else e).strip()
        text = text.splitlines()[0] if text else ""
        raise HandlerImportError(
            f"--handler {spec!r}: cannot import {module_name!r}: {type(e).__name__}"
            + (f" at {where}" if where else "") + (f": {text}" if text else ""),
            traceback=handler_traceback(e, importing=True)) from None


class Resources:
    """What a worker keeps from item to item; the database session is opened on first use."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self._db: Database | None = None
        #: Set when this worker should exit after the current item (out of memory).
        self.retire = False
        #: The parent's environment epoch when the session was opened (see Pool.bump_environment).
        self.epoch = 0

    def new_epoch(self, epoch: int) -> None:
        """An outage began since the session was opened: open a new one before the next item."""
        if epoch != self.epoch:
            self.epoch = epoch
            if self._db is not None:
                self._db.close()

    def connect_failed(self) -> bool:
        """Whether the last failure happened while opening a database session."""
        return self._db is not None and self._db.connect_failed

    def uncommitted(self) -> bool:
        """Whether the handler left changes uncommitted on the worker's session."""
        return self._db is not None and self._db.in_transaction()

    @property
    def db(self):
        if self._db is None:
            if self.settings.db is None:
                raise UsageError("this handler uses ctx.db, but no --db was given")
            from .db import Database

            self._db = Database(self.settings.db)
        return self._db

    def after_failure(self, failure: Failure) -> None:
        """Drop a database session the failure left unusable; the next attempt reconnects."""
        if self._db is not None:
            self._db.after_failure(failure)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


@dataclass(slots=True)
class Context:
    """What a handler gets besides the item."""

    attempt: int
    run_id: str
    shard: int
    log: logging.LoggerAdapter
    resources: Resources
    #: Progress an earlier failed attempt kept (such as the last committed SQL step); a handler
    #: updates it as it goes, and it is saved with the failure if this attempt fails too.
    progress: dict[str, Any] = field(default_factory=dict)

    @property
    def db(self):
        """The worker's database connection wrapper (opened lazily, reused across items)."""
        return self.resources.db.connection()

    def executemany(self, sql: str, rows, *, batch_size: int = 1000):
        """Batch DML on the worker's connection; returns the rows that failed (see job.db)."""
        return self.resources.db.executemany(sql, rows, batch_size=batch_size)


def run_attempt(handler: Handler, task: tuple, *, settings: Any, resources: Resources,
                logger: logging.Logger) -> Outcome:
    """Run one attempt and turn whatever happens into an Outcome."""
    item_id, payload, attempt, progress = task
    ctx = Context(
        attempt=attempt, run_id=settings.run_id, shard=settings.shard_index,
        log=logging.LoggerAdapter(logger, {"item_id": item_id, "attempt": attempt}),
        resources=resources, progress=dict(progress or {}),
    )
    started = time.monotonic()
    try:
        result = handler(Item(item_id, payload), ctx)
        if resources.uncommitted():
            # Rolling it back silently would lose work the item was recorded done for.
            raise Permanent("returned with uncommitted changes; commit or roll back in the handler",
                            code="UNCOMMITTED")
    except MemoryError:
        # Treated like a kill by the OOM killer: retryable, and this worker retires (its heap
        # may be left fragmented or half-updated), so the next attempt gets a fresh process.
        failure = Failure(CRASHED, "MemoryError", "the worker ran out of memory "
                          "(--worker-memory-limit or the container's memory limit)")
        resources.retire = True
    except Exception as exc:
        failure = classify(exc, retry_on=settings.retry_on, outage_on=settings.outage_on,
                           classifiers=_classifiers(settings))
        # The developer reads it from their own code down, not from the worker that called it.
        failure = replace(failure, traceback=handler_traceback(exc))
        if failure.environment and resources.connect_failed():
            failure = replace(failure, connecting=True)
    else:
        problem = check_result(result)
        if problem is None:
            return Outcome(item_id, attempt, time.monotonic() - started, result=result)
        failure = Failure(PERMANENT, "InvalidResult", problem)
    # The parent logs the failure (a retry at DEBUG, the last one at WARNING), once.
    resources.after_failure(failure)
    return Outcome(item_id, attempt, time.monotonic() - started, failure=failure,
                   progress=ctx.progress or None)


def _attempt(handler: Handler, task: tuple, *, settings: Any, resources: Resources,
             logger: logging.Logger, secrets: tuple[str, ...]) -> Outcome:
    """One attempt with its bookkeeping: every record logged meanwhile names the item, and no
    secret value (the environment's, or the item's --redact fields) leaves the worker in the
    outcome."""
    item_secrets = field_values(task[1], settings.redact_fields) if settings.redact_fields else ()
    set_item(task[0], task[2], item_secrets)
    try:
        outcome = run_attempt(handler, task, settings=settings, resources=resources, logger=logger)
    finally:
        set_item(None)
    return scrub_outcome(outcome, secrets_of(secrets + item_secrets) if item_secrets else secrets)


def check_result(result: Any) -> str | None:
    """Why a handler's return value cannot be kept in the manifest, or None if it can."""
    if result is None:
        return None
    if not isinstance(result, dict):
        return f"handler returned {type(result).__name__}, expected a dict or None"
    try:
        size = len(json.dumps(result))
    except (TypeError, ValueError) as e:
        return f"handler result is not JSON-serialisable: {e}"
    if size > MAX_RESULT_BYTES:
        return f"handler result is {size} bytes, more than {MAX_RESULT_BYTES}"
    return None


def _classifiers(settings: Any) -> tuple:
    if settings.db is None:
        return ()
    from .db import classifiers

    return classifiers(settings.db)


def _password_from_file(settings: Any) -> tuple[str, ...]:
    """The database password when it comes from --db-password-file (one from the environment is
    among the environment's secrets already)."""
    if settings.db is None or not getattr(settings.db, "password_file", None):
        return ()
    from .db import read_password

    try:
        return (read_password(settings.db) or "",)
    except BulkjobError:
        return ()  # unreadable: the connection attempt reports it


def _queued(conn) -> bool:
    """Whether a message waits in the pipe (select with no wait: Connection.poll builds a
    selector per call)."""
    return bool(select.select([conn.fileno()], [], [], 0)[0])


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when the process that started it exits."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _start(settings: Any) -> tuple[Handler, tuple[str, ...], Any]:
    """What a worker needs before its first item: the handler, the secret values, the gauge of
    items in flight (None without metrics)."""
    in_flight = None
    if settings.metrics_dir:
        # Before the handler is imported, so that metrics a handler defines with prometheus_client
        # find the multiprocess directory too.
        from .metricsfiles import worker_in_flight

        in_flight = worker_in_flight(settings.metrics_dir)
    secrets = secrets_of(env_secrets() + _password_from_file(settings))
    add_secrets(secrets)
    # What a handler prints reaches the pod's log too (at import time as well), a line at a time.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    redact_std_streams(secrets)
    return load_handler(settings.handler, settings.db), secrets, in_flight


def main(conn, settings: Any, stop_flag, start_deadline, environment) -> None:
    """Worker entry point: `conn` is this worker's end of its pipe to the parent.

    Receives lists of task tuples (item id, payload, attempt, progress), or None to exit. Before
    each item it checks `stop_flag`, set by the parent when it drains, and `start_deadline`, the
    end of the shard's lease: an item handed over ahead of time but not started is then sent
    back unstarted (an Outcome with attempt 0). `environment` is the parent's outage epoch.
    """
    # The parent handles SIGINT/SIGTERM and ends workers itself; a Ctrl-C on a terminal reaches
    # the whole process group and must not kill items that the drain lets finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    # Stdout carries the run's summary and nothing else: whatever a handler writes there (print,
    # sys.stdout.buffer, os.write(1, ...), C code) goes to the log stream instead.
    os.dup2(2, 1)
    from .logs import setup_logging

    setup_logging(settings.log_format, settings.log_level, settings.log_file,
                  run_id=settings.run_id, shard=settings.shard_index,
                  log_file_max_bytes=settings.log_file_max_bytes, log_file_backups=settings.log_file_backups)
    logger = logging.getLogger("bulkjob.item")
    try:
        handler, secrets, in_flight = _start(settings)
    except Exception as e:
        # One record, not a bare traceback; the parent sees a worker that died before it was
        # ready, and stops the run (exit 2) if they all do.
        trace = getattr(e, "traceback", None)
        logging.getLogger("bulkjob").error("worker %d cannot start: %s%s", os.getpid(), e,
                                           f"\n{trace}" if isinstance(trace, str) else "",
                                           exc_info=None if isinstance(e, BulkjobError) else e)
        sys.exit(1)
    resources = Resources(settings)
    if settings.memory_limit:
        # Address space, set after the imports so that they do not count against it.
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (settings.memory_limit, settings.memory_limit))
    items_run = 0
    #: The gauge of items in flight says 1 while this worker runs attempts back to back; it is
    #: set to 0 only when the worker is about to wait for tasks (setting it around every
    #: attempt cost a tenth of a short item's time).
    running = False
    conn.send((READY, os.getpid()))
    try:
        while True:
            if running and not _queued(conn):
                in_flight.dec()
                running = False
            try:
                tasks = conn.recv()
            except EOFError:
                break
            if tasks is None:
                break
            for task in tasks:
                # The deadline is the end of the shard's lease as of its last acknowledged
                # renewal (monotonic): a parent that stalls (stopped, starved) past it must not
                # have its workers start items it may no longer record.
                if stop_flag.value or time.monotonic() > start_deadline.value:
                    conn.send_bytes(dumps(Outcome(task[0], 0, 0.0), HIGHEST_PROTOCOL))
                    continue
                if in_flight is not None and not running:
                    in_flight.inc()
                    running = True
                resources.new_epoch(environment.value)
                # Plain pickle: Connection.send builds a ForkingPickler (for sharing sockets and
                # file descriptors, which an Outcome never holds) per message.
                conn.send_bytes(dumps(_attempt(handler, task, settings=settings, resources=resources, logger=logger,
                                               secrets=secrets), HIGHEST_PROTOCOL))
                items_run += 1
                if resources.retire or (settings.max_items_per_worker
                                        and items_run >= settings.max_items_per_worker):
                    conn.send((RETIRING, os.getpid()))
                    return
    except (BrokenPipeError, EOFError):
        pass  # the parent is gone; nothing left to report to
    except Exception:
        # A bug of the worker's own (a handler's exceptions never get here): one record, and a
        # worker that dies, whose item the parent records as a crashed attempt.
        logging.getLogger("bulkjob").exception("worker %d failed", os.getpid())
        sys.exit(1)
    finally:
        resources.close()
        sys.stdout.flush()
