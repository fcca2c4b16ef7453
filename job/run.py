"""One run of one shard (or one runner of a work table), from start to end: it opens the shard
(job.startup), plans what is left (job.plan), hands the loop (job.engine) its scheduler, then
flushes what was recorded, releases the fence and says how the run ended (job.exits).
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

from . import items as items_module
from .checkpoint import Checkpointer
from .config import RunConfig
from .engine import Loop
from .errors import UsageError
from .exits import EXIT_INTERNAL, EXIT_OK, run_exit_code, status_of
from .lease import LOST
from .manifest import DONE, FAILED, FINISHED, VALID_INPUT, ItemStates, ShardManifest
from .observe import NullObserver, Observer
from .outcome import CRASHED, Failure
from .plan import Crashed, Decision, Refused, plan
from .recording import CLAIM_WORDS, LEASE_WORDS, Counts, Recorder, Recording
from .scheduler import NotYet, Outage, Scheduler, Task
from .signals import Signals
from .sources import FileLines
from .startup import Shard, database_of, open_shard, open_work_table, patiently, work_table_of

if TYPE_CHECKING:
    from .db.queue import ClaimQueue
    from .lease import Lease

log = logging.getLogger("bulkjob")

T = TypeVar("T")

#: Seconds the final flush may take after a normal end, after an interruption (when the pod's
#: grace period is running out), and after an outage past --outage-timeout (a store that has
#: not answered for that long is not waited for again; a database outage leaves the store
#: answering at once).
FINAL_FLUSH_TIMEOUT = 120.0
INTERRUPTED_FLUSH_TIMEOUT = 10.0
UNAVAILABLE_FLUSH_TIMEOUT = 5.0
#: After a run that died without a word, how many tasks go out with their start recorded
#: first: twice what the dead run's last checkpoint held (about what it did unrecorded before
#: it died), plus this many per worker, and never fewer than CAREFUL_MIN in all.
CAREFUL_PER_WORKER = 4
CAREFUL_MIN = 16
#: The parent's GIL switch interval while a run is under way (Python's default is 5 ms). The
#: dispatch loop keeps the GIL busy; a background thread (the work-table write-back, the
#: checkpoints, the lease) gives it up at every network wait and waits up to the interval to
#: get it back: a 500-row psycopg executemany took 0.11-0.19 s beside a busy thread at 5 ms,
#: 0.04-0.06 s at 0.5 ms, and several seconds on a loaded machine. The cost is paid only when
#: another thread waits for the GIL.
SWITCH_SECONDS = 0.0005


class Run:
    """One invocation of `bulkjob run` for one shard, or one runner of a work table."""

    def __init__(self, config: RunConfig, *, observer: Observer | None = None) -> None:
        self.config = config
        self.observer: Observer = observer or NullObserver()
        self.counts = Counts()
        self.started = time.monotonic()
        # How it is going; the loop sets these, the end reads them.
        self.interrupted = False
        self.lease_lost = False
        self.unavailable = False
        self.unsaved = False
        #: A configuration error met mid-run (a password changed, an account locked): exit 2.
        self.config_error: str | None = None
        self.internal_error = False
        #: Since when (monotonic) the fence could not be renewed, while it cannot.
        self.store_outage: float | None = None
        self._rand = random.Random()
        self.sched: Scheduler | None = None
        #: The claims on a --work-table, which are then the fence; None otherwise.
        self.queue: ClaimQueue | None = None
        self.words = LEASE_WORDS
        self.meta: dict[str, Any] = {}
        #: The first pass over a file's lines (its digest is what FINISHED remembers).
        self._input: items_module.Scan | None = None

    # Set once the shard is open: the fence, where records go, and what records them.
    lease: Lease | ClaimQueue
    recorder: Recorder
    recording: Recording
    signals: Signals

    def execute(self) -> tuple[dict[str, Any], int]:
        """Run the shard to its end (or to an interruption); returns (summary, exit code)."""
        # Signals are caught from the start: a SIGTERM while the input is read ends the run
        # with exit 3 before any item is handed out.
        self.signals = Signals()
        self.signals.install()
        switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_SECONDS)
        try:
            with contextlib.ExitStack() as stack:
                if work_table_of(self.config) is not None:
                    return self._work_table(stack)
                return self._shard(stack)
        finally:
            sys.setswitchinterval(switch)
            self.signals.uninstall()

    def _patiently(self, what: str, fn: Callable[[], T]) -> T:
        return patiently(what, fn, timeout=self.config.outage_timeout, signals=self.signals,
                         rand=self._rand.random)

    def _use(self, lease: Lease | ClaimQueue, recorder: Recorder) -> None:
        self.lease, self.recorder = lease, recorder
        self.recording = Recording(recorder, self.counts, self.observer,
                                   redact_fields=self.config.worker.redact_fields)

    # -- a shard of an input ------------------------------------------------------------------

    def _shard(self, stack: contextlib.ExitStack) -> tuple[dict[str, Any], int]:
        cfg = self.config
        shard = open_shard(cfg, stack, signals=self.signals, rand=self._rand.random)
        if shard.finished is not None:
            return self._finished_before(shard)
        states = shard.states
        self.counts.total = shard.scan.shard_items + len(shard.invalid)
        self._count_known(states)
        self.counts.total += shard.source.finished_earlier(states, retry_failed=cfg.retry_failed)
        if cfg.dry_run:
            self._check_payloads(shard)
            return self._plan_summary(shard), EXIT_OK
        manifest, lease = shard.manifest, shard.lease
        assert lease is not None
        previous = shard.loaded.meta or {}
        self.meta = dict(previous, run_id=cfg.run_id, shard_index=cfg.shard_index, shard_count=cfg.shard_count,
                         items=shard.source.name, handler=cfg.handler, total=self.counts.total,
                         last_started_at=time.time(), state="running", generation=lease.generation)
        self.meta.setdefault("created_at", self.meta["last_started_at"])
        # From here on the records may change: no earlier end vouches for them any more.
        self.meta.pop(FINISHED, None)
        self._input = shard.scan if isinstance(shard.source, FileLines) else None
        self.meta.pop(VALID_INPUT, None)
        if self._input is not None and not self._input.invalid:
            self.meta[VALID_INPUT] = {"input": self._input.digest, "max_item_bytes": cfg.max_item_bytes}
        self._patiently("the manifest store", lambda: manifest.write_meta(self.meta))
        failed_before = states.count(FAILED)
        log.info("run %s shard %d/%d: %d items, %d already done, %s; manifest %s",
                 cfg.run_id, cfg.shard_index, cfg.shard_count, self.counts.total, self.counts.done,
                 f"retrying {failed_before} that failed (--retry-failed)" if cfg.retry_failed
                 else f"{failed_before} already failed", manifest.url)
        self._use(lease, Checkpointer(manifest, shard.loaded, generation=lease.generation,
                                      interval=cfg.checkpoint_interval, observe=self.observer.checkpoint,
                                      fence=lease.fence))
        self.recorder.start()
        for bad in shard.invalid:
            known = states.get(bad.record_id)
            if known is None or known.state != FAILED or cfg.retry_failed:
                self.recording.invalid(bad, shard.source.name)
        with shard.source() as it:
            # Nothing left to run (a resume of a finished shard): the input is not read again.
            items = items_module.iter_items(it, shard_index=cfg.shard_index, shard_count=cfg.shard_count,
                                            skip_lines=shard.scan.skip_lines) if shard.scan.to_run else iter(())
            decisions = plan(items, states, max_attempts=cfg.policy.max_attempts, retry_failed=cfg.retry_failed)
            self.sched = Scheduler(self._tasks(decisions), policy=cfg.policy, rand=self._rand.random,
                                   fixed_depth=cfg.prefetch or None)
            if previous.get("state") == "running":
                # The last runner of this shard died without a word (SIGKILL, OOM, node loss):
                # whatever killed it may be among the first items again.
                self.sched.careful = max(CAREFUL_MIN, 2 * shard.loaded.last_checkpoint_records
                                         + CAREFUL_PER_WORKER * cfg.workers)
                log.warning("the last run of this shard ended without a word; the first %d item(s) "
                            "go out one per worker, each start recorded first", self.sched.careful)
            self._loop(self.sched)
        return self._finish(manifest)

    def _count_known(self, states: ItemStates) -> None:
        self.counts.done = states.count(DONE)
        if not self.config.retry_failed:
            self.counts.failed = states.count(FAILED)
        self.counts.skipped_already_done = self.counts.done

    def _check_payloads(self, shard: Shard) -> None:
        """For --dry-run: ask a handler that can check payloads (the SQL steps handler) about
        every item of the shard; any problem is a usage error."""
        check = getattr(shard.handler, "check_payload", None)
        if check is None:
            return
        cfg = self.config
        problems: list[str] = []
        with shard.source() as it:
            for item in items_module.iter_items(it, shard_index=cfg.shard_index, shard_count=cfg.shard_count,
                                                skip_lines=shard.scan.skip_lines):
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
            "shard_count": self.config.shard_count, "items": shard.source.name, "manifest": shard.manifest.url,
            "lines": scan.lines, "valid_items": scan.valid, "invalid_lines": len(scan.invalid),
            "items_per_shard": scan.per_shard,
            "total": self.counts.total, "already_done": self.counts.done,
            "already_failed": self.counts.failed, "to_run": self.counts.pending,
            "workers": self.config.workers, "handler": self.config.handler,
        }

    # -- a work table -------------------------------------------------------------------------

    def _work_table(self, stack: contextlib.ExitStack) -> tuple[dict[str, Any], int]:
        """A work table as a claim queue: rows come from claims as the scheduler asks for them,
        the claims are the fence, and the table is the run's record (no manifest)."""
        cfg = self.config
        work = open_work_table(cfg, stack, signals=self.signals, rand=self._rand.random)
        if cfg.dry_run:
            from .db.worktable import table_status

            counts = self._patiently("the work table", lambda: table_status(database_of(cfg), work.table))
            return {"dry_run": True, "run_id": cfg.run_id, "work_table": work.table, "rows": counts,
                    "workers": cfg.workers, "handler": cfg.handler}, EXIT_OK
        self.queue = work.queue
        self._use(work.queue, work.recorder)
        self.words = CLAIM_WORDS
        log.info("run %s: runner %s claims rows of work table %s (%d worker(s); claims last %gs unless "
                 "extended)", cfg.run_id, work.queue.runner, work.table, cfg.workers, cfg.lease_ttl)
        self.recorder.start()
        self.sched = Scheduler(self._tasks(work.queue.tasks()), policy=cfg.policy, rand=self._rand.random,
                               fixed_depth=cfg.prefetch or None)
        self._loop(self.sched)
        return self._finish(None)

    # -- the loop -----------------------------------------------------------------------------

    def _tasks(self, decisions: Iterator[Decision | NotYet]) -> Iterator[Task | NotYet]:
        """The tasks to hand out; on the way, what needs no run is acted on. A claim queue's
        NOT_YET passes through, and each row it gives counts in this runner's total."""
        for decision in decisions:
            if isinstance(decision, NotYet):
                yield decision
                continue
            if self.queue is not None:
                self.counts.total += 1
            if isinstance(decision, Task):
                yield decision
            elif isinstance(decision, Crashed):
                self.counts.attempts += 1
                self.recording.failed(decision.item.id, decision.attempts, Failure(
                    CRASHED, "RunCrashed", f"the whole run died while this item ran, {decision.attempts} "
                    "time(s) (killed with its pod: out of memory, SIGKILL, node loss)"), decision.progress,
                    payload=decision.item.payload)
            elif isinstance(decision, Refused):
                self.recording.failed(decision.item.id, 0, decision.failure, payload=decision.item.payload)

    def _loop(self, sched: Scheduler) -> None:
        try:
            Loop(self, sched).run_loop()
        except UsageError as e:
            # Decided on purpose (workers that cannot even start): nothing more can run.
            log.error("%s", e)
            self.config_error = str(e).splitlines()[0]
        except Exception:
            # Save what is done so that a rerun resumes, and say it was cut short.
            log.exception("internal error; stopping. Progress so far is saved%s", " in the work table"
                          if self.queue is not None else f": rerun with --run-id {self.config.run_id} to resume")
            self.internal_error = True

    # -- the end ------------------------------------------------------------------------------

    def _finish(self, manifest: ShardManifest | None) -> tuple[dict[str, Any], int]:
        """Flush the record, release the fence, and say how the run ended. `manifest` is None
        for a work table (the table is the record; the claims are given back on release)."""
        timeout = (UNAVAILABLE_FLUSH_TIMEOUT if self.unavailable else INTERRUPTED_FLUSH_TIMEOUT if self.interrupted
                   else FINAL_FLUSH_TIMEOUT)
        self.recorder.set_running([])
        # Flushed while the lease is still held, and not at all once it is lost: an old runner
        # must never write over a new one's records or work-table rows.
        lost = self.lease.status() == LOST
        saved = self.recorder.close(0 if lost else timeout)
        self.lease_lost = self.lease_lost or lost or self.lease.status() == LOST
        if not saved and not self.lease_lost:
            self.unsaved = True
            where = manifest.url if manifest is not None else f"work table {self.queue.table if self.queue else ''}"
            log.error("could not save the last %d record(s) to %s within %.0fs; %s",
                      self.recorder.unsaved, where, timeout,
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

    def _finished_before(self, shard: Shard) -> tuple[dict[str, Any], int]:
        """An earlier run finished every item of the shard on this same input: say so and end,
        with the exit code that run's failures call for (job.startup._finished_on_this_input)."""
        ended = shard.finished
        assert ended is not None
        cfg = self.config
        self.counts.total, self.counts.done, self.counts.failed = ended["total"], ended["done"], ended["failed"]
        self.counts.skipped_already_done = self.counts.done
        log.info("run %s shard %d/%d: every one of its %d items was finished by an earlier run on this same input "
                 "(%d done, %d failed); nothing to do", cfg.run_id, cfg.shard_index, cfg.shard_count,
                 self.counts.total, self.counts.done, self.counts.failed)
        self.observer.run_started(total=self.counts.total, pending=0, workers=0)
        code = run_exit_code(interrupted=False, lease_lost=False, unavailable=False, unsaved=False,
                             config_error=False, failed=self.counts.failed, max_failures=cfg.max_failures)
        summary = self.summary(status_of(code), code, shard.manifest.url)
        self.observer.run_finished(summary)
        return summary, code

    def _end_meta(self, manifest: ShardManifest) -> None:
        """Say in meta.json that this runner ended with its word (no attempt left running), so
        that the next one starts at full speed; and, when every item of the shard is finished,
        what a rerun must find unchanged to end at once (FINISHED)."""
        meta = dict(self.meta, state="ended", last_ended_at=time.time())
        scan = self._input
        if scan is not None and scan.digest and self.counts.total and not self.counts.pending \
                and not (self.interrupted or self.lease_lost or self.unavailable or self.unsaved
                         or self.internal_error or self.config_error):
            try:
                records = manifest.records_digest()
            except Exception as e:  # the next run reads the records, as it would anyway
                log.warning("could not read back %s to remember this run's end: %s", manifest.url, e)
                records = None
            if records is not None:
                meta[FINISHED] = {"input": scan.digest, "lines": scan.lines,
                                  "max_item_bytes": self.config.max_item_bytes, "invalid": len(scan.invalid),
                                  "total": self.counts.total, "done": self.counts.done,
                                  "failed": self.counts.failed, "records": records}
        try:
            manifest.write_meta(meta)
        except Exception as e:  # the next run only starts more carefully
            log.warning("could not mark the shard's end in %smeta.json: %s", manifest.url, e)

    def summary(self, status: str, code: int, manifest_url: str | None = None) -> dict[str, Any]:
        """The run's summary: the counts, how it ended, its outages, and one line of error."""
        summary: dict[str, Any] = {"run_id": self.config.run_id, "shard": self.config.shard_index,
                                   "shard_count": self.config.shard_count, **asdict(self.counts),
                                   "pending": self.counts.pending,
                                   "seconds": round(time.monotonic() - self.started, 3), "status": status,
                                   "exit_code": code, "manifest": manifest_url}
        if self.queue is not None:
            summary.update(shard=None, shard_count=None, work_table=self.queue.table, runner=self.queue.runner,
                           taken_over=self.queue.taken_over, given_back=self.queue.given_back,
                           overtaken=self.queue.overtaken)
        if self.sched is not None:
            breaker = self.sched.breaker
            summary["outages"] = [outage_summary(o) for o in breaker.history + ([breaker.outage] if breaker.outage
                                                                               else [])]
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
            return f"lost {self.words.held}: another runner took over"
        if self.unavailable:
            return f"unavailable for longer than --outage-timeout {self.config.outage_timeout:g}s; progress saved"
        if self.unsaved:
            if self.queue is not None:
                return ("could not write every row's state to the work table; those rows run again once their "
                        "claims expire")
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


def outage_summary(outage: Outage) -> dict[str, Any]:
    """One outage as the summary lists it."""
    now = time.monotonic()
    started = time.time() - (now - outage.started)
    return {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(outage.seconds(now), 3), "system": outage.system, "reason": outage.reason,
            "probes": outage.probes, "refunded": outage.refunded, "ongoing": outage.ended is None}
