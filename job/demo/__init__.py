"""The demo database of `make run`: a SQLite file with a day of sales per store, and the items
(one per store and day) that load.sql turns into daily totals.

    python -m job.demo 3000 --db .cache/demo/demo.db > items.jsonl   # (re)create both
    python -m job.demo --summary .cache/demo/demo.db                 # what the load produced
"""

from __future__ import annotations

import datetime
import json
import os
import random
import sqlite3
from collections.abc import Iterator

SCHEMA = """
PRAGMA journal_mode = WAL;
CREATE TABLE raw_sales (store TEXT NOT NULL, day TEXT NOT NULL, amount INTEGER NOT NULL);
CREATE INDEX raw_sales_item ON raw_sales (store, day);
CREATE TABLE stage_sales (store TEXT NOT NULL, day TEXT NOT NULL, amount INTEGER NOT NULL);
CREATE TABLE daily_totals (
  store TEXT NOT NULL, day TEXT NOT NULL, total INTEGER NOT NULL CHECK (total >= 0),
  sales INTEGER NOT NULL, PRIMARY KEY (store, day));
CREATE TABLE load_audit (store TEXT NOT NULL, day TEXT NOT NULL, loaded_at TEXT NOT NULL,
  PRIMARY KEY (store, day));
"""
#: Sales rows per item.
SALES_PER_ITEM = 5
#: Every this many items, one has a refund larger than its sales: its aggregate step fails
#: the CHECK constraint, a permanent error.
REFUND_EVERY = 1000
#: The one item whose target table is not an identifier: refused before any SQL runs.
BAD_TARGET = "daily_totals; DROP TABLE raw_sales"


def create(path: str, count: int, *, seed: int = 7) -> Iterator[str]:
    """Create the database at `path` (replacing it) and yield `count` item lines."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    rand = random.Random(seed)
    stores = max(1, round(count ** 0.5 / 2))
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)
    first_day = datetime.date(2026, 1, 1)
    items = []
    for i in range(count):
        store = f"store-{i % stores:03d}"
        day = (first_day + datetime.timedelta(days=i // stores)).isoformat()
        amounts = [rand.randint(1, 500) for _ in range(SALES_PER_ITEM)]
        if (i + 1) % REFUND_EVERY == 0:
            amounts.append(-10 * sum(amounts))
        conn.executemany("INSERT INTO raw_sales VALUES (?, ?, ?)", [(store, day, a) for a in amounts])
        target = BAD_TARGET if i == count // 2 else "daily_totals"
        items.append({"id": f"{store}/{day}", "payload": {"store": store, "day": day, "target": target}})
    conn.commit()
    conn.close()
    for item in items:
        yield json.dumps(item)


def summary(path: str) -> str:
    """A few lines on what the load left in the database."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = {name: conn.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0]
                for name in ("raw_sales", "stage_sales", "daily_totals", "load_audit")}
        total = conn.execute("SELECT COALESCE(SUM(total), 0) FROM daily_totals").fetchone()[0]
    finally:
        conn.close()
    lines = [f"database {path}:"]
    lines += [f"  {name:<13} {count:>7} rows" for name, count in rows.items()]
    lines.append(f"  sum of daily totals: {total}")
    return "\n".join(lines)
