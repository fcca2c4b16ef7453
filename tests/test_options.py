"""The options, defined once in job/options.py: the flags and environment variables users set
stay what they are, click reads each option as its field declares it (default, kind, environment
variable), and RunConfig carries every option the run reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import pytest

from job.cli import main
from job.config import RunConfig, WorkerSettings, run_config
from job.options import (
    Choice,
    File,
    Flag,
    Float,
    Int,
    Option,
    ReportOptions,
    RunOptions,
    Size,
    Sql,
    StatusOptions,
    Text,
    options_of,
)

#: What Kubernetes manifests, Airflow DAGs and scripts set: flag -> its environment variables.
#: A change here breaks someone's deployment; it must be on purpose.
_READ = {
    "--manifest": ["BULKJOB_MANIFEST"], "--run-id": ["BULKJOB_RUN_ID"],
    "--s3-endpoint-url": ["BULKJOB_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"], "--work-table": ["BULKJOB_WORK_TABLE"],
    "--db": ["BULKJOB_DB"], "--db-password-file": ["BULKJOB_DB_PASSWORD_FILE"],
}
PUBLISHED = {
    "status": {**_READ, "--json": ["BULKJOB_JSON"]},
    "report": {**_READ, "--format": ["BULKJOB_FORMAT"]},
    "run": {
        "--shard-index": ["BULKJOB_SHARD_INDEX", "JOB_COMPLETION_INDEX"],
        "--s3-endpoint-url": ["BULKJOB_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"],
        **{f"--{name}": [f"BULKJOB_{name.upper().replace('-', '_')}"] for name in (
            "items", "handler", "db", "db-password-file", "session-sql", "statement-timeout", "connect-timeout",
            "commit", "items-sql", "work-table", "manifest", "run-id", "shard-count", "workers", "max-attempts",
            "backoff", "max-backoff", "item-timeout", "max-failures", "checkpoint-interval", "drain-timeout",
            "retry-failed", "retry-on", "outage-on", "outage-timeout", "skip-invalid", "allow-empty",
            "manifest-repair", "dry-run", "xcom-path", "progress-interval", "prefetch", "worker-memory-limit",
            "max-items-per-worker", "max-item-bytes", "lease-ttl", "lease-wait", "metrics-port", "metrics-host",
            "log-format", "log-level", "log-file", "log-file-max-bytes", "log-file-backups", "pushgateway",
            "redact")},
    },
}
COMMANDS = {"run": RunOptions, "status": StatusOptions, "report": ReportOptions}


@pytest.fixture
def clean_env(monkeypatch):
    """No option set by the environment this test runs in."""
    for cls in COMMANDS.values():
        for opt in options_of(cls):
            for name in opt.envvars:
                monkeypatch.delenv(name, raising=False)
    return monkeypatch


def read(command: str, args: list[str]) -> dict:
    """What click hands the command for `args`, without running it."""
    with main.commands[command].make_context(command, list(args)) as ctx:  # click consumes the list
        return dict(ctx.params)


@pytest.mark.parametrize("command", sorted(PUBLISHED))
def test_the_flags_and_environment_variables_are_the_published_ones(command):
    found = {p.opts[0]: list(p.envvar) for p in main.commands[command].params
             if isinstance(p, click.Option) and p.name != "help"}
    assert found == PUBLISHED[command]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_option_not_given_has_its_fields_default(clean_env, command):
    cls = COMMANDS[command]
    required = ["--handler", "x:y"] if command == "run" else []
    given = cls(**read(command, required))
    expected = cls(**({"handler": "x:y"} if command == "run" else {}))
    assert given == expected
    assert {f.name for f in dataclasses.fields(cls)} == set(read(command, required))


def _sample(opt: Option) -> tuple[str, object]:
    """A value for the option's environment variable, and what the command must receive."""
    match opt.kind:
        case Flag():
            return "1", True
        case Int(min=low):
            return str((low or 0) + 3), (low or 0) + 3
        case Float(min=low):
            return str((low or 0) + 2.5), (low or 0) + 2.5
        case Choice(choices=choices, case_sensitive=case_sensitive):
            pick = choices[-1]
            return (pick if case_sensitive else pick.lower()), pick
        case Size():
            return "2M", 2 * 1024**2
        case Sql():
            return "SELECT 1\nSELECT 'a b'", ("SELECT 1", "SELECT 'a b'")
        case File():
            return "some/file", "some/file"
        case Text() if opt.multiple:
            return "a b", ("a", "b")
        case Text():
            return "a b", "a b"
    raise AssertionError(opt.kind)


@pytest.mark.parametrize("command, opt", [(c, o) for c, cls in COMMANDS.items() for o in options_of(cls)],
                         ids=lambda x: x if isinstance(x, str) else x.flag)
def test_every_option_reads_each_of_its_environment_variables(clean_env, command, opt):
    text, expected = _sample(opt)
    required = ["--handler", "x:y"] if command == "run" and opt.name != "handler" else []
    for name in opt.envvars:
        clean_env.setenv(name, text)
        assert read(command, required)[opt.name] == expected, name
        clean_env.delenv(name)


@pytest.mark.parametrize("cls", COMMANDS.values(), ids=lambda c: c.__name__)
def test_every_option_says_what_it_takes(cls):
    for opt in options_of(cls):
        assert opt.help.strip().endswith((".", ")")), opt.flag
        takes_value = not isinstance(opt.kind, (Flag, Choice))
        assert (opt.metavar is not None) == takes_value, opt.flag
        assert opt.default_text is None or opt.default is None, f"{opt.flag}: a default and words for another"


def test_run_config_carries_every_option_the_run_reads(tmp_path):
    options = RunOptions(handler="x:y", items="in.jsonl", retry_on=("E",), outage_on=("O",), redact=("pw",),
                         log_level="debug", max_backoff=1.0, backoff=3.0, worker_memory_limit=1024)
    cfg = run_config(options, run_id="r", shard_index=1, workers=3, xcom_path=tmp_path / "x.json", db=None,
                     db_items=None, metrics_dir="m")
    # What the start resolves, or turns into something else of the same name, is checked below.
    resolved = {"run_id", "shard_index", "workers", "xcom_path", "db", "log_level"}
    values = dataclasses.asdict(options)
    for cls, settings in ((RunConfig, cfg), (WorkerSettings, cfg.worker)):
        for f in dataclasses.fields(cls):
            if f.name in values and f.name not in resolved:
                assert getattr(settings, f.name) == values[f.name], f.name
    assert (cfg.run_id, cfg.shard_index, cfg.workers, cfg.xcom_path) == ("r", 1, 3, Path(tmp_path / "x.json"))
    assert (cfg.worker.run_id, cfg.worker.shard_index, cfg.worker.metrics_dir) == ("r", 1, "m")
    assert (cfg.worker.log_level, cfg.worker.redact_fields, cfg.worker.memory_limit) == ("DEBUG", ("pw",), 1024)
    # A cap below the base is the base: the first wait is never cut short.
    assert (cfg.policy.max_attempts, cfg.policy.backoff, cfg.policy.max_backoff) == (6, 3.0, 3.0)


def test_the_command_line_wins_over_the_environment_and_ours_over_the_platforms(clean_env):
    clean_env.setenv("JOB_COMPLETION_INDEX", "4")
    assert read("run", ["--handler", "x:y"])["shard_index"] == 4
    clean_env.setenv("BULKJOB_SHARD_INDEX", "2")
    assert read("run", ["--handler", "x:y"])["shard_index"] == 2
    assert read("run", ["--handler", "x:y", "--shard-index", "1"])["shard_index"] == 1
