"""Every option of bulkjob's commands, each defined once: a field of the command's options class
whose metadata holds its help, kind and the rest. The click options, the environment variables
`BULKJOB_<NAME>`, the values the command receives and the tables of docs/cli.md all come from here.

Pure: no click (job.cli turns each kind into a click type), no I/O. A default is a named constant
of the module that owns it; a default known only when the run starts (a new run id, the CPUs of
the container) is None here, with `default_text` saying what it becomes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from .config import (
    AIRFLOW_XCOM_PATH,
    DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_LOG_FORMAT,
    DEFAULT_LOG_LEVEL,
    DEFAULT_MANIFEST,
    DEFAULT_MAX_FAILURES,
    DEFAULT_METRICS_HOST,
    DEFAULT_METRICS_PORT,
    DEFAULT_OUTAGE_TIMEOUT,
    DEFAULT_PREFETCH,
    DEFAULT_PROGRESS_INTERVAL,
    DEFAULT_REPORT_FORMAT,
    DEFAULT_SHARD_COUNT,
    LOG_FORMATS,
    LOG_LEVELS,
    REPORT_FORMATS,
)
from .db import COMMIT_ITEM, COMMIT_STEP, DEFAULT_CONNECT_TIMEOUT
from .items import MAX_LINE_BYTES
from .lease import DEFAULT_TTL
from .logs import LOG_FILE_BACKUPS, LOG_FILE_MAX_BYTES
from .retry import DEFAULT_BACKOFF, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_BACKOFF

#: Every option also reads the environment variable of this prefix and its name in capitals
#: (BULKJOB_MAX_ATTEMPTS for --max-attempts): what a Kubernetes manifest or Airflow's env_vars set.
ENV_PREFIX = "BULKJOB_"


@dataclass(frozen=True, slots=True)
class Text:
    """Any string."""


@dataclass(frozen=True, slots=True)
class Int:
    """A whole number between `min` and `max`, both included (None: no bound)."""

    min: int | None = None
    max: int | None = None


@dataclass(frozen=True, slots=True)
class Float:
    """A number of at least `min` (above it when `min_open`) and at most `max` (None: no bound)."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False


@dataclass(frozen=True, slots=True)
class Choice:
    """One of `choices`; any case of them when not `case_sensitive`."""

    choices: tuple[str, ...]
    case_sensitive: bool = True


@dataclass(frozen=True, slots=True)
class File:
    """A path that must not be a directory (it need not exist yet)."""


@dataclass(frozen=True, slots=True)
class Size:
    """Bytes, as 512M, 2Gi or 1048576 (job.config.parse_size); the value is an int."""


@dataclass(frozen=True, slots=True)
class Sql:
    """One SQL statement; in the environment variable, one statement a line (a space-separated
    list, the rule for other repeatable options, would split a statement at every space)."""


@dataclass(frozen=True, slots=True)
class Flag:
    """On when given, off otherwise; takes no value."""


Kind = Text | Int | Float | Choice | File | Size | Sql | Flag


@dataclass(frozen=True, slots=True)
class Option:
    """One option of a command: the field `name` of its options class, and what the field's
    metadata says about it. `default` is None for an option without one, `()` for a repeatable
    one, False for a flag; a required option has none."""

    name: str
    help: str
    kind: Kind
    default: Any
    metavar: str | None
    multiple: bool
    required: bool
    #: Environment variables read after BULKJOB_<NAME>, in this order.
    also_env: tuple[str, ...]
    #: What a default known only at run time becomes (None: `default` says it all).
    default_text: str | None
    #: What docs/cli.md adds to `help`: Markdown, for details and links that --help can do without.
    details: str

    @property
    def flag(self) -> str:
        """The command line's spelling: --max-attempts for the field max_attempts."""
        return "--" + self.name.replace("_", "-")

    @property
    def envvars(self) -> tuple[str, ...]:
        """The environment variables that set this option, the first one its own."""
        return (ENV_PREFIX + self.name.upper(), *self.also_env)


#: Where a field's metadata keeps its Option.
_OPTION = "option"


def option(*, help: str, kind: Kind | None = None, default: Any = None, metavar: str | None = None,
           multiple: bool = False, required: bool = False, also_env: tuple[str, ...] = (),
           default_text: str | None = None, details: str = "") -> Any:
    """A field of an options class that is an option of its command (see `Option`); a flag or a
    repeatable option gets its empty default (False, ()) by itself."""
    kind = Text() if kind is None else kind
    if isinstance(kind, Flag):
        default = False
    elif multiple:
        default = ()
    spec = Option(name="", help=help, kind=kind, default=None if required else default, metavar=metavar,
                  multiple=multiple, required=required, also_env=also_env, default_text=default_text,
                  details=details)
    if required:
        return field(metadata={_OPTION: spec})
    return field(default=default, metadata={_OPTION: spec})


def options_of(cls: type[Any]) -> tuple[Option, ...]:
    """The options an options class declares, in the order of its fields."""
    return tuple(replace(f.metadata[_OPTION], name=f.name) for f in fields(cls))


def option_of(cls: type[Any], name: str) -> Option:
    """The option `name` (a field name) of an options class; KeyError when it has none."""
    for found in options_of(cls):
        if found.name == name:
            return found
    raise KeyError(name)


#: Links into the other docs, for the options they explain.
_DATABASES = "See [Databases](databases.md#connecting---db)."
_OBSERVABILITY = "See [Observability](operations.md#observability)."


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """The options of `bulkjob run`, as given (job.config.run_config resolves what is left to
    the run's start)."""

    # What to run
    items: str | None = option(
        metavar="SOURCE",
        help='JSON Lines of {"id": ..., "payload": {...}}: a path, s3://bucket/key, or - for stdin '
             "(or use --items-sql / --work-table).",
        details="One object a line. `id` is a non-empty string (an integer is turned into one; at most 512 "
                "characters, no control characters), `payload` an object (optional), nested at most 200 levels "
                "in all, every string valid Unicode (no lone surrogate `\\ud800`). Blank lines are skipped. "
                "See [input errors](#input-errors).")
    allow_empty: bool = option(
        kind=Flag(),
        help="Accept an input without items (an empty file, or blank lines only) as done; without it, exit 2.",
        details="A database source may always be empty (nothing pending).")
    skip_invalid: bool = option(
        kind=Flag(), help="Record invalid input lines as failed items and run the rest.",
        details="See [input errors](#input-errors).")
    max_item_bytes: int = option(
        kind=Int(min=64), default=MAX_LINE_BYTES, metavar="BYTES", help="Longest accepted input line.")
    handler: str = option(
        required=True, metavar="MODULE:FUNCTION",
        help="Code run for each item: handle(item, ctx) -> dict | None; or sql:PATH for a steps file.",
        details="The module is imported from the current directory or the Python path, as `python -m` would: "
                "see [writing a handler](../README.md#writing-a-handler) and [the SQL steps handler]"
                "(databases.md#the-sql-steps-handler---handler-sqlpath).")

    # Where progress is kept
    manifest: str = option(
        default=DEFAULT_MANIFEST, metavar="URL",
        help="Where progress is kept: s3://bucket/prefix or a local directory.",
        details="See [the manifest](design.md#the-manifest-and-resuming).")
    run_id: str | None = option(
        metavar="ID", help="Run id; the same id and manifest resume a run.", default_text="a new id, logged at start")
    retry_failed: bool = option(
        kind=Flag(), help="On a resumed run, try permanently failed items again (the start says how many).")
    manifest_repair: bool = option(
        kind=Flag(), help="Before running, rebuild a damaged manifest from every record that can still be read.")
    dry_run: bool = option(
        kind=Flag(),
        help="Validate the options, the handler and the input, and print what would run; touch nothing.",
        details='The summary then says what would run (with `"dry_run": true`). Nothing is written: no manifest, '
                "no database; a work table's rows are counted by state, none claimed.")
    xcom_path: str | None = option(
        kind=File(), metavar="PATH", help="Also write the summary here.",
        default_text=f"{AIRFLOW_XCOM_PATH} when its directory exists")
    s3_endpoint_url: str | None = option(
        metavar="URL", also_env=("AWS_ENDPOINT_URL",), help="S3-compatible endpoint (MinIO, Ceph, a test server).")

    # Shards
    shard_index: int | None = option(
        kind=Int(min=0), metavar="I", also_env=("JOB_COMPLETION_INDEX",),
        default_text="$JOB_COMPLETION_INDEX, else 0",
        help="This process's shard: it runs only the items whose id hashes to it. Not with --work-table, where "
             "$JOB_COMPLETION_INDEX only labels the logs.",
        details="See [sharding](#sharding).")
    shard_count: int = option(
        kind=Int(min=1, max=99999), default=DEFAULT_SHARD_COUNT, metavar="N",
        help="How many shards the items are split into (one process each); the same for the whole run. Not "
             "with --work-table: start more runners instead.")

    # Workers
    workers: int | None = option(
        kind=Int(min=1, max=1024), metavar="N", help="Worker processes.",
        default_text="the cgroup CPU limit rounded up, else the usable CPUs", details="See [workers](#workers).")
    prefetch: int = option(
        kind=Int(min=0, max=256), default=DEFAULT_PREFETCH, metavar="N",
        help="Tasks a worker may hold, the running one included (0: adapt to the items' duration, 2 to 64, so "
             "that about 20 ms of work waits at each worker).")
    item_timeout: float | None = option(
        kind=Float(min=0, min_open=True), metavar="SECONDS",
        help="Seconds one attempt may run before its worker is killed (a retryable timeout).")
    worker_memory_limit: int | None = option(
        kind=Size(), metavar="SIZE",
        help="Address-space limit of each worker (RLIMIT_AS), e.g. 1G: a worker that exceeds it is replaced and "
             "its item retried.",
        details="It is virtual memory: leave room for the interpreter's own mappings. A worker that exceeds it "
                "gets `MemoryError` and reports the attempt as `crashed` (retryable).")
    max_items_per_worker: int | None = option(
        kind=Int(min=1), metavar="N", help="Replace a worker after this many items (bounds slow leaks in handlers).")

    # Retries and failures
    max_attempts: int = option(
        kind=Int(min=1, max=100), default=DEFAULT_MAX_ATTEMPTS, metavar="N",
        help="Attempts per item, the first included, counted across restarts (outages and configuration "
             "errors are not counted).")
    backoff: float = option(
        kind=Float(min=0), default=DEFAULT_BACKOFF, metavar="SECONDS",
        help="Base of the exponential backoff between attempts, seconds (equal jitter).",
        details="The wait after attempt *n* is between half and all of min(`--max-backoff`, base·2ⁿ⁻¹); with the "
                "defaults the five waits add up to at least 31 s, so an item that meets a lock held for 30 s "
                "still ends done.")
    max_backoff: float = option(
        kind=Float(min=0), default=DEFAULT_MAX_BACKOFF, metavar="SECONDS",
        help="Longest wait between two attempts of an item, seconds.")
    retry_on: tuple[str, ...] = option(
        multiple=True, metavar="NAME|CODE",
        help="Exception class name (a base class counts) or error-code prefix to treat as retryable "
             "(repeatable).",
        details="For example `--retry-on ORA-01555`. See [how failures are classified]"
                "(databases.md#how-failures-are-classified).")
    outage_on: tuple[str, ...] = option(
        multiple=True, metavar="NAME|CODE",
        help="Exception class name (a base class counts) or error-code prefix meaning the environment is "
             "unavailable: the run pauses and the item keeps its attempts (repeatable).")
    outage_timeout: float = option(
        kind=Float(min=0), default=DEFAULT_OUTAGE_TIMEOUT, metavar="SECONDS",
        help="How long an outage may last before the run stops with exit 5, progress saved.")
    max_failures: int = option(
        kind=Int(min=0), default=DEFAULT_MAX_FAILURES, metavar="N",
        help="Permanently failed items tolerated before the exit code says failure.")

    # Timing
    checkpoint_interval: float = option(
        kind=Float(min=0.05), default=DEFAULT_CHECKPOINT_INTERVAL, metavar="SECONDS",
        help="Seconds between manifest writes (with --work-table: between writes of the rows' states); also "
             "written at the end and on shutdown.")
    drain_timeout: float = option(
        kind=Float(min=0), default=DEFAULT_DRAIN_TIMEOUT, metavar="SECONDS",
        help="Seconds running items may finish after SIGTERM/SIGINT.")
    progress_interval: float = option(
        kind=Float(min=0), default=DEFAULT_PROGRESS_INTERVAL, metavar="SECONDS",
        help="Seconds between progress lines when stderr is not a terminal (0: none).")
    lease_ttl: float = option(
        kind=Float(min=1), default=DEFAULT_TTL, metavar="SECONDS",
        help="Seconds the shard's lease (with --work-table: each claim) lasts unless renewed: how long a restart "
             "after a hard crash waits.",
        details="See [the guarantees](design.md#guarantees).")
    lease_wait: float | None = option(
        kind=Float(min=0), metavar="SECONDS",
        help="How long a run waits for a shard whose lease another runner holds, before it exits 4.",
        default_text="the lease's TTL plus what a takeover needs: 50 s for a 30 s TTL")

    # The database
    db: str | None = option(
        metavar="URL",
        help="Database for ctx.db and sql: handlers: oracle://user@host:port/service, postgresql://user@host:port/db "
             "or sqlite:///path. Password: $BULKJOB_DB_PASSWORD or --db-password-file, never in the URL.",
        details=_DATABASES)
    db_password_file: str | None = option(
        kind=File(), metavar="PATH", help="File holding the database password (a mounted Kubernetes Secret).",
        details=_DATABASES)
    session_sql: tuple[str, ...] = option(
        kind=Sql(), multiple=True, metavar="SQL",
        help="Statement run on every new database connection (repeatable; in the environment variable, one a "
             "line).",
        details=_DATABASES)
    statement_timeout: float | None = option(
        kind=Float(min=0, min_open=True), metavar="SECONDS",
        help="Longest one database call may take (Oracle call_timeout, PostgreSQL statement_timeout, SQLite busy "
             "timeout).",
        details=_DATABASES)
    connect_timeout: float = option(
        kind=Float(min=0, min_open=True), default=DEFAULT_CONNECT_TIMEOUT, metavar="SECONDS",
        help="Longest a database connect (and login) may take.", details=_DATABASES)
    commit: str = option(
        kind=Choice((COMMIT_ITEM, COMMIT_STEP)), default=COMMIT_ITEM,
        help="sql: handlers: one transaction per item (savepoint per step), or a commit after each step.",
        details="See [commit modes](databases.md#commit-modes).")
    items_sql: str | None = option(
        metavar="QUERY", help="Items from the database: a query returning (id, payload as JSON text or NULL).",
        details="See [items from the database](databases.md#items-from-the-database).")
    work_table: str | None = option(
        metavar="TABLE",
        help="Claim rows of a work table (work_id, state, payload, updated_at, claimed_by, claim_expires, "
             "attempts) in batches, with any number of runners; their states are written back.",
        details="See [a work table](databases.md#a-work-table---work-table-table).")

    # Metrics, logs, secrets
    metrics_port: int = option(
        kind=Int(min=0, max=65535), default=DEFAULT_METRICS_PORT, metavar="PORT",
        help="Port for Prometheus /metrics (0: off), served from the moment the first item goes out.",
        details="See [metrics](operations.md#metrics).")
    metrics_host: str = option(
        default=DEFAULT_METRICS_HOST, metavar="ADDRESS",
        help="Address /metrics listens on: all interfaces, as a pod needs; 127.0.0.1 keeps it on this machine.")
    pushgateway: str | None = option(
        metavar="URL", help="Push the final metrics here when the run ends (grouped by job, run_id and shard).",
        details="See [Pushgateway](operations.md#pushgateway).")
    log_format: str = option(
        kind=Choice(LOG_FORMATS), default=DEFAULT_LOG_FORMAT,
        help="Logs on stderr: text, one line a record; or JSON, one object a line.",
        details="See [logs](operations.md#logs).")
    log_level: str = option(
        kind=Choice(LOG_LEVELS, case_sensitive=False), default=DEFAULT_LOG_LEVEL,
        help="Least important records logged (DEBUG adds every retry).")
    log_file: str | None = option(kind=File(), metavar="PATH", help="Also write a rotating log file here.",
                                  details=_OBSERVABILITY)
    log_file_max_bytes: int = option(
        kind=Int(min=4096), default=LOG_FILE_MAX_BYTES, metavar="BYTES",
        help="Size at which --log-file is rotated (the old file is gzipped).")
    log_file_backups: int = option(
        kind=Int(min=0), default=LOG_FILE_BACKUPS, metavar="N", help="Rotated --log-file files kept.")
    redact: tuple[str, ...] = option(
        multiple=True, metavar="FIELD",
        help="Payload field whose values must never appear in logs, results, errors or metrics (repeatable).",
        details="See [secrets](operations.md#secrets).")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadOptions:
    """What `bulkjob status` and `bulkjob report` read: a run's manifest, or a work table."""

    manifest: str = option(
        default=DEFAULT_MANIFEST, metavar="URL",
        help="Where the run's progress is kept: s3://bucket/prefix or a local directory.")
    run_id: str | None = option(metavar="ID", help="The run to read.")
    s3_endpoint_url: str | None = option(
        metavar="URL", also_env=("AWS_ENDPOINT_URL",), help="S3-compatible endpoint (MinIO, Ceph, a test server).")
    work_table: str | None = option(metavar="TABLE", help="A work table to read instead of a manifest (with --db).")
    db: str | None = option(
        metavar="URL", help="The work table's database (password: $BULKJOB_DB_PASSWORD or --db-password-file).")
    db_password_file: str | None = option(kind=File(), metavar="PATH", help="File holding the password.")


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusOptions(ReadOptions):
    """The options of `bulkjob status`."""

    json: bool = option(
        kind=Flag(),
        help="One JSON object: total, done, failed, invalid, pending, attempts, times (ISO 8601), shards; for a "
             "work table: rows by state, expired claims, and the runners holding claims.")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportOptions(ReadOptions):
    """The options of `bulkjob report`."""

    format: str = option(
        kind=Choice(REPORT_FORMATS), default=DEFAULT_REPORT_FORMAT,
        help="JSON Lines (with each failure's traceback) or CSV (for a spreadsheet, without).")
