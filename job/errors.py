"""The exception tree: one root, one class per reason, each with the exit code it ends a run with."""

from __future__ import annotations

from .exits import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_ITEMS_FAILED, EXIT_LEASE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE

__all__ = ["EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_ITEMS_FAILED", "EXIT_LEASE", "EXIT_OK",
           "EXIT_UNAVAILABLE", "EXIT_USAGE"]


class BulkjobError(Exception):
    """Root of every error bulkjob raises on purpose."""

    exit_code = EXIT_USAGE

    @property
    def line(self) -> str:
        """The error in one line, for the summary's `error`."""
        text = str(self).strip()
        return text.splitlines()[0] if text else type(self).__name__

    def details(self) -> list[str]:
        """What the error says beyond its line, one log record each: by default the lines after
        the first of its message."""
        return [line.strip() for line in str(self).splitlines()[1:] if line.strip()]


class HandlerError(BulkjobError):
    """Raised by a handler to say how its failure must be treated."""

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class Retryable(HandlerError):
    """Raised by a handler when the attempt may succeed if tried again later."""


class Permanent(HandlerError):
    """Raised by a handler when trying the item again cannot help."""


class Unavailable(HandlerError):
    """Raised by a handler when what the item needs cannot be reached (an API, a store): the run
    pauses and tries again later, and the item keeps its attempts."""

    def __init__(self, message: str = "", *, code: str | None = None, system: str | None = None) -> None:
        super().__init__(message, code=code)
        self.system = system


class UsageError(BulkjobError):
    """Raised when options or configuration are wrong; nothing was run."""


class HandlerImportError(UsageError):
    """Raised when the handler's module cannot be imported (missing, a syntax error, an exception
    raised at import); `details` keeps the traceback for the developer."""

    def __init__(self, message: str, traceback: str | None = None) -> None:
        super().__init__(message)
        self.traceback = traceback

    def details(self) -> list[str]:
        return [f"the handler's import failed:\n{self.traceback.rstrip()}"] if self.traceback else []


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

    @property
    def line(self) -> str:
        first = f", the first: {self.problems[0]}" if self.problems else ""
        return (f"{self.source}: {len(self.problems) + self.more} invalid line(s){first} "
                "(--skip-invalid records them as failed items and runs the rest)")

    def details(self) -> list[str]:
        return [f"{self.source} {p}" for p in self.problems] + ([f"... and {self.more} more"] if self.more else [])


class ManifestError(BulkjobError):
    """Raised when the manifest cannot be read or written for good (not a passing outage)."""


class ManifestCorrupt(ManifestError):
    """Raised when a manifest object exists but cannot be parsed; nothing is overwritten."""


class Unreachable(BulkjobError):
    """Raised when the store or the database could not be reached; the caller may wait and retry."""

    exit_code = EXIT_UNAVAILABLE


class StoreUnavailable(Unreachable):
    """Raised by a store when the backend could not be reached; the caller may retry."""


class EnvironmentUnavailable(BulkjobError):
    """Raised when the database or the store stayed unreachable past --outage-timeout."""

    exit_code = EXIT_UNAVAILABLE


class ConfigError(UsageError):
    """Raised when the environment refuses our settings: a wrong password, a missing database,
    access denied. Running again cannot help until the configuration is fixed."""


class PreconditionFailed(BulkjobError):
    """Raised by a store when a conditional write lost to another writer."""


class Fenced(BulkjobError):
    """Raised inside a background writer when the lease's fence closed before a write; nothing
    was written and the batch is kept."""


class LeaseHeld(BulkjobError):
    """Raised when another runner holds this run's shard."""

    exit_code = EXIT_LEASE


class LeaseLost(BulkjobError):
    """Raised by the lease's fence once another runner has the shard: nothing may be written
    again by this one."""

    exit_code = EXIT_LEASE
