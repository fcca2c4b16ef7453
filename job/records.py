"""What the manifest's objects hold and how they are read: records, segments and snapshot
sections, by name, in bounded memory (a block of lines at a time).

A record is one JSON object a line, as `encode_record` writes it. A segment is one gzip member:
a header line, then its records. A snapshot is gzip members: a header (what it covers, its
sections), then one member per section. A `Unit` is what a load applies as one step: a segment
or a section; `feed` adds a unit's records to a StatesBuilder, reading the plain done records
(nearly all of them) in bulk.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from .errors import ManifestCorrupt
from .itemstates import DONE, STATES, StatesBuilder, parse_done_ids

#: Manifest format version, in meta.json and every object's header; a newer one is refused
#: rather than misread.
FORMAT = 2
#: gzip level of segments: written every few seconds by the parent, so cheap (about 7 bytes per
#: done record of a no-op run, a twelfth of the JSON) rather than smallest.
SEGMENT_LEVEL = 1
#: Bytes of decompressed text handled at a time while reading: bounds the memory of a read.
READ_CHUNK = 1 << 20

_SEG = re.compile(r"(?:^|/)seg-g(\d{6})-(\d{10})\.jsonl\.gz$")
_SNAP = re.compile(r"(?:^|/)snap-g(\d{6})-(\d{10})\.jsonl\.gz$")
_SEG1 = re.compile(r"(?:^|/)seg-(\d{10})\.jsonl$")
_SNAP1 = re.compile(r"(?:^|/)snap-(\d{10})\.jsonl\.gz$")
#: The start of a record as encode_record writes it: enough to fold a done record without
#: decoding it (ids with escapes and other states are decoded in full).
_FAST = re.compile(rb'\{"id":"((?:[^"\\]|\\.)*)","state":"(done|failed|partial|running)","attempts":(\d+)[,}]')
#: Done records whose id has no escapes, one a line: what most of a segment is.
_DONE_LINES = re.compile(rb'^\{"id":"([^"\\\n]*)","state":"done","attempts":(\d+)[,}]', re.M)


#: One encoder for every record: json.dumps with arguments builds a new one per call, which
#: cost as much as the encoding itself (the parent encodes one record per item).
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


def encode_record(record: dict[str, Any]) -> bytes:
    return _ENCODER.encode(record).encode() + b"\n"


def segment_name(generation: int, seq: int) -> str:
    return f"seg-g{generation:06d}-{seq:010d}.jsonl.gz"


def snapshot_name(generation: int, seq: int) -> str:
    return f"snap-g{generation:06d}-{seq:010d}.jsonl.gz"


@dataclass(frozen=True, slots=True)
class ObjectName:
    """A manifest object by its key: a segment or a snapshot, its generation and sequence."""

    key: str
    kind: str  # "seg" or "snap"
    gen: int
    seq: int
    fmt: int


def parse_name(key: str) -> ObjectName | None:
    for pattern, kind, fmt in ((_SEG, "seg", 2), (_SNAP, "snap", 2), (_SEG1, "seg", 1), (_SNAP1, "snap", 1)):
        m = pattern.search(key)
        if m:
            gen, seq = (int(m.group(1)), int(m.group(2))) if fmt == 2 else (0, int(m.group(1)))
            return ObjectName(key, kind, gen, seq, fmt)
    return None


def iter_blocks(data: bytes | memoryview, key: str, *, compressed: bool) -> Iterator[list[bytes]]:
    """The non-empty lines of `data` (one gzip member, or plain text) in blocks, decompressing at
    most READ_CHUNK bytes at a time; ManifestCorrupt if the gzip stream is damaged or cut."""
    if not compressed:
        lines = bytes(data).split(b"\n")
        for start in range(0, len(lines), 10000):
            yield [line for line in lines[start:start + 10000] if line]
        return
    d = zlib.decompressobj(wbits=31)
    rest = b""
    try:
        chunk = d.decompress(bytes(data), READ_CHUNK)
        while True:
            text = rest + chunk
            cut = text.rfind(b"\n")
            if cut >= 0:
                yield [line for line in text[:cut].split(b"\n") if line]
                rest = text[cut + 1:]
            else:
                rest = text
            if d.eof:
                break
            chunk = d.decompress(d.unconsumed_tail, READ_CHUNK) if d.unconsumed_tail else d.flush()
            if not chunk and not d.eof:
                raise ManifestCorrupt(f"{key}: not a complete gzip stream (cut short)")
    except zlib.error as e:
        raise ManifestCorrupt(f"{key}: not a complete gzip stream ({e})") from None
    if rest.strip():
        yield [rest]


def parse_record(line: bytes, key: str, *, whole: bool = False
                 ) -> tuple[str, str, int, dict[str, Any] | None, bytes | None]:
    """(id, state, attempts, record, raw id) of one line. Unless `whole`, a done record is read
    from its start only (`record` None, `raw id` the id as written, JSON-escaped); any other
    is decoded."""
    m = None if whole else _FAST.match(line)
    if m is not None and m.group(2) == b"done":
        raw = m.group(1)
        try:
            item_id = raw.decode() if b"\\" not in raw else json.loads(b'"' + raw + b'"')
        except ValueError:
            raise ManifestCorrupt(f"{key}: a record's id is not valid") from None
        return item_id, DONE, int(m.group(3)), None, raw
    try:
        record = json.loads(line)
    except ValueError as e:
        raise ManifestCorrupt(f"{key}: a line is not valid JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str) or record.get("state") not in STATES:
        raise ManifestCorrupt(f"{key}: a line is not a manifest record")
    try:
        attempts = int(record.get("attempts") or 0)
    except (TypeError, ValueError):
        raise ManifestCorrupt(f"{key}: a record's attempts is not a number") from None
    return record["id"], record["state"], attempts, record, None


# -- objects ---------------------------------------------------------------------------------

def encode_segment(generation: int, seq: int, lines: list[bytes], *, written_at: float) -> bytes:
    header = json.dumps({"format": FORMAT, "gen": generation, "seq": seq, "records": len(lines),
                         "written_at": written_at}).encode() + b"\n"
    return gzip.compress(header + b"".join(lines), compresslevel=SEGMENT_LEVEL, mtime=0)


def segment_header(data: bytes, name: ObjectName) -> dict[str, Any]:
    """The header line of a segment; ManifestCorrupt if it cannot be read."""
    if name.fmt == 1:
        first = data.partition(b"\n")[0]
    else:
        try:
            first = zlib.decompressobj(wbits=31).decompress(data, 4096).partition(b"\n")[0]
        except zlib.error:
            raise ManifestCorrupt(f"{name.key}: not a gzip stream") from None
    try:
        header = json.loads(first)
        int(header["records"])
    except (ValueError, KeyError, TypeError):
        raise ManifestCorrupt(f"{name.key}: the header line is damaged") from None
    if not isinstance(header, dict):
        raise ManifestCorrupt(f"{name.key}: the header line is damaged")
    if int(header.get("format", 1)) > FORMAT:
        raise ManifestCorrupt(f"{name.key}: unknown manifest format {header.get('format')}")
    return header


@dataclass(frozen=True, slots=True)
class Section:
    """A part of a snapshot: the records of one generation (`kind` "records"), or the ids of its
    items done with `attempts` attempts and no result (`kind` "done")."""

    gen: int
    upto: int
    kind: str
    attempts: int
    records: int
    offset: int
    length: int


def snapshot_header(data: bytes, name: ObjectName) -> tuple[dict[str, Any], list[Section]]:
    """A snapshot's header and its sections (offsets into `data`)."""
    if name.fmt == 1:
        # The first format: gzip members of records, no header; it covers the segments up to
        # its own sequence number (and older snapshots).
        return {"covers_upto": name.seq}, [Section(0, name.seq, "records", 0, -1, 0, len(data))]
    d = zlib.decompressobj(wbits=31)
    try:
        text = d.decompress(data)
    except zlib.error:
        raise ManifestCorrupt(f"{name.key}: not a gzip stream") from None
    if not d.eof:
        raise ManifestCorrupt(f"{name.key}: the header is cut short")
    try:
        header = json.loads(text)
        if int(header.get("format", 0)) > FORMAT:
            raise ManifestCorrupt(f"{name.key}: unknown manifest format {header.get('format')}")
        offset = len(data) - len(d.unused_data)
        sections = []
        for s in header["sections"]:
            sections.append(Section(int(s["gen"]), int(s["upto"]), str(s["kind"]), int(s.get("attempts", 0)),
                                    int(s["records"]), offset, int(s["bytes"])))
            offset += int(s["bytes"])
    except (ValueError, KeyError, TypeError):
        raise ManifestCorrupt(f"{name.key}: the header is damaged") from None
    if offset != len(data):
        raise ManifestCorrupt(f"{name.key}: {len(data)} bytes, the header announces {offset}")
    return header, sections


@dataclass(frozen=True, slots=True)
class Unit:
    """Records applied as one step of a load: a segment, or a section of a snapshot."""

    key: str
    gen: int
    upto: int
    kind: str  # "segment", "records" or "done"
    attempts: int
    data: bytes
    start: int
    end: int
    compressed: bool = True
    #: Records announced by the header (-1 when unknown).
    expected: int = -1

    @property
    def order(self) -> tuple[int, int, int, str]:
        return self.gen, self.upto, 1 if self.kind == "segment" else 0, self.key


def unit_blocks(unit: Unit) -> Iterator[list[bytes]]:
    """The record lines of a unit in blocks (a segment's header line left out); ManifestCorrupt
    if the unit does not hold the records its header announced."""
    view = memoryview(unit.data)[unit.start:unit.end]
    seen = 0
    first = unit.kind == "segment"
    if unit.kind in ("records", "done") and unit.compressed and unit.expected < 0:
        # A first-format snapshot: several gzip members of records.
        for member in _members(bytes(view), unit.key):
            for block in iter_blocks(member, unit.key, compressed=True):
                yield block
        return
    for block in iter_blocks(view, unit.key, compressed=unit.compressed):
        if first:
            block = block[1:]
            first = False
        seen += len(block)
        yield block
    if unit.expected >= 0 and seen != unit.expected:
        raise ManifestCorrupt(f"{unit.key}: truncated, {seen} of {unit.expected} records")


def _members(data: bytes, key: str) -> Iterator[bytes]:
    """The gzip members of a concatenated stream, each as bytes."""
    while data:
        d = zlib.decompressobj(wbits=31)
        try:
            d.decompress(data, 1)
            while not d.eof:
                if not d.unconsumed_tail:
                    raise ManifestCorrupt(f"{key}: not a complete gzip stream (cut short)")
                d.decompress(d.unconsumed_tail, READ_CHUNK)
        except zlib.error as e:
            raise ManifestCorrupt(f"{key}: not a complete gzip stream ({e})") from None
        used = len(data) - len(d.unused_data)
        yield data[:used]
        data = d.unused_data


def unit_records(unit: Unit, *, whole: bool = False
                 ) -> Iterator[tuple[str, str, int, dict[str, Any] | None, bytes | None]]:
    """(id, state, attempts, record or None, raw id or None) of each record of a unit; with
    `whole`, every record of a segment or records section is decoded in full."""
    if unit.kind == "done":
        for block in unit_blocks(unit):
            try:
                ids = parse_done_ids(block)
            except ValueError:
                raise ManifestCorrupt(f"{unit.key}: a done section is damaged") from None
            for item_id in ids:
                yield item_id, DONE, unit.attempts, None, None
        return
    for block in unit_blocks(unit):
        for line in block:
            yield parse_record(line, unit.key, whole=whole)


def as_record(item_id: str, state: str, attempts: int, record: dict[str, Any] | None) -> dict[str, Any]:
    return record if record is not None else {"id": item_id, "state": state, "attempts": attempts}


def feed(builder: StatesBuilder, unit: Unit) -> None:
    """Add a unit's records to a StatesBuilder."""
    if unit.kind == "done":
        for block in unit_blocks(unit):
            try:
                builder.add_done(parse_done_ids(block), unit.attempts)
            except ValueError:
                raise ManifestCorrupt(f"{unit.key}: a done section is damaged") from None
        return
    for block in unit_blocks(unit):
        # Most records are plain done ones: a block made only of those is read in one go.
        found = _DONE_LINES.findall(b"\n".join(block))
        if len(found) == len(block):
            try:
                ids = list(map(bytes.decode, map(itemgetter(0), found)))
            except UnicodeDecodeError:
                raise ManifestCorrupt(f"{unit.key}: a record's id is not valid UTF-8") from None
            builder.add_done(ids, list(map(int, map(itemgetter(1), found))))
            continue
        # A block with other records: keep the order, plain done lines still in bulk.
        plain: list[bytes] = []
        for line in block:
            if _DONE_LINES.match(line):
                plain.append(line)
                continue
            if plain:
                feed_done_lines(builder, plain, unit.key)
                plain = []
            item_id, state, attempts, record, _raw = parse_record(line, unit.key)
            builder.add(item_id, state, attempts, record)
        if plain:
            feed_done_lines(builder, plain, unit.key)


def feed_done_lines(builder: StatesBuilder, lines: list[bytes], key: str) -> None:
    """Add plain done record lines (each matches _DONE_LINES) in one go."""
    found = _DONE_LINES.findall(b"\n".join(lines))
    try:
        ids = list(map(bytes.decode, map(itemgetter(0), found)))
    except UnicodeDecodeError:
        raise ManifestCorrupt(f"{key}: a record's id is not valid UTF-8") from None
    builder.add_done(ids, list(map(int, map(itemgetter(1), found))))


def salvage_segment(name: ObjectName, data: bytes) -> Unit:
    """A damaged segment as a unit whose readable lines are kept (see salvaged)."""
    return Unit(name.key, name.gen, name.seq, "segment", 0, data, 0, len(data), compressed=name.fmt == 2)


def salvage_snapshot(name: ObjectName, data: bytes) -> Unit:
    """A snapshot whose header is damaged: every gzip member that can be read, each line kept
    if it is a record, or an id (a done section's line, its attempts unknown: counted as 1)."""
    lines: list[bytes] = []
    rest = data
    while rest:
        d = zlib.decompressobj(wbits=31)
        try:
            text = d.decompress(rest)
        except zlib.error:
            break
        for line in text.split(b"\n"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, str):
                lines.append(encode_record({"id": value, "state": DONE, "attempts": 1}))
            elif isinstance(value, dict) and isinstance(value.get("id"), str) and value.get("state") in STATES:
                lines.append(line + b"\n")
        if not d.eof:
            break
        rest = d.unused_data
    return _plain(Unit(name.key, name.gen, name.seq, "records", 0, b"", 0, 0), lines)


def salvaged(unit: Unit) -> Unit:
    """A unit holding only the lines of `unit` that parse as records (for repair)."""
    lines: list[bytes] = []
    try:
        if unit.kind == "done":
            for block in unit_blocks(unit):
                for line in block:
                    try:
                        item_id = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(item_id, str):
                        lines.append(encode_record({"id": item_id, "state": DONE, "attempts": unit.attempts}))
            return _plain(unit, lines)
        for block in _raw_blocks(unit):
            for line in block:
                try:
                    item_id, state, attempts, record, _raw = parse_record(line, unit.key, whole=True)
                except ManifestCorrupt:
                    continue
                lines.append(encode_record(as_record(item_id, state, attempts, record)))
    except ManifestCorrupt:
        pass  # a cut gzip stream: what came before the damage is kept
    return _plain(unit, lines)


def _raw_blocks(unit: Unit) -> Iterator[list[bytes]]:
    """Lines of a unit without the checks of unit_blocks (for salvage)."""
    view = memoryview(unit.data)[unit.start:unit.end]
    if not unit.compressed:
        yield bytes(view).split(b"\n")
        return
    d = zlib.decompressobj(wbits=31)
    text = b""
    try:
        text = d.decompress(bytes(view))
    except zlib.error:
        pass
    yield text.split(b"\n")


def _plain(unit: Unit, lines: list[bytes]) -> Unit:
    data = b"".join(lines)
    return Unit(unit.key, unit.gen, unit.upto, "records", 0, data, 0, len(data), compressed=False,
                expected=len(lines))
