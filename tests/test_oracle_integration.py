"""The PostgreSQL scenarios against a real Oracle Database, when one is given, and what Oracle's
own users meet (a refused login, reserved-word binds, deadlocks, TLS, killed sessions, a narrow
error column, WITH FUNCTION and labelled blocks, PL/SQL in ctx.executemany):

    BULKJOB_TEST_ORACLE_URL=oracle://system@localhost:1521/FREEPDB1 \
    BULKJOB_TEST_ORACLE_PASSWORD=... .venv/bin/python -m pytest tests/test_oracle_integration.py

The user needs CREATE TABLE, CREATE SEQUENCE and ALTER SYSTEM (to kill a session): SYSTEM of an
Oracle Database Free container has them (docs/databases.md has the recipe). Every object is
created with a per-test prefix and dropped afterwards. Skipped when the URL is not set. The TLS
case runs when BULKJOB_TEST_ORACLE_TCPS_URL names a TCPS listener of the same database (with
its wallet_location, and BULKJOB_DB_WALLET_PASSWORD for an encrypted wallet).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import threading
import time

import pytest
from conftest import run_bulkjob, start_bulkjob, summary_of, write_items

from job.db import parse_db_url
from job.db.worktable import DDL
from job.manifest import ShardManifest
from job.store import LocalStore

URL = os.environ.get("BULKJOB_TEST_ORACLE_URL")
PASSWORD = os.environ.get("BULKJOB_TEST_ORACLE_PASSWORD", "")
TCPS_URL = os.environ.get("BULKJOB_TEST_ORACLE_TCPS_URL")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not URL, reason="set BULKJOB_TEST_ORACLE_URL (and _PASSWORD) to run")]


class Oracle:
    """A direct session for set-up and checks, and a prefix that keeps each test's objects apart."""

    def __init__(self) -> None:
        import oracledb

        settings = parse_db_url(URL)
        self.conn = oracledb.connect(user=settings.user, password=PASSWORD,
                                     dsn=f"{settings.host}:{settings.port}/{settings.database}")
        self.prefix = f"BJ{secrets.token_hex(3).upper()}_"
        self.env = {"BULKJOB_DB_PASSWORD": PASSWORD}
        self.objects: list[tuple[str, str]] = []

    def name(self, short: str) -> str:
        return self.prefix + short.upper()

    def create(self, kind: str, short: str, ddl: str) -> str:
        """Run `ddl` with {name} filled in; remember the object to drop it."""
        name = self.name(short)
        self.execute(ddl.format(name=name))
        self.objects.append((kind, name))
        return name

    def execute(self, sql: str, params=None) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params or {})
            rows = cur.fetchall() if cur.description else []
        self.conn.commit()
        return rows

    def close(self) -> None:
        for kind, name in reversed(self.objects):
            try:
                self.execute(f"DROP {kind} {name}" + (" PURGE" if kind == "TABLE" else ""))
            except Exception:
                pass
        self.conn.close()


@pytest.fixture
def ora():
    db = Oracle()
    yield db
    db.close()


def args(tmp_path, handler, *extra, run_id="r1", items=True):
    source = ("--items", str(tmp_path / "items.jsonl")) if items else ()
    return ("run", *source, "--handler", handler, "--db", URL, "--manifest", str(tmp_path / "state"),
            "--run-id", run_id, "--metrics-port", "0", "--backoff", "0.5", "--max-backoff", "2", *extra)


def steps(tmp_path, text: str, **names: str) -> str:
    """A steps file declaring each {placeholder} with the one object name it may take."""
    declarations = "".join(f"-- allow {key}: {name}\n" for key, name in names.items())
    (tmp_path / "steps.sql").write_text(declarations + text)
    return f"sql:{tmp_path / 'steps.sql'}"


def latest(tmp_path, run_id="r1"):
    return ShardManifest(LocalStore(tmp_path / "state"), "", run_id, 0, 1).load().latest()


LOAD = """\
-- step: stage
DELETE FROM {stage} WHERE k = :k;
INSERT INTO {stage} (k, v) SELECT k, v FROM {src} WHERE k = :k;
-- step: aggregate
MERGE INTO {totals} t
USING (SELECT k, SUM(v) AS total FROM {stage} WHERE k = :k GROUP BY k) s ON (t.k = s.k)
WHEN MATCHED THEN UPDATE SET t.total = s.total
WHEN NOT MATCHED THEN INSERT (k, total) VALUES (s.k, s.total);
-- step: audit
BEGIN
  INSERT INTO {audit} (k, fmt)
  SELECT :k, value FROM nls_session_parameters WHERE parameter = 'NLS_DATE_FORMAT';
  DELETE FROM {stage} WHERE k = :k;
END;
/
"""


@pytest.mark.parametrize("commit", ["item", "step"])
def test_steps_end_to_end(tmp_path, ora, commit):
    names = {short: ora.create("TABLE", short, ddl) for short, ddl in {
        "src": "CREATE TABLE {name} (k VARCHAR2(20), v NUMBER)",
        "stage": "CREATE TABLE {name} (k VARCHAR2(20), v NUMBER)",
        "totals": "CREATE TABLE {name} (k VARCHAR2(20) PRIMARY KEY, total NUMBER)",
        "audit": "CREATE TABLE {name} (k VARCHAR2(20), fmt VARCHAR2(40))"}.items()}
    for i in range(1, 11):
        for v in (1, 2, 3):
            ora.execute(f"INSERT INTO {names['src']} VALUES (:1, :2)", [f"k{i}", v])
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"k": f"k{i}", **names}} for i in range(1, 11)])
    proc = run_bulkjob(*args(tmp_path, steps(tmp_path, LOAD, **names), "--commit", commit, "--workers", "2",
                             "--session-sql", "ALTER SESSION SET NLS_DATE_FORMAT = 'YYYY-MM-DD'",
                             "--statement-timeout", "30"), env=ora.env)
    assert summary_of(proc)["done"] == 10, proc.stderr[-3000:]
    assert ora.execute(f"SELECT COUNT(*), SUM(total) FROM {names['totals']}") == [(10, 60)]
    assert ora.execute(f"SELECT DISTINCT fmt FROM {names['audit']}") == [("YYYY-MM-DD",)]


def test_nowait_lock_is_retried_until_released(tmp_path, ora):
    t = ora.create("TABLE", "t", "CREATE TABLE {name} (k VARCHAR2(20))")
    import oracledb

    settings = parse_db_url(URL)
    holder = oracledb.connect(user=settings.user, password=PASSWORD,
                              dsn=f"{settings.host}:{settings.port}/{settings.database}")
    holder.cursor().execute(f"LOCK TABLE {t} IN EXCLUSIVE MODE")
    release = threading.Timer(3.0, holder.rollback)
    release.start()
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"k": f"k{i}", "t": t}} for i in range(5)])
    handler = steps(tmp_path, "-- step: one\nLOCK TABLE {t} IN ROW EXCLUSIVE MODE NOWAIT;\nINSERT INTO {t} VALUES (:k);\n",
                    t=t)
    try:
        proc = run_bulkjob(*args(tmp_path, handler, "--max-attempts", "20", "--log-level", "DEBUG"), env=ora.env)
    finally:
        release.join()
        holder.close()
    assert summary_of(proc)["done"] == 5, proc.stderr[-3000:]
    assert "ORA-00054" in proc.stderr
    assert ora.execute(f"SELECT COUNT(*) FROM {t}") == [(5,)]


def kill_when_sleeping(ora: Oracle, box: dict) -> None:
    """Kill the first other session of this user found in DBMS_SESSION.SLEEP (within 60 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = ora.execute("SELECT s.sid, s.serial# FROM v$session s JOIN v$sql q ON q.sql_id = s.sql_id "
                           "WHERE s.username = USER AND s.sid <> SYS_CONTEXT('USERENV', 'SID') "
                           "AND s.status = 'ACTIVE' AND q.sql_text LIKE '%DBMS_SESSION.SLEEP%' "
                           "AND q.sql_text NOT LIKE '%v$session%'")
        if rows:
            sid, serial = rows[0]
            ora.execute(f"ALTER SYSTEM KILL SESSION '{sid},{serial}' IMMEDIATE")
            box["killed"] = True
            return
        time.sleep(0.1)


SLEEP_ONCE = ("BEGIN\n  IF :sleep > 0 AND {seq}.NEXTVAL = 1 THEN DBMS_SESSION.SLEEP(:sleep); END IF;\nEND;\n/\n")


def test_killed_session_reconnects_and_retries(tmp_path, ora):
    log = ora.create("TABLE", "log", "CREATE TABLE {name} (k VARCHAR2(20))")
    seq = ora.create("SEQUENCE", "seq", "CREATE SEQUENCE {name}")
    names = {"log": log, "seq": seq}
    write_items(tmp_path / "items.jsonl", [{"id": "victim", "payload": {"k": "victim", "sleep": 30, **names}}]
                + [{"id": i, "payload": {"k": f"k{i}", "sleep": 0, **names}} for i in range(4)])
    handler = steps(tmp_path, "-- step: one\nINSERT INTO {log} VALUES (:k);\n" + SLEEP_ONCE, **names)
    box: dict = {}
    killer = threading.Thread(target=kill_when_sleeping, args=(ora, box))
    killer.start()
    proc = run_bulkjob(*args(tmp_path, handler, "--workers", "2", "--log-level", "DEBUG"), env=ora.env)
    killer.join()
    assert box.get("killed")
    summary = summary_of(proc)
    assert summary["done"] == 5, proc.stderr[-3000:]
    # A killed session is an outage, not the item's fault: the attempt is given back.
    assert latest(tmp_path)["victim"]["attempts"] == 1 and summary["refunded"] >= 1 and "DPY-4011" in proc.stderr
    assert ora.execute(f"SELECT COUNT(*), COUNT(DISTINCT k) FROM {log}") == [(5, 5)]


def test_deadlock_rolls_back_the_whole_item_and_is_retried(tmp_path, ora):
    r = ora.create("TABLE", "r", "CREATE TABLE {name} (id NUMBER PRIMARY KEY, v NUMBER)")
    ora.execute(f"INSERT INTO {r} VALUES (1, 0)")
    ora.execute(f"INSERT INTO {r} VALUES (2, 0)")
    write_items(tmp_path / "items.jsonl", [{"id": "a", "payload": {"first": 1, "second": 2, "r": r}},
                                           {"id": "b", "payload": {"first": 2, "second": 1, "r": r}}])
    # ORA-00060 rolls back only the statement; the waiter stays queued on the whole transaction,
    # so the item's transaction is rolled back before it runs again.
    handler = steps(tmp_path, "-- step: swap\nUPDATE {r} SET v = v + 1 WHERE id = :first;\n"
                              "BEGIN DBMS_SESSION.SLEEP(2); END;\n/\nUPDATE {r} SET v = v + 1 WHERE id = :second;\n", r=r)
    proc = run_bulkjob(*args(tmp_path, handler, "--workers", "2", "--prefetch", "1", "--log-level", "DEBUG"),
                       env=ora.env)
    assert summary_of(proc)["done"] == 2, proc.stderr[-3000:]
    assert "ORA-00060" in proc.stderr
    assert ora.execute(f"SELECT id, v FROM {r} ORDER BY id") == [(1, 2), (2, 2)]


def test_permanent_error_fails_at_once_with_code_in_report(tmp_path, ora):
    log = ora.create("TABLE", "log", "CREATE TABLE {name} (k VARCHAR2(20))")
    dst = ora.create("TABLE", "dst", "CREATE TABLE {name} (k VARCHAR2(20) PRIMARY KEY)")
    ora.execute(f"INSERT INTO {dst} VALUES ('dup')")
    write_items(tmp_path / "items.jsonl", [{"id": k, "payload": {"k": k, "log": log, "dst": dst}} for k in ("a", "dup")])
    handler = steps(tmp_path, "-- step: log\nINSERT INTO {log} VALUES (:k);\n-- step: load\nINSERT INTO {dst} VALUES (:k);\n",
                    log=log, dst=dst)
    proc = run_bulkjob(*args(tmp_path, handler, "--max-attempts", "5", "--max-failures", "1"), env=ora.env)
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"], summary["retries"]) == (1, 1, 0), proc.stderr[-3000:]
    assert latest(tmp_path)["dup"]["error"]["code"] == "ORA-00001"
    assert ora.execute(f"SELECT k FROM {log}") == [("a",)]


def test_commit_step_resumes_at_the_failing_step(tmp_path, ora):
    log = ora.create("TABLE", "log", "CREATE TABLE {name} (k VARCHAR2(20), step VARCHAR2(10))")
    seq = ora.create("SEQUENCE", "seq", "CREATE SEQUENCE {name}")
    write_items(tmp_path / "items.jsonl", [{"id": "victim", "payload": {"k": "victim", "sleep": 30, "log": log,
                                                                         "seq": seq}}])
    handler = steps(tmp_path, "-- step: one\nINSERT INTO {log} VALUES (:k, 'one');\n-- step: two\n" + SLEEP_ONCE
                    + "INSERT INTO {log} VALUES (:k, 'two');\n", log=log, seq=seq)
    box: dict = {}
    killer = threading.Thread(target=kill_when_sleeping, args=(ora, box))
    killer.start()
    proc = run_bulkjob(*args(tmp_path, handler, "--commit", "step"), env=ora.env)
    killer.join()
    assert summary_of(proc)["done"] == 1, proc.stderr[-3000:]
    assert latest(tmp_path)["victim"]["result"]["resumed_after"] == "one"
    assert ora.execute(f"SELECT step, COUNT(*) FROM {log} GROUP BY step ORDER BY step") == [("one", 1), ("two", 1)]


#: The session's own count of round trips, read by the item's first statement.
ROUND_TRIPS = ("INSERT INTO {rt} (k, n) SELECT :k, s.value FROM v$mystat s JOIN v$statname n "
               "ON n.statistic# = s.statistic# WHERE n.name = 'SQL*Net roundtrips to/from client';\n")


@pytest.mark.parametrize("commit, text", [
    ("item", "-- step: one\n" + ROUND_TRIPS + "INSERT INTO {log} VALUES (:k);\n"),
    ("step", "-- step: one\n" + ROUND_TRIPS + "-- step: two\nINSERT INTO {log} VALUES (:k);\n"),
])
def test_the_commit_travels_with_the_last_statement(tmp_path, ora, commit, text):
    rt = ora.create("TABLE", "rt", "CREATE TABLE {name} (k VARCHAR2(20), n NUMBER)")
    log = ora.create("TABLE", "log", "CREATE TABLE {name} (k VARCHAR2(20))")
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"k": f"k{i}", "rt": rt, "log": log}} for i in range(6)])
    proc = run_bulkjob(*args(tmp_path, steps(tmp_path, text, rt=rt, log=log), "--commit", commit, "--workers", "1"),
                       env=ora.env)
    assert summary_of(proc)["done"] == 6, proc.stderr[-3000:]
    counts = [n for (n,) in ora.execute(f"SELECT n FROM {rt} ORDER BY n")]
    # Two statements, two round trips per item: each commit went with a statement's execute (it
    # would be three with a commit call of its own, four with --commit step).
    assert [b - a for a, b in itertools.pairwise(counts)] == [2] * 5
    assert ora.execute(f"SELECT COUNT(*) FROM {log}") == [(6,)]


def test_batch_errors(tmp_path, ora):
    t = ora.create("TABLE", "t", "CREATE TABLE {name} (k NUMBER PRIMARY KEY, v NUMBER NOT NULL CHECK (v >= 0))")
    rows = [[i, i] for i in range(10)]
    rows[2], rows[5], rows[8] = [2, -1], [5, None], [1, 8]
    write_items(tmp_path / "items.jsonl", [{"id": "batch", "payload": {
        "sql": f"INSERT INTO {t} VALUES (:1, :2)", "rows": rows, "batch_size": 4}}])
    proc = run_bulkjob(*args(tmp_path, "db_handlers:batch_insert"), env=ora.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = latest(tmp_path)["batch"]["result"]["bad"]
    assert [(b["offset"], b["code"]) for b in bad] == [(2, "ORA-02290"), (5, "ORA-01400"), (8, "ORA-00001")]
    assert ora.execute(f"SELECT COUNT(*) FROM {t}") == [(7,)]


def work_table(ora, *, error_width: int | None = None) -> str:
    """The work table of job.db.worktable.DDL, under this test's prefix."""
    table = ora.name("work")
    create_table, index = [s.strip() for s in DDL["oracle"].split(";") if s.strip()]
    create_table = create_table.replace("bulk_work", table, 1)
    if error_width is not None:
        create_table = create_table.replace("VARCHAR2(4000)", f"VARCHAR2({error_width})")
    ora.execute(create_table)
    ora.objects.append(("TABLE", table))
    ora.execute(index.replace("bulk_work_state", ora.name("work_st")).replace("ON bulk_work", f"ON {table}"))
    return table


def table_args(table, handler, *extra):
    return ("run", "--work-table", table, "--handler", handler, "--db", URL, "--metrics-port", "0",
            "--backoff", "0.5", "--max-backoff", "2", "--checkpoint-interval", "0.5", *extra)


def test_work_table(tmp_path, ora):
    table = work_table(ora)
    out = ora.create("TABLE", "out", "CREATE TABLE {name} (k VARCHAR2(20) PRIMARY KEY CHECK (k <> 'bad'))")
    for i in range(10):
        ora.execute(f"INSERT INTO {table} (work_id, payload) VALUES (:1, :2)", [f"w{i}", json.dumps({"k": f"k{i}"})])
    ora.execute(f"INSERT INTO {table} (work_id, payload) VALUES ('w-bad', :1)", [json.dumps({"k": "bad"})])
    handler = steps(tmp_path, "-- step: one\nINSERT INTO {out} VALUES (:k);\n", out=out)
    proc = run_bulkjob(*table_args(table, handler, "--max-failures", "1"), env=ora.env)
    summary = summary_of(proc)
    assert (summary["total"], summary["done"], summary["failed"]) == (11, 10, 1), proc.stderr[-3000:]
    assert dict(ora.execute(f"SELECT state, COUNT(*) FROM {table} GROUP BY state")) == {"DONE": 10, "ERR": 1}
    [(error, attempts)] = ora.execute(f"SELECT error, attempts FROM {table} WHERE work_id = 'w-bad'")
    assert error.startswith("ORA-02290") and attempts == 1
    assert ora.execute(f"SELECT COUNT(*) FROM {table} WHERE claim_expires IS NOT NULL") == [(0,)]


def test_a_claim_gets_its_rows_while_another_session_holds_some_locked(ora):
    """The pitfall of ROWNUM with SKIP LOCKED: a limit counted before the lock check gives a
    second claimer fewer rows, or none. The locking cursor fetched n rows at a time does not."""
    import oracledb

    from job.db import oracle as dialect
    from job.db.claim import claim_sql

    table = work_table(ora)
    for i in range(20):
        ora.execute(f"INSERT INTO {table} (work_id, payload) VALUES (:1, '{{}}')", [f"w{i:02d}"])
    sql = claim_sql(table, dialect, error_column=True, result_column=False)
    settings = parse_db_url(URL)
    holder = oracledb.connect(user=settings.user, password=PASSWORD,
                              dsn=f"{settings.host}:{settings.port}/{settings.database}")
    other = dialect.connect(settings, PASSWORD)
    try:
        with holder.cursor() as cur:  # another runner's claim, in the middle of its transaction
            cur.arraysize = cur.prefetchrows = 5
            cur.execute(sql.claim[0])
            held = {row[0] for row in cur.fetchmany(5)}
        assert len(held) == 5
        rows = dialect.claim(other, sql.claim, runner="B", ttl=30.0, limit=5)
        assert len(rows) == 5 and not held & {row[0] for row in rows}
        holder.rollback()
        rows = dialect.claim(other, sql.claim, runner="B", ttl=30.0, limit=100)
        assert len(rows) == 15  # the rest, the held ones included once they were let go
        assert ora.execute(f"SELECT COUNT(*) FROM {table} WHERE claimed_by = 'B' AND state = 'RUNNING' "
                           f"AND claim_expires > {dialect.CLAIM_CLOCK}") == [(20,)]
    finally:
        holder.close()
        other.close()


def test_two_runners_and_an_expired_claim_taken_over(tmp_path, ora):
    table = work_table(ora)
    for i in range(200):
        ora.execute(f"INSERT INTO {table} (work_id, payload) VALUES (:1, :2)",
                    [f"w{i:03d}", json.dumps({"track": True})])
    # A dead runner's rows: one to take over and run, one that used its attempts (crashed).
    ora.execute(f"INSERT INTO {table} (work_id, payload, state, claimed_by, claim_expires, attempts) VALUES "
                f"('dead-1', '{{}}', 'RUNNING', 'dead', SYS_EXTRACT_UTC(SYSTIMESTAMP) - INTERVAL '1' MINUTE, 1)")
    ora.execute(f"INSERT INTO {table} (work_id, payload, state, claimed_by, claim_expires, attempts) VALUES "
                f"('dead-2', '{{}}', 'RUNNING', 'dead', SYS_EXTRACT_UTC(SYSTIMESTAMP) - INTERVAL '1' MINUTE, 3)")
    env = {**ora.env, "LEDGER_DB": str(tmp_path / "ledger.db")}
    argv = table_args(table, "ledger:handle", "--workers", "2", "--max-attempts", "3", "--max-failures", "1")
    procs = [start_bulkjob(*argv, env=env) for _ in range(2)]
    ends = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], ends[0][1][-2000:] + ends[1][1][-2000:]
    assert dict(ora.execute(f"SELECT state, COUNT(*) FROM {table} GROUP BY state")) == {"DONE": 201, "ERR": 1}
    [(attempts, error)] = ora.execute(f"SELECT attempts, error FROM {table} WHERE work_id = 'dead-2'")
    assert attempts == 3 and error.startswith("RunCrashed")
    assert ora.execute(f"SELECT attempts FROM {table} WHERE work_id = 'dead-1'") == [(2,)]
    runners = [json.loads(out.splitlines()[-1])["runner"] for out, _ in ends]
    assert {r for (r,) in ora.execute(f"SELECT DISTINCT claimed_by FROM {table}")} == set(runners)
    import sqlite3

    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        tried = conn.execute("SELECT COUNT(*), COUNT(DISTINCT item_id) FROM tried").fetchone()
    assert tried == (200, 200)  # every row started once, on one runner


def test_a_refused_login_exits_2_within_seconds_and_charges_no_item(tmp_path, ora):
    # A user that does not exist gets the same ORA-01017 as a wrong password, and no account
    # (SYSTEM's included) moves towards being locked.
    settings = parse_db_url(URL)
    url = f"oracle://{ora.name('nobody')}@{settings.host}:{settings.port}/{settings.database}"
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {}} for i in range(20)])
    handler = steps(tmp_path, "-- step: one\nSELECT 1 FROM dual;\n")
    started = time.monotonic()
    proc = run_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", handler, "--db", url,
                       "--manifest", str(tmp_path / "state"), "--run-id", "r1", "--metrics-port", "0",
                       env={"BULKJOB_DB_PASSWORD": "not-the-password"})
    assert proc.returncode == 2 and "ORA-01017" in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert "not-the-password" not in proc.stdout + proc.stderr
    records = latest(tmp_path) if any((tmp_path / "state").rglob("*.jsonl")) else {}
    assert not [r for r in records.values() if r["state"] == "failed"]


def test_payload_keys_that_are_reserved_words_bind(tmp_path, ora):
    t = ora.create("TABLE", "t", "CREATE TABLE {name} (k VARCHAR2(20), d DATE, lvl NUMBER, sz NUMBER)")
    write_items(tmp_path / "items.jsonl", [{"id": "a", "payload": {"k": "a", "date": "2026-01-05", "level": 3,
                                                                    "size": 7, "from": "2026-01-01"}}])
    handler = steps(tmp_path, "-- step: load\nINSERT INTO {t} (k, d, lvl) VALUES (:k, TO_DATE(:date, 'YYYY-MM-DD'), "
                              ":level);\n-- step: block\nBEGIN\n  UPDATE {t} SET sz = :size\n  WHERE k = :k AND d >= "
                              "TO_DATE(:from, 'YYYY-MM-DD');\nEND;\n/\n", t=t)
    proc = run_bulkjob(*args(tmp_path, handler), env=ora.env)
    assert summary_of(proc)["done"] == 1, proc.stderr[-3000:]
    assert ora.execute(f"SELECT k, TO_CHAR(d, 'YYYY-MM-DD'), lvl, sz FROM {t}") == [("a", "2026-01-05", 3, 7)]


def test_with_function_and_a_labelled_block(tmp_path, ora):
    t = ora.create("TABLE", "t", "CREATE TABLE {name} (k VARCHAR2(20), v NUMBER)")
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"k": f"k{i}", "v": i}} for i in range(3)])
    handler = steps(tmp_path, "-- step: add\nINSERT /*+ WITH_PLSQL */ INTO {t} (k, v)\n"
                              "WITH FUNCTION add1(n NUMBER) RETURN NUMBER IS\nBEGIN\n  RETURN n + 1;\nEND;\n"
                              "SELECT :k, add1(:v) FROM dual\n/\n"
                              "-- step: scale\n<<scale>>\nBEGIN\n  UPDATE {t} SET v = v * 10 WHERE k = :k;\nEND scale;\n/\n",
                    t=t)
    proc = run_bulkjob(*args(tmp_path, handler), env=ora.env)
    assert summary_of(proc)["done"] == 3, proc.stderr[-3000:]
    assert ora.execute(f"SELECT k, v FROM {t} ORDER BY k") == [("k0", 10), ("k1", 20), ("k2", 30)]


def test_a_step_that_commits_on_purpose_with_commit_step(tmp_path, ora):
    t = ora.create("TABLE", "t", "CREATE TABLE {name} (k VARCHAR2(20))")
    write_items(tmp_path / "items.jsonl", [{"id": 1, "payload": {"k": "a"}}])
    handler = steps(tmp_path, "-- step: one\n-- commits: yes\nBEGIN\n  INSERT INTO {t} VALUES (:k);\n  COMMIT;\nEND;\n/\n",
                    t=t)
    refused = run_bulkjob(*args(tmp_path, handler), env=ora.env)
    assert refused.returncode == 2 and "use --commit step" in refused.stderr
    proc = run_bulkjob(*args(tmp_path, handler, "--commit", "step", run_id="r2"), env=ora.env)
    assert summary_of(proc)["done"] == 1, proc.stderr[-3000:]
    assert ora.execute(f"SELECT k FROM {t}") == [("a",)]


def test_items_sql_pasted_with_its_semicolon(tmp_path, ora):
    todo = ora.create("TABLE", "todo", "CREATE TABLE {name} (id NUMBER, payload CLOB CHECK (payload IS JSON))")
    out = ora.create("TABLE", "out", "CREATE TABLE {name} (k VARCHAR2(20))")
    for i in range(3):
        ora.execute(f"INSERT INTO {todo} VALUES (:1, :2)", [i, json.dumps({"k": f"k{i}"})])
    handler = steps(tmp_path, "-- step: one\nINSERT INTO {out} VALUES (:k);\n", out=out)
    proc = run_bulkjob(*args(tmp_path, handler, "--items-sql", f"SELECT id, payload FROM {todo} ORDER BY id;\n",
                             "--session-sql", "ALTER SESSION SET NLS_DATE_FORMAT = 'YYYY-MM-DD';", items=False),
                       env=ora.env)
    assert summary_of(proc)["done"] == 3, proc.stderr[-3000:]
    assert ora.execute(f"SELECT k FROM {out} ORDER BY k") == [("k0",), ("k1",), ("k2",)]


def test_executemany_runs_a_plsql_block_without_batch_errors(tmp_path, ora):
    t = ora.create("TABLE", "t", "CREATE TABLE {name} (k NUMBER PRIMARY KEY, v NUMBER)")
    block = f"BEGIN INSERT INTO {t} VALUES (:1, :2); END;"
    write_items(tmp_path / "items.jsonl", [
        {"id": "good", "payload": {"sql": block, "rows": [[i, i] for i in range(5)], "batch_size": 2}},
        {"id": "dup", "payload": {"sql": block, "rows": [[10, 0], [10, 1]], "batch_size": 2}}])
    proc = run_bulkjob(*args(tmp_path, "db_handlers:batch_insert", "--max-failures", "1"), env=ora.env)
    assert summary_of(proc)["done"] == 1, proc.stderr[-3000:]
    # Without batch errors the block's first error fails the item (not DPY-2040 before anything ran).
    assert latest(tmp_path)["dup"]["error"]["code"] == "ORA-00001"
    assert ora.execute(f"SELECT COUNT(*) FROM {t}") == [(5,)]


def test_work_table_with_an_error_column_narrower_than_the_error(tmp_path, ora):
    table = work_table(ora, error_width=30)
    out = ora.create("TABLE", "out", "CREATE TABLE {name} (k VARCHAR2(20) PRIMARY KEY CHECK (k <> 'bad'))")
    for i in range(3):
        ora.execute(f"INSERT INTO {table} (work_id, payload) VALUES (:1, :2)", [f"w{i}", json.dumps({"k": f"k{i}"})])
    ora.execute(f"INSERT INTO {table} (work_id, payload) VALUES ('w-bad', :1)", [json.dumps({"k": "bad"})])
    handler = steps(tmp_path, "-- step: one\nINSERT INTO {out} VALUES (:k);\n", out=out)
    proc = run_bulkjob(*table_args(table, handler, "--max-failures", "1"), env=ora.env)
    assert summary_of(proc)["done"] == 3, proc.stderr[-3000:]
    # ORA-12899 would have refused the whole batch, again and again: every state is written.
    assert dict(ora.execute(f"SELECT state, COUNT(*) FROM {table} GROUP BY state")) == {"DONE": 3, "ERR": 1}
    [(error,)] = ora.execute(f"SELECT error FROM {table} WHERE work_id = 'w-bad'")
    assert error.startswith("ORA-02290") and len(error.encode()) <= 30


@pytest.mark.skipif(not TCPS_URL, reason="set BULKJOB_TEST_ORACLE_TCPS_URL (a TCPS listener) to run")
def test_steps_over_tls(tmp_path, ora):
    t = ora.create("TABLE", "t", "CREATE TABLE {name} (k VARCHAR2(20))")
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"k": f"k{i}"}} for i in range(3)])
    handler = steps(tmp_path, "-- step: one\nINSERT INTO {t} VALUES (:k);\n"
                              "INSERT INTO {t} SELECT SYS_CONTEXT('USERENV', 'NETWORK_PROTOCOL') FROM dual;\n", t=t)
    argv = [a if a != URL else TCPS_URL for a in args(tmp_path, handler)]
    proc = run_bulkjob(*argv, env={**ora.env, **{k: v for k, v in os.environ.items() if k == "BULKJOB_DB_WALLET_PASSWORD"}})
    assert summary_of(proc)["done"] == 3, proc.stderr[-3000:]
    assert ora.execute(f"SELECT DISTINCT LOWER(k) FROM {t} WHERE k NOT LIKE 'k%'") == [("tcps",)]
