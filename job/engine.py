"""The run: the parent's event loop. Pool events go in, the scheduler's decisions come out.

The parent decides and the workers execute. Only this loop hands out attempts, only it adds
manifest records, and it records a dead worker's item as a failed attempt. What to do next
(retry, refund, pause for an outage, probe) is job.scheduler's decision; this module does the
I/O that follows from it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from . import items as items_module
from .checkpoint import Checkpointer
from .config import RunConfig
from .errors import UsageError
from .exits import EXIT_INTERNAL, EXIT_OK, run_exit_code, status_of
from .lease import LOST, SUSPENDED, VALID
from .manifest import DONE, FAILED, PARTIAL, RUNNING, ItemStates, ShardManifest
from .observe import NullObserver, Observer
from .outcome import CRASHED, DATABASE, STORE, TIMEOUT, Failure, Outcome
from .plan import Crashed, Decision, Refused, plan
from .pool import Died, Finished, Pool
from .progress import Progress
from .redact import field_values, scrub_text
from .scheduler import FAIL, NOT_YET, REFUND, RETRY, STOP, Outage, Scheduler, Task
from .signals import Signals
from .startup import Shard, open_shard, open_work_table, patiently, work_table_of
from .tracebacks import raised_at

log = logging.getLogger("bulkjob")

#: Seconds the final flush may take after a normal end, after an interruption (when the pod's
#: grace period is running out), and after an outage past --outage-timeout (a store that has
#: not answered for that long is not waited for again; a database outage leaves the store
#: answering at once).
FINAL_FLUSH_TIMEOUT = 120.0
INTERRUPTED_FLUSH_TIMEOUT = 10.0
UNAVAILABLE_FLUSH_TIMEOUT = 5.0
#: Longest the loop sleeps without looking at the clock (retries due, progress, timeouts).
MAX_TICK = 0.5
#: Workers that die before ever becoming ready, per pool slot, before the run gives up: a
#: handler whose import crashes the process would otherwise restart workers forever.
MAX_START_FAILURES_PER_SLOT = 3
#: After a run that died without a word, how many tasks go out with their start recorded
#: first: twice what the dead run's last checkpoint held (about what it did unrecorded before
#: it died), plus this many per worker, and never fewer than CAREFUL_MIN in all.
CAREFUL_PER_WORKER = 4
CAREFUL_MIN = 16
#: Seconds the loop may wait for a start record to be durable before it tries again later.
START_RECORD_TIMEOUT = 5.0
#: Seconds before the lease's hard deadline (when another runner could take over) at which
#: items still running are killed: the kill and the workers' exit take a moment.
HARD_DEADLINE_MARGIN = 1.0
#: Longest traceback kept with a failed item in the manifest and the log: its last lines
#: (where the error was raised) matter most.
MAX_TRACEBACK_CHARS = 4000


@dataclass(frozen=True, slots=True)
class FenceWords:
    """How the logs and the summary speak of the run's fence and record: a shard's lease and
    manifest, or a runner's claims on a work table."""

    #: What holds the run's right to act ("the lease on this shard").
    held: str
    #: What keeping it is called ("renewed").
    kept: str
    #: The system whose silence suspends it (job.outcome's STORE or DATABASE).
    system: str
    #: Where the run's record goes ("the manifest").
    record: str


LEASE_WORDS = FenceWords("the lease on this shard", "renewed", STORE, "the manifest")
CLAIM_WORDS = FenceWords("this runner's claims", "extended", DATABASE, "the work table")


@dataclass(slots=True)
class Counts:
    total: int = 0
    done: int = 0
    failed: int = 0
    skipped_already_done: int = 0
    retries: int = 0
    attempts: int = 0
    #: Attempts that met an outage or a configuration error: not charged to their items.
    refunded: int = 0

    @property
    def pending(self) -> int:
        return max(0, self.total - self.done - self.failed)


class Run:
    """One invocation of `bulkjob run` for one shard."""

    def __init__(self, config: RunConfig, *, observer: Observer | None = None) -> None:
        self.config = config
        self.observer = observer or NullObserver()
        self.counts = Counts()
        self.started = time.monotonic()
        self.interrupted = False
        self.lease_lost = False
        self.unavailable = False
        self.unsaved = False
        #: A configuration error met mid-run (a password changed, an account locked): exit 2.
        self.config_error: str | None = None
        self.internal_error = False
        self._rand = random.Random()
        self.sched: Scheduler | None = None
        #: The claims on a --work-table (job.db.queue), which are then the fence; None otherwise.
        self.queue = None
        self.words = LEASE_WORDS
        #: Since when (monotonic) the lease could not be renewed, while it cannot.
        self._store_outage: float | None = None

    # -- start-up -----------------------------------------------------------------------------

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

    def _patiently(self, what: str, fn, *args, **kwargs):
        return patiently(what, lambda: fn(*args, **kwargs), timeout=self.config.outage_timeout,
                         signals=self.signals, rand=self._rand.random)

    def _execute(self) -> tuple[dict[str, Any], int]:
        cfg = self.config
        with contextlib.ExitStack() as stack:
            if work_table_of(cfg) is not None:
                return self._execute_claims(stack)
            shard = open_shard(cfg, stack, signals=self.signals, rand=self._rand.random)
            self.shard = shard
            if shard.lease is not None:
                self.lease = shard.lease
            states = shard.states
            self.counts.total = shard.scan.shard_items + len(shard.invalid)
            self._count_known(states)
            if cfg.db_items is not None:
                self.counts.total += shard.lines.finished_earlier(states, retry_failed=cfg.retry_failed)
            if cfg.dry_run:
                self._check_payloads(shard.handler, shard.lines, shard.scan)
                return self._plan_summary(shard), EXIT_OK
            manifest, lease = shard.manifest, self.lease
            previous = shard.loaded.meta or {}
            self.meta = dict(previous, run_id=cfg.run_id, shard_index=cfg.shard_index, shard_count=cfg.shard_count,
                             items=shard.source_name, handler=cfg.handler, total=self.counts.total,
                             last_started_at=time.time(), state="running", generation=lease.generation)
            self.meta.setdefault("created_at", self.meta["last_started_at"])
            self._patiently("the manifest store", manifest.write_meta, self.meta)
            failed_before = states.count(FAILED)
            log.info("run %s shard %d/%d: %d items, %d already done, %s; manifest %s",
                     cfg.run_id, cfg.shard_index, cfg.shard_count, self.counts.total, self.counts.done,
                     f"retrying {failed_before} that failed (--retry-failed)" if cfg.retry_failed
                     else f"{failed_before} already failed", manifest.url)
            self.checkpointer = Checkpointer(manifest, shard.loaded, generation=lease.generation,
                                             interval=cfg.checkpoint_interval, observe=self.observer.checkpoint,
                                             fence=lease.fence)
            self.checkpointer.start()
            for bad in shard.invalid:
                known = states.get(bad.record_id)
                if known is None or known.state != FAILED or cfg.retry_failed:
                    self._record_invalid(bad, shard.source_name)
            with shard.lines() as it:
                # Nothing left to run (a resume of a finished shard): the input is not read again.
                items = items_module.iter_items(it, shard_index=cfg.shard_index, shard_count=cfg.shard_count,
                                                skip_lines=shard.scan.skip_lines) if shard.scan.to_run else iter(())
                decisions = plan(items, states, max_attempts=cfg.policy.max_attempts, retry_failed=cfg.retry_failed)
                self.sched = Scheduler(self._tasks(decisions), policy=cfg.policy, rand=self._rand.random,
                                       fixed_depth=cfg.prefetch or None)
                if previous.get("state") == "running":
                    # The last runner of this shard died without a word (SIGKILL, OOM, node
                    # loss): whatever killed it may be among the first items again.
                    self.sched.careful = max(CAREFUL_MIN, 2 * shard.loaded.last_checkpoint_records
                                             + CAREFUL_PER_WORKER * cfg.workers)
                    log.warning("the last run of this shard ended without a word; the first %d item(s) "
                                "go out one per worker, each start recorded first", self.sched.careful)
                self._run_loop(self.sched)
            return self._finish(manifest)

    def _execute_claims(self, stack: contextlib.ExitStack) -> tuple[dict[str, Any], int]:
        """A work table as a claim queue: rows come from claims as the scheduler asks for them,
        the claims are the fence, and the table is the run's record (no manifest)."""
        cfg = self.config
        work = open_work_table(cfg, stack, signals=self.signals, rand=self._rand.random)
        if cfg.dry_run:
            from .db.worktable import table_status

            counts = self._patiently("the work table", table_status, cfg.worker.db, work.table)
            return {"dry_run": True, "run_id": cfg.run_id, "work_table": work.table, "rows": counts,
                    "workers": cfg.workers, "handler": cfg.handler}, EXIT_OK
        self.queue, self.lease, self.checkpointer = work.queue, work.queue, work.recorder
        self.words = CLAIM_WORDS
        log.info("run %s: runner %s claims rows of work table %s (%d worker(s); claims last %gs unless "
                 "extended)", cfg.run_id, work.queue.runner, work.table, cfg.workers, cfg.lease_ttl)
        self.checkpointer.start()
        self.sched = Scheduler(self._tasks(work.queue.tasks()), policy=cfg.policy, rand=self._rand.random,
                               fixed_depth=cfg.prefetch or None)
        self._run_loop(self.sched)
        return self._finish(None)

    def _run_loop(self, sched: Scheduler) -> None:
        try:
            self._loop(sched)
        except UsageError as e:
            # Decided on purpose (workers that cannot even start): nothing more can run.
            log.error("%s", e)
            self.config_error = str(e).splitlines()[0]
        except Exception:
            # Save what is done so that a rerun resumes, and say it was cut short.
            log.exception("internal error; stopping. Progress so far is saved%s", " in the work table"
                          if self.queue is not None else f": rerun with --run-id {self.config.run_id} to resume")
            self.internal_error = True

    def _count_known(self, states: ItemStates) -> None:
        self.counts.done = states.count(DONE)
        if not self.config.retry_failed:
            self.counts.failed = states.count(FAILED)
        self.counts.skipped_already_done = self.counts.done

    def _tasks(self, decisions: Iterator[Decision]) -> Iterator[Task]:
        """The tasks to hand out; on the way, what needs no run is acted on. A claim queue's
        NOT_YET passes through, and each row it gives counts in this runner's total."""
        for decision in decisions:
            if decision is NOT_YET:
                yield decision
                continue
            if self.queue is not None:
                self.counts.total += 1
            if isinstance(decision, Task):
                yield decision
            elif isinstance(decision, Crashed):
                self.counts.attempts += 1
                self._record_failed(decision.item.id, decision.attempts, Failure(
                    CRASHED, "RunCrashed", f"the whole run died while this item ran, {decision.attempts} "
                    "time(s) (killed with its pod: out of memory, SIGKILL, node loss)"), decision.progress,
                    payload=decision.item.payload)
            elif isinstance(decision, Refused):
                self._record_failed(decision.item.id, 0, decision.failure, payload=decision.item.payload)

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

    def _plan_summary(self, shard: Shard) -> dict[str, Any]:
        scan = shard.scan
        return {
            "dry_run": True, "run_id": self.config.run_id, "shard": self.config.shard_index,
            "shard_count": self.config.shard_count, "items": shard.source_name, "manifest": shard.manifest.url,
            "lines": scan.lines, "valid_items": scan.valid, "invalid_lines": len(scan.invalid),
            "items_per_shard": scan.per_shard,
            "total": self.counts.total, "already_done": self.counts.done,
            "already_failed": self.counts.failed, "to_run": self.counts.pending,
            "workers": self.config.workers, "handler": self.config.handler,
        }

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self, sched: Scheduler) -> None:
        cfg = self.config
        # With metrics on, the forkserver imports prometheus_client once (the multiprocess
        # directory is already in its environment), instead of every worker at its start.
        preload = ("job.worker",)
        if cfg.worker.metrics_dir:
            preload += ("prometheus_client",)
        pool = Pool(cfg.workers, cfg.worker, prefetch=sched.worker_depth, preload=preload)
        self._pool = pool
        signals = self.signals
        progress = Progress(self.counts.total, interval=cfg.progress_interval)
        queue = self.queue
        timed_out: set[int] = set()
        #: Workers killed because the lease ran out under them: their attempts are given back.
        self._fenced: set[int] = set()
        drain_deadline: float | None = None
        start_failures = 0
        self.observer.run_started(total=self.counts.total, pending=self.counts.pending,
                                  workers=cfg.workers)
        try:
            pool.start_items_until(self.lease.valid_until)
            pool.watch(signals.reader)
            if queue is not None:
                pool.watch(queue.wakeup)  # rows claimed: dispatch them now, not at the next tick
            pool.start()
            while True:
                now = time.monotonic()
                if drain_deadline is None:
                    # Before anything goes out: a signal that came while the input was read
                    # must stop the run before its first item.
                    why = self._reason_to_stop(sched, now)
                    if why is not None:
                        drain_deadline = now + cfg.drain_timeout
                        pool.stop_starting_items()
                        if queue is not None:
                            queue.stop_claiming()
                        if pool.busy():
                            log.warning("%s: draining %d running item(s) for up to %.0fs%s", why, pool.busy(),
                                        cfg.drain_timeout,
                                        " (send the signal again to stop at once)" if self.interrupted else "")
                if drain_deadline is None:
                    if self.lease.status() == VALID:  # SUSPENDED: nothing starts, nothing is written
                        self._dispatch(pool, sched, now)
                    if sched.finished() and pool.busy() == 0:
                        break
                elif pool.busy() == 0:
                    break
                timeout = MAX_TICK
                wake = sched.next_wake(now)
                if wake is not None:
                    timeout = min(timeout, wake)
                if cfg.item_timeout:
                    deadline = pool.next_deadline(cfg.item_timeout)
                    if deadline is not None:
                        timeout = min(timeout, max(0.0, deadline - now))
                if drain_deadline is not None:
                    timeout = min(timeout, max(0.0, drain_deadline - now))
                events, woke = pool.wait(timeout)
                if woke:
                    signals.drain_wakeups()
                    if queue is not None:
                        queue.drain_wakeups()
                for event in events:
                    if isinstance(event, Finished):
                        self._on_outcome(event.task, event.outcome)
                    else:
                        start_failures = self._on_death(pool, event, timed_out, start_failures,
                                                        draining=drain_deadline is not None)
                now = time.monotonic()
                self._watch_lease(pool, sched, now)
                if cfg.item_timeout:
                    for handle in pool.overdue(cfg.item_timeout, now):
                        if handle.pid not in timed_out:
                            timed_out.add(handle.pid)
                            log.warning("item %s exceeded --item-timeout %.0fs; killing worker %d",
                                        self._shown(handle.inflight[0].item_id, handle.inflight[0].payload),
                                        cfg.item_timeout, handle.pid)
                            pool.kill(handle)
                pool.start_items_until(self.lease.valid_until)
                self.checkpointer.set_running(self._running_records(pool))
                if drain_deadline is not None and (signals.count > 1 or now >= drain_deadline):
                    running = [w.inflight[0] for w in pool.workers if w.inflight]
                    if running:
                        log.warning("stopping now; %d item(s) cut short and not recorded: %s",
                                    len(running), ", ".join(self._shown(t.item_id, t.payload) for t in running[:10]))
                    pool.close(kill=True)
                    self._cut_short(running)
                    break
                paused = sched.breaker.outage
                progress.total = self.counts.total  # a work table's grows with each claim
                progress.update(done=self.counts.done, failed=self.counts.failed, pending=self.counts.pending,
                                retrying=sched.waiting_retries,
                                paused=_pause_text(paused) if paused is not None else None)
                self.observer.progress(done=self.counts.done, failed=self.counts.failed,
                                       pending=self.counts.pending, in_flight=pool.busy(),
                                       workers=len(pool.workers))
            if not (self.interrupted or self.lease_lost):
                pool.close()
        finally:
            pool.close(kill=True)
            paused = sched.breaker.outage
            progress.finish(done=self.counts.done, failed=self.counts.failed, pending=self.counts.pending,
                            paused=_pause_text(paused) if paused is not None else None)

    def _watch_lease(self, pool: Pool, sched: Scheduler, now: float) -> None:
        """While the lease (or a work table's claims) cannot be renewed (the store or the
        database unreachable), the run is paused like in an outage: nothing starts and nothing
        is written. Items still running when another runner could take over are killed (their
        attempts given back); when it answers again and the lease (the claim) is still ours,
        the run goes on where it stopped."""
        words = self.words
        suspended = self.lease.status() == SUSPENDED
        if suspended and self._store_outage is None:
            self._store_outage = now
            log.warning("pausing: %s could not be %s (the %s does not answer); nothing starts and nothing is "
                        "written until it does", words.held, words.kept,
                        "manifest store" if words.system == STORE else "database")
            self.observer.paused(words.system)
        elif not suspended and self._store_outage is not None and self.lease.status() == VALID:
            log.warning("resuming: %s %s again after %.1fs", words.held,
                        "were extended" if self.queue is not None else "was renewed", now - self._store_outage)
            self.observer.resumed(now - self._store_outage)
            self._store_outage = None
        if suspended and now >= self.lease.hard_deadline - HARD_DEADLINE_MARGIN:
            for handle in pool.workers:
                if handle.inflight and handle.pid not in self._fenced:
                    self._fenced.add(handle.pid)
                    log.warning("time is up for %s; killing worker %d and item %s (not charged)", words.held,
                                handle.pid, self._shown(handle.inflight[0].item_id, handle.inflight[0].payload))
                    pool.kill(handle)

    def _reason_to_stop(self, sched: Scheduler, now: float) -> str | None:
        """Why the run must stop handing out items now, or None to go on."""
        outage = sched.breaker.outage
        if self.lease.status() == LOST:
            # Another runner has the shard: stop handing out items at once. Running items are
            # killed when the lease runs out; nothing more is written to the manifest.
            self.lease_lost = True
            log.error("lost the lease on this shard: %s", self.lease.lost_because or "another runner took it")
            return "lost the lease on this shard"
        if self.signals.count:
            self.interrupted = True
            return f"{signal.Signals(self.signals.last).name} received"
        if self.config_error is not None:
            return "configuration error"
        if outage is not None and outage.seconds(now) > self.config.outage_timeout:
            self.unavailable = True
            log.error("%s unavailable for %.0fs, longer than --outage-timeout %.0fs; progress is saved, "
                      "run again with --run-id %s once it is back", outage.system or "the environment",
                      outage.seconds(now), self.config.outage_timeout, self.config.run_id)
            return "outage too long"
        claims = self.queue.failing_since if self.queue is not None else None
        stuck = [t for t in (self._store_outage, self.checkpointer.failing_since, claims) if t is not None]
        if stuck and now - min(stuck) > self.config.outage_timeout:
            self.unavailable = True
            error = self.checkpointer.last_error or (self.queue.last_error if self.queue is not None else None)
            log.error("%s could not be written for %.0fs, longer than --outage-timeout %.0fs (%s); run again "
                      "once it can", self.words.record, now - min(stuck), self.config.outage_timeout,
                      error or f"the {'store' if self.words.system == STORE else 'database'} does not answer")
            return f"{self.words.record} unavailable too long"
        return None

    def _dispatch(self, pool: Pool, sched: Scheduler, now: float) -> None:
        """Fill every free worker slot, a batch per worker in one message. Tasks whose start
        must be recorded first (after a run that died without a word) are written to the
        manifest before any of them goes out; if that cannot be done now, they wait."""
        pool.depth = sched.worker_depth
        plan: list[tuple[Any, list[Task]]] = []
        busy = pool.busy()
        for handle in pool.free():
            batch = self._take(sched, pool.room(handle) - len(handle.inflight), now, busy)
            if not batch:
                break
            plan.append((handle, batch))
            busy += len(batch)
        if not plan:
            return
        starts = [_running_record(t) for _, batch in plan for t in batch if t.record_start]
        if starts and not self.checkpointer.write_now(starts, START_RECORD_TIMEOUT):
            log.warning("could not record the start of %d item(s) in %s; holding them", len(starts),
                        self.words.record)
            for _, batch in reversed(plan):
                sched.put_back(batch)
            return
        for handle, batch in plan:
            sent = pool.submit(handle, batch)
            if sent < len(batch):
                sched.put_back(batch[sent:])

    def _take(self, sched: Scheduler, room: int, now: float, busy: int) -> list[Task]:
        """The scheduler's next tasks for a worker with `room`, less rows whose claims another
        runner took over while this one could not reach the database: those are not this
        runner's any more, and are forgotten."""
        while True:
            batch = sched.take(room, now, busy=busy)
            if self.queue is None:
                return batch
            kept = [t for t in batch if not self.queue.lost(t.item_id)]
            for task in batch:
                if self.queue.lost(task.item_id):
                    sched.discard(task)
                    self.counts.total -= 1
            if kept or not batch:
                return kept

    @staticmethod
    def _running_records(pool: Pool) -> list[dict[str, Any]]:
        """A `running` record for the attempt each ready worker is running now."""
        return [_running_record(w.inflight[0]) for w in pool.workers if w.ready and w.inflight]

    def _cut_short(self, running: list[Task]) -> None:
        """Attempts the run killed itself at the end of a drain are not the items' fault: their
        running records are superseded, with the attempt given back."""
        for task in running:
            record = {"id": task.item_id, "state": PARTIAL, "attempts": task.attempt - 1,
                      "at": round(time.time(), 3)}
            if task.progress:
                record["progress"] = task.progress
            self.checkpointer.add(record)

    def _on_outcome(self, task: Task, outcome: Outcome) -> None:
        if outcome.attempt == 0:  # sent back unstarted during a drain
            self.sched.put_back([task])
            return
        if outcome.failure is None:
            self.counts.attempts += 1
            self.counts.done += 1
            ended = self.sched.succeeded(task, outcome.seconds, time.monotonic())
            if ended is not None:
                self._resumed(ended)
            record = {"id": task.item_id, "state": DONE, "attempts": task.attempt, "at": round(time.time(), 3),
                      "seconds": round(outcome.seconds, 6)}
            if outcome.result is not None:
                record["result"] = outcome.result
            self.checkpointer.add(record)
            self.observer.item_finished(DONE, outcome.seconds, None)
            return
        self._on_failure(task, outcome.failure, outcome.seconds, outcome.progress)

    def _on_failure(self, task: Task, failure: Failure, seconds: float, progress=None) -> None:
        sched = self.sched
        verdict = sched.failed(task, failure, time.monotonic(), progress=progress)
        self.observer.attempt_failed(failure, seconds)
        if verdict.closed is not None:
            self._resumed(verdict.closed)
        if verdict.action == REFUND:
            self.counts.refunded += 1
            if verdict.opened:
                self._paused(sched.breaker.outage)
            else:
                log.debug("attempt %d met %s (%s): not counted, tried again", task.attempt, failure.kind,
                          _describe(failure), extra={"item_id": self._shown(task.item_id, task.payload),
                                                     "attempt": task.attempt})
            return
        if verdict.action == STOP:
            self.counts.refunded += 1
            if self.config_error is None:
                self.config_error = f"{failure.system or 'the environment'} refused our settings: {_describe(failure)}"
                log.error("%s; stopping: fix the configuration, then run again with --run-id %s",
                          self.config_error, self.config.run_id)
            sched.put_back([task])
            return
        self.counts.attempts += 1
        if verdict.action == FAIL:
            self._record_failed(task.item_id, task.attempt, failure, task.progress, seconds, payload=task.payload)
            return
        assert verdict.action == RETRY
        self.counts.retries += 1
        self.observer.retry_scheduled(failure)
        # Kept so that a restart continues the count (and resumes where the attempt got to).
        record = {"id": task.item_id, "state": PARTIAL, "attempts": task.attempt, "at": round(time.time(), 3),
                  "error": failure.as_record()}
        if task.progress:
            record["progress"] = task.progress
        self.checkpointer.add(record)
        log.debug("attempt %d failed (%s); retry in %.2fs", task.attempt, _describe(failure), verdict.delay,
                  extra={"item_id": self._shown(task.item_id, task.payload), "attempt": task.attempt})

    def _paused(self, outage: Outage | None) -> None:
        if outage is None:
            return
        log.warning("pausing: %s unavailable (%s); items are not charged for it, probing until it is back "
                    "(at most --outage-timeout %.0fs)", outage.system or "the environment", outage.reason,
                    self.config.outage_timeout)
        self._pool.bump_environment()
        self.observer.paused(outage.system or "environment")

    def _resumed(self, outage: Outage) -> None:
        seconds = outage.seconds(time.monotonic())
        log.warning("resuming: %s is back after %.1fs (%d probe(s), %d attempt(s) not charged)",
                    outage.system or "the environment", seconds, outage.probes, outage.refunded)
        self.observer.resumed(seconds)

    def _shown(self, item_id: str, payload: Any) -> str:
        """The item's id as the logs show it: without the values of its --redact fields."""
        fields = self.config.worker.redact_fields
        return scrub_text(item_id, field_values(payload, fields)) if fields else item_id

    def _record_failed(self, item_id: str, attempts: int, failure: Failure, progress=None,
                       seconds: float = 0.0, *, payload: Any = None) -> None:
        self.counts.failed += 1
        error = failure.as_record()
        trace = _trimmed(failure.traceback)
        if trace:
            error["traceback"] = trace
        record = {"id": item_id, "state": FAILED, "attempts": attempts, "at": round(time.time(), 3),
                  "error": error}
        if progress:
            record["progress"] = progress
        self.checkpointer.add(record)
        self.observer.item_finished(FAILED, seconds, failure)
        # With a traceback (which ends with the whole message), the first line says what and where.
        at = raised_at(trace)
        what = (_describe(failure).splitlines() or [""])[0] if trace else _describe(failure)
        log.warning("failed after %d attempt(s): %s%s%s", attempts, what, f" ({at})" if at else "",
                    f"\n{trace}" if trace else "",
                    extra={"item_id": self._shown(item_id, payload), "attempt": attempts})

    def _record_invalid(self, bad: items_module.Invalid, source_name: str) -> None:
        """Record an input line that is not a valid item as failed (--skip-invalid), under its
        line's id."""
        self.counts.failed += 1
        record = bad.record(at=time.time())
        self.checkpointer.add(record)
        self.observer.item_finished(FAILED, 0.0, bad.failure())
        log.warning("%s line %d: %s; recorded as failed (--skip-invalid)", source_name, bad.line, bad.reason)

    def _on_death(self, pool: Pool, event: Died, timed_out: set[int], start_failures: int, *,
                  draining: bool) -> int:
        self.sched.put_back(event.unstarted)
        pid = event.handle.pid
        cause = "timeout" if pid in timed_out else "recycle" if event.handle.retiring else "crash"
        timed_out.discard(pid)
        if pid in self._fenced:
            # Killed by the run itself because the lease ran out: not the item's fault.
            self._fenced.discard(pid)
            if event.running is not None:
                self.counts.refunded += 1
                self.sched.put_back([event.running])
        elif event.running is not None:
            start_failures = 0
            seconds = time.monotonic() - event.handle.head_started
            if cause == "timeout":
                failure = Failure(TIMEOUT, "ItemTimeout",
                                  f"killed after --item-timeout {self.config.item_timeout:g}s")
            else:
                failure = Failure(CRASHED, "WorkerCrashed", f"worker died ({_exit_text(event.exitcode)})")
                log.warning("worker %d died (%s) while running item %s", pid, _exit_text(event.exitcode),
                            self._shown(event.running.item_id, event.running.payload))
            self._on_failure(event.running, failure, seconds)
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

    def _finish(self, manifest: ShardManifest | None) -> tuple[dict[str, Any], int]:
        """Flush the record, release the fence, and say how the run ended. `manifest` is None
        for a work table (the table is the record; the claims are given back on release)."""
        # After a signal the pod's grace period is running out; after an outage too long the
        # store has had its chance.
        timeout = (UNAVAILABLE_FLUSH_TIMEOUT if self.unavailable else INTERRUPTED_FLUSH_TIMEOUT if self.interrupted
                   else FINAL_FLUSH_TIMEOUT)
        self.checkpointer.set_running([])
        # Flushed while the lease is still held, and not at all once it is lost: an old runner
        # must never write over a new one's records or work-table rows.
        lost = self.lease.status() == LOST
        saved = self.checkpointer.close(0 if lost else timeout)
        self.lease_lost = self.lease_lost or lost or self.lease.status() == LOST
        if not saved and not self.lease_lost:
            self.unsaved = True
            where = manifest.url if manifest is not None else f"work table {self.queue.table}"
            log.error("could not save the last %d record(s) to %s within %.0fs; %s",
                      self.checkpointer.unsaved, where, timeout,
                      "a rerun with the same run id repeats those items" if manifest is not None
                      else "their rows run again once their claims expire")
        if manifest is not None and saved and self.lease.writable():
            self._end_meta(manifest)
        self.lease.release()
        if self.internal_error:
            code = EXIT_INTERNAL
        else:
            code = run_exit_code(interrupted=self.interrupted, lease_lost=self.lease_lost,
                                 unavailable=self.unavailable, unsaved=self.unsaved,
                                 config_error=self.config_error is not None, failed=self.counts.failed,
                                 max_failures=self.config.max_failures)
            if code == EXIT_OK and self.counts.pending:
                log.error("internal error: the run ended with %d item(s) neither done nor failed",
                          self.counts.pending)
                code = EXIT_INTERNAL
        summary = self.summary(status_of(code), code, manifest.url if manifest is not None else None)
        self.observer.run_finished(summary)
        return summary, code

    def _end_meta(self, manifest: ShardManifest) -> None:
        """Say in meta.json that this runner ended with its word (no attempt left running), so
        that the next one starts at full speed."""
        meta = dict(self.meta, state="ended", last_ended_at=time.time())
        try:
            manifest.write_meta(meta)
        except Exception as e:  # the next run only starts more carefully
            log.warning("could not mark the shard's end in %smeta.json: %s", manifest.url, e)

    def summary(self, status: str, code: int, manifest_url: str | None = None) -> dict[str, Any]:
        counts = asdict(self.counts)
        summary = {"run_id": self.config.run_id, "shard": self.config.shard_index,
                   "shard_count": self.config.shard_count, **counts, "pending": self.counts.pending,
                   "seconds": round(time.monotonic() - self.started, 3), "status": status,
                   "exit_code": code, "manifest": manifest_url}
        if self.queue is not None:
            summary.update(shard=None, shard_count=None, work_table=self.queue.table, runner=self.queue.runner,
                           taken_over=self.queue.taken_over, given_back=self.queue.given_back)
        if self.sched is not None:
            outages = self.sched.breaker.history + ([self.sched.breaker.outage] if self.sched.breaker.outage else [])
            summary["outages"] = [_outage_summary(o) for o in outages]
        error = self._error_line()
        if error:
            summary["error"] = error
        return summary

    def _error_line(self) -> str | None:
        """One line for the summary: why the run did not end ok."""
        if self.internal_error:
            return "internal error (a bug in bulkjob): see the logged traceback; progress is saved"
        if self.config_error is not None:
            return self.config_error
        if self.lease_lost:
            return "lost the lease on this shard: another runner took it over"
        if self.unavailable:
            return f"unavailable for longer than --outage-timeout {self.config.outage_timeout:g}s; progress saved"
        if self.unsaved:
            if self.queue is not None:
                return "could not write every row's state to the work table; those rows run again once their " \
                       "claims expire"
            return "could not save progress to the manifest; run again with the same --run-id"
        if self.interrupted:
            return "interrupted by a signal; progress saved"
        if self.counts.failed > self.config.max_failures:
            if self.queue is not None:
                return (f"{self.counts.failed} row(s) failed (--max-failures {self.config.max_failures}); "
                        f"`bulkjob report --work-table {self.queue.table} --db ...` lists them")
            return (f"{self.counts.failed} item(s) failed (--max-failures {self.config.max_failures}); "
                    f"`bulkjob report --run-id {self.config.run_id}` lists them, --retry-failed runs them again")
        return None


def _running_record(task: Task) -> dict[str, Any]:
    record: dict[str, Any] = {"id": task.item_id, "state": RUNNING, "attempts": task.attempt}
    if task.progress:
        record["progress"] = task.progress
    return record


def _describe(failure: Failure) -> str:
    return f"{failure.error_class}{f' {failure.code}' if failure.code else ''}: {failure.message}"


def _pause_text(outage: Outage) -> str:
    since = time.strftime("%H:%M:%S", time.gmtime(time.time() - outage.seconds(time.monotonic())))
    return f"{outage.system or 'environment'} unavailable since {since}Z"


def _outage_summary(outage: Outage) -> dict[str, Any]:
    now = time.monotonic()
    started = time.time() - (now - outage.started)
    return {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(outage.seconds(now), 3), "system": outage.system, "reason": outage.reason,
            "probes": outage.probes, "refunded": outage.refunded, "ongoing": outage.ended is None}


def _trimmed(trace: str | None) -> str | None:
    if not trace:
        return None
    trace = trace.rstrip()
    if len(trace) <= MAX_TRACEBACK_CHARS:
        return trace
    return "...\n" + trace[-MAX_TRACEBACK_CHARS:]


def _exit_text(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown exit"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"

