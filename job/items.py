"""Work items: parsing and validating JSON Lines, and reading the shard's items in two passes.

The first pass (`scan`) reads every line once, so that bad input stops the run before any item
runs; the second (`iter_items`) streams the shard's items again, so that a million items are
never held in memory at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError, UsageError
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
        obj = json.loads(text)
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


@dataclass(slots=True)
class Scan:
    """What the first pass learned about the input, for one shard."""

    lines: int = 0
    valid: int = 0
    shard_items: int = 0
    invalid: list[Invalid] = field(default_factory=list)
    #: Valid lines per shard (repeats of another shard's ids included: only that shard sees them).
    per_shard: list[int] = field(default_factory=list)
    #: Line numbers the second pass must skip: invalid lines and repeated ids.
    skip_lines: set[int] = field(default_factory=set)

    def shard_invalid(self, shard_index: int, shard_count: int) -> list[Invalid]:
        """Invalid lines recorded by this shard: each by exactly one shard, a repeated id by the
        shard that found it (the only one that can)."""
        return [i for i in self.invalid if i.recorded_by(shard_count) == shard_index]

    @property
    def empty(self) -> bool:
        """The input holds no item and no invalid line (nothing, or blank lines only)."""
        return self.valid == 0 and not self.invalid


def scan(lines: Iterator[bytes], *, shard_index: int, shard_count: int,
         max_bytes: int = MAX_LINE_BYTES) -> Scan:
    """First pass: validate every line and count this shard's items.

    Repeated ids are found within this shard only, which is enough: equal ids hash to the
    same shard, so every shard reports a repeat of its own ids and none misses one.
    """
    result = Scan(per_shard=[0] * shard_count)
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        result.lines = number
        parsed = parse_line(raw.rstrip(b"\r\n"), number, max_bytes=max_bytes)
        if parsed is None:
            result.skip_lines.add(number)
            continue
        if isinstance(parsed, Invalid):
            result.invalid.append(parsed)
            result.skip_lines.add(number)
            continue
        shard = shard_of(parsed.id, shard_count)
        if shard != shard_index:
            result.valid += 1
            result.per_shard[shard] += 1
            continue
        earlier = first_seen.setdefault(parsed.id, number)
        if earlier != number:
            result.invalid.append(Invalid(number, f"duplicate id {parsed.id!r} (first on line {earlier})",
                                          shard=shard_index))
            result.skip_lines.add(number)
            continue
        result.valid += 1
        result.shard_items += 1
        result.per_shard[shard] += 1
    return result


def iter_items(lines: Iterator[bytes], *, shard_index: int, shard_count: int,
               skip_lines: set[int]) -> Iterator[Item]:
    """Second pass: yield this shard's valid items in file order."""
    for number, raw in enumerate(lines, start=1):
        if number in skip_lines:
            continue
        parsed = parse_line(raw.rstrip(b"\r\n"), number, max_bytes=1 << 62)
        if isinstance(parsed, Item) and shard_of(parsed.id, shard_count) == shard_index:
            yield parsed


def input_error(source: str, invalid: list[Invalid]) -> InputError:
    """The error that stops a run on bad input: the first problems, and how many more."""
    shown = [f"line {i.line}: {i.reason}" for i in invalid[:SHOWN_PROBLEMS]]
    return InputError(source, shown, more=max(0, len(invalid) - SHOWN_PROBLEMS))


def no_items_error(source: str, scan: Scan) -> UsageError:
    """The error that stops a run whose input holds no items (unless --allow-empty)."""
    what = f"{scan.lines} blank line(s)" if scan.lines else "empty"
    return UsageError(f"{source}: no items (the input is {what}); pass --allow-empty if that is expected")
