"""bulkjob: what a handler imports (installed as the package `bulkjob`).

    from bulkjob import Item, Permanent, Retryable, Unavailable

A handler raises `Retryable` when trying again later may succeed, `Permanent` when it cannot,
and `Unavailable` when what the item needs cannot be reached (the run pauses; the item keeps
its attempts). Any other exception is classified by its type (see the README).
"""

from job import __version__
from job.errors import Permanent, Retryable, Unavailable
from job.items import Item

__all__ = ["Item", "Permanent", "Retryable", "Unavailable", "__version__"]
