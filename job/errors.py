"""The exception tree: one root, one class per reason, each with the exit code it ends a run with."""

from __future__ import annotations

#: Exit codes, the contract with Kubernetes (podFailurePolicy) and Airflow.
EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3
EXIT_LEASE_HELD = 4


class BulkjobError(Exception):
    """Root of every error bulkjob raises on purpose."""

    exit_code = EXIT_USAGE


class HandlerError(BulkjobError):
    """Raised by a handler to say how its failure must be treated."""

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class Retryable(HandlerError):
    """Raised by a handler when the attempt may succeed if tried again later."""


class Permanent(HandlerError):
    """Raised by a handler when trying the item again cannot help."""


class UsageError(BulkjobError):
    """Raised when options or configuration are wrong; nothing was run."""


class InputError(UsageError):
    """Raised when the items source has invalid lines; carries every problem found."""

    def __init__(self, source: str, problems: list[str], more: int = 0) -> None:
        self.source = source
        self.problems = problems
        self.more = more
        lines = [f"{source}: {len(problems) + more} invalid line(s)"]
        lines += [f"  {p}" for p in problems]
        if more:
            lines.append(f"  ... and {more} more")
        lines.append("  (use --skip-invalid to record them as failed items and run the rest)")
        super().__init__("\n".join(lines))


class ManifestError(BulkjobError):
    """Raised when the manifest cannot be read or written for good (not a passing outage)."""


class ManifestCorrupt(ManifestError):
    """Raised when a manifest object exists but cannot be parsed; nothing is overwritten."""


class StoreUnavailable(BulkjobError):
    """Raised by a store when the backend could not be reached; the caller may retry."""

    exit_code = EXIT_INTERRUPTED


class PreconditionFailed(BulkjobError):
    """Raised by a store when a conditional write lost to another writer."""


class LeaseHeld(BulkjobError):
    """Raised when another runner holds this run's shard."""

    exit_code = EXIT_LEASE_HELD


class Shutdown(BaseException):
    """Signals an orderly stop (SIGTERM, SIGINT); a BaseException so `except Exception` lets it pass."""
