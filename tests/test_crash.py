"""Real crashes and real signals: SIGKILLed workers, hung items, SIGTERM and SIGKILL of the parent.

Each test checks, from the ledger the handler writes, that every item was applied at least
once, and from the manifest that each is recorded done exactly once.
"""

import json
import signal
import sqlite3
import subprocess
import time
from collections import Counter

import pytest
from conftest import run_bulkjob, start_bulkjob, status_of, summary_of, write_items
from ledger import applied

from job.manifest import ShardManifest
from job.store import LocalStore

pytestmark = pytest.mark.slow


def args(tmp_path, run_id="r1", *extra):
    return ("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "ledger:handle",
            "--manifest", str(tmp_path / "state"), "--run-id", run_id, "--metrics-port", "0",
            "--backoff", "0.05", "--max-backoff", "0.1", *extra)


def done_records(tmp_path, run_id="r1"):
    """How many `done` records each id has across every manifest object (not folded)."""
    loaded = ShardManifest(LocalStore(tmp_path / "state"), "", run_id, 0, 1).load()
    return Counter(r["id"] for r in loaded.records if r["state"] == "done")


def wait_for_ledger(path, rows, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(applied(path).values()) >= rows:
            return
        time.sleep(0.05)
    raise TimeoutError(f"ledger did not reach {rows} rows")


def tried(path) -> int:
    try:
        return sqlite3.connect(path).execute("SELECT COUNT(*) FROM tried").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_a_signal_before_any_item_runs_ends_with_exit_3(tmp_path, env):
    # Items come from stdin, still open: the job is reading its input when the signal comes.
    argv = list(args(tmp_path, "r1"))
    argv[argv.index("--items") + 1] = "-"
    proc = start_bulkjob(*argv, env=env, stdin=subprocess.PIPE)
    proc.stdin.write("".join(json.dumps({"id": i}) + "\n" for i in range(5)))
    proc.stdin.flush()
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert json.loads(out.splitlines()[-1])["status"] == "interrupted"
    assert applied(tmp_path / "ledger.db") == {}


@pytest.fixture
def env(tmp_path):
    return {"LEDGER_DB": str(tmp_path / "ledger.db")}


def test_killed_workers_are_replaced_and_their_items_retried(tmp_path, env):
    items = [{"id": i, "payload": {"crash_on": [1] if i % 10 == 0 else [], "seconds": 0.01}} for i in range(100)]
    items.append({"id": "poison", "payload": {"crash_on": [1, 2, 3]}})
    write_items(tmp_path / "items.jsonl", items)
    proc = run_bulkjob(*args(tmp_path, "r1", "--workers", "2", "--max-attempts", "3", "--max-failures", "1"), env=env)
    assert proc.returncode == 0, proc.stderr
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"], summary["retries"]) == (100, 1, 12)
    counts = applied(tmp_path / "ledger.db")
    assert len(counts) == 100 and set(counts.values()) == {1}
    report = run_bulkjob("report", "--manifest", str(tmp_path / "state"), "--run-id", "r1")
    (row,) = map(json.loads, report.stdout.splitlines())
    assert (row["id"], row["error_kind"], row["attempts"]) == ("poison", "crashed", 3)
    assert "SIGKILL" in row["error_message"]


def test_hung_item_is_killed_at_the_item_timeout(tmp_path, env):
    items = [{"id": "hang", "payload": {"hang": True}}] + [{"id": i} for i in range(30)]
    write_items(tmp_path / "items.jsonl", items)
    started = time.monotonic()
    proc = run_bulkjob(*args(tmp_path, "r1", "--workers", "2", "--item-timeout", "0.5", "--max-attempts", "2"), env=env)
    assert time.monotonic() - started < 30
    assert proc.returncode == 1
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"], summary["attempts"]) == (30, 1, 32)
    report = run_bulkjob("report", "--manifest", str(tmp_path / "state"), "--run-id", "r1")
    (row,) = map(json.loads, report.stdout.splitlines())
    assert (row["id"], row["error_kind"], row["error_class"]) == ("hang", "timeout", "ItemTimeout")


def test_sigterm_drains_then_resume_finishes_without_repeats(tmp_path, env):
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"seconds": 0.05}} for i in range(300)])
    proc = start_bulkjob(*args(tmp_path, "r1", "--workers", "2", "--drain-timeout", "10"), env=env)
    wait_for_ledger(tmp_path / "ledger.db", 40)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 3, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["status"] == "interrupted" and 0 < summary["done"] < 300
    # The flushed manifest holds everything the ledger shows as applied.
    assert status_of(str(tmp_path / "state"), "r1")["done"] == len(applied(tmp_path / "ledger.db")) == summary["done"]
    resumed = run_bulkjob(*args(tmp_path, "r1", "--workers", "2"), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert summary_of(resumed)["skipped_already_done"] == summary["done"]
    counts = applied(tmp_path / "ledger.db")
    assert len(counts) == 300 and set(counts.values()) == {1}  # a drain repeats nothing
    assert set(done_records(tmp_path).values()) == {1} and len(done_records(tmp_path)) == 300


def test_second_signal_stops_at_once(tmp_path, env):
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"seconds": 3, "track": True}} for i in range(10)])
    proc = start_bulkjob(*args(tmp_path, "r1", "--workers", "2", "--drain-timeout", "60"), env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and tried(tmp_path / "ledger.db") < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 8
    assert proc.returncode == 3
    assert "cut short and not recorded" in err
    assert status_of(str(tmp_path / "state"), "r1")["done"] == 0


def test_parent_sigkill_then_an_immediate_replacement_waits_and_finishes(tmp_path, env):
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"seconds": 0.01}} for i in range(600)])
    proc = start_bulkjob(*args(tmp_path, "r1", "--workers", "2", "--checkpoint-interval", "0.3",
                               "--lease-ttl", "2"), env=env)
    wait_for_ledger(tmp_path / "ledger.db", 200)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    time.sleep(0.5)
    frozen = sum(applied(tmp_path / "ledger.db").values())
    time.sleep(0.5)
    assert sum(applied(tmp_path / "ledger.db").values()) == frozen  # the workers died with the parent
    loaded = ShardManifest(LocalStore(tmp_path / "state"), "", "r1", 0, 1).load()
    recorded = {r["id"] for r in loaded.records if r["state"] == "done"}
    last_checkpoint = loaded.updated_at
    # The replacement starts at once, as a pod's replacement does: it finds the dead runner's
    # lease, waits until it has seen it unrenewed for a whole TTL, takes over and finishes.
    started = time.monotonic()
    resumed = run_bulkjob(*args(tmp_path, "r1", "--workers", "2", "--lease-ttl", "2"), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert time.monotonic() - started >= 1.5 and "--lease-wait" in resumed.stderr
    assert "generation 1" in resumed.stderr  # the holder it waited for is named
    counts = applied(tmp_path / "ledger.db")
    assert len(counts) == 600
    repeated = {item_id for item_id, n in counts.items() if n > 1}
    assert repeated.isdisjoint(recorded)  # nothing recorded done ran again
    conn = sqlite3.connect(tmp_path / "ledger.db")
    first_applied = dict(conn.execute("SELECT item_id, MIN(at) FROM applied GROUP BY item_id"))
    # Repeats are only items finished after the last checkpoint was taken (plus pipe latency).
    assert all(first_applied[i] > last_checkpoint - 0.5 for i in repeated)
    assert len(repeated) <= len([i for i, at in first_applied.items() if frozen and at > last_checkpoint - 0.5])
    assert set(done_records(tmp_path).values()) == {1}
