"""One writer per shard when the network splits: real runners, a real S3 server, a TCP proxy
between one runner and the store that the test cuts (connections refused) or makes hang, and a
ledger in which every attempt's start and every applied item carries the runner and the time.

The lease's timing for `--lease-ttl 6` (job.lease.lease_timing): a renewal every second,
validity 4.5 s from the send of the last acknowledged renewal, another runner may take over
only after watching the lease unchanged for 6 s.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time

import pytest
from conftest import start_bulkjob, summary_of, write_items
from netproxy import TcpProxy

from job.lease import lease_timing

pytestmark = [pytest.mark.faults, pytest.mark.slow]

TTL = 6.0
TIMING = lease_timing(TTL)
#: Items of 50 ms on two workers: about 10 s of work, so the run outlives the split.
ITEMS = 400


@pytest.fixture
def split(tmp_path, s3_server, s3_bucket):
    proxy = TcpProxy(s3_server.port)
    items = write_items(tmp_path / "items.jsonl", [{"id": f"i-{n:04d}", "payload": {"seconds": 0.05, "track": True}}
                                                   for n in range(ITEMS)])

    def runner(name: str, *, through_proxy: bool, extra: tuple[str, ...] = ()):
        endpoint = proxy.url if through_proxy else s3_server.url
        env = {**s3_server.env, "AWS_ENDPOINT_URL": endpoint, "LEDGER_DB": str(tmp_path / "ledger.db"),
               "LEDGER_RUNNER": name}
        return start_bulkjob("run", "--items", str(items), "--handler", "ledger:handle",
                             "--manifest", f"s3://{s3_bucket}/{tmp_path.name}", "--run-id", "split", "--workers", "2",
                             "--lease-ttl", str(TTL), "--checkpoint-interval", "0.5", "--metrics-port", "0",
                             "--s3-endpoint-url", endpoint, *extra, env=env)

    yield proxy, runner, tmp_path / "ledger.db"
    proxy.cut()


def rows(ledger, table: str, runner: str) -> list[tuple[str, float]]:
    with sqlite3.connect(ledger, timeout=60) as conn:
        return conn.execute(f"SELECT item_id, at FROM {table} WHERE runner = ? ORDER BY at", (runner,)).fetchall()


def wait_for(ledger, runner: str, n: int, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if len(rows(ledger, "applied", runner)) >= n:
                return
        except sqlite3.OperationalError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            _out, err = proc.communicate()
            pytest.fail(f"runner {runner} did not get going (exit {proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.1)


def finish(proc, timeout: float = 240) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("how", ["cut", "hang"])
def test_a_split_runner_stops_before_the_taker_starts_and_exits_4_when_the_link_returns(split, how):
    proxy, runner, ledger = split
    a = runner("A", through_proxy=True)
    wait_for(ledger, "A", 40, a)
    getattr(proxy, how)()
    split_at = time.time()
    b = runner("B", through_proxy=False)
    wait_for(ledger, "B", 20, b, timeout=120)
    proxy.restore()
    restored_at = time.time()
    a_done = finish(a, timeout=60)
    assert a_done.returncode == 4, a_done.stderr[-3000:]
    assert time.time() - restored_at < 15  # at once, once the store answers: the lease is another's
    assert summary_of(a_done)["status"] == "lease_lost"
    b_done = finish(b)
    assert b_done.returncode == 0, b_done.stderr[-3000:]
    a_tried, b_tried = rows(ledger, "tried", "A"), rows(ledger, "tried", "B")
    # No item started on A after its lease ran out (the validity of the last renewal it could
    # have sent before the split), and none before B's takeover on B: never two writers.
    assert a_tried[-1][1] <= split_at + TIMING.validity + 0.5
    assert a_tried[-1][1] < b_tried[0][1]
    assert "waiting up to" in b_done.stderr and "generation 1" in b_done.stderr
    # Every item was applied; repeats are items A finished but could not record once split.
    applied = {}
    for runner_name in ("A", "B"):
        for item_id, at in rows(ledger, "applied", runner_name):
            applied.setdefault(item_id, []).append((runner_name, at))
    assert len(applied) == ITEMS
    repeated = [item for item, hits in applied.items() if len(hits) > 1]
    assert all(hits[0][0] == "A" and hits[0][1] >= split_at - 2.0 for item, hits in applied.items() if len(hits) > 1)
    assert len(repeated) <= 2 * (TIMING.validity + 2.0) / 0.05  # two workers, 50 ms items


@pytest.mark.parametrize("how", ["cut", "hang"])
def test_a_split_without_a_takeover_pauses_and_goes_on_when_the_link_returns(split, how):
    proxy, runner, ledger = split
    a = runner("A", through_proxy=True)
    wait_for(ledger, "A", 40, a)
    getattr(proxy, how)()
    split_at = time.time()
    time.sleep(TTL + 4)
    paused_from = split_at + TIMING.validity + 0.5
    started_while_split = [at for _, at in rows(ledger, "tried", "A") if at > paused_from]
    assert started_while_split == []  # nothing starts while the lease cannot be renewed
    proxy.restore()
    done = finish(a)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pausing: the lease on this shard could not be renewed" in done.stderr
    assert "resuming: the lease on this shard was renewed" in done.stderr
    summary = summary_of(done)
    assert (summary["done"], summary["failed"]) == (ITEMS, 0)
    applied = rows(ledger, "applied", "A")
    assert len(applied) == ITEMS and len({item for item, _ in applied}) == ITEMS  # each item once


def test_a_store_that_stays_away_ends_the_run_with_exit_5_and_loses_nothing(split):
    proxy, runner, ledger = split
    a = runner("A", through_proxy=True, extra=("--outage-timeout", "8"))
    wait_for(ledger, "A", 40, a)
    proxy.cut()
    done = finish(a, timeout=120)
    assert done.returncode == 5, done.stderr[-3000:]
    summary = summary_of(done)
    assert summary["status"] == "unavailable" and summary["failed"] == 0
    # What it recorded before the split is kept; a rerun once the store is back finishes.
    proxy.restore()
    again = finish(runner("A2", through_proxy=True))
    assert again.returncode == 0, again.stderr[-3000:]
    applied = {item for item, _ in rows(ledger, "applied", "A") + rows(ledger, "applied", "A2")}
    assert len(applied) == ITEMS
    assert json.loads(again.stdout.splitlines()[-1])["skipped_already_done"] > 0
