"""The one background-writer shape (job.writer), and the work table's write-back built on it (the
checkpointer's tests are in test_manifest.py). Real faults: a full tmpfs (ENOSPC), a real
PostgreSQL, a fence that closes."""

import logging
import threading
import time

import pytest
from tmpfs import fill, small_tmpfs

from job.errors import LeaseLost
from job.store import LocalStore
from job.writer import BackgroundWriter


class ObjectWriter(BackgroundWriter[list]):
    """Writes each batch of strings as one object of a LocalStore: real I/O, real errors."""

    def __init__(self, store: LocalStore, **kwargs) -> None:
        kwargs.setdefault("interval", 0.05)
        kwargs.setdefault("retry_base", 0.05)
        kwargs.setdefault("retry_cap", 0.2)
        super().__init__(name="objects", **kwargs)
        self.store = store
        self.pending: list[str] = []
        self.batch_no = 0
        self.attempts: list[float] = []
        self.fail_next_with: BaseException | None = None

    def add(self, text: str) -> None:
        with self.lock:
            self.pending.append(text)
            self._ticket()

    def _collect(self):
        if not self.pending:
            return None
        batch, self.pending = self.pending, []
        return batch, self._added

    def _write(self, batch):
        self.attempts.append(time.monotonic())
        if self.fail_next_with is not None:
            exc, self.fail_next_with = self.fail_next_with, None
            raise exc
        self.store.put_new(f"b/{self.batch_no:06d}", "\n".join(batch).encode() * 50)

    def _written(self, batch):
        self.batch_no += 1

    def _kept(self, batch):
        self.pending[:0] = batch

    @property
    def unsaved(self):
        with self.lock:
            return len(self.pending)

    def texts(self) -> list[str]:
        out = []
        for key in self.store.list("b/"):
            data = self.store.get(key)[0].decode()
            out += data[: len(data) // 50].split("\n")
        return out


def test_batches_are_written_and_flush_waits_for_them(tmp_path):
    writer = ObjectWriter(LocalStore(tmp_path / "s"), interval=3600)
    writer.start()
    for n in range(10):
        writer.add(f"r{n}")
    assert writer.unsaved == 10
    assert writer.flush(5)  # does not wait for the hour-long interval
    assert writer.texts() == [f"r{n}" for n in range(10)] and writer.unsaved == 0
    assert writer.close(5) and not writer.alive


def test_a_closed_fence_holds_every_write_and_an_open_one_lets_them_go(tmp_path):
    open_ = threading.Event()
    writer = ObjectWriter(LocalStore(tmp_path / "s"), fence=open_.is_set)
    writer.start()
    writer.add("a")
    assert not writer.flush(0.5)
    assert writer.texts() == [] and writer.attempts == [] and writer.fenced_since is not None
    assert writer.failures == 0 and writer.failing_since is None  # held back, not failing
    open_.set()
    assert writer.flush(5) and writer.texts() == ["a"] and writer.fenced_since is None
    writer.close(1)


def test_a_lost_lease_ends_writing_at_once(tmp_path):
    def fence():
        raise LeaseLost("another runner took it")

    writer = ObjectWriter(LocalStore(tmp_path / "s"), fence=fence)
    writer.start()
    writer.add("a")
    started = time.monotonic()
    assert not writer.close(60)  # no waiting for a lease that will not come back
    assert time.monotonic() - started < 1.0
    assert writer.gone and writer.texts() == [] and writer.unsaved == 1 and not writer.alive


def test_no_exception_ends_the_thread(tmp_path, caplog):
    writer = ObjectWriter(LocalStore(tmp_path / "s"))
    writer.fail_next_with = ZeroDivisionError("a bug in a write")
    writer.start()
    writer.add("a")
    with caplog.at_level(logging.WARNING, logger="bulkjob.writer"):
        assert writer.flush(5)
    assert writer.failures == 1 and writer.texts() == ["a"] and writer.alive
    assert "ZeroDivisionError: a bug in a write" in caplog.text and "Traceback" in caplog.text
    writer.close(1)


def test_failed_writes_back_off_with_the_one_backoff(tmp_path):
    writer = ObjectWriter(LocalStore(tmp_path / "s"), retry_base=0.1, retry_cap=0.4, rand=lambda: 1.0)
    writer.store.put_new("b/000000", b"taken")  # every write meets an existing object
    writer.start()
    writer.add("a")
    time.sleep(1.6)
    gaps = [b - a for a, b in zip(writer.attempts, writer.attempts[1:], strict=False)]
    assert len(gaps) >= 3
    # backoff_delay with equal jitter and rand 1: 0.1, 0.2, 0.4, 0.4 (capped), plus the tick.
    for gap, step in zip(gaps, (0.1, 0.2, 0.4, 0.4), strict=False):
        assert step <= gap < step + 0.1
    assert writer.failing_since is not None and "exists already" in writer.last_error
    writer.close(0)


def test_a_full_disk_is_retried_reported_and_loses_nothing(tmp_path, caplog):
    with small_tmpfs(tmp_path / "small", 256) as mnt:
        writer = ObjectWriter(LocalStore(mnt / "state"))
        writer.start()
        writer.add("first")
        assert writer.flush(5)
        filler = fill(mnt)
        with caplog.at_level(logging.WARNING, logger="bulkjob.writer"):
            for n in range(100):
                writer.add(f"r{n}")
            assert not writer.flush(1.0)
        assert writer.alive and writer.failures >= 2 and writer.failing_since is not None
        assert "No space left on device" in writer.last_error and "will retry" in caplog.text
        filler.unlink()
        assert writer.flush(5) and writer.failing_since is None
        assert writer.texts() == ["first"] + [f"r{n}" for n in range(100)]
        writer.close(1)


# -- the work table's write-back ---------------------------------------------------------------

class Claims:
    """The side of job.db.queue.ClaimQueue that the write-back talks to, in memory: whose rows
    these are, the fence, and what was finished."""

    def __init__(self, runner: str, fence=None) -> None:
        self.runner = runner
        self.fence = fence or (lambda: True)
        self.writing = threading.Lock()
        self.overtaken = 0
        self.finishing_rows: list[str] = []
        self.forgotten: list[str] = []

    def finishing(self, work_id: str) -> None:
        self.finishing_rows.append(work_id)

    def forget(self, work_ids) -> None:
        self.forgotten += list(work_ids)


@pytest.fixture
def work_table(pg_db, monkeypatch):
    from job.db import parse_db_url
    from job.db.worktable import DDL

    pg_db.execute(DDL["postgres"])
    # w1..w1000 claimed by runner A, w1001..w2000 by runner B.
    pg_db.execute("INSERT INTO bulk_work (work_id, state, claimed_by, claim_expires) "
                  "SELECT 'w' || n, 'RUNNING', CASE WHEN n <= 1000 THEN 'A' ELSE 'B' END, now() + interval '1 hour' "
                  "FROM generate_series(1, 2000) n")
    monkeypatch.setenv("BULKJOB_DB_PASSWORD", pg_db.env["BULKJOB_DB_PASSWORD"])
    return pg_db, parse_db_url(pg_db.url)


def recorder(settings, claims, **kwargs):
    import job.db.postgres as dialect
    from job.db.claim import claim_sql
    from job.db.worktable import ClaimRecorder, Columns

    sql = claim_sql("bulk_work", dialect, error_column=True, result_column=False)
    return ClaimRecorder(settings, sql, claims, columns=Columns(error=True), interval=3600, **kwargs)


def table_rows(pg_db) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in pg_db.execute("SELECT work_id, state, attempts, error FROM bulk_work")}


def test_the_write_back_writes_only_rows_still_claimed_by_its_runner(work_table):
    pg_db, settings = work_table
    pg_db.execute("UPDATE bulk_work SET state = 'DONE' WHERE work_id = 'w2'")
    claims = Claims("A")
    writer = recorder(settings, claims)
    writer.start()
    writer.add({"id": "w1", "state": "done", "attempts": 2})
    writer.add({"id": "w2", "state": "failed", "attempts": 1, "error": {"class": "X", "message": "late"}})
    writer.add({"id": "w3", "state": "partial", "attempts": 1, "error": {"class": "Y", "message": "again"}})
    writer.set_running([{"id": "w4", "state": "running", "attempts": 3}])
    # Rows another runner holds: nothing of this runner's may land there.
    writer.add({"id": "w1001", "state": "done", "attempts": 1})
    writer.add({"id": "w1002", "state": "failed", "attempts": 1, "error": {"class": "X", "message": "not mine"}})
    assert writer.close(10)
    rows = table_rows(pg_db)
    assert rows["w1"] == ("DONE", 2, None)
    assert rows["w2"] == ("DONE", 0, None)  # DONE already: an ERR never lands on it
    assert rows["w3"] == ("RUNNING", 1, "Y: again")  # an attempt that will be retried: still claimed
    assert rows["w4"] == ("RUNNING", 3, None)  # an attempt running: its start counted
    assert rows["w1001"] == rows["w1002"] == ("RUNNING", 0, None)
    assert claims.overtaken == 3  # w2, w1001 and w1002: final states that found the rows not this runner's
    assert claims.finishing_rows == ["w1", "w2", "w1001", "w1002"]
    assert sorted(claims.forgotten) == ["w1", "w1001", "w1002", "w2"]  # written (or no longer this runner's)


def test_the_write_back_checks_the_fence_before_each_batch(work_table):
    pg_db, settings = work_table
    batches = []

    def fence():
        batches.append(time.monotonic())
        return len(batches) <= 2

    writer = recorder(settings, Claims("A", fence), batch=250)
    for n in range(1, 1001):
        writer.add({"id": f"w{n}", "state": "done", "attempts": 1})
    writer.start()
    assert not writer.flush(2)
    # The fence was asked before the first batch and before each next one: two of four batches
    # went out, then nothing more while it stays closed; the rest is kept, not lost.
    rows = table_rows(pg_db)
    assert [rows[f"w{n}"][0] for n in range(1, 1001)].count("DONE") == 500
    assert writer.unsaved == 500 and writer.fenced_since is not None
    writer.fence = lambda: True  # the claims are extended again
    assert writer.close(10)
    rows = table_rows(pg_db)
    assert sum(1 for n in range(1, 1001) if rows[f"w{n}"][0] == "DONE") == 1000


def test_a_start_held_back_by_the_fence_is_not_left_behind(work_table):
    """The start of a running attempt is rebuilt from the running list at each write: one the
    fence held back is not kept for later (nothing would wait for it, and the final flush would
    count it unsaved); an attempt that ended says what became of it in its own record."""
    pg_db, settings = work_table
    fence = {"open": False}
    writer = recorder(settings, Claims("A", lambda: fence["open"]))
    writer.set_running([{"id": "w5", "state": "running", "attempts": 1}])
    writer.start()
    writer.wake()
    deadline = time.monotonic() + 10
    while writer.fenced_since is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    writer.set_running([])  # the attempt ended (given back at a drain, say)
    fence["open"] = True
    assert writer.close(10) and writer.unsaved == 0
    assert table_rows(pg_db)["w5"] == ("RUNNING", 0, None)


def test_a_write_back_held_up_in_the_database_says_how_far_behind_it_is(work_table, monkeypatch, caplog):
    """The bound on rows run again after a crash is the write-back's lag: a write that waits
    (here for a row lock another session holds) shows in `lag` and in a warning."""
    import job.db.worktable as worktable

    pg_db, settings = work_table
    monkeypatch.setattr(worktable, "LAG_WARNING", 0.5)
    writer = recorder(settings, Claims("A"))
    writer.interval = 0.01  # the warning's other threshold: LAG_INTERVALS intervals
    with caplog.at_level(logging.WARNING, logger="bulkjob.worktable"):
        with pg_db.connect(autocommit=False) as other:
            other.execute("SELECT 1 FROM bulk_work WHERE work_id = 'w7' FOR UPDATE")
            writer.add({"id": "w7", "state": "done", "attempts": 1})
            writer.start()
            writer.wake()
            time.sleep(1.0)
            assert table_rows(pg_db)["w7"][0] == "RUNNING"  # the write waits for the lock
            other.rollback()
        assert writer.flush(10)
    assert table_rows(pg_db)["w7"][0] == "DONE"
    assert writer.lag >= 1.0
    assert f"written {writer.lag:.1f}s after the rows end" in caplog.text
    writer.add({"id": "w8", "state": "done", "attempts": 1})
    assert writer.close(10) and writer.lag < 0.5  # a write that waits for nothing
