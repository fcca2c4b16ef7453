"""The SQL steps handler (`--handler sql:PATH`): runs a steps file (see job.db.stepsfile) for
every item on the worker's connection, a savepoint before each step, a commit per item or per
step (--commit), and a retry in place of a step that hit a lock or a deadlock.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from contextlib import closing
from typing import Any

from ..errors import Permanent, UsageError
from ..retry import backoff_delay, classify
from . import COMMIT_ITEM, COMMIT_STEP, DbSettings, classifiers
from .stepsfile import RenderedStep, StepsFile, load_steps

#: Retries of one step inside an attempt (after a rollback to its savepoint), for retryable
#: errors that keep the session: a lock or a deadlock usually clears within a second or two;
#: longer waits go back to the run loop's backoff.
STEP_RETRIES = 3
#: Backoff between those retries, seconds (full jitter, doubling, capped).
STEP_BACKOFF = 0.5
STEP_MAX_BACKOFF = 4.0


def steps_handler(path: str, db: DbSettings | None = None) -> StepsHandler:
    """The handler for `--handler sql:PATH`: parses and checks the file; does not connect."""
    if db is None:
        raise UsageError(f"--handler sql:{path} needs --db")
    return StepsHandler(load_steps(path, dialect=db.dialect), db)


class StepsHandler:
    """Runs a StepsFile for one item on the worker's connection (see --commit)."""

    def __init__(self, steps: StepsFile, db: DbSettings) -> None:
        self.steps = steps
        self.db = db

    def check_payload(self, payload: Mapping[str, Any]) -> list[str]:
        """What --dry-run reports for an item: [] when it can run."""
        return self.steps.problems(payload)

    def __call__(self, item, ctx) -> dict[str, Any]:
        database = ctx.resources.db
        rendered = self.steps.render(item.payload, database.dialect.PARAMSTYLE)
        start = self._resume_at(ctx.progress)
        conn = database.connection()
        rows = 0
        try:
            for index in range(start, len(rendered)):
                rows += self._run_step(conn, database.dialect, index, rendered[index], ctx)
                if self.db.commit == COMMIT_STEP:
                    conn.commit()
                    # Only after the commit: a retry resumes after the last committed step.
                    ctx.progress["step"] = rendered[index].name
            if self.db.commit == COMMIT_ITEM:
                conn.commit()
        except BaseException:
            _rollback(conn)
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

    def _run_step(self, conn, dialect, index: int, step: RenderedStep, ctx) -> int:
        """Run one step under its savepoint; retry it in place after a retryable error that kept
        the session (lock, deadlock), at most STEP_RETRIES times. Returns rows affected."""
        savepoint = f"bulkjob_step_{index + 1}"
        retries = 0
        while True:
            marked = False
            try:
                dialect.begin(conn)
                with closing(conn.cursor()) as cur:
                    cur.execute(dialect.SAVEPOINT.format(name=savepoint))
                    marked = True
                    rows = 0
                    for sql, params in step.statements:
                        if params is None:
                            cur.execute(sql)
                        else:
                            cur.execute(sql, params)
                        rows += max(cur.rowcount or 0, 0)
                    if dialect.RELEASE and self.db.commit == COMMIT_ITEM:
                        cur.execute(dialect.RELEASE.format(name=savepoint))
                return rows
            except Exception as exc:
                failure = classify(exc, retry_on=ctx.resources.settings.retry_on,
                                   classifiers=classifiers(self.db))
                if (retries >= STEP_RETRIES or not failure.retryable or failure.reconnect
                        or failure.code in dialect.RESTART_TRANSACTION):
                    raise
                if marked:
                    try:
                        with closing(conn.cursor()) as cur:
                            cur.execute(dialect.ROLLBACK_TO.format(name=savepoint))
                    except Exception:
                        raise exc from None
                retries += 1
                delay = backoff_delay(retries, base=STEP_BACKOFF, cap=STEP_MAX_BACKOFF, rand=random.random())
                ctx.log.warning("step %s: %s%s; rolled back the step, retry %d/%d in %.2fs",
                                step.name, failure.error_class, f" {failure.code}" if failure.code else "",
                                retries, STEP_RETRIES, delay)
                time.sleep(delay)


def _rollback(conn) -> None:
    """Undo the open transaction after a failure; a dead session has nothing left to undo."""
    try:
        conn.rollback()
    except Exception:
        pass
