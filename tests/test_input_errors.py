"""Bad input and bad options: a clear message, exit 2, nothing run, nothing recorded lost."""

import json
import os

import pytest
from conftest import run_bulkjob, status_of, stderr_lines, summary_of, write_items


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
    records = stderr_lines(proc)
    assert sum("items.jsonl line " in r and "bad JSON" in r for r in records[:-1]) == 10  # a record each
    assert "and 23 more" in records[-2]
    assert records[-1].startswith("bulkjob: error: ") and "33 invalid line(s), the first: line 3: bad JSON" in records[-1]
    assert "--skip-invalid" in records[-1]
    assert summary_of(proc)["error"] == records[-1].removeprefix("bulkjob: error: ")


def test_skip_invalid_records_bad_lines_and_runs_the_rest(tmp_path, env):
    proc = run(tmp_path, env, ['{"id": "a"}', "{bad", '{"id": "b", "payload": 1}', '{"id": "a"}', '{"id": "c"}'],
               "--skip-invalid", "--max-failures", "3")
    assert proc.returncode == 0, proc.stderr
    summary = summary_of(proc)
    assert (summary["done"], summary["failed"], summary["total"]) == (2, 3, 5)
    report = run_bulkjob("report", "--manifest", str(tmp_path / "state"), "--run-id", "r1")
    rows = {r["line"]: r for r in map(json.loads, report.stdout.splitlines())}
    assert set(rows) == {2, 3, 4}
    assert (rows[2]["id"], rows[3]["id"], rows[4]["id"]) == (None, "b", None)
    assert rows[3]["error_kind"] == "invalid" and "payload" in rows[3]["error_message"]
    assert "duplicate id 'a'" in rows[4]["error_message"]


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


def test_an_invalid_line_cannot_take_the_place_of_an_item_with_the_same_id(tmp_path, env):
    # An item whose id is what an invalid line used to be recorded as ("#line-2"): both are kept.
    items = ['{"id": "#line-2"}', "{bad", '{"id": "x"}']
    proc = run(tmp_path, env, items, "--skip-invalid", "--max-failures", "1")
    assert proc.returncode == 0, proc.stderr
    assert (summary_of(proc)["done"], summary_of(proc)["failed"], summary_of(proc)["pending"]) == (2, 1, 0)
    status = status_of(str(tmp_path / "state"), "r1")
    assert (status["done"], status["failed"], status["invalid"], status["pending"]) == (2, 1, 1, 0)
    report = run_bulkjob("report", "--manifest", str(tmp_path / "state"), "--run-id", "r1")
    (row,) = map(json.loads, report.stdout.splitlines())
    assert (row["id"], row["line"], row["error_kind"]) == (None, 2, "invalid")
    again = run(tmp_path, env, items, "--skip-invalid", "--max-failures", "1")
    assert again.returncode == 0, again.stderr  # a rerun has nothing left to do
    assert (summary_of(again)["attempts"], summary_of(again)["pending"]) == (0, 0)
    retried = run(tmp_path, env, items, "--skip-invalid", "--max-failures", "1", "--retry-failed")
    assert retried.returncode == 0, retried.stderr  # the line is still invalid: failed again, not lost
    assert (summary_of(retried)["failed"], summary_of(retried)["pending"]) == (1, 0)


@pytest.mark.parametrize("shards", [2, 3])
def test_every_shard_records_its_part_of_the_invalid_lines(tmp_path, env, shards):
    items = [f'{{"id": "k{i % 30}"}}' for i in range(45)] + ["{bad"] * 6  # 15 repeats, 6 bad lines
    write_items(tmp_path / "items.jsonl", items)
    failed = 0
    for index in range(shards):
        proc = run_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "ledger:handle",
                           "--manifest", str(tmp_path / "state"), "--run-id", "r1", "--metrics-port", "0",
                           "--skip-invalid", "--max-failures", "100", "--shard-count", str(shards),
                           "--shard-index", str(index), env=env)
        assert proc.returncode == 0, proc.stderr
        failed += summary_of(proc)["failed"]
    assert failed == 21
    status = status_of(str(tmp_path / "state"), "r1")
    assert (status["total"], status["done"], status["invalid"], status["pending"]) == (51, 30, 21, 0)
    report = run_bulkjob("report", "--manifest", str(tmp_path / "state"), "--run-id", "r1")
    assert sorted(json.loads(r)["line"] for r in report.stdout.splitlines()) == list(range(31, 52))


@pytest.mark.parametrize("line, message", [
    ('{"id": "deep", "payload": {"x": ' + "[" * 2000 + "]" * 2000 + "}}", "line 2: nested deeper than 200 levels"),
    ('{"id": "s\\ud800"}', "line 2: not valid Unicode"),
    ('{"id": "ok2", "payload": {"name": "x\\udc00y"}}', "line 2: not valid Unicode"),
])
@pytest.mark.parametrize("mode", ["run", "dry-run", "skip-invalid"])
def test_input_that_would_crash_a_run_is_an_invalid_line(tmp_path, env, line, message, mode):
    extra = {"run": [], "dry-run": ["--dry-run"], "skip-invalid": ["--skip-invalid", "--max-failures", "1"]}[mode]
    proc = run(tmp_path, env, ['{"id": "ok"}', line, '{"id": "z"}'], *extra)
    stderr_lines(proc)  # no traceback, no stray line
    if mode == "skip-invalid":
        assert proc.returncode == 0, proc.stderr
        assert (summary_of(proc)["done"], summary_of(proc)["failed"]) == (2, 1)
        report = run_bulkjob("report", "--manifest", str(tmp_path / "state"), "--run-id", "r1")
        (row,) = map(json.loads, report.stdout.splitlines())
        assert row["line"] == 2 and message.split(": ", 1)[1] in row["error_message"]
        return
    assert proc.returncode == 2, proc.stderr
    assert message in summary_of(proc)["error"]
    assert not os.path.exists(env["LEDGER_DB"])


@pytest.mark.parametrize("content", ["", "\n\n   \n"], ids=["empty", "blank-lines"])
def test_an_input_without_items_is_a_usage_error_unless_allowed(tmp_path, env, content):
    (tmp_path / "items.jsonl").write_text(content)
    args = ["run", "--items", str(tmp_path / "items.jsonl"), "--handler", "ledger:handle", "--manifest",
            str(tmp_path / "state"), "--run-id", "r1", "--metrics-port", "0"]
    proc = run_bulkjob(*args, env=env)
    assert proc.returncode == 2
    assert "no items" in summary_of(proc)["error"] and "--allow-empty" in summary_of(proc)["error"]
    assert not (tmp_path / "state").exists()
    allowed = run_bulkjob(*args, "--allow-empty", env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert (summary_of(allowed)["status"], summary_of(allowed)["total"]) == ("ok", 0)


def test_a_directory_as_items_says_so(tmp_path, env):
    proc = run_bulkjob("run", "--items", str(tmp_path), "--handler", "ledger:handle", "--manifest",
                       str(tmp_path / "state"), "--run-id", "r1", "--metrics-port", "0", env=env)
    assert proc.returncode == 2
    assert f"--items '{tmp_path}' is a directory" in summary_of(proc)["error"]
