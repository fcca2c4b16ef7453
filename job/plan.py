"""Planning: what each item of the input comes to, given what the manifest recorded of it.

Pure: items and recorded states in, decisions out. The run acts on them (hands a task out,
records a crashed item, writes a finished one back to a work table).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .items import Item
from .manifest import DONE, FAILED, PARTIAL, RUNNING, ItemState, ItemStates
from .outcome import Failure
from .scheduler import Task


@dataclass(frozen=True, slots=True)
class Crashed:
    """The whole run died while this item ran, as often as it may: fail it as crashed."""

    item: Item
    attempts: int
    progress: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Finished:
    """Finished in an earlier process (done, or failed without --retry-failed)."""

    item: Item
    state: str
    error: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Refused:
    """Cannot run at all (a work table's row whose payload is not an object): record it
    failed with `failure`, no attempt spent."""

    item: Item
    failure: Failure


Decision = Task | Crashed | Finished | Refused


def decide(item: Item, known: ItemState | None, *, max_attempts: int, retry_failed: bool) -> Decision:
    """What `item` comes to. An item keeps its attempts across restarts: its next attempt
    continues the count; --retry-failed gives a failed item a new set of attempts."""
    if known is None:
        return Task(item.id, item.payload, 1)
    if known.state == PARTIAL:
        return Task(item.id, item.payload, known.attempts + 1, known.progress)
    if known.state == RUNNING:
        # The attempt recorded as running ended with the whole run: it counts as crashed, and
        # the item is a suspect (it may be what killed the run).
        if known.attempts >= max_attempts:
            return Crashed(item, known.attempts, known.progress)
        return Task(item.id, item.payload, known.attempts + 1, known.progress, suspect=True)
    if known.state == FAILED and retry_failed:
        return Task(item.id, item.payload, known.attempts + 1, known.progress, budget_from=known.attempts + 1)
    assert known.state in (DONE, FAILED), known.state
    return Finished(item, known.state, known.error)


def plan(items: Iterator[Item], states: ItemStates, *, max_attempts: int, retry_failed: bool
         ) -> Iterator[Decision]:
    """`decide` for every item, in input order (lazily: a million items are never held)."""
    for item in items:
        yield decide(item, states.get(item.id), max_attempts=max_attempts, retry_failed=retry_failed)
