"""Where items come from: a local JSONL file, an S3 object, or stdin.

S3 objects and stdin are first copied to a temporary file: validation reads the items once
before any runs, then the run streams them again, and neither can be read twice.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator

from .errors import UsageError

Lines = Callable[[], contextlib.AbstractContextManager[Iterator[bytes]]]


@contextlib.contextmanager
def _lines_of(path: str) -> Iterator[Iterator[bytes]]:
    with open(path, "rb") as f:
        yield iter(f)


@contextlib.contextmanager
def open_source(source: str, *, endpoint_url: str | None = None) -> Iterator[tuple[str, Lines]]:
    """Yield (display name, opener); each call of opener gives a fresh iterator of raw lines."""
    if source == "-":
        with tempfile.NamedTemporaryFile(prefix="bulkjob-items-", suffix=".jsonl") as tmp:
            shutil.copyfileobj(sys.stdin.buffer, tmp)
            tmp.flush()
            yield "<stdin>", lambda: _lines_of(tmp.name)
        return
    if source.startswith("s3://"):
        from .s3 import S3Store, split_s3_url

        bucket, key = split_s3_url(source)
        with tempfile.TemporaryDirectory(prefix="bulkjob-items-") as tmpdir:
            path = os.path.join(tmpdir, "items.jsonl")
            found = S3Store(bucket, endpoint_url=endpoint_url)
            found.download(key, path)
            yield source, lambda: _lines_of(path)
        return
    if os.path.isdir(source):
        raise UsageError(f"--items {source!r} is a directory; give a JSON Lines file in it "
                         "(or s3://bucket/key, or - for stdin)")
    if not os.path.exists(source):
        raise UsageError(f"--items {source!r}: no such file")
    try:
        with open(source, "rb"):
            pass
    except OSError as e:
        raise UsageError(f"--items {source!r}: cannot read it: {e.strerror}") from None
    yield source, lambda: _lines_of(source)
