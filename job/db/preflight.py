"""The preflight: the parent connects as a worker would before the first item, and says what a failure means."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from ..outcome import CONFIG, DATABASE, INVALID, PERMANENT, Failure
from ..retry import classify
from .dialect import dialect_of
from .errors import classifiers
from .session import call_with_timeout, close_quietly
from .settings import read_password

if TYPE_CHECKING:
    from .url import DbSettings


def preflight(settings: DbSettings) -> None:
    """What the parent checks before the first item: connect as a worker does (--session-sql and
    the statement timeout applied), run the dialect's TRIVIAL_QUERY, roll back, close.

    Raises what the driver raised, or ConnectTimeout when the connect or the query takes longer
    than --connect-timeout; `preflight_failure` turns that into a Failure.
    """
    dialect = dialect_of(settings)
    conn = dialect.connect(settings, read_password(settings))
    try:
        def trivial_query() -> None:
            cur = conn.cursor()
            try:
                cur.execute(dialect.TRIVIAL_QUERY)
                cur.fetchall()
            finally:
                cur.close()
            conn.rollback()

        call_with_timeout(trivial_query, settings.connect_timeout, f"{dialect.TRIVIAL_QUERY} (preflight)")
    finally:
        close_quietly(conn)


def preflight_failure(settings: DbSettings, exc: BaseException, *, retry_on: Iterable[str] = (),
                      outage_on: Iterable[str] = ()) -> Failure:
    """The Failure for an exception `preflight(settings)` raised, with `connecting=True`.

    `kind` is OUTAGE (the database cannot be reached: wait and try again), or CONFIG (it refused
    our settings: a wrong password, a missing database, a bad --session-sql: stop with exit 2).
    A trivial query cannot fail for an item's reason, so a permanent error is CONFIG too; a
    passing one (a lock, --retry-on) stays RETRYABLE: try again as for an outage.
    """
    failure = classify(exc, retry_on=retry_on, outage_on=outage_on, classifiers=classifiers(settings))
    kind = CONFIG if failure.kind in (PERMANENT, INVALID) else failure.kind
    return replace(failure, kind=kind, system=DATABASE, connecting=True)
