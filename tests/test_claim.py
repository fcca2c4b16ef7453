"""The work table's claim queue, its pure parts: what a claimed row comes to, how many rows to
claim, whether the claims still hold, which rows were lost, and the SQL of each dialect."""

from __future__ import annotations

import re

import pytest

from job.db import claim
from job.db.claim import (
    MAX_CLAIM,
    alter_sql,
    claim_size,
    claim_sql,
    claims_status,
    decide_row,
    lost_rows,
    poll_delay,
    runner_id,
)
from job.lease import LOST, SUSPENDED, VALID, lease_timing
from job.outcome import INVALID
from job.plan import Crashed, Refused
from job.scheduler import Task

DIALECTS = ("postgres", "oracle", "sqlite")


def dialect(name):
    import importlib

    return importlib.import_module(f"job.db.{name}")


@pytest.mark.parametrize("work_id, payload, attempts, taken_over, expected", [
    ("w1", '{"k": 1}', 0, False, Task("w1", {"k": 1}, 1)),
    ("w1", {"k": 1}, 2, False, Task("w1", {"k": 1}, 3)),            # PostgreSQL's jsonb comes decoded
    ("w1", None, None, False, Task("w1", {}, 1)),                    # no payload: an empty one
    (7, '{"k": 1}', 0, False, Task("7", {"k": 1}, 1)),              # a number as the id
    ("w1", '{"k": 1}', 5, False, Task("w1", {"k": 1}, 6)),          # a PENDING row runs, past its count too
    ("w1", '{"k": 1}', 1, True, Task("w1", {"k": 1}, 2, suspect=True)),  # taken over: a suspect
    ("w1", '{"k": 1}', 2, True, Task("w1", {"k": 1}, 3, suspect=True)),
])
def test_a_claimed_row_becomes_a_task_that_continues_its_attempts(work_id, payload, attempts, taken_over, expected):
    assert decide_row(work_id, payload, attempts, taken_over=taken_over, max_attempts=3,
                      max_item_bytes=1 << 20) == expected


@pytest.mark.parametrize("attempts, expected", [(3, Crashed), (4, Crashed), (2, Task)])
def test_a_row_taken_over_after_its_last_attempt_is_failed_as_crashed(attempts, expected):
    decision = decide_row("poison", "{}", attempts, taken_over=True, max_attempts=3, max_item_bytes=1 << 20)
    assert type(decision) is expected
    if expected is Crashed:
        assert (decision.item.id, decision.attempts) == ("poison", attempts)


@pytest.mark.parametrize("work_id, payload, reason", [
    ("w1", "[1, 2]", '"payload" must be an object, got list'),
    ("w1", "not json", '"payload" must be an object, got str'),
    ("w1", '"text"', '"payload" must be an object, got str'),
    ("x" * 600, "{}", '"id" is longer than 512 characters'),
    ("a\x01b", "{}", '"id" contains control characters'),
])
def test_a_row_that_is_no_item_is_refused_as_invalid(work_id, payload, reason):
    decision = decide_row(work_id, payload, 0, taken_over=False, max_attempts=3, max_item_bytes=1 << 20)
    assert isinstance(decision, Refused)
    assert decision.item.id == str(work_id)  # the ERR is written under the row's own id
    assert decision.failure.kind == INVALID and decision.failure.message == f"work table row: {reason}"


@pytest.mark.parametrize("buffered, rate, workers, expected", [
    (0, 0.0, 2, 4),          # at the start: two rows per worker
    (2, 0.0, 2, 2),          # down to half: top up
    (3, 0.0, 2, 0),          # more than half left: wait
    (0, 250.0, 2, 250),      # a second of work at the rate the run takes rows
    (100, 250.0, 2, 150),
    (200, 250.0, 2, 0),
    (0, 1e6, 2, MAX_CLAIM),  # never more than one round trip's worth
    (0, 1e6, 4000, 8000),    # ... unless the workers alone need more
])
def test_how_many_rows_to_claim(buffered, rate, workers, expected):
    assert claim_size(buffered, rate, workers) == expected


def test_polls_grow_and_stay_within_a_third_of_the_ttl():
    delays = [poll_delay(n, ttl=30.0, rand=0.999) for n in range(1, 12)]
    assert delays == sorted(delays) and delays[0] == pytest.approx(claim.POLL_BASE, rel=0.01)
    assert max(delays) <= claim.POLL_CAP
    assert max(poll_delay(n, ttl=3.0, rand=0.999) for n in range(1, 12)) <= 1.0
    assert poll_delay(5, ttl=30.0, rand=0.0) == pytest.approx(poll_delay(5, ttl=30.0, rand=0.999) / 2, rel=0.01)


@pytest.mark.parametrize("acked, now, released, expected", [
    (None, 0.0, False, SUSPENDED),   # nothing acknowledged yet
    (100.0, 100.0, False, VALID),
    (100.0, 122.4, False, VALID),    # validity: 30 - 7.5 s after the send
    (100.0, 122.5, False, SUSPENDED),
    (100.0, 500.0, False, SUSPENDED),
    (100.0, 101.0, True, LOST),      # given back at the end: for good
])
def test_the_claims_fence(acked, now, released, expected):
    assert claims_status(acked, now, lease_timing(30.0), released=released) == expected


@pytest.mark.parametrize("expected, running, finished, lost", [
    ({"a", "b"}, {"a", "b"}, set(), set()),
    ({"a", "b"}, {"a"}, set(), {"b"}),          # b is no longer RUNNING under this runner's name
    ({"a", "b"}, {"a"}, {"b"}, set()),          # ... because this runner just wrote it DONE
    ({"a", "b"}, set(), set(), {"a", "b"}),
    (set(), {"x"}, set(), set()),               # a row it did not know of is not lost (it is given back)
])
def test_rows_taken_over_by_another_runner(expected, running, finished, lost):
    assert lost_rows(expected, running, finished) == lost


def test_a_runner_id_is_unique_to_the_process_and_fits_the_column():
    assert runner_id({"pod": "bulk-0", "pid": 12}, "ab12") == "bulk-0:12:ab12"
    assert len(runner_id({"pod": "p" * 300, "pid": 1}, "t")) == 200


# -- the SQL ------------------------------------------------------------------------------------

def binds(sql: str, name: str) -> set[str]:
    pattern = r"%\((\w+)\)s" if name == "postgres" else r"(?<![:\w']):(\w+)"
    return set(re.findall(pattern, sql))


#: The binds each statement is sent with (job.db.queue and job.db.worktable): Oracle refuses a
#: bind the statement lacks, every driver one it needs and is not given.
SENT = {"extend": {"runner", "ttl"}, "mine": {"runner"}, "others": {"runner"}, "pending": set(),
        "done": {"work_id", "runner", "attempts"}, "err": {"work_id", "runner", "attempts"},
        "started": {"work_id", "runner", "attempts"}, "retrying": {"work_id", "runner", "attempts"},
        "give_back": {"work_id", "runner"}}


@pytest.mark.parametrize("name", DIALECTS)
@pytest.mark.parametrize("error_column, result_column", [(False, False), (True, True)])
def test_every_statement_binds_what_it_is_sent(name, error_column, result_column):
    sql = claim_sql("app.work", dialect(name), error_column=error_column, result_column=result_column)
    for field, sent in SENT.items():
        extra = set()
        if error_column and field in ("err", "retrying"):
            extra = {"error"}
        if result_column and field == "done":
            extra = {"result"}
        assert binds(getattr(sql, field), name) == sent | extra, field
    # The claim: Oracle's and SQLite's read with their own binds, then update each row by id.
    for statements in (sql.claim, sql.take_over):
        if name == "postgres":
            assert [binds(s, name) for s in statements] == [{"limit", "runner", "ttl"}]
        else:
            read = {"limit"} if name == "sqlite" else set()
            assert [binds(s, name) for s in statements] == [read, {"runner", "ttl", "work_id"}]


@pytest.mark.parametrize("name", DIALECTS)
def test_every_write_is_guarded_by_the_claim(name):
    d = dialect(name)
    sql = claim_sql("app.work", d, error_column=True, result_column=False)
    guard = claim.guard(d.PARAMSTYLE)
    for field in ("done", "err", "started", "retrying", "give_back"):
        assert getattr(sql, field).endswith(f"WHERE {guard}"), field
    runner = "%(runner)s" if name == "postgres" else ":runner"
    assert guard == (f"work_id = {runner.replace('runner', 'work_id')} AND claimed_by = {runner} "
                     "AND state = 'RUNNING'")
    assert sql.extend.endswith(f"WHERE claimed_by = {runner} AND state = 'RUNNING'")
    assert d.CLAIM_EXPIRY in sql.extend
    assert "state = 'DONE'" in sql.done and "error = NULL" in sql.done and "claim_expires = NULL" in sql.done
    assert "state = 'ERR'" in sql.err and "state = 'PENDING', claimed_by = NULL" in sql.give_back


@pytest.mark.parametrize("name", DIALECTS)
def test_claims_skip_rows_other_claims_hold_and_take_over_expired_ones(name):
    d = dialect(name)
    sql = claim_sql("app.work", d, error_column=False, result_column=False)
    fresh, expired = sql.claim[0], sql.take_over[0]
    assert "WHERE state = 'PENDING'" in fresh
    assert f"state = 'RUNNING' AND (claim_expires IS NULL OR claim_expires < {d.CLAIM_CLOCK})" in expired
    for select in (fresh, expired):
        assert "ORDER BY" not in select  # a sort would read (and on Oracle lock) every candidate first
        if name == "postgres":
            assert "LIMIT %(limit)s FOR UPDATE SKIP LOCKED" in select and "RETURNING w.work_id" in select
        elif name == "oracle":
            # No row limit beside FOR UPDATE (ORA-02014), no ROWNUM (counted before the lock
            # check): `claim` fetches the rows it wants from the locking cursor.
            assert select.endswith("FOR UPDATE SKIP LOCKED")
            assert "ROWNUM" not in select and "FETCH" not in select
        else:
            assert select.endswith("LIMIT :limit") and "FOR UPDATE" not in select  # under BEGIN IMMEDIATE


@pytest.mark.parametrize("name, missing, expected", [
    ("postgres", ["claimed_by", "claim_expires", "attempts"],
     "ALTER TABLE t ADD COLUMN claimed_by text, ADD COLUMN claim_expires timestamptz, "
     "ADD COLUMN attempts integer NOT NULL DEFAULT 0;"),
    ("oracle", ["claimed_by", "claim_expires", "attempts"],
     "ALTER TABLE t ADD (claimed_by VARCHAR2(200), claim_expires TIMESTAMP, attempts NUMBER(10) DEFAULT 0 NOT NULL);"),
    ("sqlite", ["attempts"], "ALTER TABLE t ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;"),
    ("sqlite", ["claimed_by", "attempts"],
     "ALTER TABLE t ADD COLUMN claimed_by TEXT; ALTER TABLE t ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;"),
])
def test_the_alter_table_that_adds_the_claim_columns(name, missing, expected):
    assert alter_sql(name, "t", missing) == expected
