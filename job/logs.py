"""Logging for the parent and every worker: text for a terminal, JSON lines for collectors.

Each record is one line: in text format its line breaks and other control characters are
escaped (`\\n`, `\\x1b`), a traceback's too; in JSON format it is one object. Each is written
with one `os.write` of the whole line, so records from several worker processes sharing one
stderr pipe never interleave mid-line. Secret values (see job.redact) are replaced in every
record's message, traceback and fields, the item id included, before it is written anywhere.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import sys
import threading
import time
from typing import Any

from .redact import REDACTED, env_secrets, scrub_text, secrets_of

__all__ = ["REDACTED", "add_secrets", "known_secrets", "last_line", "one_line", "redact_std_streams",
           "set_item", "setup_logging"]

#: Fields a record may carry about the item it concerns.
_CONTEXT_FIELDS = ("item_id", "attempt")
#: Writes to a pipe up to this size are atomic; a longer line takes a lock on the stream first.
PIPE_BUF = select.PIPE_BUF


#: Control characters a text record shows escaped, so that one record stays one line (a tab
#: stays as it is).
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c != 0x09} | {0x0A: "\\n", 0x0D: "\\r"}


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped: one line of a text log."""
    return text.translate(_ESCAPES)


class _ItemContext:
    """The item this process is running now: a worker runs one at a time. Records logged while
    it runs (through any logger, not only ctx.log) carry its id and attempt, and its secret
    payload values are redacted."""

    item_id: str | None = None
    attempt: int | None = None
    secrets: tuple[str, ...] = ()


_item = _ItemContext()


def set_item(item_id: str | None, attempt: int | None = None, secrets: tuple[str, ...] = ()) -> None:
    """Mark the start of an attempt in this process (None: no item is running)."""
    _item.item_id, _item.attempt, _item.secrets = item_id, attempt, secrets


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str, *, run_id: str | None, shard: int | None,
                 secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.fmt = fmt
        self.run_id = run_id
        self.shard = shard
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            message += "\n" + self.formatStack(record.stack_info)
        item_id = getattr(record, "item_id", None)
        attempt = getattr(record, "attempt", None)
        if item_id is None and _item.item_id is not None:
            item_id, attempt = _item.item_id, _item.attempt
        secrets = self.secrets + _item.secrets if _item.secrets else self.secrets
        if secrets:
            message = scrub_text(message, secrets)
            if item_id is not None:
                item_id = scrub_text(str(item_id), secrets)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        if self.fmt == "json":
            doc: dict[str, Any] = {"ts": ts, "level": record.levelname, "logger": record.name,
                                   "msg": message, "pid": record.process}
            if self.run_id is not None:
                doc["run_id"] = self.run_id
                doc["shard"] = self.shard
            if item_id is not None:
                doc["item_id"] = item_id
                if attempt is not None:
                    doc["attempt"] = attempt
            return json.dumps(doc, default=str)
        context = ""
        if item_id is not None:
            # A line about an item says which run and shard it belongs to, so that it can be
            # found again from any log store; lines about the run itself stay short.
            if self.run_id is not None:
                context = f" run_id={self.run_id} shard={self.shard}"
            context += f" item_id={one_line(str(item_id))}" + (f" attempt={attempt}" if attempt is not None else "")
        return f"{ts} {record.levelname:<7} {record.name}{context}: {one_line(message)}"


class _WholeLineHandler(logging.Handler):
    """Writes each record to a file descriptor in a single write.

    A pipe (a pod's stderr) takes a write of up to PIPE_BUF bytes whole; a longer line (a
    traceback) could be split by another process's write, so it is written under a POSIX lock
    on the stream, which every process holds in turn (flock would not do: processes that
    inherited the same descriptor share its flock).
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            if len(data) <= PIPE_BUF:
                self._write(data)
                return
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX)
            except OSError:
                self._write(data)  # a stream that cannot be locked (rare): write it anyway
                return
            try:
                self._write(data)
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
        except Exception:
            self.handleError(record)

    def _write(self, data: bytes) -> None:
        while data:
            written = os.write(self.fd, data)
            data = data[written:]


class _RedactingStream:
    """A text stream that replaces secret values in what is written to it, and in what is
    written to its `buffer` (the binary stream under it)."""

    def __init__(self, stream, secrets: tuple[str, ...]) -> None:
        self._stream = stream
        self._secrets = secrets
        binary = getattr(stream, "buffer", None)
        self.buffer = _RedactingBuffer(binary, self._stream, secrets) if binary is not None else None

    def write(self, text: str) -> int:
        secrets = self._secrets + _item.secrets if _item.secrets else self._secrets
        self._stream.write(scrub_text(text, secrets) if secrets else text)
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _RedactingBuffer:
    """The binary stream under a redacted text stream: secrets are replaced in its bytes too."""

    def __init__(self, binary, text_stream, secrets: tuple[str, ...]) -> None:
        self._binary = binary
        self._text = text_stream
        self._secrets = secrets

    def write(self, data) -> int:
        secrets = self._secrets + _item.secrets if _item.secrets else self._secrets
        out = bytes(data)
        for secret in secrets:
            out = out.replace(secret.encode("utf-8", "surrogatepass"), REDACTED.encode())
        self._text.flush()  # keep the order of text and bytes written in turn
        self._binary.write(out)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._binary, name)


def redact_std_streams(secrets: tuple[str, ...]) -> None:
    """Make what this process prints to sys.stdout and sys.stderr (a handler's print(), or bytes
    written to their `buffer`) go through redaction too: `secrets`, and the running item's secret
    payload values. Bytes written to the file descriptors themselves (os.write, C code) are not."""
    sys.stdout = _RedactingStream(sys.stdout, secrets)
    sys.stderr = _RedactingStream(sys.stderr, secrets)


#: The format setup_logging was asked for: the last line of a run follows it.
_format = "text"


def last_line(word: str, message: str) -> None:
    """The last line a run writes to stderr, saying how it ended when that is not ok: in text
    format a plain `bulkjob: WORD: MESSAGE` (what a person reads last on a terminal), in JSON
    format a record like the others."""
    if _format == "json":
        logging.getLogger("bulkjob").error("%s: %s", word, message)
        return
    text = scrub_text(one_line(message), known_secrets())
    sys.stderr.write(f"bulkjob: {word}: {text}\n")
    sys.stderr.flush()


def add_secrets(values) -> None:
    """Redact these values too, from now on, in this process's records (for a secret read after
    logging was set up, such as a password from a file)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, _Formatter):
            handler.formatter.secrets = secrets_of(handler.formatter.secrets + tuple(values))


def known_secrets() -> tuple[str, ...]:
    """Every secret value this process's records are redacted of: the environment's, the
    --redact values given to setup_logging, and those added since."""
    return next((h.formatter.secrets for h in logging.getLogger().handlers
                 if isinstance(h.formatter, _Formatter)), _secret_values())


def _secret_values() -> tuple[str, ...]:
    """Secret values this process knows of: the database password and the S3 secret key."""
    return env_secrets()


def setup_logging(fmt: str = "text", level: str = "INFO", log_file: str | None = None, *,
                  run_id: str | None = None, shard: int | None = None,
                  redact: tuple[str, ...] = (), log_file_max_bytes: int | None = None,
                  log_file_backups: int | None = None) -> None:
    """Configure the root logger of this process (call once per process, after it starts).

    `redact` adds secret values to those of the environment. With `log_file`, records also go
    to a size-rotated, gzipped file that several processes may share: each process opens its
    own handler, and the handler's lock file serialises writes and rotations.
    """
    global _format
    _format = fmt
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = _Formatter(fmt, run_id=run_id, shard=shard, secrets=secrets_of(env_secrets() + tuple(redact)))
    stream = _WholeLineHandler(sys.stderr.fileno())
    handlers: list[logging.Handler] = [stream]
    if log_file:
        from concurrent_log_handler import ConcurrentRotatingFileHandler

        handlers.append(ConcurrentRotatingFileHandler(
            log_file, maxBytes=log_file_max_bytes or LOG_FILE_MAX_BYTES,
            backupCount=LOG_FILE_BACKUPS if log_file_backups is None else log_file_backups, use_gzip=True))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())
    # An exception no thread caught is a record too, not a bare traceback on stderr.
    threading.excepthook = _log_thread_exception
    # boto3 logs request details at DEBUG; keep them out unless asked for explicitly.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("bulkjob").error("uncaught exception in thread %s", name, exc_info=args.exc_value)


#: Size at which --log-file rotates, and how many rotated (gzipped) files are kept.
LOG_FILE_MAX_BYTES = 50 * 1024 * 1024
LOG_FILE_BACKUPS = 5
