"""The steps file parser and the per-item rendering: pure, no database."""

from __future__ import annotations

import pytest

from job.db import parse_db_url
from job.db.steps import steps_handler
from job.db.stepsfile import is_identifier, load_steps, parse_steps
from job.errors import Permanent, UsageError


def sql_of(statement) -> str:
    """A statement with its binds as <:name> and placeholders as <{name}>, for comparing."""
    return "".join(v if k == "sql" else (f"<:{v}>" if k == "bind" else f"<{{{v}}}>")
                   for k, v in statement.parts)


def statements(text: str, dialect: str = "oracle") -> list[str]:
    parsed = parse_steps(text, dialect=dialect)
    return [sql_of(st) for step in parsed.steps for st in step.statements]


def test_steps_statements_and_lines():
    parsed = parse_steps("-- header comment\n\n-- step: stage\nDELETE FROM s WHERE d = :d;\n"
                         "INSERT INTO s SELECT * FROM r WHERE d = :d;\n\n-- step: publish\n"
                         "UPDATE t SET v = 1\n", dialect="postgres")
    assert [(s.name, s.line) for s in parsed.steps] == [("stage", 3), ("publish", 7)]
    first, second = parsed.steps[0].statements
    assert sql_of(first) == "DELETE FROM s WHERE d = <:d>" and first.line == 4
    assert sql_of(second) == "INSERT INTO s SELECT * FROM r WHERE d = <:d>" and second.line == 5
    # The last statement of a step needs no `;`.
    assert sql_of(parsed.steps[1].statements[0]) == "UPDATE t SET v = 1"


@pytest.mark.parametrize("sql, expected", [
    ("SELECT ';' FROM t WHERE a = 'it''s; :x' AND b = :b;", ["SELECT ';' FROM t WHERE a = 'it''s; :x' AND b = <:b>"]),
    ('SELECT "odd;name" FROM t;', ['SELECT "odd;name" FROM t']),
    ("SELECT 1 -- a comment; :no\nFROM dual;", ["SELECT 1 -- a comment; :no\nFROM dual"]),
    ("SELECT /* ; :no */ 1 FROM dual;", ["SELECT /* ; :no */ 1 FROM dual"]),
    ("SELECT q'[it's; :no]' FROM dual;", ["SELECT q'[it's; :no]' FROM dual"]),
    ("SELECT Q'{a;b}', nq'!x;y!' FROM dual;", ["SELECT Q'{a;b}', nq'!x;y!' FROM dual"]),
    ("SELECT * FROM v$session WHERE sid = :sid;", ["SELECT * FROM v$session WHERE sid = <:sid>"]),
    ("SELECT 1 FROM dual\n/\nSELECT 2 FROM dual\n/\n", ["SELECT 1 FROM dual", "SELECT 2 FROM dual"]),
])
def test_oracle_splitting_respects_quotes_and_comments(sql, expected):
    assert statements("-- step: s\n" + sql) == expected


def test_oracle_plsql_block_keeps_inner_semicolons_and_ends_at_slash():
    text = ("-- step: s\nDECLARE\n  n NUMBER;\nBEGIN\n  n := :v;\n  UPDATE t SET x = n;\nEND;\n/\n"
            "INSERT INTO t VALUES (1);\n")
    assert statements(text) == ["DECLARE\n  n NUMBER;\nBEGIN\n  n := <:v>;\n  UPDATE t SET x = n;\nEND;",
                                "INSERT INTO t VALUES (1)"]


def test_oracle_stored_unit_is_sent_as_is():
    text = ("-- step: s\nCREATE OR REPLACE EDITIONABLE TRIGGER trg BEFORE INSERT ON t FOR EACH ROW\n"
            "BEGIN\n  :new.id := 1;\nEND;\n/\nCREATE TABLE x (type VARCHAR2(9), :y NUMBER);\n")
    parsed = parse_steps(text, dialect="oracle")
    trigger, table = parsed.steps[0].statements
    assert trigger.binds == () and sql_of(trigger).endswith(":new.id := 1;\nEND;")
    # A column named TYPE does not make a table a PL/SQL unit.
    assert table.binds == ("y",)


def test_postgres_dollar_quotes_casts_and_escapes():
    text = ("-- step: s\nCREATE FUNCTION f() RETURNS int AS $body$ BEGIN RETURN 1; END; $body$ LANGUAGE plpgsql;\n"
            "SELECT :v::text, E'it\\'s; :no', $$a;b$$, x::int FROM t;\nDO $$ BEGIN PERFORM 1; END $$;\n")
    assert statements(text, "postgres") == [
        "CREATE FUNCTION f() RETURNS int AS $body$ BEGIN RETURN 1; END; $body$ LANGUAGE plpgsql",
        "SELECT <:v>::text, E'it\\'s; :no', $$a;b$$, x::int FROM t",
        "DO $$ BEGIN PERFORM 1; END $$",
    ]


def test_sqlite_trigger_body_is_one_statement():
    text = "-- step: s\nCREATE TRIGGER tr AFTER INSERT ON a BEGIN INSERT INTO b VALUES (1); DELETE FROM c; END;\nSELECT 1;\n"
    assert statements(text, "sqlite") == [
        "CREATE TRIGGER tr AFTER INSERT ON a BEGIN INSERT INTO b VALUES (1); DELETE FROM c; END", "SELECT 1"]


def test_binds_are_per_statement_in_order():
    parsed = parse_steps("-- step: s\nSELECT :b, :a, :b FROM t;\nSELECT :c FROM t;\n", dialect="sqlite")
    assert [st.binds for st in parsed.steps[0].statements] == [("b", "a"), ("c",)]


def test_render_passes_only_the_binds_a_statement_uses():
    parsed = parse_steps("-- step: s\nDELETE FROM {t} WHERE d = :d;\nINSERT INTO log VALUES (:id, :obj);\n",
                         dialect="oracle")
    (step,) = parsed.render({"t": "app.sales", "d": "2026-01-01", "id": 5, "obj": {"a": 1}, "extra": 1},
                            "named")
    assert step.statements == (("DELETE FROM app.sales WHERE d = :d", {"d": "2026-01-01"}),
                               ("INSERT INTO log VALUES (:id, :obj)", {"id": 5, "obj": '{"a": 1}'}))


def test_render_pyformat_escapes_percent_only_with_binds():
    parsed = parse_steps("-- step: s\nSELECT '5%' WHERE x = :x;\nSELECT '5%';\n", dialect="postgres")
    (step,) = parsed.render({"x": 1}, "pyformat")
    assert step.statements == (("SELECT '5%%' WHERE x = %(x)s", {"x": 1}), ("SELECT '5%'", None))


def test_bind_matches_payload_key_ignoring_case():
    parsed = parse_steps("-- step: s\nSELECT :DT FROM dual;\n", dialect="oracle")
    assert parsed.render({"dt": "x"}, "named")[0].statements[0][1] == {"DT": "x"}


@pytest.mark.parametrize("value, ok", [
    ("sales", True), ("app.sales_2026", True), ("SYS$X#1", True), ("_t", True),
    ("t; DROP TABLE x", False), ("a.b.c", False), ("1abc", False), ('"quoted"', False),
    ("t--", False), ("t x", False), ("", False), (None, False), (5, False), ("é", False), ("a" * 129, False),
])
def test_is_identifier(value, ok):
    assert is_identifier(value) is ok


def test_unsafe_identifier_is_refused_before_any_sql():
    parsed = parse_steps("-- step: s\nINSERT INTO {target} VALUES (:v);\n", dialect="oracle")
    assert parsed.problems({"target": "t; DROP TABLE x", "v": 1}) == [
        "{target}: 't; DROP TABLE x' is not a plain SQL identifier; refused"]
    with pytest.raises(Permanent) as e:
        parsed.render({"target": "t; DROP TABLE x", "v": 1}, "named")
    assert e.value.code == "SQL-IDENTIFIER" and "DROP TABLE" in str(e.value)


def test_missing_bind_is_refused():
    parsed = parse_steps("-- step: s\nDELETE FROM t WHERE d = :dt;\n", dialect="postgres")
    with pytest.raises(Permanent) as e:
        parsed.render({"day": "2026-01-01"}, "pyformat")
    assert e.value.code == "SQL-BIND" and ":dt" in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("", "no steps"),
    ("   \n-- only a comment\n", "no steps"),
    ("SELECT 1;\n-- step: a\nSELECT 2;\n", ":1: SQL before the first"),
    ("-- step: a\n-- step: b\nSELECT 1;\n", ":1: step 'a' has no SQL"),
    ("-- step: a\nSELECT 1;\n-- step: a\nSELECT 2;\n", ":3: step 'a' appears twice"),
    ("-- step: load the data\nSELECT 1;\n", "step name 'load the data'"),
    ("-- step: a\nSELECT 'unterminated;\n", ":2: unterminated ' quote"),
    ("-- step: a\nSELECT /* open\n", ":2: unterminated /* comment"),
    ("-- step: a\nSELECT 1;\nCOMMIT;\n", ":3: COMMIT: transaction control"),
    ("-- step: a\nROLLBACK TO SAVEPOINT x;\n", "ROLLBACK: transaction control"),
    ("-- step: a\nBEGIN;\n", "transaction control"),
])
def test_bad_steps_files(text, message):
    with pytest.raises(UsageError) as e:
        parse_steps(text, dialect="oracle", source="f.sql")
    assert message in str(e.value)


def test_postgres_begin_is_transaction_control():
    with pytest.raises(UsageError, match="BEGIN: transaction control"):
        parse_steps("-- step: a\nBEGIN;\nSELECT 1;\n", dialect="postgres")


def test_empty_file_and_missing_file(tmp_path):
    empty = tmp_path / "empty.sql"
    empty.write_text("\n \n")
    with pytest.raises(UsageError, match="empty"):
        load_steps(str(empty), dialect="sqlite")
    with pytest.raises(UsageError, match="no such file"):
        load_steps(str(tmp_path / "missing.sql"), dialect="sqlite")


def test_steps_handler_needs_db_and_checks_payloads(tmp_path):
    path = tmp_path / "s.sql"
    path.write_text("-- step: a\nINSERT INTO {t} VALUES (:v);\n")
    with pytest.raises(UsageError, match="needs --db"):
        steps_handler(str(path), None)
    handler = steps_handler(str(path), parse_db_url("sqlite:///x.db"))
    assert handler.check_payload({"t": "ok", "v": 1}) == []
    assert len(handler.check_payload({"t": "x y"})) == 2
