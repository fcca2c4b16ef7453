"""Retry policy: classifying a failure, and how long to wait before the next attempt.

Pure functions: no I/O, no sleeping, and the jitter's randomness is passed in.
"""

from __future__ import annotations

import traceback as tb
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from .errors import Permanent, Retryable, Unavailable
from .outcome import OUTAGE, PERMANENT, RETRYABLE, Failure

#: Default attempts per item, the first included. With DEFAULT_BACKOFF and ITEM_JITTER the five
#: waits before the sixth attempt add up to at least 1 + 2 + 4 + 8 + 16 = 31 s: an item that
#: meets a lock held for 30 s (NOWAIT, a lock timeout) still ends done.
DEFAULT_MAX_ATTEMPTS = 6
#: Default base of the exponential backoff, seconds: the first retry waits 1-2 s.
DEFAULT_BACKOFF = 2.0
#: Default cap of one backoff wait, seconds: long enough for a lock or a failover to clear,
#: short enough that a run does not sit idle for long.
DEFAULT_MAX_BACKOFF = 60.0
#: The random part of an item's backoff wait: 0.5 is "equal jitter", a wait between half and all
#: of the exponential step. Retries of many items still spread out, and the waits have a floor,
#: so the time an item rides out is known (see DEFAULT_MAX_ATTEMPTS).
ITEM_JITTER = 0.5
#: Longest message kept from an exception.
MAX_MESSAGE_CHARS = 2000

#: A classifier looks at an exception and returns a Failure, or None when it does not know it.
Classifier = Callable[[BaseException], "Failure | None"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many attempts an item gets and how long to wait between them."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff: float = DEFAULT_BACKOFF
    max_backoff: float = DEFAULT_MAX_BACKOFF

    def next_delay(self, attempt: int, failure: Failure, *, rand: float) -> float | None:
        """Seconds to wait before trying again after failed `attempt`, or None to give up."""
        if not failure.retryable or attempt >= self.max_attempts:
            return None
        return backoff_delay(attempt, base=self.backoff, cap=self.max_backoff, rand=rand,
                             jitter=ITEM_JITTER)

    def min_patience(self) -> float:
        """The least time, in seconds, between an item's first failure and its giving up."""
        return sum(backoff_delay(a, base=self.backoff, cap=self.max_backoff, rand=0.0, jitter=ITEM_JITTER)
                   for a in range(1, self.max_attempts))


def backoff_delay(attempt: int, *, base: float, cap: float, rand: float, jitter: float = 1.0,
                  factor: float = 2.0) -> float:
    """Seconds to wait after failed `attempt` (1-based): the step `base * factor**(attempt-1)`,
    capped at `cap`, of which the fraction `jitter` is random (`rand` is in [0, 1)). jitter 1.0
    is full jitter (0 to the step), 0.5 equal jitter (half the step to all of it)."""
    step = min(cap, base * factor ** (attempt - 1))
    return step * (1.0 - jitter + jitter * rand)


def class_names(exc: BaseException) -> list[str]:
    """The names of the exception's class and its bases, most specific first."""
    return [cls.__name__ for cls in type(exc).__mro__]


def message_of(exc: BaseException) -> str:
    """The exception's message, cut to MAX_MESSAGE_CHARS."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def classify(exc: BaseException, *, retry_on: Iterable[str] = (), outage_on: Iterable[str] = (),
             classifiers: Iterable[Classifier] = ()) -> Failure:
    """Turn an exception raised by a handler into a Failure.

    Order: the handler's own word (Retryable, Permanent, Unavailable) first; then the database
    and S3 classifiers; then ConnectionError as an outage, TimeoutError as retryable, everything
    else permanent. Then the user's rules, which name exception classes or error-code prefixes
    (for example `ORA-01555`): `outage_on` makes a failure an outage (unless it is a
    configuration error), `retry_on` makes a permanent one retryable.
    """
    names = class_names(exc)
    trace = "".join(tb.format_exception(exc))
    code = getattr(exc, "code", None)
    code = str(code) if code not in (None, "") else None
    if isinstance(exc, Retryable):
        found = Failure(RETRYABLE, names[0], message_of(exc), code=code)
    elif isinstance(exc, Permanent):
        return Failure(PERMANENT, names[0], message_of(exc), code=code, traceback=trace)
    elif isinstance(exc, Unavailable):
        found = Failure(OUTAGE, names[0], message_of(exc), code=code, system=exc.system)
    else:
        found = _first_verdict(exc, (*classifiers, _classify_aws)) or Failure(
            OUTAGE if isinstance(exc, ConnectionError) else RETRYABLE if isinstance(exc, TimeoutError)
            else PERMANENT, names[0], message_of(exc), code=code)
    if found.kind in (PERMANENT, RETRYABLE) and matches(names, found.code, outage_on):
        found = replace(found, kind=OUTAGE)
    elif found.kind == PERMANENT and matches(names, found.code, retry_on):
        found = replace(found, kind=RETRYABLE)
    return replace(found, traceback=trace)


def _classify_aws(exc: BaseException) -> Failure | None:
    """S3 and other AWS errors raised by a handler (job.s3 knows them; boto3 is not imported)."""
    from .s3 import classify_botocore

    return classify_botocore(exc)


def _first_verdict(exc: BaseException, classifiers: Iterable[Classifier]) -> Failure | None:
    for classifier in classifiers:
        found = classifier(exc)
        if found is not None:
            return found
    return None


def matches(names: list[str], code: str | None, rules: Iterable[str]) -> bool:
    """Whether a rule of --retry-on or --outage-on names one of the exception's classes
    (`names`, its MRO) or a prefix of its error code, ignoring case."""
    return any(rule in names or (code is not None and code.upper().startswith(rule.upper())) for rule in rules)
