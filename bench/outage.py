"""A database outage under a running job: items failed by it, and how soon after the database
returns the job is doing work again (the outage breaker's probe schedule, with the defaults)."""

from __future__ import annotations

import threading
import time

from .common import pg_server


def database_outage(b, *, count: int = 8000, down: float = 10.0, workers: int = 4) -> dict:
    """`count` one-statement items (with a 2 ms server-side pause each) against a private
    PostgreSQL that is stopped for `down` seconds once a fifth of them are committed."""
    server, skipped = pg_server()
    if server is None:
        return {"skipped": skipped}
    try:
        name = server.create_database("outage")
        with server.connect(name) as conn:
            conn.execute("CREATE TABLE ledger (item_id text NOT NULL)")
        steps = b.work / "outage.sql"
        steps.write_text("-- step: work\nSELECT pg_sleep(0.002);\nINSERT INTO ledger (item_id) VALUES (:item);\n")
        items = b.items(f"outage-{count}", count, lambda i: {"item": f"item-{i:07d}"})
        times: dict[str, float] = {}

        def outage(proc) -> None:
            def cut() -> None:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    with server.connect(name) as conn:
                        if conn.execute("SELECT count(*) FROM ledger").fetchone()[0] >= count // 5:
                            break
                    time.sleep(0.05)
                server.shutdown()
                times["stopped"] = time.time()
                time.sleep(down)
                server.start()
                times["back"] = time.time()

            threading.Thread(target=cut, daemon=True).start()

        b.s3.reset()
        run = b.job(items, f"sql:{steps}", name="outage", workers=workers,
                    extra=("--db", server.url(name)), env={"BULKJOB_DB_PASSWORD": server.password},
                    on_start=outage)
        with server.connect(name) as conn:
            committed, distinct = conn.execute("SELECT count(*), count(DISTINCT item_id) FROM ledger").fetchone()
        after = sorted(r["at"] for r in run.records if r["state"] == "done" and r["at"] >= times["back"])
        outages = run.summary.get("outages", [])
        return {"items": count, "workers": workers, "down": down, "failed": run.summary["failed"],
                "done": run.summary["done"], "committed": committed, "distinct": distinct,
                "refunded": run.summary.get("refunded", 0), "attempts": run.summary["attempts"],
                "to_next_item_done": (after[0] - times["back"]) if after else None,
                "pause_seconds": sum(o["seconds"] for o in outages),
                "probes": sum(o["probes"] for o in outages), "outages": len(outages)}
    finally:
        server.stop()
