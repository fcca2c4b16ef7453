"""The database's exceptions (on job.errors' tree), and the classifiers `retry.classify` consults for them.

Each dialect's `classify` knows its driver's errors; `classify_common` knows ours, whatever the
dialect; `environment` is how every dialect says that the database, not the item, failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import EXIT_UNAVAILABLE, BulkjobError, HandlerError, Unreachable
from ..outcome import DATABASE, INVALID, OUTAGE, Failure
from .dialect import dialect_of

if TYPE_CHECKING:
    from .url import DbSettings


class ConnectTimeout(BulkjobError, TimeoutError):
    """Raised when connecting to the database took longer than --connect-timeout."""

    exit_code = EXIT_UNAVAILABLE


class DatabaseUnavailable(Unreachable):
    """Raised in the parent when the database could not be reached (preflight, reading items),
    or its own query met a passing error (a lock, --retry-on): the caller may wait and retry."""


class InvalidPayload(HandlerError):
    """Raised before any SQL runs when an item's payload cannot fill the SQL (a missing bind, an
    identifier outside its declaration): the item fails as `invalid`, at once."""


def environment(kind: str, error_class: str, message: str, code: str | None) -> Failure:
    """A failure of the database itself, `kind` OUTAGE (it cannot be reached, or ended the
    session) or CONFIG (it refuses our settings): never the item's fault, and the session is
    dropped (a new one is opened before the next attempt)."""
    return Failure(kind, error_class, message, code=code, reconnect=True, system=DATABASE)


def classify_common(exc: BaseException) -> Failure | None:
    """Errors of ours, whatever the dialect: a connect that outlasted --connect-timeout is an
    outage; a payload that cannot fill the SQL is an invalid item."""
    if isinstance(exc, ConnectTimeout):
        return Failure(OUTAGE, "ConnectTimeout", str(exc), code="CONNECT-TIMEOUT", reconnect=True,
                       system=DATABASE, connecting=True)
    if isinstance(exc, InvalidPayload):
        return Failure(INVALID, type(exc).__name__, str(exc), code=exc.code)
    return None


def classifiers(settings: DbSettings) -> tuple[Callable[[BaseException], Failure | None], ...]:
    """The classifiers `retry.classify` consults before its generic rules."""
    return (classify_common, dialect_of(settings).classify)


def first_line(text: str) -> str:
    """The first line of an error's text, for a message of one line."""
    return text.splitlines()[0] if text else ""
