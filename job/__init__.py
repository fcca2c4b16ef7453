"""bulkjob: run thousands of work items inside one pod, with retries and a resumable manifest.

Handlers raise `Retryable` or `Permanent` to say how a failure must be treated.
"""

from .errors import Permanent, Retryable
from .items import Item

__all__ = ["Item", "Permanent", "Retryable"]
__version__ = "0.1.0"
