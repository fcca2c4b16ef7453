"""What the parent records of each item, and says about it: the run's counts, the records it
hands to the checkpointer (or a work table's recorder), and the log line of an item's end.

One place builds every record a run writes (done, retried, failed, invalid, cut short,
running), so that the manifest's parser (job.manifest, job.records) and its writer agree.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from .items import Invalid
from .manifest import DONE, FAILED, PARTIAL, RUNNING
from .observe import Observer
from .outcome import DATABASE, STORE, Failure, Outcome
from .redact import field_values, scrub_text
from .scheduler import Task
from .tracebacks import raised_at

log = logging.getLogger("bulkjob")

#: Longest traceback kept with a failed item in the manifest and the log: its last lines
#: (where the error was raised) matter most.
MAX_TRACEBACK_CHARS = 4000


class Recorder(Protocol):
    """Where records go: job.checkpoint.Checkpointer (a manifest), or a work table's recorder."""

    failing_since: float | None
    last_error: str | None

    @property
    def unsaved(self) -> int: ...
    def start(self) -> None: ...
    def add(self, record: dict[str, Any]) -> None: ...
    def set_running(self, records: list[dict[str, Any]]) -> None: ...
    def write_now(self, records: list[dict[str, Any]], timeout: float) -> bool: ...
    def close(self, timeout: float) -> bool: ...


@dataclass(slots=True)
class Counts:
    """The run's tally, as the summary reports it."""

    total: int = 0
    done: int = 0
    failed: int = 0
    skipped_already_done: int = 0
    retries: int = 0
    attempts: int = 0
    #: Attempts that met an outage or a configuration error: not charged to their items.
    refunded: int = 0

    @property
    def pending(self) -> int:
        return max(0, self.total - self.done - self.failed)


@dataclass(frozen=True, slots=True)
class FenceWords:
    """How the logs and the summary speak of the run's fence and record: a shard's lease and
    manifest, or a runner's claims on a work table."""

    #: What holds the run's right to act ("the lease on this shard").
    held: str
    #: What keeping it is called ("renewed").
    kept: str
    #: The system whose silence suspends it (job.outcome's STORE or DATABASE).
    system: str
    #: Where the run's record goes ("the manifest").
    record: str


LEASE_WORDS = FenceWords("the lease on this shard", "renewed", STORE, "the manifest")
CLAIM_WORDS = FenceWords("this runner's claims", "extended", DATABASE, "the work table")


def running_record(task: Task) -> dict[str, Any]:
    """The record of an attempt running now (or about to start, in careful mode)."""
    record: dict[str, Any] = {"id": task.item_id, "state": RUNNING, "attempts": task.attempt}
    if task.progress:
        record["progress"] = task.progress
    return record


def describe(failure: Failure) -> str:
    """`Class CODE: message`, as the logs and the summary give a failure."""
    return f"{failure.error_class}{f' {failure.code}' if failure.code else ''}: {failure.message}"


def trimmed(trace: str | None) -> str | None:
    """A traceback cut to its last MAX_TRACEBACK_CHARS characters."""
    if not trace:
        return None
    trace = trace.rstrip()
    if len(trace) <= MAX_TRACEBACK_CHARS:
        return trace
    return "...\n" + trace[-MAX_TRACEBACK_CHARS:]


class Recording:
    """Turns what happened to items into records, counts and log lines."""

    def __init__(self, recorder: Recorder, counts: Counts, observer: Observer, *,
                 redact_fields: tuple[str, ...]) -> None:
        self.recorder = recorder
        self.counts = counts
        self.observer = observer
        self.redact_fields = redact_fields

    def shown(self, item_id: str, payload: Any) -> str:
        """The item's id as the logs show it: without the values of its --redact fields."""
        if not self.redact_fields:
            return item_id
        return scrub_text(item_id, field_values(payload, self.redact_fields))

    def done(self, task: Task, outcome: Outcome) -> None:
        self.counts.attempts += 1
        self.counts.done += 1
        record = {"id": task.item_id, "state": DONE, "attempts": task.attempt, "at": round(time.time(), 3),
                  "seconds": round(outcome.seconds, 6)}
        if outcome.result is not None:
            record["result"] = outcome.result
        self.recorder.add(record)
        self.observer.item_finished(DONE, outcome.seconds, None)

    def retried(self, task: Task, failure: Failure, delay: float) -> None:
        """A failed attempt that will be tried again: recorded, so that a restart continues the
        count (and resumes where the attempt got to)."""
        self.counts.retries += 1
        self.observer.retry_scheduled(failure)
        record = {"id": task.item_id, "state": PARTIAL, "attempts": task.attempt, "at": round(time.time(), 3),
                  "error": failure.as_record()}
        if task.progress:
            record["progress"] = task.progress
        self.recorder.add(record)
        log.debug("attempt %d failed (%s); retry in %.2fs", task.attempt, describe(failure), delay,
                  extra={"item_id": self.shown(task.item_id, task.payload), "attempt": task.attempt})

    def failed(self, item_id: str, attempts: int, failure: Failure, progress: dict[str, Any] | None = None,
               seconds: float = 0.0, *, payload: Any = None) -> None:
        """An item failed for good: recorded with its last attempt's traceback, logged once."""
        self.counts.failed += 1
        error = failure.as_record()
        trace = trimmed(failure.traceback)
        if trace:
            error["traceback"] = trace
        record = {"id": item_id, "state": FAILED, "attempts": attempts, "at": round(time.time(), 3),
                  "error": error}
        if progress:
            record["progress"] = progress
        self.recorder.add(record)
        self.observer.item_finished(FAILED, seconds, failure)
        # With a traceback (which ends with the whole message), the first line says what and where.
        at = raised_at(trace)
        what = (describe(failure).splitlines() or [""])[0] if trace else describe(failure)
        log.warning("failed after %d attempt(s): %s%s%s", attempts, what, f" ({at})" if at else "",
                    f"\n{trace}" if trace else "",
                    extra={"item_id": self.shown(item_id, payload), "attempt": attempts})

    def invalid(self, bad: Invalid, source_name: str) -> None:
        """An input line that is not a valid item, recorded as failed (--skip-invalid) under its
        line's id."""
        self.counts.failed += 1
        self.recorder.add(bad.record(at=time.time()))
        self.observer.item_finished(FAILED, 0.0, bad.failure())
        log.warning("%s line %d: %s; recorded as failed (--skip-invalid)", source_name, bad.line, bad.reason)

    def cut_short(self, running: list[Task]) -> None:
        """Attempts the run killed itself at the end of a drain are not the items' fault: their
        running records are superseded, with the attempt given back."""
        for task in running:
            record: dict[str, Any] = {"id": task.item_id, "state": PARTIAL, "attempts": task.attempt - 1,
                                      "at": round(time.time(), 3)}
            if task.progress:
                record["progress"] = task.progress
            self.recorder.add(record)
