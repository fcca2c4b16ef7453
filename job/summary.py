"""The run's summary: one JSON line on stdout, and the same object for Airflow's XCom."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("bulkjob")


def write_summary(summary: dict[str, Any], *, stdout, xcom_path) -> None:
    """Print the summary line and write it where Airflow's KubernetesPodOperator reads XCom."""
    line = json.dumps(summary, sort_keys=False)
    stdout.write(line + "\n")
    stdout.flush()
    if xcom_path is not None:
        try:
            tmp = f"{xcom_path}.tmp"
            with open(tmp, "w") as f:
                f.write(line)
            os.replace(tmp, xcom_path)
        except OSError as e:
            log.error("could not write the summary to %s: %s", xcom_path, e)
