"""S3 (and S3-compatible stores such as MinIO): the only module that imports boto3, and the one
that knows AWS's errors.

It turns botocore's errors into ours: a 412 into PreconditionFailed, an outage (connection
refused or timed out, 5xx, throttling) into StoreUnavailable, which callers may retry, and
anything else (no such bucket, access denied) into ManifestError. boto3 is imported when a
client is first made: classifying a handler's AWS errors (`classify_botocore`) needs none.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import ManifestError, PreconditionFailed, StoreUnavailable, UsageError
from .outcome import OUTAGE, PERMANENT, RETRYABLE, STORE, Failure
from .retry import class_names, message_of

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


#: Seconds to wait for a TCP connection, for reads that no lease depends on (the items file,
#: `bulkjob status`): an unreachable endpoint must not stall them long.
CONNECT_TIMEOUT = 5
#: Seconds to wait for a response in those reads: bounds a server that accepts and then hangs.
READ_TIMEOUT = 10
#: botocore's own attempts per request in those reads.
CLIENT_ATTEMPTS = 2
#: Of a bounded request's time (`request_timeout`, see job.lease), the share given to the TCP
#: connect; the rest waits for the response. One attempt: the lease's heartbeat and the
#: manifest's writer retry on their own clocks, so that no retry runs past the lease.
CONNECT_SHARE = 0.4


def classify_botocore(exc: BaseException) -> Failure | None:
    """A Failure for S3 and other AWS errors (a handler's own boto3 calls included), recognised
    by shape so that classifying one imports nothing; None for anything else."""
    names = class_names(exc)
    response = getattr(exc, "response", None)
    if "ClientError" in names and isinstance(response, dict):
        error = response.get("Error") or {}
        code = str(error.get("Code") or "")
        status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        kind = RETRYABLE if code in _THROTTLING_CODES or status >= 500 or status == 429 else PERMANENT
        return Failure(kind, names[0], message_of(exc), code=code or None)
    if any(n in _BOTOCORE_CONNECTION for n in names):
        # The endpoint cannot be reached: not the item's fault (an outage of S3 or the network).
        return Failure(OUTAGE, names[0], message_of(exc), system=STORE)
    return None



def _is_botocore(exc: BaseException) -> bool:
    names = class_names(exc)
    return "ClientError" in names or "BotoCoreError" in names


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    return ((response or {}).get("Error") or {}).get("Code") if isinstance(response, dict) else None


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn botocore's errors raised inside into ours (see `_translate`)."""
    try:
        yield
    except Exception as e:
        if not _is_botocore(e):
            raise
        raise _translate(e, what) from e


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if len(bucket) < 3:
        raise UsageError(f"{url!r}: expected s3://bucket/key with a bucket name")
    return bucket, key.strip("/")


def client_limits(request_timeout: float | None) -> tuple[float, float, int]:
    """(connect timeout, read timeout, attempts) for requests that must each end within
    `request_timeout` seconds, or the defaults for None."""
    if request_timeout is None:
        return CONNECT_TIMEOUT, READ_TIMEOUT, CLIENT_ATTEMPTS
    connect = request_timeout * CONNECT_SHARE
    return connect, request_timeout - connect, 1


def make_client(endpoint_url: str | None = None, request_timeout: float | None = None) -> Any:
    """A boto3 S3 client with bounded timeouts; credentials and region the usual boto3 way."""
    import boto3
    from botocore import handlers
    from botocore.config import Config

    connect, read, attempts = client_limits(request_timeout)
    config = Config(
        connect_timeout=connect,
        read_timeout=read,
        retries={"mode": "standard", "total_max_attempts": attempts},
    )
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)
    if request_timeout is not None:
        # botocore sends a PUT's body only after "100 Continue" or a wait of 1 s, which a
        # server that hangs turns into 1 s more per request. Our objects are small: send them
        # at once, so that connect + read timeout bounds the request.
        client.meta.events.unregister("before-call.s3", handlers.add_expect_header)
    return client


def _translate(exc: Exception, what: str) -> Exception:
    response = getattr(exc, "response", None)
    if "ClientError" in class_names(exc) and isinstance(response, dict):
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = _error_code(exc)
        if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return PreconditionFailed(f"{what}: {code}")
    failure = classify_botocore(exc)
    if failure is not None and (failure.retryable or failure.environment):
        return StoreUnavailable(f"{what}: {failure.error_class}: {failure.message}")
    return ManifestError(f"{what}: {exc}")


class S3Store:
    """Objects in one S3 bucket.

    With `request_timeout`, every request ends within that many seconds (connect plus read
    timeout, one attempt), as long as the body goes out at the link's speed: what the lease's
    timing needs. Without it, the client's defaults (two attempts of 5 + 10 s) suit reads.
    """

    def __init__(self, bucket: str, *, endpoint_url: str | None = None,
                 request_timeout: float | None = None) -> None:
        self.bucket = bucket
        self.url = f"s3://{bucket}"
        self._endpoint_url = endpoint_url
        self._request_timeout = request_timeout
        connect, read, attempts = client_limits(request_timeout)
        self.request_timeout: float | None = (connect + read) * attempts
        self._client = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self._endpoint_url, self._request_timeout)
        return self._client

    def get(self, key: str) -> tuple[bytes, str] | None:
        with _translated(f"reading s3://{self.bucket}/{key}"):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key)
            except Exception as e:
                if _is_botocore(e) and _error_code(e) in ("NoSuchKey", "404"):
                    return None
                raise
            return response["Body"].read(), str(response["ETag"])

    def download(self, key: str, path: str) -> None:
        """Copy an object to a local file (items files can be larger than memory wants)."""
        with _translated(f"reading s3://{self.bucket}/{key}"):
            self.client.download_file(self.bucket, key, path)

    def _put(self, key: str, data: bytes, **conditions: str) -> str:
        with _translated(f"writing s3://{self.bucket}/{key}"):
            try:
                response = self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **conditions)
            except Exception as e:
                if conditions and _is_botocore(e) and _error_code(e) == "NoSuchKey":
                    raise PreconditionFailed(f"s3://{self.bucket}/{key} is gone") from e
                raise
            return str(response["ETag"])

    def put(self, key: str, data: bytes) -> str:
        return self._put(key, data)

    def put_new(self, key: str, data: bytes) -> str:
        return self._put(key, data, IfNoneMatch="*")

    def put_replacing(self, key: str, data: bytes, etag: str) -> str:
        return self._put(key, data, IfMatch=etag)

    def list(self, prefix: str) -> builtins.list[str]:
        keys: builtins.list[str] = []
        with _translated(f"listing s3://{self.bucket}/{prefix}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(obj["Key"] for obj in page.get("Contents", ()))
        return sorted(keys)

    def delete(self, keys: builtins.list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            with _translated(f"deleting in s3://{self.bucket}"):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
