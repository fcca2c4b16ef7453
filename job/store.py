"""Object stores behind one interface: a local directory here, S3 in `job.s3`.

The manifest and the lease see only this interface. Every write is a whole object that
replaces the old one atomically, so a crash never leaves half an object behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol

from .errors import PreconditionFailed, UsageError


class Store(Protocol):
    """Whole-object storage with conditional writes, addressed by '/'-separated keys."""

    url: str

    def get(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and its version tag (etag), or None when it does not exist."""

    def put(self, key: str, data: bytes) -> str:
        """Write the object whole; return its new version tag."""

    def put_new(self, key: str, data: bytes) -> str:
        """Create the object; raise PreconditionFailed when it exists already."""

    def put_replacing(self, key: str, data: bytes, etag: str) -> str:
        """Replace the object only if its version tag is still `etag`, else PreconditionFailed."""

    def list(self, prefix: str) -> list[str]:
        """Keys that start with `prefix`, sorted."""

    def delete(self, keys: list[str]) -> None:
        """Delete the objects; missing ones are not an error."""


class LocalStore:
    """A directory on a local or mounted file system."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise UsageError(f"key {key!r} is outside the manifest directory")
        return path

    @staticmethod
    def _etag(path: Path) -> str:
        st = path.stat()
        return f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"

    def get(self, key: str) -> tuple[bytes, str] | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
                st = os.fstat(f.fileno())
        except FileNotFoundError:
            return None
        return data, f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"

    def _write_temp(self, path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        # rename() is atomic: a reader sees the old object or the new one, never a mix.
        os.replace(tmp, path)
        return self._etag(path)

    def put_new(self, key: str, data: bytes) -> str:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            # link() fails if the name exists: the exclusive create that S3 does with If-None-Match.
            os.link(tmp, path)
        except FileExistsError:
            raise PreconditionFailed(f"{key} exists already") from None
        finally:
            os.unlink(tmp)
        return self._etag(path)

    def put_replacing(self, key: str, data: bytes, etag: str) -> str:
        path = self._path(key)
        lock = path.with_name(path.name + ".lock")
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise PreconditionFailed(f"{key} is being replaced by another writer") from None
        try:
            os.close(fd)
            current = self.get(key)
            if current is None or current[1] != etag:
                raise PreconditionFailed(f"{key} changed since it was read")
            return self.put(key, data)
        finally:
            os.unlink(lock)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not base.is_dir():
            return []
        root = self.root.resolve()
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".tmp-") or name.endswith(".lock"):
                    continue
                key = Path(dirpath, name).resolve().relative_to(root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self._path(key).unlink()
            except FileNotFoundError:
                pass


def open_store(url: str, *, endpoint_url: str | None = None) -> tuple[Store, str]:
    """The store for a manifest URL and the key prefix inside it.

    `s3://bucket/prefix` opens S3 (boto3 is imported only then); anything else is a directory.
    """
    if url.startswith("s3://"):
        from .s3 import S3Store, split_s3_url

        bucket, prefix = split_s3_url(url)
        return S3Store(bucket, endpoint_url=endpoint_url), prefix
    if "://" in url:
        raise UsageError(f"manifest URL {url!r}: only s3://bucket/prefix or a local directory")
    return LocalStore(url), ""
