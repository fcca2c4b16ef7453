"""Setup for the Airflow DAG tests, which run only in the Airflow virtualenv.

The main test suite collects nothing here: tests/test_airflow_dag.py runs
these in `.venv-airflow` (make airflow-venv), so that Airflow's pins never
constrain the job's own dependencies.
"""

import importlib.util
import os
import tempfile

if importlib.util.find_spec("airflow") is None:
    collect_ignore_glob = ["*.py"]


def pytest_configure(config):
    # Airflow reads its configuration when first imported: point it at a
    # throwaway home (SQLite database, no examples) before any test module
    # imports it. The kubernetes connection only supplies a namespace; no
    # test talks to a cluster.
    if "AIRFLOW_HOME" not in os.environ:
        os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="bulkjob-airflow-")
    home = os.environ["AIRFLOW_HOME"]
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", os.path.join(home, "dags"))
    os.environ.setdefault(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT",
        '{"conn_type": "kubernetes", "extra": {"namespace": "bulk"}}',
    )
