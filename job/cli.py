"""The command line: `bulkjob run`, `status` and `report` read their options (defined once, in
job.options) into frozen settings (job.config) and hand them down.

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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from .config import (
    AIRFLOW_XCOM_PATH,
    DEFAULT_MANIFEST,
    cgroup_cpu_limit,
    default_workers,
    parse_size,
    run_config,
    visible_cpus,
)
from .errors import EXIT_USAGE, BulkjobError, UsageError
from .options import (
    Choice,
    File,
    Flag,
    Float,
    Int,
    Kind,
    Option,
    ReadOptions,
    ReportOptions,
    RunOptions,
    Size,
    Sql,
    StatusOptions,
    Text,
    option_of,
    options_of,
)

if TYPE_CHECKING:
    from .db import DbSettings
    from .store import Store
    from .summary import Ending

log = logging.getLogger("bulkjob")

#: What `status` or `report` reads: a status, or rows.
T = TypeVar("T")


class _Statement(click.ParamType):
    """One SQL statement; from an environment variable, one statement a line (the default
    would split the variable at every space)."""

    name = "sql"
    envvar_list_splitter = "\n"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value.strip() if isinstance(value, str) else value


class _Size(click.ParamType):
    """Bytes as 512M, 2Gi or 1048576."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _click_type(kind: Kind) -> click.ParamType | None:
    """The click type of an option's kind (None for a flag, which takes no value)."""
    match kind:
        case Text():
            return click.STRING
        case Int(min=low, max=high):
            return click.IntRange(min=low, max=high)
        case Float(min=low, max=high, min_open=min_open):
            return click.FloatRange(min=low, max=high, min_open=min_open)
        case Choice(choices=choices, case_sensitive=case_sensitive):
            return click.Choice(choices, case_sensitive=case_sensitive)
        case File():
            return click.Path(dir_okay=False)
        case Size():
            return _Size()
        case Sql():
            return _Statement()
        case Flag():
            return None
    raise TypeError(f"no click type for {kind!r}")


def _click_option(opt: Option) -> click.Option:
    """The click option of one of ours: its flag, help, type and environment variables."""
    attrs: dict[str, Any] = {}
    if isinstance(opt.kind, Flag):
        attrs["is_flag"] = True
    else:
        attrs["type"] = _click_type(opt.kind)
        # Only a real default is handed to click: without one, click gives None (a repeatable
        # option an empty tuple, a flag False), as the options class expects.
        if opt.default is not None and not opt.multiple:
            attrs["default"] = opt.default
    show_default: bool | str = opt.default_text or "default" in attrs
    return click.Option([opt.flag, opt.name], help=opt.help, metavar=opt.metavar, required=opt.required,
                        multiple=opt.multiple, envvar=list(opt.envvars), show_envvar=True,
                        show_default=show_default, **attrs)


def _params(cls: type[Any]) -> list[click.Parameter]:
    """The click options of an options class, in the order of its fields."""
    return [_click_option(opt) for opt in options_of(cls)]


def new_run_id() -> str:
    """A fresh run id: UTC time to the second plus 6 random hex digits (sortable, unique)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def _fail(error: BulkjobError, code: int) -> NoReturn:
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

            if _given(raw, "log_format") == "json":
                setup_logging("json")  # the last line is then a JSON record, like every other
            end = Ending(keep_stdout())
            end.run_id = _given(raw, "run_id")
            shard = _given(raw, "shard_index")
            end.shard = int(shard) if shard and shard.isdigit() else None
            xcom = _given(raw, "xcom_path")
            end.xcom_path = Path(xcom) if xcom else AIRFLOW_XCOM_PATH if AIRFLOW_XCOM_PATH.parent.is_dir() else None
            message = f"{e.format_message()} (bulkjob run --help lists the options)"
            summary = {"run_id": end.run_id, "shard": end.shard, "status": "error", "exit_code": EXIT_USAGE,
                       "error": message.splitlines()[0]}
            end.finish(summary, EXIT_USAGE)


def _given(args: list[str], name: str) -> str | None:
    """The raw value of the run's option `name` in `args` (or its environment variables), for a
    summary written before the options could be read."""
    opt = option_of(RunOptions, name)
    for n, arg in enumerate(args):
        if arg == opt.flag and n + 1 < len(args):
            return args[n + 1]
        if arg.startswith(opt.flag + "="):
            return arg.split("=", 1)[1]
    return next((os.environ[v] for v in opt.envvars if os.environ.get(v)), None)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="bulkjob")
def main() -> None:
    """Run thousands of work items in one process tree: a worker pool, retries, and a resumable
    progress manifest (local directory or S3)."""


@main.command(cls=_RunCommand, params=_params(RunOptions))
def run(**values: Any) -> None:
    """Run the items of one shard to completion; resumable with the same --run-id."""
    from .summary import Ending, keep_stdout

    end = Ending(keep_stdout())
    end.interrupt_start()
    try:
        summary, code = _run(RunOptions(**values), end)
    except BaseException as e:  # every ending goes through Ending.finish, with a code from job.exits
        summary, code = end.of_exception(e)
    end.finish(summary, code)


def _run(o: RunOptions, end: Ending) -> tuple[dict[str, Any], int]:
    """The run behind `bulkjob run`: its summary and exit code. Raises what ends it early."""
    from .logs import setup_logging
    from .observe import NullObserver, OnStart

    # A handler module in the current directory imports as it does with `python -m job` (the
    # console script's own directory is first on the path instead). Set before the workers'
    # forkserver starts, which takes this path with it.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    run_id = o.run_id or new_run_id()
    shard_index = o.shard_index if o.shard_index is not None else 0
    xcom_path = Path(o.xcom_path) if o.xcom_path is not None else None
    if xcom_path is None and AIRFLOW_XCOM_PATH.parent.is_dir():
        xcom_path = AIRFLOW_XCOM_PATH
    end.run_id, end.shard, end.xcom_path, end.dry_run = run_id, shard_index, xcom_path, o.dry_run
    end.manifest = o.manifest if o.manifest != DEFAULT_MANIFEST else None
    end.max_failures = o.max_failures
    setup_logging(o.log_format, o.log_level, o.log_file, run_id=run_id, shard=shard_index,
                  log_file_max_bytes=o.log_file_max_bytes, log_file_backups=o.log_file_backups)
    workers = o.workers or default_workers(cgroup_cpu_limit(), visible_cpus())
    from .db import db_settings
    from .db.query import db_items

    db = db_settings(o.db, password_file=o.db_password_file, session_sql=o.session_sql,
                     statement_timeout=o.statement_timeout, connect_timeout=o.connect_timeout, commit=o.commit)
    if db is not None and db.password_file:
        from .db import read_password
        from .logs import add_secrets

        # The environment's password is redacted already; one from a file must be too.
        add_secrets([read_password(db) or ""])
    items_from_db = db_items(items=o.items, items_sql=o.items_sql, work_table=o.work_table, db=db)
    if o.work_table:
        _refuse_with_work_table(o)
        end.manifest = None
    elif shard_index >= o.shard_count:
        raise UsageError(f"--shard-index {shard_index} is not below --shard-count {o.shard_count}")
    prometheus = None
    if not o.dry_run and (o.metrics_port or o.pushgateway):
        # Before the workers start: it sets up the metrics directory that they inherit. It
        # serves /metrics only once the run starts.
        from .metrics import PrometheusObserver

        prometheus = PrometheusObserver(run_id=run_id, shard=shard_index, shard_count=o.shard_count,
                                        pushgateway=o.pushgateway)
        end.observer = prometheus

    def started() -> None:
        if not o.run_id and not o.work_table:
            log.info("a new run: pass --run-id %s to resume it", run_id)
        if prometheus is not None and o.metrics_port:
            prometheus.serve(o.metrics_host, o.metrics_port)

    config = run_config(o, run_id=run_id, shard_index=shard_index, workers=workers, xcom_path=xcom_path, db=db,
                        db_items=items_from_db, metrics_dir=prometheus.directory if prometheus is not None else None)
    from .run import Run

    run = end.run = Run(config, observer=OnStart(prometheus or NullObserver(), started))
    return run.execute()


def _refuse_with_work_table(o: RunOptions) -> None:
    """Options that have no meaning with a work table: a UsageError saying what to do instead.
    An Indexed Job's JOB_COMPLETION_INDEX is no --shard-index: it only labels the logs."""
    from click.core import ParameterSource

    ctx = click.get_current_context()

    def given(name: str) -> bool:
        source = ctx.get_parameter_source(name)
        own = option_of(RunOptions, name).envvars[0]
        return source == ParameterSource.COMMANDLINE or (source == ParameterSource.ENVIRONMENT
                                                         and bool(os.environ.get(own)))

    if given("shard_count") or given("shard_index"):
        raise UsageError("--work-table takes no --shard-count or --shard-index: every runner claims rows from the "
                         "whole table; to go faster, start more runners")
    if o.retry_failed:
        raise UsageError(f"--retry-failed has no use with --work-table: set the ERR rows back to run them again "
                         f"(UPDATE {o.work_table} SET state = 'PENDING', attempts = 0 WHERE state = 'ERR')")
    if o.manifest_repair or given("manifest"):
        raise UsageError("--manifest and --manifest-repair have no use with --work-table: the table is the run's "
                         "record (bulkjob status --work-table counts its rows)")


def _read(o: ReadOptions, table: Callable[[DbSettings, str], T], manifest: Callable[[Store, str, str], T]) -> T:
    """What `status` or `report` reads: `table(settings, name)` with --work-table, else
    `manifest(store, prefix, run_id)`; a BulkjobError ends the command with its code."""
    try:
        if o.work_table is None:
            if not o.run_id:
                raise UsageError("give --run-id (or --work-table with --db)")
            from .store import open_store

            store, prefix = open_store(o.manifest, endpoint_url=o.s3_endpoint_url)
            return manifest(store, prefix, o.run_id)
        from .db import db_settings
        from .db.query import db_items

        settings = db_settings(o.db, password_file=o.db_password_file)
        db_items(items=None, items_sql=None, work_table=o.work_table, db=settings)
        assert settings is not None  # db_items refuses a work table without --db
        return table(settings, o.work_table)
    except BulkjobError as e:
        _fail(e, e.exit_code)


@main.command(params=_params(StatusOptions))
def status(**values: Any) -> None:
    """Progress of a run, per shard and in total; or a work table's rows by state."""
    from .db.worktable import table_status
    from .report import render_status, render_table_status, run_status

    o = StatusOptions(**values)
    result = _read(o, table_status, run_status)
    if o.json:
        click.echo(json.dumps(result, indent=1))
    else:
        click.echo(render_table_status(result) if o.work_table else render_status(result))


@main.command(params=_params(ReportOptions))
def report(**values: Any) -> None:
    """One row per failed item: id, input line, attempts, error kind, class, code and message, last
    attempt time; in JSON Lines also the traceback of the last attempt. For a work table, one
    row per ERR row: id, attempts, error, when and by which runner it was written."""
    from .db.worktable import failed_table_rows
    from .report import TABLE_CSV_FIELDS, failed_rows, render_report

    o = ReportOptions(**values)
    rows = _read(o, failed_table_rows, failed_rows)
    text = render_report(rows, o.format, TABLE_CSV_FIELDS) if o.work_table else render_report(rows, o.format)
    click.echo(text, nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
