"""The manifest on both stores: atomic objects, append-only checkpoints, snapshots, damage."""

import gzip
import json
import threading

import pytest

from job import manifest as manifest_module
from job.checkpoint import Checkpointer
from job.errors import ManifestCorrupt, PreconditionFailed, UsageError
from job.manifest import DONE, FAILED, ShardManifest, check_run_id
from job.store import LocalStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "state")
    server = request.getfixturevalue("s3_server")
    monkeypatch = request.getfixturevalue("monkeypatch")
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    bucket = request.getfixturevalue("s3_bucket")
    from job.s3 import S3Store

    return S3Store(bucket, endpoint_url=server.url)


def records(n, state=DONE, start=0):
    return [{"id": f"i{k}", "state": state, "attempts": 1, "at": 1.0} for k in range(start, start + n)]


def test_conditional_writes(store):
    etag = store.put_new("lease", b"one")
    with pytest.raises(PreconditionFailed):
        store.put_new("lease", b"two")
    new = store.put_replacing("lease", b"three", etag)
    with pytest.raises(PreconditionFailed):
        store.put_replacing("lease", b"four", etag)
    assert store.get("lease") == (b"three", new)
    assert store.get("missing") is None


def test_checkpoints_write_only_what_changed(store):
    m = ShardManifest(store, "runs", "r1", 0, 1)
    cp = Checkpointer(m, m.load(), interval=3600)
    cp.start()
    sizes = []
    for batch in range(3):
        for record in records(100, start=batch * 100):
            cp.add(record)
        assert cp.flush(10)
        sizes.append(cp.bytes_written)
    assert cp.close(10)
    per_checkpoint = [sizes[0], sizes[1] - sizes[0], sizes[2] - sizes[1]]
    assert max(per_checkpoint) < 1.1 * min(per_checkpoint)  # the third costs what the first did
    assert cp.writes == 3
    loaded = m.load()
    assert len(loaded.latest()) == 300 and loaded.seq == 3


def test_snapshot_replaces_segments(store, monkeypatch):
    monkeypatch.setattr(manifest_module, "COMPACT_EVERY", 4)
    monkeypatch.setattr("job.checkpoint.COMPACT_EVERY", 4)
    m = ShardManifest(store, "", "r2", 1, 3)
    cp = Checkpointer(m, m.load(), interval=3600)
    cp.start()
    for batch in range(10):
        for record in records(10, start=batch * 10):
            cp.add(record)
        assert cp.flush(10)
    cp.add({"id": "i0", "state": FAILED, "attempts": 2, "at": 2.0, "error": {"kind": "permanent"}})
    assert cp.close(10)
    keys = store.list(m.dir)
    assert len([k for k in keys if "snap-" in k]) == 1
    assert len([k for k in keys if "seg-" in k]) <= 3
    latest = m.load().latest()
    assert len(latest) == 100
    assert latest["i0"]["state"] == FAILED  # the last record of an id wins


def test_resume_continues_the_sequence(store):
    m = ShardManifest(store, "p", "r3", 0, 1)
    for round_ in range(2):
        cp = Checkpointer(m, m.load(), interval=3600)
        cp.start()
        for record in records(5, start=round_ * 5):
            cp.add(record)
        assert cp.close(10)
    loaded = m.load()
    assert loaded.seq == 2 and len(loaded.latest()) == 10


@pytest.mark.parametrize("damage", [
    lambda data: data[: len(data) // 2],                          # truncated
    lambda data: data.replace(b'"state":"done"', b'"state":"??"', 1),
    lambda data: b"not json\n" + data,
    lambda data: data + b"{broken\n",
])
def test_damaged_segment_is_refused_not_ignored(store, damage):
    m = ShardManifest(store, "", "r4", 0, 1)
    m.write_segment(1, [manifest_module.encode_record(r) for r in records(20)], written_at=1.0)
    key = m.dir + "seg-0000000001.jsonl"
    store.put(key, damage(store.get(key)[0]))
    with pytest.raises(ManifestCorrupt, match="seg-0000000001"):
        m.load()
    # Repair keeps what still parses.
    assert len(m.load(repair=True).latest()) <= 20


def test_damaged_snapshot_is_refused(store):
    m = ShardManifest(store, "", "r5", 0, 1)
    m.write_snapshot(3, b"", [manifest_module.encode_record(r) for r in records(50)])
    key = m.dir + "snap-0000000003.jsonl.gz"
    data = store.get(key)[0]
    assert len(gzip.decompress(data).splitlines()) == 50
    store.put(key, data[:-10])
    with pytest.raises(ManifestCorrupt, match="snap-0000000003"):
        m.load()


def test_meta_roundtrip_and_damage(store):
    m = ShardManifest(store, "x", "r6", 2, 4)
    assert m.read_meta() is None
    m.write_meta({"total": 5})
    assert m.read_meta()["total"] == 5
    store.put(m.dir + "meta.json", b"{nope")
    with pytest.raises(ManifestCorrupt):
        m.read_meta()


@pytest.mark.parametrize("run_id", ["../x", "a/b", "", ".hidden", "a" * 300, "x..y", "sp ace"])
def test_run_ids_that_could_escape_are_refused(run_id):
    with pytest.raises(UsageError):
        check_run_id(run_id)


def test_local_store_refuses_keys_outside_its_root(tmp_path):
    with pytest.raises(UsageError):
        LocalStore(tmp_path / "s").put("../outside", b"x")


def test_local_store_concurrent_exclusive_create(tmp_path):
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


def test_segment_objects_are_valid_jsonl(store):
    m = ShardManifest(store, "", "r7", 0, 1)
    m.write_segment(1, [manifest_module.encode_record({"id": "a/../b", "state": DONE, "attempts": 1})],
                    written_at=5.0)
    header, *rest = store.get(m.dir + "seg-0000000001.jsonl")[0].splitlines()
    assert json.loads(header)["records"] == 1
    assert json.loads(rest[0])["id"] == "a/../b"
