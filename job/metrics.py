"""Prometheus metrics: served by the parent on /metrics, pushed to a Pushgateway at the end.

With job.metricsfiles (the multiprocess directory), the only modules that import
prometheus_client, and only after PROMETHEUS_MULTIPROC_DIR is set: the library chooses at import
time whether values live in memory or in per-process files.

Where each number is kept:

- What the parent decides (items finished, attempts, retries, worker restarts, checkpoints,
  pending) is counted in plain Python numbers of the parent (`RunMetrics`) and turned into
  metric families when scraped. That costs well under a microsecond per item, and the counters
  cannot go backwards when a worker dies, because no worker holds them.
- Items in flight are counted by each worker around each attempt in its own file of the
  multiprocess directory (a `livesum` gauge) and summed by MultiProcessCollector at scrape time.
  When a worker dies, `mark_process_dead` removes its live files, so the item a killed worker
  held stops counting at once; whatever else a dead worker left (metrics that a handler defines
  with prometheus_client) is merged into one file per kind. The directory therefore holds a few
  files per running worker plus a fixed few, however many workers are replaced.
"""

from __future__ import annotations

import atexit
import bisect
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from .errors import UsageError
from .manifest import DONE
from .metricsfiles import MULTIPROC_ENV, WorkerFiles, fold_dead_process, prepare_directory
from .outcome import Failure

log = logging.getLogger("bulkjob.metrics")

#: Attempt durations: from a 10 ms database call to an item that runs for an hour.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                    600.0, 1200.0, 1800.0, 3600.0)
#: Checkpoint writes: a local file takes milliseconds, S3 under load seconds.
CHECKPOINT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Error label values a run adds to the fixed ones; later new values count as "other", so that a
#: handler putting an id into its error code cannot create a series per item.
MAX_ERROR_LABELS = 20
OTHER = "other"
#: Error labels the parent itself gives (no error, a crash, a timeout, bad input, a bad result).
FIXED_ERROR_LABELS = ("none", "WorkerCrashed", "ItemTimeout", "InvalidItem", "InvalidResult", OTHER)
#: Why a worker was replaced.
RESTART_CAUSES = ("crash", "timeout", "recycle")
#: The Pushgateway `job` label; run_id and shard complete the grouping key.
PUSH_JOB = "bulkjob"
#: Seconds the final push may take: an interrupted pod has little of its grace period left.
PUSH_TIMEOUT = 5.0
#: What a label value built from an error code or class may look like; anything else is "other".
_LABEL_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}\Z")


def error_label(failure: Failure | None) -> str:
    """The error label of an attempt: its error code if it is a plain word (ORA-00060, SlowDown,
    40P01), else its exception class name, else "other"; "none" for a success."""
    if failure is None:
        return "none"
    for candidate in (failure.code, failure.error_class):
        if candidate and _LABEL_VALUE.match(candidate):
            return candidate
    return OTHER


class ErrorLabels:
    """Bounded error label values: the first `limit` new values are kept, later ones are "other"."""

    def __init__(self, limit: int = MAX_ERROR_LABELS) -> None:
        self.known = set(FIXED_ERROR_LABELS)
        self.limit = limit
        self.added = 0

    def __call__(self, failure: Failure | None) -> str:
        label = error_label(failure)
        if label in self.known:
            return label
        if self.added >= self.limit:
            return OTHER
        self.added += 1
        self.known.add(label)
        return label


class Histogram:
    """A histogram as plain numbers, written by one thread and read by the scrape."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) for every bucket, +Inf last."""
        counts = list(self.counts)  # one consistent copy: the writer may go on meanwhile
        total, out = 0, []
        for bound, n in zip((*self.bounds, math.inf), counts, strict=False):
            total += n
            out.append((bound, total))
        return out


class RunMetrics:
    """The run's numbers as the parent's loop reports them: an Observer that does no I/O."""

    def __init__(self, *, run_id: str, shard: int, shard_count: int,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.run_id, self.shard, self.shard_count = run_id, shard, shard_count
        self._clock = clock
        self._monotonic = monotonic
        #: Dispatch paused for an outage: since when (monotonic), of what, and the seconds of
        #: pauses that have ended.
        self.paused_since: float | None = None
        self.paused_system = ""
        self.paused_seconds = 0.0
        self.started_at = clock()
        self.total: int | None = None
        #: The total at the start, the run_info label: fixed, so the series stays one.
        self.total_at_start = 0
        self.pending = 0
        self.workers = 0
        self.finished = {"done": 0, "failed": 0, "skipped": 0}
        self.attempts: dict[tuple[str, str], int] = {("ok", "none"): 0}
        self.retries: dict[str, int] = {}
        self.restarts = dict.fromkeys(RESTART_CAUSES, 0)
        self.duration = {"ok": Histogram(DURATION_BUCKETS), "failed": Histogram(DURATION_BUCKETS)}
        self.checkpoints = {"ok": 0, "failed": 0}
        self.checkpoint_bytes = 0
        self.checkpoint_duration = Histogram(CHECKPOINT_BUCKETS)
        self.last_progress = self.started_at
        self.ended_at: float | None = None
        self.exit_code: int | None = None
        self._errors = ErrorLabels()

    def run_started(self, *, total: int, pending: int, workers: int) -> None:
        self.total, self.pending, self.workers = total, pending, workers
        self.total_at_start = total
        # Finished by an earlier process of the same run id: not run again.
        self.finished["skipped"] = total - pending
        self.last_progress = self._clock()

    def item_finished(self, state: str, seconds: float, failure: Failure | None) -> None:
        if state == DONE:
            self.finished["done"] += 1
            self.attempts["ok", "none"] += 1
            self.duration["ok"].observe(seconds)
        else:
            self.finished["failed"] += 1  # its last attempt was counted by attempt_failed
        self.last_progress = self._clock()

    def attempt_failed(self, failure: Failure, seconds: float) -> None:
        key = (failure.kind, self._errors(failure))
        self.attempts[key] = self.attempts.get(key, 0) + 1
        self.duration["failed"].observe(seconds)
        self.last_progress = self._clock()

    def retry_scheduled(self, failure: Failure) -> None:
        label = self._errors(failure)
        self.retries[label] = self.retries.get(label, 0) + 1

    def worker_restarted(self, cause: str, pid: int) -> None:
        self.restarts[cause if cause in self.restarts else "crash"] += 1

    def checkpoint(self, seconds: float, ok: bool, size: int) -> None:
        self.checkpoints["ok" if ok else "failed"] += 1
        self.checkpoint_bytes += size
        self.checkpoint_duration.observe(seconds)

    def progress(self, *, total: int, done: int, failed: int, pending: int, in_flight: int,
                 workers: int) -> None:
        # A work table's total grows with each claim; a shard's is known from the start.
        self.total, self.pending, self.workers = total, pending, workers

    def paused(self, system: str) -> None:
        if self.paused_since is None:
            self.paused_since, self.paused_system = self._monotonic(), system

    def resumed(self, seconds: float) -> None:
        if self.paused_since is not None:
            self.paused_seconds += self._monotonic() - self.paused_since
            self.paused_since = None

    def total_paused_seconds(self) -> float:
        ongoing = self._monotonic() - self.paused_since if self.paused_since is not None else 0.0
        return self.paused_seconds + ongoing

    def run_finished(self, summary: dict[str, Any]) -> None:
        self.pending = int(summary.get("pending", self.pending))
        self.workers = 0
        self.exit_code = int(summary.get("exit_code", 0))
        self.ended_at = self._clock()

    # -- exposition -------------------------------------------------------------------------

    def collect(self, *, final: bool = False) -> Iterator[Any]:
        """The run's metric families (prometheus_client must be importable: call after setup).

        `final`: for the Pushgateway, which keeps what it is given forever. The last progress
        time is left out there: next to a pending count it would look like a stalled run.
        """
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        def counter(name: str, doc: str, labels: list[str], values: dict) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, value in list(values.items()):
                family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
            return family

        def histogram(name: str, doc: str, labels: list[str], values: dict) -> HistogramMetricFamily:
            family = HistogramMetricFamily(name, doc, labels=labels)
            for key, h in values.items():
                buckets = [(floatToGoString(bound), n) for bound, n in h.cumulative()]
                family.add_metric([key] if labels else [], buckets, h.sum)
            return family

        if self.total is not None:
            info = GaugeMetricFamily("bulkjob_run_info", "Always 1; labels describe the run of this process.",
                                     labels=["run_id", "shard", "shard_count", "total"])
            info.add_metric([self.run_id, str(self.shard), str(self.shard_count), str(self.total_at_start)], 1)
            yield info
            yield GaugeMetricFamily("bulkjob_shard_items",
                                    "Items in this shard of the input (with --work-table: the rows this runner "
                                    "claimed so far).", value=self.total)
            yield GaugeMetricFamily("bulkjob_items_pending", "Items of this shard not yet done or failed.",
                                    value=self.pending)
        yield GaugeMetricFamily("bulkjob_run_start_time_seconds", "When this process started the run, Unix time.",
                                value=self.started_at)
        if not final:
            yield GaugeMetricFamily("bulkjob_last_progress_timestamp_seconds",
                                    "When an attempt last ended (or the run started), Unix time.",
                                    value=self.last_progress)
        yield GaugeMetricFamily("bulkjob_workers_alive", "Worker processes running.", value=self.workers)
        paused = GaugeMetricFamily("bulkjob_paused", "1 while dispatch is paused because the database or the "
                                   "store cannot be reached (items are not charged for it), else 0.",
                                   labels=["system"])
        paused.add_metric([self.paused_system if self.paused_since is not None else ""],
                          0 if final or self.paused_since is None else 1)
        yield paused
        yield CounterMetricFamily("bulkjob_paused_seconds", "Seconds dispatch was paused for outages.",
                                  value=self.total_paused_seconds())
        yield counter("bulkjob_items_finished", "Items finished, by outcome: done, failed (for good), "
                      "skipped (finished by an earlier process of this run).", ["outcome"], self.finished)
        yield counter("bulkjob_attempts", "Attempts ended, by outcome (ok, retryable, permanent, crashed, "
                      "timeout, invalid) and error (code or exception class; bounded).",
                      ["outcome", "error"], self.attempts)
        yield counter("bulkjob_retries", "Retries scheduled, by error of the failed attempt.", ["error"],
                      self.retries)
        yield histogram("bulkjob_attempt_duration_seconds", "How long attempts ran, by outcome (ok, failed).",
                        ["outcome"], self.duration)
        yield counter("bulkjob_worker_restarts", "Workers replaced, by cause: crash, timeout, recycle.",
                      ["cause"], self.restarts)
        yield counter("bulkjob_checkpoint_writes", "Manifest checkpoint writes, by result (ok, failed).",
                      ["result"], self.checkpoints)
        yield CounterMetricFamily("bulkjob_checkpoint_written_bytes", "Bytes of manifest objects written.",
                                  value=self.checkpoint_bytes)
        yield histogram("bulkjob_checkpoint_duration_seconds", "How long checkpoint writes took, failed ones too.",
                        [], {"": self.checkpoint_duration})
        if self.ended_at is not None:
            yield GaugeMetricFamily("bulkjob_run_end_time_seconds", "When this process ended the run, Unix time.",
                                    value=self.ended_at)
            yield GaugeMetricFamily("bulkjob_run_exit_code", "The run's exit code: 0 ok, 1 items failed, 2 usage "
                                    "or configuration, 3 interrupted, 4 lease held or lost, 5 environment "
                                    "unavailable, 70 internal error.", value=self.exit_code)


class PrometheusObserver(RunMetrics):
    """RunMetrics served on /metrics with the workers' files, and pushed at the end of the run.

    Create it in the parent before the pool starts: it creates the multiprocess directory and
    sets PROMETHEUS_MULTIPROC_DIR, which the workers inherit. `close()` must be called at the end.
    """

    def __init__(self, *, run_id: str, shard: int, shard_count: int, port: int = 0,
                 pushgateway: str | None = None, addr: str = "0.0.0.0", base_dir: str | None = None) -> None:
        super().__init__(run_id=run_id, shard=shard, shard_count=shard_count)
        try:
            self.directory = prepare_directory(base_dir)
        except OSError as e:
            raise UsageError(f"cannot create the metrics directory: {e}; point TMPDIR at a writable "
                             "directory (an emptyDir in a pod), or turn metrics off with --metrics-port 0") from e
        os.environ[MULTIPROC_ENV] = self.directory
        self._owner = os.getpid()
        atexit.register(self._remove_directory)
        self.pushgateway = pushgateway
        #: Held while workers' files are read or merged, so no scrape sees a file counted twice.
        self._files_lock = threading.Lock()
        self._server: Any = None
        self._pushed = False
        self.port: int | None = None
        if port:
            self.serve(addr, port)

    def serve(self, addr: str, port: int) -> None:
        """Serve /metrics on `addr`:`port` (a busy port is logged, never raised)."""
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        registry.register(self)
        registry.register(WorkerFiles(MultiProcessCollector(None, path=self.directory), self._files_lock))
        try:
            self._server, _ = start_http_server(port, addr=addr, registry=registry)
        except OSError as e:
            # Two ad hoc runs on one machine must not fail over a port; in a pod the port is ours.
            log.warning("cannot serve metrics on port %d (%s); running without /metrics", port, e)
            return
        self.port = self._server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", addr, self.port)

    def worker_restarted(self, cause: str, pid: int) -> None:
        super().worker_restarted(cause, pid)
        from prometheus_client.multiprocess import mark_process_dead

        with self._files_lock:
            mark_process_dead(pid, self.directory)
            fold_dead_process(self.directory, pid)

    def run_finished(self, summary: dict[str, Any]) -> None:
        super().run_finished(summary)
        self.push()

    def push(self) -> None:
        """Push the run's metrics to --pushgateway, once; a failure is logged, never raised."""
        if not self.pushgateway or self._pushed:
            return
        self._pushed = True
        from prometheus_client import CollectorRegistry, push_to_gateway

        registry = CollectorRegistry()
        registry.register(_Final(self))
        try:
            push_to_gateway(self.pushgateway, job=PUSH_JOB, registry=registry, timeout=PUSH_TIMEOUT,
                            grouping_key={"run_id": self.run_id, "shard": str(self.shard)})
        except Exception as e:  # a lost push must not change how the run ends
            log.warning("could not push the final metrics to %s: %s", _without_userinfo(self.pushgateway), e)
        else:
            log.info("pushed the final metrics to %s", _without_userinfo(self.pushgateway))

    def close(self, exit_code: int | None = None) -> None:
        """End of the process: push if the run ended early (`exit_code`, 1 when unknown), stop
        serving, remove the directory. Safe to call more than once."""
        if self.ended_at is None:
            self.exit_code = 1 if exit_code is None else exit_code
            self.ended_at = self._clock()
            self.workers = 0
        self.push()
        if self._server is not None:
            # shutdown() waits for the serving loop's next poll (up to half a second): not worth
            # holding up the end of the run for, so the server stops on its own thread.
            server, self._server = self._server, None
            threading.Thread(target=lambda: (server.shutdown(), server.server_close()), daemon=True,
                             name="bulkjob-metrics-stop").start()
        self._remove_directory()

    def _remove_directory(self) -> None:
        if os.getpid() == self._owner:
            shutil.rmtree(self.directory, ignore_errors=True)


class _Final:
    """The run's metrics as pushed at its end."""

    def __init__(self, metrics: RunMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        return self._metrics.collect(final=True)


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"
