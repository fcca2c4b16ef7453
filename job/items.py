"""Work items: parsing and validating JSON Lines, and reading the shard's items in two passes.

The first pass (`scan`) reads every line once, so that bad input stops the run before any item
runs; the second (`iter_items`) streams the shard's items again, so that a million items are
never held in memory at once. On a resume, the first pass is told which items are finished:
a line whose id can be read without parsing it (`"id"` first, as bulkjob's own examples and
most producers write it) and names a finished item is counted and marked, not parsed (it was
validated when it first ran), and the second pass skips it without parsing either. A resume
of a million finished items then costs a scan of their ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
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
#: The id at the start of a line, when it can be read without parsing the line: a plain string
#: (no escapes, no control characters) or an integer, right after the opening brace.
_LEADING_ID = re.compile(rb'\{\s*"id"\s*:\s*(?:"([^"\\\x00-\x1f]{1,512})"|(-?(?:0|[1-9]\d{0,29})))\s*[,}]')


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


def scan(lines: Iterator[bytes], *, shard_index: int, shard_count: int,
         max_bytes: int = MAX_LINE_BYTES, finished: Callable[[str], bool] | None = None) -> Scan:
    """First pass: validate every line and count this shard's items.

    Repeated ids are found within this shard only, which is enough: equal ids hash to the
    same shard, so every shard reports a repeat of its own ids and none misses one.
    `finished(id)` (on a resume) says an item needs no run: its line is marked to be skipped,
    and when its id can be read without parsing (`leading_id`), it is not parsed at all.
    """
    result = Scan(per_shard=[0] * shard_count)
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        result.lines = number
        if finished is not None and len(raw) <= max_bytes:
            item_id = leading_id(raw)
            if item_id is not None and finished(item_id):
                shard = shard_of(item_id, shard_count)
                result.valid += 1
                result.per_shard[shard] += 1
                if shard == shard_index:
                    earlier = first_seen.setdefault(item_id, number)
                    if earlier != number:
                        result.invalid.append(Invalid(number, f"duplicate id {item_id!r} (first on line {earlier})",
                                                      shard=shard_index))
                        result.valid -= 1
                    else:
                        result.shard_items += 1
                        result.finished += 1
                    result.skip_lines.add(number)
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
        if finished is not None and finished(parsed.id):
            result.finished += 1
            result.skip_lines.add(number)
    return result


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
