"""What one attempt of one item came to: the only value a worker sends back to the parent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Failure kinds. `retryable` and `permanent` come from the handler or the classification rules;
#: `crashed` and `timeout` are decided by the parent when a worker dies or overruns; `invalid`
#: marks an input line recorded with --skip-invalid.
RETRYABLE = "retryable"
PERMANENT = "permanent"
CRASHED = "crashed"
TIMEOUT = "timeout"
INVALID = "invalid"
INTERRUPTED = "interrupted"

RETRYABLE_KINDS = frozenset({RETRYABLE, CRASHED, TIMEOUT})


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

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS

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

    @property
    def ok(self) -> bool:
        return self.failure is None
