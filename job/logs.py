"""Logging for the parent and every worker: text for a terminal, JSON lines for collectors.

Each record is written with one `os.write` of the whole line, so records from several worker
processes sharing one stderr pipe never interleave mid-line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

#: Fields a record may carry about the item it concerns.
_CONTEXT_FIELDS = ("item_id", "attempt")
#: What a secret is replaced with wherever it would be logged.
REDACTED = "[redacted]"


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str, *, run_id: str | None, shard: int | None) -> None:
        super().__init__()
        self.fmt = fmt
        self.run_id = run_id
        self.shard = shard

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        if self.fmt == "json":
            doc: dict[str, Any] = {"ts": ts, "level": record.levelname, "logger": record.name,
                                   "msg": message, "pid": record.process}
            if self.run_id is not None:
                doc["run_id"] = self.run_id
                doc["shard"] = self.shard
            for name in _CONTEXT_FIELDS:
                if hasattr(record, name):
                    doc[name] = getattr(record, name)
            return json.dumps(doc, default=str)
        context = "".join(f" {name}={getattr(record, name)}" for name in _CONTEXT_FIELDS
                          if hasattr(record, name))
        return f"{ts} {record.levelname:<7} {record.name}{context}: {message}"


class _WholeLineHandler(logging.Handler):
    """Writes each record to a file descriptor in a single write."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
        except Exception:
            self.handleError(record)


class _Redact(logging.Filter):
    """Replaces known secret values in a record's final message."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s and len(s) >= 4)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(s in message for s in self.secrets):
                for secret in self.secrets:
                    message = message.replace(secret, REDACTED)
                record.msg, record.args = message, None
        return True


def secret_values() -> tuple[str, ...]:
    """Secret values this process knows of: the database password and the S3 secret key."""
    names = ("BULKJOB_DB_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    return tuple(v for n in names if (v := os.environ.get(n)))


def setup_logging(fmt: str = "text", level: str = "INFO", log_file: str | None = None, *,
                  run_id: str | None = None, shard: int | None = None,
                  redact: tuple[str, ...] = ()) -> None:
    """Configure the root logger of this process (call once per process, after it starts)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = _Formatter(fmt, run_id=run_id, shard=shard)
    redactor = _Redact(secret_values() + tuple(redact))
    stream = _WholeLineHandler(sys.stderr.fileno())
    handlers: list[logging.Handler] = [stream]
    if log_file:
        from concurrent_log_handler import ConcurrentRotatingFileHandler

        handlers.append(ConcurrentRotatingFileHandler(
            log_file, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUPS, use_gzip=True))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(redactor)
        root.addHandler(handler)
    root.setLevel(level.upper())
    # boto3 logs request details at DEBUG; keep them out unless asked for explicitly.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


#: Size at which --log-file rotates, and how many rotated (gzipped) files are kept.
LOG_FILE_MAX_BYTES = 50 * 1024 * 1024
LOG_FILE_BACKUPS = 5
