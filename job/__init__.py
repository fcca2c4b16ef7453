"""bulkjob's package: run thousands of work items inside one pod, with retries and a resumable
manifest.

Handlers import their API from `bulkjob` (job/public), which no module of a user's can shadow.
`from job import Retryable` still works for this release, with a warning: a handler's own
`job.py` would shadow it, and a handler module may not be called `job` at all.
"""

from __future__ import annotations

import warnings
from typing import Any

__version__ = "0.1.0"

#: The handler API, now imported from `bulkjob`.
_MOVED = ("Item", "Permanent", "Retryable", "Unavailable")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"`from job import {name}` is deprecated and goes in the next release: use "
                      f"`from bulkjob import {name}`", FutureWarning, stacklevel=2)
        import bulkjob

        return getattr(bulkjob, name)
    raise AttributeError(f"module 'job' has no attribute {name!r}")
