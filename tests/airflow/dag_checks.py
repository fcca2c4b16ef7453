"""The Airflow DAG `bulk_controller`, loaded by a real Airflow and rendered into real pods.

These run only in the Airflow virtualenv (make airflow-venv), started by
tests/test_airflow_dag.py with this file's path: the name does not match
pytest's test_*.py pattern, so the job's own suite never collects it, and
there is no conftest.py here, which would shadow tests/conftest.py.
"""

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

# Airflow reads its configuration when first imported: a throwaway home
# (SQLite database, no examples) before anything imports it. The kubernetes
# connection only supplies a namespace; nothing here talks to a cluster.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="bulkjob-airflow-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", os.path.join(os.environ["AIRFLOW_HOME"], "dags"))
os.environ.setdefault("AIRFLOW_CONN_KUBERNETES_DEFAULT", '{"conn_type": "kubernetes", "extra": {"namespace": "bulk"}}')
import kubernetes_validate
import pytest
import yaml
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s

try:
    from airflow.sdk.exceptions import ParamValidationError
except ImportError:  # Airflow 2
    from airflow.exceptions import ParamValidationError

# A connection whose extra names the XCom sidecar's image and resources: the deployer's word wins.
# Airflow reads connections from the environment when asked, not when imported.
CUSTOM_SIDECAR_CONN = "kubernetes_custom_sidecar"
CUSTOM_SIDECAR_IMAGE = "registry.example.com/tools/xcom-sidecar:1"
CUSTOM_SIDECAR_RESOURCES = {"requests": {"cpu": "5m", "memory": "16Mi"}, "limits": {"cpu": "5m", "memory": "16Mi"}}
os.environ[f"AIRFLOW_CONN_{CUSTOM_SIDECAR_CONN.upper()}"] = json.dumps({"conn_type": "kubernetes", "extra": {
    "namespace": "bulk", "xcom_sidecar_container_image": CUSTOM_SIDECAR_IMAGE,
    "xcom_sidecar_container_resources": json.dumps(CUSTOM_SIDECAR_RESOURCES)}})
#: The image the deployer names when the DAG file is parsed (below); trigger-time params cannot change it.
IMAGE = "registry.example.com/bulkjob:test"
os.environ["BULKJOB_IMAGE"] = IMAGE
#: The deployer's database, likewise (no password: the Secret has it).
DATABASE = "oracle://bulk@db.example.com:1521/ORCLPDB1"
os.environ["BULKJOB_DB"] = DATABASE

ROOT = Path(__file__).resolve().parents[2]
DAG_FILE = ROOT / "airflow_dag.py"
SHARD_COUNT = 3
PARAMS = {
    "items": "s3://in/items.jsonl",
    "handler": "job.examples:noop",
    "manifest": "s3://state/runs",
    "shard_count": SHARD_COUNT,
    "workers": 2,
    "work_table": "",
}
#: What someone who can only trigger the DAG might pass: it must not reach the pods.
UNTRUSTED_CONF = {"image": "evil.example.com/steal-credentials:latest"}
PODMONITOR = ROOT / "k8s" / "monitoring" / "podmonitor.yaml"
#: What Airflow 3 names a manually triggered run: the job must take it as a run id.
RUN_ID = "manual__2026-11-25T08:12:24.614558+00:00"
#: The oldest Kubernetes with every Job feature k8s/job/job.yaml uses, and the newest schema bundled.
K8S_VERSIONS = ["1.33", kubernetes_validate.utils.latest_version()]


def _import_dag_module():
    spec = importlib.util.spec_from_file_location("airflow_dag", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dag_module = _import_dag_module()


def _dagbag(path):
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 2
        from airflow.models.dagbag import DagBag
    return DagBag(dag_folder=str(path))


@pytest.fixture(scope="module")
def dag():
    bag = _dagbag(DAG_FILE)
    assert bag.import_errors == {}
    return bag.dags[dag_module.DAG_ID]


def _option(args, name):
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} given {len(values)} times in {args}"
    return values[0]


def _shard_arguments(dag, params, run_id):
    """What the plan task returns for these params: it renders its templates like Airflow does."""
    plan = copy.copy(dag.get_task("plan_shards"))  # rendering replaces the templates: not the DAG's own
    plan.render_template_fields({"params": params, "run_id": run_id}, jinja_env=dag.get_template_env())
    return plan.python_callable(**plan.op_kwargs)


def _shard_operators(dag, params=PARAMS):
    """The mapped shard task unmapped for each shard, its templates rendered as a worker would."""
    mapped = dag.get_task(dag_module.SHARD_TASK_ID)
    operators = []
    for args in _shard_arguments(dag, params, RUN_ID):
        operator = mapped.unmap({"arguments": args})
        operator.render_template_fields({"params": params, "run_id": RUN_ID}, jinja_env=dag.get_template_env())
        operators.append(operator)
    return operators


def _pod(operator) -> dict:
    """The pod the provider builds for `operator`, exactly as it would send it to the API server."""
    return ApiClient().sanitize_for_serialization(operator.build_pod_request_obj(dry_run=True))


@pytest.fixture(scope="module")
def rendered_pods(dag):
    """One pod per shard, triggered with a conf that tries to choose the image."""
    return [_pod(operator) for operator in _shard_operators(dag, PARAMS | UNTRUSTED_CONF)]


def test_dag_loads_without_import_errors(dag):
    assert dag.dag_id == "bulk_controller"
    assert set(dag.task_ids) == {"plan_shards", dag_module.SHARD_TASK_ID, "check_shards"}
    assert set(dag.params) >= {"items", "shard_count", "workers"}
    # The pods get the database password and S3 keys: whoever can trigger the DAG must not
    # choose what they run.
    assert "image" not in dag.params


def test_dag_survives_serialization_for_the_scheduler(dag):
    from airflow.serialization.serialized_objects import DagSerialization

    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    shard_task = restored.get_task(dag_module.SHARD_TASK_ID)
    assert shard_task.pool == "oracle_dml"
    assert restored.get_task("check_shards").trigger_rule == "all_done"


def test_shard_tasks_are_mapped_kubernetes_pod_operators_with_retry_settings(dag):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    mapped = dag.get_task(dag_module.SHARD_TASK_ID)
    assert issubclass(mapped.operator_class, KubernetesPodOperator)
    kwargs = mapped.partial_kwargs
    assert kwargs["pool"] == "oracle_dml"
    assert kwargs["retries"] >= 1
    assert kwargs["retry_exponential_backoff"] is True
    assert kwargs["on_finish_action"] == "delete_succeeded_pod"
    assert kwargs["do_xcom_push"] is True
    assert kwargs["termination_grace_period"] > dag_module.DRAIN_TIMEOUT_SECONDS


def test_one_argument_list_per_shard_with_the_dag_run_id(dag):
    shards = _shard_arguments(dag, PARAMS, RUN_ID)

    assert len(shards) == SHARD_COUNT
    assert [_option(args, "shard-index") for args in shards] == [str(i) for i in range(SHARD_COUNT)]
    for args in shards:
        assert args[0] == "run"
        assert _option(args, "shard-count") == str(SHARD_COUNT)
        assert _option(args, "run-id") == RUN_ID
        assert _option(args, "items") == PARAMS["items"]
        assert _option(args, "workers") == "2"


@pytest.mark.parametrize("bad", [{"shard_count": 0}, {"workers": 0}])
def test_shard_arguments_refuse_nonsense_counts(bad):
    kwargs = dict(items="i", handler="h", manifest="m", run_id="r", shard_count=2, workers=2) | bad
    with pytest.raises(ValueError):
        dag_module.shard_arguments(**kwargs)


def test_each_shard_pod_runs_the_image_as_uid_1002_with_its_arguments(rendered_pods):
    assert len(rendered_pods) == SHARD_COUNT
    for index, pod in enumerate(rendered_pods):
        spec = pod["spec"]
        job, _sidecar = spec["containers"]
        assert spec["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 1002,
            "runAsGroup": 1002,
            "fsGroup": 1002,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert job["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert job["image"] == IMAGE  # the deployer's, whatever the conf said
        # Arguments only: the image's entrypoint (tini, then bulkjob) stays.
        assert not job.get("command")
        assert _option(job["args"], "shard-index") == str(index)
        assert _option(job["args"], "shard-count") == str(SHARD_COUNT)
        assert _option(job["args"], "run-id") == RUN_ID
        assert int(_option(job["args"], "drain-timeout")) < spec["terminationGracePeriodSeconds"]
        assert job["resources"]["requests"] == job["resources"]["limits"]
        assert job["resources"]["limits"]["cpu"] == "2"
        assert job["resources"]["limits"]["memory"] == "2Gi"
        assert {"name": "metrics", "containerPort": 8799} in job["ports"]
        assert job["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert spec["automountServiceAccountToken"] is False
        assert spec["restartPolicy"] == "Never"
        # Read-only root: /tmp is an emptyDir.
        assert {"mountPath": "/tmp", "name": "tmp"} in job["volumeMounts"]
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in job["env"] if "valueFrom" in e}
        assert set(secrets) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BULKJOB_DB_PASSWORD"}
        assert {ref["name"] for ref in secrets.values()} == {"bulkjob"}
        assert {"name": "BULKJOB_DB", "value": DATABASE} in job["env"]


def test_each_shard_pod_has_the_xcom_sidecar_reading_the_jobs_summary(rendered_pods):
    for pod in rendered_pods:
        job, sidecar = pod["spec"]["containers"]
        assert sidecar["name"] == "airflow-xcom-sidecar"
        assert {"mountPath": "/airflow/xcom", "name": "xcom"} in job["volumeMounts"]
        assert {"mountPath": "/airflow/xcom", "name": "xcom"} in sidecar["volumeMounts"]
        assert _option(job["args"], "xcom-path") == "/airflow/xcom/return.json"
        # The sidecar shares the pod's UID and must pass the same admission policy.
        assert sidecar["securityContext"] == job["securityContext"]
        # The job's image, already on the node, rather than alpine from Docker Hub.
        assert sidecar["image"] == IMAGE


def qos_class(pod: dict) -> str:
    """The QoS class Kubernetes gives `pod` (its rules for cpu and memory, as the kubelet applies them)."""
    containers = pod["spec"]["containers"] + pod["spec"].get("initContainers", [])
    guaranteed, any_set = True, False
    for c in containers:
        resources = c.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        for kind in ("cpu", "memory"):
            # A request left out defaults to the limit.
            request = requests.get(kind, limits.get(kind))
            any_set = any_set or request is not None or kind in limits
            if kind not in limits or request != limits[kind]:
                guaranteed = False
    return "Guaranteed" if guaranteed else "Burstable" if any_set else "BestEffort"


def test_qos_class_follows_the_kubernetes_rules():
    def pod(*resources):
        return {"spec": {"containers": [{"resources": r} for r in resources]}}

    same = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    assert qos_class(pod(same, same)) == "Guaranteed"
    assert qos_class(pod(same, {"limits": {"cpu": "1", "memory": "1Gi"}})) == "Guaranteed"
    # The provider's default sidecar: requests only.
    assert qos_class(pod(same, {"requests": {"cpu": "1m", "memory": "10Mi"}})) == "Burstable"
    assert qos_class(pod({}, {})) == "BestEffort"


def test_each_shard_pod_is_guaranteed_qos(rendered_pods):
    for pod in rendered_pods:
        assert qos_class(pod) == "Guaranteed", [c.get("resources") for c in pod["spec"]["containers"]]
        _job, sidecar = pod["spec"]["containers"]
        assert sidecar["resources"] == ApiClient().sanitize_for_serialization(dag_module.SIDECAR_RESOURCES)


def test_the_connections_sidecar_settings_win_over_the_dags(dag):
    operator = _shard_operators(dag)[0]
    operator.kubernetes_conn_id = CUSTOM_SIDECAR_CONN
    pod = _pod(operator)
    _job, sidecar = pod["spec"]["containers"]
    assert sidecar["image"] == CUSTOM_SIDECAR_IMAGE
    assert sidecar["resources"] == CUSTOM_SIDECAR_RESOURCES
    assert qos_class(pod) == "Guaranteed"


def test_the_image_comes_from_the_deployers_environment_only():
    assert dag_module.deployed_image({"BULKJOB_IMAGE": "r.example.com/b:1"}) == "r.example.com/b:1"
    assert dag_module.deployed_image({}) == dag_module.DEFAULT_IMAGE
    for bad in ("", " r.example.com/b:1", "r.example.com/b:1 --privileged"):
        with pytest.raises(ValueError):
            dag_module.deployed_image({"BULKJOB_IMAGE": bad})


@pytest.mark.parametrize("url", ["postgresql://bulk@db:5432/app", "oracle+tcps://bulk@db:2484/SVC?wallet_location=/w"])
def test_the_database_comes_from_the_deployers_environment_only(url):
    assert dag_module.deployed_database({"BULKJOB_DB": url}) == url
    assert dag_module.deployed_database({}) is None


@pytest.mark.parametrize("bad", ["", " postgresql://db/app", "postgresql://bulk:secret@db/app",
                                 "postgresql://bulk@db/app?password=secret", "oracle://u@db/S?PWD=secret",
                                 " postgresql://bulk:secret@db/app"])
def test_a_database_url_that_is_blank_or_holds_a_password_is_refused_without_echoing_it(bad):
    with pytest.raises(ValueError, match="BULKJOB_DB") as caught:
        dag_module.deployed_database({"BULKJOB_DB": bad})
    assert "secret" not in str(caught.value)


def test_a_work_table_gets_identical_runners_and_no_shards(dag):
    params = PARAMS | {"work_table": "app.bulk_work"}
    runners = _shard_arguments(dag, params, RUN_ID)

    assert len(runners) == SHARD_COUNT
    assert all(args == runners[0] for args in runners)
    args = runners[0]
    assert _option(args, "work-table") == "app.bulk_work"
    assert _option(args, "run-id") == RUN_ID and _option(args, "handler") == PARAMS["handler"]
    assert not [a for a in args if a.split("=")[0] in ("--items", "--manifest", "--shard-count", "--shard-index")]
    for pod in (_pod(operator) for operator in _shard_operators(dag, params)):
        job = pod["spec"]["containers"][0]
        assert job["args"] == args
        assert {"name": "BULKJOB_DB", "value": DATABASE} in job["env"]


def test_a_work_table_without_the_deployers_database_is_refused():
    with pytest.raises(ValueError, match="BULKJOB_DB"):
        dag_module.shard_arguments(items="i", handler="h", manifest="m", run_id="r", shard_count=2, workers=2,
                                   work_table="bulk_work", database=None)


@pytest.mark.parametrize("name, ok", [("bulk_work", True), ("app.bulk_work", True), ("", True),
                                      ("bulk_work; DROP TABLE x", False), ("a.b.c", False), ("1t", False)])
def test_the_work_table_param_takes_a_table_name_only(dag, name, ok):
    param = dag.params.get_param("work_table")
    if ok:
        assert param.resolve(name) == name
    else:
        with pytest.raises(ParamValidationError):
            param.resolve(name)


def test_the_pod_monitor_selects_the_shard_pods(rendered_pods):
    selector = yaml.safe_load(PODMONITOR.read_text())["spec"]["selector"]["matchLabels"]
    for pod in rendered_pods:
        assert selector.items() <= pod["metadata"]["labels"].items()


def _job_endings():
    """job/exits.py's table as the main suite handed it over (BULKJOB_ENDINGS_FILE): code -> row."""
    path = os.environ.get("BULKJOB_ENDINGS_FILE")
    if not path:
        pytest.skip("job/exits.py's table was not handed over (BULKJOB_ENDINGS_FILE)")
    return {row["code"]: row for row in json.loads(Path(path).read_text())}


def test_the_dags_exit_codes_are_job_exits_table():
    endings = _job_endings()
    assert {code: (row["status"], row["meaning"], row["retry"]) for code, row in endings.items()} == \
        dag_module.EXIT_CODES
    assert {code for code, row in endings.items() if code != 0 and not row["retry"]} == dag_module.NOT_RETRIED


def _finished_pod(request, exit_code):
    """The pod `request` as the API server reports it once the job's container ended with `exit_code`.

    exit_code None: the container never started (an image that cannot be pulled, say).
    """
    if exit_code is None:
        state = k8s.V1ContainerState(waiting=k8s.V1ContainerStateWaiting(reason="ImagePullBackOff"))
    else:
        state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(
            exit_code=exit_code, reason="Completed" if exit_code == 0 else "Error"))
    sidecar = k8s.V1ContainerState(running=k8s.V1ContainerStateRunning())
    return k8s.V1Pod(
        metadata=request.metadata,
        spec=request.spec,
        status=k8s.V1PodStatus(
            phase="Succeeded" if exit_code == 0 else "Failed" if exit_code is not None else "Pending",
            container_statuses=[
                k8s.V1ContainerStatus(name="base", state=state, image=IMAGE, image_id="", ready=False,
                                      restart_count=0),
                k8s.V1ContainerStatus(name="airflow-xcom-sidecar", state=sidecar, image=IMAGE, image_id="",
                                      ready=True, restart_count=0),
            ]))


#: Exit codes beyond bulkjob's own: 137 (killed: out of memory, SIGKILL after the grace period).
KILLED = 137
#: The connection of the operators that talk to the loopback API server below.
STUB_CONN = "kubernetes_stub"


class _FinishedPods(BaseHTTPRequestHandler):
    """The few Kubernetes API calls the provider makes about a finished pod: read, patch, delete,
    list events. It serves the pods in PODS (name -> pod as JSON) and nothing else."""

    PODS: ClassVar[dict[str, dict]] = {}

    def _answer(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        # api/v1/namespaces/NS/pods/NAME or api/v1/namespaces/NS/events
        if parts[-1] == "events":
            body, code = {"kind": "EventList", "apiVersion": "v1", "items": []}, 200
        elif len(parts) == 6 and parts[4] == "pods" and parts[5] in self.PODS:
            body, code = self.PODS[parts[5]], 200
        else:
            body, code = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}, 404
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def kube_api():
    """A loopback API server for finished pods, and the connection STUB_CONN that points at it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FinishedPods)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    kube_config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "stub",
        "clusters": [{"name": "stub", "cluster": {"server": url}}],
        "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub", "namespace": "bulk"}}],
        "users": [{"name": "stub", "user": {"token": "not-a-secret"}}],
    }
    os.environ[f"AIRFLOW_CONN_{STUB_CONN.upper()}"] = json.dumps(
        {"conn_type": "kubernetes", "extra": {"namespace": "bulk", "kube_config": kube_config}})
    yield _FinishedPods.PODS
    server.shutdown()


@pytest.mark.parametrize("exit_code", [*sorted(dag_module.EXIT_CODES), KILLED, None])
def test_the_shards_exit_code_decides_whether_airflow_retries(dag, kube_api, exit_code):
    # The provider's own end of a pod (cleanup: it reads the pod, judges the base container,
    # pushes the summary, keeps or deletes the pod and raises), on the pod as the API server
    # reports it when bulkjob exited with `exit_code`.
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    operator = _shard_operators(dag)[0]
    operator.kubernetes_conn_id = STUB_CONN
    request = operator.build_pod_request_obj(dry_run=True)
    remote = _finished_pod(request, exit_code)
    kube_api[request.metadata.name] = ApiClient().sanitize_for_serialization(remote)

    if exit_code == 0:
        operator.cleanup(pod=request, remote_pod=remote)
        return
    with pytest.raises(AirflowException) as raised:
        operator.cleanup(pod=request, remote_pod=remote)
    not_retried = isinstance(raised.value, AirflowFailException)
    assert not_retried == (exit_code in (1, 2)), (exit_code, raised.value)
    assert operator.retries >= 3
    if not_retried:
        assert str(raised.value).startswith(f"bulkjob exited {exit_code} ({dag_module.EXIT_CODES[exit_code][1]})")
        # The provider's own message (the pod, its termination message) is kept.
        assert f"Pod {request.metadata.name} returned a failure" in str(raised.value)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_pods_are_valid_kubernetes(rendered_pods, version):
    for pod in rendered_pods:
        kubernetes_validate.validate(pod, version, strict=True)


def _summary(shard, *, total=100, failed=0, pending=0, exit_code=0, status="ok"):
    """A summary shaped as `bulkjob run` writes it to the XCom file."""
    return {
        "run_id": RUN_ID,
        "shard": shard,
        "shard_count": SHARD_COUNT,
        "total": total,
        "done": total - failed - pending,
        "failed": failed,
        "skipped_already_done": 0,
        "retries": 1,
        "attempts": total + 1,
        "pending": pending,
        "seconds": 12.5,
        "status": status,
        "exit_code": exit_code,
        "manifest": f"{PARAMS['manifest']}/{RUN_ID}/shard-{shard:05d}-of-{SHARD_COUNT:05d}/",
    }


def _job_summaries():
    """Summaries the real job wrote, when the main suite handed some over (BULKJOB_SUMMARIES_DIR)."""
    folder = os.environ.get("BULKJOB_SUMMARIES_DIR")
    if not folder:
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))}


def test_clean_shards_pass_and_their_counts_add_up():
    summaries = [_summary(i) for i in range(SHARD_COUNT)]

    assert dag_module.shard_problems(summaries, manifest=PARAMS["manifest"]) == []
    assert dag_module.totals(summaries)["done"] == 100 * SHARD_COUNT


def test_failures_within_tolerance_still_fail_the_dag_run():
    summaries = [_summary(0), _summary(1, failed=2, exit_code=0), _summary(2)]

    problems = dag_module.shard_problems(summaries, manifest=PARAMS["manifest"])

    assert problems == [
        "shard 1: exit code 0 (every item is done (failures within --max-failures)); 2 of 100 items failed, "
        f"listed by `bulkjob report --manifest {PARAMS['manifest']} --run-id {RUN_ID}`"
    ]


def test_each_unclean_shard_gets_one_readable_line():
    error = {"run_id": RUN_ID, "shard": 3, "status": "error", "exit_code": 2, "error": "line 7: bad JSON"}
    summaries = [
        _summary(0, failed=7, exit_code=1, status="failed"),
        None,
        _summary(2, pending=40, exit_code=3, status="interrupted"),
        error,
    ]

    problems = dag_module.shard_problems(summaries, manifest=PARAMS["manifest"])

    assert len(problems) == 4
    assert problems[0].startswith(
        "shard 0: exit code 1 (items failed for good beyond --max-failures, and nothing else; not retried); "
        "7 of 100 items failed")
    assert problems[1].startswith("shard 1: no summary")
    assert problems[2] == (
        "shard 2: exit code 3 (stopped by SIGTERM or SIGINT; progress saved); "
        "40 items not run yet (a rerun resumes them)"
    )
    assert problems[3] == (
        "shard 3: exit code 2 (bad usage, configuration or input; no item was run or charged; not retried): "
        "line 7: bad JSON")


def test_summaries_the_real_job_wrote_are_judged_by_their_exit_code():
    summaries = _job_summaries()
    if not summaries:
        pytest.skip("no summaries from the job were handed over (BULKJOB_SUMMARIES_DIR)")
    assert any(summary.get("work_table") for summary in summaries.values())
    for name, summary in summaries.items():
        table = summary.get("work_table") or ""
        problems = dag_module.shard_problems([summary], manifest=PARAMS["manifest"], work_table=table)
        clean = summary["exit_code"] == 0 and not summary.get("failed")
        assert (problems == []) == clean, (name, summary, problems)
        if not clean:
            assert f"exit code {summary['exit_code']} (" in problems[0]
        if table and summary.get("failed"):
            assert problems[0].startswith("runner 0: ") and f"`bulkjob report --work-table {table}`" in problems[0]


@pytest.fixture(scope="module")
def airflow_db():
    """A fresh SQLite metadata database with the DAG file in the dags folder, for dag.test()."""
    dags = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    dags.mkdir(parents=True, exist_ok=True)
    shutil.copy(DAG_FILE, dags / DAG_FILE.name)
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True, timeout=300)
    return dags / DAG_FILE.name


def test_dag_run_fails_with_a_readable_message_when_shards_leave_no_summary(airflow_db, capfd):
    # A real DAG run: the plan task runs, the mapped shard tasks are marked
    # successful without a pod (so they push no summary) and the check task
    # must fail the run, naming every shard.
    bag = _dagbag(airflow_db)
    dag = bag.dags[dag_module.DAG_ID]

    run = dag.test(run_conf={"shard_count": 2}, mark_success_pattern=f"^{dag_module.SHARD_TASK_ID}$")

    # The task runner logs the exception through structlog, to the process's output.
    out, err = capfd.readouterr()
    assert run.state == "failed"
    assert "2 of 2 shards did not finish cleanly" in out + err
    assert re.search(r"^shard 1: no summary", out + err, re.MULTILINE)
