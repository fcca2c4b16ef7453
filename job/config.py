"""The frozen settings a run is handed (RunConfig, and WorkerSettings for each worker), their
named defaults, and `run_config`, the one place they are built from the options of `bulkjob run`.

Pure but for `cgroup_cpu_limit` and `visible_cpus`, which read what the --workers default needs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .retry import RetryPolicy

if TYPE_CHECKING:
    from .db import DbSettings
    from .db.query import DbItems
    from .options import RunOptions

#: Default seconds between manifest checkpoints: at most this much progress is repeated after
#: a crash, and one object is written per interval.
DEFAULT_CHECKPOINT_INTERVAL = 5.0
#: Default seconds to let running items finish after SIGTERM; Kubernetes' default grace period is
#: 30 s and the pod must still flush the manifest after the drain.
DEFAULT_DRAIN_TIMEOUT = 20.0
#: Default port for /metrics: outside the 9100-9999 range Prometheus allocates to exporters.
DEFAULT_METRICS_PORT = 8799
#: Default address for /metrics: all interfaces, because Prometheus scrapes a pod on its own IP.
DEFAULT_METRICS_HOST = "0.0.0.0"
#: Default manifest location: a local directory, for ad hoc runs.
DEFAULT_MANIFEST = "./bulkjob-state"
#: Seconds between progress lines when stderr is not a terminal (pod logs).
DEFAULT_PROGRESS_INTERVAL = 30.0
#: Tasks a worker may hold, the running one included; 0 adapts it to the items' duration
#: (see job.engine.QUEUED_SECONDS).
DEFAULT_PREFETCH = 0
#: Default seconds an outage may last before the run gives up with exit 5 (progress saved): a
#: database restart or failover takes seconds to minutes; much longer is for a person to see.
DEFAULT_OUTAGE_TIMEOUT = 900.0
#: One shard: a single process runs every item unless the items are split on purpose.
DEFAULT_SHARD_COUNT = 1
#: No failed item is tolerated unless asked: a run that lost items must not look like success.
DEFAULT_MAX_FAILURES = 0
#: Log formats: text for a person at a terminal, JSON for a log pipeline.
LOG_FORMATS = ("text", "json")
#: Text by default: what `kubectl logs` and a terminal show readably.
DEFAULT_LOG_FORMAT = "text"
#: The levels a run may log at, the most talkative first.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: INFO: the start, progress lines, outages and each item that failed for good, not every retry.
DEFAULT_LOG_LEVEL = "INFO"
#: Formats of `bulkjob report`: JSON Lines keeps each failure's traceback, CSV suits a spreadsheet.
REPORT_FORMATS = ("jsonl", "csv")
#: JSON Lines: the complete record, for a program to read.
DEFAULT_REPORT_FORMAT = "jsonl"
#: Where Airflow's KubernetesPodOperator reads a task's XCom value from.
AIRFLOW_XCOM_PATH = Path("/airflow/xcom/return.json")


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "KI": 1024, "MI": 1024**2, "GI": 1024**3}


def parse_size(text: str) -> int:
    """Bytes in '512M', '2Gi', '1048576' (binary units, as Kubernetes' Mi and Gi)."""
    value = text.strip().upper().removesuffix("B")
    digits = value.rstrip("KMGI")
    unit = value[len(digits):]
    if not digits.isdigit() or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size such as 512M or 2Gi")
    return int(digits) * _SIZE_UNITS[unit]


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota (v2 `cpu.max`, else v1 cfs files), None when unlimited."""
    try:
        max_quota, max_period = (root / "cpu.max").read_text().split()[:2]
        if max_quota != "max":
            return int(max_quota) / int(max_period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def default_workers(limit: float | None, visible_cpus: int) -> int:
    """Workers when --workers is not given: the CPU limit rounded up, else the CPUs this process
    may run on; at least 1. The host's CPU count is never used: a pod limited to 2 CPUs on a
    64-core node must not start 64 workers."""
    if limit is not None:
        return max(1, math.ceil(limit))
    return max(1, visible_cpus)


def visible_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), else the host's CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1




@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings:
    """What every worker process needs; pickled once per worker start."""

    handler: str
    run_id: str
    shard_index: int
    shard_count: int
    #: Exception classes or code prefixes that make a failure retryable (--retry-on), or mean "the
    #: environment is unavailable" (--outage-on).
    retry_on: tuple[str, ...]
    outage_on: tuple[str, ...]
    log_format: str
    log_level: str
    log_file: str | None
    #: --log-file rotates at this size and keeps this many old files.
    log_file_max_bytes: int
    log_file_backups: int
    #: Payload fields (--redact) whose values are secret for the item that carries them.
    redact_fields: tuple[str, ...]
    #: The multiprocess metrics directory when metrics are on: workers count items in flight there.
    metrics_dir: str | None
    #: Address-space limit of a worker in bytes (RLIMIT_AS), and items after which it is replaced.
    memory_limit: int | None
    max_items_per_worker: int | None
    #: The database for ctx.db and sql: handlers (--db), None without one.
    db: DbSettings | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Everything `bulkjob run` was asked to do, with what the start resolved (run id, shard,
    workers, the database)."""

    items: str | None
    handler: str
    manifest: str
    run_id: str
    shard_index: int
    shard_count: int
    workers: int
    policy: RetryPolicy
    item_timeout: float | None
    max_failures: int
    checkpoint_interval: float
    drain_timeout: float
    retry_failed: bool
    dry_run: bool
    skip_invalid: bool
    xcom_path: Path | None
    s3_endpoint_url: str | None
    progress_interval: float
    prefetch: int
    max_item_bytes: int
    lease_ttl: float
    #: How long a starting run watches a shard whose lease another runner holds (None: the
    #: TTL plus what a takeover needs, see job.lease.default_wait).
    lease_wait: float | None
    manifest_repair: bool
    outage_timeout: float
    #: An input without items is accepted (--allow-empty) instead of being a usage error.
    allow_empty: bool
    #: Items from the database (--items-sql, or a work table) instead of `items`.
    db_items: DbItems | None
    worker: WorkerSettings


def run_config(options: RunOptions, *, run_id: str, shard_index: int, workers: int, xcom_path: Path | None,
               db: DbSettings | None, db_items: DbItems | None, metrics_dir: str | None) -> RunConfig:
    """The settings of a run from its options and what its start resolved: the run id (given
    or new), the shard (given, or the Job's index, or 0), the workers (given, or from the CPU
    limit), the XCom path, the database and its items, the metrics directory (None: off)."""
    o = options
    worker = WorkerSettings(
        handler=o.handler, run_id=run_id, shard_index=shard_index, shard_count=o.shard_count,
        retry_on=o.retry_on, outage_on=o.outage_on, log_format=o.log_format, log_level=o.log_level.upper(),
        log_file=o.log_file, log_file_max_bytes=o.log_file_max_bytes, log_file_backups=o.log_file_backups,
        redact_fields=o.redact, metrics_dir=metrics_dir, memory_limit=o.worker_memory_limit,
        max_items_per_worker=o.max_items_per_worker, db=db)
    # A --max-backoff below --backoff counts as --backoff: the cap never cuts the base wait short.
    policy = RetryPolicy(o.max_attempts, o.backoff, max(o.max_backoff, o.backoff))
    return RunConfig(
        items=o.items, handler=o.handler, manifest=o.manifest, run_id=run_id, shard_index=shard_index,
        shard_count=o.shard_count, workers=workers, policy=policy, item_timeout=o.item_timeout,
        max_failures=o.max_failures, checkpoint_interval=o.checkpoint_interval, drain_timeout=o.drain_timeout,
        retry_failed=o.retry_failed, dry_run=o.dry_run, skip_invalid=o.skip_invalid, xcom_path=xcom_path,
        s3_endpoint_url=o.s3_endpoint_url, progress_interval=o.progress_interval, prefetch=o.prefetch,
        max_item_bytes=o.max_item_bytes, lease_ttl=o.lease_ttl, lease_wait=o.lease_wait,
        manifest_repair=o.manifest_repair, outage_timeout=o.outage_timeout, allow_empty=o.allow_empty,
        db_items=db_items, worker=worker)
