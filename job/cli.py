"""The command line: reads options once into frozen config and hands them down.

Every option also reads an environment variable `BULKJOB_<OPTION>` (for example
`BULKJOB_WORKERS`), which suits Kubernetes manifests and Airflow's env_vars.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path

import click

from .config import (
    AIRFLOW_XCOM_PATH,
    DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_MANIFEST,
    DEFAULT_METRICS_HOST,
    DEFAULT_METRICS_PORT,
    DEFAULT_OUTAGE_TIMEOUT,
    DEFAULT_PREFETCH,
    DEFAULT_PROGRESS_INTERVAL,
    RunConfig,
    WorkerSettings,
    cgroup_cpu_limit,
    default_workers,
    parse_size,
    visible_cpus,
)
from .errors import EXIT_USAGE, BulkjobError, UsageError
from .items import MAX_LINE_BYTES
from .logs import LOG_FILE_BACKUPS, LOG_FILE_MAX_BYTES
from .retry import DEFAULT_BACKOFF, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_BACKOFF, RetryPolicy

log = logging.getLogger("bulkjob")


def option(*decls: str, **kwargs):
    """A click option that also reads BULKJOB_<NAME> (plus any extra env vars given)."""
    name = max((d for d in decls if d.startswith("--")), key=len)[2:].replace("-", "_").upper()
    extra = kwargs.pop("extra_envvars", [])
    kwargs.setdefault("show_envvar", True)
    return click.option(*decls, envvar=[f"BULKJOB_{name}", *extra], **kwargs)


def _size(value: str | None, param) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param=param) from None


class _Statement(click.ParamType):
    """One SQL statement; from an environment variable, one statement a line (the default
    would split the variable at every space)."""

    name = "sql"
    envvar_list_splitter = "\n"

    def convert(self, value, param, ctx):
        return value.strip() if isinstance(value, str) else value


def new_run_id() -> str:
    """A fresh run id: UTC time to the second plus 6 random hex digits (sortable, unique)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def _fail(error: BulkjobError, code: int) -> None:
    """End `status` or `report` with one line on stderr and `code`."""
    from .redact import env_secrets, scrub_text

    # An error from a database driver or an S3 client may quote its connection settings.
    click.echo(f"bulkjob: error: {scrub_text(str(error), env_secrets())}", err=True)
    sys.exit(code)


class _RunCommand(click.Command):
    """`bulkjob run`: an option the command line refuses ends like any other usage error, with
    the summary on stdout and at the XCom path."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        raw = list(args)
        try:
            return super().parse_args(ctx, args)
        except click.ClickException as e:
            from .logs import setup_logging
            from .summary import Ending, keep_stdout

            if _given(raw, "--log-format") == "json":
                setup_logging("json")  # the last line is then a JSON record, like every other
            end = Ending(keep_stdout())
            end.run_id = _given(raw, "--run-id")
            shard = _given(raw, "--shard-index", "JOB_COMPLETION_INDEX")
            end.shard = int(shard) if shard and shard.isdigit() else None
            xcom = _given(raw, "--xcom-path")
            end.xcom_path = Path(xcom) if xcom else AIRFLOW_XCOM_PATH if AIRFLOW_XCOM_PATH.parent.is_dir() else None
            message = f"{e.format_message()} (bulkjob run --help lists the options)"
            summary = {"run_id": end.run_id, "shard": end.shard, "status": "error", "exit_code": EXIT_USAGE,
                       "error": message.splitlines()[0]}
            end.finish(summary, EXIT_USAGE)


def _given(args: list[str], flag: str, *envvars: str) -> str | None:
    """The raw value of `flag` in `args` (or its environment variables), for a summary written
    before the options could be read."""
    for n, arg in enumerate(args):
        if arg == flag and n + 1 < len(args):
            return args[n + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    name = "BULKJOB_" + flag.lstrip("-").replace("-", "_").upper()
    return next((os.environ[v] for v in (name, *envvars) if os.environ.get(v)), None)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="bulkjob")
def main() -> None:
    """Run thousands of work items in one process tree: a worker pool, retries, and a resumable
    progress manifest (local directory or S3)."""


@main.command(cls=_RunCommand)
@option("--items", metavar="SOURCE",
        help="JSON Lines of {\"id\": ..., \"payload\": {...}}: a path, s3://bucket/key, or - for stdin "
             "(or use --items-sql / --work-table).")
@option("--handler", required=True, metavar="MODULE:FUNCTION",
        help="Code run for each item: handle(item, ctx) -> dict | None; or sql:PATH for a steps file.")
@option("--db", metavar="URL",
        help="Database for ctx.db and sql: handlers: oracle://user@host:port/service, "
             "postgresql://user@host:port/db or sqlite:///path. Password: $BULKJOB_DB_PASSWORD or "
             "--db-password-file, never in the URL.")
@option("--db-password-file", type=click.Path(dir_okay=False), metavar="PATH",
        help="File holding the database password (a mounted Kubernetes Secret).")
@option("--session-sql", multiple=True, metavar="SQL", type=_Statement(),
        help="Statement run on every new database connection (repeatable; in the environment "
             "variable, one a line).")
@option("--statement-timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
        help="Longest one database call may take (Oracle call_timeout, PostgreSQL statement_timeout, "
             "SQLite busy timeout).")
@option("--connect-timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
        help="Longest a database connect (and login) may take [default: 10].")
@option("--commit", type=click.Choice(["item", "step"]), default="item", show_default=True,
        help="sql: handlers: one transaction per item (savepoint per step), or a commit after each step.")
@option("--items-sql", metavar="QUERY",
        help="Items from the database: a query returning (id, payload as JSON text or NULL).")
@option("--work-table", metavar="TABLE",
        help="Claim rows of a work table (work_id, state, payload, updated_at, claimed_by, claim_expires, "
             "attempts) in batches, with any number of runners; their states are written back.")
@option("--manifest", default=DEFAULT_MANIFEST, show_default=True, metavar="URL",
        help="Where progress is kept: s3://bucket/prefix or a local directory.")
@option("--run-id", metavar="ID", help="Run id; the same id and manifest resume a run. Default: a new id.")
@option("--shard-index", type=click.IntRange(min=0), extra_envvars=["JOB_COMPLETION_INDEX"],
        help="This process's shard (default: $JOB_COMPLETION_INDEX, else 0).")
@option("--shard-count", type=click.IntRange(min=1, max=99999), default=1, show_default=True,
        help="How many shards the items are split into (one process each); the same for the whole run.")
@option("--workers", type=click.IntRange(min=1, max=1024),
        help="Worker processes (default: the cgroup CPU limit rounded up, else the usable CPUs).")
@option("--max-attempts", type=click.IntRange(min=1, max=100), default=DEFAULT_MAX_ATTEMPTS, show_default=True,
        help="Attempts per item, the first included, counted across restarts (outages are not counted).")
@option("--backoff", type=click.FloatRange(min=0), default=DEFAULT_BACKOFF, show_default=True,
        help="Base of the exponential backoff between attempts, seconds (equal jitter).")
@option("--max-backoff", type=click.FloatRange(min=0), default=DEFAULT_MAX_BACKOFF, show_default=True,
        help="Longest wait between two attempts of an item, seconds.")
@option("--item-timeout", type=click.FloatRange(min=0, min_open=True),
        help="Seconds one attempt may run before its worker is killed (a retryable timeout).")
@option("--max-failures", type=click.IntRange(min=0), default=0, show_default=True,
        help="Permanently failed items tolerated before the exit code says failure.")
@option("--checkpoint-interval", type=click.FloatRange(min=0.05), default=DEFAULT_CHECKPOINT_INTERVAL,
        show_default=True, help="Seconds between manifest writes.")
@option("--drain-timeout", type=click.FloatRange(min=0), default=DEFAULT_DRAIN_TIMEOUT, show_default=True,
        help="Seconds running items may finish after SIGTERM/SIGINT.")
@option("--retry-failed", is_flag=True, help="On a resumed run, try permanently failed items again.")
@option("--retry-on", multiple=True, metavar="NAME|CODE",
        help="Exception class name or error-code prefix to treat as retryable (repeatable).")
@option("--outage-on", multiple=True, metavar="NAME|CODE",
        help="Exception class name or error-code prefix meaning the environment is unavailable: the run "
             "pauses and the item keeps its attempts (repeatable).")
@option("--outage-timeout", type=click.FloatRange(min=0), default=DEFAULT_OUTAGE_TIMEOUT, show_default=True,
        metavar="SECONDS", help="How long an outage may last before the run stops with exit 5, progress saved.")
@option("--skip-invalid", is_flag=True, help="Record invalid input lines as failed items and run the rest.")
@option("--allow-empty", is_flag=True,
        help="Accept an input without items (an empty file, or blank lines only) as done; without it, exit 2.")
@option("--manifest-repair", is_flag=True,
        help="Before running, rebuild a damaged manifest from every record that can still be read.")
@option("--dry-run", is_flag=True,
        help="Validate the options, the handler and the input, and print what would run; touch nothing.")
@option("--xcom-path", type=click.Path(dir_okay=False, path_type=Path),
        help=f"Also write the summary here (default: {AIRFLOW_XCOM_PATH} when its directory exists).")
@option("--s3-endpoint-url", metavar="URL", extra_envvars=["AWS_ENDPOINT_URL"],
        help="S3-compatible endpoint (MinIO, a test server).")
@option("--progress-interval", type=click.FloatRange(min=0), default=DEFAULT_PROGRESS_INTERVAL,
        show_default=True, help="Seconds between progress lines when stderr is not a terminal (0: none).")
@option("--prefetch", type=click.IntRange(min=0, max=256), default=DEFAULT_PREFETCH,
        help="Tasks a worker may hold, the running one included (default 0: adapt to the items' "
             "duration, 2 to 64, so that about 20 ms of work waits at each worker).")
@option("--worker-memory-limit", metavar="SIZE", callback=lambda ctx, param, value: _size(value, param),
        help="Address-space limit of each worker (RLIMIT_AS), e.g. 1G: a worker that exceeds it is "
             "replaced and its item retried.")
@option("--max-items-per-worker", type=click.IntRange(min=1),
        help="Replace a worker after this many items (bounds slow leaks in handlers).")
@option("--max-item-bytes", type=click.IntRange(min=64), default=MAX_LINE_BYTES, show_default=True,
        help="Longest accepted input line.")
@option("--lease-ttl", type=click.FloatRange(min=1), default=30.0, show_default=True,
        help="Seconds the shard's lease (with --work-table: each claim) lasts unless renewed: how long a "
             "restart after a hard crash waits.")
@option("--lease-wait", type=click.FloatRange(min=0), metavar="SECONDS",
        help="How long a run waits for a shard whose lease another runner holds, before it exits 4 "
             "[default: the lease's TTL plus what a takeover needs: 50 s for a 30 s TTL].")
@option("--metrics-port", type=click.IntRange(min=0, max=65535), default=DEFAULT_METRICS_PORT,
        show_default=True, help="Port for Prometheus /metrics (0: off), served once the run starts.")
@option("--metrics-host", default=DEFAULT_METRICS_HOST, show_default=True, metavar="ADDRESS",
        help="Address /metrics listens on: all interfaces, as a pod needs; 127.0.0.1 keeps it on this machine.")
@option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
        help="Logs on stderr: text, one line a record; or JSON, one object a line.")
@option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
        default="INFO", show_default=True, help="Least important records logged (DEBUG adds every retry).")
@option("--log-file", type=click.Path(dir_okay=False), help="Also write a rotating log file here.")
@option("--log-file-max-bytes", type=click.IntRange(min=4096), default=LOG_FILE_MAX_BYTES, show_default=True,
        help="Size at which --log-file is rotated (the old file is gzipped).")
@option("--log-file-backups", type=click.IntRange(min=0), default=LOG_FILE_BACKUPS, show_default=True,
        help="Rotated --log-file files kept.")
@option("--pushgateway", metavar="URL",
        help="Push the final metrics here when the run ends (grouped by job, run_id and shard).")
@option("--redact", multiple=True, metavar="FIELD",
        help="Payload field whose values must never appear in logs, results, errors or metrics (repeatable).")
def run(**opts) -> None:
    """Run the items of one shard to completion; resumable with the same --run-id."""
    from .summary import Ending, keep_stdout

    end = Ending(keep_stdout())
    end.interrupt_start()
    try:
        summary, code = _run(opts, end)
    except BaseException as e:  # every ending goes through Ending.finish, with a code from job.exits
        summary, code = end.of_exception(e)
    end.finish(summary, code)


def _run(opts: dict, end) -> tuple[dict, int]:
    """The run behind `bulkjob run`: its summary and exit code. Raises what ends it early."""
    from .logs import setup_logging
    from .observe import NullObserver, OnStart

    # A handler module in the current directory imports as it does with `python -m job` (the
    # console script's own directory is first on the path instead). Set before the workers'
    # forkserver starts, which takes this path with it.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    run_id = opts["run_id"] or new_run_id()
    shard_index = opts["shard_index"] if opts["shard_index"] is not None else 0
    xcom_path = opts["xcom_path"]
    if xcom_path is None and AIRFLOW_XCOM_PATH.parent.is_dir():
        xcom_path = AIRFLOW_XCOM_PATH
    end.run_id, end.shard, end.xcom_path, end.dry_run = run_id, shard_index, xcom_path, opts["dry_run"]
    end.manifest = opts["manifest"] if opts["manifest"] != DEFAULT_MANIFEST else None
    end.max_failures = opts["max_failures"]
    setup_logging(opts["log_format"], opts["log_level"], opts["log_file"], run_id=run_id, shard=shard_index,
                  log_file_max_bytes=opts["log_file_max_bytes"], log_file_backups=opts["log_file_backups"])
    workers = opts["workers"] or default_workers(cgroup_cpu_limit(), visible_cpus())
    from .db import db_settings
    from .db.query import db_items

    db = db_settings(opts["db"], password_file=opts["db_password_file"], session_sql=opts["session_sql"],
                     statement_timeout=opts["statement_timeout"], connect_timeout=opts["connect_timeout"],
                     commit=opts["commit"])
    if db is not None and db.password_file:
        from .db import read_password
        from .logs import add_secrets

        # The environment's password is redacted already; one from a file must be too.
        add_secrets([read_password(db) or ""])
    items_from_db = db_items(items=opts["items"], items_sql=opts["items_sql"], work_table=opts["work_table"], db=db)
    if opts["work_table"]:
        _refuse_with_work_table(opts)
        end.manifest = None
    elif shard_index >= opts["shard_count"]:
        raise UsageError(f"--shard-index {shard_index} is not below --shard-count {opts['shard_count']}")
    prometheus = None
    if not opts["dry_run"] and (opts["metrics_port"] or opts["pushgateway"]):
        # Before the workers start: it sets up the metrics directory that they inherit. It
        # serves /metrics only once the run starts.
        from .metrics import PrometheusObserver

        prometheus = PrometheusObserver(run_id=run_id, shard=shard_index, shard_count=opts["shard_count"],
                                        pushgateway=opts["pushgateway"])
        end.observer = prometheus

    def started() -> None:
        if not opts["run_id"] and not opts["work_table"]:
            log.info("a new run: pass --run-id %s to resume it", run_id)
        if prometheus is not None and opts["metrics_port"]:
            prometheus.serve(opts["metrics_host"], opts["metrics_port"])

    worker_settings = WorkerSettings(
        handler=opts["handler"], run_id=run_id, shard_index=shard_index, shard_count=opts["shard_count"],
        retry_on=tuple(opts["retry_on"]), outage_on=tuple(opts["outage_on"]), log_format=opts["log_format"],
        log_level=opts["log_level"].upper(),
        log_file=opts["log_file"], log_file_max_bytes=opts["log_file_max_bytes"],
        log_file_backups=opts["log_file_backups"], redact_fields=tuple(opts["redact"]),
        memory_limit=opts["worker_memory_limit"], max_items_per_worker=opts["max_items_per_worker"],
        metrics_dir=prometheus.directory if prometheus is not None else None, db=db)
    config = RunConfig(
        items=opts["items"], handler=opts["handler"], manifest=opts["manifest"], run_id=run_id,
        shard_index=shard_index, shard_count=opts["shard_count"], workers=workers,
        policy=RetryPolicy(opts["max_attempts"], opts["backoff"], max(opts["max_backoff"], opts["backoff"])),
        item_timeout=opts["item_timeout"], max_failures=opts["max_failures"],
        checkpoint_interval=opts["checkpoint_interval"], drain_timeout=opts["drain_timeout"],
        retry_failed=opts["retry_failed"], dry_run=opts["dry_run"], skip_invalid=opts["skip_invalid"],
        retry_on=tuple(opts["retry_on"]), xcom_path=xcom_path, s3_endpoint_url=opts["s3_endpoint_url"],
        progress_interval=opts["progress_interval"], prefetch=opts["prefetch"],
        max_item_bytes=opts["max_item_bytes"], lease_ttl=opts["lease_ttl"], lease_wait=opts["lease_wait"],
        manifest_repair=opts["manifest_repair"], outage_timeout=opts["outage_timeout"], db_items=items_from_db,
        allow_empty=opts["allow_empty"], worker=worker_settings)
    from .run import Run

    end.run = Run(config, observer=OnStart(prometheus or NullObserver(), started))
    return end.run.execute()


def _refuse_with_work_table(opts: dict) -> None:
    """Options that have no meaning with a work table: a UsageError saying what to do instead.
    An Indexed Job's JOB_COMPLETION_INDEX is no --shard-index: it only labels the logs."""
    from click.core import ParameterSource

    ctx = click.get_current_context()

    def given(name: str, envvar: str) -> bool:
        source = ctx.get_parameter_source(name)
        return source == ParameterSource.COMMANDLINE or (source == ParameterSource.ENVIRONMENT
                                                         and bool(os.environ.get(envvar)))

    if given("shard_count", "BULKJOB_SHARD_COUNT") or given("shard_index", "BULKJOB_SHARD_INDEX"):
        raise UsageError("--work-table takes no --shard-count or --shard-index: every runner claims rows from the "
                         "whole table; to go faster, start more runners")
    if opts["retry_failed"]:
        raise UsageError(f"--retry-failed has no use with --work-table: set the ERR rows back to run them again "
                         f"(UPDATE {opts['work_table']} SET state = 'PENDING', attempts = 0 WHERE state = 'ERR')")
    if opts["manifest_repair"] or given("manifest", "BULKJOB_MANIFEST"):
        raise UsageError("--manifest and --manifest-repair have no use with --work-table: the table is the run's "
                         "record (bulkjob status --work-table counts its rows)")


def _store_of(manifest: str, endpoint_url: str | None):
    from .store import open_store

    return open_store(manifest, endpoint_url=endpoint_url)


_MANIFEST_HELP = "Where the run's progress is kept: s3://bucket/prefix or a local directory."
_RUN_ID_HELP = "The run to read."
_ENDPOINT_HELP = "S3-compatible endpoint (MinIO, a test server)."


_TABLE_HELP = "A work table to read instead of a manifest (with --db)."
_DB_HELP = "The work table's database (password: $BULKJOB_DB_PASSWORD or --db-password-file)."


def _table_settings(work_table: str | None, run_id: str | None, db: str | None, password_file: str | None):
    """The database settings for --work-table (None without it); a UsageError for a missing
    --run-id or --db."""
    if work_table is None:
        if not run_id:
            raise UsageError("give --run-id (or --work-table with --db)")
        return None
    from .db import db_settings
    from .db.query import db_items

    settings = db_settings(db, password_file=password_file)
    db_items(items=None, items_sql=None, work_table=work_table, db=settings)
    return settings


@main.command()
@option("--manifest", default=DEFAULT_MANIFEST, show_default=True, metavar="URL", help=_MANIFEST_HELP)
@option("--run-id", metavar="ID", help=_RUN_ID_HELP)
@option("--s3-endpoint-url", metavar="URL", extra_envvars=["AWS_ENDPOINT_URL"], help=_ENDPOINT_HELP)
@option("--work-table", metavar="TABLE", help=_TABLE_HELP)
@option("--db", metavar="URL", help=_DB_HELP)
@option("--db-password-file", type=click.Path(dir_okay=False), metavar="PATH", help="File holding the password.")
@option("--json", "as_json", is_flag=True,
        help="One JSON object: total, done, failed, invalid, pending, attempts, times (ISO 8601), shards; for a "
             "work table: rows by state, expired claims, and the runners holding claims.")
def status(manifest: str, run_id: str | None, s3_endpoint_url: str | None, work_table: str | None, db: str | None,
           db_password_file: str | None, as_json: bool) -> None:
    """Progress of a run, per shard and in total; or a work table's rows by state."""
    from .report import render_status, render_table_status, run_status

    try:
        settings = _table_settings(work_table, run_id, db, db_password_file)
        if settings is not None:
            from .db.worktable import table_status

            result = table_status(settings, work_table)
            click.echo(json.dumps(result, indent=1) if as_json else render_table_status(result))
            return
        store, prefix = _store_of(manifest, s3_endpoint_url)
        result = run_status(store, prefix, run_id)
    except BulkjobError as e:
        _fail(e, e.exit_code)
    click.echo(json.dumps(result, indent=1) if as_json else render_status(result))


@main.command()
@option("--manifest", default=DEFAULT_MANIFEST, show_default=True, metavar="URL", help=_MANIFEST_HELP)
@option("--run-id", metavar="ID", help=_RUN_ID_HELP)
@option("--s3-endpoint-url", metavar="URL", extra_envvars=["AWS_ENDPOINT_URL"], help=_ENDPOINT_HELP)
@option("--work-table", metavar="TABLE", help=_TABLE_HELP)
@option("--db", metavar="URL", help=_DB_HELP)
@option("--db-password-file", type=click.Path(dir_okay=False), metavar="PATH", help="File holding the password.")
@option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
        help="JSON Lines (with each failure's traceback) or CSV (for a spreadsheet, without).")
def report(manifest: str, run_id: str | None, s3_endpoint_url: str | None, work_table: str | None, db: str | None,
           db_password_file: str | None, fmt: str) -> None:
    """One row per failed item: id, input line, attempts, error kind, class, code and message, last
    attempt time; in JSON Lines also the traceback of the last attempt. For a work table, one
    row per ERR row: id, attempts, error, when and by which runner it was written."""
    from .report import TABLE_CSV_FIELDS, failed_rows, render_report

    try:
        settings = _table_settings(work_table, run_id, db, db_password_file)
        if settings is not None:
            from .db.worktable import failed_table_rows

            click.echo(render_report(failed_table_rows(settings, work_table), fmt, TABLE_CSV_FIELDS), nl=False)
            return
        store, prefix = _store_of(manifest, s3_endpoint_url)
        rows = failed_rows(store, prefix, run_id)
    except BulkjobError as e:
        _fail(e, e.exit_code)
    click.echo(render_report(rows, fmt), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
