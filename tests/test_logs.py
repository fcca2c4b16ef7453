"""Logs of real runs: JSON lines and text lines that name the item, whole lines on a shared
stderr, and a rotating log file that many processes share."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter

from conftest import run_bulkjob, stderr_lines, summary_of, write_items

COMMON = ("--handler", "obs_handler:handle", "--metrics-port", "0", "--backoff", "0.01")


def _run(tmp_path, items, *args, run_id="logs"):
    write_items(tmp_path / "items.jsonl", items)
    proc = run_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--manifest", str(tmp_path / "m"),
                       "--run-id", run_id, *COMMON, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_json_lines_name_the_run_shard_item_and_attempt(tmp_path):
    items = [{"id": f"i{n}", "payload": {"log_lines": 2, "plain_log": True}} for n in range(6)]
    proc = _run(tmp_path, items, "--log-format", "json", "--workers", "2", "--shard-count", "1")
    records = [json.loads(line) for line in proc.stderr.splitlines()]  # every line is JSON
    about_items = [r for r in records if r["logger"] in ("bulkjob.item", "obs_handler")]
    assert len(about_items) == 6 * 3
    for r in about_items:
        assert (r["run_id"], r["shard"], r["attempt"]) == ("logs", 0, 1) and r["item_id"] in r["msg"], r
    # A logger the handler made itself gets the item too, not only ctx.log.
    assert {r["item_id"] for r in about_items if r["logger"] == "obs_handler"} == {f"i{n}" for n in range(6)}
    # Records about the run itself carry no item; progress is a record like the others.
    assert any(r["msg"].startswith("progress: 6/6") and "item_id" not in r for r in records)
    assert len({r["pid"] for r in about_items}) == 2


def test_text_lines_name_the_item_after_the_logger(tmp_path):
    proc = _run(tmp_path, [{"id": "only", "payload": {"log_lines": 1}}], "--workers", "1", run_id="txt")
    line = next(line for line in proc.stderr.splitlines() if "line only/0" in line)
    assert re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z INFO    bulkjob\.item run_id=txt shard=0 item_id=only attempt=1: "
                    r"line only/0 \|$", line), line


def _check_lines(lines: list[str], expected: Counter) -> None:
    """Every line is one whole JSON record of the handler, and each expected line came once."""
    seen = Counter()
    for line in lines:
        record = json.loads(line)  # a torn or interleaved line would not parse
        match = re.fullmatch(r"line (\S+)/(\d+) (x*)\|", record["msg"])
        if record["logger"] != "bulkjob.item":
            continue
        assert match and record["item_id"] == match.group(1), record["msg"][:200]
        seen[match.group(1), int(match.group(2))] += 1
    assert seen == expected


def test_long_records_of_many_workers_reach_stderr_whole(tmp_path):
    # 16 KiB records, four times what a pipe takes in one piece, from four workers at once.
    items = [{"id": f"i{n}", "payload": {"log_lines": 5, "log_bytes": 16384}} for n in range(24)]
    proc = _run(tmp_path, items, "--log-format", "json", "--workers", "4")
    expected = Counter({(f"i{n}", k): 1 for n in range(24) for k in range(5)})
    _check_lines(proc.stderr.splitlines(), expected)
    assert summary_of(proc)["done"] == 24


def test_the_log_file_rotates_under_many_writers_without_losing_a_line(tmp_path):
    log_file = tmp_path / "logs" / "job.log"
    log_file.parent.mkdir()
    items = [{"id": f"i{n}", "payload": {"log_lines": 40, "log_bytes": 300}} for n in range(40)]
    proc = _run(tmp_path, items, "--log-format", "json", "--workers", "4", "--log-file", str(log_file),
                "--log-file-max-bytes", "65536", "--log-file-backups", "1000")
    rotated = sorted(p for p in log_file.parent.iterdir() if p.name.endswith(".gz"))
    assert len(rotated) >= 5, sorted(p.name for p in log_file.parent.iterdir())
    lines = log_file.read_text().splitlines()
    for path in rotated:
        lines += gzip.decompress(path.read_bytes()).decode().splitlines()
    expected = Counter({(f"i{n}", k): 1 for n in range(40) for k in range(40)})
    _check_lines(lines, expected)
    # The file has what stderr has, the parent's records included.
    assert len(lines) == len(proc.stderr.splitlines())


def _noisy(tmp_path, *args, run_id="noisy"):
    items = [{"id": "user-tok-Secret-9Zq", "payload": {"token": "tok-Secret-9Zq", "fail": True}},
             {"id": "plain", "payload": {"token": "tok-Other-4Kx"}}]
    write_items(tmp_path / "items.jsonl", items)
    return run_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--manifest", str(tmp_path / "m"),
                       "--run-id", run_id, "--handler", "noisy_handler:handle", "--metrics-port", "0",
                       "--workers", "1", "--redact", "token", "--xcom-path", str(tmp_path / "xcom.json"), *args)


def test_stdout_holds_the_summary_alone_whatever_a_handler_writes_there(tmp_path):
    proc = _noisy(tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = proc.stdout.splitlines()  # exactly one line: the summary
    assert json.loads(line) == json.loads((tmp_path / "xcom.json").read_text())
    assert (json.loads(line)["done"], json.loads(line)["failed"]) == (1, 1)
    # What the handler wrote to stdout went to the log stream instead, redacted where Python sees it.
    err = proc.stderr
    assert err.count("printed at import") == 2  # the parent imports it, and the worker
    assert "print() of plain [redacted]" in err and "stdout.buffer of plain [redacted]" in err
    assert "os.write(1) of plain" in err and "libc write(1) of plain" in err
    assert "print() of user-[redacted] [redacted]" in err and "stdout.buffer of user-[redacted]" in err


def test_a_multi_line_error_is_one_record_and_item_ids_are_redacted(tmp_path):
    proc = _noisy(tmp_path)
    records = [line for line in proc.stderr.splitlines() if " bulkjob" in line[:40]]
    (failed,) = [r for r in records if "failed after 1 attempt(s)" in r]
    assert failed.split(" ")[1] == "WARNING"
    assert "item_id=user-[redacted] " in failed
    # Only bytes written to the file descriptor itself escape redaction (documented).
    assert "tok-Secret-9Zq" not in "\n".join(line for line in proc.stderr.splitlines() if "write(1) of" not in line)
    assert "first line of user-[redacted]\\nsecond line\\nthird line with [redacted]" in failed
    assert "(tests/noisy_handler.py line 26, in handle)" in failed
    proc = _noisy(tmp_path, "--log-format", "json", run_id="json")
    docs = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    (failed,) = [d for d in docs if "failed after 1 attempt(s)" in d["msg"]]
    assert failed["item_id"] == "user-[redacted]" and "second line\nthird line" in failed["msg"]
    assert docs[-1]["level"] == "ERROR" and docs[-1]["msg"].startswith("failed: 1 item(s) failed")


def test_retries_are_debug_and_the_last_failure_a_warning_with_its_traceback(tmp_path):
    items = [{"id": f"i{n}", "payload": {"fail_until": 3}} for n in range(4)]
    items += [{"id": "bad", "payload": {"error": "KeyError"}}]
    write_items(tmp_path / "items.jsonl", items)
    args = ["run", "--items", str(tmp_path / "items.jsonl"), "--manifest", str(tmp_path / "m"), "--handler",
            "ledger:handle", "--metrics-port", "0", "--backoff", "0.01", "--workers", "2"]
    env = {"LEDGER_DB": str(tmp_path / "ledger.db")}
    proc = run_bulkjob(*args, "--run-id", "info", env=env)
    assert proc.returncode == 1
    lines = stderr_lines(proc)
    assert not any("retry in" in line for line in lines)  # no retry at INFO
    (failed,) = [line for line in lines if "failed after" in line]
    assert failed.split(" ")[1] == "WARNING" and "item_id=bad attempt=1" in failed
    assert "KeyError: 'raised by the test handler' (tests/ledger.py line " in failed
    assert "\\nTraceback (most recent call last):\\n  File " in failed
    assert "job/worker.py" not in failed  # the handler's frames, not bulkjob's
    assert lines[-1].startswith("bulkjob: failed: 1 item(s) failed for good") and "--retry-failed" in lines[-1]
    debug = run_bulkjob(*args, "--run-id", "debug", "--log-level", "DEBUG", env=env)
    retries = [line for line in stderr_lines(debug) if "retry in" in line]
    assert len(retries) == 4 * 2 and all(line.split(" ")[1] == "DEBUG" for line in retries)


def test_the_jsonl_report_keeps_the_traceback_and_the_csv_does_not(tmp_path):
    write_items(tmp_path / "items.jsonl", [{"id": "bad", "payload": {"error": "KeyError"}}])
    env = {"LEDGER_DB": str(tmp_path / "ledger.db")}
    run_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--manifest", str(tmp_path / "m"), "--handler",
                "ledger:handle", "--metrics-port", "0", "--run-id", "tb", env=env)
    report = run_bulkjob("report", "--manifest", str(tmp_path / "m"), "--run-id", "tb")
    (row,) = map(json.loads, report.stdout.splitlines())
    trace = row["traceback"]
    assert trace.startswith("Traceback (most recent call last):\n  File ") and 'ledger.py", line' in trace
    assert trace.rstrip().endswith("KeyError: 'raised by the test handler'") and "job/worker.py" not in trace
    csv_report = run_bulkjob("report", "--manifest", str(tmp_path / "m"), "--run-id", "tb", "--format", "csv")
    header, row_line = csv_report.stdout.splitlines()
    assert "traceback" not in header and "Traceback" not in row_line and "raised by the test handler" in row_line
