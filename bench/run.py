"""The benchmark runner: `python -m bench [--only NAMES] [--quick] [--repeats N]`.

Runs the workloads in one go, prints the table and the targets (PASS/MISS: a miss never fails
the command), and writes `bench-results/bench-<time>.json` and `.md`, plus `latest.json` and
`latest.md`. Exits non-zero only when a workload could not be run at all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import claims, outage, profile, scale, sqlspeed, workloads
from .common import ROOT, S3Server
from .report import render_markdown, render_text, targets

ALL = ("startup", "overhead", "profile", "peers", "io", "database", "sqlspeed", "resume", "memory", "outage", "scale",
       "claims")


def hardware() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": cpu, "memory_gib": round(mem_kib / 1024 ** 2, 1),
            "kernel": platform.release(), "python": platform.python_version(), "load_average_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated workloads: {','.join(ALL)}")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each noisy figure (medians are kept)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one repeat: a smoke test, not figures to quote")
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(ALL)
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")

    results: dict = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "hardware": hardware(),
                     "quick": args.quick, "errors": {}, "seconds": {}}
    work = Path(tempfile.mkdtemp(prefix="bulkjob-bench-"))
    s3 = S3Server()
    b = workloads.Bench(work, s3, repeats=1 if args.quick else args.repeats, quick=args.quick)
    q = args.quick
    plan = {
        "startup": lambda: workloads.startup(b),
        "overhead": lambda: workloads.overhead_and_floor(b, count=5000 if q else 20000),
        "profile": lambda: _profile(b, 5000 if q else 50000),
        "peers": lambda: workloads.peer_designs(b, count=40 if q else 300),
        "io": lambda: workloads.io_scaling(b, count=400 if q else 2000, workers=(1, 2, 8, 32) if q else (1, 2, 4, 8, 16, 32, 64)),
        "database": lambda: workloads.database(b, count=50 if q else 500),
        "sqlspeed": lambda: sqlspeed.sql_speed(b, count=2000 if q else 20000, runs=1 if q else 3),
        "resume": lambda: workloads.resume_and_checkpoints(b, count=20000 if q else 100000, stop_at=19800 if q else 99000),
        "memory": lambda: workloads.memory(b, counts=(10000, 100000) if q else (10000, 100000, 1000000)),
        "outage": lambda: outage.database_outage(b, count=3000 if q else 8000, down=5.0 if q else 10.0),
        "scale": lambda: scale.resume_at_scale(b, count=100_000 if q else 1_000_000),
        "claims": lambda: claims.claim_scaling(b, rows=400 if q else 1600),
    }
    total_started = time.monotonic()
    try:
        for name in ALL:
            if name not in chosen:
                continue
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                results[name] = plan[name]()
            except Exception as e:  # one broken workload must not cost the others
                traceback.print_exc()
                results["errors"][name] = f"{type(e).__name__}: {e}"
            results["seconds"][name] = round(time.monotonic() - started, 1)
            print(f"bench: {name} done in {results['seconds'][name]:.0f}s", file=sys.stderr, flush=True)
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["hardware"]["load_average_at_end"] = os.getloadavg()
    results["seconds"]["total"] = round(time.monotonic() - total_started, 1)
    results["targets"] = [{"target": v.target, "measured": v.measured, "verdict": v.word, "margin": v.margin}
                          for v in targets(results)]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    text = json.dumps(results, indent=1, default=str)
    markdown = _markdown(results)
    for name in (f"bench-{stamp}", "latest"):
        (out / f"{name}.json").write_text(text)
        (out / f"{name}.md").write_text(markdown)
    print(render_text(results))
    for name, error in results["errors"].items():
        print(f"ERROR {name}: {error}")
    print(f"\nwritten: {out / f'bench-{stamp}.json'} and .md ({results['seconds']['total']:.0f}s in all)")
    sys.exit(1 if results["errors"] else 0)


def _profile(b: workloads.Bench, count: int) -> dict:
    why = profile.available()
    if why:
        return {"skipped": why}
    items = b.items(f"noop-{count}", count)
    return profile.profile_noop(items, manifest=b.s3.manifest("profile"), env=b.s3.env, run_id=b.run_id("profile"))


def _markdown(r: dict) -> str:
    hw = r["hardware"]
    head = [f"Measured {r['started_at']} on {hw['nproc']} CPUs ({hw['cpu_model']}), {hw['memory_gib']} GiB memory, "
            f"Linux {hw['kernel']}, Python {hw['python']}; load average {hw['load_average_at_start'][0]:.1f} at the "
            f"start and {hw['load_average_at_end'][0]:.1f} at the end.", ""]
    if r.get("quick"):
        head = ["**Quick run (smaller sizes): not figures to quote.**", "", *head]
    errors = [f"- {name}: could not run: {error}" for name, error in r["errors"].items()]
    return "\n".join(head) + "\n" + render_markdown(r) + ("\n" + "\n".join(errors) + "\n" if errors else "")
