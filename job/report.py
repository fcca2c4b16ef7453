"""`bulkjob status` and `bulkjob report`: reading a run's manifest back for people and tools."""

from __future__ import annotations

import csv
import io
import json
import time
from typing import Any

from .errors import UsageError
from .lease import parse_lease
from .manifest import DONE, FAILED, ItemStates, ShardManifest, list_shards
from .store import Store

#: Characters that make a spreadsheet read a CSV cell as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: Seconds a lock on the lease may be held before status calls it stuck: it is held for one
#: read and one rename.
STUCK_LOCK = 5.0


def shard_status(meta: dict[str, Any] | None, states: ItemStates, updated_at: float | None) -> dict[str, Any]:
    """Counts for one shard from its meta and the state of each item."""
    done, failed = states.count(DONE), states.count(FAILED)
    total = int((meta or {}).get("total", done + failed))
    attempts = getattr(states, "attempts", None)
    if attempts is None:
        attempts = sum(s.attempts for _, s in states.items())
    return {
        "total": total, "done": done, "failed": failed, "pending": max(0, total - done - failed),
        "attempts": attempts, "started_at": (meta or {}).get("created_at"), "updated_at": updated_at,
    }


def lease_status(store: Store, manifest: ShardManifest) -> dict[str, Any] | None:
    """What the shard's lease says (holder, generation, released, renewed_at by the holder's
    clock), and on a local directory who holds its lock now; None when there is no lease."""
    found = store.get(manifest.lease_key)
    state = parse_lease(found[0]) if found else None
    if state is None:
        return None
    out: dict[str, Any] = {"holder": state.holder, "generation": state.generation, "released": state.released,
                           "renewed_at": state.renewed_at, "ttl": state.ttl}
    holder_of_lock = getattr(store, "lock_holder", None)
    if holder_of_lock is not None:
        lock = holder_of_lock(manifest.lease_key)
        if lock is not None:
            out["lock"] = lock
    return out


def run_status(store: Store, prefix: str, run_id: str) -> dict[str, Any]:
    shards = list_shards(store, prefix, run_id)
    if not shards:
        raise UsageError(f"no manifest for run {run_id!r} in {store.url}")
    result: dict[str, Any] = {"run_id": run_id, "shards": []}
    for index, count in shards:
        manifest = ShardManifest(store, prefix, run_id, index, count)
        loaded = manifest.load()
        row = shard_status(loaded.meta, loaded.states(), loaded.updated_at)
        result["shards"].append({"shard": index, "shard_count": count, **row,
                                 "lease": lease_status(store, manifest)})
    for key in ("total", "done", "failed", "pending", "attempts"):
        result[key] = sum(s[key] for s in result["shards"])
    starts = [s["started_at"] for s in result["shards"] if s["started_at"]]
    updates = [s["updated_at"] for s in result["shards"] if s["updated_at"]]
    result["started_at"] = min(starts, default=None)
    result["updated_at"] = max(updates, default=None)
    return result


def failed_rows(store: Store, prefix: str, run_id: str) -> list[dict[str, Any]]:
    """One row per failed item, in shard order: like an S3 Batch Operations completion report."""
    shards = list_shards(store, prefix, run_id)
    if not shards:
        raise UsageError(f"no manifest for run {run_id!r} in {store.url}")
    rows = []
    for index, count in shards:
        loaded = ShardManifest(store, prefix, run_id, index, count).load()
        for record in loaded.last_records(FAILED):
            error = record.get("error") or {}
            rows.append({"id": record["id"], "shard": index, "attempts": record.get("attempts", 0),
                         "error_kind": error.get("kind"), "error_class": error.get("class"),
                         "error_code": error.get("code"), "error_message": error.get("message"),
                         "last_attempt_at": iso_time(record.get("at"))})
    return rows


def iso_time(ts: float | None) -> str | None:
    """An epoch time as ISO 8601 UTC with milliseconds, e.g. 2026-11-25T09:12:47.835Z."""
    if ts is None:
        return None
    whole = int(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((ts - whole) * 1000):03d}Z"


def csv_cell(value: Any) -> str:
    """A CSV cell that a spreadsheet shows as text, never runs as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def render_report(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows)
    out = io.StringIO()
    fields = ["id", "shard", "attempts", "error_kind", "error_class", "error_code", "error_message",
              "last_attempt_at"]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_cell(row.get(k)) for k in fields})
    return out.getvalue()


def format_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def render_status(status: dict[str, Any]) -> str:
    lines = [f"run {status['run_id']}"]
    header = (f"{'shard':>9} {'total':>9} {'done':>9} {'failed':>9} {'pending':>9} {'attempts':>9}  "
              f"{'started':<20} {'updated':<20}")
    lines.append(header)
    for s in status["shards"]:
        lines.append(f"{s['shard']:>4}/{s['shard_count']:<4} {s['total']:>9} {s['done']:>9} {s['failed']:>9} "
                     f"{s['pending']:>9} {s['attempts']:>9}  {format_time(s['started_at']):<20} "
                     f"{format_time(s['updated_at']):<20}")
    lines.append(f"{'all':>9} {status['total']:>9} {status['done']:>9} {status['failed']:>9} "
                 f"{status['pending']:>9} {status['attempts']:>9}")
    for s in status["shards"]:
        lines += lease_lines(s["shard"], s.get("lease"))
    return "\n".join(lines)


def lease_lines(shard: int, lease: dict[str, Any] | None) -> list[str]:
    """What status says of a shard's lease: who holds it (unless released), and a lock on it
    that someone holds for more than a moment (a stopped process)."""
    if lease is None:
        return []
    out = []
    h = lease["holder"]
    if not lease["released"]:
        out.append(f"shard {shard}: lease generation {lease['generation']} held by pod {h.get('pod')} "
                   f"(host {h.get('host')}, pid {h.get('pid')}), last renewed {format_time(lease['renewed_at'])} "
                   f"by its clock; it lasts {lease['ttl']:g}s after a renewal")
    lock = lease.get("lock")
    if lock is not None and lock.get("held_for", 0) >= STUCK_LOCK:
        out.append(f"shard {shard}: the lease's lock file is held by pid {lock.get('pid')} on {lock.get('host')} "
                   f"for {lock['held_for']:.0f}s: a stopped process? (takeovers wait for it)")
    return out
