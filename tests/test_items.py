"""Item parsing and the two-pass reading of the input: pure functions, plain tests."""

import json

import pytest

from job.items import Invalid, Item, invalid_line_id, iter_items, leading_id, line_of, parse_line, scan
from job.itemstates import ItemState, ItemStates
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
    result = scan(lines(*texts), shard_index=0, shard_count=1, finished=ItemStates({i: ItemState("done", 1) for i in finished}).finished(("done",)))
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
    resumed = [scan(lines(*texts), shard_index=k, shard_count=3, finished=ItemStates({i: ItemState("done", 1) for i in finished}).finished(("done",))) for k in range(3)]
    for a, b in zip(fresh, resumed, strict=True):
        assert (a.valid, a.shard_items, a.per_shard) == (b.valid, b.shard_items, b.per_shard)
    assert sum(r.finished for r in resumed) == 100


# -- the first pass in blocks: the same answers as line by line ---------------------------------

#: Lines of every shape the block path must either settle exactly as parse_line would, or hand
#: to the line-by-line path: plain items, other shapes of id, payloads, bad lines, repeats.
SHAPES = [
    '{"id": "p1", "payload": {"x": 1}}',
    '{"id":"p2"}',
    '  {"id" : "p3" , "payload": null}',
    '{"id": "p4", "payload": [1]}',                 # payload not an object
    '{"id": "p5", "payload": {"y": "id"}}',         # says "id" twice: parsed alone
    '{"id": 6}',                                    # an integer id
    '{"id": "a\\"b"}',                              # an escape in the id
    '{"payload": {}, "id": "p7"}',                  # id not first
    '{"id": "p8", "id": "p9"}',
    '{"id": "p10"} {"id": "p11"}',                  # two values on one line
    '{"id": "p12", "x": [1',                        # a line cut in two...
    '{"id": "p13"}]}',                              # ...whose rest would close it
    '{"id": "p14"}, {"z": 1}',
    '',
    '   ',
    'not json',
    '[1, 2]',
    '{"id": "del\x7f"}',                            # DEL: refused in an id
    '{"id": "sur", "payload": {"s": "\\ud800"}}',   # a lone surrogate
    '{"id": "d", "payload": ' + "[" * 250 + "]" * 250 + '}',
    '{"id": "caf\u00e9", "payload": {}}',            # not ASCII
    '{"id": "p15", "payload": {"n": NaN}}',
    '{"id": "p1"}',                                 # repeats p1
    '{"id":"p2"}',                                  # repeats p2
    '{"id": "p16"}\r',
    '{"id": "' + "x" * 600 + '"}',                  # id too long
]


def shaped_input(repeat_at: int = 3) -> list[bytes]:
    """SHAPES, among plain lines (so that whole blocks of every size form), some of them
    repeated far apart."""
    out = []
    for n in range(60):
        out.append(f'{{"id": "i{n}", "payload": {{"n": {n}}}}}')
        if n % repeat_at == 0 and n // repeat_at < len(SHAPES):
            out.append(SHAPES[n // repeat_at])
    out += SHAPES[:5] + [f'{{"id": "i{n}"}}' for n in range(0, 60, 7)]
    return [line.encode() + b"\n" for line in out]


def finished_states(kind: str, ids: set[str]):
    """The same finished items as a plain ItemStates or as the packed states a resume builds."""
    from job.itemstates import StatesBuilder

    if kind == "none":
        return None
    if kind == "dict":
        states = {f"todo{n}": ItemState("partial", 1) for n in range(5)}  # known, not finished
        states.update({i: ItemState("done", 1) for i in sorted(ids)})
        return ItemStates(states).finished(("done", "failed"))
    builder = StatesBuilder()
    for item_id in sorted(ids):
        builder.add(item_id, "running", 1)  # superseded: the last record of an id wins
    for n, item_id in enumerate(sorted(ids)):
        builder.add(item_id, "failed" if n % 5 == 0 else "done", 1)
    builder.add("i1", "partial", 2, {"id": "i1", "state": "partial", "attempts": 2, "progress": {"k": 1}})
    return builder.build().finished(("done", "failed"))


def scanned(monkeypatch, data: list[bytes], *, block: int | None, states: str, shard_index: int, shard_count: int):
    import job.items as items

    if block is None:
        monkeypatch.setattr(items, "_block", lambda *a, **k: None)  # line by line: the reference
    else:
        monkeypatch.setattr(items, "SCAN_BLOCK", block)
    finished = {f"i{n}" for n in range(0, 60, 2)} | {"p1", "p3", "p13", "a\"b", "6", "caf\u00e9"}
    finished = {i for i in finished if shard_of(i, shard_count) == shard_index}  # a shard records its own
    result = scan(iter(data), shard_index=shard_index, shard_count=shard_count, max_bytes=4000,
                  finished=finished_states(states, finished))
    monkeypatch.undo()
    return (result.lines, result.valid, result.shard_items, result.per_shard, result.finished,
            sorted(result.skip_lines), [(i.line, i.reason, i.id, i.shard) for i in result.invalid])


@pytest.mark.parametrize("states", ["none", "dict", "packed"])
@pytest.mark.parametrize("block", [1, 2, 5, 16, 4096])
@pytest.mark.parametrize("shard_index, shard_count", [(0, 1), (0, 3), (2, 3)])
def test_the_first_pass_in_blocks_answers_as_line_by_line(monkeypatch, states, block, shard_index, shard_count):
    data = shaped_input()
    reference = scanned(monkeypatch, data, block=None, states=states, shard_index=shard_index,
                        shard_count=shard_count)
    assert scanned(monkeypatch, data, block=block, states=states, shard_index=shard_index,
                   shard_count=shard_count) == reference


@pytest.mark.parametrize("states", ["none", "dict", "packed"])
def test_plain_blocks_are_settled_at_once_and_repeats_still_name_their_first_line(monkeypatch, states):
    """The block path is taken (not only fallen back from): plain lines, a repeat of a
    finished and of an unfinished item far apart, each named with the line it repeats."""
    import job.items as items

    data = [f'{{"id": "i{n}", "payload": {{}}}}\n'.encode() for n in range(100)]
    data += [b'{"id": "i2"}\n', b'{"id": "i3"}\n']  # i2 is finished (even), i3 is not
    settled = []
    real = items._block

    def spy(block, *args, **kwargs):
        answer = real(block, *args, **kwargs)
        settled.append(answer is True)
        return answer

    monkeypatch.setattr(items, "_block", spy)
    monkeypatch.setattr(items, "SCAN_BLOCK", 10)
    finished = finished_states(states, {f"i{n}" for n in range(0, 100, 2)})
    result = scan(iter(data), shard_index=0, shard_count=1, finished=finished)
    assert settled[:10] == [True] * 10 and settled[10] is False
    assert [(i.line, i.reason) for i in result.invalid] == [
        (101, "duplicate id 'i2' (first on line 3)"), (102, "duplicate id 'i3' (first on line 4)")]
    assert (result.valid, result.shard_items, result.finished) == (100, 100, 0 if states == "none" else 50)
    assert sorted(result.skip_lines) == sorted(([] if states == "none" else list(range(1, 101, 2))) + [101, 102])


@pytest.mark.parametrize("states", ["dict", "packed"])
@pytest.mark.parametrize("block", [64, 4096])
def test_a_half_done_resume_in_blocks_answers_as_line_by_line(monkeypatch, states, block):
    """Finished items first, then unfinished ones (where the packed states look at their bitmap
    first), a finished id given again among the unfinished, and back."""
    import job.items as items

    ids = [f"i{n}" for n in range(3000)]
    lines = [f'{{"id": "{i}"}}\n'.encode() for i in ids]
    data = lines[:1000] + lines[1000:2500] + [lines[10], lines[1500]] + lines[2500:] + [lines[20]]

    def run(reference):
        if reference:
            monkeypatch.setattr(items, "_block", lambda *a, **k: None)
        else:
            monkeypatch.setattr(items, "SCAN_BLOCK", block)
        result = scan(iter(data), shard_index=0, shard_count=1, finished=finished_states(states, set(ids[:1000])))
        monkeypatch.undo()
        return (result.valid, result.shard_items, result.finished, sorted(result.skip_lines),
                [(i.line, i.reason) for i in result.invalid])

    got = run(False)
    assert got == run(True)
    assert got[2] == (1000 if states == "dict" else 999)  # the packed states hold i1 partial
    assert [reason for _, reason in got[4]] == [
        "duplicate id 'i10' (first on line 11)", "duplicate id 'i1500' (first on line 1501)",
        "duplicate id 'i20' (first on line 21)"]


@pytest.mark.parametrize("states", ["none", "dict", "packed"])
@pytest.mark.parametrize("shard_count", [1, 3])
def test_a_trusted_first_pass_counts_what_a_checking_one_finds(monkeypatch, states, shard_count):
    """An input found wholly valid before: counting its lines gives what parsing them gives."""
    import job.items as items

    monkeypatch.setattr(items, "SCAN_BLOCK", 64)
    data = [f'{{"id": "i{n}", "payload": {{"n": {n}}}}}\n'.encode() for n in range(1000)]
    data.insert(500, b'{"payload": {}, "id": "other-shape"}\n')  # goes line by line either way

    def run(trusted):
        result = scan(iter(data), shard_index=0, shard_count=shard_count, trusted=trusted,
                      finished=finished_states(states, {f"i{n}" for n in range(0, 400)}))
        return (result.lines, result.valid, result.shard_items, result.per_shard, result.finished,
                sorted(result.skip_lines), result.invalid, result.digest)

    checked = run(None)
    assert checked[6] == [] and run(checked[7]) == checked
