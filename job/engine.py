"""The event loop of a run: pool events in, the scheduler's decisions out.

The parent decides and the workers execute. Only this loop hands out attempts and records
their ends (through job.recording), and it records a dead worker's item as a failed attempt.
What to do next (retry, refund, pause for an outage, probe) is job.scheduler's decision; how a
run starts and ends is job.run's. This module does the I/O that follows from the decisions,
and stops the loop when the run must stop: a signal, a lost fence, an outage too long.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .lease import LOST, SUSPENDED, VALID
from .outcome import CRASHED, STORE, TIMEOUT, Failure, Outcome
from .pool import Died, Finished, Pool
from .progress import Progress
from .recording import describe, running_record
from .scheduler import FAIL, REFUND, RETRY, STOP, Outage, Scheduler, Task

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("bulkjob")

#: Longest the loop sleeps without looking at the clock (retries due, progress, timeouts).
MAX_TICK = 0.5
#: Workers that die before ever becoming ready, per pool slot, before the run gives up: a
#: handler whose import crashes the process would otherwise restart workers forever.
MAX_START_FAILURES_PER_SLOT = 3
#: While every worker has a task queued behind the one it runs, the loop waits this long
#: before it looks for answers, so that it wakes once for several of them: each wake-up costs
#: the parent more than an answer does. No worker idles meanwhile (its next task is there).
GATHER_SECONDS = 0.001
#: Seconds the loop may wait for a start record to be durable before it tries again later.
START_RECORD_TIMEOUT = 5.0
#: Seconds before the fence's hard deadline (when another runner could take over) at which
#: items still running are killed: the kill and the workers' exit take a moment.
HARD_DEADLINE_MARGIN = 1.0


class Loop:
    """The loop of one run: owns the pool for the run's life; reads and sets the run's state."""

    def __init__(self, run: Run, sched: Scheduler) -> None:
        self.run = run
        self.sched = sched
        self.cfg = run.config
        self.recording = run.recording
        #: Worker pids killed for --item-timeout, and because the fence ran out under them.
        self._timed_out: set[int] = set()
        self._fenced: set[int] = set()
        self._start_failures = 0
        self.pool: Pool | None = None

    def run_loop(self) -> None:
        cfg, run, sched = self.cfg, self.run, self.sched
        # With metrics on, the forkserver imports prometheus_client once (the multiprocess
        # directory is already in its environment), instead of every worker at its start.
        preload: tuple[str, ...] = ("job.worker",)
        if cfg.worker.metrics_dir:
            preload += ("prometheus_client",)
        if cfg.worker.db is not None:
            # Its driver too (psycopg takes ~0.1 s of CPU to import): once, not in every worker
            # at its first item, while the others compete for the CPU.
            preload += (f"job.db.{cfg.worker.db.dialect}",)
        pool = self.pool = Pool(cfg.workers, cfg.worker, prefetch=sched.worker_depth, preload=preload)
        signals, queue = run.signals, run.queue
        progress = Progress(run.counts.total, interval=cfg.progress_interval)
        drain_deadline: float | None = None
        run.observer.run_started(total=run.counts.total, pending=run.counts.pending, workers=cfg.workers)
        try:
            pool.start_items_until(run.lease.valid_until)
            pool.watch(signals.reader)
            if queue is not None:
                pool.watch(queue.wakeup)  # rows claimed: dispatch them now, not at the next tick
            pool.start()
            while True:
                now = time.monotonic()
                if drain_deadline is None:
                    # Before anything goes out: a signal that came while the input was read
                    # must stop the run before its first item.
                    why = self._reason_to_stop(now)
                    if why is not None:
                        drain_deadline = now + cfg.drain_timeout
                        pool.stop_starting_items()
                        if queue is not None:
                            queue.stop_claiming()
                        if pool.busy():
                            log.warning("%s: draining %d running item(s) for up to %.0fs%s", why, pool.busy(),
                                        cfg.drain_timeout,
                                        " (send the signal again to stop at once)" if run.interrupted else "")
                if drain_deadline is None:
                    if run.lease.status() == VALID:  # SUSPENDED: nothing starts, nothing is written
                        self._dispatch(now)
                    if sched.finished() and pool.busy() == 0:
                        break
                elif pool.busy() == 0:
                    break
                if drain_deadline is None and pool.queued_everywhere():
                    time.sleep(GATHER_SECONDS)
                events, woke = pool.wait(self._timeout(now, drain_deadline))
                if woke:
                    signals.drain_wakeups()
                    if queue is not None:
                        queue.drain_wakeups()
                for event in events:
                    if isinstance(event, Finished):
                        self._on_outcome(event.task, event.outcome)
                    else:
                        self._on_death(event, draining=drain_deadline is not None)
                now = time.monotonic()
                self._watch_fence(now)
                self._kill_overdue(now)
                pool.start_items_until(run.lease.valid_until)
                run.recorder.set_running([running_record(w.inflight[0]) for w in pool.workers
                                          if w.ready and w.inflight])
                if drain_deadline is not None and (signals.count > 1 or now >= drain_deadline):
                    running = [w.inflight[0] for w in pool.workers if w.inflight]
                    if running:
                        log.warning("stopping now; %d item(s) cut short and not recorded: %s", len(running),
                                    ", ".join(self.recording.shown(t.item_id, t.payload) for t in running[:10]))
                    pool.close(kill=True)
                    self.recording.cut_short(running)
                    break
                paused = sched.breaker.outage
                progress.total = run.counts.total  # a work table's grows with each claim
                progress.update(done=run.counts.done, failed=run.counts.failed, pending=run.counts.pending,
                                retrying=sched.waiting_retries, paused=pause_text(paused) if paused else None)
                run.observer.progress(total=run.counts.total, done=run.counts.done, failed=run.counts.failed,
                                      pending=run.counts.pending, in_flight=pool.busy(), workers=len(pool.workers))
            if not (run.interrupted or run.lease_lost):
                pool.close()
        finally:
            pool.close(kill=True)
            paused = sched.breaker.outage
            progress.finish(done=run.counts.done, failed=run.counts.failed, pending=run.counts.pending,
                            paused=pause_text(paused) if paused else None)

    def _timeout(self, now: float, drain_deadline: float | None) -> float:
        """How long the next wait may be: until a retry or probe is due, an item overruns, or
        the drain ends, and never more than MAX_TICK."""
        assert self.pool is not None
        timeout = MAX_TICK
        wake = self.sched.next_wake(now)
        if wake is not None:
            timeout = min(timeout, wake)
        if self.cfg.item_timeout:
            deadline = self.pool.next_deadline(self.cfg.item_timeout)
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - now))
        if drain_deadline is not None:
            timeout = min(timeout, max(0.0, drain_deadline - now))
        return timeout

    def _kill_overdue(self, now: float) -> None:
        assert self.pool is not None
        if not self.cfg.item_timeout:
            return
        for handle in self.pool.overdue(self.cfg.item_timeout, now):
            if handle.pid not in self._timed_out:
                self._timed_out.add(handle.pid)
                task = handle.inflight[0]
                log.warning("item %s exceeded --item-timeout %.0fs; killing worker %d",
                            self.recording.shown(task.item_id, task.payload), self.cfg.item_timeout, handle.pid)
                self.pool.kill(handle)

    def _watch_fence(self, now: float) -> None:
        """While the lease (or a work table's claims) cannot be renewed (the store or the
        database unreachable), the run is paused like in an outage: nothing starts and nothing
        is written. Items still running when another runner could take over are killed (their
        attempts given back); when it answers again and the lease (the claim) is still ours,
        the run goes on where it stopped."""
        assert self.pool is not None
        run, words = self.run, self.run.words
        suspended = run.lease.status() == SUSPENDED
        if suspended and run.store_outage is None:
            run.store_outage = now
            log.warning("pausing: %s could not be %s (the %s does not answer); nothing starts and nothing is "
                        "written until it does", words.held, words.kept,
                        "manifest store" if words.system == STORE else "database")
            run.observer.paused(words.system)
        elif not suspended and run.store_outage is not None and run.lease.status() == VALID:
            log.warning("resuming: %s %s again after %.1fs", words.held,
                        "were extended" if run.queue is not None else "was renewed", now - run.store_outage)
            run.observer.resumed(now - run.store_outage)
            run.store_outage = None
        if suspended and now >= run.lease.hard_deadline - HARD_DEADLINE_MARGIN:
            for handle in self.pool.workers:
                if handle.inflight and handle.pid not in self._fenced:
                    self._fenced.add(handle.pid)
                    task = handle.inflight[0]
                    log.warning("time is up for %s; killing worker %d and item %s (not charged)", words.held,
                                handle.pid, self.recording.shown(task.item_id, task.payload))
                    self.pool.kill(handle)

    def _reason_to_stop(self, now: float) -> str | None:
        """Why the run must stop handing out items now (setting the run's state that says so),
        or None to go on."""
        run, cfg = self.run, self.cfg
        outage = self.sched.breaker.outage
        if run.lease.status() == LOST:
            # Another runner has the shard: stop handing out items at once. Running items are
            # killed when the lease runs out; nothing more is written to the manifest.
            run.lease_lost = True
            log.error("lost %s: %s", run.words.held, run.lease.lost_because or "another runner took it")
            return f"lost {run.words.held}"
        if run.signals.count:
            run.interrupted = True
            return f"{signal.Signals(run.signals.last or signal.SIGTERM).name} received"
        if run.config_error is not None:
            return "configuration error"
        if outage is not None and outage.seconds(now) > cfg.outage_timeout:
            run.unavailable = True
            log.error("%s unavailable for %.0fs, longer than --outage-timeout %.0fs; progress is saved, "
                      "run again with --run-id %s once it is back", outage.system or "the environment",
                      outage.seconds(now), cfg.outage_timeout, cfg.run_id)
            return "outage too long"
        claims = run.queue.failing_since if run.queue is not None else None
        stuck = [t for t in (run.store_outage, run.recorder.failing_since, claims) if t is not None]
        if stuck and now - min(stuck) > cfg.outage_timeout:
            run.unavailable = True
            error = run.recorder.last_error or (run.queue.last_error if run.queue is not None else None)
            log.error("%s could not be written for %.0fs, longer than --outage-timeout %.0fs (%s); run again "
                      "once it can", run.words.record, now - min(stuck), cfg.outage_timeout,
                      error or f"the {'store' if run.words.system == STORE else 'database'} does not answer")
            return f"{run.words.record} unavailable too long"
        return None

    def _dispatch(self, now: float) -> None:
        """Fill every free worker slot, a batch per worker in one message. Tasks whose start
        must be recorded first (after a run that died without a word) are written to the
        manifest before any of them goes out; if that cannot be done now, they wait."""
        pool, sched = self.pool, self.sched
        assert pool is not None
        pool.depth = sched.worker_depth
        plan: list[tuple[Any, list[Task]]] = []
        busy = pool.busy()
        for handle in pool.free():
            batch = self._take(pool.room(handle) - len(handle.inflight), now, busy)
            if not batch:
                break
            plan.append((handle, batch))
            busy += len(batch)
        if not plan:
            return
        starts = [running_record(t) for _, batch in plan for t in batch if t.record_start]
        if starts and not self.run.recorder.write_now(starts, START_RECORD_TIMEOUT):
            log.warning("could not record the start of %d item(s) in %s; holding them", len(starts),
                        self.run.words.record)
            for _, batch in reversed(plan):
                sched.put_back(batch)
            return
        for handle, batch in plan:
            sent = pool.submit(handle, batch)
            if sent < len(batch):
                sched.put_back(batch[sent:])

    def _take(self, room: int, now: float, busy: int) -> list[Task]:
        """The scheduler's next tasks for a worker with `room`, less rows whose claims another
        runner took over while this one could not reach the database: those are not this
        runner's any more, and are forgotten."""
        queue = self.run.queue
        while True:
            batch = self.sched.take(room, now, busy=busy)
            if queue is None:
                return batch
            kept = [t for t in batch if not queue.lost(t.item_id)]
            for task in batch:
                if queue.lost(task.item_id):
                    self.sched.discard(task)
                    self.run.counts.total -= 1
            if kept or not batch:
                return kept

    def _on_outcome(self, task: Task, outcome: Outcome) -> None:
        if outcome.attempt == 0:  # sent back unstarted during a drain
            self.sched.put_back([task])
            return
        if outcome.failure is None:
            ended = self.sched.succeeded(task, outcome.seconds, time.monotonic())
            if ended is not None:
                self._resumed(ended)
            self.recording.done(task, outcome)
            return
        self._on_failure(task, outcome.failure, outcome.seconds, outcome.progress)

    def _on_failure(self, task: Task, failure: Failure, seconds: float,
                    progress: dict[str, Any] | None = None) -> None:
        run, sched = self.run, self.sched
        verdict = sched.failed(task, failure, time.monotonic(), progress=progress)
        run.observer.attempt_failed(failure, seconds)
        if verdict.closed is not None:
            self._resumed(verdict.closed)
        if verdict.action == REFUND:
            run.counts.refunded += 1
            if verdict.opened:
                self._paused(sched.breaker.outage)
            else:
                log.debug("attempt %d met %s (%s): not counted, tried again", task.attempt, failure.kind,
                          describe(failure), extra={"item_id": self.recording.shown(task.item_id, task.payload),
                                                    "attempt": task.attempt})
            return
        if verdict.action == STOP:
            run.counts.refunded += 1
            if run.config_error is None:
                run.config_error = f"{failure.system or 'the environment'} refused our settings: {describe(failure)}"
                log.error("%s; stopping: fix the configuration, then run again with --run-id %s",
                          run.config_error, self.cfg.run_id)
            sched.put_back([task])
            return
        run.counts.attempts += 1
        if verdict.action == FAIL:
            self.recording.failed(task.item_id, task.attempt, failure, task.progress, seconds, payload=task.payload)
            return
        assert verdict.action == RETRY
        self.recording.retried(task, failure, verdict.delay)

    def _paused(self, outage: Outage | None) -> None:
        if outage is None or self.pool is None:
            return
        log.warning("pausing: %s unavailable (%s); items are not charged for it, probing until it is back "
                    "(at most --outage-timeout %.0fs)", outage.system or "the environment", outage.reason,
                    self.cfg.outage_timeout)
        self.pool.bump_environment()
        self.run.observer.paused(outage.system or "environment")

    def _resumed(self, outage: Outage) -> None:
        seconds = outage.seconds(time.monotonic())
        log.warning("resuming: %s is back after %.1fs (%d probe(s), %d attempt(s) not charged)",
                    outage.system or "the environment", seconds, outage.probes, outage.refunded)
        self.run.observer.resumed(seconds)

    def _on_death(self, event: Died, *, draining: bool) -> None:
        pool = self.pool
        assert pool is not None
        self.sched.put_back(event.unstarted)
        pid = event.handle.pid
        cause = "timeout" if pid in self._timed_out else "recycle" if event.handle.retiring else "crash"
        self._timed_out.discard(pid)
        if pid in self._fenced:
            # Killed by the run itself because the fence ran out: not the item's fault.
            self._fenced.discard(pid)
            if event.running is not None:
                self.run.counts.refunded += 1
                self.sched.put_back([event.running])
        elif event.running is not None:
            self._start_failures = 0
            seconds = time.monotonic() - event.handle.head_started
            if cause == "timeout":
                failure = Failure(TIMEOUT, "ItemTimeout", f"killed after --item-timeout {self.cfg.item_timeout:g}s")
            else:
                failure = Failure(CRASHED, "WorkerCrashed", f"worker died ({exit_text(event.exitcode)})")
                log.warning("worker %d died (%s) while running item %s", pid, exit_text(event.exitcode),
                            self.recording.shown(event.running.item_id, event.running.payload))
            self._on_failure(event.running, failure, seconds)
        elif not draining and not event.handle.retiring:
            self._start_failures += 1
            if self._start_failures > MAX_START_FAILURES_PER_SLOT * self.cfg.workers:
                raise UsageError(f"workers keep dying before they start ({exit_text(event.exitcode)}); "
                                 "check that the handler imports cleanly")
        self.run.observer.worker_restarted(cause, pid)
        if not draining:
            pool.replace()


def pause_text(outage: Outage) -> str:
    """What the progress line says while dispatch is paused."""
    since = time.strftime("%H:%M:%S", time.gmtime(time.time() - outage.seconds(time.monotonic())))
    return f"{outage.system or 'environment'} unavailable since {since}Z"


def exit_text(exitcode: int | None) -> str:
    """How a worker's end reads in a log line."""
    if exitcode is None:
        return "unknown exit"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
