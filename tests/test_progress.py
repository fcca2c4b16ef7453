"""Progress for people: the line for pod logs, the bar for a terminal."""

import os
import pty
import select
import subprocess
import sys

import pytest
from conftest import ROOT, bulkjob_env, write_items

from job.progress import format_duration, progress_bar, progress_line


@pytest.mark.parametrize("seconds, text", [(None, "?"), (0, "0:00"), (59.9, "0:59"), (61, "1:01"), (3725, "1:02:05")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_progress_line_has_counts_rate_and_eta():
    line = progress_line(done=80, failed=20, pending=900, total=1000, rate=50.0)
    assert line == "progress: 100/1000 (80 done, 20 failed, 900 pending), 50.0 items/s, eta 0:18"


def test_progress_bar_fills_with_the_fraction_finished():
    bar = progress_bar(done=15, failed=0, pending=15, total=30, rate=0.0)
    assert bar.startswith("[" + "#" * 15 + "-" * 15 + "]") and "50.0%" in bar and "eta ?" in bar


def test_terminal_gets_a_bar_and_logs_get_lines(tmp_path):
    write_items(tmp_path / "items.jsonl", [{"id": i, "payload": {"seconds": 0.5}} for i in range(4)])
    argv = [sys.executable, "-m", "job", "run", "--items", str(tmp_path / "items.jsonl"), "--handler",
            "job.examples:sleep", "--manifest", str(tmp_path / "st"), "--metrics-port", "0", "--workers", "2",
            "--progress-interval", "0.2"]
    # stderr on a pseudo-terminal: a redrawn bar
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stderr=follower, stdout=subprocess.PIPE, env=bulkjob_env(), cwd=ROOT)
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(30)
    assert proc.returncode == 0
    assert b"\r[" in seen and b"items/s" not in seen and b"/s eta" in seen
    # stderr to a pipe: plain progress lines
    proc = subprocess.run([*argv, "--run-id", "piped"], capture_output=True, text=True, env=bulkjob_env(), cwd=ROOT)
    assert proc.returncode == 0
    assert "\r" not in proc.stderr and "progress: 4/4 (4 done, 0 failed, 0 pending)" in proc.stderr
