"""Retry policy and failure classification: pure functions over real exception objects."""

import botocore.exceptions
import pytest

from bulkjob import Permanent, Retryable, Unavailable
from job.outcome import CONFIG, CRASHED, OUTAGE, PERMANENT, RETRYABLE, TIMEOUT, Failure
from job.retry import RetryPolicy, backoff_delay, classify


@pytest.mark.parametrize("attempt, base, cap, rand, expected", [
    (1, 1.0, 60.0, 0.5, 0.5),
    (2, 1.0, 60.0, 0.5, 1.0),
    (3, 1.0, 60.0, 1.0, 4.0),
    (10, 1.0, 60.0, 1.0, 60.0),
    (10, 1.0, 60.0, 0.0, 0.0),
    (4, 0.25, 100.0, 0.999, 0.25 * 8 * 0.999),
])
def test_backoff_delay_full_jitter(attempt, base, cap, rand, expected):
    assert backoff_delay(attempt, base=base, cap=cap, rand=rand) == pytest.approx(expected)


@pytest.mark.parametrize("attempt, rand, jitter, factor, expected", [
    (1, 0.0, 0.5, 2.0, 0.5),     # equal jitter: never less than half the step
    (1, 0.999, 0.5, 2.0, 0.9995),
    (3, 0.0, 0.5, 2.0, 2.0),
    (3, 0.0, 0.0, 2.0, 4.0),     # no jitter: the step itself
    (3, 0.0, 0.0, 1.5, 2.25),    # another growth factor
    (20, 0.0, 0.0, 2.0, 60.0),   # capped
])
def test_backoff_delay_partial_jitter(attempt, rand, jitter, factor, expected):
    assert backoff_delay(attempt, base=1.0, cap=60.0, rand=rand, jitter=jitter,
                         factor=factor) == pytest.approx(expected)


@pytest.mark.parametrize("attempt, kind, expected", [
    (1, RETRYABLE, 0.75),
    (2, RETRYABLE, 1.5),
    (3, RETRYABLE, None),    # max_attempts reached
    (1, PERMANENT, None),
    (1, OUTAGE, None),       # environment failures are not the policy's to retry
    (1, CRASHED, 0.75),
    (2, TIMEOUT, 1.5),
])
def test_policy_gives_up_on_permanent_and_after_max_attempts(attempt, kind, expected):
    policy = RetryPolicy(max_attempts=3, backoff=1.0, max_backoff=60.0)
    assert policy.next_delay(attempt, Failure(kind, "E", "m"), rand=0.5) == expected


def test_the_default_policy_rides_out_a_lock_held_for_30_seconds():
    # The README promises it: the least total wait before the last attempt exceeds 30 s.
    assert RetryPolicy().min_patience() > 30.0


def client_error(code, status):
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize("exc, kind, code", [
    (Retryable("later", code="X-1"), RETRYABLE, "X-1"),
    (Permanent("never"), PERMANENT, None),
    (TimeoutError("slow"), RETRYABLE, None),
    (ConnectionRefusedError("refused"), OUTAGE, None),
    (ConnectionResetError("reset"), OUTAGE, None),
    (Unavailable("the API is down", code="API-503"), OUTAGE, "API-503"),
    (KeyError("k"), PERMANENT, None),
    (ValueError("v"), PERMANENT, None),
    (client_error("SlowDown", 503), RETRYABLE, "SlowDown"),
    (client_error("InternalError", 500), RETRYABLE, "InternalError"),
    (client_error("Throttling", 400), RETRYABLE, "Throttling"),
    (client_error("AccessDenied", 403), PERMANENT, "AccessDenied"),
    (client_error("NoSuchKey", 404), PERMANENT, "NoSuchKey"),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), OUTAGE, None),
    (botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), OUTAGE, None),
])
def test_classify(exc, kind, code):
    failure = classify(exc)
    assert failure.kind == kind
    assert failure.code == code
    assert failure.error_class == type(exc).__name__


class CustomError(Exception):
    code = "APP-0042"


@pytest.mark.parametrize("retry_on, kind", [
    ((), PERMANENT),
    (("CustomError",), RETRYABLE),
    (("Exception",), RETRYABLE),     # a base class counts too
    (("APP-00",), RETRYABLE),        # a code prefix
    (("app-0042",), RETRYABLE),      # case does not matter for codes
    (("APP-1",), PERMANENT),
    (("OtherError",), PERMANENT),
])
def test_retry_on_extends_the_retryable_set(retry_on, kind):
    assert classify(CustomError("boom"), retry_on=retry_on).kind == kind


@pytest.mark.parametrize("outage_on, kind", [
    ((), PERMANENT),
    (("CustomError",), OUTAGE),
    (("APP-0",), OUTAGE),
    (("APP-1",), PERMANENT),
])
def test_outage_on_makes_a_failure_an_outage(outage_on, kind):
    assert classify(CustomError("boom"), outage_on=outage_on).kind == kind


def test_outage_on_does_not_override_a_configuration_error():
    def login_refused(exc):
        return Failure(CONFIG, "Db", "bad password", code="28P01")

    assert classify(KeyError("x"), outage_on=("Db", "28P"), classifiers=(login_refused,)).kind == CONFIG


def test_retry_on_cannot_turn_a_declared_permanent_into_retryable():
    assert classify(Permanent("no"), retry_on=("Permanent",)).kind == PERMANENT


def test_a_classifier_is_consulted_before_the_generic_rules():
    def says_retry(exc):
        return Failure(RETRYABLE, "Db", str(exc), code="DB-1", reconnect=True) if isinstance(exc, KeyError) else None

    failure = classify(KeyError("x"), classifiers=(says_retry,))
    assert (failure.kind, failure.code, failure.reconnect) == (RETRYABLE, "DB-1", True)
    assert failure.traceback and "KeyError" in failure.traceback


def test_long_messages_are_cut():
    assert len(classify(ValueError("x" * 10000)).message) < 2100
