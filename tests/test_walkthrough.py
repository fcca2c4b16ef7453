"""The README's five-minute walkthrough, run for real, step by step, with the installed `bulkjob`
console script in an empty directory: every file it writes, every command it types, and every
line of output it shows (`...` stands for what is left out)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from conftest import ROOT, VENV_BIN, need

SECTION = "## Five-minute walkthrough"
BLOCK = re.compile(r"```(python|console)\n(.*?)```", re.DOTALL)
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def steps(readme: str) -> list[tuple[str, object]]:
    """("file", (name, text)) and ("command", (command, shown output lines)), in README order."""
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    found: list[tuple[str, object]] = []
    for kind, body in BLOCK.findall(section):
        if kind == "python":
            name = body.split("\n", 1)[0].removeprefix("# ").split(":", 1)[0]
            found.append(("file", (name, body)))
            continue
        for chunk in body.split("$ ")[1:]:
            command, *shown = chunk.rstrip("\n").split("\n")
            found.append(("command", (command, shown)))
    return found


def shown_in(line: str, output: str) -> bool:
    """Whether a line the README shows is in the real output: its parts between `...`, in order."""
    at = 0
    for part in (p.strip().strip(",").strip() for p in TIME.sub("<time>", line).split("...")):
        if part:
            at = output.find(part, at)
            if at < 0:
                return False
            at += len(part)
    return True


def test_the_readme_walkthrough_runs_as_written(tmp_path):
    need((VENV_BIN / "bulkjob").exists(), "the bulkjob console script is not installed (make venv)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BULKJOB_", "AWS_", "PYTHON"))}
    # The installed script first on the path; no /metrics port taken from a machine shared with others.
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", BULKJOB_METRICS_PORT="0")
    codes = []
    for kind, step in steps((ROOT / "README.md").read_text()):
        if kind == "file":
            name, text = step
            (tmp_path / name).write_text(text)
            continue
        command, shown = step
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        codes.append(proc.returncode)
        output = TIME.sub("<time>", proc.stdout + proc.stderr)
        for line in shown:
            assert shown_in(line, output), f"{command}\nshows {line!r}\nbut printed:\n{output[-3000:]}"
        if command.startswith("bulkjob run"):
            assert len(proc.stdout.splitlines()) == 1 and json.loads(proc.stdout)["run_id"] == "first"
    # Write the items; run (3 fail); status; report; rerun (still failed); retry; status.
    assert codes == [0, 1, 0, 0, 1, 0, 0]
    status = json.loads(proc.stdout)
    assert (status["total"], status["done"], status["failed"]) == (100, 100, 0)
    assert Path(tmp_path / "bulkjob-state" / "first").is_dir()
