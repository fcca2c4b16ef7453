"""Configuration, read once by the CLI into frozen values that are passed down."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .retry import RetryPolicy

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
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
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
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What every worker process needs; pickled once per worker start."""

    handler: str
    run_id: str
    shard_index: int
    shard_count: int
    retry_on: tuple[str, ...] = ()
    #: Exception classes or code prefixes that mean "the environment is unavailable" (--outage-on).
    outage_on: tuple[str, ...] = ()
    log_format: str = "text"
    log_level: str = "INFO"
    log_file: str | None = None
    #: --log-file rotates at this size (None: job.logs' default) and keeps this many old files.
    log_file_max_bytes: int | None = None
    log_file_backups: int | None = None
    #: Secret values to keep out of logs, results and errors, besides the environment's.
    redact: tuple[str, ...] = ()
    #: Payload fields (--redact) whose values are secret for the item that carries them.
    redact_fields: tuple[str, ...] = ()
    #: The multiprocess metrics directory when metrics are on: workers count items in flight there.
    metrics_dir: str | None = None
    #: Address-space limit of a worker in bytes (RLIMIT_AS), and items after which it is replaced.
    memory_limit: int | None = None
    max_items_per_worker: int | None = None
    #: Database settings (a `job.db.DbSettings`) when --db is given.
    db: object | None = None


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything `bulkjob run` was asked to do."""

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
    retry_on: tuple[str, ...]
    xcom_path: Path | None
    s3_endpoint_url: str | None
    progress_interval: float
    prefetch: int = DEFAULT_PREFETCH
    max_item_bytes: int = 1024 * 1024
    lease_ttl: float = 30.0
    #: How long a starting run watches a shard whose lease another runner holds (None: the
    #: TTL plus what a takeover needs, see job.lease.default_wait).
    lease_wait: float | None = None
    manifest_repair: bool = False
    outage_timeout: float = DEFAULT_OUTAGE_TIMEOUT
    #: An input without items is accepted (--allow-empty) instead of being a usage error.
    allow_empty: bool = False
    #: Items from the database (a `job.db.query.DbItems`: a query, or a work table) instead of `items`.
    db_items: object | None = None
    worker: WorkerSettings = field(default=None)  # type: ignore[assignment]
