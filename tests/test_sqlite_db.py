"""The database path end to end on SQLite (no server): the demo, locking, bad input, both
commit modes, items from a query and from a work table, batch DML with bad rows."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest
from conftest import run_bulkjob, summary_of, write_items

from job.db.worktable import DDL
from job.demo import BAD_TARGET, create
from job.manifest import ShardManifest
from job.store import LocalStore


def run_args(tmp_path, db, handler, *extra, run_id="r1", items=True):
    source = ("--items", str(tmp_path / "items.jsonl")) if items else ()
    return ("run", *source, "--handler", handler, "--db", f"sqlite:///{db}",
            "--manifest", str(tmp_path / "state"), "--run-id", run_id, "--metrics-port", "0",
            "--backoff", "0.1", "--max-backoff", "0.5", *extra)


def latest(tmp_path, run_id="r1"):
    return ShardManifest(LocalStore(tmp_path / "state"), "", run_id, 0, 1).load().latest()


def make_db(path, script: str):
    conn = sqlite3.connect(path)
    conn.executescript("PRAGMA journal_mode = WAL;\n" + script)
    conn.commit()
    conn.close()
    return path


def query(path, sql, params=()):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def test_demo_loads_every_item_and_refuses_the_bad_identifier(tmp_path):
    db = tmp_path / "demo.db"
    (tmp_path / "items.jsonl").write_text("".join(line + "\n" for line in create(str(db), 300)))
    proc = run_bulkjob(*run_args(tmp_path, db, "sql:job/demo/load.sql", "--workers", "2"))
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"], proc.returncode) == (299, 1, 1), proc.stderr[-2000:]
    [failed] = [r for r in latest(tmp_path).values() if r["state"] == "failed"]
    assert failed["error"]["code"] == "SQL-IDENTIFIER" and failed["attempts"] == 1
    assert query(db, "SELECT COUNT(*) FROM daily_totals") == [(299,)]
    assert query(db, "SELECT COUNT(*) FROM stage_sales") == [(0,)]
    assert query(db, "SELECT COUNT(*) FROM raw_sales")[0][0] > 0  # BAD_TARGET dropped nothing
    done = latest(tmp_path)[next(iter(latest(tmp_path)))]
    assert done["result"] == {"steps": 3, "rows": done["result"]["rows"]}
    assert BAD_TARGET not in proc.stdout


def test_locked_database_is_retried_until_released(tmp_path):
    db = make_db(tmp_path / "x.db", "CREATE TABLE t (k TEXT PRIMARY KEY);")
    (tmp_path / "s.sql").write_text("-- step: one\nINSERT INTO t VALUES (:k);\n")
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"k": f"k{i}"}} for i in range(10)])
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(2.0, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        proc = run_bulkjob(*run_args(tmp_path, db, f"sql:{tmp_path / 's.sql'}", "--statement-timeout", "0.2",
                                     "--max-attempts", "10", "--workers", "2"))
    finally:
        release.join()
        holder.close()
    summary = summary_of(proc)
    assert summary["done"] == 10 and proc.returncode == 0, proc.stderr[-2000:]
    assert summary["retries"] >= 1  # SQLITE_BUSY: retried by the run, not waited out in a worker
    assert query(db, "SELECT COUNT(*) FROM t") == [(10,)]


BAD_INPUT_STEPS = """\
-- allow target: dst
-- step: log
INSERT INTO log (k) VALUES (:k);
-- step: load
INSERT INTO {target} (k) VALUES (:k);
"""


def bad_input_setup(tmp_path):
    db = make_db(tmp_path / "x.db", "CREATE TABLE log (k TEXT); CREATE TABLE dst (k TEXT); CREATE TABLE x (v INT);")
    (tmp_path / "s.sql").write_text(BAD_INPUT_STEPS)
    write_items(tmp_path / "items.jsonl", [
        {"id": "ok", "payload": {"k": "a", "target": "dst"}},
        {"id": "no-bind", "payload": {"target": "dst"}},
        {"id": "injection", "payload": {"k": "c", "target": "t; DROP TABLE x"}},
    ])
    return db


def test_bad_input_fails_the_item_at_once_with_nothing_committed(tmp_path):
    db = bad_input_setup(tmp_path)
    proc = run_bulkjob(*run_args(tmp_path, db, f"sql:{tmp_path / 's.sql'}", "--max-failures", "5"))
    assert summary_of(proc)["done"] == 1, proc.stderr[-2000:]
    records = latest(tmp_path)
    assert records["no-bind"]["error"]["code"] == "SQL-BIND" and ":k" in records["no-bind"]["error"]["message"]
    assert records["injection"]["error"]["code"] == "SQL-IDENTIFIER"
    assert records["injection"]["error"]["kind"] == records["no-bind"]["error"]["kind"] == "invalid"
    assert records["injection"]["attempts"] == records["no-bind"]["attempts"] == 1
    assert query(db, "SELECT k FROM log") == [("a",)]
    assert query(db, "SELECT COUNT(*) FROM x") == [(0,)]  # the table is still there


def test_dry_run_refuses_unsafe_identifiers_with_exit_2(tmp_path):
    db = bad_input_setup(tmp_path)
    proc = run_bulkjob(*run_args(tmp_path, db, f"sql:{tmp_path / 's.sql'}", "--dry-run"))
    assert proc.returncode == 2
    assert "item injection: {target}: 't; DROP TABLE x' is not a plain name" in proc.stderr
    assert "item no-bind: :k: the payload has no 'k'" in proc.stderr
    assert query(db, "SELECT COUNT(*) FROM log") == [(0,)]


@pytest.mark.parametrize("text, message", [
    ("", "the steps file is empty"),
    ("-- step: a\nINSERT INTO log VALUES ('x;\n", "s.sql:2: unterminated ' quote"),
])
def test_bad_steps_file_is_a_usage_error(tmp_path, text, message):
    db = bad_input_setup(tmp_path)
    (tmp_path / "s.sql").write_text(text)
    proc = run_bulkjob(*run_args(tmp_path, db, f"sql:{tmp_path / 's.sql'}"))
    assert proc.returncode == 2 and message in proc.stderr


def test_sql_syntax_error_in_a_step_rolls_back_the_whole_item(tmp_path):
    db = bad_input_setup(tmp_path)
    (tmp_path / "s.sql").write_text("-- step: log\nINSERT INTO log (k) VALUES (:k);\n"
                                    "-- step: broken\nINSERT INTO dst (k) VALUS (:k);\n")
    proc = run_bulkjob(*run_args(tmp_path, db, f"sql:{tmp_path / 's.sql'}", "--max-failures", "5"))
    assert summary_of(proc)["failed"] == 3
    error = latest(tmp_path)["ok"]["error"]
    assert error["code"] == "SQLITE_ERROR" and "syntax error" in error["message"]
    assert query(db, "SELECT COUNT(*) FROM log") == [(0,)]


def test_commit_step_resumes_at_the_failed_step(tmp_path):
    db = make_db(tmp_path / "x.db", "CREATE TABLE log (k TEXT, step TEXT);")
    (tmp_path / "s.sql").write_text("-- step: one\nINSERT INTO log VALUES (:k, 'one');\n"
                                    "-- step: two\nINSERT INTO log SELECT :k, 'two' FROM gate;\n")
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"k": f"k{i}"}} for i in range(4)])
    handler = f"sql:{tmp_path / 's.sql'}"
    first = run_bulkjob(*run_args(tmp_path, db, handler, "--commit", "step", "--max-failures", "10"))
    assert summary_of(first)["failed"] == 4
    assert all(r["progress"] == {"step": "one"} for r in latest(tmp_path).values())
    make_db(db, "CREATE TABLE gate (x INT); INSERT INTO gate VALUES (1);")
    second = run_bulkjob(*run_args(tmp_path, db, handler, "--commit", "step", "--retry-failed"))
    assert summary_of(second)["done"] == 4 and second.returncode == 0, second.stderr[-2000:]
    assert {r["result"]["resumed_after"] for r in latest(tmp_path).values()} == {"one"}
    # Step one committed once per item: the retry did not run it again.
    assert query(db, "SELECT step, COUNT(*) FROM log GROUP BY step ORDER BY step") == [("one", 4), ("two", 4)]


def test_items_sql(tmp_path):
    db = make_db(tmp_path / "x.db", "CREATE TABLE jobs (id INTEGER, payload TEXT); CREATE TABLE out (k TEXT);"
                 "INSERT INTO jobs VALUES (1, '{\"k\": \"a\"}'), (2, '{\"k\": \"b\"}'), (3, NULL);")
    (tmp_path / "s.sql").write_text("-- step: one\nINSERT INTO out VALUES (COALESCE(:k, 'none'));\n")
    proc = run_bulkjob(*run_args(tmp_path, db, f"sql:{tmp_path / 's.sql'}", "--items-sql",
                                 "SELECT id, payload FROM jobs", "--max-failures", "5", items=False))
    summary = summary_of(proc)
    assert (summary["total"], summary["done"], summary["failed"]) == (3, 2, 1), proc.stderr[-2000:]
    assert latest(tmp_path)["3"]["error"]["code"] == "SQL-BIND"
    assert sorted(query(db, "SELECT k FROM out")) == [("a",), ("b",)]


def test_work_table_states_written_back(tmp_path):
    db = make_db(tmp_path / "x.db", DDL["sqlite"] + "CREATE TABLE out (k TEXT PRIMARY KEY CHECK (k <> 'bad'));")
    rows = [(f"w{i:02d}", "PENDING", json.dumps({"k": f"k{i}"})) for i in range(20)]
    rows += [("w-bad", "PENDING", json.dumps({"k": "bad"})),     # CHECK violation: ERR
             ("w-done", "DONE", json.dumps({"k": "done"})),     # not claimed
             ("w-err", "ERR", json.dumps({"k": "retry-me"}))]   # not claimed: set it PENDING to run it
    conn = sqlite3.connect(db)
    conn.executemany("INSERT INTO bulk_work (work_id, state, payload, updated_at) VALUES (?, ?, ?, '2000-01-01')", rows)
    conn.commit()
    conn.close()
    (tmp_path / "s.sql").write_text("-- step: one\nINSERT INTO out VALUES (:k);\n")
    argv = ("run", "--work-table", "bulk_work", "--handler", f"sql:{tmp_path / 's.sql'}", "--db", f"sqlite:///{db}",
            "--metrics-port", "0", "--max-failures", "5")
    proc = run_bulkjob(*argv)
    summary = summary_of(proc)
    assert (summary["total"], summary["done"], summary["failed"]) == (21, 20, 1), proc.stderr[-2000:]
    states = dict(query(db, "SELECT work_id, state FROM bulk_work"))
    assert states.pop("w-bad") == "ERR" and states.pop("w-err") == "ERR" and states.pop("w-done") == "DONE"
    assert set(states.values()) == {"DONE"}
    [(error, attempts)] = query(db, "SELECT error, attempts FROM bulk_work WHERE work_id = 'w-bad'")
    assert error.startswith("SQLITE_CONSTRAINT_CHECK IntegrityError: CHECK constraint failed") and attempts == 1
    assert query(db, "SELECT COUNT(*) FROM bulk_work WHERE updated_at = '2000-01-01'") == [(2,)]
    assert query(db, "SELECT COUNT(*) FROM bulk_work WHERE state = 'DONE' AND attempts = 1") == [(20,)]
    # What the refusal of --retry-failed says to do instead: the ERR rows run again.
    conn = sqlite3.connect(db)
    conn.execute("UPDATE bulk_work SET state = 'PENDING', attempts = 0 WHERE state = 'ERR'")
    conn.commit()
    conn.close()
    again = run_bulkjob(*argv)
    summary = summary_of(again)
    assert (summary["total"], summary["done"], summary["failed"]) == (2, 1, 1)  # w-err runs now; w-bad fails again
    assert dict(query(db, "SELECT work_id, state FROM bulk_work WHERE work_id IN ('w-err', 'w-bad')")) == {
        "w-err": "DONE", "w-bad": "ERR"}


def test_executemany_reports_bad_rows_and_keeps_good_ones(tmp_path):
    db = make_db(tmp_path / "x.db", "CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER NOT NULL CHECK (v >= 0));")
    rows = [[i, -1 if i in (3, 7, 12) else i] for i in range(15)]
    write_items(tmp_path / "items.jsonl", [{"id": "batch", "payload": {
        "sql": "INSERT INTO t VALUES (?, ?)", "rows": rows, "batch_size": 5}}])
    proc = run_bulkjob(*run_args(tmp_path, db, "db_handlers:batch_insert"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    bad = latest(tmp_path)["batch"]["result"]["bad"]
    assert [(b["offset"], b["code"]) for b in bad] == [(3, "SQLITE_CONSTRAINT_CHECK"), (7, "SQLITE_CONSTRAINT_CHECK"),
                                                       (12, "SQLITE_CONSTRAINT_CHECK")]
    assert query(db, "SELECT COUNT(*) FROM t") == [(12,)]



def test_session_sql_from_the_environment_is_one_statement_a_line(tmp_path):
    db = make_db(tmp_path / "x.db", "CREATE TABLE out (v TEXT, n INT);")
    (tmp_path / "s.sql").write_text("-- step: one\nINSERT INTO out SELECT v, n FROM tag, tag2;\n")
    write_items(tmp_path / "items.jsonl", [{"id": 1}])
    env = {"BULKJOB_SESSION_SQL": "CREATE TEMP VIEW tag AS SELECT 'a b c' AS v\n\n"
                                  "CREATE TEMP VIEW tag2 AS SELECT 2 AS n\n"}
    proc = run_bulkjob(*run_args(tmp_path, db, f"sql:{tmp_path / 's.sql'}"), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert query(db, "SELECT v, n FROM out") == [("a b c", 2)]


def test_in_transaction_and_connect_failed(tmp_path):
    from job.db import Database, parse_db_url

    path = tmp_path / "x.db"
    database = Database(parse_db_url(f"sqlite:///{path}"))
    assert database.in_transaction() is False and database.connect_failed is False  # no session yet
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file"):
        database.connection()
    assert database.connect_failed  # it failed while opening the session
    make_db(path, "CREATE TABLE t (k INT);")
    conn = database.connection()
    assert database.connect_failed is False
    conn.execute("SELECT * FROM t").fetchall()
    assert database.in_transaction() is False  # a read leaves nothing to commit
    conn.execute("INSERT INTO t VALUES (1)")
    assert database.in_transaction() is True
    conn.commit()
    assert database.in_transaction() is False
    conn.execute("INSERT INTO t VALUES (2)")
    database.discard()  # closing drops the uncommitted row
    assert database.in_transaction() is False
    assert query(path, "SELECT k FROM t") == [(1,)]


@pytest.mark.parametrize("error, width, expected", [
    ({"code": "ORA-00001", "class": "IntegrityError", "message": "unique constraint violated"}, None,
     "ORA-00001 IntegrityError: unique constraint violated"),
    ({"code": "ORA-00001", "class": "IntegrityError", "message": "unique constraint violated"}, 20,
     "ORA-00001 IntegrityE"),
    # A column that counts bytes (VARCHAR2(12) BYTE) gets no more than 12 bytes of UTF-8, and no
    # half character.
    ({"class": "E", "message": "évènement"}, 12, "E: évèneme"),
    ({"class": "E", "message": "évènement"}, 4, "E: "),
    ({"message": "x" * 5000}, None, "x" * 1000),
    (None, 10, None),
])
def test_error_text_fits_the_column(error, width, expected):
    from job.db.worktable import error_text

    text = error_text(error, width)
    assert text == expected
    if text is not None and width is not None:
        assert len(text.encode("utf-8")) <= width
