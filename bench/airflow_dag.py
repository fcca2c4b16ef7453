"""The "one task per item" design: the items as dynamically mapped tasks of one DAG run.

Copied into a temporary dags folder by the benchmark, which runs it with `airflow dags test`;
BENCH_ITEMS_FILE names the items (JSON Lines), and each mapped task does nothing with its item.
"""

import json
import os

import pendulum
from airflow.sdk import dag, task


@dag(dag_id="bench_mapped", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False)
def bench_mapped():
    @task
    def items():
        with open(os.environ["BENCH_ITEMS_FILE"]) as f:
            return [json.loads(line) for line in f if line.strip()]

    @task
    def handle(item):
        return None

    handle.expand(item=items())


bench_mapped()
