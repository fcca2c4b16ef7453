"""The handler API: `bulkjob` is its import name; `job` still answers, with a warning."""

import subprocess
import sys
import warnings

import pytest
from conftest import VENV_BIN, run_bulkjob, summary_of, write_items

import bulkjob
from job import errors, items


def test_bulkjob_exports_the_very_classes_the_workers_classify():
    assert (bulkjob.Permanent, bulkjob.Retryable, bulkjob.Unavailable) == (
        errors.Permanent, errors.Retryable, errors.Unavailable)
    assert bulkjob.Item is items.Item and bulkjob.__version__


@pytest.mark.parametrize("name", ["Permanent", "Retryable", "Unavailable", "Item"])
def test_the_old_import_still_works_with_a_warning(name):
    import job

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(job, name)
    assert value is getattr(bulkjob, name)
    assert [w.category for w in caught] == [FutureWarning] and "from bulkjob import" in str(caught[0].message)


def test_importing_bulkjob_needs_no_job_import_and_warns_nothing(tmp_path):
    # Run where a user's own job.py would sit: bulkjob is found by its installed name.
    (tmp_path / "myh.py").write_text("from bulkjob import Retryable\n")
    proc = subprocess.run([sys.executable, "-W", "error", "-c", "import myh; print(myh.Retryable.__module__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "job.errors"


def test_a_handler_module_called_job_is_refused_with_a_clear_line(tmp_path):
    (tmp_path / "job.py").write_text("def handle(item, ctx):\n    return None\n")
    write_items(tmp_path / "items.jsonl", [{"id": 1}])
    # The installed command, from the handler's directory, as the README's walkthrough runs it.
    proc = subprocess.run([str(VENV_BIN / "bulkjob"), "run", "--items", "items.jsonl", "--handler", "job:handle",
                           "--manifest", "state", "--metrics-port", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "a handler module cannot be called job" in summary_of(proc)["error"]
    assert not (tmp_path / "state").exists()


def test_a_handler_importing_bulkjob_runs(tmp_path):
    (tmp_path / "myh.py").write_text("from bulkjob import Permanent\n\ndef handle(item, ctx):\n"
                                     "    if item.id == 'bad':\n        raise Permanent('no')\n")
    write_items(tmp_path / "items.jsonl", [{"id": "ok"}, {"id": "bad"}])
    proc = run_bulkjob("run", "--items", str(tmp_path / "items.jsonl"), "--handler", "myh:handle",
                       "--manifest", str(tmp_path / "state"), "--metrics-port", "0", "--max-failures", "1",
                       env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert (summary_of(proc)["done"], summary_of(proc)["failed"]) == (1, 1)
