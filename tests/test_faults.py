"""The fault-injection suite (`make test-faults`): real jobs, real faults, and proof from the
ledger (what the handler applied) and the manifest (what the job recorded) that no item is
lost, none is recorded twice, and repeats stay within the documented bound.

Scenarios 9 (two runners, a stolen lease) and 10 (a damaged manifest) live in test_lease.py
and test_repair.py, and the database scenarios (8) in test_faults_db.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from collections import Counter

import pytest
from conftest import run_bulkjob, start_bulkjob, status_of, summary_of, write_items
from ledger import applied
from netproxy import TcpProxy
from s3faults import FaultyS3

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def job_args(items, manifest, run_id, *extra):
    return ("run", "--items", str(items), "--handler", "ledger:handle", "--manifest", manifest,
            "--run-id", run_id, "--metrics-port", "0", "--backoff", "0.05", "--max-backoff", "0.2", *extra)


def done_records(manifest_url, run_id, env=None) -> Counter:
    """How many `done` records each id has in every manifest object (not folded: a repeat
    recorded twice would show here)."""
    from job.manifest import ShardManifest
    from job.store import open_store

    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        store, prefix = open_store(manifest_url, endpoint_url=(env or {}).get("AWS_ENDPOINT_URL"))
        loaded = ShardManifest(store, prefix, run_id, 0, 1).load()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return Counter(r["id"] for r in loaded.records if r["state"] == "done")


def check_exactly_once(ledger, manifest_url, run_id, n, env=None) -> Counter:
    """Every item applied at least once and recorded done exactly once; returns the ledger."""
    counts = Counter(applied(ledger))
    assert len(counts) == n, f"{n - len(counts)} item(s) never applied"
    records = done_records(manifest_url, run_id, env)
    assert len(records) == n and set(records.values()) == {1}
    return counts


def first_applied(ledger) -> dict[str, float]:
    return dict(sqlite3.connect(ledger).execute("SELECT item_id, MIN(at) FROM applied GROUP BY item_id"))


def worker_pids(ledger) -> set[int]:
    try:
        return {pid for (pid,) in sqlite3.connect(ledger).execute("SELECT DISTINCT pid FROM tried")}
    except sqlite3.OperationalError:
        return set()


@pytest.fixture
def s3(s3_server, s3_bucket, tmp_path):
    return s3_server, f"s3://{s3_bucket}/faults", {**s3_server.env, "LEDGER_DB": str(tmp_path / "ledger.db")}


# 1 -------------------------------------------------------------------------------------------

def test_1_workers_sigkilled_mid_item_repeatedly(tmp_path, s3):
    server, manifest, env = s3
    items = write_items(tmp_path / "items.jsonl",
                        [{"id": i, "payload": {"seconds": 0.03, "track": True}} for i in range(400)])
    proc = start_bulkjob(*job_args(items, manifest, "f1", "--workers", "3", "--max-attempts", "6"), env=env)
    kills = 0
    rand = random.Random(1)
    deadline = time.monotonic() + 60
    while kills < 10 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        alive = [pid for pid in worker_pids(env["LEDGER_DB"]) if os.path.exists(f"/proc/{pid}")]
        if alive:
            try:
                os.kill(rand.choice(alive), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
    _out, err = proc.communicate(timeout=120)
    assert kills == 10
    assert proc.returncode == 0, err
    assert err.count("(killed by SIGKILL) while running item") == kills
    counts = check_exactly_once(env["LEDGER_DB"], manifest, "f1", 400, server.env)
    # A repeat needs a kill after the ledger write and before the answer reached the parent.
    assert sum(n - 1 for n in counts.values()) <= kills


# 2 -------------------------------------------------------------------------------------------

def test_2_whole_job_sigkilled_at_random_moments_then_resumed(tmp_path, s3):
    server, manifest, env = s3
    n = 2000
    items = write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"seconds": 0.01}} for i in range(n)])
    argv = job_args(items, manifest, "f2", "--workers", "2", "--lease-ttl", "1", "--checkpoint-interval", "0.2")
    rand = random.Random(2)
    kills = []
    for _ in range(5):
        # Like an OOM kill on cgroup v2: every process of the container at once.
        proc = start_bulkjob(*argv, env=env, start_new_session=True)
        time.sleep(rand.uniform(1.0, 2.0))
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGKILL)
        kills.append(time.time())
        proc.wait(10)
        time.sleep(1.1)  # the killed runner's lease expires
    assert len(kills) == 5, "the run finished before it could be killed five times"
    final = run_bulkjob(*argv, env=env, timeout=180)
    assert final.returncode == 0, final.stderr
    assert summary_of(final)["done"] == n
    counts = check_exactly_once(env["LEDGER_DB"], manifest, "f2", n, server.env)
    # Each repeat was first applied shortly before a kill: finished after that runner's last
    # checkpoint (0.2 s interval; slack for a write under way and the pipe).
    first = first_applied(env["LEDGER_DB"])
    for item_id, times in counts.items():
        if times > 1:
            assert any(0 <= kill - first[item_id] <= 0.2 + 1.0 for kill in kills), item_id


# 3 -------------------------------------------------------------------------------------------

def test_3_sigterm_drains_within_the_timeout_and_a_restart_finishes(tmp_path, s3):
    server, manifest, env = s3
    items = write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"seconds": 0.4}} for i in range(60)])
    proc = start_bulkjob(*job_args(items, manifest, "f3", "--workers", "4", "--drain-timeout", "5"), env=env)
    time.sleep(2.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5 + 3
    assert proc.returncode == 3
    assert json.loads(out.splitlines()[-1])["status"] == "interrupted"
    rerun = run_bulkjob(*job_args(items, manifest, "f3", "--workers", "4"), env=env)
    assert rerun.returncode == 0, rerun.stderr
    counts = check_exactly_once(env["LEDGER_DB"], manifest, "f3", 60, server.env)
    assert set(counts.values()) == {1}


# 4 -------------------------------------------------------------------------------------------

def test_4_worker_over_its_memory_limit(tmp_path, s3):
    _server, manifest, env = s3
    items = [{"id": i, "payload": {"seconds": 0.01}} for i in range(60)]
    items += [{"id": "poison", "payload": {"allocate_mb": 3000}},
              {"id": "once", "payload": {"allocate_mb": 3000, "allocate_attempts": 1}}]
    path = write_items(tmp_path / "items.jsonl", items)
    proc = run_bulkjob(*job_args(path, manifest, "f4", "--workers", "2", "--worker-memory-limit", "1G",
                                 "--max-attempts", "3", "--max-failures", "1"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert (summary_of(proc)["done"], summary_of(proc)["failed"]) == (61, 1)
    report = run_bulkjob("report", "--manifest", manifest, "--run-id", "f4", env=env)
    (row,) = map(json.loads, report.stdout.splitlines())
    assert (row["id"], row["error_class"], row["error_kind"], row["attempts"]) == ("poison", "MemoryError", "crashed", 3)
    assert len(applied(env["LEDGER_DB"])) == 61


# 5 -------------------------------------------------------------------------------------------

def test_5_item_that_hangs_forever(tmp_path, s3):
    _server, manifest, env = s3
    path = write_items(tmp_path / "items.jsonl",
                       [{"id": "hang", "payload": {"hang": True}}] + [{"id": i, "payload": {"seconds": 0.02}} for i in range(50)])
    proc = run_bulkjob(*job_args(path, manifest, "f5", "--workers", "2", "--item-timeout", "1", "--max-attempts", "2",
                                 "--max-failures", "1"), env=env)
    assert proc.returncode == 0, proc.stderr
    report = run_bulkjob("report", "--manifest", manifest, "--run-id", "f5", env=env)
    (row,) = map(json.loads, report.stdout.splitlines())
    assert (row["id"], row["error_kind"], row["attempts"]) == ("hang", "timeout", 2)
    assert len(applied(env["LEDGER_DB"])) == 50


# 6 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("outage", ["refused", "hang", "sigstop"])
def test_6_s3_unreachable_for_10_seconds(tmp_path, s3, outage):
    server, manifest, env = s3
    proxy = TcpProxy(server.port)
    env = {**env, "AWS_ENDPOINT_URL": proxy.url}
    path = write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"seconds": 0.05}} for i in range(400)])
    proc = start_bulkjob(*job_args(path, manifest, f"f6-{outage}", "--workers", "2",
                                   "--checkpoint-interval", "0.5"), env=env)
    time.sleep(2)
    if outage == "refused":
        proxy.cut()
    elif outage == "hang":
        proxy.hang()
    else:
        os.kill(server.process.pid, signal.SIGSTOP)
    time.sleep(10)
    if outage == "sigstop":
        os.kill(server.process.pid, signal.SIGCONT)
    else:
        proxy.restore()
    _out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    if outage == "refused":
        assert "will retry" in err
    # (A server that hangs for 10 s may answer just inside the 10 s read timeout, or after
    # botocore's own second attempt: either way the run must finish with nothing lost.)
    check_exactly_once(env["LEDGER_DB"], manifest, f"f6-{outage}", 400, {**server.env})
    assert status_of(manifest, f"f6-{outage}", env=server.env)["done"] == 400


# 7 -------------------------------------------------------------------------------------------

def test_7_s3_throttling_and_internal_errors(tmp_path, s3):
    server, manifest, env = s3
    faulty = FaultyS3(server.port, slowdown=0.3, internal_error=0.1)
    env = {**env, "AWS_ENDPOINT_URL": faulty.url}
    path = write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"seconds": 0.01}} for i in range(300)])
    proc = run_bulkjob(*job_args(path, manifest, "f7", "--workers", "2", "--checkpoint-interval", "0.1"), env=env)
    faulty.stop()
    assert proc.returncode == 0, proc.stderr
    assert faulty.injected[503] >= 3 and faulty.injected[500] >= 1
    check_exactly_once(env["LEDGER_DB"], manifest, "f7", 300, server.env)


# 11 ------------------------------------------------------------------------------------------

def bad_input_lines(n: int) -> tuple[list[bytes], int]:
    """n lines with problems spread through them; returns the lines and how many are bad."""
    rand = random.Random(11)
    lines: list[bytes] = [json.dumps({"id": "0"}).encode()]
    bad = 0
    last_id = "0"
    for i in range(1, n):
        roll = rand.random()
        if roll < 0.002:
            lines.append(b'{"id": "broken-' + str(i).encode() + b'", "payload": ')
        elif roll < 0.004:
            lines.append(json.dumps({"id": last_id}).encode())  # a repeated id
        elif roll < 0.005:
            lines.append(b'{"id": "latin1-\xe9"}')
        elif roll < 0.006:
            lines.append(json.dumps({"id": f"ctl-\x07-{i}"}).encode())
        else:
            last_id = [f"{i}", f"../../etc/{i}", f"a/b/{i}", f"..{i}"][i % 4]
            lines.append(json.dumps({"id": last_id}).encode())
            continue
        bad += 1
    lines.insert(n // 2, json.dumps({"id": "huge", "payload": {"blob": "x" * 10_000_000}}).encode())
    return lines, bad + 1


def test_11_bad_input_at_scale(tmp_path):
    lines, bad = bad_input_lines(100_000)
    path = write_items(tmp_path / "items.jsonl", lines)
    argv = ("run", "--items", str(path), "--handler", "job.examples:noop", "--manifest", str(tmp_path / "st"),
            "--run-id", "f11", "--metrics-port", "0", "--workers", "2")
    refused = run_bulkjob(*argv, timeout=300)
    assert refused.returncode == 2
    assert f"{bad} invalid line(s)" in refused.stderr and f"and {bad - 10} more" in refused.stderr
    assert not (tmp_path / "st").exists()
    done = run_bulkjob(*argv, "--skip-invalid", "--max-failures", str(bad), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = summary_of(done)
    assert (summary["failed"], summary["done"]) == (bad, len(lines) - bad)
    report = run_bulkjob("report", "--manifest", str(tmp_path / "st"), "--run-id", "f11")
    rows = [json.loads(line) for line in report.stdout.splitlines()]
    assert len(rows) == bad and {r["error_kind"] for r in rows} == {"invalid"}
    # Ids never became paths: the run's directory holds only the manifest's own objects.
    names = {p.name for p in (tmp_path / "st").rglob("*") if p.is_file()}
    assert all(n in ("meta.json", "lease.json", "lease.json.lock") or n.startswith(("seg-", "snap-"))
               for n in names), names
    assert [p.name for p in (tmp_path / "st").iterdir()] == ["f11"]
