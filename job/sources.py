"""Where a run's items come from: the `ItemSource` a run asks for its items, and the sources of
a local JSON Lines file, an S3 object and stdin (`--items-sql`'s is job.db.query's).

A source is read twice: once whole, so that bad input stops the run before any item runs,
then streamed again. S3 objects, stdin and a query's rows are first copied to a temporary
file, since none of them can be read twice. A work table is not an item source but a queue
(job.db.queue): it hands out rows as they are claimed, and is the run's record too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from .errors import UsageError

if TYPE_CHECKING:
    from .manifest import ItemStates

Lines = Callable[[], contextlib.AbstractContextManager[Iterator[bytes]]]


class ItemSource(Protocol):
    """The items of a run, as raw JSON Lines that can be read more than once."""

    #: How messages name it: the path, the URL, `<stdin>`, `items-sql`.
    name: str
    #: Whether it may hold no item without that being a mistake (a query that finds nothing).
    may_be_empty: bool

    def __call__(self) -> contextlib.AbstractContextManager[Iterator[bytes]]:
        """A fresh iterator of its raw lines, in order."""
        ...

    def finished_earlier(self, states: ItemStates, *, retry_failed: bool) -> int:
        """Items finished by earlier runs that the source no longer holds (a query's rows that
        a finished item took out of its result), which still count in the shard's total."""
        ...


class FileLines:
    """The lines of a local file: the ItemSource of --items PATH, S3 and stdin (copied)."""

    may_be_empty = False

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name

    def __call__(self) -> contextlib.AbstractContextManager[Iterator[bytes]]:
        return _lines_of(self.path)

    def finished_earlier(self, states: ItemStates, *, retry_failed: bool) -> int:
        return 0


@contextlib.contextmanager
def _lines_of(path: str) -> Iterator[Iterator[bytes]]:
    with open(path, "rb") as f:
        yield iter(f)


@contextlib.contextmanager
def open_source(source: str, *, endpoint_url: str | None = None) -> Iterator[ItemSource]:
    """The ItemSource of `--items SOURCE` (a path, s3://bucket/key or - for stdin), for as long
    as the block lasts."""
    if source == "-":
        with tempfile.NamedTemporaryFile(prefix="bulkjob-items-", suffix=".jsonl") as tmp:
            shutil.copyfileobj(sys.stdin.buffer, tmp)
            tmp.flush()
            yield FileLines(tmp.name, "<stdin>")
        return
    if source.startswith("s3://"):
        from .s3 import S3Store, split_s3_url

        bucket, key = split_s3_url(source)
        with tempfile.TemporaryDirectory(prefix="bulkjob-items-") as tmpdir:
            path = os.path.join(tmpdir, "items.jsonl")
            found = S3Store(bucket, endpoint_url=endpoint_url)
            found.download(key, path)
            yield FileLines(path, source)
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
    yield FileLines(source, source)
