"""The manifest on both stores: segments of a generation created once, compaction to one record
per item, runners of two generations on one shard, the first format, damage, the compact item
states, and the checkpointer that writes it all."""

import gzip
import json
import logging
import random
import threading
import time

import pytest
from tmpfs import fill, small_tmpfs

from job import manifest as manifest_module
from job.checkpoint import Checkpointer
from job.errors import LeaseLost, ManifestCorrupt, ManifestError, UsageError
from job.itemstates import ItemStates, item_state
from job.manifest import DONE, FAILED, PARTIAL, RUNNING, ShardManifest, check_run_id
from job.records import encode_record, encode_segment, segment_name, snapshot_name
from job.store import LocalStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "state")
    server = request.getfixturevalue("s3_server")
    monkeypatch = request.getfixturevalue("monkeypatch")
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    from job.s3 import S3Store

    return S3Store(request.getfixturevalue("s3_bucket"), endpoint_url=server.url, request_timeout=5.0)


def records(n, state=DONE, start=0, prefix="i", **extra):
    return [{"id": f"{prefix}{k}", "state": state, "attempts": 1, "at": 1.0, "seconds": 0.001, **extra}
            for k in range(start, start + n)]


def checkpointer(m, generation, **kwargs):
    cp = Checkpointer(m, m.load(), generation=generation, interval=kwargs.pop("interval", 3600), **kwargs)
    cp.start()
    return cp


def write(cp, recs):
    for r in recs:
        cp.add(r)
    assert cp.flush(10)


def object_names(store, m):
    return [k[len(m.dir):] for k in store.list(m.dir)]


def test_checkpoints_write_only_what_changed(store):
    m = ShardManifest(store, "runs", "r1", 0, 1)
    cp = checkpointer(m, 1)
    sizes = []
    for batch in range(3):
        write(cp, records(1000, start=batch * 1000))
        sizes.append(cp.bytes_written)
    assert cp.close(10)
    per_checkpoint = [sizes[0], sizes[1] - sizes[0], sizes[2] - sizes[1]]
    assert max(per_checkpoint) < 1.2 * min(per_checkpoint)  # the third costs what the first did
    assert cp.writes == 3 and object_names(store, m) == [segment_name(1, n) for n in (1, 2, 3)]
    loaded = m.load()
    assert len(loaded.states()) == 3000 and loaded.seqs == {1: 3}
    header, *lines = gzip.decompress(store.get(m.dir + segment_name(1, 1))[0]).splitlines()
    assert json.loads(header)["records"] == 1000 and json.loads(lines[0])["id"] == "i0"


def test_a_segment_is_created_once(store):
    m = ShardManifest(store, "", "r", 0, 1)
    data = encode_segment(1, 1, [encode_record(r) for r in records(3)], written_at=1.0)
    assert m.write_segment(1, 1, data) == len(data)
    # The same bytes again: a write of ours that landed though its answer was lost.
    assert m.write_segment(1, 1, data) == len(data)
    other = encode_segment(1, 1, [encode_record(r) for r in records(4)], written_at=2.0)
    with pytest.raises(ManifestError, match="two runners share a generation"):
        m.write_segment(1, 1, other)
    assert len(m.load().states()) == 3


def test_compaction_folds_to_one_record_per_item_and_deletes_only_what_it_folded(store, monkeypatch):
    monkeypatch.setattr(manifest_module, "COMPACT_EVERY", 4)
    m = ShardManifest(store, "", "r2", 1, 3)
    cp = checkpointer(m, 1)
    write(cp, [{"id": "x", "state": RUNNING, "attempts": 1}])
    write(cp, records(100))
    write(cp, records(10, start=100, result={"rows": 5}) + records(10, start=110, result={}))
    # Written by another runner after this one started: not this compaction's to delete.
    foreign = encode_segment(2, 1, [encode_record(r) for r in records(1, prefix="late")], written_at=3.0)
    store.put_new(m.dir + segment_name(2, 1), foreign)
    write(cp, [{"id": "i0", "state": FAILED, "attempts": 3, "at": 2.0, "seconds": 0.5,
                "error": {"kind": "permanent", "message": "no"}},
               {"id": "x", "state": DONE, "attempts": 2, "at": 2.0, "seconds": 0.5}])
    assert cp.close(10) and cp.compactions == 1
    assert object_names(store, m) == [segment_name(2, 1), snapshot_name(1, 5)]
    snapshot = store.get(m.dir + snapshot_name(1, 5))[0]
    text = gzip.decompress(snapshot)
    header = json.loads(text.splitlines()[0])
    assert sorted(header["covers"]) == [segment_name(1, n) for n in (1, 2, 3, 4)]
    assert [(s["kind"], s["attempts"], s["records"]) for s in header["sections"]] == \
        [("records", 0, 11), ("done", 1, 109), ("done", 2, 1)]
    folded = [json.loads(line) for line in text.splitlines()[1:]]
    whole = [r for r in folded if isinstance(r, dict)]
    assert {r["id"] for r in whole} == {"i0"} | {f"i{k}" for k in range(100, 110)}
    assert all("seconds" not in r for r in whole)
    assert {r["id"]: r for r in whole}["i0"]["at"] == 2.0  # a failed item keeps its time for reports
    assert all("at" not in r and r["result"] == {"rows": 5} for r in whole if r["state"] == DONE)
    loaded = m.load()
    states = loaded.states()
    assert len(states) == 122 and states.count(DONE) == 121 and states.get("i0") == item_state(
        {"id": "i0", "state": FAILED, "attempts": 3})
    assert states.get("late0").state == DONE and states.get("x").attempts == 2
    assert loaded.latest()["i105"]["result"] == {"rows": 5} and "result" not in loaded.latest()["i115"]


def test_two_generations_on_one_shard_lose_no_record_and_the_later_wins(store, monkeypatch):
    """A runner that lost its lease (generation 1) goes on writing, compactions included,
    beside the one that took over (generation 2): neither overwrites nor deletes the other's
    records, and for an item both recorded, the later generation's record is the one read."""
    monkeypatch.setattr(manifest_module, "COMPACT_EVERY", 3)
    m = ShardManifest(store, "", "two", 0, 1)
    old = checkpointer(m, 1)
    write(old, records(50, prefix="a"))
    new = checkpointer(m, 2)
    for round_ in range(8):
        write(old, records(10, start=100 + 10 * round_, prefix="a") + records(5, state=FAILED, prefix="both"))
        write(new, records(10, start=100 + 10 * round_, prefix="b") + records(5, prefix="both"))
    write(old, records(5, state=PARTIAL, prefix="both", progress={"step": 1}))  # the very last word, but older
    assert old.close(10) and new.close(10)
    assert old.compactions >= 2 and new.compactions >= 2
    states = m.load().states()
    assert {i for i, _ in states.items()} == ({f"a{k}" for k in range(50)} | {f"a{k}" for k in range(100, 180)}
                                             | {f"b{k}" for k in range(100, 180)} | {f"both{k}" for k in range(5)})
    assert {states.get(f"both{k}").state for k in range(5)} == {DONE}
    # The next generation folds it all and deletes what it folded.
    monkeypatch.setattr(manifest_module, "COMPACT_EVERY", 1)
    third = checkpointer(m, 3)
    write(third, records(1, prefix="c"))
    assert third.close(10) and third.compactions == 1
    assert len([n for n in object_names(store, m) if n.startswith(("seg-", "snap-"))]) == 1
    assert len(m.load().states()) == len(states) + 1


def test_a_compaction_that_keeps_failing_does_not_block_checkpoints(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(manifest_module, "COMPACT_EVERY", 2)
    store = LocalStore(tmp_path / "s")
    m = ShardManifest(store, "", "r", 0, 1)
    # Something in the way of the snapshot's name: every try to write it fails.
    obstacle = tmp_path / "s" / m.dir / snapshot_name(1, 3)
    obstacle.mkdir(parents=True)
    cp = checkpointer(m, 1)
    with caplog.at_level(logging.WARNING):
        for n in range(6):
            write(cp, records(10, start=10 * n))
    assert "compaction into snapshot 3 failed" in caplog.text and cp.compactions == 0
    assert cp.writes == 6 and len(m.load().states()) == 60
    obstacle.rmdir()
    cp._compact_after = 0.0  # the next try is due
    write(cp, records(1, start=60))
    deadline = time.monotonic() + 5
    while cp.compactions == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # it follows the segment's write
    assert cp.compactions == 1 and cp.close(10)
    assert len(m.load().states()) == 61


def test_resume_continues_with_the_next_generation(store):
    m = ShardManifest(store, "p", "r3", 0, 1)
    for generation in (1, 2):
        cp = checkpointer(m, generation)
        write(cp, records(5, start=generation * 5))
        assert cp.close(10)
    loaded = m.load()
    assert loaded.seqs == {1: 1, 2: 1} and len(loaded.states()) == 10
    with pytest.raises(LeaseLost, match="newer than this runner's lease"):
        Checkpointer(m, loaded, generation=1, interval=1)


def test_objects_of_the_first_format_are_read_as_generation_0(store, monkeypatch):
    m = ShardManifest(store, "", "old", 0, 1)
    # seg-1 and seg-2 are covered by snapshot 2; seg-3 came after it.
    seg1 = b'{"seq": 1, "records": 1, "written_at": 1.0}\n' + encode_record(records(1)[0])
    store.put(m.dir + "seg-0000000001.jsonl", seg1)
    store.put(m.dir + "snap-0000000002.jsonl.gz", gzip.compress(b"".join(encode_record(r) for r in records(2)))
              + gzip.compress(encode_record({"id": "f", "state": FAILED, "attempts": 2, "error": {}})))
    store.put(m.dir + "seg-0000000003.jsonl",
              b'{"seq": 3, "records": 1, "written_at": 3.0}\n' + encode_record({"id": "f", "state": DONE, "attempts": 3}))
    states = m.load().states()
    assert (len(states), states.get("f"), states.count(DONE)) == (3, item_state({"id": "f", "state": DONE, "attempts": 3}), 3)
    monkeypatch.setattr(manifest_module, "COMPACT_EVERY", 1)
    cp = checkpointer(m, 1)
    write(cp, records(1, prefix="new"))
    assert cp.close(10) and cp.compactions == 1
    assert object_names(store, m) == [snapshot_name(1, 2)]
    assert len(m.load().states()) == 4


DAMAGE = {
    "cut": lambda data: data[: len(data) // 2],
    "flipped": lambda data: data[:30] + bytes([data[30] ^ 0xFF]) + data[31:],
    "garbage": lambda data: b"not gzip at all",
    "state": lambda data: gzip.compress(gzip.decompress(data).replace(b'"state":"done"', b'"state":"??"', 1)),
    "appended": lambda data: gzip.compress(gzip.decompress(data) + b"{broken\n"),
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_damaged_segment_is_refused_not_ignored(store, how):
    damage = DAMAGE[how]
    m = ShardManifest(store, "", f"r4-{how}", 0, 1)
    m.write_segment(1, 1, encode_segment(1, 1, [encode_record(r) for r in records(20)], written_at=1.0))
    key = m.dir + segment_name(1, 1)
    store.put(key, damage(store.get(key)[0]))
    with pytest.raises(ManifestCorrupt, match=segment_name(1, 1)):
        m.load()
    assert len(m.load(repair=True).states()) <= 20  # repair keeps what still parses


def test_repair_folds_what_can_be_read_into_one_snapshot(store):
    m = ShardManifest(store, "", "r5", 0, 1)
    cp = checkpointer(m, 1)
    for n in range(3):
        write(cp, records(10, start=10 * n))
    assert cp.close(10)
    key = m.dir + segment_name(1, 2)
    store.put(key, store.get(key)[0][:-10])
    with pytest.raises(ManifestCorrupt):
        m.load()
    kept, objects = m.repair(generation=2)
    assert objects == 3 and 20 <= kept < 30
    assert object_names(store, m) == [snapshot_name(2, 1)]
    assert len(m.load().states()) == kept


def test_a_damaged_snapshot_is_refused(store, monkeypatch):
    monkeypatch.setattr(manifest_module, "COMPACT_EVERY", 1)
    m = ShardManifest(store, "", "r6", 0, 1)
    cp = checkpointer(m, 1)
    write(cp, records(50))
    assert cp.close(10) and cp.compactions == 1
    key = m.dir + snapshot_name(1, 2)
    store.put(key, store.get(key)[0][:-10])
    with pytest.raises(ManifestCorrupt, match=snapshot_name(1, 2)):
        m.load()


def test_meta_roundtrip_and_damage(store):
    m = ShardManifest(store, "x", "r7", 2, 4)
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


def test_ids_are_data_never_keys(store):
    m = ShardManifest(store, "", "r8", 0, 1)
    cp = checkpointer(m, 1)
    odd = ["a/../b", 'q"uote', "back\\slash", "ünïcødé", "x" * 500]
    write(cp, [{"id": i, "state": DONE, "attempts": 1} for i in odd])
    assert cp.close(10)
    states = m.load().states()
    assert all(states.get(i).state == DONE for i in odd) and object_names(store, m) == [segment_name(1, 1)]


# -- the compact item states ------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_packed_states_answer_like_a_dict_of_last_records(tmp_path, monkeypatch, seed):
    rand = random.Random(seed)
    monkeypatch.setattr(manifest_module, "COMPACT_EVERY", rand.choice([2, 3, 1000]))
    m = ShardManifest(LocalStore(tmp_path / "s"), "", "r", 0, 1)
    ids = [f"it-{n}" for n in range(300)] + ["é-1", 'x"y', "a\\b"]
    for generation in (1, 2):
        cp = checkpointer(m, generation)
        for _ in range(rand.randint(3, 8)):
            batch = []
            for _ in range(rand.randint(1, 120)):
                state = rand.choice([DONE, DONE, DONE, FAILED, PARTIAL, RUNNING])
                record = {"id": rand.choice(ids), "state": state, "attempts": rand.randint(1, 9), "at": 1.0}
                if state in (PARTIAL, RUNNING) or rand.random() < 0.3:
                    record["progress"] = {"step": rand.randint(1, 3)}
                if state == DONE and rand.random() < 0.3:
                    record["result"] = {"n": rand.randint(0, 2)}
                batch.append(record)
            write(cp, batch)
        assert cp.close(10)
    loaded = m.load()
    packed = loaded.states()
    expected = ItemStates({i: item_state(r) for i, r in loaded.latest().items()})
    assert len(packed) == len(expected)
    for item_id in [*ids, "never-seen"]:
        got, want = packed.get(item_id), expected.get(item_id)
        if want is None:
            assert got is None
            continue
        assert (got.state, got.attempts) == (want.state, want.attempts)
        if want.state in (PARTIAL, RUNNING) or (want.state == FAILED and want.progress):
            assert got.progress == want.progress
    for state in (DONE, FAILED, PARTIAL, RUNNING, None):
        if state is not None:
            assert packed.count(state) == expected.count(state)
        assert sorted(i for i, _ in packed.items(state)) == sorted(i for i, _ in expected.items(state))
    assert sorted(r["id"] for r in loaded.last_records(FAILED)) == sorted(i for i, _ in expected.items(FAILED))


# -- the checkpointer --------------------------------------------------------------------------

def segment_lines(store, manifest) -> list[list[dict]]:
    out = []
    for key in store.list(manifest.dir):
        if "/seg-" in key:
            out.append([json.loads(line) for line in gzip.decompress(store.get(key)[0]).splitlines()[1:]])
    return out

def test_running_records_come_first_so_that_a_later_record_wins(tmp_path):
    store = LocalStore(tmp_path / "s")
    m = ShardManifest(store, "", "r", 0, 1)
    cp = Checkpointer(m, m.load(), generation=1, interval=3600)
    cp.start()
    cp.set_running([{"id": "x", "state": RUNNING, "attempts": 1}, {"id": "y", "state": RUNNING, "attempts": 2}])
    cp.add({"id": "x", "state": DONE, "attempts": 1})  # x ended; the loop has not said so yet
    assert cp.flush(5)
    (segment,) = segment_lines(store, m)
    assert [(r["id"], r["state"]) for r in segment] == [("x", RUNNING), ("y", RUNNING), ("x", DONE)]
    states = m.load().states()
    assert (states.get("x").state, states.get("y").state, states.get("y").attempts) == (DONE, RUNNING, 2)
    # A changed running list alone is worth a checkpoint; an unchanged one is not.
    cp.set_running([{"id": "y", "state": RUNNING, "attempts": 2}])
    cp.wake()
    deadline = time.monotonic() + 10  # the writer thread may be slow to run on a loaded machine
    while cp.writes < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cp.writes == 2
    cp.wake()
    time.sleep(0.3)
    assert cp.writes == 2
    assert cp.close(5)


def test_write_now_returns_once_durable_and_holds_while_fenced(tmp_path):
    store = LocalStore(tmp_path / "s")
    m = ShardManifest(store, "", "r", 0, 1)
    open_ = threading.Event()
    cp = Checkpointer(m, m.load(), generation=1, interval=3600, fence=open_.is_set)
    cp.start()
    assert not cp.write_now([{"id": "a", "state": RUNNING, "attempts": 1}], timeout=0.5)
    assert store.list(m.dir) == [] and cp.unsaved == 1
    open_.set()
    assert cp.write_now([{"id": "b", "state": RUNNING, "attempts": 1}], timeout=5)
    assert {r["id"] for seg in segment_lines(store, m) for r in seg} == {"a", "b"}
    cp.close(1)


def test_a_full_disk_under_the_manifest_keeps_every_record(tmp_path, caplog):
    with small_tmpfs(tmp_path / "small", 256) as mnt:
        store = LocalStore(mnt / "state")
        m = ShardManifest(store, "", "r", 0, 1)
        cp = Checkpointer(m, m.load(), generation=1, interval=0.05)
        cp.start()
        filler = fill(mnt)
        with caplog.at_level(logging.WARNING):
            for n in range(2000):
                cp.add({"id": f"i{n}", "state": DONE, "attempts": 1, "at": 1.0})
            assert not cp.flush(1.0)
        assert cp.alive and cp.failures >= 2 and cp.unsaved == 2000
        assert "checkpoint: write failed (OSError: [Errno 28] No space left on device" in caplog.text
        assert not [p for p in (mnt / "state").rglob(".tmp-*")]  # nothing half-written left
        filler.unlink()
        assert cp.close(10)
        assert m.load().states().count(DONE) == 2000


