"""The database path against a real PostgreSQL server (tests/pg.py starts a private one).

Locks, deadlocks, killed backends and statement timeouts are real: another session holds the
lock, two items take rows in opposite orders, pg_terminate_backend ends the session.
"""

from __future__ import annotations

import csv
import io
import threading
import time
from pathlib import Path

import pytest
from conftest import run_bulkjob, summary_of, write_items
from netproxy import CutAfterAnswer

from job.manifest import ShardManifest
from job.store import LocalStore

pytestmark = pytest.mark.slow


def pg_args(tmp_path, db, handler, *extra, run_id="r1", items=True):
    source = ("--items", str(tmp_path / "items.jsonl")) if items else ()
    return ("run", *source, "--handler", handler, "--db", db.url, "--manifest", str(tmp_path / "state"),
            "--run-id", run_id, "--metrics-port", "0", "--backoff", "0.2", "--max-backoff", "1", *extra)


def steps(tmp_path: Path, text: str) -> str:
    path = tmp_path / "steps.sql"
    path.write_text(text)
    return f"sql:{path}"


def latest(tmp_path, run_id="r1"):
    return ShardManifest(LocalStore(tmp_path / "state"), "", run_id, 0, 1).load().latest()


def manifest_text(tmp_path) -> str:
    return "".join(p.read_text(errors="replace") for p in (tmp_path / "state").rglob("*.jsonl"))


LOAD = """\
-- allow target: totals
-- step: stage
DELETE FROM stage WHERE k = :k;
INSERT INTO stage (k, v) SELECT k, v FROM src WHERE k = :k;
-- step: aggregate
INSERT INTO {target} (k, total) SELECT k, SUM(v) FROM stage WHERE k = :k GROUP BY k
ON CONFLICT (k) DO UPDATE SET total = excluded.total;
-- step: audit
INSERT INTO audit (k, tag, timeout) VALUES (:k, current_setting('bulkjob.tag'), current_setting('statement_timeout'));
DELETE FROM stage WHERE k = :k;
"""


@pytest.mark.parametrize("commit", ["item", "step"])
def test_steps_end_to_end(tmp_path, pg_db, commit):
    pg_db.execute("CREATE TABLE src (k text, v int); CREATE TABLE stage (k text, v int);"
                  "CREATE TABLE totals (k text PRIMARY KEY, total int);"
                  "CREATE TABLE audit (k text, tag text, timeout text)")
    pg_db.execute("INSERT INTO src SELECT 'k' || i, j FROM generate_series(1, 20) i, generate_series(1, 3) j")
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"k": f"k{i}", "target": "totals"}}
                                           for i in range(1, 21)])
    proc = run_bulkjob(*pg_args(tmp_path, pg_db, steps(tmp_path, LOAD), "--commit", commit, "--workers", "2",
                                "--session-sql", "SET bulkjob.tag = 'session-sql-ran'",
                                "--statement-timeout", "5"), env=pg_db.env)
    summary = summary_of(proc)
    assert (summary["done"], proc.returncode) == (20, 0), proc.stderr[-3000:]
    assert pg_db.execute("SELECT COUNT(*), SUM(total) FROM totals") == [(20, 120)]
    assert pg_db.execute("SELECT DISTINCT tag, timeout FROM audit") == [("session-sql-ran", "5s")]
    assert pg_db.execute("SELECT COUNT(*) FROM stage") == [(0,)]
    # The password came from the environment and went nowhere else.
    assert pg_db.server.password not in proc.stdout + proc.stderr + manifest_text(tmp_path)


def test_one_session_per_worker_and_password_file(tmp_path, pg_db):
    pwfile = tmp_path / "db-password"
    pwfile.write_text(pg_db.server.password + "\n")
    write_items(tmp_path / "items.jsonl", [{"id": i} for i in range(20)])
    proc = run_bulkjob(*pg_args(tmp_path, pg_db, "db_handlers:pg_session", "--workers", "2",
                                "--db-password-file", str(pwfile)))
    assert summary_of(proc)["done"] == 20, proc.stderr[-3000:]
    backends = {r["result"]["backend"] for r in latest(tmp_path).values()}
    assert 1 <= len(backends) <= 2


def test_nowait_lock_is_retried_until_released(tmp_path, pg_db):
    pg_db.execute("CREATE TABLE t (k text)")
    holder = pg_db.connect(autocommit=False)
    holder.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
    release = threading.Timer(2.5, holder.commit)
    release.start()
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"k": f"k{i}"}} for i in range(5)])
    handler = steps(tmp_path, "-- step: one\nLOCK TABLE t IN ROW EXCLUSIVE MODE NOWAIT;\nINSERT INTO t VALUES (:k);\n")
    try:
        # DEBUG: each retry is logged with its code at that level.
        proc = run_bulkjob(*pg_args(tmp_path, pg_db, handler, "--max-attempts", "20", "--log-level", "DEBUG"),
                           env=pg_db.env)
    finally:
        release.join()
        holder.close()
    assert summary_of(proc)["done"] == 5, proc.stderr[-3000:]
    assert "55P03" in proc.stderr
    assert pg_db.execute("SELECT COUNT(*) FROM t") == [(5,)]


def test_statement_timeout_is_retried(tmp_path, pg_db):
    pg_db.execute("CREATE SEQUENCE slow_once; CREATE TABLE t (k text)")
    write_items(tmp_path / "items.jsonl", [{"id": 1, "payload": {"k": "a"}}])
    handler = steps(tmp_path, "-- step: one\nINSERT INTO t VALUES (:k);\n"
                              "SELECT pg_sleep(CASE WHEN nextval('slow_once') = 1 THEN 5 ELSE 0 END);\n")
    proc = run_bulkjob(*pg_args(tmp_path, pg_db, handler, "--statement-timeout", "0.5", "--log-level", "DEBUG"),
                       env=pg_db.env)
    assert summary_of(proc)["done"] == 1, proc.stderr[-3000:]
    assert "QueryCanceled 57014" in proc.stderr
    assert pg_db.execute("SELECT k FROM t") == [("a",)]  # the first try was rolled back


def kill_when_sleeping(db, box) -> None:
    """Terminate the first bulkjob backend seen in pg_sleep (within 30 s)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = db.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'bulkjob' "
                          "AND state = 'active' AND query LIKE '%pg_sleep%'")
        if rows:
            box["killed"] = db.execute("SELECT pg_terminate_backend(%s)", (rows[0][0],))[0][0]
            return
        time.sleep(0.05)


def test_backend_killed_mid_item_reconnects_and_retries(tmp_path, pg_db):
    pg_db.execute("CREATE SEQUENCE kill_once; CREATE TABLE log (k text)")
    write_items(tmp_path / "items.jsonl", [{"id": "victim", "payload": {"k": "victim", "sleep": 30}}]
                + [{"id": i, "payload": {"k": f"k{i}", "sleep": 0}} for i in range(6)])
    handler = steps(tmp_path, "-- step: one\nINSERT INTO log VALUES (:k);\n"
                              "SELECT pg_sleep(CASE WHEN :sleep > 0 THEN "
                              "(CASE WHEN nextval('kill_once') = 1 THEN :sleep ELSE 0 END) ELSE 0 END);\n")
    box: dict = {}
    killer = threading.Thread(target=kill_when_sleeping, args=(pg_db, box))
    killer.start()
    proc = run_bulkjob(*pg_args(tmp_path, pg_db, handler, "--workers", "2"), env=pg_db.env)
    killer.join()
    assert box.get("killed") is True
    assert summary_of(proc)["done"] == 7, proc.stderr[-3000:]
    victim = latest(tmp_path)["victim"]
    # A killed session is not the item's fault: the attempt is given back, the item runs again.
    assert victim["attempts"] == 1 and summary_of(proc)["refunded"] >= 1
    # The killed attempt's insert went with its session: one row per item.
    assert pg_db.execute("SELECT COUNT(*), COUNT(DISTINCT k) FROM log") == [(7, 7)]


def test_deadlock_rolls_back_the_whole_item_and_is_retried(tmp_path, pg_db):
    pg_db.execute("CREATE TABLE r (id int PRIMARY KEY, v int); INSERT INTO r VALUES (1, 0), (2, 0)")
    write_items(tmp_path / "items.jsonl", [{"id": "a", "payload": {"first": 1, "second": 2}},
                                           {"id": "b", "payload": {"first": 2, "second": 1}}])
    # After its first update each item waits (up to 10 s) until the other one holds its row too.
    barrier = ("DO $$ BEGIN FOR i IN 1..100 LOOP EXIT WHEN (SELECT COUNT(DISTINCT pid) FROM pg_locks "
               "WHERE relation = 'r'::regclass AND mode = 'RowExclusiveLock') >= 2; PERFORM pg_sleep(0.1); "
               "END LOOP; END $$;\n")
    handler = steps(tmp_path, "-- step: swap\nUPDATE r SET v = v + 1 WHERE id = :first;\n" + barrier
                    + "UPDATE r SET v = v + 1 WHERE id = :second;\n")
    proc = run_bulkjob(*pg_args(tmp_path, pg_db, handler, "--workers", "2", "--prefetch", "1", "--log-level", "DEBUG"),
                       env=pg_db.env)
    assert summary_of(proc)["done"] == 2, proc.stderr[-3000:]
    assert "DeadlockDetected 40P01" in proc.stderr
    # Each item added one to each row exactly once: the deadlocked try was undone.
    assert pg_db.execute("SELECT id, v FROM r ORDER BY id") == [(1, 2), (2, 2)]


def test_permanent_error_fails_at_once_with_sqlstate_in_report(tmp_path, pg_db):
    pg_db.execute("CREATE TABLE log (k text); CREATE TABLE dst (k text PRIMARY KEY); INSERT INTO dst VALUES ('dup')")
    write_items(tmp_path / "items.jsonl", [{"id": k, "payload": {"k": k}} for k in ("a", "dup", "b")])
    handler = steps(tmp_path, "-- step: log\nINSERT INTO log VALUES (:k);\n-- step: load\nINSERT INTO dst VALUES (:k);\n")
    proc = run_bulkjob(*pg_args(tmp_path, pg_db, handler, "--max-attempts", "5", "--max-failures", "1"),
                       env=pg_db.env)
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"], summary["retries"]) == (2, 1, 0), proc.stderr[-3000:]
    report = run_bulkjob("report", "--manifest", str(tmp_path / "state"), "--run-id", "r1", "--format", "csv")
    [row] = list(csv.DictReader(io.StringIO(report.stdout)))
    assert (row["id"], row["attempts"], row["error_kind"], row["error_code"]) == ("dup", "1", "permanent", "23505")
    assert 'duplicate key value violates unique constraint "dst_pkey"' in row["error_message"]
    assert pg_db.execute("SELECT k FROM log ORDER BY k") == [("a",), ("b",)]  # nothing of "dup"


def test_commit_step_resumes_at_the_failing_step(tmp_path, pg_db):
    pg_db.execute("CREATE SEQUENCE die_once; CREATE TABLE log (k text, step text)")
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"k": f"k{i}"}} for i in range(3)])
    handler = steps(tmp_path, "-- step: one\nINSERT INTO log VALUES (:k, 'one');\n"
                              "-- step: two\nSELECT CASE WHEN nextval('die_once') = 1 "
                              "THEN pg_terminate_backend(pg_backend_pid()) END;\n"
                              "INSERT INTO log VALUES (:k, 'two');\n")
    proc = run_bulkjob(*pg_args(tmp_path, pg_db, handler, "--commit", "step"), env=pg_db.env)
    assert summary_of(proc)["done"] == 3, proc.stderr[-3000:]
    [retried] = [r for r in latest(tmp_path).values() if r["result"].get("resumed_after")]
    assert retried["result"]["resumed_after"] == "one"
    assert retried["attempts"] == 1  # the killed session did not cost the item an attempt
    # Step one ran once for every item, the retried one included.
    assert pg_db.execute("SELECT step, COUNT(*) FROM log GROUP BY step ORDER BY step") == [("one", 3), ("two", 3)]


@pytest.mark.parametrize("sql", [
    "INSERT INTO t VALUES (%s, %s)",            # executemany
    "INSERT INTO t (k, v) VALUES (%s, %s)",     # COPY, replayed as INSERTs when a row is bad
])
def test_batch_dml_with_bad_rows(tmp_path, pg_db, sql):
    pg_db.execute("CREATE TABLE t (k int PRIMARY KEY, v int NOT NULL CHECK (v >= 0))")
    rows = [[i, i] for i in range(10)]
    rows[2] = [2, -1]       # check violation
    rows[5] = [5, None]     # not null violation
    rows[8] = [1, 8]        # duplicate key
    write_items(tmp_path / "items.jsonl", [{"id": "batch", "payload": {
        "sql": sql, "rows": rows, "batch_size": 4}}])
    proc = run_bulkjob(*pg_args(tmp_path, pg_db, "db_handlers:batch_insert"), env=pg_db.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = latest(tmp_path)["batch"]["result"]["bad"]
    assert [(b["offset"], b["code"]) for b in bad] == [(2, "23514"), (5, "23502"), (8, "23505")]
    assert pg_db.execute("SELECT array_agg(k ORDER BY k) FROM t") == [([0, 1, 3, 4, 6, 7, 9],)]


def test_an_unreachable_items_database_is_waited_for_then_exits_5(tmp_path):
    from conftest import free_port

    port = free_port()  # nothing listens there
    handler = steps(tmp_path, "-- step: one\nSELECT 1;\n")
    proc = run_bulkjob("run", "--items-sql", "SELECT 1, NULL", "--handler", handler,
                       "--db", f"postgresql://app@127.0.0.1:{port}/app", "--connect-timeout", "2",
                       "--manifest", str(tmp_path / "state"), "--metrics-port", "0", "--outage-timeout", "2")
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert "items-sql" in proc.stderr and "Connection refused" in proc.stderr


# -- transactions in one round trip: pipelined, or a lone statement in autocommit ---------------------

THREE_TABLES = ("CREATE TABLE first (k text); CREATE TABLE second (k text CONSTRAINT second_ok CHECK (k <> 'bad'));"
                "CREATE TABLE third (k text CONSTRAINT third_ok CHECK (k <> 'bad'))")


def test_an_error_in_the_middle_of_a_pipelined_item_rolls_back_all_of_it(tmp_path, pg_db):
    pg_db.execute(THREE_TABLES)
    write_items(tmp_path / "items.jsonl", [{"id": k, "payload": {"k": k}} for k in ("a", "bad", "b")])
    handler = steps(tmp_path, "-- step: one\nINSERT INTO first VALUES (:k);\n-- step: two\nINSERT INTO second VALUES (:k);\n"
                              "-- step: three\nINSERT INTO third VALUES (:k);\n")
    proc = run_bulkjob(*pg_args(tmp_path, pg_db, handler, "--max-failures", "1"), env=pg_db.env)
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"], summary["retries"]) == (2, 1, 0), proc.stderr[-3000:]
    error = latest(tmp_path)["bad"]["error"]
    # Statement 2's error, not statement 3's (which would fail too) nor the pipeline's echo of it.
    assert (error["kind"], error["code"], error["class"]) == ("permanent", "23514", "CheckViolation"), error
    assert '"second_ok"' in error["message"] and "third_ok" not in error["message"]
    # Nothing of the failed item stays, statement 1 included.
    for table in ("first", "second", "third"):
        assert pg_db.execute(f"SELECT array_agg(k ORDER BY k) FROM {table}") == [(["a", "b"],)]


ROWS = """\
-- step: insert
INSERT INTO t SELECT :item, g FROM generate_series(1, 5) g;
-- step: change
UPDATE t SET k = k WHERE item = :item AND k < 0;
DELETE FROM t WHERE item = :item AND k <= 2;
-- step: read
SELECT 1;
"""


@pytest.mark.parametrize("text, commit, rows", [
    (ROWS, "item", 5 + 0 + 2 + 1),     # one pipeline
    (ROWS, "step", 5 + 0 + 2 + 1),     # a lone statement, a pipeline of two, a lone query
    (ROWS.split("-- step: change")[0], "item", 5),   # a lone statement
])
def test_rowcounts_of_every_path(tmp_path, pg_db, text, commit, rows):
    pg_db.execute("CREATE TABLE t (item text, k int)")
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"item": f"i{i}"}} for i in range(4)])
    proc = run_bulkjob(*pg_args(tmp_path, pg_db, steps(tmp_path, text), "--commit", commit), env=pg_db.env)
    assert summary_of(proc)["done"] == 4, proc.stderr[-3000:]
    assert {r["result"]["rows"] for r in latest(tmp_path).values()} == {rows}


def test_commit_step_resumes_at_the_step_whose_statement_failed(tmp_path, pg_db):
    pg_db.execute("CREATE SEQUENCE fail_once; CREATE TABLE log (k text, step text)")
    write_items(tmp_path / "items.jsonl", [{"id": "x", "payload": {"k": "x"}}])
    handler = steps(tmp_path, "-- step: one\nINSERT INTO log VALUES (:k, 'one');\n"
                              "-- step: two\nINSERT INTO log VALUES (:k, 'two');\n"
                              "SELECT 1 / (nextval('fail_once') - 1);\n"
                              "-- step: three\nINSERT INTO log VALUES (:k, 'three');\n")
    # Division by zero (22012) made retryable: the item runs again within the run.
    proc = run_bulkjob(*pg_args(tmp_path, pg_db, handler, "--commit", "step", "--retry-on", "22012"), env=pg_db.env)
    assert summary_of(proc)["done"] == 1, proc.stderr[-3000:]
    record = latest(tmp_path)["x"]
    assert (record["attempts"], record["result"]["resumed_after"], record["result"]["steps"]) == (2, "one", 2)
    # Step one once; the failed attempt's row of step two was rolled back with its step.
    assert pg_db.execute("SELECT step, COUNT(*) FROM log GROUP BY step ORDER BY step") == [
        ("one", 1), ("three", 1), ("two", 1)]


def test_a_session_killed_mid_pipeline_is_an_outage(tmp_path, pg_db):
    pg_db.execute("CREATE SEQUENCE kill_once; CREATE TABLE first (k text); CREATE TABLE third (k text)")
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"k": f"k{i}"}} for i in range(5)])
    handler = steps(tmp_path, "-- step: one\nINSERT INTO first VALUES (:k);\n"
                              "-- step: two\nSELECT CASE WHEN nextval('kill_once') = 1 "
                              "THEN pg_terminate_backend(pg_backend_pid()) END;\n"
                              "-- step: three\nINSERT INTO third VALUES (:k);\n")
    proc = run_bulkjob(*pg_args(tmp_path, pg_db, handler), env=pg_db.env)
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"], summary["attempts"]) == (5, 0, 5), proc.stderr[-3000:]
    assert summary["refunded"] == 1  # the attempt given back: not the item's fault
    assert {r["attempts"] for r in latest(tmp_path).values()} == {1}
    # The killed attempt's first statement went with its session: one row per item in each table.
    for table in ("first", "third"):
        assert pg_db.execute(f"SELECT COUNT(*), COUNT(DISTINCT k) FROM {table}") == [(5, 5)]


@pytest.mark.parametrize("text", [
    "-- step: one\nINSERT INTO child VALUES (:k);\n",                                # a lone statement
    "-- step: one\nINSERT INTO log VALUES (:k);\nINSERT INTO child VALUES (:k);\n",  # a pipeline
])
def test_a_deferred_constraint_that_fails_at_commit_fails_the_item(tmp_path, pg_db, text):
    pg_db.execute("CREATE TABLE parent (k text PRIMARY KEY); INSERT INTO parent VALUES ('ok'); CREATE TABLE log (k text);"
                  "CREATE TABLE child (k text CONSTRAINT child_fk REFERENCES parent DEFERRABLE INITIALLY DEFERRED)")
    write_items(tmp_path / "items.jsonl", [{"id": k, "payload": {"k": k}} for k in ("ok", "orphan")])
    proc = run_bulkjob(*pg_args(tmp_path, pg_db, steps(tmp_path, text), "--max-failures", "1"), env=pg_db.env)
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"], summary["retries"]) == (1, 1, 0), proc.stderr[-3000:]
    error = latest(tmp_path)["orphan"]["error"]
    assert (error["kind"], error["code"]) == ("permanent", "23503") and "child_fk" in error["message"]
    assert pg_db.execute("SELECT (SELECT array_agg(k) FROM child), (SELECT count(*) FROM log WHERE k = 'orphan')") == [
        (["ok"], 0)]


@pytest.mark.parametrize("sql, code", [
    ("LOCK TABLE t IN SHARE MODE", None),   # needs a transaction block: alone in autocommit it would fail
    ("VACUUM t", "25001"),                  # refuses one: alone in autocommit it would run
])
def test_statements_that_need_or_refuse_a_transaction_block_still_get_one(tmp_path, pg_db, sql, code):
    pg_db.execute("CREATE TABLE t (k int)")
    write_items(tmp_path / "items.jsonl", [{"id": "x"}])
    proc = run_bulkjob(*pg_args(tmp_path, pg_db, steps(tmp_path, f"-- step: one\n{sql};\n")), env=pg_db.env)
    record = latest(tmp_path)["x"]
    if code is None:
        assert record["state"] == "done", proc.stderr[-3000:]
    else:
        assert (record["state"], record["error"]["code"]) == ("failed", code), record


def test_a_session_lost_just_after_commit_answered_is_no_failure(pg_db):
    """The transaction committed and its COMMIT was answered; the session died before the Sync's
    ReadyForQuery. Reporting that as a failure would run the item again (a second commit): the
    pipelined transaction is reported done, and the lost session is found unusable."""
    import psycopg

    from job.db import postgres

    pg_db.execute("CREATE TABLE ledger (k text)")
    proxy = CutAfterAnswer(pg_db.server.port)
    conninfo = pg_db.server.conninfo(pg_db.name).replace(f"port={pg_db.server.port}", f"port={proxy.port}")
    conn = psycopg.connect(conninfo + " sslmode=disable gssencmode=disable")
    proxy.armed.set()
    rows = postgres.run_transaction(conn, [("INSERT INTO ledger VALUES ('a')", None),
                                           ("INSERT INTO ledger VALUES ('b')", None)])
    assert proxy.cut.is_set()  # the cut did happen where it should
    assert rows == 2
    assert pg_db.execute("SELECT k FROM ledger ORDER BY k") == [("a",), ("b",)]
    assert not postgres.usable(conn)  # closed: the next item opens a new session
