"""The steps file parser and the per-item rendering: pure, no database."""

from __future__ import annotations

import pytest

from job.db import InvalidPayload, classifiers, parse_db_url
from job.db.identifiers import quote
from job.db.steps import steps_handler
from job.db.stepsfile import is_identifier
from job.db.stepsparse import load_steps, parse_steps
from job.db.transaction import commit_with_last
from job.errors import UsageError
from job.outcome import INVALID
from job.retry import classify

DIALECTS = ("oracle", "postgres", "sqlite")


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
    parsed = parse_steps("-- allow t: sales\n-- step: s\nDELETE FROM {t} WHERE d = :d;\n"
                         "INSERT INTO log VALUES (:id, :obj);\n", dialect="sqlite")
    (step,) = parsed.render({"t": "sales", "d": "2026-01-01", "id": 5, "obj": {"a": 1}, "extra": 1}, "named")
    assert step.statements == (('DELETE FROM "sales" WHERE d = :d', {"d": "2026-01-01"}),
                               ("INSERT INTO log VALUES (:id, :obj)", {"id": 5, "obj": '{"a": 1}'}))


@pytest.mark.parametrize("key", ["date", "from", "to", "size", "level", "mode", "user", "uid", "file", "start",
                                 "number", "order", "_private"])
def test_oracle_binds_go_out_numbered_so_reserved_words_work(key):
    # ORA-01745 refuses these as bind names; the payload's key names the value, not the bind.
    parsed = parse_steps(f"-- step: s\nUPDATE t SET v = :{key} WHERE k = :k AND w = :{key};\n", dialect="oracle")
    (step,) = parsed.render({key: "x", "k": 7}, "named")
    assert step.statements == (("UPDATE t SET v = :b1 WHERE k = :b2 AND w = :b1", {"b1": "x", "b2": 7}),)


def test_render_pyformat_escapes_percent_only_with_binds():
    parsed = parse_steps("-- step: s\nSELECT '5%' WHERE x = :x;\nSELECT '5%';\n", dialect="postgres")
    (step,) = parsed.render({"x": 1}, "pyformat")
    assert step.statements == (("SELECT '5%%' WHERE x = %(x)s", {"x": 1}), ("SELECT '5%'", None))


def test_bind_matches_payload_key_ignoring_case():
    parsed = parse_steps("-- step: s\nSELECT :DT;\n", dialect="sqlite")
    assert parsed.render({"dt": "x"}, "named")[0].statements[0][1] == {"DT": "x"}


@pytest.mark.parametrize("value, ok", [
    ("sales", True), ("app.sales_2026", True), ("SYS$X#1", True), ("_t", True),
    ("t; DROP TABLE x", False), ("a.b.c", False), ("1abc", False), ('"quoted"', False),
    ("t--", False), ("t x", False), ("", False), (None, False), (5, False), ("é", False), ("a" * 129, False),
])
def test_is_identifier(value, ok):
    assert is_identifier(value) is ok


def test_unsafe_identifier_is_refused_before_any_sql():
    parsed = parse_steps("-- allow target: t\n-- step: s\nINSERT INTO {target} VALUES (:v);\n", dialect="oracle")
    [problem] = parsed.problems({"target": "t; DROP TABLE x", "v": 1})
    assert problem.startswith("{target}: 't; DROP TABLE x' is not a plain name") and problem.endswith("refused")
    with pytest.raises(InvalidPayload) as e:
        parsed.render({"target": "t; DROP TABLE x", "v": 1}, "named")
    assert e.value.code == "SQL-IDENTIFIER" and "DROP TABLE" in str(e.value)
    # An invalid item, not a permanent failure of the database: it is never retried.
    failure = classify(e.value, classifiers=classifiers(parse_db_url("sqlite:///x.db")))
    assert (failure.kind, failure.code) == (INVALID, "SQL-IDENTIFIER")


def test_missing_bind_is_refused():
    parsed = parse_steps("-- step: s\nDELETE FROM t WHERE d = :dt;\n", dialect="postgres")
    with pytest.raises(InvalidPayload) as e:
        parsed.render({"day": "2026-01-01"}, "pyformat")
    assert e.value.code == "SQL-BIND" and ":dt" in str(e.value)


# -- identifiers by declaration ------------------------------------------------------------------

#: Each of these fails the item, whatever the declaration allows, on every database.
REJECTED = [
    pytest.param("TRUE", "reserved word", id="TRUE"),
    pytest.param("true", "reserved word", id="true"),
    pytest.param("NULL", "reserved word", id="NULL"),
    pytest.param("CURRENT_USER", "reserved word", id="CURRENT_USER"),
    pytest.param("ROWNUM", "reserved word", id="ROWNUM"),
    pytest.param("rowid", "reserved word", id="rowid"),
    pytest.param("pg_catalog.pg_authid", "not a plain name", id="schema-prefix"),
    pytest.param("sys.user$", "not a plain name", id="dollar"),
    pytest.param("id#id", "not a plain name", id="hash"),
    pytest.param("t; DROP TABLE x", "not a plain name", id="injection"),
    pytest.param('"quoted"', "not a plain name", id="quoted"),
    pytest.param("a b", "not a plain name", id="space"),
    pytest.param("1abc", "not a plain name", id="digit-first"),
    pytest.param("", "not a plain name", id="empty"),
    pytest.param("é", "not a plain name", id="non-ascii"),
    pytest.param(5, "not a plain name", id="number"),
    pytest.param(None, "not a plain name", id="null"),
    pytest.param(["t"], "not a plain name", id="list"),
    pytest.param("a" * 129, "longer than", id="too-long"),
]


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("value, why", REJECTED)
def test_identifier_forms_refused_on_every_dialect(dialect, value, why):
    parsed = parse_steps("-- allow col: /.*/\n-- step: s\nUPDATE t SET v = 1 WHERE {col} = :id;\n",
                         dialect=dialect)
    [problem] = parsed.problems({"col": value, "id": 1})
    assert problem.startswith("{col}: ") and why in problem and problem.endswith("; refused")
    with pytest.raises(InvalidPayload) as e:
        parsed.render({"col": value, "id": 1}, "named")
    assert e.value.code == "SQL-IDENTIFIER"


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("value", ["sales_2024", "SALES", "other"])
def test_identifier_outside_its_list_is_refused(dialect, value):
    parsed = parse_steps("-- allow table: sales_2025, Sales_2026\n-- step: s\nDELETE FROM {table};\n", dialect=dialect)
    [problem] = parsed.problems({"table": value})
    assert "is not among the names declared by `-- allow table: sales_2025, Sales_2026`" in problem


@pytest.mark.parametrize("dialect, value, sent", [
    ("oracle", "sales_2026", '"SALES_2026"'), ("oracle", "SALES_2025", '"SALES_2025"'),
    ("postgres", "Sales_2026", '"sales_2026"'), ("postgres", "sales_2025", '"sales_2025"'),
    ("sqlite", "Sales_2026", '"Sales_2026"'), ("sqlite", "SALES_2025", '"SALES_2025"'),
])
def test_identifier_is_sent_quoted_with_the_dialects_case_rule(dialect, value, sent):
    # Case does not matter against the list: each database folds unquoted names the same way.
    parsed = parse_steps("-- allow table: sales_2025, Sales_2026\n-- step: s\nDELETE FROM {table};\n", dialect=dialect)
    assert parsed.problems({"table": value}) == []
    assert parsed.render({"table": value}, "named")[0].statements[0][0] == f"DELETE FROM {sent}"
    assert quote(value, dialect) == sent


def test_identifier_pattern_matches_the_whole_value():
    parsed = parse_steps("-- allow region: /[a-z]{2}_[a-z]+/\n-- step: s\nSELECT * FROM {region};\n",
                         dialect="postgres")
    assert parsed.problems({"region": "eu_west"}) == []
    assert "does not match" in parsed.problems({"region": "eu_west_x1"})[0]
    assert "does not match" in parsed.problems({"region": "xeu_west"})[0]


@pytest.mark.parametrize("text, message", [
    ("-- step: s\nSELECT * FROM {t};\n", "f.sql:2: {t} is not declared: add a line `-- allow t: NAME, NAME`"),
    ("-- allow t: a\n-- step: s\nSELECT 1;\n", "f.sql:1: -- allow t: the file has no {t}"),
    ("-- allow t: a\n-- allow t: b\n-- step: s\nSELECT * FROM {t};\n", "f.sql:2: -- allow t: declared twice"),
    ("-- allow t: a, select\n-- step: s\nSELECT * FROM {t};\n", "f.sql:1: -- allow t: 'select' is a reserved word"),
    ("-- allow t: s.t\n-- step: s\nSELECT * FROM {t};\n", "f.sql:1: -- allow t: 's.t' is not a plain name"),
    ("-- allow t: a,,b\n-- step: s\nSELECT * FROM {t};\n", "expected names separated by commas"),
    ("-- allow t:\n-- step: s\nSELECT * FROM {t};\n", "expected names separated by commas"),
    ("-- allow t: /[a-/\n-- step: s\nSELECT * FROM {t};\n", "f.sql:1: -- allow t: bad pattern"),
])
def test_bad_declarations_are_refused_at_load(text, message):
    with pytest.raises(UsageError) as e:
        parse_steps(text, dialect="postgres", source="f.sql")
    assert message in str(e.value)


# -- what SQL clients accept and databases do not -------------------------------------------------

@pytest.mark.parametrize("line, command", [
    ("SET DEFINE OFF", "SET"), ("set serveroutput on size 1000000", "SET"), ("EXEC app.load(:k)", "EXEC"),
    ("execute app.load;", "EXECUTE"), ("PROMPT it's loading", "PROMPT"), ("@other.sql", "@"),
    ("@@nested.sql", "@"), ("SPOOL /tmp/x.log", "SPOOL"), ("WHENEVER SQLERROR EXIT 1", "WHENEVER"),
    ("DEFINE x = 1", "DEFINE"), ("  show errors", "SHOW"), ("DESC t", "DESC"), ("VARIABLE v NUMBER", "VARIABLE"),
    ("CONNECT scott/tiger", "CONNECT"), ("EXIT", "EXIT"), ("REM a remark", "REM"), ("COLUMN x FORMAT a10", "COLUMN"),
])
def test_sqlplus_commands_are_refused_at_load(line, command):
    with pytest.raises(UsageError) as e:
        parse_steps(f"-- step: s\nINSERT INTO t VALUES (1);\n{line}\nINSERT INTO t VALUES (2);\n",
                    dialect="oracle", source="f.sql")
    assert str(e.value).startswith(f"f.sql:3: {command}: a SQL*Plus command, not SQL")
    if command in ("EXEC", "EXECUTE"):
        assert "BEGIN name(...); END;" in str(e.value)


def test_sqlplus_command_after_a_statement_on_its_line_is_refused():
    with pytest.raises(UsageError, match=r"f\.sql:2: SET: a SQL"):
        parse_steps("-- step: s\nSELECT 1 FROM dual; SET ECHO ON\n", dialect="oracle", source="f.sql")


@pytest.mark.parametrize("sql", ["SET TRANSACTION READ ONLY", "SET ROLE ALL", "SET CONSTRAINTS ALL DEFERRED",
                                 "UPDATE t\nSET v = 1", "SELECT start_date, desc_text FROM t"])
def test_sql_that_looks_like_sqlplus_is_kept(sql):
    assert statements(f"-- step: s\n{sql};\n") == [sql]


@pytest.mark.parametrize("dialect, line, command", [
    ("postgres", "\\set ON_ERROR_STOP on", "\\set"), ("postgres", "\\i load.sql", "\\i"),
    ("sqlite", ".mode csv", ".mode"), ("sqlite", ".read other.sql", ".read"),
])
def test_client_commands_of_psql_and_sqlite_are_refused(dialect, line, command):
    with pytest.raises(UsageError) as e:
        parse_steps(f"-- step: s\n{line}\nSELECT 1;\n", dialect=dialect, source="f.sql")
    assert str(e.value).startswith(f"f.sql:2: {command}: a ")


@pytest.mark.parametrize("dialect", ["oracle", "sqlite"])
def test_positional_binds_are_refused_at_load(dialect):
    with pytest.raises(UsageError, match=r"f.sql:3: :1: positional binds cannot be filled"):
        parse_steps("-- step: s\nSELECT 1;\nINSERT INTO t VALUES (:1, :k);\n", dialect=dialect, source="f.sql")


def test_postgres_slices_and_oracle_assignments_are_not_binds():
    assert statements("-- step: s\nSELECT a[1:2], a[:2] FROM t;\n", "postgres") == ["SELECT a[1:2], a[:2] FROM t"]
    assert statements("-- step: s\nDECLARE n NUMBER;\nBEGIN\n  n:=1;\nEND;\n/\n") == [
        "DECLARE n NUMBER;\nBEGIN\n  n:=1;\nEND;"]


def test_with_function_is_one_statement_without_its_final_semicolon():
    text = ("-- step: s\nWITH\n  FUNCTION add1(n NUMBER) RETURN NUMBER IS\n  BEGIN\n    RETURN n + 1;\n  END;\n"
            "SELECT add1(:v) FROM dual;\n/\nSELECT 2 FROM dual;\n")
    assert statements(text) == [
        "WITH\n  FUNCTION add1(n NUMBER) RETURN NUMBER IS\n  BEGIN\n    RETURN n + 1;\n  END;\nSELECT add1(<:v>) FROM dual",
        "SELECT 2 FROM dual"]
    # DML whose subquery declares functions (the WITH_PLSQL hint) is one statement too.
    dml = ("-- step: s\nINSERT /*+ WITH_PLSQL */ INTO t (k, v)\nWITH FUNCTION add1(n NUMBER) RETURN NUMBER IS\n"
           "BEGIN RETURN n + 1; END;\nSELECT :k, add1(:v) FROM dual;\n/\n")
    assert statements(dml) == ["INSERT /*+ WITH_PLSQL */ INTO t (k, v)\nWITH FUNCTION add1(n NUMBER) RETURN NUMBER IS\n"
                               "BEGIN RETURN n + 1; END;\nSELECT <:k>, add1(<:v>) FROM dual"]
    # A common table expression named like a keyword is plain SQL.
    assert statements("-- step: s\nWITH function AS (SELECT 1 x FROM dual) SELECT x FROM function;\n") == [
        "WITH function AS (SELECT 1 x FROM dual) SELECT x FROM function"]


def test_labelled_block_is_one_statement():
    text = "-- step: s\n<<outer>>\nDECLARE\n  n NUMBER := :v;\nBEGIN\n  <<inner>>\n  BEGIN NULL; END;\nEND outer;\n/\n"
    assert statements(text) == ["<<outer>>\nDECLARE\n  n NUMBER := <:v>;\nBEGIN\n  <<inner>>\n  BEGIN NULL; END;\nEND outer;"]


# -- transaction control inside blocks --------------------------------------------------------------

@pytest.mark.parametrize("dialect, block, word", [
    ("oracle", "BEGIN\n  UPDATE t SET v = 1;\n  COMMIT;\nEND;\n/\n", "COMMIT"),
    ("oracle", "<<l>> BEGIN\n  UPDATE t SET v = 1;\nEXCEPTION WHEN OTHERS THEN\n  ROLLBACK;\n  RAISE;\nEND;\n/\n",
     "ROLLBACK"),
    ("oracle", "DECLARE\n  n NUMBER;\nBEGIN\n  commit work;\nEND;\n/\n", "COMMIT"),
    ("postgres", "DO $$ BEGIN UPDATE t SET v = 1; COMMIT; END $$;\n", "COMMIT"),
    ("postgres", "DO LANGUAGE plpgsql $body$ BEGIN ROLLBACK; END $body$;\n", "ROLLBACK"),
    ("postgres", "DO 'BEGIN COMMIT; END';\n", "COMMIT"),
])
def test_transaction_control_inside_a_block_is_refused(dialect, block, word):
    with pytest.raises(UsageError) as e:
        parse_steps(f"-- step: s\nSELECT 1;\n{block}", dialect=dialect, source="f.sql")
    assert str(e.value).startswith(f"f.sql:3: {word} inside a block") and "-- commits: yes" in str(e.value)


@pytest.mark.parametrize("dialect, sql", [
    ("oracle", "DECLARE\n  PRAGMA AUTONOMOUS_TRANSACTION;\nBEGIN\n  INSERT INTO log VALUES (1);\n  COMMIT;\nEND;\n/\n"),
    ("oracle", "CREATE OR REPLACE PROCEDURE p AS BEGIN UPDATE t SET v = 1; COMMIT; END;\n/\n"),
    ("oracle", "BEGIN\n  -- commit later\n  UPDATE t SET note = 'commit';\nEND;\n/\n"),
    ("postgres", "DO $$ BEGIN RAISE NOTICE 'commit'; -- rollback\nEND $$;\n"),
    ("postgres", "CREATE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN COMMIT; END $$;\n"),
])
def test_blocks_that_do_not_end_the_items_transaction_are_kept(dialect, sql):
    parsed = parse_steps(f"-- step: s\n{sql}", dialect=dialect)
    assert not parsed.steps[0].commits and parsed.steps[0].statements[0].commits is None


def test_a_step_that_commits_on_purpose_needs_commit_step(tmp_path):
    path = tmp_path / "s.sql"
    path.write_text("-- step: load\nINSERT INTO t VALUES (:k);\n-- step: publish\n-- commits: yes\n"
                    "BEGIN\n  app.publish(:k);\n  COMMIT;\nEND;\n/\nCALL app.notify(:k);\n")
    parsed = load_steps(str(path), dialect="oracle")
    assert [(s.name, s.commits) for s in parsed.steps] == [("load", False), ("publish", True)]
    with pytest.raises(UsageError, match=r"step 'publish' declares `-- commits: yes`.*use --commit step"):
        steps_handler(str(path), parse_db_url("oracle://u@h/S", commit="item"))
    assert steps_handler(str(path), parse_db_url("oracle://u@h/S", commit="step")).steps == parsed


@pytest.mark.parametrize("text, message", [
    ("-- commits: yes\n-- step: s\nSELECT 1;\n", "f.sql:1: -- commits: belongs inside a step"),
    ("-- step: s\n-- commits: maybe\nSELECT 1;\n", "f.sql:2: -- commits: 'maybe': expected yes or no"),
    ("-- step: s\n-- commits: yes\n-- commits: no\nSELECT 1;\n", "f.sql:3: -- commits: given twice"),
])
def test_bad_commits_declarations(text, message):
    with pytest.raises(UsageError) as e:
        parse_steps(text, dialect="oracle", source="f.sql")
    assert message in str(e.value)


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
    path.write_text("-- allow t: ok\n-- step: a\nINSERT INTO {t} VALUES (:v);\n")
    with pytest.raises(UsageError, match="needs --db"):
        steps_handler(str(path), None)
    handler = steps_handler(str(path), parse_db_url("sqlite:///x.db"))
    assert handler.check_payload({"t": "ok", "v": 1}) == []
    assert len(handler.check_payload({"t": "x y"})) == 2


def test_rendering_is_compiled_once_and_filled_per_item():
    parsed = parse_steps("-- allow t: a, b\n-- step: s\nINSERT INTO {t} (k, p) VALUES (:k, '5%');\nSELECT 1;\n",
                         dialect="postgres")
    first, second = (parsed.render({"t": t, "k": k}, "pyformat")[0].statements for t, k in (("a", 1), ("b", 2)))
    assert first == (('INSERT INTO "a" (k, p) VALUES (%(k)s, \'5%%\')', {"k": 1}), ("SELECT 1", None))
    assert second == (('INSERT INTO "b" (k, p) VALUES (%(k)s, \'5%%\')', {"k": 2}), ("SELECT 1", None))
    # Another paramstyle is compiled on its own.
    assert parsed.render({"t": "a", "k": 3}, "named")[0].statements[0] == (
        "INSERT INTO \"a\" (k, p) VALUES (:k, '5%')", {"k": 3})


def test_a_missing_bind_and_a_bad_identifier_are_both_reported():
    parsed = parse_steps("-- allow t: a\n-- step: s\nINSERT INTO {t} VALUES (:k);\n", dialect="sqlite")
    with pytest.raises(InvalidPayload) as e:
        parsed.render({"t": "zz"}, "named")
    # The identifier is named first (its code wins), whatever was found wrong first.
    assert e.value.code == "SQL-IDENTIFIER" and ":k: the payload has no 'k'" in str(e.value)


# -- how a transaction travels -------------------------------------------------------------------

class MemorySession:
    """A job.db.transaction.Session in memory: each statement is a write kept pending until a
    commit; `fails` is a statement that raises (leaving nothing of its own, as a database's
    statement-level rollback does); `declines` are statements the driver runs without the
    commit asked of them (as thin mode does when it re-executes a query)."""

    def __init__(self, *, fails: str | None = None, declines: tuple[str, ...] = ()) -> None:
        self.fails = fails
        self.declines = declines
        self.calls: list[tuple[str, object, bool]] = []
        self.pending: list[str] = []
        self.committed: list[str] = []
        self.commit_calls = 0

    def execute(self, sql, params, *, commit):
        self.calls.append((sql, params, commit))
        if sql == self.fails:
            raise RuntimeError(f"{sql} failed")
        self.pending.append(sql)
        if commit and sql not in self.declines:
            self._commit()
        return 1

    def in_transaction(self):
        return bool(self.pending)

    def commit(self):
        self.commit_calls += 1
        self._commit()

    def _commit(self):
        self.committed += self.pending
        self.pending = []


def test_the_commit_travels_with_the_last_statement_only():
    session = MemorySession()
    rows = commit_with_last(session, [("a", {"b1": 1}), ("b", None), ("c", {"b1": 2})])
    assert session.calls == [("a", {"b1": 1}, False), ("b", None, False), ("c", {"b1": 2}, True)]
    assert (rows, session.committed, session.commit_calls) == (3, ["a", "b", "c"], 0)  # no call of its own


def test_a_lone_statement_carries_its_commit():
    session = MemorySession()
    assert commit_with_last(session, [("a", None)]) == 1
    assert (session.calls, session.commit_calls, session.committed) == ([("a", None, True)], 0, ["a"])


@pytest.mark.parametrize("fails", ["b", "c"])
def test_a_failing_statement_commits_nothing(fails):
    session = MemorySession(fails=fails)
    with pytest.raises(RuntimeError, match=f"{fails} failed"):
        commit_with_last(session, [("a", None), ("b", None), ("c", None)])
    assert [sql for sql, _, _ in session.calls] == ["a", "b", "c"][:["a", "b", "c"].index(fails) + 1]
    # What ran before stays pending for the caller's rollback; no commit was asked before the last.
    assert session.committed == [] and session.commit_calls == 0 and session.pending[0] == "a"


def test_a_commit_the_driver_did_not_carry_is_made_with_a_call_of_its_own():
    session = MemorySession(declines=("SELECT 1",))
    commit_with_last(session, [("a", None), ("SELECT 1", None)])
    assert session.calls[-1] == ("SELECT 1", None, True)
    assert (session.commit_calls, session.committed, session.pending) == (1, ["a", "SELECT 1"], [])


@pytest.mark.parametrize("sql, alone", [
    ("INSERT INTO t VALUES (%(k)s)", True), ("update t set v = 1", True), ("DELETE FROM t", True),
    ("MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE", True), ("SELECT pg_sleep(1)", True),
    ("WITH d AS (DELETE FROM t RETURNING *) INSERT INTO u SELECT * FROM d", True), ("VALUES (1)", True),
    ("TABLE t", True), ("  -- a comment\n/* another */ (SELECT 1) UNION (SELECT 2)", True),
    ("VACUUM t", False), ("CREATE INDEX CONCURRENTLY i ON t (k)", False), ("SET LOCAL work_mem = '1GB'", False),
    ("LOCK TABLE t IN SHARE MODE", False), ("CALL p()", False), ("DO $$ BEGIN NULL; END $$", False),
    ("CREATE TABLE t (k int)", False), ("/* nested /* comment */ DELETE */ VACUUM", False), ("", False),
])
def test_which_postgres_statements_run_alone_in_autocommit(sql, alone):
    postgres = pytest.importorskip("job.db.postgres", reason="psycopg is not installed")
    assert postgres.self_contained(sql) is alone
