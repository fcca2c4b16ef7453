"""One runner per shard: the lease on both stores, and two real runners contending."""

import json
import os
import signal
import sqlite3
import time

import pytest
from conftest import start_bulkjob, status_of, write_items
from ledger import applied

from job.errors import LeaseHeld
from job.lease import Lease
from job.store import LocalStore

pytestmark = pytest.mark.faults


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalStore(tmp_path / "state")
    server = request.getfixturevalue("s3_server")
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    from job.s3 import S3Store

    return S3Store(request.getfixturevalue("s3_bucket"), endpoint_url=server.url)


def test_a_live_lease_is_refused_naming_its_holder(store):
    first = Lease(store, "run/shard/lease.json", ttl=30)
    first.acquire()
    with pytest.raises(LeaseHeld, match=rf"pid {os.getpid()}.*expires"):
        Lease(store, "run/shard/lease.json", ttl=30).acquire()


def test_an_expired_lease_is_taken_over_and_the_old_holder_loses_it(store):
    old = Lease(store, "k/lease.json", ttl=10)
    old.acquire(now=time.time() - 60)  # expired long ago
    new = Lease(store, "k/lease.json", ttl=10)
    new.acquire()
    assert not old.lost
    old.renew()
    assert old.lost and not old.valid()
    new.renew()
    assert not new.lost and new.valid()


def test_release_lets_the_next_runner_start_at_once(store):
    lease = Lease(store, "k/lease.json", ttl=30)
    lease.acquire()
    lease.release()
    Lease(store, "k/lease.json", ttl=30).acquire()


def test_a_runner_that_cannot_renew_gives_up_before_expiry(store):
    lease = Lease(store, "k/lease.json", ttl=4)
    lease.acquire(now=time.time() - 3.5)  # as if the last renewal was 3.5 s ago
    assert not lease.valid() and lease.lost


def test_two_runners_at_once_only_one_runs_items(tmp_path, s3_server, s3_bucket):
    env = {**s3_server.env, "LEDGER_DB": str(tmp_path / "ledger.db")}
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"seconds": 0.01}} for i in range(200)])
    argv = ("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "ledger:handle", "--manifest",
            f"s3://{s3_bucket}/m", "--run-id", "twice", "--metrics-port", "0", "--workers", "2")
    procs = [start_bulkjob(*argv, env=env) for _ in range(2)]
    results = [(p.wait(120), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 4], results
    loser_err = next(err for code, _, err in results if code == 4)
    assert "another runner" in loser_err and "pid" in loser_err
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
    time.sleep(2.5)
    b = start_bulkjob(*argv, env=env)
    time.sleep(1.0)
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
