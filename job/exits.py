"""The exit-code table: every way a run ends, the code it ends with, and what it tells the
operator and the orchestrator (Kubernetes' podFailurePolicy, Airflow's retries).

Pure: the run, the CLI, the summary and the metrics all take their codes and words from here,
and `k8s/` and `airflow_dag.py` map exactly these codes.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3
EXIT_LEASE = 4
EXIT_UNAVAILABLE = 5
#: An internal error: a bug in bulkjob (sysexits' EX_SOFTWARE).
EXIT_INTERNAL = 70


@dataclass(frozen=True, slots=True)
class Ending:
    """One row of the table: the code, the summary's `status`, and what to do about it."""

    code: int
    status: str
    meaning: str
    action: str
    #: Whether running the same command again can help (Airflow retries, the Job's backoff).
    retry: bool


ENDINGS: tuple[Ending, ...] = (
    Ending(EXIT_OK, "ok", "every item is done (failures within --max-failures)", "nothing", False),
    Ending(EXIT_ITEMS_FAILED, "failed", "items failed for good beyond --max-failures, and nothing else",
           "`bulkjob report`, fix the cause, rerun with --retry-failed", False),
    Ending(EXIT_USAGE, "error", "bad usage, configuration or input; no item was run or charged",
           "read the one-line error: it names the option, file or setting", False),
    Ending(EXIT_INTERRUPTED, "interrupted", "stopped by SIGTERM or SIGINT; progress saved",
           "run again with the same --run-id: it resumes", True),
    Ending(EXIT_LEASE, "lease_lost", "another runner holds this shard's lease, or took it over",
           "nothing if another runner is at work; otherwise run again after --lease-ttl", True),
    Ending(EXIT_UNAVAILABLE, "unavailable",
           "the database or the store stayed unreachable past --outage-timeout; progress saved",
           "run again with the same --run-id once it is back: it resumes", True),
    Ending(EXIT_INTERNAL, "internal_error", "a bug in bulkjob; progress saved where it could be",
           "run again with the same --run-id; report the logged traceback", True),
)

_BY_CODE = {ending.code: ending for ending in ENDINGS}


def ending(code: int) -> Ending:
    """The row for `code`; KeyError for a code bulkjob never ends with."""
    return _BY_CODE[code]


def status_of(code: int) -> str:
    """The summary's `status` word for an exit code."""
    return _BY_CODE[code].status


def run_exit_code(*, interrupted: bool, lease_lost: bool, unavailable: bool, unsaved: bool,
                  config_error: bool, failed: int, max_failures: int) -> int:
    """The exit code of a run that reached its end, from what happened during it.

    Precedence: a configuration error found mid-run (2) beats everything, because rerunning
    cannot help; then a lost lease (4), because the other runner owns the shard now; then an
    outage or unsaved progress (5); then a signal (3); then failed items (1).
    """
    if config_error:
        return EXIT_USAGE
    if lease_lost:
        return EXIT_LEASE
    if unavailable or unsaved:
        return EXIT_UNAVAILABLE
    if interrupted:
        return EXIT_INTERRUPTED
    if failed > max_failures:
        return EXIT_ITEMS_FAILED
    return EXIT_OK


#: Codes an exception may end a run with: 1 comes only from counting failed items, and 0 is
#: never an exception.
_RAISED_CODES = frozenset({EXIT_USAGE, EXIT_INTERRUPTED, EXIT_LEASE, EXIT_UNAVAILABLE, EXIT_INTERNAL})


def code_of_exception(exc: BaseException) -> int:
    """The exit code of a run that ended by raising `exc` instead of returning its summary.

    KeyboardInterrupt (SIGINT or SIGTERM before the run's own signal handling is in place) is an
    interruption; an error bulkjob raises on purpose carries its code as `exit_code`; anything
    else, and an error that claims a code no exception may end with, is a bug.
    """
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool) and code in _RAISED_CODES:
        return code
    return EXIT_INTERNAL
