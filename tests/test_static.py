"""The static checks, part of `make test`: ruff on the whole tree, mypy (strict on the pure
cores, see pyproject.toml). A finding fails the build like a failing test."""

import subprocess
import sys

from conftest import ROOT, VENV_BIN, need


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    exe = VENV_BIN / tool
    need(exe.exists(), f"{tool} is not installed (pip install -e '.[test]')")
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    proc = run("ruff", "check", "job", "tests", "bench", "airflow_dag.py")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


def test_mypy_finds_nothing():
    proc = run("mypy")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert "Success" in proc.stdout and sys.version_info >= (3, 11)
