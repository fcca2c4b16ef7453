"""The run's summary and how a run ends: one JSON line on stdout, the same object for Airflow's
XCom, one last line on stderr, one exit code.

Every ending of `bulkjob run` goes through `Ending.finish`: a run that returned its summary, an
option the command line refused, a handler that cannot be imported, bad input, a signal before
the run's own handling was in place, and a bug. The code comes from job.exits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn, TextIO

from .exits import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    code_of_exception,
    ending,
    status_of,
)

log = logging.getLogger("bulkjob")


def write_summary(summary: dict[str, Any], *, stdout: TextIO | None, xcom_path: Path | str | None) -> None:
    """Print the summary line and write it where Airflow's KubernetesPodOperator reads XCom."""
    line = json.dumps(summary, sort_keys=False)
    if stdout is not None:
        try:
            stdout.write(line + "\n")
            stdout.flush()
        except OSError as e:  # a closed pipe: the XCom copy and the exit code still count
            log.error("could not write the summary to stdout: %s", e)
    if xcom_path is not None:
        try:
            tmp = f"{xcom_path}.tmp"
            with open(tmp, "w") as f:
                f.write(line)
            os.replace(tmp, xcom_path)
        except OSError as e:
            log.error("could not write the summary to %s: %s", xcom_path, e)


def keep_stdout() -> TextIO | None:
    """Keep this process's stdout for the summary alone: return a stream on a copy of it, and
    point file descriptor 1 at stderr, so that anything else written there (a handler's print at
    import, a library, C code, and the workers, which inherit it) lands in the log stream."""
    try:
        kept = os.dup(1)
    except OSError:
        return None  # no stdout at all: the summary goes to the XCom path only
    sys.stdout.flush()
    os.dup2(2, 1)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # in step with the log records around it
    return os.fdopen(kept, "w", encoding="utf-8", closefd=True)


class Ending:
    """What the end of a run needs to know, filled in as the run gets that far."""

    def __init__(self, stdout: TextIO | None) -> None:
        self.stdout = stdout
        self.run_id: str | None = None
        self.shard: int | None = None
        self.xcom_path: Path | None = None
        #: The --manifest given, for the hints of the last line.
        self.manifest: str | None = None
        self.max_failures = 0
        self.dry_run = False
        #: The run, once it exists: an early end's summary still has its counts.
        self.run: Any = None
        self.observer: Any = None
        #: The signal that interrupted the start (see `interrupt_start`).
        self.signal: int | None = None
        #: What the error says beyond its one line (the problems of bad input, a handler's
        #: import traceback): logged once at the end, a record each.
        self._details: list[str] = []

    def interrupt_start(self) -> None:
        """Until the run installs its own handling, SIGTERM (like SIGINT) stops the start with
        KeyboardInterrupt, which ends as an interruption with a summary."""

        def stop(signum, frame):
            self.signal = signum
            raise KeyboardInterrupt

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stop)

    def of_exception(self, exc: BaseException) -> tuple[dict[str, Any], int]:
        """The summary and code of a run that ended by raising `exc`."""
        from .logs import known_secrets
        from .redact import scrub_text

        code = code_of_exception(exc)
        if code == EXIT_INTERNAL:
            log.error("internal error (a bug in bulkjob)", exc_info=exc)
            message = f"internal error (a bug in bulkjob): {type(exc).__name__}: {_first_line(str(exc))}"
        elif code == EXIT_INTERRUPTED and isinstance(exc, KeyboardInterrupt):
            name = signal.Signals(self.signal).name if self.signal else "SIGINT"
            message = f"interrupted by {name} before the first item; nothing ran"
        else:
            message = getattr(exc, "line", None) or _first_line(str(exc)) or type(exc).__name__
            details = getattr(exc, "details", None)
            self._details = details() if callable(details) else []
        # A driver's or an S3 client's error may quote its connection settings.
        message = scrub_text(message, known_secrets())
        summary = None
        # Once items were handed out, its counts say what became of them; before, they say nothing.
        if getattr(self.run, "sched", None) is not None:
            try:
                summary = self.run.summary(status_of(code), code)
            except Exception:  # the counts are a courtesy; the ending must not fail on them
                summary = None
        if summary is None:
            summary = {"run_id": self.run_id, "shard": self.shard}
        summary.update(status=status_of(code), exit_code=code, error=message)
        return summary, code

    def finish(self, summary: dict[str, Any], code: int) -> NoReturn:
        """Write the summary (stdout, XCom), the last line, and exit with `code`."""
        from .logs import last_line

        # The run is over: a signal now must not cut the summary short.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        if self.dry_run:
            summary.setdefault("dry_run", True)
        summary.setdefault("status", status_of(code))
        summary.setdefault("exit_code", code)
        if self.observer is not None:
            self.observer.close(code)
        for detail in self._details:
            log.error("%s", detail)
        write_summary(summary, stdout=self.stdout, xcom_path=self.xcom_path)
        if code != EXIT_OK:
            last_line(status_of(code), self._last_words(summary, code))
        sys.exit(code)

    def _last_words(self, summary: dict[str, Any], code: int) -> str:
        """The summary's error, and what to do next."""
        error = summary.get("error") or ending(code).meaning
        run_id = summary.get("run_id") or self.run_id
        manifest = f" --manifest {self.manifest}" if self.manifest else ""
        table = summary.get("work_table")
        if table and code == EXIT_ITEMS_FAILED:
            return (f"{summary.get('failed', 0)} row(s) failed for good (--max-failures {self.max_failures}). "
                    f"List them: bulkjob report --work-table {table} --db ...; after fixing the cause, set them "
                    "back to PENDING (attempts 0) and start runners again")
        if table:
            return f"{error}. Start a runner again: it claims what is left" if ending(code).retry else error
        if code == EXIT_ITEMS_FAILED:
            failed = summary.get("failed", 0)
            earlier = " in an earlier run, not tried again" if summary.get("attempts") == 0 else ""
            return (f"{failed} item(s) failed for good{earlier} (--max-failures {self.max_failures}). "
                    f"List them: bulkjob report{manifest} --run-id {run_id}; after fixing the cause, "
                    "retry them: the same command with --retry-failed")
        if ending(code).retry and run_id and getattr(self.run, "sched", None) is not None:
            return f"{error}. To resume, run the same command with --run-id {run_id}"
        return error


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""
