"""Before the first item: waiting out an unreachable store or database, and the preflight that
tells a configuration error (exit 2, within seconds) from an outage (wait, then exit 5).

The waits here block the parent, which has nothing else to do yet, but a SIGTERM or SIGINT
ends them at once.
"""

from __future__ import annotations

import logging
import random
import select
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from .errors import BulkjobError, ConfigError, EnvironmentUnavailable, Unreachable
from .exits import EXIT_INTERRUPTED
from .outcome import CONFIG
from .retry import backoff_delay
from .scheduler import PROBE_BASE, PROBE_CAP, PROBE_FACTOR, PROBE_JITTER
from .signals import Signals

log = logging.getLogger("bulkjob")

T = TypeVar("T")


class Interrupted(BulkjobError):
    """Raised when a signal arrives while the run waits before its first item (exit 3)."""

    exit_code = EXIT_INTERRUPTED


def patiently(what: str, fn: Callable[[], T], *, timeout: float, signals: Signals | None,
              rand: Callable[[], float] = random.random) -> T:
    """Call `fn` until it stops raising Unreachable (the store, the database), waiting between tries as a
    paused run probes (PROBE_* in job.scheduler), for up to `timeout` seconds; then raise
    EnvironmentUnavailable. The first failure and the recovery are logged at WARNING."""
    started = time.monotonic()
    tries = 0
    while True:
        try:
            value = fn()
        except Unreachable as e:
            tries += 1
            waited = time.monotonic() - started
            if tries == 1:
                log.warning("%s: unavailable (%s); waiting up to %s for it", what, e, _duration(timeout))
            if waited >= timeout:
                raise EnvironmentUnavailable(
                    f"{what}: still unavailable after {_duration(waited)} (--outage-timeout): {e}. "
                    "Nothing was lost; run again with the same --run-id once it is back") from None
            delay = backoff_delay(tries, base=PROBE_BASE, cap=PROBE_CAP, rand=rand(), jitter=PROBE_JITTER,
                                  factor=PROBE_FACTOR)
            _sleep(min(delay, max(0.0, timeout - waited)), signals)
            continue
        if tries:
            log.warning("%s: available again after %s", what, _duration(time.monotonic() - started))
        return value


def _sleep(seconds: float, signals: Signals | None) -> None:
    """Sleep, but return at once (raising Interrupted) when SIGTERM or SIGINT arrives."""
    if signals is None:
        time.sleep(seconds)
        return
    if not signals.count:
        select.select([signals.reader], [], [], seconds)
        signals.drain_wakeups()
    if signals.count:
        raise Interrupted("interrupted while waiting before the first item; nothing ran")


def check_database(settings, *, retry_on: Iterable[str] = (), outage_on: Iterable[str] = ()) -> None:
    """The preflight of --db: connect with the session settings and run a trivial query.

    Raises ConfigError (exit 2) when the database refuses our settings or a --session-sql
    statement fails, DatabaseUnavailable when it cannot be reached (the caller waits)."""
    from .db import DatabaseUnavailable, preflight, preflight_failure

    try:
        preflight(settings)
    except Exception as e:
        failure = preflight_failure(settings, e, retry_on=retry_on, outage_on=outage_on)
        code = f" {failure.code}" if failure.code else ""
        what = f"{failure.error_class}{code}: {_first_line(failure.message)}"
        if failure.kind == CONFIG:
            raise ConfigError(f"--db: the database refused the connection or the session settings: {what}") from None
        raise DatabaseUnavailable(what) from None


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

