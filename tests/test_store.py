"""The stores: conditional writes on both, the local directory's hygiene (locks of dead or stopped
processes, leftover temporary files, ENOSPC), and S3 requests bounded in time."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import ROOT
from netproxy import TcpProxy
from tmpfs import fill, small_tmpfs

from job import store as store_module
from job.errors import PreconditionFailed, StoreUnavailable, UsageError
from job.store import HOST, LocalStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalStore(tmp_path / "state")
    server = request.getfixturevalue("s3_server")
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    from job.s3 import S3Store

    return S3Store(request.getfixturevalue("s3_bucket"), endpoint_url=server.url, request_timeout=5.0)


def test_conditional_writes(store):
    etag = store.put_new("d/lease", b"one")
    with pytest.raises(PreconditionFailed):
        store.put_new("d/lease", b"two")
    new = store.put_replacing("d/lease", b"three", etag)
    with pytest.raises(PreconditionFailed):
        store.put_replacing("d/lease", b"four", etag)
    assert store.get("d/lease") == (b"three", new)
    assert store.get("d/missing") is None
    with pytest.raises(PreconditionFailed):
        store.put_replacing("d/missing", b"x", etag)
    assert store.list("d/") == ["d/lease"]


def test_local_store_refuses_keys_outside_its_root(tmp_path):
    with pytest.raises(UsageError):
        LocalStore(tmp_path / "s").put("../outside", b"x")


def test_local_exclusive_create_has_one_winner(tmp_path):
    store = LocalStore(tmp_path / "s")
    wins = []

    def contend(n):
        try:
            store.put_new("lease", str(n).encode())
            wins.append(n)
        except PreconditionFailed:
            pass

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.get("lease")[0] == str(wins[0]).encode()


def test_local_compare_and_replace_has_one_winner_across_processes(tmp_path):
    """Sixteen processes replace the same version at once: exactly one wins."""
    store = LocalStore(tmp_path / "s")
    etag = store.put_new("k", b"v0")
    script = textwrap.dedent(f"""
        import sys
        from job.store import LocalStore
        from job.errors import PreconditionFailed
        try:
            LocalStore({str(tmp_path / "s")!r}).put_replacing("k", sys.argv[1].encode(), {etag!r})
            print("won")
        except PreconditionFailed:
            print("lost")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, f"v{n}"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for n in range(16)]
    outcomes = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outcomes.count("won") == 1, outcomes
    assert store.get("k")[0] == f"v{outcomes.index('won')}".encode()


def _lock_holder_script(root, key: str) -> str:
    """A process that takes `key`'s compare-and-replace lock and then sleeps holding it."""
    return textwrap.dedent(f"""
        import time
        from pathlib import Path
        from job.store import LocalStore
        store = LocalStore({str(root)!r})
        with store._locked(store._path({key!r})):
            print("holding", flush=True)
            time.sleep(600)
    """)


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    store = LocalStore(tmp_path / "s")
    etag = store.put_new("run/lease.json", b"v1")
    holder = subprocess.Popen([sys.executable, "-c", _lock_holder_script(tmp_path / "s", "run/lease.json")],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    seen = store.lock_holder("run/lease.json")
    assert seen is not None and seen["pid"] == holder.pid and seen["host"] == HOST
    holder.send_signal(signal.SIGKILL)  # killed inside its critical section
    holder.wait(10)
    assert (tmp_path / "s" / "run" / "lease.json.lock").exists()  # the file stays...
    assert store.lock_holder("run/lease.json") is None  # ...but nobody holds it
    started = time.monotonic()
    store.put_replacing("run/lease.json", b"v2", etag)
    assert time.monotonic() - started < 1.0
    assert store.get("run/lease.json")[0] == b"v2"


def test_a_lock_held_by_a_stopped_process_is_not_broken(tmp_path, monkeypatch):
    """A stopped holder may still finish its write: the store counts as unavailable rather
    than break the lock, and works again once the holder goes on."""
    monkeypatch.setattr(store_module, "LOCK_WAIT", 0.5)
    store = LocalStore(tmp_path / "s")
    etag = store.put_new("k", b"v1")
    holder = subprocess.Popen([sys.executable, "-c", _lock_holder_script(tmp_path / "s", "k")],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        holder.send_signal(signal.SIGSTOP)
        with pytest.raises(StoreUnavailable, match=f"pid {holder.pid}"):
            store.put_replacing("k", b"v2", etag)
        assert store.get("k")[0] == b"v1"
        held = store.lock_holder("k")
        assert held["pid"] == holder.pid and held["held_for"] >= 0.5
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    store.put_replacing("k", b"v2", etag)


def test_leftover_temporary_files_are_removed(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.put("shard/meta.json", b"{}")
    shard = tmp_path / "s" / "shard"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    of_dead = shard / f".tmp-{HOST}-{dead.pid}-abc"
    of_live = shard / f".tmp-{HOST}-{os.getpid()}-def"
    of_other_host = shard / ".tmp-elsewhere-1-ghi"
    old_other_host = shard / ".tmp-elsewhere-2-jkl"
    for path in (of_dead, of_live, of_other_host, old_other_host):
        path.write_bytes(b"half a checkpoint")
    an_hour_ago = time.time() - 3600
    os.utime(old_other_host, (an_hour_ago, an_hour_ago))
    removed = store.remove_leftovers("shard/")
    assert sorted(removed) == sorted([of_dead.name, old_other_host.name])
    assert of_live.exists() and of_other_host.exists() and not of_dead.exists()
    assert store.list("shard/") == ["shard/meta.json"]


def test_a_full_disk_refuses_a_write_and_leaves_nothing_behind(tmp_path):
    with small_tmpfs(tmp_path / "small", 256) as mnt:
        store = LocalStore(mnt / "state")
        store.put_new("shard/seg-1", b"x" * 1000)
        filler = fill(mnt)
        with pytest.raises(OSError) as raised:
            store.put_new("shard/seg-2", b"y" * 50_000)
        assert raised.value.errno == errno.ENOSPC
        assert sorted(p.name for p in (mnt / "state" / "shard").iterdir()) == ["seg-1"]
        filler.unlink()
        store.put_new("shard/seg-2", b"y" * 50_000)
        assert store.get("shard/seg-2")[0] == b"y" * 50_000


@pytest.mark.parametrize("fault", ["hang", "deaf"])
def test_s3_requests_end_within_their_timeout(s3_server, s3_bucket, monkeypatch, fault):
    """A server that accepts and never answers (or answers into the void) costs one request
    timeout, not botocore's retries on top."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    from job.s3 import S3Store

    proxy = TcpProxy(s3_server.port)
    store = S3Store(s3_bucket, endpoint_url=proxy.url, request_timeout=1.0)
    assert store.request_timeout == pytest.approx(1.0)
    store.put_new("k", b"before")
    getattr(proxy, fault)()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.put("k", b"during")
    assert time.monotonic() - started < 1.0 + 0.5
    proxy.restore()
    if fault == "deaf":
        assert store.get("k")[0] == b"during"  # it landed, though its client never heard back


def test_the_default_s3_client_is_not_bounded_for_a_lease(s3_server, s3_bucket):
    from job.s3 import S3Store

    assert S3Store(s3_bucket, endpoint_url=s3_server.url).request_timeout == (5 + 10) * 2
