"""Item parsing and the two-pass reading of the input: pure functions, plain tests."""

import json

import pytest

from job.items import Invalid, Item, invalid_line_id, iter_items, leading_id, line_of, parse_line, scan
from job.shard import shard_of


@pytest.mark.parametrize("raw, expected", [
    (b'{"id": "a", "payload": {"x": 1}}', Item("a", {"x": 1})),
    (b'{"id": 7}', Item("7", {})),
    (b'{"id": "b", "payload": null}', Item("b", {})),
    (b'{"id": "../../etc/passwd"}', Item("../../etc/passwd", {})),
    (b'  ', None),
    (b'', None),
])
def test_valid_lines(raw, expected):
    assert parse_line(raw, 1) == expected


@pytest.mark.parametrize("raw, reason", [
    (b'{"id": "a"', "bad JSON"),
    (b'[1, 2]', "expected a JSON object"),
    (b'{"payload": {}}', 'missing "id"'),
    (b'{"id": ""}', '"id" is empty'),
    (b'{"id": null}', '"id" must be a string or an integer'),
    (b'{"id": true}', '"id" must be a string or an integer'),
    (b'{"id": 1.5}', '"id" must be a string or an integer'),
    (b'{"id": "a", "payload": [1]}', '"payload" must be an object'),
    (b'{"id": "a", "payload": "x"}', '"payload" must be an object'),
    (b'{"id": "a\\u0000b"}', "control characters"),
    (b'{"id": "line\\nbreak"}', "control characters"),
    (b'{"id": "\xff\xfe"}', "not UTF-8"),
    (b'{"id": "' + b"x" * 600 + b'"}', "longer than 512"),
])
def test_invalid_lines(raw, reason):
    parsed = parse_line(raw, 12)
    assert isinstance(parsed, Invalid)
    assert parsed.line == 12
    assert reason in parsed.reason


def test_line_size_limit():
    raw = b'{"id": "a", "payload": {"blob": "' + b"x" * 2000 + b'"}}'
    assert isinstance(parse_line(raw, 1, max_bytes=1000), Invalid)
    assert isinstance(parse_line(raw, 1, max_bytes=4000), Item)


def test_an_invalid_line_is_recorded_under_its_line_never_an_item_id():
    parsed = parse_line(b'{"id": "a", "payload": 3}', 5)
    assert parsed.id == "a" and parsed.record_id == invalid_line_id(5) != "a"
    record = parsed.record(at=1.0)
    assert (record["id"], record["line"], record["item_id"], record["state"]) == (invalid_line_id(5), 5, "a", "failed")
    assert record["error"]["kind"] == "invalid"
    assert parse_line(b"{", 9).record_id == invalid_line_id(9)
    assert line_of(invalid_line_id(9)) == 9 and line_of("#line-9") is None and line_of("9") is None
    # No line that parses as an item can have the id of an invalid line: it holds a control character.
    as_item = parse_line(json.dumps({"id": invalid_line_id(9)}).encode(), 1)
    assert isinstance(as_item, Invalid) and "control characters" in as_item.reason


@pytest.mark.parametrize("raw, reason", [
    (b'{"id": "deep", "payload": {"x": ' + b"[" * 2000 + b"]" * 2000 + b"}}", "nested deeper than 200"),
    (b'{"id": "deep", "payload": {"x": ' + b"[" * 201 + b"]" * 201 + b"}}", "nested deeper than 200"),
    (b"[" * 100000, "nested deeper than 200"),
    (b'{"id": "s\\ud800"}', "lone surrogate"),
    (b'{"id": "a", "payload": {"k": ["\\udfff"]}}', "lone surrogate"),
    (b'{"id": "a", "payload": {"\\ud83d": 1}}', "lone surrogate"),
    (b'{"id": "a\xed\xa0\x80"}', "not UTF-8"),
])
def test_lines_that_would_crash_later_are_invalid(raw, reason):
    parsed = parse_line(raw, 4)
    assert isinstance(parsed, Invalid) and parsed.line == 4 and reason in parsed.reason, parsed


@pytest.mark.parametrize("raw, expected", [
    (b'{"id": "ok", "payload": {"x": ' + b"[" * 198 + b"]" * 198 + b"}}", "ok"),  # 200 levels in all
    (b'{"id": "ok", "payload": {"x": "' + b"[" * 500 + b'"}}', "ok"),  # brackets in a string
    (b'{"id": "s\\ud83d\\ude00"}', "s\U0001f600"),  # a surrogate pair is one character
    (b'{"id": "ok", "payload": {"x": "\\\\ud800"}}', "ok"),  # an escaped backslash, not an escape
])
def test_deep_enough_and_escaped_lines_are_valid(raw, expected):
    parsed = parse_line(raw, 1)
    assert isinstance(parsed, Item) and parsed.id == expected, parsed


def lines(*texts):
    return iter([t.encode() + b"\n" for t in texts])


def test_scan_counts_blank_lines_and_finds_duplicates():
    result = scan(lines('{"id": 1}', "", '{"id": 2}', '{"id": "1"}', "oops"), shard_index=0, shard_count=1)
    assert result.lines == 5
    assert result.shard_items == 2
    assert [(i.line, i.reason) for i in result.invalid] == [
        (4, "duplicate id '1' (first on line 1)"), (5, result.invalid[1].reason)]
    assert set(result.skip_lines) == {2, 4, 5}


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_the_items(count):
    texts = [f'{{"id": "item-{i}"}}' for i in range(300)]
    seen = []
    for index in range(count):
        result = scan(lines(*texts), shard_index=index, shard_count=count)
        got = list(iter_items(lines(*texts), shard_index=index, shard_count=count, skip_lines=result.skip_lines))
        assert len(got) == result.shard_items
        assert all(shard_of(item.id, count) == index for item in got)
        seen += [item.id for item in got]
    assert sorted(seen) == sorted(f"item-{i}" for i in range(300))


def test_shard_of_is_stable_and_spread():
    # Fixed values: a change here would move items between shards of a running Indexed Job.
    assert [shard_of(f"id-{i}", 4) for i in range(8)] == [0, 2, 0, 0, 2, 1, 0, 1]
    counts = [0] * 4
    for i in range(4000):
        counts[shard_of(str(i), 4)] += 1
    assert min(counts) > 800
    assert shard_of("anything", 1) == 0


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_each_invalid_line_is_recorded_by_exactly_one_shard(count):
    # Repeats are found only by the shard their id belongs to; other invalid lines by everyone.
    texts = [f'{{"id": "r{i % 40}"}}' if i % 3 else "{bad" for i in range(120)]
    recorded = []
    for index in range(count):
        result = scan(lines(*texts), shard_index=index, shard_count=count)
        recorded += [i.line for i in result.shard_invalid(index, count)]
    repeats = [n + 1 for n, t in enumerate(texts) if t != "{bad" and t in texts[:n]]
    bad = [n + 1 for n, t in enumerate(texts) if t == "{bad"]
    assert sorted(recorded) == sorted(repeats + bad)


@pytest.mark.parametrize("texts, empty", [
    ([], True), (["", "  ", ""], True), (["{bad"], False), (['{"id": 1}'], False),
])
def test_an_input_without_items_is_empty(texts, empty):
    assert scan(lines(*texts), shard_index=0, shard_count=1).empty is empty


@pytest.mark.parametrize("raw, expected", [
    (b'{"id": "a-1", "payload": {"x": 1}}', "a-1"),
    (b'  {"id":"caf\xc3\xa9"}', "café"),
    (b'{"id": 17, "payload": {}}', "17"),
    (b'{"id": -0}', "0"),             # what JSON reads: the integer 0
    (b'{"id": 007}', None),           # not JSON: parsed, and refused there
    (b'{"id": "a\\"b"}', None),       # escapes: parsed
    (b'{"payload": {}, "id": "z"}', None),
    (b'{"id": "a", "id": "b"}', None),  # JSON keeps the last: parsed
    (b'{"id": "a", "payload": {"id": 1}}', None),
    (b'{"id": ""}', None),
])
def test_a_leading_id_is_read_without_parsing_only_when_that_is_safe(raw, expected):
    assert leading_id(raw) == expected


def test_a_resume_scan_skips_finished_items_without_parsing_them():
    texts = ['{"id": "done-1", "payload": {"broken": ', '{"id": "todo"}', '{"id": "done-2"}', '',
             '{"id": "done-2"}', '{"payload": {}, "id": "done-3"}']
    finished = {"done-1", "done-2", "done-3"}
    result = scan(lines(*texts), shard_index=0, shard_count=1, finished=finished.__contains__)
    # Line 1 is not parsed (it was valid when it ran); line 5 repeats an id; line 6 is parsed.
    assert [(i.line, i.reason.split(" (")[0]) for i in result.invalid] == [(5, "duplicate id 'done-2'")]
    assert (result.shard_items, result.finished, result.to_run) == (4, 3, 1)
    assert set(result.skip_lines) == {1, 3, 4, 5, 6}
    got = list(iter_items(lines(*texts), shard_index=0, shard_count=1, skip_lines=result.skip_lines))
    assert got == [Item("todo", {})]


def test_a_resume_scan_counts_every_shard_alike():
    texts = [json.dumps({"id": f"i{n}"}) for n in range(200)]
    finished = {f"i{n}" for n in range(0, 200, 2)}
    fresh = [scan(lines(*texts), shard_index=k, shard_count=3) for k in range(3)]
    resumed = [scan(lines(*texts), shard_index=k, shard_count=3, finished=finished.__contains__) for k in range(3)]
    for a, b in zip(fresh, resumed, strict=True):
        assert (a.valid, a.shard_items, a.per_shard) == (b.valid, b.shard_items, b.per_shard)
    assert sum(r.finished for r in resumed) == 100
