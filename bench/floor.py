"""The floor: the same items through a bare `multiprocessing.Pool.imap_unordered`, with the job's
start method (forkserver) and a no-op function; no retry, manifest, metrics or supervision.

    python -m bench.floor ITEMS WORKERS CHUNKSIZE    (prints one JSON line)
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time

START_METHOD = "forkserver"


def noop(item):
    return None


def measure(path: str, workers: int, chunksize: int) -> dict:
    """Items parsed from the file, then timed from the pool's creation: first and last result."""
    with open(path, "rb") as f:
        items = [(obj["id"], obj.get("payload", {})) for obj in map(json.loads, f)]
    ctx = multiprocessing.get_context(START_METHOD)
    started = time.perf_counter()
    first: float | None = None
    count = 0
    with ctx.Pool(workers) as pool:
        for _ in pool.imap_unordered(noop, items, chunksize=chunksize):
            count += 1
            if first is None:
                first = time.perf_counter()
        last = time.perf_counter()
    assert first is not None, "the pool ran no item"
    return {"items": count, "workers": workers, "chunksize": chunksize,
            "steady_rate": (count - 1) / (last - first), "pool_seconds": last - started}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
