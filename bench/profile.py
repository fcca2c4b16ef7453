"""Where the parent's time goes on the no-op workload: py-spy (from the bench's own virtualenv,
never a dependency of the job) samples the parent and its workers, and the parent's samples are
put into buckets by the innermost function of the job that they are in."""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from .common import PYTHON, ROOT, clean_env, free_port

BENCH_VENV = ROOT / ".venv-bench"
#: Samples per second: enough for a 2-3 s run, light enough not to starve the job on 2 cores.
RATE = 250

#: (bucket, functions): a sample goes to the bucket of the innermost frame that matches.
BUCKETS = (
    ("read and parse items (two passes)", ("parse_line", "scan", "iter_items", "Run._tasks", "plan")),
    ("encode manifest records (JSON)", ("encode_record", "Checkpointer.add")),
    ("metrics observer", ("RunMetrics.", "PrometheusObserver.", "Progress.", "OnStart.")),
    ("receive outcomes (read, unpickle)", ("Pool._receive", "Answers.")),
    ("send tasks (pickle, write)", ("Pool.submit",)),
    ("wait on pipes and sentinels (build selector, poll)", ("Pool.wait",)),
    ("outcome bookkeeping (records, counts)", ("Loop._on_outcome", "Loop._on_failure", "Recording.")),
    ("scheduler decisions (queue, retries, depth)", ("Scheduler.", "Breaker.")),
    ("dispatch loop (free slots, next item)", ("Loop._dispatch", "Loop._take")),
    ("run loop (timeouts, lease, progress)", ("Loop.run_loop", "Loop._timeout", "Loop._kill_overdue",
                                              "Loop._watch_fence", "Loop._reason_to_stop")),
    ("checkpoint writer thread (S3 PUTs)", ("BackgroundWriter._run", "Checkpointer._write")),
    ("lease renewal thread", ("Lease.",)),
    ("start-up: imports", ("_find_and_load",)),
    ("start-up: manifest, lease, meta", ("Run.execute", "Run._shard", "open_shard", "ShardManifest.")),
)

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def available() -> str | None:
    """Why the profile cannot be taken here, or None."""
    if not (BENCH_VENV / "bin" / "py-spy").exists():
        return f"py-spy not installed in {BENCH_VENV} (make bench installs it)"
    return None


def profile_noop(items: Path, *, manifest: str, env: dict, run_id: str, workers: int = 2) -> dict:
    """Record the no-op workload once under py-spy and summarise the parent's samples."""
    with tempfile.TemporaryDirectory(prefix="bench-pyspy-") as tmp:
        raw = Path(tmp) / "samples.txt"
        cmd = [str(BENCH_VENV / "bin" / "py-spy"), "record", "--nonblocking", "--subprocesses",
               "--rate", str(RATE), "--format", "raw", "--output", str(raw), "--",
               PYTHON, "-m", "bench.entry", "run", "--items", str(items), "--handler", "bench.handlers:noop",
               "--manifest", manifest, "--run-id", run_id, "--workers", str(workers),
               "--metrics-port", str(free_port())]
        started = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(env), capture_output=True, text=True, timeout=600)
        wall = time.time() - started
        if proc.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy failed ({proc.returncode}): {proc.stderr[-2000:]}")
        summary = summarise(raw.read_text())
        summary["wall"] = wall
        summary["items"] = sum(1 for _ in open(items))
        return summary


def summarise(text: str) -> dict:
    """Buckets and top self-time functions of the parent's samples; shares of the processes."""
    buckets: Counter = Counter()
    own: Counter = Counter()
    processes: Counter = Counter()
    parent_samples = 0
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        parts = stack.split(";")
        nested = [i for i, p in enumerate(parts) if p.startswith("process ")]
        if len(nested) > 1:
            processes["forkserver" if len(nested) == 2 else "workers"] += n
            continue
        processes["parent"] += n
        parent_samples += n
        frames = [_name(p) for p in parts[1:]]
        own[frames[-1] if frames else "(no Python frame)"] += n
        buckets[_bucket(frames)] += n
    return {
        "samples": total, "parent_samples": parent_samples, "rate": RATE,
        "process_share": {k: v / total for k, v in processes.most_common()} if total else {},
        "parent_buckets": [(k, v / parent_samples) for k, v in buckets.most_common()] if parent_samples else [],
        "parent_self_top": [(k, v / parent_samples) for k, v in own.most_common(15)] if parent_samples else [],
    }


def _name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    short = file.split("site-packages/")[-1]
    return f"{m.group('func')} ({short})"


def _bucket(frames: list[str]) -> str:
    for frame in reversed(frames):
        func = frame.split(" (", 1)[0]
        for bucket, markers in BUCKETS:
            if any(func == m or (m.endswith(".") and func.startswith(m)) for m in markers):
                return bucket
    return "other"
