"""The results as a table (terminal and Markdown) and the performance targets as PASS/MISS."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """One target: what was measured against what is required."""

    target: str
    measured: str
    passed: bool | None  # None: not measured (a workload was skipped)
    margin: str = ""

    @property
    def word(self) -> str:
        return "n/a" if self.passed is None else "PASS" if self.passed else "MISS"


#: The steps files of bench.sqlspeed, as the table names them.
SQLSPEED_FILES = {"one": "one-statement file (an upsert)", "three": "three-step file (upsert, insert, update)"}
#: (file, least ratio of the job's items/s to the loop's that passes).
SQLSPEED_TARGETS = (("one", 0.9), ("three", 0.8))


def _n(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _at_least(target: str, measured: float, need: float, unit: str, digits: int = 0) -> Verdict:
    passed = measured >= need
    margin = "" if passed else f"short by {_n(need - measured, digits)} {unit} ({measured / need:.2f} of the target)"
    return Verdict(target, f"{_n(measured, digits)} {unit}", passed, margin)


def _at_most(target: str, measured: float, limit: float, unit: str, digits: int = 2) -> Verdict:
    passed = measured <= limit
    margin = "" if passed else f"over by {_n(measured - limit, digits)} {unit} ({measured / limit:.2f}x the limit)"
    return Verdict(target, f"{_n(measured, digits)} {unit}", passed, margin)


def targets(r: dict) -> list[Verdict]:
    out: list[Verdict] = []
    o = r.get("overhead")
    if o:
        out.append(_at_least("no-op items/s on 2 cores >= 10,000", o["job_rate"], 10000, "items/s"))
        out.append(_at_least("job >= 0.5 x bare Pool (chunksize 1), same run", o["ratio_to_floor_1"], 0.5, "x", 2))
    p = r.get("peers")
    if o and p:
        job_per_item = 1 / o["job_e2e_rate"]
        for name, label in (("parallel", "GNU parallel, one process per item"), ("airflow", "Airflow, one mapped task per item")):
            peer = p.get(name, {})
            if "seconds_per_item" in peer:
                out.append(_at_least(f">= 100 x faster per item than {label}", peer["seconds_per_item"] / job_per_item, 100, "x", 0))
            else:
                out.append(Verdict(f">= 100 x faster per item than {label}", peer.get("skipped", "not run"), None))
    io = r.get("io")
    if io:
        upto = [row for row in io["rows"] if row["workers"] <= 32]
        worst = min(upto, key=lambda row: row["efficiency"])
        v = _at_least("I/O-bound efficiency >= 0.9 up to 32 workers", worst["efficiency"], 0.9, "", 2)
        out.append(Verdict(v.target, f"{worst['efficiency']:.2f} (lowest, at {worst['workers']} workers)", v.passed, v.margin))
    db = r.get("database")
    if db and "skipped" not in db:
        out.append(_at_least("batch helper >= 10 x rows/s of row-at-a-time", db["batch_over_row_at_a_time"], 10, "x", 1))
    elif db:
        out.append(Verdict("batch helper >= 10 x rows/s of row-at-a-time", db["skipped"], None))
    sq = r.get("sqlspeed")
    for label, need in SQLSPEED_TARGETS:
        target = f"steps handler, {SQLSPEED_FILES[label]}: >= {need} x a hand-written loop, same connections"
        if sq and label in sq:
            out.append(_at_least(target, sq[label]["ratio"], need, "x", 2))
        elif sq:
            out.append(Verdict(target, sq.get("skipped", "not run"), None))
    rs = r.get("resume")
    if rs:
        out.append(_at_most(f"resume of {rs['items']:,} items: first new item within 2 s",
                            rs["resume"]["to_first_new_item"], 2.0, "s"))
        c = rs["checkpoint"]
        periodic = max(0, c["manifest_writes"] - 1)
        passed = c["manifest_writes"] <= c["allowed_writes"]
        out.append(Verdict("checkpoint: <= 1 S3 write per interval per shard",
                           f"{c['manifest_writes']} manifest writes in {c['seconds']:.1f} s ({c['intervals']:.1f} intervals; "
                           f"{periodic} periodic + 1 final)", passed,
                           "" if passed else f"{c['manifest_writes'] - c['allowed_writes']} write(s) too many"))
    m = r.get("memory")
    if m:
        biggest = max(m["rows"], key=lambda row: row["items"])
        out.append(_at_most(f"parent RSS < 300 MB at {biggest['items']:,} items", biggest["parent_hwm_mib"], 300, "MiB", 0))
        worst = max(max(row["worker_hwm_mib"]) for row in m["rows"])
        out.append(_at_most("each worker RSS < 80 MB", worst, 80, "MiB", 0))
    s = r.get("startup")
    if s:
        out.append(_at_most("start-up to first item < 1 s", s["to_first_item"], 1.0, "s"))
    og = r.get("outage")
    if og and "skipped" not in og:
        out.append(_at_most(f"items failed by a {og['down']:.0f} s database outage = 0", og["failed"], 0, "items", 0))
        back = og["to_next_item_done"]
        out.append(_at_most("database back to next item done <= 5 s (defaults)", back if back is not None else 1e9,
                            5.0, "s"))
    elif og:
        out.append(Verdict("items failed by a database outage = 0", og["skipped"], None))
    sc = r.get("scale")
    if sc:
        n = f"{sc['items']:,}"
        # The peak of a resume that holds item states: the all-done one that reads its records.
        for key, what in (("all_done_read" if "all_done_read" in sc else "all_done", "all done"),
                          ("half_done", "half done")):
            out.append(_at_most(f"resumed {n}-item run ({what}): parent peak < 250 MB", sc[key]["parent_mb"], 250,
                                "MB", 0))
        out.append(_at_most(f"resumed {n}-item run (all done): to its end <= 0.15 x the fresh run",
                            sc["all_done"]["ratio"], 0.15, "x"))
        out.append(_at_most(f"resumed {n}-item run (half done): to its first new item <= 0.15 x the fresh run",
                            sc["half_done"]["ratio"], 0.15, "x"))
        out.append(_at_most(f"manifest of a finished {n}-item run < 40 bytes per item",
                            sc["manifest"]["bytes_per_item"], 40, "B/item", 1))
    cl = r.get("claims")
    if cl and "skipped" not in cl:
        out.append(_at_least(f"work table: {cl['ratio_runners']} runners over 1 > 1 (the queue scales)", cl["ratio"],
                             1.0, "x", 2))
    elif cl:
        out.append(Verdict("work table: more runners, more rows/s", cl["skipped"], None))
    return out


def table(r: dict) -> list[tuple[str, str, str]]:
    """(workload, figure, value) rows."""
    rows: list[tuple[str, str, str]] = []
    o = r.get("overhead")
    if o:
        w = "1 overhead"
        d = o["deep_prefetch"]
        rows += [(w, f"{o['items']:,} no-op items, {o['workers']} workers: items/s (first to last item; min-max)",
                  f"{_n(o['job_rate'])} ({_n(o['job_rate_min'])}-{_n(o['job_rate_max'])})"),
                 (w, "items/s, process start to exit", _n(o["job_e2e_rate"])),
                 (w, "overhead per item, wall", f"{_n(o['us_per_item'], 1)} us"),
                 (w, "CPU per item, start-up included: parent / all workers",
                  f"{_n(o['parent_cpu_us_per_item'], 1)} us / {_n(o['worker_cpu_us_per_item'], 1)} us"),
                 (w, f"diagnostic, --prefetch {d['prefetch']}: items/s; CPU per item parent / workers",
                  f"{_n(d['rate'])}; {_n(d['parent_cpu_us_per_item'], 1)} us / {_n(d['worker_cpu_us_per_item'], 1)} us")]
        w = "2 floor"
        for cs, f in o["floor"].items():
            rows.append((w, f"bare Pool.imap_unordered, forkserver, chunksize {cs}: items/s", _n(f["rate"])))
        rows += [(w, "job / Pool chunksize 1 (with --prefetch 64)",
                  f"{o['ratio_to_floor_1']:.2f} ({d['rate'] / o['floor'][1]['rate']:.2f})"),
                 (w, "job / Pool chunksize 64", f"{o['ratio_to_floor_64']:.3f}")]
    p = r.get("peers")
    if p:
        w = "3 peers"
        job_per_item = 1 / o["job_e2e_rate"] if o else None
        for name, label in (("parallel", "GNU parallel, 1 process per item, -j 2"), ("airflow", "Airflow dags test, 1 mapped task per item")):
            peer = p.get(name, {})
            if "seconds_per_item" in peer:
                rows.append((w, f"{label} ({peer['items']} items): s/item", f"{peer['seconds_per_item'] * 1000:.1f} ms"))
                if job_per_item:
                    rows.append((w, f"job speed-up over {name}", f"{peer['seconds_per_item'] / job_per_item:,.0f}x"))
            else:
                rows.append((w, label, peer.get("skipped", "not run")))
    io = r.get("io")
    if io:
        w = "4 I/O-bound"
        for row in io["rows"]:
            workers = f"{row['workers']} worker" + ("s" if row["workers"] != 1 else "")
            rows.append((w, f"{io['items']:,} x {io['item_seconds'] * 1000:.0f} ms, {workers}: items/s, efficiency (start to exit)",
                         f"{_n(row['steady_rate'])}, {row['efficiency']:.2f} ({row['e2e_efficiency']:.2f})"))
    db = r.get("database")
    if db:
        w = "5 database"
        if "skipped" in db:
            rows.append((w, "PostgreSQL", db["skipped"]))
        else:
            for key, label in (("batch", "batch helper ctx.executemany"), ("row_at_a_time", "one INSERT per row"),
                               ("steps_set_based", "SQL steps handler, one set-based INSERT per item")):
                rows.append((w, f"{db['items']} items x {db['rows_per_item']:,} rows, {label}: rows/s", _n(db[key]["rows_per_s"])))
            rows.append((w, "batch / row-at-a-time", f"{db['batch_over_row_at_a_time']:.1f}x"))
    sq = r.get("sqlspeed")
    if sq:
        w = "5 SQL speed"
        if "skipped" in sq:
            rows.append((w, "PostgreSQL", sq["skipped"]))
        for label in SQLSPEED_FILES:
            if label not in sq:
                continue
            x = sq[label]
            rows.append((w, f"{sq['items']:,} items, {sq['workers']} workers, {SQLSPEED_FILES[label]}, commit per item: "
                            f"job / hand-written loop, items/s (median of {sq['runs']})",
                         f"{_n(x['job_rate'])} / {_n(x['loop_rate'])} = {x['ratio']:.2f}x (runs: "
                         + ", ".join(f"{v:.2f}" for v in x["ratios"]) + ")"))
            if "server_cpu_us" in x:
                rows.append((w, "  CPU per item: PostgreSQL server for the job / for the loop; the job's parent "
                                "(start-up included); the loop's processes",
                             f"{_n(x['server_cpu_us']['job'])} / {_n(x['server_cpu_us']['loop'])} us; "
                             f"{_n(x['job_parent_cpu_us'])} us; {_n(x.get('loop_cpu_us'))} us"))
    rs = r.get("resume")
    if rs:
        w = "6 resume"
        x = rs["resume"]
        rows += [(w, f"{rs['items']:,} items stopped (SIGTERM) after {rs['stopped_after']:,} done: start to first new item",
                  f"{x['to_first_new_item']:.2f} s"),
                 (w, "of which: to manifest read, lease taken, items scanned", f"{x['to_manifest_ready']:.2f} s"),
                 (w, "S3 requests of the resumed run (before its first new item)",
                  f"{x['s3_requests']} ({x['s3_requests_before_first_new_item']})"),
                 (w, "manifest size at the stop", f"{rs['manifest_objects']} objects, {rs['manifest_bytes'] / 1024:,.0f} KiB")]
        c = rs["checkpoint"]
        w = "7 checkpoint"
        rows += [(w, f"first run, {c['items']:,} items in {c['seconds']:.1f} s: manifest writes (per 1,000 items)",
                  f"{c['manifest_writes']} ({c['manifest_writes_per_1000_items']:.3f})"),
                 (w, "bytes written per 1,000 items", f"{_n(c['manifest_bytes_per_1000_items'])} B"),
                 (w, "all S3 requests of that run (lease writes among them)", f"{c['requests']} ({c['lease_writes']})")]
        if io:
            slow = io["rows"][0]["checkpoints"]
            rows.append((w, f"I/O run at 1 worker ({slow['items']:,} items in {slow['seconds']:.1f} s): manifest writes (per 1,000 items)",
                         f"{slow['manifest_writes']} ({slow['manifest_writes_per_1000_items']:.2f}), "
                         f"{_n(slow['manifest_bytes_per_1000_items'])} B per 1,000 items"))
    m = r.get("memory")
    if m:
        w = "8 memory"
        for row in m["rows"]:
            rows.append((w, f"{row['items']:,} items: peak RSS parent / each worker (worker private)",
                         f"{row['parent_hwm_mib']:.0f} MiB / " + ", ".join(f"{x:.0f}" for x in row["worker_hwm_mib"])
                         + " MiB (" + ", ".join(f"{x:.0f}" for x in row["worker_uss_mib"]) + ")"))
    s = r.get("startup")
    if s:
        w = "9 start-up"
        rows += [(w, "process start to first item done (median)", f"{s['to_first_item']:.2f} s"),
                 (w, "of which: interpreter / CLI to manifest ready / pool to first item",
                  f"{s['interpreter']:.2f} / {s['cli_to_manifest_ready']:.2f} / {s['pool_to_first_item']:.2f} s")]
    og = r.get("outage")
    if og and "skipped" not in og:
        w = "10 outage"
        back = og["to_next_item_done"]
        rows += [(w, f"{og['items']:,} one-statement items, {og['workers']} workers, PostgreSQL stopped "
                     f"{og['down']:.0f} s: failed / done / committed once",
                  f"{og['failed']} / {og['done']:,} / {og['distinct']:,} of {og['committed']:,} rows"),
                 (w, "attempts charged / refunded; pause (probes)",
                  f"{og['attempts']:,} / {og['refunded']}; {og['pause_seconds']:.1f} s ({og['probes']})"),
                 (w, "database back to next item done", f"{back:.2f} s" if back is not None else "never")]
    elif og:
        rows.append(("10 outage", "database outage", og["skipped"]))
    sc = r.get("scale")
    if sc:
        w = "11 scale"
        f, a, h, mf = sc["fresh"], sc["all_done"], sc["half_done"], sc["manifest"]
        rows += [(w, f"{sc['items']:,} no-op items, fresh: process start to exit; parent peak",
                  f"{f['wall']:.1f} s; {f['parent_mb']:.0f} MB"),
                 (w, "manifest of the finished run: objects, bytes per item",
                  f"{mf['objects']}, {mf['bytes_per_item']:.1f} B"),
                 (w, "resumed, all done, same input: process start to exit (x fresh); parent peak",
                  f"{a['wall']:.1f} s ({a['ratio']:.2f}); {a['parent_mb']:.0f} MB")]
        if "all_done_read" in sc:
            r2 = sc["all_done_read"]
            rows.append((w, "resumed, all done, input + a blank line (records read): start to exit (x fresh); peak",
                         f"{r2['wall']:.1f} s ({r2['ratio']:.2f}); {r2['parent_mb']:.0f} MB"))
        rows += [(w, f"resumed, half done ({h['stopped_after']:,} stopped by SIGTERM): start to first new item "
                     "(x fresh); parent peak", f"{h['to_first_new_item']:.1f} s ({h['ratio']:.2f}); {h['parent_mb']:.0f} MB"),
                 (w, "of which: reading the manifest into item states (all done / half done, timed apart)",
                  f"{a['manifest_load']:.1f} s / {h['manifest_load']:.1f} s")]
    cl = r.get("claims")
    if cl and "skipped" not in cl:
        w = "12 claims"
        for run in cl["runs"]:
            shares = ", ".join(_n(x) for x in run["per_runner"])
            rows.append((w, f"{cl['rows']:,} work-table rows x {cl['item_seconds'] * 1000:.0f} ms (pg_sleep), "
                            f"{run['runners']} runner(s) x {cl['workers']} workers: rows/s in all; per runner",
                         f"{_n(run['rate'])}; {shares}"))
        rows.append((w, f"{cl['ratio_runners']} runners over 1 runner (ideal {cl['ratio_runners']})",
                     f"{cl['ratio']:.2f}x"))
    elif cl:
        rows.append(("12 claims", "work table", cl["skipped"]))
    return rows


def render_text(r: dict) -> str:
    rows = table(r)
    w1 = max(len(a) for a, _, _ in rows)
    w2 = max(len(b) for _, b, _ in rows)
    lines = [f"{a:<{w1}}  {b:<{w2}}  {c}" for a, b, c in rows]
    lines.append("")
    for v in targets(r):
        lines.append(f"{v.word:<5} {v.target}: {v.measured}" + (f"  [{v.margin}]" if v.margin else ""))
    prof = r.get("profile")
    if prof and "parent_buckets" in prof:
        lines += ["", f"parent samples on {prof['items']:,} no-op items (py-spy; share of all / of the loop):"]
        lines += [f"  {share * 100:5.1f}%  {loop}  {name}" for name, share, loop in _buckets(prof)]
    return "\n".join(lines)


def render_markdown(r: dict) -> str:
    out = ["| workload | figure | value |", "| --- | --- | --- |"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in table(r)]
    out += ["", "| target | measured | verdict | by how much |", "| --- | --- | --- | --- |"]
    out += [f"| {v.target} | {v.measured} | {v.word} | {v.margin} |" for v in targets(r)]
    prof = r.get("profile")
    if prof and "parent_buckets" in prof:
        out += ["", f"The parent's samples on {prof['items']:,} no-op items (py-spy, {prof['parent_samples']} samples "
                f"at {prof['rate']} Hz; the parent took {prof['process_share'].get('parent', 0) * 100:.0f}% of all "
                "samples of the process tree):", "",
                "| share of the parent | share of the loop (start-up left out) | where |", "| --- | --- | --- |"]
        out += [f"| {share * 100:.1f}% | {loop} | {name} |" for name, share, loop in _buckets(prof)]
    return "\n".join(out) + "\n"


def _buckets(prof: dict) -> list[tuple[str, float, str]]:
    """(bucket, share of the parent's samples, share of the samples after start-up as text)."""
    steady = sum(share for name, share in prof["parent_buckets"] if not name.startswith("start-up"))
    return [(name, share, "" if name.startswith("start-up") or not steady else f"{share / steady * 100:.1f}%")
            for name, share in prof["parent_buckets"]]
