"""The Kubernetes manifests in k8s/ and the `kubectl run` command in docs/operations.md (Deploy).

Schema checks: every object, as written and as kustomize renders each combination
(the base, the Job, the work table's Job, either with the monitoring component, the example overlay),
validated offline in strict mode against the oldest Kubernetes the Job needs and
the newest schema kubernetes-validate bundles; the Prometheus Operator's kinds,
which have no bundled schema, get checks of their own. Then the checks no schema
can make: the security context, every exit code of job/exits.py mapped by
podFailurePolicy and the docs, the shard count in its three places, the grace
period against the drain timeout.
"""

import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, need, run_bulkjob, summary_of

from job.config import DEFAULT_DRAIN_TIMEOUT, DEFAULT_METRICS_PORT
from job.db.worktable import DDL
from job.exits import ENDINGS, EXIT_INTERRUPTED, EXIT_ITEMS_FAILED, EXIT_LEASE, EXIT_OK, EXIT_USAGE, Ending
from job.retry import DEFAULT_MAX_ATTEMPTS

pytestmark = pytest.mark.timeout(900)  # the first test may build .venv-airflow for kubectl

K8S = ROOT / "k8s"
OPERATIONS = ROOT / "docs" / "operations.md"


def deploy_docs() -> str:
    """The "Deploy" section of docs/operations.md."""
    text = OPERATIONS.read_text()
    start = text.index("\n## Deploy\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


#: The oldest Kubernetes with every Job feature used GA (backoffLimitPerIndex, FailIndex: 1.33).
OLDEST = "1.33"
VERSIONS = [OLDEST, kubernetes_validate.utils.latest_version()]
#: API groups of custom resources (the Prometheus Operator's): kubernetes-validate bundles no
#: schema for them, so they get checks of their own.
CUSTOM_GROUPS = ("monitoring.coreos.com/",)
#: The UID the user's cluster runs pods as.
UID = 1002

MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
#: What the kustomize combinations render: (directory, with the monitoring component) -> kinds.
#: The base must start nothing: the Airflow and `kubectl run` paths apply it alone.
COMBINATIONS = {
    "base": ("base", False, {"ServiceAccount"}),
    "base+monitoring": ("base", True, {"ServiceAccount", "PodMonitor", "PrometheusRule"}),
    "job": ("job", False, {"ServiceAccount", "Job"}),
    "job+monitoring": ("job", True, {"ServiceAccount", "Job", "PodMonitor", "PrometheusRule"}),
    "worktable": ("worktable", False, {"ServiceAccount", "Job"}),
    "overlays/kube-prometheus-stack": ("overlays/kube-prometheus-stack", False,
                                       {"ServiceAccount", "Job", "PodMonitor", "PrometheusRule"}),
}
#: podFailurePolicy's action for the codes that are not simply retried a limited number of times.
POLICY_ACTIONS = {EXIT_USAGE: "FailJob", EXIT_ITEMS_FAILED: "FailIndex", EXIT_INTERRUPTED: "Ignore"}
#: The example overlay's namespace and kube-prometheus-stack release label.
EXAMPLE_NAMESPACE = "bulk"
EXAMPLE_RELEASE = "kube-prometheus-stack"


def policy_action(ending: Ending) -> str:
    """The podFailurePolicy action an exit code must have: a new code cannot go unmapped."""
    if ending.code in POLICY_ACTIONS:
        return POLICY_ACTIONS[ending.code]
    assert ending.retry, f"exit {ending.code} is not worth retrying: decide its podFailurePolicy action"
    return "Count"


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def is_custom(doc: dict) -> bool:
    return doc["apiVersion"].startswith(CUSTOM_GROUPS)


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def validate(doc: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}: {e.message}"
                    f" at {'.'.join(map(str, e.path))}")


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl: the pinned one in .venv-airflow (make airflow-venv), else one on PATH."""
    pinned = ROOT / ".venv-airflow" / "bin" / "kubectl"
    if not pinned.exists():
        subprocess.run(["make", "-s", "airflow-venv"], cwd=ROOT, capture_output=True, timeout=900)
    exe = str(pinned) if pinned.exists() else shutil.which("kubectl")
    need(exe is not None, "kubectl not found and `make airflow-venv` (which installs it) failed")
    return exe


def kustomize(kubectl: str, directory: Path) -> list[dict]:
    proc = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="session")
def rendered(kubectl, tmp_path_factory) -> dict[str, list[dict]]:
    """Every combination of COMBINATIONS, rendered by `kubectl kustomize` as `kubectl apply -k` sends it."""
    out = {}
    for name, (directory, with_monitoring, _kinds) in COMBINATIONS.items():
        if not with_monitoring:
            out[name] = kustomize(kubectl, K8S / directory)
            continue
        # The monitoring component the way an overlay of the user's enables it;
        # kustomize refuses absolute paths to other kustomizations.
        overlay = tmp_path_factory.mktemp("overlay")
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(K8S / directory, overlay)],
            "components": [os.path.relpath(K8S / "monitoring", overlay)]}))
        out[name] = kustomize(kubectl, overlay)
    return out


@pytest.fixture(scope="session")
def job() -> dict:
    return one(load(K8S / "job" / "job.yaml"), "Job")


@pytest.fixture(scope="session")
def worktable_job() -> dict:
    return one(load(K8S / "worktable" / "job.yaml"), "Job")


def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def container(spec: dict) -> dict:
    """The job's container: the first (the Job names it bulkjob, kubectl run after the pod)."""
    return spec["containers"][0]


def arg(args: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) <= 1, f"--{name} given twice"
    return values[0] if values else None


def env_value(c: dict, name: str) -> str | None:
    return next((e.get("value") for e in c.get("env", []) if e["name"] == name), None)


def drain_timeout(c: dict) -> float:
    value = arg(c.get("args", []), "drain-timeout") or env_value(c, "BULKJOB_DRAIN_TIMEOUT")
    return float(value) if value is not None else DEFAULT_DRAIN_TIMEOUT


# --- schema -------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid_kubernetes(path, version):
    docs = [d for d in load(path) if not is_custom(d)]
    for doc in docs:
        validate(doc, version)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("combination", COMBINATIONS)
def test_kustomize_combination_renders_valid_kubernetes(rendered, combination, version):
    docs = rendered[combination]
    assert sorted(d["kind"] for d in docs) == sorted(COMBINATIONS[combination][2])
    for doc in docs:
        if not is_custom(doc):
            validate(doc, version)


def test_no_combination_applies_a_secret(rendered):
    # The real Secret is created apart; apply -k must never overwrite it with placeholders.
    for name, docs in rendered.items():
        assert not [d for d in docs if d["kind"] == "Secret"], name


def test_job_overlay_sets_the_image(rendered):
    image = container(pod_spec(one(rendered["job"], "Job")))["image"]
    assert re.fullmatch(r"[\w.-]+(:\d+)?/[\w./-]+:[\w.-]+", image), image


# --- the Indexed Job ----------------------------------------------------------------------------

def test_indexed_job_shard_count_matches_in_all_three_places(job):
    spec = job["spec"]
    args = container(pod_spec(job))["args"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(arg(args, "shard-count"))
    # The index comes from JOB_COMPLETION_INDEX; a fixed one would run one shard N times.
    assert arg(args, "shard-index") is None


def test_pod_failure_policy_maps_every_exit_code(job):
    rules = job["spec"]["podFailurePolicy"]["rules"]
    by_code = {}
    for rule in rules:
        if "onExitCodes" in rule:
            on = rule["onExitCodes"]
            assert on["operator"] == "In" and on["containerName"] == container(pod_spec(job))["name"]
            for code in on["values"]:
                by_code.setdefault(code, rule["action"])  # the first matching rule decides
    expected = {e.code: policy_action(e) for e in ENDINGS if e.code != EXIT_OK}
    assert by_code == expected
    # The lease code counts against backoffLimitPerIndex: ignored, a pod would be replaced
    # at once, again and again, for as long as the live runner keeps the shard.
    assert by_code[EXIT_LEASE] == "Count"
    disruption = [r for r in rules if "onPodConditions" in r]
    assert disruption == [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]


def test_exit_code_table_in_the_docs_maps_every_code():
    text = deploy_docs()
    for ending in ENDINGS:
        rows = re.findall(rf"^\| {ending.code} \|(.*)\|$", text, re.MULTILINE)
        assert len(rows) == 1, f"exit {ending.code}: {len(rows)} rows in the Deploy section's table"
        cells = [c.strip() for c in rows[0].split("|")]
        assert len(cells) == 4 and all(cells), (ending.code, cells)
        status, job_cell, airflow_cell, _kubectl_run = cells
        assert status == f"`{ending.status}`", (ending.code, status)
        if ending.code != EXIT_OK:
            assert f"`{policy_action(ending)}`" in job_cell, (ending.code, job_cell)
            assert ("retried" in airflow_cell and "not retried" not in airflow_cell) == ending.retry, (
                ending.code, airflow_cell)


def test_job_retries_per_index_and_cleans_up(job):
    spec = job["spec"]
    # An item that kills the whole pod is failed after DEFAULT_MAX_ATTEMPTS recorded attempts,
    # the first of which can go unrecorded: that many pods plus one may die for one item, and
    # the limit leaves room for two outages (exit 5) on top.
    assert spec["backoffLimitPerIndex"] >= DEFAULT_MAX_ATTEMPTS + 1 + 2
    assert "backoffLimit" not in spec  # with backoffLimitPerIndex the global limit only adds confusion
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    # podFailurePolicy and backoffLimitPerIndex both require it.
    assert pod_spec(job)["restartPolicy"] == "Never"


def test_run_id_is_the_job_name(job):
    c = container(pod_spec(job))
    assert arg(c["args"], "run-id") == "$(BULKJOB_RUN_ID)"
    (run_id,) = [e for e in c["env"] if e["name"] == "BULKJOB_RUN_ID"]
    assert run_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"


# --- pods: the Job's and the kubectl run one ----------------------------------------------------

class _DiscoveryOnly(BaseHTTPRequestHandler):
    """The three discovery documents `kubectl run` reads even for a client-side dry run."""

    DOCUMENTS: ClassVar[dict[str, dict]] = {
        "/api": {"kind": "APIVersions", "versions": ["v1"],
                 "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]},
        "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
        "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
            {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod", "verbs": ["create"]}]},
    }

    def do_GET(self):
        document = self.DOCUMENTS.get(self.path.split("?")[0])
        body = json.dumps(document).encode() if document else b"{}"
        self.send_response(200 if document else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def discovery_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DiscoveryOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def documented_kubectl_run() -> str:
    """The `kubectl run` command of docs/operations.md, exactly as a reader copies it."""
    blocks = re.findall(r"```sh\n(.*?)```", deploy_docs(), re.DOTALL)
    commands = [b for b in blocks if b.startswith("kubectl run ")]
    assert len(commands) == 1, "the Deploy section should show one `kubectl run` command"
    return commands[0]


@pytest.fixture(scope="session")
def adhoc_pod(kubectl, discovery_server) -> dict:
    """The pod the documented command creates, rendered by kubectl itself (client-side dry run)."""
    command = documented_kubectl_run().replace(
        "kubectl run ", f"{shlex.quote(kubectl)} --server={discovery_server} --dry-run=client -o json run ", 1)
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def pods(job: dict, adhoc_pod: dict) -> list[tuple[str, dict]]:
    return [("job", pod_spec(job)), ("kubectl run", adhoc_pod["spec"])]


@pytest.mark.parametrize("version", VERSIONS)
def test_kubectl_run_pod_is_valid_kubernetes(adhoc_pod, version):
    validate(adhoc_pod, version)


def test_pods_run_as_uid_1002_under_the_restricted_profile(job, adhoc_pod):
    for where, spec in pods(job, adhoc_pod):
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True, where
        assert security["runAsUser"] == UID, where
        assert security["runAsGroup"] == UID, where
        assert security["fsGroup"] == UID, where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in spec["containers"] + spec.get("initContainers", []):
            cs = c["securityContext"]
            assert cs["allowPrivilegeEscalation"] is False, where
            assert cs["capabilities"] == {"drop": ["ALL"]}, where
            assert cs["readOnlyRootFilesystem"] is True, where
            assert not cs.get("privileged"), where
            assert cs.get("runAsUser", UID) == UID, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where


def test_pods_write_only_to_an_emptydir_tmp(job, adhoc_pod):
    for where, spec in pods(job, adhoc_pod):
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container(spec)["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], where
        assert set(mounts) == {"/tmp"}, where


def test_grace_period_exceeds_the_drain_timeout(job, adhoc_pod):
    for where, spec in pods(job, adhoc_pod):
        drain = drain_timeout(container(spec))
        # Room after the drain for the final manifest write and the exit.
        assert spec["terminationGracePeriodSeconds"] >= drain + 10, (where, drain)


def test_pods_have_requests_and_limits(job, adhoc_pod):
    for where, spec in pods(job, adhoc_pod):
        resources = container(spec)["resources"]
        for kind in ("cpu", "memory"):
            assert resources["requests"][kind] == resources["limits"][kind], (where, kind)
        assert resources["limits"]["ephemeral-storage"], where


def test_pods_pass_arguments_only_so_tini_stays_pid_1(job, adhoc_pod):
    for where, spec in pods(job, adhoc_pod):
        c = container(spec)
        assert "command" not in c, where
        assert c["args"][0] == "run", where


def test_pods_expose_the_named_metrics_port(job, adhoc_pod):
    for where, spec in pods(job, adhoc_pod):
        c = container(spec)
        port = int(arg(c["args"], "metrics-port") or env_value(c, "BULKJOB_METRICS_PORT") or DEFAULT_METRICS_PORT)
        assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in c["ports"], where


def test_pods_use_the_service_account_without_a_token(job, adhoc_pod):
    account = one(load(K8S / "base" / "serviceaccount.yaml"), "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for where, spec in pods(job, adhoc_pod):
        assert spec["serviceAccountName"] == account["metadata"]["name"], where
        assert spec["automountServiceAccountToken"] is False, where


def test_secrets_come_from_the_example_secrets_keys(job, adhoc_pod):
    secret = one(load(K8S / "secret.example.yaml"), "Secret")
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}, "the example must hold placeholders only"
    for where, spec in pods(job, adhoc_pod):
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"]
                for e in container(spec)["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert set(refs) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BULKJOB_DB_PASSWORD"}, where
        for ref in refs.values():
            assert ref["name"] == secret["metadata"]["name"], where
            assert ref["key"] in secret["stringData"], where
        # No credential as a plain value.
        plain = {e["name"] for e in container(spec)["env"] if "value" in e}
        assert not plain & {"AWS_SECRET_ACCESS_KEY", "BULKJOB_DB_PASSWORD"}, where


def test_kubectl_run_pod_resumes_by_its_name(adhoc_pod):
    c = container(adhoc_pod["spec"])
    (run_id,) = [e for e in c["env"] if e["name"] == "BULKJOB_RUN_ID"]
    assert run_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert adhoc_pod["spec"]["restartPolicy"] == "Never"


def test_kubectl_run_pod_matches_the_jobs_pod(job, adhoc_pod):
    job_spec, adhoc = pod_spec(job), adhoc_pod["spec"]
    for key in ("securityContext", "volumes", "terminationGracePeriodSeconds", "serviceAccountName"):
        assert adhoc[key] == job_spec[key], key
    for key in ("securityContext", "resources", "volumeMounts", "ports", "terminationMessagePolicy"):
        assert container(adhoc)[key] == container(job_spec)[key], key
    assert drain_timeout(container(adhoc)) == drain_timeout(container(job_spec))


# --- the work table's runners ---------------------------------------------------------------------

def test_worktable_runners_are_identical_pods_of_the_whole_table(worktable_job):
    spec = worktable_job["spec"]
    args = container(pod_spec(worktable_job))["args"]
    assert "completionMode" not in spec and "backoffLimitPerIndex" not in spec  # no index: no shards
    assert spec["completions"] == spec["parallelism"] >= 2
    assert arg(args, "work-table") and arg(args, "db")
    assert "@" in arg(args, "db") and ":" not in arg(args, "db").split("://")[1].split("@")[0]  # no password
    for name in ("items", "manifest", "shard-count", "shard-index", "retry-failed"):
        assert arg(args, name) is None, name
    # A poison row costs up to --max-attempts + 1 pods; two outages (exit 5) on top.
    assert spec["backoffLimit"] >= DEFAULT_MAX_ATTEMPTS + 1 + 2
    assert pod_spec(worktable_job)["restartPolicy"] == "Never"


def test_worktable_pod_failure_policy_maps_every_exit_code(worktable_job):
    by_code = {}
    for rule in worktable_job["spec"]["podFailurePolicy"]["rules"]:
        for code in rule.get("onExitCodes", {}).get("values", []):
            by_code.setdefault(code, rule["action"])
    # FailIndex needs an Indexed Job: rows failed beyond --max-failures fail the Job, which a
    # runner reports only once the table has nothing left for it.
    expected = {e.code: policy_action(e) for e in ENDINGS if e.code != EXIT_OK} | {EXIT_ITEMS_FAILED: "FailJob"}
    assert by_code == expected


def test_worktable_pod_matches_the_jobs_pod_but_for_its_arguments_and_s3(job, worktable_job):
    job_spec, runner = pod_spec(job), pod_spec(worktable_job)
    for key in ("securityContext", "volumes", "terminationGracePeriodSeconds", "serviceAccountName",
                "automountServiceAccountToken"):
        assert runner[key] == job_spec[key], key
    for key in ("securityContext", "resources", "volumeMounts", "ports", "terminationMessagePolicy", "image"):
        assert container(runner)[key] == container(job_spec)[key], key
    names = {e["name"] for e in container(runner)["env"]}
    assert names == {"BULKJOB_RUN_ID", "BULKJOB_DB_PASSWORD"}  # no S3 keys: the table is the record


def test_worktable_runner_arguments_run_as_they_are_written(tmp_path, worktable_job):
    """The manifest's arguments, run by the real CLI against a SQLite work table in place of the
    example database: every row DONE, exit 0."""
    written = container(pod_spec(worktable_job))["args"]
    table = arg(written, "work-table")
    path = tmp_path / "work.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(DDL["sqlite"].replace("bulk_work", table))
        conn.executemany(f"INSERT INTO {table} (work_id, payload) VALUES (?, '{{}}')", [(f"w{n}",) for n in range(20)])
    args = [a.replace("$(BULKJOB_RUN_ID)", "bulkjob-worktable") for a in written]
    args = [f"--db=sqlite:///{path}" if a.startswith("--db=") else a for a in args]
    args = [a for a in args if not a.startswith("--metrics-port=")] + ["--metrics-port=0", "--workers=1"]
    proc = run_bulkjob(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (summary_of(proc)["done"], summary_of(proc)["work_table"]) == (20, table)
    with sqlite3.connect(path) as conn:
        assert conn.execute(f"SELECT state, COUNT(*) FROM {table} GROUP BY state").fetchall() == [("DONE", 20)]


# --- Prometheus ---------------------------------------------------------------------------------

def test_pod_monitor_scrapes_the_metrics_port_of_every_bulkjob_pod(rendered, adhoc_pod):
    docs = rendered["job+monitoring"]
    monitor = one(docs, "PodMonitor")
    template = one(docs, "Job")["spec"]["template"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    # The Job's pods and the `kubectl run` pod (the Airflow DAG's tests check its pods).
    assert selector.items() <= template["metadata"]["labels"].items()
    assert selector.items() <= adhoc_pod["metadata"]["labels"].items()
    ports = {p["name"] for p in container(template["spec"])["ports"]}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in ports
        assert endpoint["path"] == "/metrics"
    assert one(rendered["base+monitoring"], "PodMonitor") == monitor


def test_prometheus_rule_is_in_the_monitoring_component(rendered):
    rule = one(rendered["base+monitoring"], "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule == one(load(K8S / "monitoring" / "prometheus-rules.yaml"), "PrometheusRule")
    groups = rule["spec"]["groups"]
    assert groups and all(g["name"] and g["rules"] for g in groups)
    for r in (r for g in groups for r in g["rules"]):
        assert r["alert"] and r["expr"].strip() and r["labels"]["severity"], r
        assert "summary" in r["annotations"], r["alert"]


def test_example_overlay_labels_the_monitoring_objects_for_kube_prometheus_stack(rendered):
    docs = rendered["overlays/kube-prometheus-stack"]
    assert {d["metadata"].get("namespace") for d in docs} == {EXAMPLE_NAMESPACE}
    for kind in ("PodMonitor", "PrometheusRule"):
        assert one(docs, kind)["metadata"]["labels"]["release"] == EXAMPLE_RELEASE, kind
    for kind in ("ServiceAccount", "Job"):
        assert "release" not in one(docs, kind)["metadata"]["labels"], kind
    # The PodMonitor shares the pods' namespace, so it needs no namespaceSelector.
    assert "namespaceSelector" not in one(docs, "PodMonitor")["spec"]
    assert pod_spec(one(docs, "Job"))["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
