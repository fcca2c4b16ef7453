"""The container image, built by `make image` and run the way Kubernetes runs it.

What the build leaves (no dangling image, the locked dependencies, the license,
a base with bookworm-security); then UID 1002 in group 0, a read-only root
filesystem with a tmpfs /tmp, memory and CPU limits, against the S3 test server
on the host: a full run, then a run stopped by SIGTERM to the container (tini
forwards it) and finished by a second container with the same run id.
"""

import hashlib
import json
import re
import shutil
import subprocess
import time
import urllib.request
import uuid

import pytest
from conftest import ROOT, free_port, need, run_bulkjob, status_of
from packaging.utils import canonicalize_name
from test_image_lock import locked

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

IMAGE = "bulkjob:dev"
#: What mk/deploy.mk builds the image on unless BASE_IMAGE says otherwise.
LOCAL_BASE = "localhost/bulkjob-base:bookworm"
BASE_SCRIPT = ROOT / "scripts" / "base-image.sh"
#: What a locked-down CI host allows: runc (crun cannot set up cgroups
#: there), explicit ulimits (the defaults are refused) and the host's network
#: (no container network; the S3 server listens on the host's loopback).
PODMAN = ["podman", "--runtime", "runc"]
CI_HOST = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096", "--network", "host"]
#: What a pod of k8s/job/job.yaml gets, scaled down: UID 1002, read-only root, /tmp writable, limits.
AS_IN_KUBERNETES = ["--user", "1002:0", "--read-only", "--tmpfs", "/tmp", "--memory", "512m", "--cpus", "1"]


@pytest.fixture(scope="module")
def image():
    need(shutil.which("podman") is not None, "podman is not installed (make image installs it as root)")
    proc = subprocess.run(["make", "image"], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    need(proc.returncode == 0, f"`make image` failed:\n{tail}")
    print(proc.stdout.splitlines()[-1])  # "bulkjob:dev: N bytes"
    return IMAGE


def podman_sh(image, script, *, user="1002:0"):
    """Run `sh -c script` in the image; its stdout."""
    proc = subprocess.run([*PODMAN, "run", "--rm", *CI_HOST, "--user", user, "--entrypoint", "sh", image, "-c",
                           script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def podman_run(image, name, s3_server, *args, metrics_port=0, detach=False):
    """`podman run` of the image with bulkjob `args`; returns the finished (or, detached, started) process."""
    env = [f"--env={key}={value}" for key, value in s3_server.env.items()]
    cmd = [*PODMAN, "run", "--rm", "--name", name, *CI_HOST, *AS_IN_KUBERNETES, *env, image,
           *args, f"--metrics-port={metrics_port}"]
    if detach:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def summary(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, "no JSON summary on stdout"
    return json.loads(lines[-1])


def upload_items(s3_server, bucket, count, payload) -> str:
    body = "".join(json.dumps({"id": f"item-{n:05d}", "payload": payload}) + "\n" for n in range(count))
    s3_server.client().put_object(Bucket=bucket, Key="items.jsonl", Body=body.encode())
    return f"s3://{bucket}/items.jsonl"


@pytest.fixture
def container_name():
    name = f"bulkjob-test-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["podman", "rm", "--force", "--ignore", name], capture_output=True, timeout=60)


def test_image_runs_tini_then_bulkjob_as_uid_1002(image):
    proc = subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True, check=True)
    (info,) = json.loads(proc.stdout)
    config = info["Config"]
    assert config["User"] == "1002:0"
    assert config["Entrypoint"] == ["tini", "--", "bulkjob"]
    assert {"PYTHONUNBUFFERED=1", "TMPDIR=/tmp"} <= set(config["Env"])
    assert config["Labels"]["org.opencontainers.image.title"] == "bulkjob"
    assert config["Labels"]["org.opencontainers.image.version"]


def test_make_image_leaves_no_dangling_image(image):
    # The build stage's images, and an older bulkjob:dev or base that the build untagged,
    # all carry io.bulkjob.stage; `make image` must leave none of them untagged.
    proc = subprocess.run(["podman", "images", "--filter", "dangling=true", "--filter", "label=io.bulkjob.stage",
                           "--format", "{{.ID}} {{.Labels}}"], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""
    # The final image is tagged and labelled like the others: the filter would see it.
    proc = subprocess.run(["podman", "images", "--filter", "label=io.bulkjob.stage=image", "--format",
                           "{{.Repository}}:{{.Tag}}"], capture_output=True, text=True, check=True)
    assert f"localhost/{image}" in proc.stdout.split()


def test_image_holds_exactly_the_locked_dependencies(image):
    listing = podman_sh(image, "python3 -c 'import importlib.metadata as m\n"
                               "for d in m.distributions(): print(d.metadata[\"Name\"], d.version)'")
    installed = {canonicalize_name(name): version for name, version in (line.split() for line in listing.splitlines())}
    expected = {name: version for name, (version, _) in locked().items()}
    # The build backend and pip are removed once the job is installed: nothing installs at run time.
    expected.pop("setuptools")
    assert installed.pop("bulkjob") == (ROOT / "pyproject.toml").read_text().split('version = "')[1].split('"')[0]
    assert installed == expected


def test_image_carries_the_license_its_label_names(image):
    proc = subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True, check=True)
    (info,) = json.loads(proc.stdout)
    assert info["Config"]["Labels"]["org.opencontainers.image.licenses"] == "Apache-2.0"
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text  # the full text, not a notice
    assert podman_sh(image, "cat /usr/share/doc/bulkjob/LICENSE") == license_text


def test_local_base_has_the_security_archive_and_the_recipe_stamp(image):
    proc = subprocess.run(["podman", "image", "inspect", image, "--format",
                           '{{index .Labels "org.opencontainers.image.base.name"}}'],
                          capture_output=True, text=True, check=True)
    if proc.stdout.strip() != LOCAL_BASE:
        pytest.skip(f"the image was built on {proc.stdout.strip()}, not the debootstrap base")
    sources = podman_sh(LOCAL_BASE, "cat /etc/apt/sources.list", user="0")
    assert re.search(r"^deb \S+debian-security bookworm-security main$", sources, re.MULTILINE), sources
    assert re.search(r"^deb \S+ bookworm-updates main$", sources, re.MULTILINE), sources
    # The stamp: the script's hash, which `make image` compares to rebuild the base when the
    # script or its package list changes.
    recipe = hashlib.sha256(BASE_SCRIPT.read_bytes()).hexdigest()[:16]
    proc = subprocess.run(["podman", "image", "inspect", LOCAL_BASE, "--format",
                           '{{index .Labels "io.bulkjob.base.recipe"}}'], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == recipe
    proc = subprocess.run([str(BASE_SCRIPT), LOCAL_BASE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "is up to date" in proc.stdout, proc.stdout + proc.stderr


#: What the Airflow provider (cncf.kubernetes 10.25, mk/airflow-requirements.txt) runs in its XCom
#: sidecar, which airflow_dag.py runs on this image: the sidecar's command, then, through exec,
#: the read of the summary and the stop (pgrep first, which this image lacks, then the fallback).
XCOM_SIDECAR_COMMAND = 'trap "exit 0" INT; while true; do sleep 1; done;'
XCOM_READ = ("if [ -s /airflow/xcom/return.json ]; then cat /airflow/xcom/return.json; "
             "else echo __airflow_xcom_result_empty__; fi")
XCOM_KILL = "kill -2 $(pgrep -u $(id -u) -f 'sh')"
XCOM_KILL_FALLBACK = ('for f in /proc/[0-9]*/comm; do '
                      '[ -O $f ] && read c < $f && [ "$c" = "sh" ] && pid=${f%/comm} && kill -2 ${pid##*/}; done')


def test_image_serves_as_the_airflow_xcom_sidecar(image, container_name):
    start = subprocess.run([*PODMAN, "run", "--detach", "--name", container_name, *CI_HOST, *AS_IN_KUBERNETES,
                            "--tmpfs", "/airflow/xcom:mode=1777", "--entrypoint", "sh", image, "-c",
                            XCOM_SIDECAR_COMMAND], capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr
    summary_line = '{"run_id": "r", "exit_code": 0}'

    def exec_sh(script, **kwargs):
        return subprocess.run([*PODMAN, "exec", "-i", container_name, "/bin/sh"], input=script + "\n",
                              capture_output=True, text=True, timeout=60, **kwargs)

    assert exec_sh(XCOM_READ).stdout.strip() == "__airflow_xcom_result_empty__"
    exec_sh(f"echo '{summary_line}' > /airflow/xcom/return.json")
    assert exec_sh(XCOM_READ).stdout.strip() == summary_line
    # The provider runs the fallback when the first command writes to stderr.
    assert exec_sh(XCOM_KILL).stderr
    exec_sh(XCOM_KILL_FALLBACK)
    waited = subprocess.run([*PODMAN, "wait", container_name], capture_output=True, text=True, timeout=60)
    assert waited.stdout.strip() == "0", waited.stdout + waited.stderr


def test_root_filesystem_stays_read_only_and_tmp_writable(image, container_name):
    script = "id -u; id -g; touch /opt/venv/x 2>/dev/null && echo root-writable; touch /tmp/x && echo tmp-ok"
    proc = subprocess.run([*PODMAN, "run", "--rm", "--name", container_name, *CI_HOST, *AS_IN_KUBERNETES,
                           "--entrypoint", "sh", image, "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["1002", "0", "tmp-ok"], proc.stderr
    # No Oracle Client libraries: oracledb runs in thin mode.
    proc = subprocess.run([*PODMAN, "run", "--rm", *CI_HOST, "--user", "0", "--entrypoint", "sh", image, "-c",
                           "find / -xdev \\( -name 'libclntsh*' -o -name 'libocci*' \\) -print"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout


def test_container_processes_items_from_s3_and_leaves_a_complete_manifest(image, s3_server, s3_bucket,
                                                                         container_name):
    items = upload_items(s3_server, s3_bucket, 300, {})
    manifest = f"s3://{s3_bucket}/state"

    proc = podman_run(image, container_name, s3_server, "run", f"--items={items}",
                      "--handler=job.examples:noop", f"--manifest={manifest}", "--run-id=quick")

    assert proc.returncode == 0, proc.stderr[-3000:]
    result = summary(proc.stdout)
    assert (result["exit_code"], result["total"], result["done"], result["failed"]) == (0, 300, 300, 0)
    status = status_of(manifest, "quick", env=s3_server.env)
    assert (status["total"], status["done"], status["failed"], status["pending"]) == (300, 300, 0, 0)


def _wait_for_progress(manifest, run_id, env, *, at_least, timeout=120.0) -> None:
    """Poll `bulkjob status` on the host until the manifest counts `at_least` done items."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Non-zero until the first checkpoint creates the manifest.
        proc = run_bulkjob("status", "--manifest", manifest, "--run-id", run_id, "--json", env=env)
        if proc.returncode == 0 and json.loads(proc.stdout)["done"] >= at_least:
            return
        time.sleep(0.3)
    raise TimeoutError(f"run {run_id} did not reach {at_least} done items in {timeout} s")


def test_sigterm_flushes_the_manifest_and_a_second_container_finishes_the_run(image, s3_server, s3_bucket,
                                                                             container_name):
    count = 400  # 0.05 s each on one CPU: about 20 s, so SIGTERM lands mid-run
    items = upload_items(s3_server, s3_bucket, count, {"seconds": 0.05})
    manifest = f"s3://{s3_bucket}/state"
    run = ["run", f"--items={items}", "--handler=job.examples:sleep", f"--manifest={manifest}",
           "--run-id=resumed", "--checkpoint-interval=0.5"]
    metrics_port = free_port()

    first = podman_run(image, container_name, s3_server, *run, metrics_port=metrics_port, detach=True)
    try:
        _wait_for_progress(manifest, "resumed", s3_server.env, at_least=20)
        # Metrics work on a read-only root: the multiprocess files live in /tmp.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            assert response.status == 200
            assert b"bulkjob_" in response.read()
        subprocess.run(["podman", "kill", "--signal", "TERM", container_name], check=True, timeout=60)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 3, err[-3000:]
    stopped = summary(out)
    assert stopped["exit_code"] == 3
    assert 0 < stopped["done"] < count
    # Flushed: the manifest holds every item the summary counts as done.
    status = status_of(manifest, "resumed", env=s3_server.env)
    assert status["done"] == stopped["done"]
    assert status["pending"] == count - stopped["done"]

    second = podman_run(image, container_name, s3_server, *run)

    assert second.returncode == 0, second.stderr[-3000:]
    finished = summary(second.stdout)
    assert finished["skipped_already_done"] == stopped["done"]
    status = status_of(manifest, "resumed", env=s3_server.env)
    assert (status["total"], status["done"], status["failed"], status["pending"]) == (count, count, 0, 0)
