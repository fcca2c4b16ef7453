"""Airflow DAG `bulk_controller`: one bulkjob run split into shards, one pod per shard.

Each shard is a KubernetesPodOperator task mapped over the shard indexes; all
of them share the DAG run's run id, so an Airflow retry of a shard resumes
its part of the manifest instead of starting over. A last task reads the
summaries the shards push as XCom and fails the DAG run, with one line per
shard, when any of them did not finish cleanly.

With the `work_table` param the items are a database work table instead
(`bulkjob run --work-table`): `shard_count` runners, identical pods that
claim rows from the whole table, with no shard index and no manifest (the
table is the record); more runners go faster. The database is the
deployer's (DB_ENV), as the image is.

bulkjob's exit code decides what Airflow does with a shard's task: 1 (items
failed) and 2 (bad usage, configuration or input) fail it at once, since a
retry would end the same way; 3, 4, 5 and 70 are retried (EXIT_CODES).

Before the first run (docs/operations.md, Airflow):
  * `kubectl apply -k k8s/base` in the pods' namespace (the ServiceAccount);
  * a Kubernetes Secret `bulkjob` with the keys aws-access-key-id,
    aws-secret-access-key and db-password (k8s/secret.example.yaml);
  * an Airflow pool `oracle_dml` whose size is the number of shards allowed to
    run at once across all DAG runs; each shard opens at most `workers`
    database sessions, so the pool caps sessions at size x workers:
    `airflow pools set oracle_dml 4 "bulkjob shards"`;
  * the image in BULKJOB_IMAGE, in the environment of the DAG processor and
    the workers (see IMAGE_ENV): the image is the deployer's choice, never a
    trigger-time param, since the pods get the database password and S3 keys;
  * likewise the database, for `sql:` handlers and work tables: its `--db`
    URL, without the password, in BULKJOB_DB (see DB_ENV).

Works with Airflow 3 (airflow.sdk) and the cncf.kubernetes provider 10.25, and
with Airflow 2.10 and the provider 10.10 (see SIDECAR_SECURITY for a limit).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

try:
    from airflow.sdk import DAG, Param, task
except ImportError:  # Airflow 2.10
    from airflow import DAG
    from airflow.decorators import task
    from airflow.models.param import Param

try:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 2.10 and 3.0
    from airflow.exceptions import AirflowException, AirflowFailException

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.secret import Secret
from airflow.providers.cncf.kubernetes.utils.xcom_sidecar import PodDefaults
from kubernetes.client import models as k8s

DAG_ID = "bulk_controller"
SHARD_TASK_ID = "run_shard"

#: Caps the shards that run at once across all DAG runs, and so the database
#: sessions they open (pool size x workers).
POOL = "oracle_dml"
#: Must exist in the pod's namespace; see k8s/secret.example.yaml.
SECRET_NAME = "bulkjob"
#: The UID (and GID) the cluster runs these pods as.
RUN_AS = 1002
METRICS_PORT = 8799
#: The job stops dispatching on SIGTERM and waits this long for running items
#: before it flushes the manifest and exits 3 ...
DRAIN_TIMEOUT_SECONDS = 45
#: ... which must happen before the kubelet's SIGKILL.
TERMINATION_GRACE_SECONDS = 60
#: Written by the job (also when items failed); read by the provider's sidecar.
XCOM_PATH = "/airflow/xcom/return.json"
#: `bulkjob run`'s exit codes: code -> (the summary's status, what it means, whether a retry
#: can help). A copy of job/exits.py, which a DAGs folder without bulkjob cannot import; a
#: test keeps the two equal. A code that is not worth retrying fails the task at once.
EXIT_CODES: dict[int, tuple[str, str, bool]] = {
    0: ("ok", "every item is done (failures within --max-failures)", False),
    1: ("failed", "items failed for good beyond --max-failures, and nothing else", False),
    2: ("error", "bad usage, configuration or input; no item was run or charged", False),
    3: ("interrupted", "stopped by SIGTERM or SIGINT; progress saved", True),
    4: ("lease_lost", "another runner holds this shard's lease, or took it over", True),
    5: ("unavailable", "the database or the store stayed unreachable past --outage-timeout; progress saved", True),
    70: ("internal_error", "a bug in bulkjob; progress saved where it could be", True),
}
#: The codes that fail a shard's task without retries.
NOT_RETRIED = frozenset(code for code, (_, _, retry) in EXIT_CODES.items() if code != 0 and not retry)
#: The environment variable, read when the DAG file is parsed, that names the image. Only the
#: deployer sets it (in the DAG processor's and the workers' environment, the same value):
#: whoever can trigger the DAG cannot choose what runs with the Secret's credentials.
IMAGE_ENV = "BULKJOB_IMAGE"
#: The image when IMAGE_ENV is not set.
DEFAULT_IMAGE = "registry.example.com/bulkjob:0.1.0"
#: The environment variable, read when the DAG file is parsed, that holds the database's `--db`
#: URL (no password: that is the Secret's db-password). The deployer's too: the pods get the
#: database password, so whoever triggers the DAG must not choose the server it is sent to.
#: The pods get it under the same name, which is bulkjob's own variable for `--db`.
DB_ENV = "BULKJOB_DB"

# Pod Security Standards "restricted", the same as k8s/job/job.yaml.
POD_SECURITY_CONTEXT = k8s.V1PodSecurityContext(
    run_as_non_root=True,
    run_as_user=RUN_AS,
    run_as_group=RUN_AS,
    fs_group=RUN_AS,
    seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
)
CONTAINER_SECURITY_CONTEXT = k8s.V1SecurityContext(
    allow_privilege_escalation=False,
    read_only_root_filesystem=True,
    run_as_non_root=True,
    capabilities=k8s.V1Capabilities(drop=["ALL"]),
)
# Requests equal to limits: the Guaranteed QoS class. The job sizes its
# worker pool from the CPU limit unless `workers` says otherwise.
CONTAINER_RESOURCES = k8s.V1ResourceRequirements(
    requests={"cpu": "2", "memory": "2Gi", "ephemeral-storage": "1Gi"},
    limits={"cpu": "2", "memory": "2Gi", "ephemeral-storage": "1Gi"},
)
# The root filesystem is read-only: everything the job writes outside the
# manifest goes to /tmp.
TMP_VOLUME = k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="1Gi"))
TMP_MOUNT = k8s.V1VolumeMount(name="tmp", mount_path="/tmp")
# The XCom sidecar: unless the kubernetes connection names its own
# (xcom_sidecar_container_image and xcom_sidecar_container_resources in its
# extra), it runs the job's image, already on the node (rather than alpine
# from Docker Hub), with requests equal to limits, so that the pod is
# Guaranteed like its job container. It runs `sh` and `sleep` and reads the
# summary file: a few MiB. Its CPU limit is no concern: it sleeps.
SIDECAR_RESOURCES = k8s.V1ResourceRequirements(
    requests={"cpu": "10m", "memory": "32Mi"},
    limits={"cpu": "10m", "memory": "32Mi"},
)
# The XCom sidecar must pass the same admission policy. Older providers
# (10.10, the newest that Airflow 2.10 installs, among them) cannot set its
# security context: there the sidecar runs without one, which a namespace
# enforcing "restricted" rejects; use "baseline" there, or a newer Airflow.
SIDECAR_SECURITY = (
    {"xcom_sidecar_container_security_context": CONTAINER_SECURITY_CONTEXT}
    if "xcom_sidecar_container_security_context" in inspect.signature(KubernetesPodOperator.__init__).parameters
    else {}
)
SECRETS = [
    Secret("env", "AWS_ACCESS_KEY_ID", SECRET_NAME, "aws-access-key-id"),
    Secret("env", "AWS_SECRET_ACCESS_KEY", SECRET_NAME, "aws-secret-access-key"),
    Secret("env", "BULKJOB_DB_PASSWORD", SECRET_NAME, "db-password"),
]


def deployed_image(environ: Mapping[str, str]) -> str:
    """The image the shard pods run: IMAGE_ENV from the environment, else DEFAULT_IMAGE.

    Raises ValueError when IMAGE_ENV is set but blank or holds whitespace.
    """
    image = environ.get(IMAGE_ENV, DEFAULT_IMAGE)
    if not image or image != image.strip() or any(c.isspace() for c in image):
        raise ValueError(f"{IMAGE_ENV} must name an image, not {image!r}")
    return image


def deployed_database(environ: Mapping[str, str]) -> str | None:
    """The database's `--db` URL from DB_ENV, or None when the deployer set none.

    Raises ValueError when it is blank, holds whitespace, or carries a password.
    """
    url = environ.get(DB_ENV)
    if url is None:
        return None
    authority = url.split("://", 1)[-1].split("/", 1)[0]
    userinfo = authority.rsplit("@", 1)[0] if "@" in authority else ""
    keys = {part.split("=", 1)[0].strip() for part in url.partition("?")[2].lower().split("&")}
    if ":" in userinfo or keys & {"password", "passwd", "pwd", "wallet_password"}:
        raise ValueError(f"{DB_ENV} must not hold the password: it comes from the Secret {SECRET_NAME!r}")
    if not url or url != url.strip() or any(c.isspace() for c in url):
        raise ValueError(f"{DB_ENV} must be a --db URL, without blanks: {url!r}")
    return url


def base_container_exit_code(pod: k8s.V1Pod | None, container_name: str) -> int | None:
    """The exit code of the pod's `container_name`, or None when it has not terminated."""
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    for status in statuses:
        if status.name == container_name and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None


class ShardPodOperator(KubernetesPodOperator):
    """The KubernetesPodOperator of one shard, with bulkjob's exit codes and a Guaranteed pod.

    * A shard whose job exits with a code in NOT_RETRIED fails its task without retries
      (AirflowFailException, which Airflow never retries and never hands to a retry policy);
      any other failure, exit 137 and a pod that never ran included, is the provider's own
      AirflowException, retried up to `retries` times.
    * The XCom sidecar gets the job's image and SIDECAR_RESOURCES unless the connection sets
      its own (the provider's `xcom_sidecar_container_image` / `_resources` extras).
    """

    def cleanup(self, pod: k8s.V1Pod, remote_pod: k8s.V1Pod, *args: Any, **kwargs: Any) -> None:
        # The provider decides "failed" here, from the base container's status, after it
        # pushed the summary as XCom; its skip_on_exit_code works the same way.
        try:
            super().cleanup(pod, remote_pod, *args, **kwargs)
        except AirflowFailException:
            raise
        except AirflowException as e:
            code = base_container_exit_code(remote_pod, self.base_container_name)
            if code not in NOT_RETRIED:
                raise
            raise AirflowFailException(
                f"bulkjob exited {code} ({EXIT_CODES[code][1]}): not retried, a retry would end the same "
                f"way. {e}"
            ) from e

    def build_pod_request_obj(self, *args: Any, **kwargs: Any) -> k8s.V1Pod:
        pod = super().build_pod_request_obj(*args, **kwargs)
        for c in pod.spec.containers:
            if c.name != PodDefaults.SIDECAR_CONTAINER_NAME:
                continue
            if not self.hook.get_xcom_sidecar_container_image():
                c.image = self.image
            if not self.hook.get_xcom_sidecar_container_resources():
                c.resources = SIDECAR_RESOURCES
        return pod


def shard_arguments(
    *,
    items: str,
    handler: str,
    manifest: str,
    run_id: str,
    shard_count: int,
    workers: int,
    work_table: str = "",
    database: str | None = None,
) -> list[list[str]]:
    """The `bulkjob run` arguments of each shard, index 0 first; with `work_table`, of each of
    `shard_count` runners of that table (`items` and `manifest` are then not used).

    Raises ValueError when shard_count or workers is below 1, or when a work table is asked
    for and the deployer named no database (`database`, from DB_ENV).
    """
    if shard_count < 1:
        raise ValueError(f"shard_count must be at least 1, not {shard_count}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    common = [
        "run",
        f"--handler={handler}",
        f"--run-id={run_id}",
        f"--workers={workers}",
        f"--drain-timeout={DRAIN_TIMEOUT_SECONDS}",
        f"--metrics-port={METRICS_PORT}",
        f"--xcom-path={XCOM_PATH}",
        "--log-format=json",
    ]
    if work_table:
        if database is None:
            raise ValueError(f"work_table {work_table!r} needs the database: the deployer sets {DB_ENV}")
        return [[*common, f"--work-table={work_table}"] for _ in range(shard_count)]
    common += [f"--items={items}", f"--manifest={manifest}", f"--shard-count={shard_count}"]
    return [[*common, f"--shard-index={index}"] for index in range(shard_count)]


def shard_problems(
    summaries: Sequence[Mapping[str, Any] | None], *, manifest: str, work_table: str = ""
) -> list[str]:
    """One readable line per shard (per runner of `work_table`) that did not finish cleanly;
    empty when all did.

    summaries[i] is what shard i pushed as XCom: the job's JSON summary, which
    it writes whatever its exit code (the provider pushes it on failure too),
    or None when there is none: the pod never started, or was killed before
    the job could write it (OOM, SIGKILL after the grace period). A shard is
    clean when its exit code is 0 and no item failed, even within
    --max-failures: a DAG run that lost items should not look green.
    manifest is the run's --manifest, for the command that lists failed items.
    """
    problems = []
    what = "runner" if work_table else "shard"
    for index, summary in enumerate(summaries):
        if summary is None:
            problems.append(
                f"{what} {index}: no summary; the pod did not start or was killed before the job "
                "could write one (see the task log and the pod's events)"
            )
            continue
        code = summary.get("exit_code")
        failed = summary.get("failed", 0)
        if code == 0 and not failed:
            continue
        meaning = EXIT_CODES[code][1] if code in EXIT_CODES else "unexpected exit code"
        line = f"{what} {index}: exit code {code} ({meaning}"
        line += "; not retried)" if code in NOT_RETRIED else ")"
        if summary.get("error"):
            line += f": {summary['error']}"
        if failed and work_table:
            line += f"; {failed} of the {summary.get('total', '?')} rows it ran failed (state ERR), listed by "
            line += f"`bulkjob report --work-table {work_table}`"
        elif failed:
            line += (
                f"; {failed} of {summary.get('total', '?')} items failed, listed by "
                f"`bulkjob report --manifest {manifest} --run-id {summary.get('run_id', '...')}`"
            )
        if summary.get("pending"):
            line += f"; {summary['pending']} items not run yet (a rerun resumes them)"
        problems.append(line)
    return problems


def totals(summaries: Sequence[Mapping[str, Any] | None]) -> dict[str, int]:
    """The item counts of all shards that reported, added up."""
    keys = ("total", "done", "failed", "pending", "retries")
    return {key: sum(int(s.get(key, 0)) for s in summaries if s is not None) for key in keys}


#: The deployer's database, read once when the file is parsed.
DATABASE = deployed_database(os.environ)

with DAG(
    dag_id=DAG_ID,
    description="Run a bulkjob over the items, one Kubernetes pod per shard",
    schedule=None,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    tags=["bulkjob"],
    params={
        "items": Param(
            "s3://bulkjob-input/items.jsonl",
            type="string",
            description="JSONL of items: s3://bucket/key or a path inside the image",
        ),
        "handler": Param("job.examples:noop", type="string", description="MODULE:FUNC or sql:PATH"),
        "manifest": Param(
            "s3://bulkjob-state/runs", type="string", description="Where the progress manifest lives"
        ),
        "shard_count": Param(4, type="integer", minimum=1, maximum=64, description="Pods to split the items over"),
        "workers": Param(2, type="integer", minimum=1, maximum=64, description="Worker processes per pod"),
        "work_table": Param(
            "",
            type="string",
            pattern=r"^$|^[A-Za-z_][A-Za-z0-9_$#]*(\.[A-Za-z_][A-Za-z0-9_$#]*)?$",
            description="A work table to claim rows from instead of items: shard_count runners share it "
            "(needs the deployer's database, BULKJOB_DB)",
        ),
    },
) as dag:

    # Not named run_id: TaskFlow treats parameters named after context keys
    # as optional, which Airflow 2 rejects before a required one.
    @task
    def plan_shards(
        items: str, handler: str, manifest: str, job_run_id: str, shard_count: int, workers: int, work_table: str
    ) -> list[list[str]]:
        try:
            return shard_arguments(
                items=items,
                handler=handler,
                manifest=manifest,
                run_id=job_run_id,
                shard_count=int(shard_count),
                workers=int(workers),
                work_table=work_table,
                database=DATABASE,
            )
        except ValueError as e:  # a retry would end the same way
            raise AirflowFailException(str(e)) from e

    # The run id is the DAG run's: every retry of a shard resumes the same
    # manifest, and a new DAG run starts a new one.
    shard_args = plan_shards(
        items="{{ params['items'] }}",
        handler="{{ params.handler }}",
        manifest="{{ params.manifest }}",
        job_run_id="{{ run_id }}",
        shard_count="{{ params.shard_count }}",
        workers="{{ params.workers }}",
        work_table="{{ params.work_table }}",
    )

    shards = ShardPodOperator.partial(
        task_id=SHARD_TASK_ID,
        name="bulkjob",
        image=deployed_image(os.environ),
        labels={"app.kubernetes.io/name": "bulkjob", "app.kubernetes.io/component": "worker"},
        ports=[k8s.V1ContainerPort(name="metrics", container_port=METRICS_PORT)],
        env_vars={"AWS_DEFAULT_REGION": "eu-west-1", **({DB_ENV: DATABASE} if DATABASE else {})},
        secrets=SECRETS,
        container_resources=CONTAINER_RESOURCES,
        security_context=POD_SECURITY_CONTEXT,
        container_security_context=CONTAINER_SECURITY_CONTEXT,
        **SIDECAR_SECURITY,
        volumes=[TMP_VOLUME],
        volume_mounts=[TMP_MOUNT],
        service_account_name="bulkjob",
        automount_service_account_token=False,
        termination_grace_period=TERMINATION_GRACE_SECONDS,
        do_xcom_push=True,
        get_logs=True,
        # The end of a failed pod's log (the job's JSON summary is its last
        # line) becomes its termination message, which the task's error shows.
        termination_message_policy="FallbackToLogsOnError",
        startup_timeout_seconds=600,
        # Keep a failed pod for its logs and events; a succeeded one is noise.
        on_finish_action="delete_succeeded_pod",
        pool=POOL,
        # For exits 3, 4, 5 and 70, and pods that died or never started
        # (exit 1 and 2 are not retried: ShardPodOperator). A retry resumes
        # the manifest; the backoff spaces out retries that meet an outage.
        retries=3,
        retry_delay=timedelta(minutes=1),
        retry_exponential_backoff=True,
        max_retry_delay=timedelta(minutes=30),
        # On timeout Airflow deletes the pod: SIGTERM, drain, exit 3.
        execution_timeout=timedelta(hours=6),
    ).expand(arguments=shard_args)

    @task(trigger_rule="all_done", retries=0)
    def check_shards(**context: Any) -> dict[str, int]:
        """Fail the DAG run when any shard has failed items or exited non-zero."""
        shard_count = int(context["params"]["shard_count"])
        ti = context["ti"]
        summaries = [ti.xcom_pull(task_ids=SHARD_TASK_ID, map_indexes=i) for i in range(shard_count)]
        work_table = context["params"].get("work_table") or ""
        problems = shard_problems(summaries, manifest=context["params"]["manifest"], work_table=work_table)
        if problems:
            what = f"runners of work table {work_table}" if work_table else "shards"
            raise AirflowFailException(
                f"{len(problems)} of {shard_count} {what} did not finish cleanly:\n" + "\n".join(problems)
            )
        return totals(summaries)

    shards >> check_shards()
