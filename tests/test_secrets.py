"""Secrets stay out of everything a run writes: a run whose handler tries hard to leak them,
then every output searched for the secret values."""

from __future__ import annotations

import gzip
import json
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import free_port, run_bulkjob, start_bulkjob, write_items
from promservers import Pushgateway, descendants, wait_for_metrics

from job.outcome import Outcome
from job.redact import REDACTED, field_values, scrub, scrub_outcome, scrub_text, secrets_of

DB_PASSWORD = "db-pass-Wq7Zk2"
S3_SECRET = "s3-secret-Hc5Rt9"
TOKEN = "tok-Secret-Mv3Lp8"


@pytest.mark.parametrize("payload, fields, secrets", [
    ({"token": "abcd1234", "other": "visible"}, ["token"], ("abcd1234",)),
    ({"a": {"token": ["xyz12345", {"k": 98765}]}, "token2": "nope"}, ["token"], ("xyz12345", "98765")),
    ({"list": [{"password": "hunter22"}]}, ["password"], ("hunter22",)),
    ({"token": "abc"}, ["token"], ()),  # too short to be worth redacting
    ({"token": "abcd1234"}, [], ()),
])
def test_field_values_finds_the_named_fields_at_any_depth(payload, fields, secrets):
    assert set(field_values(payload, fields)) == set(secrets)


def test_scrub_replaces_secrets_in_strings_keys_and_numbers():
    secrets = secrets_of(["pass", "password1", 123456])
    assert secrets[0] == "password1"  # the longer first, so it is replaced whole
    assert scrub_text("x password1 pass", secrets) == f"x {REDACTED} {REDACTED}"
    assert scrub({"password1": [123456, "a pass"], "n": 7}, secrets) == {REDACTED: [REDACTED, f"a {REDACTED}"],
                                                                         "n": 7}


def _texts_of_manifest(s3_server, bucket: str) -> list[str]:
    client = s3_server.client()
    texts = []
    for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        data = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        texts.append(obj["Key"] + "\n" + data.decode("utf-8", "replace"))
    return texts


@pytest.mark.parametrize("result, secrets", [
    ({"steps": 1, "rows": 1}, ("hunter2",)),
    ({"steps": 1, "rows": 1}, ("1",)),                       # a number equal to a secret
    ({"rows": 12}, ("1",)),                                  # only part of a number: kept
    ({"note": "pw is hunter2"}, ("hunter2",)),
    ({"hunter2": 1}, ("hunter2",)),                          # a key
    ({"a": ["x", ("hunter2",)]}, ("hunter2",)),              # inside a tuple
    ({"a": "pässwört"}, ("pässwört",)),                      # JSON would escape it as ASCII
    ({"a": 'say "hi"'}, ('"hi"',)),                          # a secret JSON writes escaped
    ({"a": "tab\there"}, ("\th",)),
    ({"a": float("nan")}, ("nan",)),                         # str() and JSON spell NaN apart
    ({"a": 1.5e16}, ("1.5e+16",)),
    ({"a": True, "b": None}, ("True",)),                     # booleans are never secrets
    ({"a": {1: "x"}}, ("1",)),                               # a key JSON writes as a string
    ({"a": object()}, ("x",)),                               # not JSON: the slow way
])
def test_scrub_outcome_of_a_result_equals_scrub(result, secrets):
    """The shortcut for results that hold no secret (one JSON pass instead of a walk) never
    keeps what the walk would scrub."""
    scrubbed = scrub_outcome(Outcome("item-1", 1, 0.1, result=result), secrets)
    assert repr(scrubbed.result) == repr(scrub(result, secrets))


def test_no_secret_reaches_any_output_of_a_run(tmp_path, s3_server, s3_bucket):
    env = {**s3_server.env, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "BULKJOB_DB_PASSWORD": DB_PASSWORD,
           "TMPDIR": str(tmp_path)}
    release = tmp_path / "release"
    items = [{"id": f"ok-{n}", "payload": {"leak": True, "token": TOKEN, "log_lines": 1}} for n in range(3)]
    items += [{"id": f"bad-{n}", "payload": {"leak": True, "fail": True, "token": TOKEN}} for n in range(2)]
    items += [{"id": "last", "payload": {"wait_for": str(release), "token": TOKEN}}]
    write_items(tmp_path / "items.jsonl", items)
    pushgateway = Pushgateway(tmp_path / "pg")
    port = free_port()
    manifest = f"s3://{s3_bucket}/runs"
    log_file = tmp_path / "job.log"
    xcom = tmp_path / "xcom.json"
    proc = start_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "obs_handler:handle",
                         "--manifest", manifest, "--run-id", "secrets", "--workers", "2", "--redact", "token",
                         "--max-failures", "5", "--checkpoint-interval", "0.2", "--metrics-port", str(port),
                         "--pushgateway", pushgateway.url, "--log-file", str(log_file), "--xcom-path", str(xcom),
                         env=env)
    outputs: dict[str, str] = {}
    try:
        wait_for_metrics(port, proc)
        deadline = time.monotonic() + 60
        while True:
            metrics = wait_for_metrics(port, proc)
            if 'bulkjob_items_pending 1.0' in metrics and "bulkjob_items_in_flight 1.0" in metrics:
                break
            assert time.monotonic() < deadline, metrics
            time.sleep(0.1)
        outputs["/metrics"] = metrics
        pids = [proc.pid, *descendants(proc.pid)]
        assert len(pids) >= 4  # the parent, the forkserver, two workers
        for pid in pids:
            try:
                outputs[f"/proc/{pid}/cmdline"] = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
            except FileNotFoundError:
                pass
        release.touch()
        outputs["stdout"], outputs["stderr"] = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        pushgateway_text = None
        try:
            from promservers import _get

            pushgateway_text = _get(pushgateway.url + "/metrics").decode()
        finally:
            pushgateway.stop()
    assert proc.returncode == 0, outputs["stderr"][-3000:]
    outputs["pushgateway"] = pushgateway_text
    outputs["xcom"] = xcom.read_text()
    for path in tmp_path.glob("job.log*"):
        data = path.read_bytes()
        outputs[path.name] = (gzip.decompress(data) if path.name.endswith(".gz") else data).decode()
    for n, text in enumerate(_texts_of_manifest(s3_server, s3_bucket)):
        outputs[f"manifest object {n}"] = text
    report = run_bulkjob("report", "--manifest", manifest, "--run-id", "secrets", env=env)
    outputs["report"] = report.stdout + report.stderr

    for name, text in outputs.items():
        for secret in (DB_PASSWORD, S3_SECRET, TOKEN):
            assert secret not in text, f"{secret} appears in {name}"
    # The handler did try: its attempts were redacted, not silent.
    assert outputs["stderr"].count(REDACTED) >= 3 * 3 + 2 * 4
    # The log file has every record stderr has; what handlers print (to stdout or stderr) goes to
    # stderr only, and stdout holds the summary alone.
    assert outputs["job.log"].count(REDACTED) == outputs["stderr"].count(REDACTED) - 10
    assert "cannot use token [redacted]" in outputs["report"]
    assert outputs["stderr"].count("printed token [redacted]") == 5
    assert outputs["stderr"].count("printed password [redacted]") == 5
    assert len(outputs["stdout"].splitlines()) == 1 and json.loads(outputs["stdout"]) == json.loads(outputs["xcom"])
    results = [json.loads(line) for name, text in outputs.items() if name.startswith("manifest object")
               for line in text.splitlines()[1:] if line.startswith("{") and '"result"' in line]
    assert {r["id"]: r["result"]["token"] for r in results if r["result"] and "token" in r["result"]} == {
        f"ok-{n}": REDACTED for n in range(3)}
    assert json.loads(outputs["xcom"])["done"] == 4
    assert 'bulkjob_run_info' in outputs["pushgateway"] and 'run_id="secrets"' in outputs["pushgateway"]


def test_a_secret_learnt_after_logging_is_set_up_is_redacted_too(capfd):
    import logging

    from job.logs import add_secrets, setup_logging

    setup_logging("json")
    try:
        add_secrets(["from-a-file-42"])
        logging.getLogger("t").warning("password from-a-file-42 used")
        err = capfd.readouterr().err
        assert json.loads(err.splitlines()[-1])["msg"] == f"password {REDACTED} used"
    finally:
        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)


def test_a_database_password_from_a_file_is_redacted_in_workers(tmp_path):
    password = tmp_path / "db-password"
    password.write_text("pw-From-File-6Tz\n")
    sqlite3.connect(tmp_path / "db.sqlite").close()  # the preflight opens it
    write_items(tmp_path / "items.jsonl", [{"id": "a", "payload": {"password_file": str(password)}}])
    proc = run_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "obs_handler:handle",
                       "--manifest", str(tmp_path / "m"), "--run-id", "pwfile", "--workers", "1",
                       "--metrics-port", "0", "--db", f"sqlite:///{tmp_path / 'db.sqlite'}",
                       "--db-password-file", str(password))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pw-From-File-6Tz" not in proc.stderr + proc.stdout
    assert f"the file holds {REDACTED}" in proc.stderr
