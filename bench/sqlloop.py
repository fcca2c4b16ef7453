"""The hand-written loop the SQL steps handler is measured against: the same items file, the
same statements, one psycopg connection per process, a commit per item, nothing else.

    python -m bench.sqlloop CONNINFO ITEMS WORKERS STATEMENTS_JSON    (prints one JSON line)

STATEMENTS_JSON is a JSON list of statements in psycopg's own syntax (`%(name)s`), each run
with the item's payload as its parameters. Item i goes to process i mod WORKERS. The password
comes from PGPASSWORD, as libpq reads it.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time

#: The job's start method: the loop's processes start the same way its workers do.
START_METHOD = "forkserver"


def run_share(conninfo: str, statements: list[str], payloads: list[dict]) -> tuple[int, float, float, float]:
    """Run every payload's statements and commit, one item at a time: (items, first commit,
    last commit, CPU seconds of this process meanwhile), wall-clock times."""
    import psycopg

    first = last = float("nan")
    cpu = time.process_time()
    with psycopg.connect(conninfo) as conn:
        cur = conn.cursor()
        for n, payload in enumerate(payloads):
            for sql in statements:
                cur.execute(sql, payload)
            conn.commit()
            last = time.time()
            if n == 0:
                first = last
    return len(payloads), first, last, time.process_time() - cpu


def measure(conninfo: str, path: str, workers: int, statements: list[str]) -> dict:
    with open(path, "rb") as f:
        payloads = [json.loads(line)["payload"] for line in f if line.strip()]
    shares = [payloads[i::workers] for i in range(workers)]
    ctx = multiprocessing.get_context(START_METHOD)
    with ctx.Pool(workers) as pool:
        results = pool.starmap(run_share, [(conninfo, statements, share) for share in shares])
    count = sum(r[0] for r in results)
    first = min(r[1] for r in results)
    last = max(r[2] for r in results)
    return {"items": count, "workers": workers, "steady_rate": (count - 1) / (last - first),
            "first": first, "last": last, "cpu_seconds": sum(r[3] for r in results)}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))))
