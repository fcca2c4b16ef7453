"""The SQL steps handler (`--handler sql:PATH`): runs a steps file (see job.db.stepsparse) for
every item on the worker's connection, committing per item or per step (--commit).

It never sleeps and never retries a step in place: on any error it rolls back the open
transaction (all of the item's work with --commit item, the failed step's with --commit step)
and raises, and the parent decides whether and when the item runs again. No savepoints are
needed for that: the unit of rollback is always a whole transaction, which is also the only
thing that releases a deadlock's waiter on Oracle (ORA-00060) or ends a transaction that
must roll back (ORA-63302, PostgreSQL 40001).

Each transaction (the item's statements, or a step's) goes to the dialect whole, with its
commit (`run_transaction`), so that it travels in as few round trips as the driver allows:
one on PostgreSQL (a pipeline, or a lone statement with its Sync), one per statement on
Oracle (the commit travels with the last one); see those modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import Permanent, UsageError
from .session import rollback_quietly
from .stepsfile import StepsFile
from .stepsparse import load_steps
from .url import COMMIT_ITEM

if TYPE_CHECKING:
    from ..items import Item
    from ..worker import Context
    from .url import DbSettings


def steps_handler(path: str, db: DbSettings | None = None) -> StepsHandler:
    """The handler for `--handler sql:PATH`: parses and checks the file; does not connect."""
    if db is None:
        raise UsageError(f"--handler sql:{path} needs --db")
    steps = load_steps(path, dialect=db.dialect)
    committing = [step.name for step in steps.steps if step.commits]
    if committing and db.commit == COMMIT_ITEM:
        raise UsageError(f"--handler sql:{path}: step {committing[0]!r} declares `-- commits: yes`, which "
                         "breaks the item's one transaction (--commit item); use --commit step")
    return StepsHandler(steps, db)


class StepsHandler:
    """Runs a StepsFile for one item on the worker's connection (see --commit)."""

    def __init__(self, steps: StepsFile, db: DbSettings) -> None:
        self.steps = steps
        self.db = db

    def check_payload(self, payload: Mapping[str, Any]) -> list[str]:
        """What --dry-run reports for an item: [] when it can run."""
        return self.steps.problems(payload)

    def __call__(self, item: Item, ctx: Context) -> dict[str, Any]:
        """Run the steps not yet committed for this item; returns {"steps", "rows"} (and
        "resumed_after"). Raises InvalidPayload before any SQL when the payload cannot fill the
        steps; raises the driver's error after rolling back when a statement fails. With
        --commit step, `ctx.progress["step"]` names the last committed step, so the next
        attempt starts at the one that failed."""
        database = ctx.resources.db
        rendered = self.steps.render(item.payload, database.dialect.PARAMSTYLE)
        start = self._resume_at(ctx.progress)
        conn = database.connection()
        run_transaction = database.dialect.run_transaction
        rows = 0
        try:
            if self.db.commit == COMMIT_ITEM:
                statements = [statement for step in rendered[start:] for statement in step.statements]
                if statements:
                    rows = run_transaction(conn, statements)
            else:
                for step in rendered[start:]:
                    rows += run_transaction(conn, step.statements)
                    # Only after the commit: a retry resumes after the last committed step.
                    ctx.progress["step"] = step.name
        except BaseException:
            rollback_quietly(conn)
            raise
        result: dict[str, Any] = {"steps": len(rendered) - start, "rows": rows}
        if start:
            result["resumed_after"] = rendered[start - 1].name
        return result

    def _resume_at(self, progress: Mapping[str, Any]) -> int:
        name = progress.get("step")
        if name is None:
            return 0
        names = [step.name for step in self.steps.steps]
        if name not in names:
            raise Permanent(f"cannot resume after step {name!r}: the steps file has no such step any "
                            "more; rerun the item under a new run id", code="SQL-STEPS")
        return names.index(name) + 1
