"""Shared test fixtures: a real S3 server on loopback, and running the real CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI") == "true"


def need(condition: bool, reason: str) -> None:
    """Skip on a laptop that lacks a server or tool; fail in CI, where .ci/run installs it."""
    if not condition:
        if IN_CI:
            pytest.fail(f"required in CI: {reason}")
        pytest.skip(reason)


class S3Server:
    """A real S3-compatible HTTP server (moto's server mode) in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server", path=str(VENV_BIN)) or shutil.which("moto_server")
        need(exe is not None, "moto_server is not installed (pip install 'moto[server]')")
        self.process = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.url}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing-secret-key")

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    return s3_server.bucket(name)


def write_items(path: Path, items) -> Path:
    """Write JSONL items: dicts are dumped, strings/bytes written as they are."""
    with open(path, "wb") as f:
        for item in items:
            if isinstance(item, dict):
                f.write(json.dumps(item).encode() + b"\n")
            elif isinstance(item, str):
                f.write(item.encode() + b"\n")
            else:
                f.write(item + b"\n")
    return path


def bulkjob_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BULKJOB_", "AWS_", "JOB_COMPLETION"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def bulkjob_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "job", *args]


def run_bulkjob(*args: str, env: dict | None = None, timeout: float = 120, stdin=None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess and return it (stdout/stderr as text)."""
    return subprocess.run(bulkjob_cmd(*args), env=bulkjob_env(env), capture_output=True, text=True,
                          timeout=timeout, input=stdin, cwd=ROOT)


def start_bulkjob(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(bulkjob_cmd(*args), env=bulkjob_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kwargs)


def summary_of(proc) -> dict:
    """The JSON summary line a run prints last on stdout."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no summary on stdout; stderr:\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


#: A text log record (one line) and the last line of a run that did not end ok.
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR)\s+[\w.]+[ :]")
LAST_LINE = re.compile(r"^bulkjob: (error|failed|interrupted|lease_lost|unavailable|internal_error): \S")


def stderr_lines(proc) -> list[str]:
    """The run's stderr, checked to be text log records only, but for one last line that says
    how the run ended (when it did not end ok); no bare traceback, no stray output."""
    lines = proc.stderr.splitlines()
    for n, line in enumerate(lines):
        last = n == len(lines) - 1 and proc.returncode != 0
        assert LOG_RECORD.match(line) or (last and LAST_LINE.match(line)), f"line {n + 1}: {line!r}\n{proc.stderr[-3000:]}"
    return lines


def status_of(manifest: str, run_id: str, env: dict | None = None) -> dict:
    proc = run_bulkjob("status", "--manifest", manifest, "--run-id", run_id, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def kill_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


# A real PostgreSQL server (session) and a fresh database per test, for the database tests and
# the fault-injection suite (tests/pg.py uses the helpers above).
from pg import pg_db, pg_server  # noqa: E402,F401
