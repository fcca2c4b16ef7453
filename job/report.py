"""`bulkjob status` and `bulkjob report`: reading a run's manifest back for people and tools."""

from __future__ import annotations

import csv
import io
import json
import time
from typing import Any

from .errors import UsageError
from .items import line_of
from .lease import parse_lease
from .manifest import DONE, FAILED, RUNNING, ItemStates, Loaded, ShardManifest, list_shards
from .outcome import INVALID
from .store import Store

#: Characters that make a spreadsheet read a CSV cell as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: Runs named in the error about an unknown run id: the latest ones (ids sort by time).
SHOWN_RUNS = 10
#: Columns of the CSV report; the JSON Lines report also has each failure's traceback.
CSV_FIELDS = ["id", "line", "shard", "attempts", "error_kind", "error_class", "error_code", "error_message",
              "last_attempt_at"]
#: Columns of the CSV report of a work table's ERR rows (job.db.worktable.failed_table_rows).
TABLE_CSV_FIELDS = ["id", "attempts", "error", "updated_at", "runner"]
#: Seconds a lock on the lease may be held before status calls it stuck: it is held for one
#: read and one rename.
STUCK_LOCK = 5.0


def shard_status(meta: dict[str, Any] | None, loaded: Loaded) -> dict[str, Any]:
    """Counts for one shard from its meta and the state of each item (failed items' records are
    read whole: they are few)."""
    states: ItemStates = loaded.states()
    done, failed = states.count(DONE), states.count(FAILED)
    invalid = sum(1 for r in loaded.last_records(FAILED) if (r.get("error") or {}).get("kind") == INVALID)
    total = int((meta or {}).get("total", done + failed))
    attempts = getattr(states, "attempts", None)
    if attempts is None:
        attempts = sum(s.attempts for _, s in states.items())
    return {
        "total": total, "done": done, "failed": failed, "invalid": invalid, "pending": max(0, total - done - failed),
        # Attempts that ended: one still running (or cut short with its run) is not counted yet.
        "attempts": attempts - states.count(RUNNING),
        "started_at": (meta or {}).get("created_at"), "updated_at": loaded.updated_at,
    }


def lease_status(store: Store, manifest: ShardManifest) -> dict[str, Any] | None:
    """What the shard's lease says (holder, generation, released, renewed_at by the holder's
    clock), and on a local directory who holds its lock now; None when there is no lease."""
    found = store.get(manifest.lease_key)
    state = parse_lease(found[0]) if found else None
    if state is None:
        return None
    out: dict[str, Any] = {"holder": state.holder, "generation": state.generation, "released": state.released,
                           "renewed_at": iso_time(state.renewed_at), "ttl": state.ttl}
    holder_of_lock = getattr(store, "lock_holder", None)
    if holder_of_lock is not None:
        lock = holder_of_lock(manifest.lease_key)
        if lock is not None:
            out["lock"] = lock
    return out


def run_status(store: Store, prefix: str, run_id: str) -> dict[str, Any]:
    """Counts of a run per shard and in total; times in ISO 8601 UTC, like the report's."""
    shards = _shards_of(store, prefix, run_id)
    result: dict[str, Any] = {"run_id": run_id, "shards": []}
    for index, count in shards:
        manifest = ShardManifest(store, prefix, run_id, index, count)
        loaded = manifest.load()
        row = shard_status(loaded.meta, loaded)
        result["shards"].append({"shard": index, "shard_count": count, **row,
                                 "lease": lease_status(store, manifest)})
    for key in ("total", "done", "failed", "invalid", "pending", "attempts"):
        result[key] = sum(s[key] for s in result["shards"])
    starts = [s["started_at"] for s in result["shards"] if s["started_at"]]
    updates = [s["updated_at"] for s in result["shards"] if s["updated_at"]]
    result["started_at"] = iso_time(min(starts, default=None))
    result["updated_at"] = iso_time(max(updates, default=None))
    for shard in result["shards"]:
        shard["started_at"], shard["updated_at"] = iso_time(shard["started_at"]), iso_time(shard["updated_at"])
    return result


def failed_rows(store: Store, prefix: str, run_id: str) -> list[dict[str, Any]]:
    """One row per failed item, in shard order: like an S3 Batch Operations completion report.

    An invalid input line has its line number, and the id it gave if it had a usable one."""
    rows = []
    for index, count in _shards_of(store, prefix, run_id):
        loaded = ShardManifest(store, prefix, run_id, index, count).load()
        for record in loaded.last_records(FAILED):
            error = record.get("error") or {}
            line = line_of(record["id"])
            rows.append({"id": record.get("item_id") if line is not None else record["id"], "line": line,
                         "shard": index, "attempts": record.get("attempts", 0),
                         "error_kind": error.get("kind"), "error_class": error.get("class"),
                         "error_code": error.get("code"), "error_message": error.get("message"),
                         "last_attempt_at": iso_time(record.get("at")), "traceback": error.get("traceback")})
    return rows


def _shards_of(store: Store, prefix: str, run_id: str) -> list[tuple[int, int]]:
    """The run's shards; a UsageError naming the runs that do exist when it has none."""
    shards = list_shards(store, prefix, run_id)
    if shards:
        return shards
    runs = runs_in(store, prefix)
    if not runs:
        raise UsageError(f"no manifest for run {run_id!r} in {store.url}: it holds no runs")
    shown = runs[-SHOWN_RUNS:]
    more = f" and {len(runs) - len(shown)} earlier" if len(runs) > len(shown) else ""
    raise UsageError(f"no manifest for run {run_id!r} in {store.url}; runs there: {', '.join(shown)}{more}")


def runs_in(store: Store, prefix: str) -> list[str]:
    """The ids of the runs under `prefix`, sorted."""
    base = f"{prefix}/" if prefix else ""
    runs = set()
    for key in store.list(base):
        run_id, sep, rest = key[len(base):].partition("/")
        if sep and rest.startswith("shard-"):
            runs.add(run_id)
    return sorted(runs)


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


def render_report(rows: list[dict[str, Any]], fmt: str, fields: list[str] = CSV_FIELDS) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_cell(row.get(k)) for k in fields})
    return out.getvalue()


def render_table_status(status: dict[str, Any]) -> str:
    """A work table's rows by state (job.db.worktable.table_status), and who holds claims."""
    lines = [f"work table {status['work_table']}",
             f"{'total':>9} {'pending':>9} {'running':>9} {'done':>9} {'failed':>9} {'attempts':>9}",
             f"{status['total']:>9} {status['pending']:>9} {status['running']:>9} {status['done']:>9} "
             f"{status['failed']:>9} {status['attempts']:>9}"]
    if status["expired"]:
        lines.append(f"{status['expired']} running row(s) with an expired claim: their runner died or lost the "
                     "database; the next runner to claim takes them over")
    for runner in status["runners"]:
        lines.append(f"runner {runner['runner']}: {runner['rows']} row(s) claimed")
    return "\n".join(lines)


def format_time(iso: str | None) -> str:
    """An ISO 8601 time of `run_status` as the status table shows it: to the second."""
    if iso is None:
        return "-"
    return f"{iso[:10]} {iso[11:19]}Z"


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
    if status.get("invalid"):
        lines.append(f"({status['invalid']} of the failed are invalid input lines, recorded with --skip-invalid)")
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
