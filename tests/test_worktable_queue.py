"""A work table as a claim queue, end to end: several runners on one table of a real PostgreSQL
(tests/pg.py) or SQLite file, real processes, real signals, a TCP proxy to cut one runner off.

The PostgreSQL ledger is written by the steps file in the item's own transaction, so it counts
commits, and says which runner committed (each runner's sessions carry its application_name).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, bulkjob_cmd, bulkjob_env, run_bulkjob, start_bulkjob, summary_of
from ledger import applied
from netproxy import TcpProxy

from job.db.worktable import DDL

pytestmark = pytest.mark.slow

LEDGER_STEPS = """\
-- step: work
INSERT INTO ledger (item, runner) VALUES (:item, current_setting('application_name'));
"""


def fill(pg_db, count: int, *, payload: str = "json_build_object('item', 'w' || lpad(i::text, 5, '0'))") -> None:
    """A work table of `count` PENDING rows w00000 ..., and the ledger."""
    pg_db.execute(DDL["postgres"])
    pg_db.execute("CREATE TABLE ledger (item text NOT NULL, runner text NOT NULL, "
                  "at timestamptz NOT NULL DEFAULT clock_timestamp())")
    pg_db.execute(f"INSERT INTO bulk_work (work_id, payload) SELECT 'w' || lpad(i::text, 5, '0'), {payload} "
                  f"FROM generate_series(0, {count - 1}) i")


def runner(url: str, handler: str, name: str, *extra: str) -> tuple[str, ...]:
    return ("run", "--work-table", "bulk_work", "--handler", handler, "--db", url, "--metrics-port", "0",
            "--session-sql", f"SET application_name = '{name}'", "--checkpoint-interval", "0.5",
            "--backoff", "0.2", "--max-backoff", "1", *extra)


def steps(tmp_path: Path, text: str = LEDGER_STEPS) -> str:
    path = tmp_path / "steps.sql"
    path.write_text(text)
    return f"sql:{path}"


def states(pg_db) -> dict[str, int]:
    return dict(pg_db.execute("SELECT state, COUNT(*) FROM bulk_work GROUP BY state"))


def wait_for(condition, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            assert proc.poll() is None, f"a runner ended early while waiting for {what}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def finish(proc, timeout: float = 300):
    out, err = proc.communicate(timeout=timeout)
    return type("Done", (), {"stdout": out, "stderr": err, "returncode": proc.returncode})


@pytest.mark.faults
def test_three_runners_one_sigkilled_every_row_done_and_applied_once_beyond_the_bound(tmp_path, pg_db):
    count, interval = 20000, 0.5
    fill(pg_db, count)
    handler = steps(tmp_path)
    # The runner to be killed logs to a file (its writes of row states, at debug), read if the
    # bound below does not hold.
    killed_log = tmp_path / "runner-b.log"
    with killed_log.open("w") as log_file:
        procs = {name: subprocess.Popen(
            bulkjob_cmd(*runner(pg_db.url, handler, name, "--workers", "2", "--lease-ttl", "8",
                                *(("--log-level", "debug") if name == "runner-b" else ()))),
            env=bulkjob_env(pg_db.env), stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
            stderr=log_file if name == "runner-b" else subprocess.PIPE)
            for name in ("runner-a", "runner-b", "runner-c")}
    wait_for(lambda: pg_db.execute("SELECT COUNT(*) FROM ledger WHERE runner = 'runner-b'")[0][0] >= 2000
             and states(pg_db).get("DONE", 0) >= 5000, 120, "a third of the rows done", procs.values())
    os.killpg(procs["runner-b"].pid, signal.SIGKILL)  # its whole process group, workers included
    [(killed_at,)] = pg_db.execute("SELECT clock_timestamp()")
    procs["runner-b"].wait(10)
    ends = {name: finish(procs[name]) for name in ("runner-a", "runner-c")}
    for name, end in ends.items():
        assert end.returncode == 0, f"{name}: {end.stderr[-3000:]}"

    assert states(pg_db) == {"DONE": count}  # none left RUNNING (nor PENDING)
    # Every runner's count: the survivors' summaries say what the table says they did, and the
    # killed runner did the rest.
    done_by = dict(pg_db.execute("SELECT claimed_by, COUNT(*) FROM bulk_work GROUP BY claimed_by"))
    summaries = {name: summary_of(end) for name, end in ends.items()}
    for name, summary in summaries.items():
        assert summary["done"] == done_by.pop(summary["runner"]), name
        assert summary["overtaken"] == 0, name  # no live runner's claims expired
    [(killed_runner, killed_done)] = done_by.items()
    assert killed_runner.split(":")[1] == str(procs["runner-b"].pid)
    assert killed_done + sum(s["done"] for s in summaries.values()) == count
    assert sum(s["taken_over"] for s in summaries.values()) > 0  # the dead runner's rows were taken over

    # Each row committed once, but for the documented bound: rows the killed runner was running
    # or had finished within the last --checkpoint-interval (their DONE not yet written).
    ledger = pg_db.execute("SELECT item, runner, at FROM ledger ORDER BY at")
    counts = Counter(item for item, _, _ in ledger)
    assert len(counts) == count
    repeated = {item for item, n in counts.items() if n > 1}
    assert all(counts[item] == 2 for item in repeated)
    first = {}
    for item, name, at in ledger:
        first.setdefault(item, (name, at))
    for item in repeated:
        name, at = first[item]
        assert name == "runner-b", item
        # The interval, plus what the last write-back of the killed runner took on a loaded
        # machine (its chunk waits for an extension in flight: at most TTL/6, 1.3 s here).
        writes = [line for line in killed_log.read_text().splitlines() if "bulkjob.worktable" in line]
        assert (killed_at - at).total_seconds() <= interval + 3.0, (item, killed_at - at, writes[-20:])
    assert len(repeated) < 2000  # far fewer than what the killed runner did


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
def test_two_runners_never_run_one_row_at_the_same_time(tmp_path, pg_server, dialect):
    """Every row is started once in all (the ledger logs each attempt's start): no row ran on
    both runners, at the same time or one after the other."""
    count = 1500
    ledger = tmp_path / "ledger.db"
    env = {"LEDGER_DB": str(ledger)}
    payload = {"track": True, "seconds": 0.002}
    if dialect == "sqlite":
        path = tmp_path / "work.db"
        with sqlite3.connect(path) as conn:
            conn.executescript("PRAGMA journal_mode = WAL;\n" + DDL["sqlite"])
            conn.executemany("INSERT INTO bulk_work (work_id, payload) VALUES (?, ?)",
                             [(f"w{i:05d}", json.dumps(payload)) for i in range(count)])
        url = f"sqlite:///{path}"

        def table_states():
            with sqlite3.connect(path) as conn:
                return dict(conn.execute("SELECT state, COUNT(*) FROM bulk_work GROUP BY state").fetchall())

        def claimants():
            with sqlite3.connect(path) as conn:
                return dict(conn.execute("SELECT claimed_by, COUNT(*) FROM bulk_work GROUP BY claimed_by"))
    else:
        from pg import PgDatabase

        db = PgDatabase(pg_server, f"two_runners_{dialect}")
        fill(db, count, payload=f"'{json.dumps(payload)}'::jsonb")
        url, env = db.url, {**env, **db.env}

        def table_states():
            return states(db)

        def claimants():
            return dict(db.execute("SELECT claimed_by, COUNT(*) FROM bulk_work GROUP BY claimed_by"))

    argv = ("run", "--work-table", "bulk_work", "--handler", "ledger:handle", "--db", url, "--metrics-port", "0",
            "--workers", "2", "--checkpoint-interval", "0.5")
    procs = [start_bulkjob(*argv, env=env) for _ in range(2)]
    ends = [finish(proc) for proc in procs]
    for end in ends:
        assert end.returncode == 0, end.stderr[-3000:]
    assert table_states() == {"DONE": count}
    with sqlite3.connect(ledger) as conn:
        tried = Counter(item for (item,) in conn.execute("SELECT item_id FROM tried"))
        pids = {pid for (pid,) in conn.execute("SELECT DISTINCT pid FROM tried")}
    assert len(tried) == count and set(tried.values()) == {1}
    assert applied(ledger) == {f"w{i:05d}": 1 for i in range(count)}
    by_runner = claimants()
    summaries = [summary_of(end) for end in ends]
    assert sorted(by_runner.values()) == sorted(s["done"] for s in summaries) and all(by_runner.values())
    assert len(pids) >= 3  # both runners' workers took part


@pytest.mark.faults
def test_a_runner_cut_off_from_the_database_writes_nothing_over_the_rows_taken_over(tmp_path, pg_db):
    """Runner A reaches the database through a proxy that the test cuts: its claims run out, its
    running item is killed before another runner may take the row, B takes A's rows over and
    finishes them; when A reaches the database again it finds them gone, runs none of them and
    changes none of B's rows."""
    fill(pg_db, 4, payload="'{\"track\": true, \"seconds\": 4}'::jsonb")
    ledger = tmp_path / "ledger.db"
    env = {**pg_db.env, "LEDGER_DB": str(ledger)}
    proxy = TcpProxy(pg_db.server.port)
    via_proxy = pg_db.url.replace(f":{pg_db.server.port}/", f":{proxy.port}/")
    argv = ("run", "--work-table", "bulk_work", "--handler", "ledger:handle", "--metrics-port", "0",
            "--lease-ttl", "3", "--checkpoint-interval", "0.5", "--connect-timeout", "2")
    a = start_bulkjob(*argv, "--db", via_proxy, "--workers", "1", env=env)
    try:
        wait_for(lambda: pg_db.execute("SELECT COUNT(*) FROM bulk_work WHERE state = 'RUNNING'")[0][0] >= 2
                 and ledger.exists() and _tried(ledger), 60, "runner A's first item", [a])
        [(a_runner,)] = pg_db.execute("SELECT DISTINCT claimed_by FROM bulk_work WHERE state = 'RUNNING'")
        a_rows = {r for (r,) in pg_db.execute("SELECT work_id FROM bulk_work WHERE claimed_by = %s", (a_runner,))}
        proxy.cut()
        cut_at = time.time()
        b = run_bulkjob(*argv, "--db", pg_db.url, "--workers", "2", env=env, timeout=180)
        assert b.returncode == 0, b.stderr[-3000:]
        b_summary = summary_of(b)
        assert b_summary["taken_over"] == len(a_rows) and b_summary["done"] == 4
        before = pg_db.execute("SELECT work_id, state, claimed_by, attempts, updated_at FROM bulk_work "
                               "ORDER BY work_id")
        assert {state for _, state, _, _, _ in before} == {"DONE"}
        assert {claimed_by for _, _, claimed_by, _, _ in before} == {b_summary["runner"]}
        proxy.restore()
        a_end = finish(a, timeout=120)
    finally:
        proxy.cut()
        if a.poll() is None:
            a.kill()
    assert a_end.returncode == 0, a_end.stderr[-3000:]
    assert "taken over by another runner" in a_end.stderr
    assert summary_of(a_end)["done"] == 0
    after = pg_db.execute("SELECT work_id, state, claimed_by, attempts, updated_at FROM bulk_work ORDER BY work_id")
    assert after == before  # A wrote nothing over B's rows
    with sqlite3.connect(ledger) as conn:
        tried = conn.execute("SELECT item_id, pid, at FROM tried ORDER BY at").fetchall()
    a_tries = [(item, at) for item, pid, at in tried if at < cut_at]
    assert a_tries and {item for item, _ in a_tries} <= a_rows
    # A's item was killed before its claim ran out (4 s items, a 3 s TTL): nothing of A's applied.
    assert applied(ledger) == {row: 1 for row in ("w00000", "w00001", "w00002", "w00003")}
    for item, at in a_tries:  # and B started each of A's rows only after A's claim had expired
        b_start = min(t for i, _, t in tried if i == item and t >= cut_at)
        assert b_start - at >= 3 - 0.5 - 0.2, item


def _tried(ledger: Path) -> int:
    try:
        with sqlite3.connect(ledger) as conn:
            return conn.execute("SELECT COUNT(*) FROM tried").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.faults
def test_a_poison_row_that_kills_its_runner_ends_err_as_crashed_the_rest_done(tmp_path, pg_db):
    fill(pg_db, 30, payload="json_build_object('item', 'w' || lpad(i::text, 5, '0'))")
    pg_db.execute("INSERT INTO bulk_work (work_id, payload) VALUES ('poison', '{\"kill_group\": true}')")
    env = bulkjob_env({**pg_db.env, "LEDGER_DB": str(tmp_path / "ledger.db"), "LEDGER_MAY_KILL_GROUP": "1"})
    cmd = bulkjob_cmd("run", "--work-table", "bulk_work", "--handler", "ledger:handle", "--db", pg_db.url,
                      "--metrics-port", "0", "--workers", "2", "--max-attempts", "2", "--lease-ttl", "2",
                      "--max-failures", "1", "--checkpoint-interval", "0.5")
    codes = []
    for _ in range(6):
        # A session of its own: the poison row kills its process group, never the test's.
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180,
                              cwd=Path(__file__).parent.parent, start_new_session=True)
        codes.append(proc.returncode)
        if proc.returncode >= 0:
            break
    assert codes[-1] == 0, (codes, proc.stderr[-3000:])
    # The first death may go uncounted (before any start was written): at most --max-attempts + 1.
    assert all(code == -signal.SIGKILL for code in codes[:-1]) and 2 <= len(codes) - 1 <= 3
    assert states(pg_db) == {"DONE": 30, "ERR": 1}
    [(attempts, error)] = pg_db.execute("SELECT attempts, error FROM bulk_work WHERE work_id = 'poison'")
    assert attempts == 2 and error.startswith("RunCrashed: the whole run died while this item ran, 2 time(s)")
    assert set(applied(tmp_path / "ledger.db")) == {f"w{i:05d}" for i in range(30)}
    report = run_bulkjob("report", "--work-table", "bulk_work", "--db", pg_db.url, "--format", "csv", env=pg_db.env)
    assert report.returncode == 0, report.stderr
    [row] = list(csv.DictReader(io.StringIO(report.stdout)))
    assert (row["id"], row["attempts"], row["error"].split(":")[0]) == ("poison", "2", "RunCrashed")


def test_sigterm_gives_back_the_rows_that_did_not_run(tmp_path, pg_db):
    fill(pg_db, 12)
    handler = steps(tmp_path, LEDGER_STEPS + "SELECT pg_sleep(0.3);\n")
    argv = runner(pg_db.url, handler, "runner-a", "--workers", "1")
    proc = start_bulkjob(*argv, env=pg_db.env)
    wait_for(lambda: states(pg_db).get("DONE", 0) >= 3, 60, "three rows done", [proc])
    proc.send_signal(signal.SIGTERM)
    end = finish(proc, 60)
    assert end.returncode == 3, end.stderr[-3000:]
    summary = summary_of(end)
    after = states(pg_db)
    # Nothing left RUNNING: what did not run (claimed ahead, or sent to a worker and not started)
    # is PENDING again, for any runner to claim.
    assert set(after) == {"DONE", "PENDING"} and after["DONE"] == summary["done"] >= 3
    assert summary["given_back"] >= 1
    assert pg_db.execute("SELECT COUNT(*) FROM bulk_work WHERE state = 'PENDING' "
                         "AND (claimed_by IS NOT NULL OR claim_expires IS NOT NULL OR attempts <> 0)") == [(0,)]
    again = run_bulkjob(*argv, env=pg_db.env)
    assert again.returncode == 0 and summary_of(again)["done"] == after["PENDING"], again.stderr[-3000:]
    assert states(pg_db) == {"DONE": 12}
    assert pg_db.execute("SELECT COUNT(*), COUNT(DISTINCT item) FROM ledger") == [(12, 12)]


def test_states_attempts_and_errors_in_the_table(tmp_path, pg_db):
    fill(pg_db, 20)
    pg_db.execute("CREATE TABLE out (k text PRIMARY KEY CHECK (k <> 'bad'))")
    pg_db.execute("""INSERT INTO bulk_work (work_id, payload) VALUES ('w-bad', '{"item": "bad"}'),
                     ('w-list', '[1, 2]')""")
    pg_db.execute("INSERT INTO bulk_work (work_id, state, payload) VALUES ('w-done', 'DONE', '{}'), "
                  "('w-err', 'ERR', '{}')")
    pg_db.execute("ALTER TABLE bulk_work ADD COLUMN result jsonb")
    handler = steps(tmp_path, "-- step: one\nINSERT INTO out VALUES (:item);\n")
    proc = run_bulkjob(*runner(pg_db.url, handler, "a", "--max-failures", "2", "--max-attempts", "2"), env=pg_db.env)
    summary = summary_of(proc)
    assert (summary["total"], summary["done"], summary["failed"], proc.returncode) == (22, 20, 2, 0), \
        proc.stderr[-3000:]
    assert summary["manifest"] is None and summary["work_table"] == "bulk_work"
    assert states(pg_db) == {"DONE": 21, "ERR": 3}
    rows = {r[0]: r[1:] for r in pg_db.execute("SELECT work_id, state, attempts, error, result, claim_expires "
                                               "FROM bulk_work")}
    assert rows["w-bad"][:2] == ("ERR", 1) and rows["w-bad"][2].startswith("23514 CheckViolation")
    assert rows["w-list"][:3] == ("ERR", 0, 'InvalidItem: work table row: "payload" must be an object, got list')
    assert rows["w00007"] == ("DONE", 1, None, {"steps": 1, "rows": 1}, None)
    assert rows["w-err"] == ("ERR", 0, None, None, None)  # an ERR row stays ERR: nobody claims it
    assert not (tmp_path / "bulkjob-state").exists()  # the table is the record
    status = run_bulkjob("status", "--work-table", "bulk_work", "--db", pg_db.url, "--json", env=pg_db.env)
    assert status.returncode == 0, status.stderr
    assert {k: v for k, v in json.loads(status.stdout).items() if k in ("total", "done", "failed", "pending")} == {
        "total": 24, "done": 21, "failed": 3, "pending": 0}


def old_table(path: Path, *, claims: bool) -> str:
    """A SQLite work table of three rows, with or without the claim columns."""
    ddl = DDL["sqlite"]
    if not claims:
        ddl = "\n".join(line for line in ddl.splitlines()
                        if not line.strip().startswith(("claimed_by", "claim_expires", "attempts")))
        ddl = ddl.replace("(state, claim_expires)", "(state)")
    with sqlite3.connect(path) as conn:
        conn.executescript(ddl)
        conn.executemany("INSERT INTO bulk_work (work_id, payload) VALUES (?, ?)",
                         [(f"w{i}", "{}") for i in range(3)])
    return f"sqlite:///{path}"


def test_a_table_without_the_claim_columns_is_refused_with_the_alter_table_to_run(tmp_path):
    url = old_table(tmp_path / "w.db", claims=False)
    argv = ("run", "--work-table", "bulk_work", "--handler", "ledger:handle", "--db", url, "--metrics-port", "0")
    refused = run_bulkjob(*argv, env={"LEDGER_DB": str(tmp_path / "ledger.db")})
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert "lacks the column(s) that claims need (claimed_by, claim_expires, attempts)" in last
    with sqlite3.connect(tmp_path / "w.db") as conn:
        conn.executescript(last[last.index("ALTER TABLE"):])  # what the message says to run
    proc = run_bulkjob(*argv, env={"LEDGER_DB": str(tmp_path / "ledger.db")})
    assert proc.returncode == 0 and summary_of(proc)["done"] == 3, proc.stderr[-3000:]


@pytest.mark.parametrize("extra, env, says", [
    (("--shard-count", "2"), {}, "takes no --shard-count or --shard-index: every runner claims rows from the whole "
                                 "table; to go faster, start more runners"),
    (("--shard-index", "1", "--shard-count", "2"), {}, "to go faster, start more runners"),
    ((), {"BULKJOB_SHARD_COUNT": "4"}, "to go faster, start more runners"),
    (("--retry-failed",), {}, "UPDATE bulk_work SET state = 'PENDING', attempts = 0 WHERE state = 'ERR'"),
    (("--manifest", "s3://b/p"), {}, "the table is the run's record"),
])
def test_options_that_have_no_use_with_a_work_table_are_refused(tmp_path, extra, env, says):
    url = old_table(tmp_path / "w.db", claims=True)
    proc = run_bulkjob("run", "--work-table", "bulk_work", "--handler", "ledger:handle", "--db", url,
                       "--metrics-port", "0", *extra, env=env)
    assert proc.returncode == 2 and says in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    with sqlite3.connect(tmp_path / "w.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM bulk_work WHERE state = 'PENDING'").fetchone() == (3,)


def test_an_indexed_jobs_completion_index_is_only_a_label(tmp_path):
    url = old_table(tmp_path / "w.db", claims=True)
    proc = run_bulkjob("run", "--work-table", "bulk_work", "--handler", "ledger:handle", "--db", url,
                       "--metrics-port", "0", env={"JOB_COMPLETION_INDEX": "3", "LEDGER_DB": str(tmp_path / "l.db")})
    assert proc.returncode == 0 and summary_of(proc)["done"] == 3, proc.stderr[-2000:]
    # A runner on a table with nothing left to claim ends at once, with nothing done.
    again = run_bulkjob("run", "--work-table", "bulk_work", "--handler", "ledger:handle", "--db", url,
                        "--metrics-port", "0", env={"LEDGER_DB": str(tmp_path / "l.db")})
    assert again.returncode == 0 and summary_of(again)["done"] == 0 and "nothing left to claim" in again.stderr


@pytest.mark.faults
def test_a_database_outage_longer_than_the_claims_pauses_claims_and_items_alike(tmp_path):
    """PostgreSQL stopped for 8 s under a runner whose claims last 4 s: items pause (the outage
    breaker), the claims cannot be extended and suspend (running items are killed before they
    could be taken over, not charged); when the database is back no other runner has taken
    them, so the same claims are extended again and the run goes on where it stopped."""
    from pg import PgDatabase, PgServer

    server = PgServer()
    try:
        db = PgDatabase(server, "outage")
        fill(db, 3000)
        handler = steps(tmp_path, LEDGER_STEPS + "SELECT pg_sleep(0.002);\n")
        proc = start_bulkjob(*runner(db.url, handler, "a", "--workers", "3", "--lease-ttl", "4",
                                     "--connect-timeout", "2"), env=db.env)
        wait_for(lambda: states(db).get("DONE", 0) >= 600, 120, "a fifth of the rows done", [proc])
        server.shutdown()
        time.sleep(8)
        server.start()
        end = finish(proc, 240)
        assert end.returncode == 0, end.stderr[-3000:]
        summary = summary_of(end)
        assert (summary["done"], summary["failed"]) == (3000, 0)
        assert summary["outages"] and summary["refunded"] >= 1
        assert "pausing: this runner's claims could not be extended (the database does not answer)" in end.stderr
        assert "resuming: this runner's claims were extended again" in end.stderr
        assert states(db) == {"DONE": 3000}
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT item) FROM ledger") == [(3000, 3000)]  # committed once
        assert db.execute("SELECT MAX(attempts) FROM bulk_work") == [(1,)]  # nothing charged for the outage
    finally:
        server.stop()


def test_dry_run_and_status_read_the_table_and_claim_nothing(tmp_path):
    url = old_table(tmp_path / "w.db", claims=True)
    with sqlite3.connect(tmp_path / "w.db") as conn:
        conn.execute("UPDATE bulk_work SET state = 'RUNNING', claimed_by = 'x:1:ab', "
                     "claim_expires = '2000-01-01 00:00:00.000' WHERE work_id = 'w2'")
    proc = run_bulkjob("run", "--work-table", "bulk_work", "--handler", "ledger:handle", "--db", url, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = summary_of(proc)["rows"]
    assert (rows["total"], rows["pending"], rows["running"], rows["expired"]) == (3, 2, 1, 1)
    status = run_bulkjob("status", "--work-table", "bulk_work", "--db", url)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == "work table bulk_work"
    assert "1 running row(s) with an expired claim" in status.stdout
    with sqlite3.connect(tmp_path / "w.db") as conn:
        assert conn.execute("SELECT state, COUNT(*) FROM bulk_work GROUP BY state ORDER BY state").fetchall() == [
            ("PENDING", 2), ("RUNNING", 1)]
    missing = run_bulkjob("status", "--work-table", "bulk_work")
    assert missing.returncode == 2 and "--work-table needs --db" in missing.stderr
