"""The nine workloads. Each returns a dict of figures (JSON-ready); the runner tabulates them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

from . import peers
from .common import PYTHON, ROOT, JobRun, S3Server, clean_env, manifest_records, median, pg_server, run_job, write_items

#: The production default of --checkpoint-interval (job.config), which every run keeps.
CHECKPOINT_INTERVAL = 5.0
MIB = 1024 * 1024


class Bench:
    """Shared state of one benchmark run: a scratch directory, the S3 server, the options."""

    def __init__(self, work: Path, s3: S3Server, *, repeats: int, quick: bool) -> None:
        self.work = work
        self.s3 = s3
        self.repeats = repeats
        self.quick = quick
        self._items: dict[str, Path] = {}
        self._runs = 0

    def items(self, name: str, count: int, payload=None) -> Path:
        if name not in self._items:
            self._items[name] = write_items(self.work / f"{name}.jsonl", count, payload)
        return self._items[name]

    def run_id(self, name: str) -> str:
        self._runs += 1
        return f"{name}-{os.getpid()}-{self._runs}"

    def requests_during(self, run: JobRun) -> list[dict]:
        """The S3 requests since the last reset up to the end of `run`: not the bench's own
        reads of the manifest afterwards."""
        return [r for r in self.s3.requests() if r["t"] <= run.ended]

    def job(self, items: Path, handler: str, *, name: str, workers: int, env: dict | None = None,
            **kwargs) -> JobRun:
        """A run with its manifest in S3 (the server counting its requests)."""
        return run_job(items, handler, manifest=self.s3.manifest(name), run_id=self.run_id(name),
                       workers=workers, env={**self.s3.env, **(env or {})}, **kwargs)


def _cpu(stats: dict | None) -> float:
    return stats["cpu_user_s"] + stats["cpu_system_s"] if stats else float("nan")


def _checkpoint_traffic(requests: list[dict], seconds: float, items: int) -> dict:
    """What the manifest and the lease cost in S3 requests during a run."""
    # Deletes (a batch POST) are counted apart: the lease's release at the end is one, and so
    # is the removal of the segments a snapshot replaces (every 64th checkpoint).
    manifest_writes = [r for r in requests if r["method"] == "PUT" and r["kind"] in ("seg", "snap")]
    lease_writes = [r for r in requests if r["method"] == "PUT" and r["kind"] == "lease"]
    written = sum(r["received"] for r in manifest_writes)
    intervals = seconds / CHECKPOINT_INTERVAL
    return {
        "seconds": seconds, "items": items, "requests": len(requests),
        "manifest_writes": len(manifest_writes), "manifest_bytes": written,
        "lease_writes": len(lease_writes),
        "deletes": sum(1 for r in requests if r["kind"] == "delete-batch"),
        "meta_writes": sum(1 for r in requests if r["kind"] == "meta" and r["method"] == "PUT"),
        "intervals": intervals,
        # Every interval may write once, and the end of the run writes once more (documented).
        "allowed_writes": math.floor(intervals) + 1,
        "requests_per_1000_items": 1000 * len(requests) / items if items else float("nan"),
        "manifest_writes_per_1000_items": 1000 * len(manifest_writes) / items if items else float("nan"),
        "manifest_bytes_per_1000_items": 1000 * written / items if items else float("nan"),
        "by_kind": _by_kind(requests),
    }


def _by_kind(requests: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in requests:
        key = f"{r['method']} {r['kind']}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


# -- 1 and 2: overhead and the floor ---------------------------------------------------------

#: A deeper queue per worker than the default (--prefetch 2), run beside it as a diagnostic:
#: it shows how much of the overhead is one pipe round trip (and wake-up) per item.
DEEP_PREFETCH = 64


def overhead_and_floor(b: Bench, *, count: int = 20000, workers: int = 2) -> dict:
    """The job (defaults, then --prefetch 64) and the bare pool alternate, `repeats` times each,
    so that noise from other work on the machine falls on all alike; medians are reported."""
    items = b.items(f"noop-{count}", count)
    runs: list[dict] = []
    deep: list[dict] = []
    floors: dict[int, list[dict]] = {1: [], 64: []}
    for _ in range(b.repeats):
        for extra, into in (((), runs), (("--prefetch", str(DEEP_PREFETCH)), deep)):
            b.s3.reset()
            run = b.job(items, "bench.handlers:noop", name="overhead", workers=workers, extra=extra)
            _expect_done(run, count)
            into.append({"steady_rate": run.steady_rate, "e2e_rate": count / run.wall, "wall": run.wall,
                         "parent_cpu_us": 1e6 * _cpu(run.parent) / count,
                         "worker_cpu_us": 1e6 * sum(_cpu(w) for w in run.workers) / count,
                         "s3_requests": len(b.requests_during(run))})
        for chunksize in floors:
            floors[chunksize].append(_floor(items, workers, chunksize))
    job_rate = median([r["steady_rate"] for r in runs])
    return {
        "items": count, "workers": workers, "runs": runs,
        "job_rate_min": min(r["steady_rate"] for r in runs), "job_rate_max": max(r["steady_rate"] for r in runs),
        "deep_prefetch": {"prefetch": DEEP_PREFETCH, "runs": deep,
                          "rate": median([r["steady_rate"] for r in deep]),
                          "e2e_rate": median([r["e2e_rate"] for r in deep]),
                          "parent_cpu_us_per_item": median([r["parent_cpu_us"] for r in deep]),
                          "worker_cpu_us_per_item": median([r["worker_cpu_us"] for r in deep])},
        "job_rate": job_rate, "job_e2e_rate": median([r["e2e_rate"] for r in runs]),
        "us_per_item": 1e6 / job_rate,
        "parent_cpu_us_per_item": median([r["parent_cpu_us"] for r in runs]),
        "worker_cpu_us_per_item": median([r["worker_cpu_us"] for r in runs]),
        "floor": {cs: {"runs": f, "rate": median([x["steady_rate"] for x in f]),
                       "e2e_rate": median([x["e2e_rate"] for x in f])} for cs, f in floors.items()},
        "ratio_to_floor_1": job_rate / median([x["steady_rate"] for x in floors[1]]),
        "ratio_to_floor_64": job_rate / median([x["steady_rate"] for x in floors[64]]),
    }


def _floor(items: Path, workers: int, chunksize: int) -> dict:
    started = time.time()
    proc = subprocess.run([PYTHON, "-m", "bench.floor", str(items), str(workers), str(chunksize)],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"bench.floor failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    result["wall"] = wall
    result["e2e_rate"] = result["items"] / wall
    return result


def _expect_done(run: JobRun, count: int) -> None:
    if run.summary.get("done") != count or run.items != count:
        raise RuntimeError(f"expected {count} items done, summary says {run.summary}, "
                           f"{run.items} records in the manifest")


# -- 3: peers --------------------------------------------------------------------------------

def peer_designs(b: Bench, *, count: int = 300, jobs: int = 2) -> dict:
    items = b.items(f"noop-{count}", count)
    out: dict = {"items": count}
    for name, fn in (("parallel", lambda: peers.gnu_parallel(items, jobs=jobs)),
                     ("airflow", lambda: peers.airflow(items))):
        try:
            out[name] = fn()
        except peers.Skipped as e:
            out[name] = {"skipped": str(e)}
    return out


# -- 4: I/O-bound scaling --------------------------------------------------------------------

def io_scaling(b: Bench, *, count: int = 2000, seconds: float = 0.02,
               workers: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> dict:
    items = b.items(f"sleep-{count}", count, lambda i: {"seconds": seconds})
    rows = []
    for w in workers:
        b.s3.reset()
        run = b.job(items, "bench.handlers:sleep", name="io", workers=w)
        _expect_done(run, count)
        ideal = w / seconds
        rows.append({"workers": w, "steady_rate": run.steady_rate, "e2e_rate": count / run.wall,
                     "efficiency": run.steady_rate / ideal, "e2e_efficiency": count / run.wall / ideal,
                     "wall": run.wall, "first_item_after": run.first_done - run.started,
                     "checkpoints": _checkpoint_traffic(b.requests_during(run), run.wall, count)})
    return {"items": count, "item_seconds": seconds, "rows": rows}


# -- 5: database-bound -----------------------------------------------------------------------

STEPS_SQL = """\
-- step: insert
INSERT INTO bench_rows (item_id, n, note)
SELECT :id, r.n, r.t FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(n int, t text);
"""


def database(b: Bench, *, count: int = 500, rows: int = 1000, workers: int = 2) -> dict:
    """The same rows inserted by the batch helper, one statement at a time, and by the SQL
    steps handler (one set-based INSERT per item), into a real PostgreSQL on loopback."""
    server, skipped = pg_server()
    if server is None:
        return {"skipped": skipped}
    try:
        name = server.create_database("bench")
        with server.connect(name) as conn:
            conn.execute("CREATE TABLE bench_rows (item_id text NOT NULL, n int NOT NULL, note text)")
        plain = b.items(f"db-{count}", count, lambda i: {"rows": rows})
        steps_items = b.items(f"db-steps-{count}", count, lambda i: {
            "id": f"item-{i:07d}", "rows": [{"n": n, "t": f"row {n}"} for n in range(rows)]})
        steps_file = b.work / "insert.sql"
        steps_file.write_text(STEPS_SQL)
        env = {"BULKJOB_DB_PASSWORD": server.password}
        out: dict = {"items": count, "rows_per_item": rows, "workers": workers}
        for label, items, handler in (("batch", plain, "bench.handlers:insert_batch"),
                                      ("row_at_a_time", plain, "bench.handlers:insert_each"),
                                      ("steps_set_based", steps_items, f"sql:{steps_file}")):
            with server.connect(name) as conn:
                conn.execute("TRUNCATE bench_rows")
            b.s3.reset()
            run = b.job(items, handler, name=f"db-{label}", workers=workers,
                        extra=("--db", server.url(name)), env=env)
            _expect_done(run, count)
            with server.connect(name) as conn:
                stored = conn.execute("SELECT count(*) FROM bench_rows").fetchone()[0]
            if stored != count * rows:
                raise RuntimeError(f"{label}: {stored} rows stored, expected {count * rows}")
            out[label] = {"rows": stored, "rows_per_s": run.steady_rate * rows, "items_per_s": run.steady_rate,
                          "wall": run.wall}
        out["batch_over_row_at_a_time"] = out["batch"]["rows_per_s"] / out["row_at_a_time"]["rows_per_s"]
        return out
    finally:
        server.stop()


# -- 6 and 7: resume cost and checkpoint cost --------------------------------------------------

def resume_and_checkpoints(b: Bench, *, count: int = 100000, stop_at: int = 99000, workers: int = 2) -> dict:
    """A run of `count` items is stopped by SIGTERM (as a pod eviction does) when item `stop_at`
    runs, then resumed with the same run id. The first run's S3 traffic is the checkpoint cost."""
    items = b.items(f"stop-{count}", count, lambda i: {"stop": True} if i == stop_at else {})
    name = "resume"
    run_id = b.run_id(name)
    manifest = b.s3.manifest(name)
    pidfile = b.work / "parent.pid"

    def note_pid(proc):
        pidfile.write_text(str(proc.pid))

    b.s3.reset()
    first = run_job(items, "bench.handlers:noop_then_stop", manifest=manifest, run_id=run_id, workers=workers,
                    env={**b.s3.env, "BENCH_PARENT_PIDFILE": str(pidfile)}, on_start=note_pid,
                    expect_codes=(3,), read_records=False)
    first_requests = b.s3.requests()
    objects, size = b.s3.size_under(f"{name}/{run_id}/")
    done_before = first.summary["done"]
    checkpoint = _checkpoint_traffic(first_requests, first.wall, done_before)

    b.s3.reset()
    second = run_job(items, "bench.handlers:noop", manifest=manifest, run_id=run_id, workers=workers,
                     env=b.s3.env, read_records=False)
    second_requests = b.s3.requests()
    records = manifest_records(manifest, run_id)
    new = [r for r in records if r["state"] == "done" and r["at"] >= second.started]
    first_new = min(r["at"] for r in new)
    ready = second.log_line_time(f"run {run_id} shard")
    return {
        "items": count, "stopped_after": done_before, "stopped_fraction": done_before / count,
        "first_exit_code": first.exit_code, "first_status": first.summary["status"],
        "manifest_objects": objects, "manifest_bytes": size,
        "resume": {
            "to_first_new_item": first_new - second.started,
            "interpreter_up": (second.parent or {}).get("interpreter_up", second.started) - second.started,
            "to_manifest_ready": (ready - second.started) if ready else None,
            "s3_requests": len(second_requests),
            "s3_requests_before_first_new_item": sum(1 for r in second_requests if r["t"] <= first_new),
            "s3_by_kind": _by_kind(second_requests),
            "new_items": len(new), "skipped_already_done": second.summary["skipped_already_done"],
            "status": second.summary["status"], "wall": second.wall,
        },
        "checkpoint": checkpoint,
    }


# -- 8: memory -------------------------------------------------------------------------------

def memory(b: Bench, *, counts: tuple[int, ...] = (10000, 100000, 1000000), workers: int = 2) -> dict:
    """Peak RSS (VmHWM) of the parent and of each worker, each read by the process itself as it
    exits; USS is the worker's private memory at exit (what it adds beyond the shared pages)."""
    rows = []
    for count in counts:
        items = b.items(f"noop-mem-{count}", count)
        b.s3.reset()
        run = b.job(items, "bench.handlers:noop", name="memory", workers=workers, read_records=False,
                    timeout=1800)
        if run.summary.get("done") != count:
            raise RuntimeError(f"memory run of {count}: {run.summary}")
        if run.parent is None or len(run.workers) != workers:
            raise RuntimeError(f"memory run of {count}: stats of the parent and {workers} workers "
                               f"expected, got {bool(run.parent)} and {len(run.workers)}")
        rows.append({"items": count, "items_file_bytes": items.stat().st_size, "wall": run.wall,
                     "parent_hwm_mib": run.parent["vm_hwm_kib"] / 1024,
                     "worker_hwm_mib": [w["vm_hwm_kib"] / 1024 for w in run.workers],
                     "worker_uss_mib": [w["uss_kib"] / 1024 for w in run.workers],
                     "worker_pss_mib": [w["pss_kib"] / 1024 for w in run.workers]})
    return {"workers": workers, "rows": rows}


# -- 9: start-up -----------------------------------------------------------------------------

def startup(b: Bench, *, count: int = 20, workers: int = 2) -> dict:
    """Process start (just before exec) to the first item recorded done, with its parts: the
    interpreter and imports up to bench.entry, the CLI up to the manifest read and the lease
    taken (the "run ... shard" log line), then the pool's start to the first item."""
    items = b.items(f"noop-{count}", count)
    runs = []
    for _ in range(max(5, b.repeats)):
        run = b.job(items, "bench.handlers:noop", name="startup", workers=workers)
        _expect_done(run, count)
        ready = run.log_line_time("shard 0/1:")
        up = (run.parent or {}).get("interpreter_up", float("nan"))
        runs.append({"to_first_item": run.first_done - run.started, "interpreter": up - run.started,
                     "cli_to_manifest_ready": (ready - up) if ready else None,
                     "pool_to_first_item": (run.first_done - ready) if ready else None, "wall": run.wall})
    return {"runs": runs, "to_first_item": median([r["to_first_item"] for r in runs]),
            "interpreter": median([r["interpreter"] for r in runs]),
            "cli_to_manifest_ready": median([r["cli_to_manifest_ready"] for r in runs if r["cli_to_manifest_ready"] is not None]),
            "pool_to_first_item": median([r["pool_to_first_item"] for r in runs if r["pool_to_first_item"] is not None])}
