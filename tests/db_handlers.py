"""Test handlers that use the worker's database connection (`ctx.db`, `ctx.executemany`)."""

from __future__ import annotations


def batch_insert(item, ctx):
    """Payload: sql (driver-native placeholders), rows, batch_size. Commits the good rows and
    returns the refused ones."""
    p = item.payload
    errors = ctx.executemany(p["sql"], p["rows"], batch_size=p.get("batch_size", 1000))
    ctx.db.commit()
    return {"bad": [e.as_dict() for e in errors]}


def pg_session(item, ctx):
    """The PostgreSQL backend pid serving this item: one per worker when connections are reused."""
    with ctx.db.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    ctx.db.rollback()
    return {"backend": pid}


def insert_no_commit(item, ctx):
    """Inserts the item's row through ctx.db and returns without committing (a handler's bug)."""
    cur = ctx.db.cursor()
    cur.execute(item.payload["sql"], (item.id,))
    cur.close()
