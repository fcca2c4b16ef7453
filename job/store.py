"""Object stores behind one interface: a local directory here, S3 in `job.s3`.

The manifest and the lease see only this interface. Every write is a whole object that
replaces the old one atomically, so a crash never leaves half an object behind.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from .errors import PreconditionFailed, StoreUnavailable, UsageError

#: Seconds a compare-and-replace waits for the key's lock. The lock is held for one read and
#: one rename (milliseconds); a holder that keeps it longer is stopped (SIGSTOP, a frozen VM)
#: and may still finish its write, so the lock is not broken: the store counts as unavailable.
LOCK_WAIT = 2.0
#: A temporary file older than this is a leftover even if its writer's pid is alive on this
#: host again (pid reuse): no write takes that long.
TEMP_MAX_AGE = 600.0
#: Temporary files: `.tmp-<host>-<pid>-<random>`, so that a leftover can be traced to its writer.
TEMP_PREFIX = ".tmp-"
_TEMP_NAME = re.compile(r"^\.tmp-(?P<host>.*)-(?P<pid>\d+)-[^-]*$")
HOST = socket.gethostname()


class Store(Protocol):
    """Whole-object storage with conditional writes, addressed by '/'-separated keys."""

    url: str
    #: Longest one request may take, in seconds, retries included (None: not bounded, as on a
    #: local disk). The lease's timing relies on it: see job.lease.
    request_timeout: float | None

    def get(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and its version tag (etag), or None when it does not exist."""

    def put(self, key: str, data: bytes) -> str:
        """Write the object whole; return its new version tag."""

    def put_new(self, key: str, data: bytes) -> str:
        """Create the object; raise PreconditionFailed when it exists already."""

    def put_replacing(self, key: str, data: bytes, etag: str) -> str:
        """Replace the object only if its version tag is still `etag`, else PreconditionFailed."""

    def list(self, prefix: str) -> builtins.list[str]:
        """Keys that start with `prefix`, sorted."""

    def delete(self, keys: builtins.list[str]) -> None:
        """Delete the objects; missing ones are not an error."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    """Make a rename, link or unlink in `path` durable: the entry lives in the directory."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """A directory on a local or mounted file system.

    Create and replace go through a temporary file that is fsynced, then linked (create) or
    renamed (replace) into place, then the directory is fsynced. A compare-and-replace holds
    an `flock` on `<key>.lock` while it compares and renames: the kernel drops the lock when
    its holder dies, so a crashed process never leaves a key locked. The file system must
    honour `flock` between every host that shares the directory (local disks, NFSv4, EFS and
    CephFS do).
    """

    request_timeout: float | None = None

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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{HOST}-{os.getpid()}-")
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
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
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
        _fsync_dir(path.parent)
        return self._etag(path)

    def put_replacing(self, key: str, data: bytes, etag: str) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(path):
            current = self.get(key)
            if current is None:
                raise PreconditionFailed(f"{key} is gone")
            if current[1] != etag:
                raise PreconditionFailed(f"{key} changed since it was read")
            return self.put(key, data)

    def _locked(self, path: Path) -> _KeyLock:
        return _KeyLock(path.with_name(path.name + ".lock"))

    def lock_holder(self, key: str) -> dict[str, Any] | None:
        """Who holds `key`'s compare-and-replace lock right now (pid, host, since: wall-clock
        seconds, held_for), or None when nobody does. For `bulkjob status`: a lock held for
        more than a moment means a stopped process."""
        lock = self._path(key).with_name(Path(key).name + ".lock")
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                if "since" in owner:
                    owner["held_for"] = max(0.0, time.time() - float(owner["since"]))
                return owner
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def list(self, prefix: str) -> builtins.list[str]:
        base = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not base.is_dir():
            return []
        root = self.root.resolve()
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(TEMP_PREFIX) or name.endswith(".lock"):
                    continue
                key = Path(dirpath, name).resolve().relative_to(root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, keys: builtins.list[str]) -> None:
        parents = set()
        for key in keys:
            path = self._path(key)
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            parents.add(path.parent)
        for parent in parents:
            _fsync_dir(parent)

    def remove_leftovers(self, prefix: str, *, now: float | None = None) -> builtins.list[str]:
        """Remove temporary files that a crashed writer left under `prefix` (a directory key
        ending in '/'): those of a process that is gone from this host, and any older than
        TEMP_MAX_AGE. Returns the names removed."""
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        now = time.time() if now is None else now
        removed = []
        try:
            entries = list(os.scandir(base))
        except FileNotFoundError:
            return []
        for entry in entries:
            m = _TEMP_NAME.match(entry.name)
            if not m or not entry.is_file(follow_symlinks=False):
                continue
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            dead = m.group("host") == HOST and not pid_alive(int(m.group("pid")))
            if dead or age > TEMP_MAX_AGE:
                try:
                    os.unlink(entry.path)
                    removed.append(entry.name)
                except FileNotFoundError:
                    pass
        if removed:
            _fsync_dir(base)
        return removed


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        owner = json.loads(os.read(fd, 4096) or b"{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


class _KeyLock:
    """An exclusive flock on a key's lock file, with its holder written inside for status."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> _KeyLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    owner = _read_owner(fd)
                    os.close(fd)
                    raise StoreUnavailable(
                        f"{self.path.name} is held by pid {owner.get('pid')} on {owner.get('host')} "
                        f"for more than {LOCK_WAIT:g}s (a stopped process?)") from None
                time.sleep(0.005)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
                    raise UsageError(f"{self.path.parent}: the file system does not support locks "
                                     "(flock); use another directory or S3") from e
                raise
        self.fd = fd
        try:
            mine = json.dumps({"pid": os.getpid(), "host": HOST, "since": time.time()}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, mine, 0)
        except OSError:
            pass  # the holder's name is for status only; the lock is what counts
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def open_store(url: str, *, endpoint_url: str | None = None,
               request_timeout: float | None = None) -> tuple[Store, str]:
    """The store for a manifest URL and the key prefix inside it.

    `s3://bucket/prefix` opens S3 (boto3 is imported only then); anything else is a directory.
    `request_timeout` bounds each S3 request, retries included (see job.lease.lease_timing);
    None keeps the S3 client's generous defaults, for tools that only read.
    """
    if url.startswith("s3://"):
        from .s3 import S3Store, split_s3_url

        bucket, prefix = split_s3_url(url)
        store: Store = S3Store(bucket, endpoint_url=endpoint_url, request_timeout=request_timeout)
        return store, prefix
    if "://" in url:
        raise UsageError(f"manifest URL {url!r}: only s3://bucket/prefix or a local directory")
    return LocalStore(url), ""
