"""Prometheus's multiprocess directory of a run: made fresh per parent process, read at every
scrape, and kept small as workers die (their files folded into one per kind). With job.metrics,
the only modules that import prometheus_client, and only after the directory is set.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any

log = logging.getLogger("bulkjob.metrics")

#: The variable prometheus_client reads for its multiprocess directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The run's multiprocess directory is $TMPDIR/bulkjob-metrics-<pid>-<random>: one per parent
#: process, so that two runs on one machine, or one pod's restarted containers, never mix files.
DIR_PREFIX = "bulkjob-metrics-"
#: How the values a dead worker left are merged, by file kind. Counters and histograms add up;
#: gauges keep their multiprocess mode's meaning. Gauges in mode "all" are series of one process
#: (a pid label) and go with it; "live" gauges are removed by mark_process_dead.
_MERGE = {"counter": "sum", "histogram": "sum", "summary": "sum", "gauge_sum": "sum",
          "gauge_min": "min", "gauge_max": "max", "gauge_mostrecent": "mostrecent"}
MERGED = "merged"


#: Reads of the workers' files per scrape before giving up (see WorkerFiles.collect).
READ_ATTEMPTS = 5


class WorkerFiles:
    """The workers' metric files, read under the lock that merging a dead worker's files holds."""

    def __init__(self, collector: Any, lock: threading.Lock) -> None:
        self._collector = collector
        self._lock = lock

    def collect(self) -> list[Any]:
        # A worker that is just starting creates its file empty and sizes it a moment later;
        # reading it in between fails (an empty file cannot be mapped). Try again shortly
        # rather than answer the scrape with an error.
        for attempt in range(READ_ATTEMPTS):
            with self._lock:
                try:
                    return list(self._collector.collect())
                except (ValueError, OSError):
                    if attempt == READ_ATTEMPTS - 1:
                        raise
            time.sleep(0.01)
        return []


def prepare_directory(base: str | None = None) -> str:
    """Create this process's empty multiprocess directory under `base` (default $TMPDIR, else
    /tmp), after removing those left by runs whose process is gone."""
    base = base or tempfile.gettempdir()
    _remove_stale(base)
    return tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=base)


def _remove_stale(base: str) -> None:
    me = os.getpid()
    for path in glob.glob(os.path.join(glob.escape(base), DIR_PREFIX + "*")):
        pid_text = os.path.basename(path)[len(DIR_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid != me:  # our own pid: an earlier container of this pod, same pid, same emptyDir
            try:
                os.kill(pid, 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, another user's
        shutil.rmtree(path, ignore_errors=True)


def fold_dead_process(directory: str, pid: int) -> None:
    """Merge the metric files a dead process left into the `*_merged.db` files, and remove them.

    prometheus_client keeps a dead process's counter files so that counters do not go
    backwards; merging keeps the values without keeping a file per process ever started.
    """
    from prometheus_client.mmap_dict import MmapedDict

    suffix = f"_{pid}.db"
    for path in glob.glob(os.path.join(glob.escape(directory), f"*{suffix}")):
        kind = os.path.basename(path)[:-len(suffix)]
        how = _MERGE.get(kind)
        if how is not None:
            target = os.path.join(directory, f"{kind}_{MERGED}.db")
            values: dict[str, tuple[float, float]] = {}
            if os.path.exists(target):
                for key, value, ts, _ in MmapedDict.read_all_values_from_file(target):
                    values[key] = (value, ts)
            for key, value, ts, _ in MmapedDict.read_all_values_from_file(path):
                values[key] = _merge_value(how, values.get(key), (value, ts))
            tmp = target + ".tmp"  # not *.db: a scrape never reads a half-written file
            if os.path.exists(tmp):
                os.remove(tmp)
            out = MmapedDict(tmp)
            try:
                for key, (value, ts) in values.items():
                    out.write_value(key, value, ts)
            finally:
                out.close()
            os.replace(tmp, target)
        os.remove(path)


def _merge_value(how: str, old: tuple[float, float] | None, new: tuple[float, float]) -> tuple[float, float]:
    if old is None:
        return new
    if how == "sum":
        return old[0] + new[0], max(old[1], new[1])
    if how == "min":
        return min(old, new)
    if how == "max":
        return max(old, new)
    return max(old, new, key=lambda v: v[1])  # mostrecent: the later timestamp wins


def worker_in_flight(directory: str) -> Any:
    """In a worker, before anything else imports prometheus_client: the gauge of items in flight,
    kept in this process's own file in `directory`. None if prometheus_client was imported
    before the directory was set (the gauge would count in memory only)."""
    os.environ[MULTIPROC_ENV] = directory
    from prometheus_client import Gauge, values

    if not getattr(values.ValueClass, "_multiprocess", False):
        log.warning("prometheus_client was imported before %s was set; items in flight are not counted",
                    MULTIPROC_ENV)
        return None
    return Gauge("bulkjob_items_in_flight", "Attempts running in workers now.", multiprocess_mode="livesum")
