"""One runner per shard: the lease's timing, its states, takeover by the taker's own clock, a
network split (refused and hanging), ambiguous writes, clock skew between hosts (libfaketime),
a lock left by a killed process, and two real runners contending."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import ROOT, need, start_bulkjob, status_of, write_items
from ledger import applied
from netproxy import TcpProxy
from s3faults import FaultyS3

from job.errors import LeaseHeld, LeaseLost, StoreUnavailable
from job.lease import LOST, SUSPENDED, VALID, Lease, Watch, default_wait, judge_held, lease_timing, parse_lease
from job.manifest import ShardManifest, segment_name
from job.store import LocalStore

pytestmark = pytest.mark.faults


# -- the arithmetic and the taker's decision (pure) -------------------------------------------

@pytest.mark.parametrize("ttl", [1.0, 6.0, 30.0, 120.0])
def test_timing_keeps_every_write_inside_the_lease(ttl):
    t = lease_timing(ttl)
    # Validity covers three renewals, each as slow as a request may be: two may fail.
    assert t.validity >= 3 * t.period + t.request_timeout - 1e-9
    # A write sent at the last moment of validity lands before anyone can take over, with
    # room for the thread between its check and its send.
    assert t.margin - t.request_timeout >= ttl / 12 - 1e-9
    assert t.validity + t.margin == pytest.approx(ttl)
    # A restart watches a dead lease for a full TTL, with a look before and after.
    assert default_wait(ttl) >= ttl + 2 * t.request_timeout + t.period


def test_the_default_lease_timing():
    t = lease_timing(30.0)
    assert (t.period, t.request_timeout, t.margin, t.validity) == (5.0, 5.0, 7.5, 22.5)


@pytest.mark.parametrize("watch, etag, token, now, ttl, holder_ttl, take, since", [
    (None, "e1", "t1", 100.0, 30, 30, False, 100.0),                      # first sight
    (Watch("e1", "t1", 100.0), "e1", "t1", 129.9, 30, 30, False, 100.0),  # not a full TTL yet
    (Watch("e1", "t1", 100.0), "e1", "t1", 130.0, 30, 30, True, 100.0),   # unchanged for a TTL
    (Watch("e1", "t1", 100.0), "e2", "t1", 140.0, 30, 30, False, 140.0),  # renewed: watch again
    (Watch("e1", "t1", 100.0), "e1", "t2", 140.0, 30, 30, False, 140.0),  # another holder
    (Watch("e1", "t1", 100.0), "e1", "t1", 130.0, 30, 60, False, 100.0),  # the holder's TTL is longer
    (Watch("e1", "t1", 100.0), "e1", "t1", 160.0, 30, 60, True, 100.0),
])
def test_a_taker_judges_by_its_own_clock(watch, etag, token, now, ttl, holder_ttl, take, since):
    state = parse_lease(json.dumps({"holder": {}, "token": token, "generation": 3, "ttl": holder_ttl,
                                    # Wall-clock fields a year off change nothing.
                                    "acquired_at": 1e9, "renewed_at": 1e9}).encode())
    took, seen = judge_held(watch, etag, state, now, ttl)
    assert took == take and seen.since == since


# -- states, with a clock the test moves ------------------------------------------------------

class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SlowStore(LocalStore):
    """A local store whose writes take `seconds` on the test's clock."""

    def __init__(self, root, clock: Clock) -> None:
        super().__init__(root)
        self.clock = clock
        self.seconds = 0.0

    def put_replacing(self, key, data, etag):
        self.clock.now += self.seconds
        return super().put_replacing(key, data, etag)


def test_validity_moves_only_on_acknowledged_renewals_from_their_send(tmp_path):
    clock = Clock()
    store = SlowStore(tmp_path / "s", clock)
    lease = Lease(store, "shard/lease.json", ttl=30, clock=clock)
    assert lease.status() == SUSPENDED and not lease.writable()  # not taken yet
    lease.acquire()
    assert (lease.generation, lease.status()) == (1, VALID)
    assert (lease.valid_until, lease.hard_deadline) == (1022.5, 1030.0)
    store.seconds = 4.0  # a slow renewal: validity counts from its send, not its answer
    clock.now = 1010.0
    assert lease.renew() == VALID
    assert (lease.valid_until, lease.hard_deadline) == (1032.5, 1040.0)
    assert lease.fence() is True
    clock.now = 1032.5
    assert lease.status() == SUSPENDED and lease.suspended_since == 1032.5 and not lease.writable()
    assert lease.fence() is False
    clock.now = 1050.0  # past its hard deadline, but nobody took it: still ours
    assert lease.renew() == VALID and lease.suspended_since is None
    assert lease.hard_deadline == 1080.0
    assert lease.release() and lease.status() == LOST
    with pytest.raises(LeaseLost):
        lease.fence()


def test_a_renewal_that_fails_moves_nothing(tmp_path, s3_server, s3_bucket, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    from job.s3 import S3Store

    proxy = TcpProxy(s3_server.port)
    clock = Clock()
    lease = Lease(S3Store(s3_bucket, endpoint_url=proxy.url, request_timeout=1.0), "k/lease.json", ttl=6,
                  clock=clock)
    lease.acquire()
    before = (lease.valid_until, lease.hard_deadline)
    proxy.cut()
    clock.now += 3
    assert lease.renew() == VALID  # refused: validity is what it was
    assert (lease.valid_until, lease.hard_deadline) == before
    clock.now = before[0]
    assert lease.status() == SUSPENDED
    proxy.restore()
    assert lease.renew() == VALID and lease.valid_until == clock.now + 4.5


# -- on both stores, in real time ---------------------------------------------------------------

@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalStore(tmp_path / "state")
    server = request.getfixturevalue("s3_server")
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    from job.s3 import S3Store

    return S3Store(request.getfixturevalue("s3_bucket"), endpoint_url=server.url, request_timeout=0.5)


def test_a_live_lease_is_refused_naming_its_holder(store):
    first = Lease(store, "run/shard/lease.json", ttl=30)
    first.acquire()
    with pytest.raises(LeaseHeld, match=rf"another runner.*pid {os.getpid()}.*generation 1"):
        Lease(store, "run/shard/lease.json", ttl=30).acquire(wait=0)


def test_release_lets_the_next_runner_start_at_once_with_the_next_generation(store):
    first = Lease(store, "k/lease.json", ttl=30)
    first.acquire()
    assert first.release()
    started = time.monotonic()
    second = Lease(store, "k/lease.json", ttl=30)
    second.acquire(wait=0)
    assert time.monotonic() - started < 1.0
    assert (second.generation, second.status()) == (2, VALID)
    assert first.renew() == LOST


def test_a_dead_holder_is_taken_over_after_a_full_ttl_watched(store):
    ttl = 3.0
    dead = Lease(store, "k/lease.json", ttl=ttl)
    dead.acquire()  # and never renewed: its process is gone
    taker = Lease(store, "k/lease.json", ttl=ttl)
    notes = []
    started = time.monotonic()
    taker.acquire(wait=default_wait(ttl), on_wait=notes.append)
    assert time.monotonic() - started >= ttl
    assert taker.generation == 2 and taker.writable()
    assert notes and notes[0].token == dead.token
    assert time.monotonic() >= dead.hard_deadline  # nothing of the dead one could still land
    assert dead.renew() == LOST and not dead.writable()
    assert "another runner took it" in dead.lost_because
    assert taker.renew() == VALID


def test_a_holder_that_keeps_renewing_is_never_taken_over(store):
    ttl = 3.0
    holder = Lease(store, "k/lease.json", ttl=ttl)
    holder.acquire()
    holder.start()
    try:
        started = time.monotonic()
        with pytest.raises(LeaseHeld, match="watched for 7s"):
            Lease(store, "k/lease.json", ttl=ttl).acquire(wait=7.0)
        assert time.monotonic() - started >= 7.0
        assert holder.status() == VALID and holder.generation == 1
    finally:
        holder.release()


def test_a_lease_object_removed_by_hand_does_not_repeat_a_generation(tmp_path):
    store = LocalStore(tmp_path / "s")
    manifest = ShardManifest(store, "", "r", 0, 1)
    store.put(manifest.dir + segment_name(7, 1), b"")
    lease = manifest.lease(ttl=30)
    lease.acquire()
    assert lease.generation == 8


def test_a_store_slower_than_the_lease_allows_is_refused(s3_server, s3_bucket):
    from job.s3 import S3Store

    with pytest.raises(ValueError, match="request_timeout"):
        Lease(S3Store(s3_bucket, endpoint_url=s3_server.url), "k/lease.json", ttl=30)
    Lease(S3Store(s3_bucket, endpoint_url=s3_server.url, request_timeout=5.0), "k/lease.json", ttl=30)


# -- ambiguous writes ---------------------------------------------------------------------------

@pytest.fixture
def proxied(s3_server, s3_bucket, monkeypatch):
    """(proxy, store through the proxy, store direct)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    from job.s3 import S3Store

    proxy = TcpProxy(s3_server.port)
    yield (proxy, S3Store(s3_bucket, endpoint_url=proxy.url, request_timeout=0.5),
           S3Store(s3_bucket, endpoint_url=s3_server.url, request_timeout=0.5))
    proxy.cut()


@pytest.fixture
def unheard(s3_server, s3_bucket, monkeypatch):
    """(S3 proxy that can drop the answers of PUTs it forwarded, store through it, store direct)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    from job.s3 import S3Store

    faulty = FaultyS3(s3_server.port)
    yield (faulty, S3Store(s3_bucket, endpoint_url=faulty.url, request_timeout=1.0),
           S3Store(s3_bucket, endpoint_url=s3_server.url, request_timeout=1.0))
    faulty.stop()


def test_a_create_that_landed_unheard_is_recognised_as_ours(unheard):
    faulty, through, direct = unheard
    lease = Lease(through, "k/lease.json", ttl=30)
    faulty.unheard_puts = 1
    sent = time.monotonic()
    with pytest.raises(StoreUnavailable):
        lease.acquire()  # the create landed; its answer was lost
    assert faulty.landed_unheard == 1 and parse_lease(direct.get("k/lease.json")[0]).token == lease.token
    lease.acquire(wait=0)  # not "held by another runner": our own token
    assert lease.generation == 1 and lease.writable()
    assert sent <= lease.hard_deadline - 30 <= sent + 0.5  # counted from the unheard write's send


def test_a_renewal_that_landed_unheard_is_recognised_as_ours(unheard):
    faulty, through, direct = unheard
    lease = Lease(through, "k/lease.json", ttl=30)
    lease.acquire()
    faulty.unheard_puts = 1
    sent = time.monotonic()
    assert lease.renew() == VALID  # an error; in fact it landed
    assert faulty.landed_unheard == 1
    assert lease.renew() == VALID  # If-Match on the old ETag: 412, read back, our token
    assert lease.status() == VALID and lease.lost_because is None
    assert lease.hard_deadline >= sent + 30
    assert parse_lease(direct.get("k/lease.json")[0]).token == lease.token


# -- a network split, in real time -------------------------------------------------------------

def _timeline(lease: Lease, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        out.append((time.monotonic(), lease.status()))
        time.sleep(0.02)


@pytest.mark.parametrize("split", ["cut", "hang"])
def test_a_split_suspends_and_the_lease_comes_back_when_still_ours(proxied, split):
    proxy, through, _direct = proxied
    ttl = 3.0
    lease = Lease(through, f"{split}/lease.json", ttl=ttl)
    lease.acquire()
    lease.start()
    seen: list = []
    stop = threading.Event()
    watcher = threading.Thread(target=_timeline, args=(lease, stop, seen))
    watcher.start()
    try:
        time.sleep(1.0)
        getattr(proxy, split)()
        split_at = time.monotonic()
        time.sleep(ttl * 1.2)
        assert lease.status() == SUSPENDED and not lease.writable()
        suspended_at = next(t for t, s in seen if t > split_at and s == SUSPENDED)
        # Suspended no later than the validity of the last renewal sent before the split.
        assert suspended_at <= split_at + lease.timing.validity + 0.1
        proxy.restore()
        deadline = time.monotonic() + 3 * lease.timing.period + 1
        while lease.status() != VALID and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.status() == VALID and lease.generation == 1
    finally:
        stop.set()
        watcher.join()
        lease.release()


@pytest.mark.parametrize("split", ["cut", "hang"])
def test_a_split_with_a_takeover_loses_the_lease_and_never_overlaps(proxied, split):
    proxy, through, direct = proxied
    ttl = 3.0
    old = Lease(through, f"{split}/lease.json", ttl=ttl)
    old.acquire()
    old.start()
    seen: list = []
    stop = threading.Event()
    watcher = threading.Thread(target=_timeline, args=(old, stop, seen))
    watcher.start()
    try:
        time.sleep(1.0)
        getattr(proxy, split)()
        new = Lease(direct, f"{split}/lease.json", ttl=ttl)
        new.acquire(wait=default_wait(ttl))
        took_at = time.monotonic()
        assert new.generation == 2
        # The old holder stopped writing before the new one could have started.
        last_valid = max(t for t, s in seen if s == VALID)
        assert last_valid < took_at and old.hard_deadline <= took_at
        proxy.restore()
        deadline = time.monotonic() + 3 * old.timing.period + 1
        while old.status() != LOST and time.monotonic() < deadline:
            time.sleep(0.05)
        assert old.status() == LOST
        assert not any(s == VALID for t, s in seen if t > took_at)
        new.release()
    finally:
        stop.set()
        watcher.join()


# -- other processes: clock skew, a killed lock holder ---------------------------------------

TAKER = textwrap.dedent("""
    import json, sys, time
    from job.errors import LeaseHeld
    from job.lease import Lease
    from job.store import LocalStore
    lease = Lease(LocalStore(sys.argv[1]), "shard/lease.json", ttl=float(sys.argv[2]))
    started = time.monotonic()
    try:
        lease.acquire(wait=float(sys.argv[3]))
    except LeaseHeld as e:
        print(json.dumps({"held": str(e), "wall": time.time()}))
        sys.exit(4)
    print(json.dumps({"took_at": time.monotonic(), "started": started, "generation": lease.generation,
                      "wall": time.time()}))
""")


def run_taker(root, ttl: float, wait: float, skew: str | None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", TAKER, str(root), str(ttl), str(wait)]
    env = dict(os.environ)
    if skew:
        need(shutil.which("faketime") is not None, "faketime (Debian package faketime) is not installed")
        cmd = ["faketime", "-f", skew, *cmd]
        env["DONT_FAKE_MONOTONIC"] = "1"  # wall clocks differ between hosts; monotonic ones are local
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("skew", ["+60s", "-60s"])
def test_clock_skew_neither_shortens_nor_lengthens_the_lease(tmp_path, skew):
    ttl = 2.0
    holder = Lease(LocalStore(tmp_path / "s"), "shard/lease.json", ttl=ttl)
    holder.acquire()
    holder.start()
    held = run_taker(tmp_path / "s", ttl, 2 * ttl, skew)
    assert held.returncode == 4, held.stderr
    assert abs(json.loads(held.stdout)["wall"] - time.time() - int(skew[:-1])) < 5  # the skew was real
    assert holder.status() == VALID
    # The holder dies without a word: no renewal, no release.
    holder._stop.set()
    holder._thread.join()
    took = run_taker(tmp_path / "s", ttl, default_wait(ttl), skew)
    assert took.returncode == 0, took.stderr
    result = json.loads(took.stdout)
    assert result["generation"] == 2
    # CLOCK_MONOTONIC is the host's: the taker took over only after the holder's hard deadline,
    # a full TTL after the taker first saw the lease unchanged.
    assert result["took_at"] >= holder.hard_deadline
    assert result["took_at"] - result["started"] >= ttl


def test_a_holder_killed_inside_the_local_lock_does_not_block_a_takeover(tmp_path):
    """The lock file stays behind after a SIGKILL at the worst moment; the kernel has dropped
    the lock with its holder, so the shard is taken over after the TTL like any dead lease."""
    script = textwrap.dedent(f"""
        import time
        from job.lease import Lease
        from job.store import LocalStore
        store = LocalStore({str(tmp_path / "s")!r})
        lease = Lease(store, "shard/lease.json", ttl=1.5)
        lease.acquire()
        with store._locked(store._path("shard/lease.json")):
            print("holding", flush=True)
            time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert (tmp_path / "s" / "shard" / "lease.json.lock").exists()
    taker = Lease(LocalStore(tmp_path / "s"), "shard/lease.json", ttl=1.5)
    started = time.monotonic()
    taker.acquire(wait=default_wait(1.5))
    assert 1.5 <= time.monotonic() - started < default_wait(1.5)
    assert taker.generation == 2


# -- two real runners (the engine's use of the lease) ------------------------------------------

def test_two_runners_at_once_one_runs_the_items_and_the_other_waits(tmp_path, s3_server, s3_bucket):
    env = {**s3_server.env, "LEDGER_DB": str(tmp_path / "ledger.db")}
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"seconds": 0.01}} for i in range(200)])
    argv = ("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "ledger:handle", "--manifest",
            f"s3://{s3_bucket}/m", "--run-id", "twice", "--metrics-port", "0", "--workers", "2")
    procs = [start_bulkjob(*argv, env=env) for _ in range(2)]
    results = [(p.wait(120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert sorted(code for code, _, _ in results) == [0, 0], results
    counts = applied(tmp_path / "ledger.db")
    assert len(counts) == 200 and set(counts.values()) == {1}


def test_a_runner_whose_lease_expired_stops_and_writes_nothing_more(tmp_path, s3_server, s3_bucket):
    env = {**s3_server.env, "LEDGER_DB": str(tmp_path / "ledger.db")}
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"seconds": 0.05, "track": True}} for i in range(300)])
    argv = ("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "ledger:handle", "--manifest",
            f"s3://{s3_bucket}/m", "--run-id", "stolen", "--metrics-port", "0", "--workers", "2",
            "--lease-ttl", "2", "--checkpoint-interval", "0.2")
    a = start_bulkjob(*argv, env=env, start_new_session=True)
    time.sleep(2.5)
    os.killpg(a.pid, signal.SIGSTOP)  # a zombie: alive, but silent past its lease
    stopped_at = time.time()
    b = start_bulkjob(*argv, env=env)
    time.sleep(4.0)  # b watches a's lease for a full TTL, then takes it
    os.killpg(a.pid, signal.SIGCONT)
    a_out, a_err = a.communicate(timeout=60)
    _b_out, b_err = b.communicate(timeout=120)
    assert a.returncode == 4, a_err
    assert "lost the lease" in a_err
    assert b.returncode == 0, b_err
    conn = sqlite3.connect(tmp_path / "ledger.db")
    a_pids = {pid for (pid,) in conn.execute("SELECT DISTINCT pid FROM tried WHERE at < ?", (stopped_at,))}
    started_late = conn.execute(
        f"SELECT COUNT(*) FROM tried WHERE at > ? AND pid IN ({','.join('?' * len(a_pids))})",
        (stopped_at + 0.2, *a_pids)).fetchone()[0]
    assert started_late == 0  # the loser started no item after it went silent
    counts = applied(tmp_path / "ledger.db")
    assert len(counts) == 300
    # Repeats: only what the loser had in flight or finished since its last checkpoint (0.2 s).
    first = dict(conn.execute("SELECT item_id, MIN(at) FROM applied GROUP BY item_id"))
    repeated = [i for i, n in counts.items() if n > 1]
    assert all(first[i] > stopped_at - 0.2 - 0.5 for i in repeated)
    assert status_of(f"s3://{s3_bucket}/m", "stolen", env=s3_server.env)["done"] == 300
    assert json.loads(a_out.splitlines()[-1])["status"] == "lease_lost"


# -- what status shows -----------------------------------------------------------------------

def test_status_shows_the_lease_holder_and_a_lock_held_by_a_stopped_process(tmp_path):
    from conftest import run_bulkjob

    from job.checkpoint import Checkpointer

    store = LocalStore(tmp_path / "st")
    manifest = ShardManifest(store, "", "shown", 0, 1)
    lease = manifest.lease(ttl=30)
    lease.acquire()
    cp = Checkpointer(manifest, manifest.load(), generation=lease.generation, interval=3600, fence=lease.fence)
    cp.start()
    cp.add({"id": "a", "state": "done", "attempts": 1})
    assert cp.close(10)
    script = textwrap.dedent(f"""
        import time
        from job.store import LocalStore
        store = LocalStore({str(tmp_path / "st")!r})
        with store._locked(store._path({manifest.lease_key!r})):
            print("holding", flush=True)
            time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        holder.send_signal(signal.SIGSTOP)
        time.sleep(5.5)
        shown = run_bulkjob("status", "--manifest", str(tmp_path / "st"), "--run-id", "shown")
        assert shown.returncode == 0, shown.stderr
        assert f"lease generation 1 held by pod {lease.holder['pod']}" in shown.stdout
        assert f"pid {os.getpid()}" in shown.stdout
        assert f"lock file is held by pid {holder.pid}" in shown.stdout and "a stopped process?" in shown.stdout
        as_json = status_of(str(tmp_path / "st"), "shown")
        assert as_json["done"] == 1 and as_json["shards"][0]["lease"]["lock"]["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert lease.release()
    shown = run_bulkjob("status", "--manifest", str(tmp_path / "st"), "--run-id", "shown")
    assert "held by" not in shown.stdout and "lock file" not in shown.stdout
