"""State at scale: a million no-op items run fresh, then resumed when all are done and when half
are, side by side: the parent's peak memory, the time to the first new item (or to the end),
and what the manifest costs per item. A finished shard rerun on the same input ends without
reading its records (meta.json remembers the end); the same input plus a blank line is read
in full, records and all, which is what a resume of a finished shard costs otherwise."""

from __future__ import annotations

import os
import time

from .common import run_job

#: Bytes in a megabyte, as the targets are written (VmHWM is in KiB).
MB = 1_000_000


def _parent_mb(run) -> float:
    return run.parent["vm_hwm_kib"] * 1024 / MB if run.parent else float("nan")


def _load_seconds(manifest: str, run_id: str) -> tuple[float, int]:
    """The manifest read as a resume reads it, timed in this process: (seconds, items)."""
    from job.manifest import ShardManifest
    from job.store import open_store

    store, prefix = open_store(manifest, endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    started = time.monotonic()
    states = ShardManifest(store, prefix, run_id, 0, 1).load().states()
    return time.monotonic() - started, len(states)


def _first_new(manifest: str, run_id: str, since: float) -> float:
    """Wall-clock time of the first record written at or after `since` (streamed, not kept)."""
    from job.manifest import ShardManifest
    from job.store import open_store

    store, prefix = open_store(manifest, endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    loaded = ShardManifest(store, prefix, run_id, 0, 1).load()
    return min(r["at"] for r in loaded.records if r.get("at") is not None and r["at"] >= since)


def resume_at_scale(b, *, count: int = 1_000_000, workers: int = 2) -> dict:
    items = b.items(f"noop-mem-{count}", count)
    half = count // 2
    stop_items = b.items(f"stop-half-{count}", count, lambda i: {"stop": True} if i == half else {})
    name = "scale"
    manifest = b.s3.manifest(name)
    pidfile = b.work / "scale-parent.pid"

    def note_pid(proc):
        pidfile.write_text(str(proc.pid))

    def run(items_file, handler, run_id, **kwargs):
        return run_job(items_file, handler, manifest=manifest, run_id=run_id, workers=workers,
                       env={**b.s3.env, **kwargs.pop("env", {})}, read_records=False, timeout=1800, **kwargs)

    all_id = b.run_id(name)
    fresh = run(items, "bench.handlers:noop", all_id)
    if fresh.summary.get("done") != count:
        raise RuntimeError(f"fresh run of {count}: {fresh.summary}")
    objects, size = b.s3.size_under(f"{name}/{all_id}/")
    resumed = run(items, "bench.handlers:noop", all_id)
    if resumed.summary.get("skipped_already_done") != count:
        raise RuntimeError(f"resumed run of {count}: {resumed.summary}")
    blank = b.work / f"noop-mem-{count}-blank.jsonl"
    blank.write_bytes(items.read_bytes() + b"\n")
    read_in_full = run(blank, "bench.handlers:noop", all_id)
    if read_in_full.summary.get("skipped_already_done") != count:
        raise RuntimeError(f"resumed run of {count} (read in full): {read_in_full.summary}")
    load_all, known = _load_seconds(manifest, all_id)

    half_id = b.run_id(name)
    stopped = run(stop_items, "bench.handlers:noop_then_stop", half_id, expect_codes=(3,),
                  env={"BENCH_PARENT_PIDFILE": str(pidfile)}, on_start=note_pid)
    load_half, _ = _load_seconds(manifest, half_id)
    half_resumed = run(stop_items, "bench.handlers:noop", half_id)
    if half_resumed.summary.get("done") != count:
        raise RuntimeError(f"half-done resume of {count}: {half_resumed.summary}")
    first_new = _first_new(manifest, half_id, half_resumed.started)
    return {
        "items": count, "workers": workers,
        "fresh": {"wall": fresh.wall, "parent_mb": _parent_mb(fresh)},
        "manifest": {"objects": objects, "bytes": size, "bytes_per_item": size / count},
        "all_done": {"wall": resumed.wall, "parent_mb": _parent_mb(resumed), "ratio": resumed.wall / fresh.wall,
                     "manifest_load": load_all, "items_known": known},
        "all_done_read": {"wall": read_in_full.wall, "parent_mb": _parent_mb(read_in_full),
                          "ratio": read_in_full.wall / fresh.wall},
        "half_done": {"stopped_after": stopped.summary["done"], "to_first_new_item": first_new - half_resumed.started,
                      "ratio": (first_new - half_resumed.started) / fresh.wall, "parent_mb": _parent_mb(half_resumed),
                      "wall": half_resumed.wall, "manifest_load": load_half},
    }
