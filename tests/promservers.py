"""Real Prometheus and Pushgateway servers on loopback for the metrics tests, and helpers to
read a running job's processes and metrics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from conftest import free_port, need, wait_for_port

#: Scrape interval of the test Prometheus: short, so a test of a few seconds sees several scrapes.
SCRAPE_INTERVAL = "1s"


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


class Prometheus:
    """A Prometheus that scrapes `targets` (host:port on loopback) every SCRAPE_INTERVAL."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        exe = shutil.which("prometheus")
        need(exe is not None, "prometheus is not installed (apt-get install prometheus)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
                  "scrape_configs": [{"job_name": "bulkjob", "static_configs": [{"targets": targets}]}]}
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = open(workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [exe, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout=60)
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(self.url + "/-/ready")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = _get(url)
        except urllib.error.HTTPError as e:
            body = e.read()
        return json.loads(body)

    def query(self, expr: str) -> list[dict]:
        result = self.api("query", query=expr)
        assert result["status"] == "success", (expr, result)
        return result["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of `expr` now, or None when it has no series."""
        rows = self.query(expr)
        assert len(rows) <= 1, (expr, rows)
        return float(rows[0]["value"][1]) if rows else None

    def wait_until(self, expr: str, expected: float, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (got := self.value(expr)) != expected:
            assert time.monotonic() < deadline, f"{expr} is {got}, expected {expected}"
            time.sleep(0.25)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


class Pushgateway:
    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
        need(exe is not None, "the Pushgateway is not installed (apt-get install prometheus-pushgateway)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(workdir / "pushgateway.log", "wb")
        self.process = subprocess.Popen(
            [exe, f"--web.listen-address=127.0.0.1:{self.port}", f"--persistence.file={workdir / 'pg.data'}",
             "--log.level=warn"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout=60)

    def samples(self, **labels: str) -> dict[tuple[str, tuple], float]:
        """Pushed samples whose labels include `labels`: (name, other labels) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        found = {}
        for family in text_string_to_metric_families(_get(self.url + "/metrics").decode()):
            for s in family.samples:
                if all(s.labels.get(k) == v for k, v in labels.items()):
                    rest = tuple(sorted((k, v) for k, v in s.labels.items() if k not in labels and k != "instance"))
                    found[s.name, rest] = s.value
        return found

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def scrape(port: int) -> str:
    """The job's /metrics text."""
    return _get(f"http://127.0.0.1:{port}/metrics").decode()


def parse(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_for_metrics(port: int, proc, timeout: float = 60) -> str:
    """Scrape until the job answers (it serves /metrics from its start)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the job ended early:\n{proc.stderr.read()[-3000:]}"
        try:
            return scrape(port)
        except OSError:
            assert time.monotonic() < deadline, "the job never served /metrics"
            time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the forkserver and the workers below it, for a job)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def metrics_dir_of(tmpdir: Path, job_pid: int) -> Path:
    """The job's multiprocess directory (the job ran with TMPDIR=tmpdir)."""
    dirs = list(tmpdir.glob(f"bulkjob-metrics-{job_pid}-*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def in_flight_by_pid(directory: Path) -> dict[int, float]:
    """Items in flight per worker process, read from the workers' livesum files."""
    from prometheus_client.mmap_dict import MmapedDict

    found = {}
    for path in directory.glob("gauge_livesum_*.db"):
        try:
            values = list(MmapedDict.read_all_values_from_file(str(path)))
        except FileNotFoundError:
            continue
        found[int(path.stem.rsplit("_", 1)[1])] = sum(v for k, v, _, _ in values if "bulkjob_items_in_flight" in k)
    return found
