"""Retry policy: classifying a failure, and how long to wait before the next attempt.

Pure functions: no I/O, no sleeping, and the jitter's randomness is passed in.
"""

from __future__ import annotations

import traceback as tb
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import Permanent, Retryable
from .outcome import PERMANENT, RETRYABLE, Failure

#: Default attempts per item, the first included.
DEFAULT_MAX_ATTEMPTS = 3
#: Default base of the exponential backoff, seconds.
DEFAULT_BACKOFF = 1.0
#: Default cap of one backoff wait, seconds: long enough for a lock or a failover to clear,
#: short enough that a run does not sit idle for long.
DEFAULT_MAX_BACKOFF = 60.0
#: Longest message kept from an exception.
MAX_MESSAGE_CHARS = 2000

#: S3/botocore error codes that mean "slow down" or "try again".
_THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "TransactionInProgressException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "LimitExceededException", "RequestThrottled", "SlowDown", "PriorRequestNotComplete",
    "EC2ThrottledException", "InternalError", "ServiceUnavailable", "RequestTimeout",
    "RequestTimeoutException",
})
#: botocore exception class names for a connection that failed or timed out.
_BOTOCORE_CONNECTION = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ProxyConnectionError", "SSLError", "ResponseStreamingError", "IncompleteReadError",
    "HTTPClientError",
})

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
        return backoff_delay(attempt, base=self.backoff, cap=self.max_backoff, rand=rand)


def backoff_delay(attempt: int, *, base: float, cap: float, rand: float) -> float:
    """Seconds to wait after failed `attempt` (1-based), full jitter: rand is in [0, 1)."""
    return rand * min(cap, base * 2 ** (attempt - 1))


def _class_names(exc: BaseException) -> list[str]:
    return [cls.__name__ for cls in type(exc).__mro__]


def _message(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def classify_botocore(exc: BaseException) -> Failure | None:
    """S3 and other AWS errors, recognised by shape so that only the S3 module imports boto3."""
    names = _class_names(exc)
    response = getattr(exc, "response", None)
    if "ClientError" in names and isinstance(response, dict):
        error = response.get("Error") or {}
        code = str(error.get("Code") or "")
        status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        kind = RETRYABLE if code in _THROTTLING_CODES or status >= 500 or status == 429 else PERMANENT
        return Failure(kind, names[0], _message(exc), code=code or None)
    if any(n in _BOTOCORE_CONNECTION for n in names):
        return Failure(RETRYABLE, names[0], _message(exc))
    return None


def classify(exc: BaseException, *, retry_on: Iterable[str] = (),
             classifiers: Iterable[Classifier] = ()) -> Failure:
    """Turn an exception raised by a handler into a Failure.

    Order: the handler's own word (Retryable/Permanent) first; then the database and S3
    classifiers; then TimeoutError and ConnectionError as retryable, everything else permanent.
    A permanent verdict turns retryable when `retry_on` names one of the exception's classes or
    a prefix of its error code (for example `ORA-01555`).
    """
    names = _class_names(exc)
    trace = "".join(tb.format_exception(exc))
    code = getattr(exc, "code", None)
    code = str(code) if code not in (None, "") else None
    if isinstance(exc, Retryable):
        return Failure(RETRYABLE, names[0], _message(exc), code=code, traceback=trace)
    if isinstance(exc, Permanent):
        return Failure(PERMANENT, names[0], _message(exc), code=code, traceback=trace)
    found = None
    for classifier in (*classifiers, classify_botocore):
        found = classifier(exc)
        if found is not None:
            break
    if found is None:
        kind = RETRYABLE if isinstance(exc, (TimeoutError, ConnectionError)) else PERMANENT
        found = Failure(kind, names[0], _message(exc), code=code)
    if found.kind == PERMANENT and _declared_retryable(names, found.code, retry_on):
        found = Failure(RETRYABLE, found.error_class, found.message, code=found.code,
                        reconnect=found.reconnect)
    return Failure(found.kind, found.error_class, found.message, code=found.code,
                   traceback=trace, reconnect=found.reconnect)


def _declared_retryable(names: list[str], code: str | None, retry_on: Iterable[str]) -> bool:
    for rule in retry_on:
        if rule in names or (code is not None and code.upper().startswith(rule.upper())):
            return True
    return False
