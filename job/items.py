"""Work items: parsing and validating JSON Lines, and reading the shard's items in two passes.

The first pass (`scan`) reads every line once, so that bad input stops the run before any item
runs; the second (`iter_items`) streams the shard's items again, so that a million items are
never held in memory at once. On a resume, the first pass is told which items are finished:
a line whose id can be read without parsing it (`"id"` first, as bulkjob's own examples and
most producers write it) and names a finished item is counted and marked, not parsed (it was
validated when it first ran), and the second pass skips it without parsing either. A resume
of a million finished items then costs a scan of their ids, a block of lines at a time.
"""

from __future__ import annotations

import hashlib
import json
import re
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import compress, islice, repeat
from operator import add, eq, methodcaller, not_
from typing import Any

from .errors import InputError, UsageError
from .itemstates import Finished
from .manifest import FAILED
from .outcome import INVALID, Failure
from .shard import shard_of

#: Longest item line accepted: an item travels through a pipe to a worker and its result into
#: the manifest; bulk data belongs in S3 or the database, with its key in the payload.
MAX_LINE_BYTES = 1024 * 1024
#: Longest id accepted: ids appear in logs, reports and manifest records.
MAX_ID_CHARS = 512
#: How many problems an input error lists before it says "and N more".
SHOWN_PROBLEMS = 10

#: Deepest nesting of objects and arrays accepted in a line. Payloads travel through pickle and
#: are walked for --redact fields, both recursive: far below Python's recursion limit, far above
#: any real payload.
MAX_NESTING = 200
#: What starts the id under which an invalid line is recorded (with --skip-invalid): a control
#: character, which no item id may contain, so that it never collides with one.
INVALID_LINE_PREFIX = "\x1fline-"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: A \\u escape of a UTF-16 surrogate: only then can the parsed text hold a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
#: The id at the start of a line, when it can be read without parsing the line: a plain string
#: (no escapes, no control characters) or an integer, right after the opening brace.
_LEADING_ID = re.compile(rb'\{\s*"id"\s*:\s*(?:"([^"\\\x00-\x1f]{1,512})"|(-?(?:0|[1-9]\d{0,29})))\s*[,}]')
#: The same for a string id, at the start of each line of a block of lines (whitespace that
#: is not a line break in place of `\s`: a match never reaches into the next line).
_LEADING_STRING_IDS = re.compile(
    rb'^[ \t\r\f\v]*\{[ \t\r\f\v]*"id"[ \t\r\f\v]*:[ \t\r\f\v]*"([^"\\\x00-\x1f]{1,512})"[ \t\r\f\v]*[,}]', re.M)
_GET_ID = methodcaller("get", "id")
_GET_PAYLOAD = methodcaller("get", "payload")
_PAYLOAD_TYPES = {dict, type(None)}
#: Lines that the first pass looks at together (`_block`).
SCAN_BLOCK = 4096


def invalid_line_id(line: int) -> str:
    """The manifest id of input line `line` recorded as invalid."""
    return f"{INVALID_LINE_PREFIX}{line}"


def line_of(record_id: str) -> int | None:
    """The input line of an invalid line's manifest id; None for an item's id."""
    if record_id.startswith(INVALID_LINE_PREFIX):
        number = record_id[len(INVALID_LINE_PREFIX):]
        return int(number) if number.isdigit() else None
    return None


@dataclass(frozen=True, slots=True)
class Item:
    """One unit of work: `id` is unique within a run, `payload` is what the handler reads."""

    id: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Invalid:
    """A line that is not a valid item; `id` is the item's id if it had a usable one."""

    line: int
    reason: str
    id: str | None = None
    #: The shard that records it, when only that shard can tell (a repeated id); else any
    #: shard can, and `recorded_by` picks one by the line.
    shard: int | None = None

    @property
    def record_id(self) -> str:
        """The id under which the line is recorded as failed with --skip-invalid: its line's,
        never an item's (an item with the same id may be valid on another line)."""
        return invalid_line_id(self.line)

    def recorded_by(self, shard_count: int) -> int:
        """The one shard that records this line."""
        return self.shard if self.shard is not None else shard_of(self.record_id, shard_count)

    def failure(self) -> Failure:
        return Failure(INVALID, "InvalidItem", self.reason)

    def record(self, *, at: float) -> dict[str, Any]:
        """The manifest record of the line: failed, kind `invalid`, no attempt spent."""
        record: dict[str, Any] = {"id": self.record_id, "state": FAILED, "attempts": 0, "at": round(at, 3),
                                  "line": self.line, "error": self.failure().as_record()}
        if self.id is not None:
            record["item_id"] = self.id
        return record


def parse_line(raw: bytes, line: int, *, max_bytes: int = MAX_LINE_BYTES) -> Item | Invalid | None:
    """Parse one JSONL line; None for a blank line, Invalid with the reason for a bad one."""
    if len(raw) > max_bytes:
        return Invalid(line, f"line is {len(raw)} bytes, more than the limit of {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Invalid(line, f"not UTF-8 (byte {e.start})")
    if not text.strip():
        return None
    if raw.count(b"[") + raw.count(b"{") > MAX_NESTING and _depth(text) > MAX_NESTING:
        return Invalid(line, f"nested deeper than {MAX_NESTING} levels")
    try:
        obj = _loads(text)
    except ValueError as e:
        return Invalid(line, f"bad JSON: {e}")
    except RecursionError:
        return Invalid(line, f"nested deeper than {MAX_NESTING} levels")
    if _SURROGATE_ESCAPE.search(raw) and not _encodable(obj):
        return Invalid(line, "not valid Unicode: a \\u escape of a lone surrogate (such as \\ud800)")
    if not isinstance(obj, dict):
        return Invalid(line, f"expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        return Invalid(line, 'missing "id"')
    item_id = obj["id"]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        return Invalid(line, f'"id" must be a string or an integer, got {type(item_id).__name__}')
    item_id = str(item_id)
    if not item_id:
        return Invalid(line, '"id" is empty')
    if len(item_id) > MAX_ID_CHARS:
        return Invalid(line, f'"id" is longer than {MAX_ID_CHARS} characters')
    if _CONTROL.search(item_id):
        return Invalid(line, '"id" contains control characters')
    payload = obj.get("payload", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        return Invalid(line, f'"payload" must be an object, got {type(payload).__name__}', item_id)
    return Item(item_id, payload)


def _loads(text: str) -> Any:
    """json.loads, by its C scanner alone when the text is one JSON value and nothing more (the
    common case); otherwise by json.loads itself, for its error messages."""
    try:
        obj, end = _SCAN(text, 0)
    except (StopIteration, ValueError):
        return json.loads(text)
    return obj if not text[end:].strip() else json.loads(text)


def _depth(text: str) -> int:
    """How deeply the brackets of a JSON text nest (outside strings); counted only for a line with
    many brackets, so that a deep line is refused before the parser recurses into it."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _encodable(obj: Any) -> bool:
    """Whether every string of a parsed line can be written as UTF-8 (no lone surrogate)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class LineSet:
    """A set of line numbers in a byte per line: what the second pass skips, for a million lines
    in a megabyte."""

    __slots__ = ("_bits", "count")

    def __init__(self) -> None:
        self._bits = bytearray()
        self.count = 0

    def add(self, line: int) -> None:
        if line >= len(self._bits):
            self._bits.extend(bytes(max(line + 1 - len(self._bits), len(self._bits))))
        if not self._bits[line]:
            self._bits[line] = 1
            self.count += 1

    def add_range(self, start: int, stop: int) -> None:
        """Lines `start` to `stop - 1`."""
        if stop > len(self._bits):
            self._bits.extend(bytes(max(stop - len(self._bits), len(self._bits))))
        self.count += self._bits.count(0, start, stop)
        self._bits[start:stop] = b"\x01" * (stop - start)

    def __contains__(self, line: object) -> bool:
        return isinstance(line, int) and 0 <= line < len(self._bits) and self._bits[line] == 1

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        return (line for line, bit in enumerate(self._bits) if bit)


@dataclass(slots=True)
class Scan:
    """What the first pass learned about the input, for one shard."""

    lines: int = 0
    valid: int = 0
    shard_items: int = 0
    invalid: list[Invalid] = field(default_factory=list)
    #: Valid lines per shard (repeats of another shard's ids included: only that shard sees them).
    per_shard: list[int] = field(default_factory=list)
    #: Line numbers the second pass must skip: invalid lines, repeated ids, finished items.
    skip_lines: LineSet = field(default_factory=LineSet)
    #: This shard's items that the first pass found finished (counted, not parsed).
    finished: int = 0
    #: The input as read, every byte of every line in order (`input_digest`'s answer).
    digest: str = ""

    @property
    def to_run(self) -> int:
        """This shard's items the second pass yields."""
        return self.shard_items - self.finished

    def shard_invalid(self, shard_index: int, shard_count: int) -> list[Invalid]:
        """Invalid lines recorded by this shard: each by exactly one shard, a repeated id by the
        shard that found it (the only one that can)."""
        return [i for i in self.invalid if i.recorded_by(shard_count) == shard_index]

    @property
    def empty(self) -> bool:
        """The input holds no item and no invalid line (nothing, or blank lines only)."""
        return self.valid == 0 and not self.invalid


def leading_id(raw: bytes) -> str | None:
    """The id of a line that can be read without parsing it (see `_LEADING_ID`), or None. A line
    that says `"id"` more than once is parsed: JSON would keep the last."""
    m = _LEADING_ID.match(raw.lstrip())
    if m is None or raw.count(b'"id"') != 1:
        return None
    if m.group(2) is not None:
        return str(int(m.group(2)))
    try:
        return m.group(1).decode("utf-8")
    except UnicodeDecodeError:
        return None


def scan(lines: Iterable[bytes], *, shard_index: int, shard_count: int,
         max_bytes: int = MAX_LINE_BYTES, finished: Finished | None = None, trusted: str | None = None) -> Scan:
    """First pass: validate every line and count this shard's items.

    Repeated ids are found within this shard only, which is enough: equal ids hash to the
    same shard, so every shard reports a repeat of its own ids and none misses one.
    `finished` (on a resume) names the items that need no run: their lines are marked to be
    skipped, and when their ids can be read without parsing (`leading_id`), they are not
    parsed at all. Lines are taken SCAN_BLOCK at a time (`_block`): a block of lines of the
    common shape is checked in C-level loops; what it cannot settle goes line by line.

    `trusted` is the digest of an input an earlier run of the shard found wholly valid (no
    invalid line, no repeated id) under the same limits: lines of the common shape are then
    counted, not parsed. The caller compares the digest this pass reports with it, and scans
    again, untrusting, if they differ.
    """
    result = Scan(per_shard=[0] * shard_count)
    first_seen: dict[str, int] = {}
    earlier = _FinishedLines(finished.size if finished is not None else 0)
    number = 0
    lines = iter(lines)
    hasher = _hasher()
    while block := list(islice(lines, SCAN_BLOCK)):
        text = b"".join(block)
        hasher.update(text)
        settled = _block(block, text, number + 1, finished, earlier, first_seen, result, shard_index=shard_index,
                         shard_count=shard_count, max_bytes=max_bytes, trusted=trusted is not None)
        if settled is True:
            number += len(block)
            continue
        for raw, known in zip(block, settled or repeat(None, len(block)), strict=True):
            number += 1
            if known:
                continue  # settled with its block
            if finished is not None and known is None and len(raw) <= max_bytes:
                item_id = leading_id(raw)
                slot = None if item_id is None else finished.slot(item_id)
                if item_id is not None and slot is not None:
                    shard = shard_of(item_id, shard_count)
                    result.valid += 1
                    result.per_shard[shard] += 1
                    if shard == shard_index:
                        _finished_line(result, finished, earlier, item_id, number, slot, shard)
                    continue
            parsed = parse_line(raw.rstrip(b"\r\n"), number, max_bytes=max_bytes)
            if parsed is None:
                result.skip_lines.add(number)
                continue
            if isinstance(parsed, Invalid):
                result.invalid.append(parsed)
                result.skip_lines.add(number)
                continue
            shard = shard_of(parsed.id, shard_count)
            result.valid += 1
            result.per_shard[shard] += 1
            if shard != shard_index:
                continue
            slot = None if finished is None or known is False else finished.slot(parsed.id)
            if slot is not None:
                assert finished is not None
                _finished_line(result, finished, earlier, parsed.id, number, slot, shard)
                continue
            first = first_seen.setdefault(parsed.id, number)
            if first != number:
                _repeated(result, parsed.id, number, first, shard)
                continue
            result.shard_items += 1
    result.lines = number
    result.digest = hasher.hexdigest()
    return result


def _hasher() -> Any:
    return hashlib.blake2b(digest_size=16)


def input_digest(lines: Iterable[bytes]) -> tuple[str, int]:
    """(digest, lines) of an input, as `scan` reports them: a second reading of the same bytes
    gives the same digest; any byte changed, added or moved, another."""
    hasher, count = _hasher(), 0
    lines = iter(lines)
    while block := list(islice(lines, SCAN_BLOCK)):
        hasher.update(b"".join(block))
        count += len(block)
    return hasher.hexdigest(), count


class _FinishedLines:
    """Where each finished item was met, for the message about a repeat: by slot for lines
    taken one by one, by hash in each block taken at once (8 bytes a line, searched only when
    a repeat is found)."""

    def __init__(self, size: int) -> None:
        self.by_slot = array("I", bytes(4 * size))
        self.blocks: list[tuple[int, array[int]]] = []

    def line(self, item_id: str, slot: int) -> int:
        if self.by_slot[slot]:
            return self.by_slot[slot]
        wanted = hash(item_id)
        for start, hashes in self.blocks:
            if wanted in hashes:
                return start + hashes.index(wanted)
        return 0


def _finished_line(result: Scan, finished: Finished, earlier: _FinishedLines, item_id: str, number: int,
                   slot: int, shard: int) -> None:
    """Line `number` of `shard`, this run's (counted valid already), names a finished item."""
    result.skip_lines.add(number)
    if not finished.take_one(item_id):
        _repeated(result, item_id, number, earlier.line(item_id, slot), shard)
        return
    earlier.by_slot[slot] = number
    result.shard_items += 1
    result.finished += 1


def _repeated(result: Scan, item_id: str, number: int, first: int, shard: int) -> None:
    """Line `number` of `shard` (counted valid already) repeats the id of line `first`: it is
    invalid, and not counted."""
    result.invalid.append(Invalid(number, f"duplicate id {item_id!r} (first on line {first})", shard=shard))
    result.skip_lines.add(number)
    result.valid -= 1
    result.per_shard[shard] -= 1


def _block(block: list[bytes], text: bytes, start: int, finished: Finished | None, earlier: _FinishedLines,
           first_seen: dict[str, int], result: Scan, *, shard_index: int, shard_count: int,
           max_bytes: int, trusted: bool = False) -> bool | list[bool] | None:
    """Lines `start`... at once, when each one begins as `leading_id` reads it (a plain string
    id) and says `"id"` once. Those naming a finished item of this shard not met before are
    counted and marked; then the others are parsed together (`_plain`). Returns True if the
    whole block is settled; a list (True: settled; False: to parse, and not finished) if
    only the finished lines are; None if nothing is (the block goes line by line). `text` is
    the block's lines joined."""
    longest = max(map(len, block))
    if longest > max_bytes:
        return None
    matched = _LEADING_STRING_IDS.findall(text)
    # One match a line at most (each starts a line, none crosses one): as many as lines means
    # every line; as many "id" as lines then means one in each.
    if len(matched) != len(block) or text.count(b'"id"') != len(block) or text.count(b"\n") > len(block):
        return None
    try:
        ids = list(map(bytes.decode, matched))
    except UnicodeDecodeError:
        return None
    shards = list(map(shard_of, ids, repeat(shard_count))) if shard_count > 1 else None
    flags: list[bool] | None = [False] * len(block)
    if finished is not None:
        if shards is None:
            flags = finished.take(ids)
        else:
            # Only this shard's items can be finished here; the others are parsed.
            mine = list(map(eq, shards, repeat(shard_index)))
            taken = finished.take(list(compress(ids, mine)))
            flags = None
            if taken is not None:
                found = iter(taken)
                flags = [m and next(found) for m in mine]
        if flags is None:
            return None
        count = flags.count(True)
        if count:
            earlier.blocks.append((start, array("q", map(hash, ids))))
            if count == len(block):
                result.skip_lines.add_range(start, start + count)
            else:
                for n in compress(range(start, start + len(block)), flags):
                    result.skip_lines.add(n)
            result.valid += count
            result.per_shard[shard_index] += count
            result.shard_items += count
            result.finished += count
            if count == len(block):
                return True
    assert flags is not None
    todo = list(map(not_, flags))
    todo_shards = None if shards is None else list(compress(shards, todo))
    if trusted:
        _count(len(block) - flags.count(True), todo_shards, result, shard_index)
        return True
    numbers = list(compress(range(start, start + len(block)), todo))
    if _plain(list(compress(block, todo)), list(compress(ids, todo)), numbers, longest, todo_shards, first_seen,
              result, shard_index):
        return True
    return flags


def _plain(lines: list[bytes], ids: list[str], numbers: list[int], longest: int, shards: list[int] | None,
           first_seen: dict[str, int], result: Scan, shard_index: int) -> bool:
    """Lines known to begin with a plain string id (`ids`) and to say `"id"` once, parsed in
    one call as the elements of a JSON array: True, and counted as parse_line and the loop of
    `scan` would count them, if each line is one object with that id (and an object payload,
    if any), and nothing else; if no line has a reason for a closer look (a \\u escape of a
    surrogate, DEL in the text, deep brackets) and no id repeats. Else False, nothing counted."""
    if not lines:
        return True
    joined = b",".join(lines)
    if b"\x7f" in joined or _SURROGATE_ESCAPE.search(joined):
        return False
    if longest > MAX_NESTING:  # a shorter line cannot hold more brackets than that
        brackets = map(add, map(bytes.count, lines, repeat(b"[")), map(bytes.count, lines, repeat(b"{")))
        if max(brackets) > MAX_NESTING:
            return False
    try:
        # Decoded here, strictly (json.loads would let bytes of a surrogate through).
        objs = json.loads("[" + joined.decode("utf-8") + "]")
    except (ValueError, RecursionError):
        return False
    # Each line begins an object with its id, and says "id" nowhere else: as many objects with
    # those ids, in order, as lines means one object a line (a line cut in two, or two lines
    # joined, would leave an id inside another object, or an element with no id).
    if len(objs) != len(lines) or set(map(type, objs)) != {dict} or list(map(_GET_ID, objs)) != ids:
        return False
    if not set(map(type, map(_GET_PAYLOAD, objs))) <= _PAYLOAD_TYPES:
        return False
    if shards is not None:
        here = list(map(eq, shards, repeat(shard_index)))
        ids, numbers = list(compress(ids, here)), list(compress(numbers, here))
    if len(set(ids)) != len(ids) or any(map(first_seen.__contains__, ids)):
        return False  # a repeat: line by line, which says where
    first_seen.update(zip(ids, numbers, strict=True))
    _count(len(lines), shards, result, shard_index)
    return True


def _count(lines: int, shards: list[int] | None, result: Scan, shard_index: int) -> None:
    """`lines` valid lines of unfinished items (in `shards`, or all in this run's shard)."""
    result.valid += lines
    if shards is None:
        result.per_shard[shard_index] += lines
        result.shard_items += lines
        return
    for shard in shards:
        result.per_shard[shard] += 1
    result.shard_items += shards.count(shard_index)


def iter_items(lines: Iterator[bytes], *, shard_index: int, shard_count: int,
               skip_lines: LineSet | set[int]) -> Iterator[Item]:
    """Second pass: yield this shard's valid items in file order, but for the lines to skip."""
    for number, raw in enumerate(lines, start=1):
        if number in skip_lines:
            continue
        parsed = _checked_again(raw, number)
        if parsed is not None and shard_of(parsed.id, shard_count) == shard_index:
            yield parsed


def _checked_again(raw: bytes, number: int) -> Item | None:
    """A line the first pass found valid: the common shape (a string id, an object payload)
    is taken as it is; any other goes through parse_line again."""
    try:
        text = raw.decode()
        obj, end = _SCAN(text, 0)
    except (ValueError, StopIteration):
        obj, end = None, 0
    if type(obj) is dict and not text[end:].strip():
        item_id, payload = obj.get("id"), obj.get("payload")
        if type(item_id) is str and (payload is None or type(payload) is dict):
            return Item(item_id, payload or {})
    parsed = parse_line(raw.rstrip(b"\r\n"), number, max_bytes=1 << 62)
    return parsed if isinstance(parsed, Item) else None

#: The JSON parser's C scanner, without json.loads' checks around it (which cost it three times
#: over on a short line).
_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def input_error(source: str, invalid: list[Invalid]) -> InputError:
    """The error that stops a run on bad input: the first problems, and how many more."""
    shown = [f"line {i.line}: {i.reason}" for i in invalid[:SHOWN_PROBLEMS]]
    return InputError(source, shown, more=max(0, len(invalid) - SHOWN_PROBLEMS))


def no_items_error(source: str, scan: Scan) -> UsageError:
    """The error that stops a run whose input holds no items (unless --allow-empty)."""
    what = f"{scan.lines} blank line(s)" if scan.lines else "empty"
    return UsageError(f"{source}: no items (the input is {what}); pass --allow-empty if that is expected")
