"""The Kubernetes manifests in k8s/ and the `kubectl run` command in docs/operations.md (Deploy).

Schema checks: every object, as written and as kustomize renders it, validated
offline in strict mode against the oldest Kubernetes the Job needs and the
newest schema kubernetes-validate bundles. Then the checks no schema can make:
the security context, the exit codes of podFailurePolicy against the CLI's,
the shard count in its three places, the grace period against the drain timeout.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, need

from job.config import DEFAULT_DRAIN_TIMEOUT, DEFAULT_METRICS_PORT
from job.errors import EXIT_INTERRUPTED, EXIT_ITEMS_FAILED, EXIT_LEASE, EXIT_USAGE

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
def rendered(kubectl) -> list[dict]:
    """`kubectl kustomize k8s/`: what `kubectl apply -k k8s/` sends."""
    return kustomize(kubectl, K8S)


@pytest.fixture(scope="session")
def rendered_with_monitoring(kubectl, tmp_path_factory) -> list[dict]:
    """k8s/ with the monitoring component enabled, the way an overlay enables it."""
    overlay = tmp_path_factory.mktemp("overlay")
    # kustomize refuses absolute paths to other kustomizations.
    base = Path(os.path.relpath(K8S, overlay))
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(base)], "components": [str(base / "monitoring")]}))
    return kustomize(kubectl, overlay)


@pytest.fixture(scope="session")
def job() -> dict:
    return one(load(K8S / "job.yaml"), "Job")


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
def test_kustomize_output_is_valid_kubernetes(rendered, rendered_with_monitoring, version):
    assert {d["kind"] for d in rendered} == {"ServiceAccount", "Job"}
    assert {d["kind"] for d in rendered_with_monitoring} == {"ServiceAccount", "Job", "PodMonitor"}
    for doc in rendered_with_monitoring:
        if not is_custom(doc):
            validate(doc, version)


def test_kustomize_sets_the_image_and_adds_no_secret(rendered):
    image = container(pod_spec(one(rendered, "Job")))["image"]
    assert re.fullmatch(r"[\w.-]+(:\d+)?/[\w./-]+:[\w.-]+", image), image
    # The real Secret is created apart; apply -k must never overwrite it with placeholders.
    assert not [d for d in rendered if d["kind"] == "Secret"]


# --- the Indexed Job ----------------------------------------------------------------------------

def test_indexed_job_shard_count_matches_in_all_three_places(job):
    spec = job["spec"]
    args = container(pod_spec(job))["args"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(arg(args, "shard-count"))
    # The index comes from JOB_COMPLETION_INDEX; a fixed one would run one shard N times.
    assert arg(args, "shard-index") is None


def test_pod_failure_policy_maps_the_cli_exit_codes(job):
    rules = job["spec"]["podFailurePolicy"]["rules"]
    by_code = {}
    for rule in rules:
        if "onExitCodes" in rule:
            on = rule["onExitCodes"]
            assert on["operator"] == "In" and on["containerName"] == container(pod_spec(job))["name"]
            for code in on["values"]:
                by_code[code] = rule["action"]
    assert by_code == {EXIT_USAGE: "FailJob", EXIT_INTERRUPTED: "Ignore", EXIT_ITEMS_FAILED: "FailIndex"}
    # The lease code is left to the default (count against backoffLimitPerIndex), as documented.
    assert EXIT_LEASE not in by_code
    disruption = [r for r in rules if "onPodConditions" in r]
    assert disruption == [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]


def test_exit_code_table_in_the_docs_matches_the_policy():
    text = deploy_docs()
    for code, action in [(EXIT_ITEMS_FAILED, "FailIndex"), (EXIT_USAGE, "FailJob"), (EXIT_INTERRUPTED, "Ignore")]:
        assert re.search(rf"^\| {code} \|[^\n]*`{action}`", text, re.MULTILINE), (code, action)


def test_job_retries_per_index_and_cleans_up(job):
    spec = job["spec"]
    assert spec["backoffLimitPerIndex"] >= 1
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
    account = one(load(K8S / "serviceaccount.yaml"), "ServiceAccount")
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


# --- Prometheus ---------------------------------------------------------------------------------

def test_pod_monitor_scrapes_the_metrics_port_of_the_jobs_pods(rendered_with_monitoring):
    monitor = one(rendered_with_monitoring, "PodMonitor")
    template = one(rendered_with_monitoring, "Job")["spec"]["template"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    ports = {p["name"] for p in container(template["spec"])["ports"]}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in ports
        assert endpoint["path"] == "/metrics"
