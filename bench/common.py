"""What every workload needs: items files, the S3 test server, and running the real job."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .procstats import read_stats

ROOT = Path(__file__).resolve().parent.parent
# The test suite's helpers for loopback servers (tests/ports.py, tests/pg.py) serve here too.
sys.path.insert(0, str(ROOT / "tests"))
from ports import free_port, wait_for_port  # noqa: E402

#: The job's own interpreter (.venv): the benchmarks run under it.
PYTHON = sys.executable
#: Credentials the S3 test server accepts (any value does; these are not secrets).
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "bench"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_items(path: Path, count: int, payload: Callable[[int], dict] | None = None) -> Path:
    """`count` items `item-0000001`... (JSON Lines), written in large blocks: a million lines
    must not take longer to write than to run."""
    with open(path, "w") as f:
        block = []
        for i in range(1, count + 1):
            body = json.dumps(payload(i), separators=(",", ":")) if payload else "{}"
            block.append(f'{{"id":"item-{i:07d}","payload":{body}}}\n')
            if len(block) == 10000:
                f.write("".join(block))
                block = []
        f.write("".join(block))
    return path


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a job run: none of the caller's BULKJOB_*/AWS_* settings, the repo on
    PYTHONPATH (for bench.handlers), and `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BULKJOB_", "AWS_", "JOB_COMPLETION", "PROMETHEUS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def log_time(line: str) -> float | None:
    """The wall-clock time of a bulkjob text log line (`2026-11-25T08:35:51.662Z INFO ...`)."""
    stamp = line.split(" ", 1)[0]
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


class S3Server:
    """bench.s3server (moto, counting requests) on a free loopback port, with one bucket."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([PYTHON, "-m", "bench.s3server", str(self.port)], cwd=ROOT,
                                        env=clean_env(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        self.env = {**S3_ENV, "AWS_ENDPOINT_URL": self.url}
        # The bench process itself reads manifests through job.store, the way `bulkjob status` does.
        os.environ.update(self.env)
        self.client().create_bucket(Bucket=BUCKET)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])

    def manifest(self, name: str) -> str:
        return f"s3://{BUCKET}/{name}"

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.url + "/_bench/reset", method="POST"), timeout=10).read()

    def requests(self) -> list[dict]:
        """Every request the server answered since the last reset, in order."""
        with urllib.request.urlopen(self.url + "/_bench/requests", timeout=30) as r:
            return sorted(json.loads(r.read()), key=lambda e: e["t"])

    def size_under(self, prefix: str) -> tuple[int, int]:
        """(objects, bytes) under `prefix` of the bucket."""
        objects = size = 0
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for obj in page.get("Contents", ()):
                objects += 1
                size += obj["Size"]
        return objects, size

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass
class JobRun:
    """One finished `bulkjob run` as the benchmarks see it."""

    summary: dict[str, Any]
    exit_code: int
    #: Wall-clock times: just before the process was started, and when it had exited.
    started: float
    ended: float
    stderr: str
    parent: dict[str, Any] | None
    workers: list[dict[str, Any]]
    #: Manifest records written by this process (at or after `started`), when read.
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return self.ended - self.started

    @property
    def items(self) -> int:
        return len(self.records)

    @property
    def first_done(self) -> float:
        return min(r["at"] for r in self.records)

    @property
    def last_done(self) -> float:
        return max(r["at"] for r in self.records)

    @property
    def steady_rate(self) -> float:
        """Items per second between the first and the last item recorded done (start-up and
        shutdown left out, as for the bare pool)."""
        span = self.last_done - self.first_done
        return (self.items - 1) / span if span > 0 else float("nan")

    def log_line_time(self, text: str) -> float | None:
        for line in self.stderr.splitlines():
            if text in line:
                return log_time(line)
        return None


def run_job(items: Path, handler: str, *, manifest: str, run_id: str, workers: int,
            env: dict[str, str] | None = None, extra: tuple[str, ...] = (), timeout: float = 900,
            on_start: Callable[[subprocess.Popen], None] | None = None, read_records: bool = True,
            expect_codes: tuple[int, ...] = (0,)) -> JobRun:
    """Run `bulkjob run` (through bench.entry, which records the parent's own stats at exit)
    with metrics on a free port and the default checkpoint interval, as in production."""
    stats_dir = tempfile.mkdtemp(prefix="bench-stats-")
    cmd = [PYTHON, "-m", "bench.entry", "run", "--items", str(items), "--handler", handler,
           "--manifest", manifest, "--run-id", run_id, "--workers", str(workers),
           "--metrics-port", str(free_port()), *extra]
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env({**(env or {}), "BENCH_STATS_DIR": stats_dir}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if on_start is not None:
        on_start(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"bulkjob run {run_id} took longer than {timeout:.0f}s") from None
    ended = time.time()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode not in expect_codes or not lines:
        raise RuntimeError(f"bulkjob run {run_id} exited {proc.returncode}:\n{err[-3000:]}")
    stats = read_stats(stats_dir)
    shutil.rmtree(stats_dir, ignore_errors=True)
    run = JobRun(summary=json.loads(lines[-1]), exit_code=proc.returncode, started=started, ended=ended,
                 stderr=err, parent=next((s for s in stats if s["role"] == "parent"), None),
                 workers=[s for s in stats if s["role"] == "worker"])
    if "metrics on http://" not in err:
        raise RuntimeError(f"bulkjob run {run_id}: metrics were not served:\n{err[-2000:]}")
    if read_records:
        # (A compaction keeps no time for done items: those were recorded before this run.)
        run.records = [r for r in manifest_records(manifest, run_id)
                       if r["state"] == "done" and r.get("at", 0.0) >= started - 0.001]
    return run


def pg_server():
    """(a private PostgreSQL started by tests/pg.py, None), or (None, why it cannot be had)."""
    try:
        from pg import PgServer
    except ImportError as e:
        return None, f"tests/pg.py (the PostgreSQL test server) cannot be imported: {e}"
    try:
        return PgServer(), None
    except BaseException as e:  # the fixture skips (a pytest outcome) when PostgreSQL is missing
        if isinstance(e, KeyboardInterrupt):
            raise
        return None, f"PostgreSQL could not be started: {e}"


def manifest_records(manifest: str, run_id: str) -> list[dict[str, Any]]:
    """Every record of shard 0 of a run, read with the job's own manifest code."""
    from job.manifest import ShardManifest
    from job.store import open_store

    store, prefix = open_store(manifest, endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    return list(ShardManifest(store, prefix, run_id, 0, 1).load().records)
