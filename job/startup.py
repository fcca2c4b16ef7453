"""Before the first item: opening the shard (or the work table) in the one safe order, waiting
out an unreachable store or database, and the preflight that tells a configuration error
(exit 2, within seconds) from an outage (wait, then exit 5).

The order (`open_shard`): everything that can be refused without touching the manifest first
(the handler, the input of a new run, the database's preflight), so that a usage or
configuration error leaves the shard's directory as it was; then the lease; then, holding it,
the manifest is read, so that what is read is what this runner continues from. A resumed run
reads its input after the manifest, so that the scan skips finished items without parsing
them; bad input found then releases the lease and changes no record. A work table
(`open_work_table`): the handler, the database's preflight, the table's columns; only then a
first extension of (no) claims, and the claims themselves when the run asks for rows.

The waits here block the parent, which has nothing else to do yet, but a SIGTERM or SIGINT
ends them at once.
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from . import items as items_module
from .config import RunConfig
from .errors import BulkjobError, ConfigError, EnvironmentUnavailable, ManifestCorrupt, Unreachable, UsageError
from .exits import EXIT_INTERRUPTED
from .lease import Lease, LeaseState, default_wait, lease_timing
from .manifest import DONE, FAILED, FINISHED, VALID_INPUT, ItemStates, Loaded, ShardManifest, list_shards
from .outcome import CONFIG
from .retry import backoff_delay
from .scheduler import PROBE_BASE, PROBE_CAP, PROBE_FACTOR, PROBE_JITTER
from .signals import Signals
from .sources import FileLines, ItemSource, open_source
from .store import open_store
from .worker import load_handler

if TYPE_CHECKING:
    from .db.url import DbSettings

log = logging.getLogger("bulkjob")

T = TypeVar("T")


class Interrupted(BulkjobError):
    """Raised when a signal arrives while the run waits before its first item (exit 3)."""

    exit_code = EXIT_INTERRUPTED


def patiently(what: str, fn: Callable[[], T], *, timeout: float, signals: Signals | None,
              rand: Callable[[], float] = random.random) -> T:
    """Call `fn` until it stops raising Unreachable (the store, the database), waiting between tries as a
    paused run probes (PROBE_* in job.scheduler), for up to `timeout` seconds; then raise
    EnvironmentUnavailable. The first failure and the recovery are logged at WARNING."""
    started = time.monotonic()
    tries = 0
    while True:
        try:
            value = fn()
        except Unreachable as e:
            tries += 1
            waited = time.monotonic() - started
            if tries == 1:
                log.warning("%s: unavailable (%s); waiting up to %s for it", what, e, _duration(timeout))
            if waited >= timeout:
                raise EnvironmentUnavailable(
                    f"{what}: still unavailable after {_duration(waited)} (--outage-timeout): {e}. "
                    "Nothing was lost; run again with the same --run-id once it is back") from None
            delay = backoff_delay(tries, base=PROBE_BASE, cap=PROBE_CAP, rand=rand(), jitter=PROBE_JITTER,
                                  factor=PROBE_FACTOR)
            _sleep(min(delay, max(0.0, timeout - waited)), signals)
            continue
        if tries:
            log.warning("%s: available again after %s", what, _duration(time.monotonic() - started))
        return value


def _sleep(seconds: float, signals: Signals | None) -> None:
    """Sleep, but return at once (raising Interrupted) when SIGTERM or SIGINT arrives."""
    if signals is None:
        time.sleep(seconds)
        return
    if not signals.count:
        select.select([signals.reader], [], [], seconds)
        signals.drain_wakeups()
    if signals.count:
        raise Interrupted("interrupted while waiting before the first item; nothing ran")


@dataclass(slots=True)
class Shard:
    """What a run works on once the shard is open."""

    manifest: ShardManifest
    handler: Any
    #: Where the items come from; read again for the second pass.
    source: ItemSource
    scan: items_module.Scan
    #: Invalid lines this shard records (--skip-invalid).
    invalid: list[items_module.Invalid]
    loaded: Loaded
    states: ItemStates
    #: Held, heartbeat running; None for --dry-run, which writes nothing.
    lease: Lease | None
    #: An earlier run finished every item of the shard on this very input (meta.json's
    #: FINISHED): nothing to run, and the manifest was not read (scan, loaded and states are
    #: empty).
    finished: dict[str, Any] | None = None


def open_shard(cfg: RunConfig, stack: contextlib.ExitStack, *, signals: Signals | None,
               rand: Callable[[], float] = random.random) -> Shard:
    """Open the run's shard in the safe order (see the module's docstring). The items source and
    the lease are closed and released by `stack`."""
    def wait(what: str, fn: Callable[[], T]) -> T:
        return patiently(what, fn, timeout=cfg.outage_timeout, signals=signals, rand=rand)

    timing = lease_timing(cfg.lease_ttl)
    store, prefix = open_store(cfg.manifest, endpoint_url=cfg.s3_endpoint_url,
                               request_timeout=timing.request_timeout)
    manifest = ShardManifest(store, prefix, cfg.run_id, cfg.shard_index, cfg.shard_count)
    # An unknown handler or a bad steps file is a usage error before anything runs.
    handler = load_handler(cfg.handler, cfg.worker.db)
    shards = wait("the manifest store", lambda: list_shards(store, prefix, cfg.run_id))
    counts = {count for _, count in shards}
    if counts - {cfg.shard_count}:
        raise UsageError(f"run {cfg.run_id} was started with --shard-count {min(counts - {cfg.shard_count})}; "
                         "resume it with the same count, or start a new run id")
    source = wait("the items source", lambda: stack.enter_context(open_items(cfg)))
    # A resume reads the manifest before the input, so that the scan can skip what is finished
    # without parsing it; a new run checks its input before it touches the shard at all.
    resuming = (cfg.shard_index, cfg.shard_count) in shards
    digest = _Digest(source)
    lease = loaded = None
    if not resuming:
        scan, invalid = _scan(cfg, source, None)
    if not cfg.dry_run:
        if cfg.worker.db is not None:
            wait("the database", lambda: check_database(cfg.worker.db, retry_on=cfg.worker.retry_on,
                                                         outage_on=cfg.worker.outage_on))
        lease = manifest.lease(ttl=cfg.lease_ttl)
        stack.callback(lease.release)
        patience = cfg.lease_wait if cfg.lease_wait is not None else default_wait(cfg.lease_ttl)
        wait("the manifest store (taking the lease)",
             lambda: lease.acquire(wait=patience, on_wait=_WaitNotice(patience)))
        # Heartbeat from this moment, the repair and the reading included.
        lease.start()
        if resuming and not cfg.manifest_repair:
            ended = wait("the manifest store", lambda: _finished_on_this_input(cfg, manifest, source, digest))
            if ended is not None:
                return Shard(manifest, handler, source, items_module.Scan(per_shard=[0] * cfg.shard_count), [],
                             Loaded(meta=None), ItemStates({}), lease, finished=ended)
        if cfg.manifest_repair:
            kept, objects = wait("the manifest store (repairing)", lambda: manifest.repair(generation=lease.generation))
            log.warning("manifest repaired: %d item record(s) kept from %d object(s) in %s",
                        kept, objects, manifest.url)
    try:
        loaded = wait("the manifest store", manifest.load)
    except ManifestCorrupt as e:
        raise ManifestCorrupt(f"damaged manifest: {e}. Nothing was changed; run again with "
                              "--manifest-repair to keep every record that can still be read") from None
    states = loaded.states()
    if resuming:
        scan, invalid = _scan(cfg, source, states, loaded.meta, digest)
    return Shard(manifest, handler, source, scan, invalid, loaded, states, lease)


class _Digest:
    """The input's (digest, lines), read for it at most once (job.items.input_digest)."""

    def __init__(self, source: ItemSource) -> None:
        self.source = source
        self._value: tuple[str, int] | None = None

    def value(self) -> tuple[str, int]:
        if self._value is None:
            with self.source() as lines:
                self._value = items_module.input_digest(lines)
        return self._value


def _valid_input(cfg: RunConfig, source: ItemSource, meta: dict[str, Any] | None, digest: _Digest) -> str | None:
    """The digest of the input an earlier run of the shard found wholly valid (meta.json's
    VALID_INPUT, written by job.run when it starts), if this is that input, byte for byte, and
    the limits it was checked under hold."""
    found = (meta or {}).get(VALID_INPUT)
    if not isinstance(source, FileLines) or not isinstance(found, dict) \
            or found.get("max_item_bytes") != cfg.max_item_bytes or digest.value()[0] != found.get("input"):
        return None
    return digest.value()[0]


def _finished_on_this_input(cfg: RunConfig, manifest: ShardManifest, source: ItemSource,
                            digest: _Digest) -> dict[str, Any] | None:
    """What meta.json says of an earlier run that finished every item of the shard (FINISHED,
    written by job.run at its end), if it holds for this run: the record objects are those it
    left and the input is the one it read, byte for byte (each read once, parsed not at all:
    their digests); the same --max-item-bytes; --skip-invalid if it skipped invalid lines;
    nothing failed that --retry-failed would run again. A local file, S3 object or stdin
    only: a query's rows change as its items finish."""
    if not isinstance(source, FileLines):
        return None
    try:
        meta = manifest.read_meta() or {}
    except ManifestCorrupt:
        return None  # the full reading says what is wrong
    ended = meta.get(FINISHED)
    if not isinstance(ended, dict) or ended.get("max_item_bytes") != cfg.max_item_bytes \
            or (ended.get("invalid") and not cfg.skip_invalid) or (ended.get("failed") and cfg.retry_failed) \
            or manifest.records_digest() != ended.get("records"):
        return None
    return ended if digest.value() == (ended.get("input"), ended.get("lines")) else None


def _scan(cfg: RunConfig, source: ItemSource, states: ItemStates | None, meta: dict[str, Any] | None = None,
          digest: _Digest | None = None) -> tuple[items_module.Scan, list[items_module.Invalid]]:
    """The first pass over the input (told what is finished, on a resume, and trusting what an
    earlier run of the shard found valid if the input is the same); bad or empty input is
    refused here."""
    trusted = None if meta is None or digest is None else _valid_input(cfg, source, meta, digest)
    while True:
        finished = None if states is None else states.finished((DONE,) if cfg.retry_failed else (DONE, FAILED))
        with source() as it:
            scan = items_module.scan(it, shard_index=cfg.shard_index, shard_count=cfg.shard_count,
                                     max_bytes=cfg.max_item_bytes, finished=finished, trusted=trusted)
        if trusted is None or scan.digest == trusted:
            break
        log.debug("the input changed while it was read: checking every line")
        trusted = None
    if trusted is not None:
        log.debug("the input is the one an earlier run found valid: its unfinished lines were counted, not parsed")
    if scan.invalid and not cfg.skip_invalid:
        raise items_module.input_error(source.name, scan.invalid)
    if scan.empty and not cfg.allow_empty and not source.may_be_empty:
        raise items_module.no_items_error(source.name, scan)
    invalid = scan.shard_invalid(cfg.shard_index, cfg.shard_count) if cfg.skip_invalid else []
    return scan, invalid


def open_items(cfg: RunConfig) -> contextlib.AbstractContextManager[ItemSource]:
    """The run's ItemSource: a JSON Lines file, an S3 object or stdin, or --items-sql's rows."""
    if cfg.db_items is not None:
        from .db.query import open_db_items

        return open_db_items(database_of(cfg), cfg.db_items, retry_on=cfg.worker.retry_on,
                             outage_on=cfg.worker.outage_on)
    assert cfg.items is not None, "the command line gives --items, --items-sql or --work-table"
    return open_source(cfg.items, endpoint_url=cfg.s3_endpoint_url)


def database_of(cfg: RunConfig) -> DbSettings:
    """The run's --db, which the command line requires with --items-sql and --work-table."""
    assert cfg.worker.db is not None, "--items-sql and --work-table come with --db"
    return cfg.worker.db


def work_table_of(cfg: RunConfig) -> str | None:
    """The work table a run claims rows from, or None for items from a file, S3, stdin or a query."""
    return getattr(cfg.db_items, "table", None)


@dataclass(slots=True)
class WorkTable:
    """What a run works on once its work table is open."""

    handler: Any
    table: str
    columns: Any
    #: Started (first extension acknowledged, heartbeat running); None for --dry-run.
    queue: Any = None
    #: The write-back of the rows' states (not started); None for --dry-run.
    recorder: Any = None


def open_work_table(cfg: RunConfig, stack: contextlib.ExitStack, *, signals: Signals | None,
                    rand: Callable[[], float] = random.random) -> WorkTable:
    """Open the run's work table in the safe order (see the module's docstring); the queue's
    claims are given back (or left to expire) by `stack` if the run ends before its own end."""
    from .db.queue import ClaimQueue
    from .db.worktable import ClaimRecorder, read_columns

    def wait(what: str, fn: Callable[[], T]) -> T:
        return patiently(what, fn, timeout=cfg.outage_timeout, signals=signals, rand=rand)

    settings, table = database_of(cfg), work_table_of(cfg)
    assert table is not None, "open_work_table is for a run with --work-table"
    handler = load_handler(cfg.handler, settings)
    wait("the database", lambda: check_database(settings, retry_on=cfg.worker.retry_on,
                                                 outage_on=cfg.worker.outage_on))
    columns = wait("the work table", lambda: read_columns(settings, table, retry_on=cfg.worker.retry_on,
                                                          outage_on=cfg.worker.outage_on))
    if cfg.dry_run:
        return WorkTable(handler, table, columns)
    queue = ClaimQueue(settings, table, columns=columns, workers=cfg.workers,
                       max_attempts=cfg.policy.max_attempts, max_item_bytes=cfg.max_item_bytes, ttl=cfg.lease_ttl,
                       retry_on=cfg.worker.retry_on, outage_on=cfg.worker.outage_on, rand=rand)
    wait("the work table (claims)", queue.start)
    stack.callback(queue.release)
    recorder = ClaimRecorder(settings, queue.sql, queue, columns=columns, interval=cfg.checkpoint_interval)
    return WorkTable(handler, table, columns, queue, recorder)


class _WaitNotice:
    """Says once that the shard's lease is held and the run waits for it."""

    def __init__(self, patience: float) -> None:
        self.patience = patience
        self.said = False

    def __call__(self, state: LeaseState | None) -> None:
        if not self.said:
            self.said = True
            holder = state.describe() if state is not None else "another runner"
            log.warning("this shard's lease is %s; waiting up to %.0f s for it to be released or to "
                        "expire (--lease-wait)", holder, self.patience)


def check_database(settings, *, retry_on: Iterable[str] = (), outage_on: Iterable[str] = ()) -> None:
    """The preflight of --db: connect with the session settings and run a trivial query.

    Raises ConfigError (exit 2) when the database refuses our settings or a --session-sql
    statement fails, DatabaseUnavailable when it cannot be reached (the caller waits)."""
    from .db import DatabaseUnavailable, preflight, preflight_failure

    try:
        preflight(settings)
    except Exception as e:
        failure = preflight_failure(settings, e, retry_on=retry_on, outage_on=outage_on)
        code = f" {failure.code}" if failure.code else ""
        what = f"{failure.error_class}{code}: {_first_line(failure.message)}"
        if failure.kind == CONFIG:
            raise ConfigError(f"--db: the database refused the connection or the session settings: {what}") from None
        raise DatabaseUnavailable(what) from None


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

