"""What one attempt of one item came to: the only value a worker sends back to the parent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Failure kinds. An *item* failure belongs to the item: `retryable` (a lock, a deadlock, a
#: passing error of the handler's), `permanent` (bad data, a constraint), `crashed` and
#: `timeout` (decided by the parent when a worker dies or overruns), `invalid` (an input line
#: recorded with --skip-invalid). An *environment* failure says that what the item needs cannot
#: be reached (`outage`: a connection refused or lost) or refuses our settings (`config`: a
#: wrong password); neither is the item's fault, so neither spends one of its attempts.
RETRYABLE = "retryable"
PERMANENT = "permanent"
CRASHED = "crashed"
TIMEOUT = "timeout"
INVALID = "invalid"
OUTAGE = "outage"
CONFIG = "config"

RETRYABLE_KINDS = frozenset({RETRYABLE, CRASHED, TIMEOUT})
ENVIRONMENT_KINDS = frozenset({OUTAGE, CONFIG})

#: What an environment failure is about, for the operator: the progress line says "paused:
#: database unavailable since ...".
DATABASE = "database"
STORE = "S3"


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an attempt failed: its kind, the exception's class name, a code, a message."""

    kind: str
    error_class: str
    message: str
    code: str | None = None
    traceback: str | None = None
    #: The database session behind the attempt is dead: open a new one before the next attempt.
    reconnect: bool = False
    #: What could not be reached or refused us (DATABASE, STORE), for outage and config failures.
    system: str | None = None
    #: The failure happened while connecting (a new session could not be made), not in the
    #: middle of an item: one such failure is enough to say the environment is down.
    connecting: bool = False

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS

    @property
    def environment(self) -> bool:
        """Not the item's fault: the attempt is refunded, never counted against the item."""
        return self.kind in ENVIRONMENT_KINDS

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent with every failed attempt: as its constructor's arguments, which unpickle faster
        # than a dataclass's state.
        return (Failure, (self.kind, self.error_class, self.message, self.code, self.traceback, self.reconnect,
                          self.system, self.connecting))

    def as_record(self) -> dict[str, Any]:
        """The failure as kept in the manifest (no traceback: it can be long and hold data)."""
        record = {"kind": self.kind, "class": self.error_class, "message": self.message}
        if self.code:
            record["code"] = self.code
        return record


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt's end: `failure` is None when the handler returned normally."""

    item_id: str
    attempt: int
    seconds: float
    result: dict[str, Any] | None = None
    failure: Failure | None = None
    #: Progress a failed attempt kept (for example the last committed SQL step).
    progress: dict[str, Any] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # One per item through the parent's pipe: as the constructor's arguments, which pickle
        # and unpickle several times faster than a dataclass's state (`fields()` on each side).
        return (Outcome, (self.item_id, self.attempt, self.seconds, self.result, self.failure, self.progress))
