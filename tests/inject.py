"""The real CLI with a fault injected into the parent process, for the tests of how runs end.

    python tests/inject.py WHERE bulkjob-arguments...

WHERE is one of:
  bug-before-loop   a bug after the lease is taken, before the first item goes out
  bug-in-loop       a bug while items are handed out
  bug-after-loop    a bug while the end is saved
  sigint-at-start   a real SIGINT before the run's own signal handling is in place
  sigterm-at-start  the same with SIGTERM
  sigterm-at-end    a real SIGTERM while the summary is being written
"""

from __future__ import annotations

import os
import signal
import sys

from job import checkpoint, engine, run, summary


def _bug(*args, **kwargs):
    raise RuntimeError("injected bug")


def _signal_first(signum, then):
    def patched(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return then(*args, **kwargs)

    return patched


def _bug_on_third_call(original):
    calls = [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected bug")
        return original(*args, **kwargs)

    return patched


def main() -> None:
    where = sys.argv.pop(1)
    if where == "bug-before-loop":
        run.Scheduler = _bug
    elif where == "bug-in-loop":
        engine.Loop._dispatch = _bug_on_third_call(engine.Loop._dispatch)
    elif where == "bug-after-loop":
        checkpoint.Checkpointer.close = _bug
    elif where == "sigint-at-start":
        run.Run.execute = _signal_first(signal.SIGINT, run.Run.execute)
    elif where == "sigterm-at-start":
        run.Run.execute = _signal_first(signal.SIGTERM, run.Run.execute)
    elif where == "sigterm-at-end":
        summary.write_summary = _signal_first(signal.SIGTERM, summary.write_summary)
    else:
        raise SystemExit(f"unknown fault {where!r}")
    from job.cli import main as cli

    cli(prog_name="bulkjob")


if __name__ == "__main__":
    main()
