"""Bad input and bad options: a clear message, exit 2, nothing run, nothing recorded lost."""

import json
import os

import pytest
from conftest import run_bulkjob, status_of, summary_of, write_items


@pytest.fixture
def env(tmp_path):
    return {"LEDGER_DB": str(tmp_path / "ledger.db")}


def run(tmp_path, env, items_lines, *extra):
    path = write_items(tmp_path / "items.jsonl", items_lines)
    return run_bulkjob("run", "--items", str(path), "--handler", "ledger:handle", "--manifest",
                       str(tmp_path / "state"), "--run-id", "r1", "--metrics-port", "0", *extra, env=env)


@pytest.mark.parametrize("line, message", [
    ('{"id": "a"', "line 2: bad JSON"),
    ('{"payload": {}}', 'line 2: missing "id"'),
    ('{"id": ""}', 'line 2: "id" is empty'),
    ('{"id": "b", "payload": [1]}', 'line 2: "payload" must be an object'),
    (b'{"id": "\xff"}', "line 2: not UTF-8"),
    ('{"id": "ok"}', "line 2: duplicate id 'ok' (first on line 1)"),
    ('"just a string"', "line 2: expected a JSON object"),
])
def test_each_input_error_exits_2_naming_file_and_line(tmp_path, env, line, message):
    proc = run(tmp_path, env, ['{"id": "ok"}', line, '{"id": "z"}'])
    assert proc.returncode == 2, proc.stderr
    assert "items.jsonl" in proc.stderr and message in proc.stderr
    assert not os.path.exists(env["LEDGER_DB"])  # nothing ran


def test_many_problems_are_listed_with_a_count_of_the_rest(tmp_path, env):
    lines = [f'{{"id": "{i}"}}' if i % 3 else "{bad" for i in range(1, 100)]
    proc = run(tmp_path, env, lines)
    assert proc.returncode == 2
    assert proc.stderr.count("bad JSON") == 10
    assert "and 23 more" in proc.stderr
    assert "33 invalid line(s)" in proc.stderr


def test_skip_invalid_records_bad_lines_and_runs_the_rest(tmp_path, env):
    proc = run(tmp_path, env, ['{"id": "a"}', "{bad", '{"id": "b", "payload": 1}', '{"id": "a"}', '{"id": "c"}'],
               "--skip-invalid", "--max-failures", "3")
    assert proc.returncode == 0, proc.stderr
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"], summary["total"]) == (2, 3, 5)
    report = run_bulkjob("report", "--manifest", str(tmp_path / "state"), "--run-id", "r1")
    rows = {r["id"]: r for r in map(json.loads, report.stdout.splitlines())}
    assert set(rows) == {"#line-2", "b", "#line-4"}
    assert rows["b"]["error_kind"] == "invalid" and "payload" in rows["b"]["error_message"]
    assert "duplicate id 'a'" in rows["#line-4"]["error_message"]


@pytest.mark.parametrize("args, message", [
    (["--handler", "nosuchmodule:handle"], "cannot import 'nosuchmodule'"),
    (["--handler", "ledger:nosuchfunction"], "has no attribute 'nosuchfunction'"),
    (["--handler", "ledger"], "expected MODULE:FUNCTION"),
    (["--workers", "0"], "--workers"),
    (["--max-attempts", "0"], "--max-attempts"),
    (["--shard-index", "3", "--shard-count", "3"], "not below --shard-count"),
    (["--checkpoint-interval", "0"], "--checkpoint-interval"),
    (["--run-id", "../escape"], "run id '../escape'"),
    (["--items", "/no/such/file.jsonl"], "no such file"),
    (["--manifest", "ftp://x/y"], "only s3://bucket/prefix or a local directory"),
])
def test_bad_options_exit_2(tmp_path, env, args, message):
    path = write_items(tmp_path / "items.jsonl", ['{"id": 1}'])
    base = {"--items": str(path), "--handler": "ledger:handle", "--manifest": str(tmp_path / "state"),
            "--run-id": "r1"}
    for flag, value in zip(args[::2], args[1::2], strict=False):
        base[flag] = value
    argv = [x for pair in base.items() for x in pair] + [a for a in args if a.startswith("--") and a not in base]
    proc = run_bulkjob("run", *argv, "--metrics-port", "0", env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr
    assert not os.path.exists(env["LEDGER_DB"])


def test_options_read_environment_variables(tmp_path, env):
    path = write_items(tmp_path / "items.jsonl", [{"id": i} for i in range(5)])
    proc = run_bulkjob("run", env={**env, "BULKJOB_ITEMS": str(path), "BULKJOB_HANDLER": "ledger:handle",
                                   "BULKJOB_MANIFEST": str(tmp_path / "st"), "BULKJOB_RUN_ID": "envrun",
                                   "BULKJOB_WORKERS": "1", "BULKJOB_METRICS_PORT": "0",
                                   "JOB_COMPLETION_INDEX": "1", "BULKJOB_SHARD_COUNT": "2"})
    assert proc.returncode == 0, proc.stderr
    summary = summary_of(proc)
    assert (summary["run_id"], summary["shard"], summary["shard_count"]) == ("envrun", 1, 2)


def test_bad_input_on_resume_loses_nothing_recorded(tmp_path, env):
    good = [{"id": i} for i in range(20)]
    assert run(tmp_path, env, good).returncode == 0
    proc = run(tmp_path, env, [*map(json.dumps, good), "{bad"])
    assert proc.returncode == 2
    assert status_of(str(tmp_path / "state"), "r1")["done"] == 20


def test_dry_run_touches_nothing(tmp_path, env):
    proc = run(tmp_path, env, [{"id": i} for i in range(30)], "--dry-run", "--shard-count", "3", "--shard-index", "1")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["dry_run"] and plan["valid_items"] == 30 and 0 < plan["to_run"] < 30
    assert plan["already_done"] == 0
    assert len(plan["items_per_shard"]) == 3 and sum(plan["items_per_shard"]) == 30
    assert plan["items_per_shard"][1] == plan["to_run"]
    assert not (tmp_path / "state").exists()
    assert not os.path.exists(env["LEDGER_DB"])


def test_shard_count_cannot_change_within_a_run(tmp_path, env):
    assert run(tmp_path, env, [{"id": i} for i in range(5)], "--shard-count", "2", "--shard-index", "0").returncode == 0
    proc = run(tmp_path, env, [{"id": i} for i in range(5)], "--shard-count", "3", "--shard-index", "0")
    assert proc.returncode == 2 and "--shard-count 2" in proc.stderr


def test_dry_run_of_a_started_run_counts_what_is_done(tmp_path, env):
    assert run(tmp_path, env, [{"id": i} for i in range(20)]).returncode == 0
    before = sorted(p.name for p in (tmp_path / "state" / "r1" / "shard-00000-of-00001").iterdir())
    proc = run(tmp_path, env, [{"id": i} for i in range(25)], "--dry-run")
    plan = json.loads(proc.stdout)
    assert (plan["already_done"], plan["to_run"], plan["total"]) == (20, 5, 25)
    assert sorted(p.name for p in (tmp_path / "state" / "r1" / "shard-00000-of-00001").iterdir()) == before
