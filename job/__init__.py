"""bulkjob: run thousands of work items inside one pod, with retries and a resumable manifest.

Handlers raise `Retryable`, `Permanent` or `Unavailable` to say how a failure must be treated.
"""

from .errors import Permanent, Retryable, Unavailable
from .items import Item

__all__ = ["Item", "Permanent", "Retryable", "Unavailable"]
__version__ = "0.1.0"
