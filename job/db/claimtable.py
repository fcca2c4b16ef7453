"""A runner's claims sent to its work table: claim, extend, read back, give back; one call, one or two round trips.

The statements are job.db.claim's, the bookkeeping (which rows are held, when to claim, whether
the claims still hold) job.db.queue's. Every call runs on the parent's own connection for the
claims (a ParentConnection: each round trip bounded) and ends its transaction: a write is
committed, a read rolled back. A call that fails leaves the connection to the caller to drop.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import closing
from typing import TYPE_CHECKING, Any

from .parent import ParentConnection

if TYPE_CHECKING:
    from .claim import ClaimSql
    from .url import DbSettings


class ClaimTable:
    """The round trips of `runner`'s claims on one work table, claims lasting `ttl` seconds."""

    def __init__(self, settings: DbSettings, sql: ClaimSql, *, runner: str, ttl: float, call_timeout: float) -> None:
        self.sql = sql
        self.runner = runner
        self.ttl = ttl
        self.db = ParentConnection(settings, call_timeout=call_timeout)

    def connect(self) -> None:
        """Open the connection now if there is none, so that the next call's time is its own."""
        self.db.get()

    def claim(self, *, take_over: bool, limit: int) -> list[tuple[Any, ...]]:
        """Claim up to `limit` rows, PENDING ones or, with `take_over`, RUNNING ones whose claim
        expired; returns their (work_id, payload, attempts)."""
        statements = self.sql.take_over if take_over else self.sql.claim
        return self.db.dialect.claim(self.db.get(), statements, runner=self.runner, ttl=self.ttl, limit=limit)

    def extend(self) -> int:
        """Extend every claim of this runner by the TTL from the database's clock; returns how
        many rows the database extended."""
        conn = self.db.get()
        with closing(conn.cursor()) as cur:
            cur.execute(self.sql.extend, self._binds(ttl=self.ttl))
            count = cur.rowcount
        conn.commit()
        return count

    def mine(self) -> set[str]:
        """The rows RUNNING under this runner's name."""
        conn = self.db.get()
        with closing(conn.cursor()) as cur:
            cur.execute(self.sql.mine, self._binds())
            running = {str(row[0]) for row in cur.fetchall()}
        conn.rollback()
        return running

    def left(self) -> tuple[bool, int]:
        """(whether any row is PENDING, how many RUNNING rows other runners hold)."""
        conn = self.db.get()
        with closing(conn.cursor()) as cur:
            cur.execute(self.sql.pending)
            pending = cur.fetchone() is not None
            cur.execute(self.sql.others, self._binds())
            others = int(cur.fetchone()[0])
        conn.rollback()
        return pending, others

    def give_back(self, work_ids: Iterable[str]) -> None:
        """Make these rows PENDING again, those still this runner's."""
        self.db.execute_many(self.sql.give_back, [self._binds(work_id=work_id) for work_id in work_ids])

    def drop(self) -> None:
        """Close the connection (after a failure); the next call opens a new one."""
        self.db.drop()

    def _binds(self, **extra: Any) -> dict[str, Any]:
        return {"runner": self.runner, **extra}
