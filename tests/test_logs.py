"""Logs of real runs: JSON lines and text lines that name the item, whole lines on a shared
stderr, and a rotating log file that many processes share."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter

from conftest import run_bulkjob, summary_of, write_items

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
