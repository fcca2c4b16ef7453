"""Item parsing and the two-pass reading of the input: pure functions, plain tests."""

import pytest

from job.items import Invalid, Item, iter_items, parse_line, scan
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


def test_invalid_payload_keeps_the_id_for_the_record():
    parsed = parse_line(b'{"id": "a", "payload": 3}', 5)
    assert parsed.record_id == "a"
    assert parse_line(b"{", 9).record_id == "#line-9"


def lines(*texts):
    return iter([t.encode() + b"\n" for t in texts])


def test_scan_counts_blank_lines_and_finds_duplicates():
    result = scan(lines('{"id": 1}', "", '{"id": 2}', '{"id": "1"}', "oops"), shard_index=0, shard_count=1)
    assert result.lines == 5
    assert result.shard_items == 2
    assert [(i.line, i.reason) for i in result.invalid] == [
        (4, "duplicate id '1' (first on line 1)"), (5, result.invalid[1].reason)]
    assert result.skip_lines == {2, 4, 5}


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
