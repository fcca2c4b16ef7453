"""The alerting rules: the PrometheusRule checked and unit-tested with the real promtool."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import ROOT, need

yaml = pytest.importorskip("yaml")

RULE_OBJECT = ROOT / "k8s" / "monitoring" / "prometheus-rules.yaml"
RULES_DIR = ROOT / "tests" / "prometheus"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    need(exe is not None, "promtool is not installed (apt-get install prometheus)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=RULES_DIR)


def test_the_rule_file_for_promtool_is_the_prometheusrule_spec():
    rule = yaml.safe_load(RULE_OBJECT.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["name"] == "bulkjob"
    assert yaml.safe_load((RULES_DIR / "rules.yaml").read_text()) == {"groups": rule["spec"]["groups"]}


def test_promtool_checks_the_rules(tmp_path):
    # Checked as extracted here too, so a stale tests/prometheus/rules.yaml cannot hide a bad spec.
    spec = yaml.safe_load(RULE_OBJECT.read_text())["spec"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    for path in (tmp_path / "rules.yaml", RULES_DIR / "rules.yaml"):
        proc = _promtool("check", "rules", str(path))
        assert proc.returncode == 0 and "SUCCESS: 4 rules found" in proc.stdout, proc.stdout + proc.stderr


def test_promtool_unit_tests_fire_and_hold_the_alerts():
    proc = _promtool("test", "rules", "rules_test.yaml")
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test_that_expects_it_to_fire():
    alerts = {r["alert"] for g in yaml.safe_load(RULE_OBJECT.read_text())["spec"]["groups"] for r in g["rules"]}
    tests = yaml.safe_load((RULES_DIR / "rules_test.yaml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case.get("exp_alerts")}
    quiet = {case["alertname"] for t in tests for case in t["alert_rule_test"] if not case.get("exp_alerts")}
    assert alerts == fired == quiet == {"BulkjobStalled", "BulkjobFailureRatioHigh", "BulkjobRetryStorm",
                                        "BulkjobWorkersCrashLooping"}
