"""The run: the parent process's loop that plans, dispatches, retries, records and drains.

The parent decides and the workers execute. Only this loop schedules retries (a retry waits
in a heap here, never in a sleeping worker), only it adds manifest records, and it records a
dead worker's item as a failed attempt.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from . import items as items_module
from .checkpoint import Checkpointer
from .config import RunConfig
from .errors import (
    EXIT_INTERRUPTED,
    EXIT_ITEMS_FAILED,
    EXIT_LEASE,
    EXIT_OK,
    ManifestCorrupt,
    StoreUnavailable,
    UsageError,
)
from .lease import Lease
from .manifest import DONE, FAILED, PARTIAL, RUNNING, ItemStates, ShardManifest, list_shards
from .observe import NullObserver, Observer
from .outcome import CRASHED, INVALID, TIMEOUT, Failure, Outcome
from .pool import Died, Finished, Pool, Task
from .progress import Progress
from .signals import Signals
from .sources import open_source
from .store import open_store
from .worker import load_handler

log = logging.getLogger("bulkjob")

#: Seconds to keep retrying the store at start (reading the manifest, writing meta) before the
#: run gives up with exit 3: long enough to ride out a short outage, short enough to fail fast.
STARTUP_STORE_PATIENCE = 60.0
#: Seconds the final flush may take after a normal end, and after an interruption (when the
#: pod's grace period is running out).
FINAL_FLUSH_TIMEOUT = 120.0
INTERRUPTED_FLUSH_TIMEOUT = 10.0
#: Longest the loop sleeps without looking at the clock (retries due, progress, timeouts).
MAX_TICK = 0.5
#: Adaptive prefetch (--prefetch 0): the work queued at each worker, in seconds of item time.
#: Enough that a worker finishing a short item finds the next one waiting instead of a round
#: trip through the parent; little enough that a drain or the run's uneven tail costs at most
#: that much. Bounded by MIN_DEPTH (the running item plus one) and MAX_DEPTH tasks.
QUEUED_SECONDS = 0.02
MIN_DEPTH = 2
MAX_DEPTH = 64
#: Workers that die before ever becoming ready, per pool slot, before the run gives up: a
#: handler whose import crashes the process would otherwise restart workers forever.
MAX_START_FAILURES_PER_SLOT = 3


@dataclass(slots=True)
class Counts:
    total: int = 0
    done: int = 0
    failed: int = 0
    skipped_already_done: int = 0
    retries: int = 0
    attempts: int = 0

    @property
    def pending(self) -> int:
        return max(0, self.total - self.done - self.failed)


def _with_store_retries(what: str, fn, *args, **kwargs):
    """Call `fn`, retrying StoreUnavailable with backoff for STARTUP_STORE_PATIENCE seconds."""
    deadline = time.monotonic() + STARTUP_STORE_PATIENCE
    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except StoreUnavailable as e:
            attempt += 1
            if time.monotonic() > deadline:
                raise
            delay = min(10.0, 0.5 * 2 ** attempt)
            log.warning("%s: store unavailable (%s); retrying in %.1fs", what, e, delay)
            time.sleep(delay)


class Run:
    """One invocation of `bulkjob run` for one shard."""

    def __init__(self, config: RunConfig, *, observer: Observer | None = None) -> None:
        self.config = config
        self.observer = observer or NullObserver()
        self.counts = Counts()
        self.started = time.monotonic()
        self.interrupted = False
        self.lease_lost = False
        self.unsaved = False
        self._rand = random.Random()
        self._item_seconds: float | None = None
        #: Writes item states back to a --work-table as they change (None otherwise).
        self.writeback = None

    # -- planning ---------------------------------------------------------------------------

    def execute(self) -> tuple[dict[str, Any], int]:
        """Run the shard to its end (or to an interruption); returns (summary, exit code)."""
        # Signals are caught from the start: a SIGTERM while the input is read ends the run
        # with exit 3 before any item is handed out.
        self.signals = Signals()
        self.signals.install()
        try:
            return self._execute()
        finally:
            self.signals.uninstall()

    def _execute(self) -> tuple[dict[str, Any], int]:
        cfg = self.config
        store, prefix = open_store(cfg.manifest, endpoint_url=cfg.s3_endpoint_url)
        manifest = ShardManifest(store, prefix, cfg.run_id, cfg.shard_index, cfg.shard_count)
        # An unknown handler or a bad steps file is a usage error before anything runs.
        handler = load_handler(cfg.handler, cfg.worker.db)
        counts = {count for _, count in _with_store_retries("listing the manifest", list_shards,
                                                            store, prefix, cfg.run_id)}
        if counts - {cfg.shard_count}:
            raise UsageError(
                f"run {cfg.run_id} was started with --shard-count {min(counts - {cfg.shard_count})}; "
                f"resume it with the same count, or start a new run id")
        self.lease = Lease(store, manifest.dir + "lease.json", ttl=cfg.lease_ttl)
        if cfg.manifest_repair and not cfg.dry_run:
            _with_store_retries("taking the lease", self.lease.acquire)
            kept, objects = _with_store_retries("repairing the manifest", manifest.repair)
            log.warning("manifest repaired: %d item record(s) kept from %d object(s) in %s",
                        kept, objects, manifest.url)
        try:
            loaded = _with_store_retries("reading the manifest", manifest.load)
        except ManifestCorrupt as e:
            raise ManifestCorrupt(f"damaged manifest: {e}. Nothing was changed; run again with "
                                  "--manifest-repair to keep every record that can still be read") from None
        latest = loaded.states()
        with self._open_items() as (source_name, lines):
            with lines() as it:
                scan = items_module.scan(it, shard_index=cfg.shard_index, shard_count=cfg.shard_count,
                                         max_bytes=cfg.max_item_bytes)
            if scan.invalid and not cfg.skip_invalid:
                raise items_module.input_error(source_name, scan.invalid)
            invalid = scan.shard_invalid(cfg.shard_index, cfg.shard_count) if cfg.skip_invalid else []
            self.counts.total = scan.shard_items + len(invalid)
            self._count_known(latest)
            if cfg.db_items is not None:
                self.counts.total += lines.finished_earlier(latest, retry_failed=cfg.retry_failed)
            if cfg.dry_run:
                self._check_payloads(handler, lines, scan)
                return self._plan_summary(scan, invalid, source_name, manifest), EXIT_OK
            meta = dict(loaded.meta or {})
            meta.update(run_id=cfg.run_id, shard_index=cfg.shard_index, shard_count=cfg.shard_count,
                        items=source_name, handler=cfg.handler, total=self.counts.total,
                        last_started_at=time.time())
            meta.setdefault("created_at", meta["last_started_at"])
            if not self.lease.expires_at:
                _with_store_retries("taking the lease", self.lease.acquire)
            self.lease.start()
            _with_store_retries("writing the manifest", manifest.write_meta, meta)
            log.info("run %s shard %d/%d: %d items, %d already done, %d already failed; manifest %s",
                     cfg.run_id, cfg.shard_index, cfg.shard_count, self.counts.total,
                     self.counts.done, self.counts.failed, manifest.url)
            self.checkpointer = Checkpointer(manifest, loaded, interval=cfg.checkpoint_interval,
                                             observe=self.observer.checkpoint, may_write=self.lease.valid)
            self.checkpointer.start()
            if cfg.db_items is not None:
                self.writeback = lines.writeback()
            for bad in invalid:
                known = latest.get(bad.record_id)
                if known is None or known.state not in (DONE, FAILED):
                    self._record_failed(bad.record_id, 0, Failure(INVALID, "InvalidItem", bad.reason))
            with lines() as it:
                todo = self._todo(items_module.iter_items(
                    it, shard_index=cfg.shard_index, shard_count=cfg.shard_count,
                    skip_lines=scan.skip_lines), latest)
                try:
                    self._loop(todo)
                except Exception:
                    # Save what is done so that a rerun resumes, and say it was cut short.
                    log.exception("internal error; stopping. Progress so far is saved: rerun with "
                                  "--run-id %s to resume", cfg.run_id)
                    self.interrupted = True
            return self._finish(manifest)

    def _count_known(self, latest: ItemStates) -> None:
        self.counts.done = latest.count(DONE)
        if not self.config.retry_failed:
            self.counts.failed = latest.count(FAILED)
        self.counts.skipped_already_done = self.counts.done

    def _todo(self, items: Iterator[items_module.Item], latest: ItemStates) -> Iterator[Task]:
        """Items still to run: not done, and not failed unless --retry-failed."""
        for item in items:
            known = latest.get(item.id)
            if known is None:
                task = Task(item.id, item.payload, 1)
            elif known.state in (PARTIAL, RUNNING) or (known.state == FAILED and self.config.retry_failed):
                task = Task(item.id, item.payload, 1, known.progress)
            else:
                # Finished before a restart but still open in the work table: the write-back
                # was cut short, so write it now.
                self._write_back(item.id, known.state, known.error)
                continue
            if self.writeback is not None:
                self.writeback.taken(item.id)
            yield task

    def _open_items(self):
        """The items source: a JSON Lines file, S3 object or stdin, or the database."""
        cfg = self.config
        if cfg.db_items is not None:
            from .db.worktable import open_db_items

            return open_db_items(cfg.worker.db, cfg.db_items, retry_failed=cfg.retry_failed)
        return open_source(cfg.items, endpoint_url=cfg.s3_endpoint_url)

    def _check_payloads(self, handler, lines, scan) -> None:
        """For --dry-run: ask a handler that can check payloads (the SQL steps handler) about
        every item of the shard; any problem is a usage error."""
        check = getattr(handler, "check_payload", None)
        if check is None:
            return
        cfg = self.config
        problems: list[str] = []
        with lines() as it:
            for item in items_module.iter_items(it, shard_index=cfg.shard_index, shard_count=cfg.shard_count,
                                                skip_lines=scan.skip_lines):
                problems += [f"item {item.id}: {p}" for p in check(item.payload)]
        if problems:
            shown = problems[:items_module.SHOWN_PROBLEMS]
            more = len(problems) - len(shown)
            raise UsageError("\n".join([f"{len(problems)} problem(s) with the items for {cfg.handler}:",
                                        *(f"  {p}" for p in shown)] + ([f"  ... and {more} more"] if more else [])))

    def _write_back(self, item_id: str, state: str, error: dict[str, Any] | None = None) -> None:
        if self.writeback is not None:
            self.writeback.finished(item_id, state, error)

    def _plan_summary(self, scan, invalid, source_name, manifest) -> dict[str, Any]:
        return {
            "dry_run": True, "run_id": self.config.run_id, "shard": self.config.shard_index,
            "shard_count": self.config.shard_count, "items": source_name, "manifest": manifest.url,
            "lines": scan.lines, "valid_items": scan.valid, "invalid_lines": len(scan.invalid),
            "items_per_shard": scan.per_shard,
            "total": self.counts.total, "already_done": self.counts.done,
            "already_failed": self.counts.failed, "to_run": self.counts.pending,
            "workers": self.config.workers, "handler": self.config.handler,
        }

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self, todo: Iterator[Task]) -> None:
        cfg = self.config
        # With metrics on, the forkserver imports prometheus_client once (the multiprocess
        # directory is already in its environment), instead of every worker at its start.
        preload = ("job.worker",)
        if getattr(cfg.worker, "metrics_dir", None):
            preload += ("prometheus_client",)
        pool = Pool(cfg.workers, cfg.worker, prefetch=cfg.prefetch or MIN_DEPTH, preload=preload)
        self._pool = pool
        signals = self.signals
        progress = Progress(self.counts.total, interval=cfg.progress_interval)
        retry_heap: list[tuple[float, int, Task]] = []
        unstarted: deque[Task] = deque()
        timed_out: set[int] = set()
        sequence = 0
        exhausted = False
        drain_deadline: float | None = None
        start_failures = 0
        self.observer.run_started(total=self.counts.total, pending=self.counts.pending,
                                  workers=cfg.workers)
        try:
            pool.start_items_until(self.lease.valid_until)
            pool.watch(signals.reader)
            pool.start()
            while True:
                now = time.monotonic()
                if drain_deadline is None:
                    exhausted = self._dispatch(pool, todo, retry_heap, unstarted, exhausted, now)
                    if exhausted and not retry_heap and not unstarted and pool.busy() == 0:
                        break
                elif pool.busy() == 0:
                    break
                timeout = MAX_TICK
                if retry_heap:
                    timeout = min(timeout, max(0.0, retry_heap[0][0] - now))
                if cfg.item_timeout:
                    deadline = pool.next_deadline(cfg.item_timeout)
                    if deadline is not None:
                        timeout = min(timeout, max(0.0, deadline - now))
                if drain_deadline is not None:
                    timeout = min(timeout, max(0.0, drain_deadline - now))
                events, woke = pool.wait(timeout)
                if woke:
                    signals.drain_wakeups()
                for event in events:
                    if isinstance(event, Finished):
                        self._on_outcome(event.task, event.outcome, retry_heap, unstarted, sequence)
                        sequence += 1
                    else:
                        start_failures = self._on_death(pool, event, timed_out, retry_heap, unstarted,
                                                        sequence, start_failures, draining=drain_deadline is not None)
                        sequence += 1
                now = time.monotonic()
                if cfg.item_timeout:
                    for handle in pool.overdue(cfg.item_timeout, now):
                        if handle.pid not in timed_out:
                            timed_out.add(handle.pid)
                            log.warning("item %s exceeded --item-timeout %.0fs; killing worker %d",
                                        handle.inflight[0].item_id, cfg.item_timeout, handle.pid)
                            pool.kill(handle)
                pool.start_items_until(self.lease.valid_until)
                if not self.lease.valid() and drain_deadline is None:
                    # Another runner has the shard: stop handing out items at once. What is
                    # running finishes, but nothing more is written to the manifest.
                    self.lease_lost = True
                    drain_deadline = now + cfg.drain_timeout
                    pool.stop_starting_items()
                elif signals.count and drain_deadline is None:
                    self.interrupted = True
                    drain_deadline = now + cfg.drain_timeout
                    pool.stop_starting_items()
                    log.warning("%s received: draining %d running item(s) for up to %.0fs "
                                "(send it again to stop at once)", signal.Signals(signals.last).name,
                                pool.busy(), cfg.drain_timeout)
                if drain_deadline is not None and (signals.count > 1 or now >= drain_deadline):
                    running = [w.inflight[0].item_id for w in pool.workers if w.inflight]
                    if running:
                        log.warning("stopping now; %d item(s) cut short and not recorded: %s",
                                    len(running), ", ".join(running[:10]))
                    pool.close(kill=True)
                    break
                progress.update(done=self.counts.done, failed=self.counts.failed, pending=self.counts.pending)
                self.observer.progress(done=self.counts.done, failed=self.counts.failed,
                                       pending=self.counts.pending, in_flight=pool.busy(),
                                       workers=len(pool.workers))
            if not self.interrupted:
                pool.close()
        finally:
            pool.close(kill=True)
            progress.finish(done=self.counts.done, failed=self.counts.failed, pending=self.counts.pending)

    @staticmethod
    def _dispatch(pool: Pool, todo: Iterator[Task], retry_heap, unstarted: deque, exhausted: bool,
                  now: float) -> bool:
        """Fill every free worker slot, a batch per worker in one message: retries that are
        due first, then tasks sent back unstarted, then new items. Returns whether the new
        items have run out."""
        for handle in pool.free():
            batch: list[Task] = []
            while len(batch) < pool.room(handle) - len(handle.inflight):
                if retry_heap and retry_heap[0][0] <= now:
                    batch.append(heapq.heappop(retry_heap)[2])
                elif unstarted:
                    batch.append(unstarted.popleft())
                elif not exhausted and (task := next(todo, None)) is not None:
                    batch.append(task)
                else:
                    exhausted = True
                    break
            if not batch:
                break
            sent = pool.submit(handle, batch)
            if sent < len(batch):
                unstarted.extendleft(reversed(batch[sent:]))
        return exhausted

    def _on_outcome(self, task: Task, outcome: Outcome, retry_heap, unstarted, sequence: int) -> None:
        if outcome.attempt == 0:  # sent back unstarted during a drain
            unstarted.append(task)
            return
        self.counts.attempts += 1
        if not self.config.prefetch:
            self._adapt_depth(outcome.seconds)
        if outcome.failure is None:
            self.counts.done += 1
            record = {"id": task.item_id, "state": DONE, "attempts": task.attempt, "at": round(time.time(), 3),
                      "seconds": round(outcome.seconds, 6)}
            if outcome.result is not None:
                record["result"] = outcome.result
            self.checkpointer.add(record)
            self._write_back(task.item_id, DONE)
            self.observer.item_finished(DONE, outcome.seconds, None)
            return
        self._on_failure(task, outcome.failure, outcome.seconds, outcome.progress, retry_heap, sequence)

    def _adapt_depth(self, seconds: float) -> None:
        """Queue about QUEUED_SECONDS of work at each worker, by a moving average of item time."""
        self._item_seconds = seconds if self._item_seconds is None else 0.9 * self._item_seconds + 0.1 * seconds
        self._pool.depth = max(MIN_DEPTH, min(MAX_DEPTH, math.ceil(QUEUED_SECONDS / max(self._item_seconds, 1e-6))))

    def _on_failure(self, task: Task, failure: Failure, seconds: float, progress, retry_heap, sequence: int) -> None:
        progress = progress if progress is not None else task.progress
        delay = self.config.policy.next_delay(task.attempt, failure, rand=self._rand.random())
        self.observer.attempt_failed(failure, seconds)
        if delay is None:
            self._record_failed(task.item_id, task.attempt, failure, progress, seconds)
            return
        self.counts.retries += 1
        self.observer.retry_scheduled(failure)
        if progress:
            # Kept so that a restart resumes the item where this attempt got to.
            self.checkpointer.add({"id": task.item_id, "state": PARTIAL, "attempts": task.attempt,
                                   "at": round(time.time(), 3), "progress": progress,
                                   "error": failure.as_record()})
        log.info("attempt %d failed (%s%s: %s); retry in %.2fs", task.attempt, failure.error_class,
                 f" {failure.code}" if failure.code else "", failure.message, delay,
                 extra={"item_id": task.item_id, "attempt": task.attempt})
        retry = Task(task.item_id, task.payload, task.attempt + 1, progress)
        heapq.heappush(retry_heap, (time.monotonic() + delay, sequence, retry))

    def _record_failed(self, item_id: str, attempts: int, failure: Failure, progress=None,
                       seconds: float = 0.0) -> None:
        self.counts.failed += 1
        record = {"id": item_id, "state": FAILED, "attempts": attempts, "at": round(time.time(), 3),
                  "error": failure.as_record()}
        if progress:
            record["progress"] = progress
        self.checkpointer.add(record)
        self._write_back(item_id, FAILED, record["error"])
        self.observer.item_finished(FAILED, seconds, failure)
        log.error("failed after %d attempt(s): %s%s: %s", attempts, failure.error_class,
                  f" {failure.code}" if failure.code else "", failure.message,
                  extra={"item_id": item_id, "attempt": attempts})

    def _on_death(self, pool: Pool, event: Died, timed_out: set[int], retry_heap, unstarted,
                  sequence: int, start_failures: int, *, draining: bool) -> int:
        unstarted.extend(event.unstarted)
        pid = event.handle.pid
        cause = "timeout" if pid in timed_out else "recycle" if event.handle.retiring else "crash"
        timed_out.discard(pid)
        if event.running is not None:
            start_failures = 0
            seconds = time.monotonic() - event.handle.head_started
            if cause == "timeout":
                failure = Failure(TIMEOUT, "ItemTimeout",
                                  f"killed after --item-timeout {self.config.item_timeout:g}s")
            else:
                failure = Failure(CRASHED, "WorkerCrashed", f"worker died ({_exit_text(event.exitcode)})")
                log.warning("worker %d died (%s) while running item %s", pid, _exit_text(event.exitcode),
                            event.running.item_id)
            self.counts.attempts += 1
            self._on_failure(event.running, failure, seconds, None, retry_heap, sequence)
        elif not draining and not event.handle.retiring:
            start_failures += 1
            if start_failures > MAX_START_FAILURES_PER_SLOT * self.config.workers:
                raise UsageError(f"workers keep dying before they start ({_exit_text(event.exitcode)}); "
                                 "check that the handler imports cleanly")
        self.observer.worker_restarted(cause, pid)
        if not draining:
            pool.replace()
        return start_failures

    # -- the end ------------------------------------------------------------------------------

    def _finish(self, manifest: ShardManifest) -> tuple[dict[str, Any], int]:
        timeout = INTERRUPTED_FLUSH_TIMEOUT if self.interrupted else FINAL_FLUSH_TIMEOUT
        saved = self.checkpointer.close(0 if self.lease.lost else timeout)
        self.lease_lost = self.lease.lost
        self.lease.release()
        if not saved and not self.lease_lost:
            self.unsaved = True
            log.error("could not save the last %d record(s) to %s within %.0fs; "
                      "a rerun with the same run id repeats those items",
                      self.checkpointer.unsaved, manifest.url, timeout)
        if self.writeback is not None and not self.writeback.close(timeout):
            saved = False
            log.error("could not write %d item state(s) back to the work table within %.0fs; "
                      "a rerun with the same run id writes them", self.writeback.unsaved, timeout)
        if self.lease_lost:
            code, status = EXIT_LEASE, "lease_lost"
        elif self.interrupted or not saved or self.counts.pending:
            code, status = EXIT_INTERRUPTED, "interrupted" if self.interrupted else "incomplete"
        elif self.counts.failed > self.config.max_failures:
            code, status = EXIT_ITEMS_FAILED, "failed"
        else:
            code, status = EXIT_OK, "ok"
        summary = self.summary(status, code, manifest.url)
        self.observer.run_finished(summary)
        return summary, code

    def summary(self, status: str, code: int, manifest_url: str | None = None) -> dict[str, Any]:
        counts = asdict(self.counts)
        return {"run_id": self.config.run_id, "shard": self.config.shard_index,
                "shard_count": self.config.shard_count, **counts, "pending": self.counts.pending,
                "seconds": round(time.monotonic() - self.started, 3), "status": status,
                "exit_code": code, "manifest": manifest_url}


def _exit_text(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown exit"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
