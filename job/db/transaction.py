"""A transaction whose commit travels with its last statement, for drivers where a commit can be
a flag of the execute call rather than a call of its own (python-oracledb's `autocommit`).

The driver is reached through a Session, so which call carries the commit, and what happens
when a statement fails, is tested on the calls themselves without a database.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .dialect import BoundStatement


class Session(Protocol):
    """One database session as `commit_with_last` drives it."""

    def execute(self, sql: str, params: dict[str, Any] | None, *, commit: bool) -> int:
        """Run one statement in the open transaction; returns the rows it affected. With
        `commit`, the driver commits the transaction with the statement if the statement
        succeeds, and commits nothing if it fails."""

    def in_transaction(self) -> bool:
        """Whether the session holds changes not committed."""

    def commit(self) -> None:
        """Commit the open transaction (a call of its own)."""


def commit_with_last(session: Session, statements: Sequence[BoundStatement]) -> int:
    """Run `statements` ((sql, binds or None), in order) as one transaction, the last one asked
    to commit with it; returns the rows they affected.

    A statement that fails raises its error before anything is committed (only the last one
    carries the commit, and only if it succeeds); the caller rolls back the rest. If the session
    still holds changes after the last statement, it is committed with a call of its own: a
    driver may not carry the commit with every kind of call (python-oracledb's thin mode sends
    no commit when it re-executes a query).
    """
    rows = 0
    last = len(statements) - 1
    for index, (sql, params) in enumerate(statements):
        rows += session.execute(sql, params, commit=index == last)
    if statements and session.in_transaction():
        session.commit()
    return rows
