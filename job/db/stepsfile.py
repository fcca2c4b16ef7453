"""Steps files: parsing the SQL of `--handler sql:PATH`, and filling it in for one item.

A steps file is plain SQL. A line `-- step: NAME` starts a step; a step holds one or more
statements ended by `;`, or by a line holding only `/`. On Oracle, a PL/SQL block (DECLARE or
BEGIN, or CREATE [OR REPLACE] FUNCTION/PROCEDURE/PACKAGE/TRIGGER/TYPE) keeps its inner `;` and
ends at the `/` line. Quotes, comments, Oracle q'[...]' and PostgreSQL $$...$$ are respected.

Per item, `:name` binds take their values from the payload (only the binds a statement uses
are passed), and `{name}` placeholders are replaced by the payload's value only when it is a
plain identifier (`schema.table`, letters, digits, _ $ #): anything else is refused before
any SQL runs. Transactions are bulkjob's (see --commit), so COMMIT, ROLLBACK and SAVEPOINT
are refused in a steps file.

Pure: no database, no I/O but reading the file.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import Permanent, UsageError
from . import bind_marker

#: Longest identifier accepted for a {placeholder}: Oracle's and PostgreSQL's limits are lower.
MAX_IDENTIFIER_CHARS = 128

_STEP_LINE = re.compile(r"[ \t]*--[ \t]*step:[ \t]*(?P<name>[^\r\n]*?)[ \t]*\r?(?:\n|$)", re.I)
_SLASH_LINE = re.compile(r"[ \t]*/[ \t]*\r?(?:\n|$)")
_STEP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$#]*")
_BIND = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$#]*(?:\.[A-Za-z_][A-Za-z0-9_$#]*)?")
_Q_CLOSERS = {"[": "]", "{": "}", "(": ")", "<": ">"}
_PLSQL_UNITS = frozenset({"FUNCTION", "PROCEDURE", "PACKAGE", "TRIGGER", "TYPE", "LIBRARY", "JAVA"})
_TRANSACTION_CONTROL = frozenset({"COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "END", "ABORT"})


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement: `parts` are ("sql", text), ("bind", name) and ("ident", name) in order."""

    line: int
    parts: tuple[tuple[str, str], ...]
    binds: tuple[str, ...]
    placeholders: tuple[str, ...]

    def render(self, values: Mapping[str, str], binds: Mapping[str, Any], paramstyle: str
               ) -> tuple[str, dict[str, Any] | None]:
        """The SQL for the driver, and its bind values (None when it has no binds)."""
        out = []
        for kind, value in self.parts:
            if kind == "bind":
                out.append(bind_marker(value, paramstyle))
            elif kind == "ident":
                out.append(values[value])
            elif paramstyle == "pyformat" and self.binds:
                out.append(value.replace("%", "%%"))
            else:
                out.append(value)
        params = {name: binds[name] for name in self.binds} if self.binds else None
        return "".join(out), params


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    line: int
    statements: tuple[Statement, ...]


@dataclass(frozen=True, slots=True)
class RenderedStep:
    name: str
    statements: tuple[tuple[str, dict[str, Any] | None], ...]


@dataclass(frozen=True, slots=True)
class StepsFile:
    """A parsed steps file: what every item runs."""

    source: str
    steps: tuple[Step, ...]

    @property
    def binds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b for s in self.steps for st in s.statements for b in st.binds))

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for s in self.steps for st in s.statements for p in st.placeholders))

    def problems(self, payload: Mapping[str, Any]) -> list[str]:
        """Why this payload cannot run the file (missing binds, unsafe identifiers); [] if it can."""
        problems = []
        for name in self.placeholders:
            value = payload.get(name)
            if value is None:
                problems.append(f"{{{name}}}: the payload has no {name!r}")
            elif not is_identifier(value):
                problems.append(f"{{{name}}}: {value!r} is not a plain SQL identifier; refused")
        for name in self.binds:
            if _lookup(payload, name) is _MISSING:
                problems.append(f":{name}: the payload has no {name!r}")
        return problems

    def render(self, payload: Mapping[str, Any], paramstyle: str) -> list[RenderedStep]:
        """Every step's SQL for one item; raises Permanent (before any SQL runs) if it cannot."""
        problems = self.problems(payload)
        if problems:
            code = "SQL-IDENTIFIER" if problems[0].startswith("{") else "SQL-BIND"
            raise Permanent("; ".join(problems), code=code)
        values = {name: payload[name] for name in self.placeholders}
        binds = {name: bind_value(_lookup(payload, name)) for name in self.binds}
        return [RenderedStep(step.name, tuple(st.render(values, binds, paramstyle) for st in step.statements))
                for step in self.steps]


_MISSING = object()


def _lookup(payload: Mapping[str, Any], name: str) -> Any:
    """A bind's payload value: the same key, else the one key equal ignoring case."""
    if name in payload:
        return payload[name]
    found = [k for k in payload if isinstance(k, str) and k.lower() == name.lower()]
    return payload[found[0]] if len(found) == 1 else _MISSING


def bind_value(value: Any) -> Any:
    """Lists and objects are bound as JSON text; scalars as they are."""
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def is_identifier(value: Any) -> bool:
    """Whether `value` may be pasted into SQL as an identifier: `name` or `schema.name` of ASCII
    letters, digits, `_`, `$`, `#`, not starting with a digit, at most 128 characters."""
    return (isinstance(value, str) and len(value) <= MAX_IDENTIFIER_CHARS
            and _IDENTIFIER.fullmatch(value) is not None)


class _Parser:
    """One pass over the text: statements end at `;` (outside quotes, comments and PL/SQL
    blocks), at a `/` line, or at the next `-- step:` line."""

    def __init__(self, text: str, dialect: str, source: str) -> None:
        self.text = text
        self.dialect = dialect
        self.source = source
        self.steps: list[Step] = []
        self.step_name: str | None = None
        self.step_line = 0
        self.statements: list[Statement] = []
        self.names: set[str] = set()
        self._reset(0)

    def _reset(self, start: int) -> None:
        self.start = start
        self.parts: list[tuple[str, str]] = []
        self.sql: list[str] = []
        self.words: list[str] = []
        self.binds: dict[str, None] = {}
        self.placeholders: dict[str, None] = {}
        self.has_content = False
        self.plsql = False
        self.first_line = 0

    def error(self, pos: int, message: str) -> UsageError:
        return UsageError(f"{self.source}:{self.line_of(pos)}: {message}")

    def line_of(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1

    def emit(self, text: str, *, content: bool = True, pos: int = 0) -> None:
        if content and text.strip():
            self.mark_content(pos)
        self.sql.append(text)

    def mark_content(self, pos: int) -> None:
        if not self.has_content:
            self.has_content = True
            self.first_line = self.line_of(pos)

    def flush_sql(self) -> None:
        if self.sql:
            self.parts.append(("sql", "".join(self.sql)))
            self.sql = []

    def parse(self) -> StepsFile:
        text, i, n = self.text, 0, len(self.text)
        while i < n:
            if i == 0 or text[i - 1] == "\n":
                marker = _STEP_LINE.match(text, i)
                if marker:
                    self.end_statement(i)
                    self.start_step(marker.group("name"), i)
                    i = marker.end()
                    self._reset(i)
                    continue
                slash = _SLASH_LINE.match(text, i)
                if slash:
                    self.end_statement(i)
                    i = slash.end()
                    self._reset(i)
                    continue
            i = self.token(i)
        self.end_statement(n)
        if self.step_name is not None:
            self.close_step(n)
        if not self.steps:
            raise UsageError(f"{self.source}: no steps (start each step with a line `-- step: NAME`)")
        return StepsFile(self.source, tuple(self.steps))

    def token(self, i: int) -> int:
        """Consume one token at `i`; returns the position after it."""
        text, c = self.text, self.text[i]
        nxt = text[i + 1] if i + 1 < len(text) else ""
        prev = text[i - 1] if i > 0 else ""
        if c == "-" and nxt == "-":
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            self.emit(text[i:end], content=False)
            return end
        if c == "/" and nxt == "*":
            end = text.find("*/", i + 2)
            if end < 0:
                raise self.error(i, "unterminated /* comment")
            self.emit(text[i:end + 2], content=text.startswith("/*+", i), pos=i)
            return end + 2
        if c == "'":
            return self.quoted(i)
        if c == '"':
            end = self.find_closing(i, '"', doubled=True)
            self.emit(text[i:end], pos=i)
            return end
        if c == "$" and self.dialect == "postgres" and not _is_word_char(prev):
            tag = _DOLLAR_TAG.match(text, i)
            if tag:
                end = text.find(tag.group(), tag.end())
                if end < 0:
                    raise self.error(i, f"unterminated {tag.group()} quote")
                self.emit(text[i:end + len(tag.group())], pos=i)
                return end + len(tag.group())
        if c == ":":
            if nxt == ":":
                self.emit("::", pos=i)
                return i + 2
            name = _BIND.match(text, i + 1)
            if name and not _is_word_char(prev) and not self.stored_unit():
                self.flush_sql()
                self.parts.append(("bind", name.group()))
                self.binds[name.group()] = None
                self.mark_content(i)
                return name.end()
        if c == "{":
            placeholder = _PLACEHOLDER.match(text, i)
            if placeholder:
                self.flush_sql()
                self.parts.append(("ident", placeholder.group(1)))
                self.placeholders[placeholder.group(1)] = None
                self.mark_content(i)
                return placeholder.end()
        if c == ";":
            return self.semicolon(i)
        word = _WORD.match(text, i) if not _is_word_char(prev) else None
        if word:
            if len(self.words) < 6:
                self.words.append(word.group().upper())
            self.emit(word.group(), pos=i)
            return word.end()
        self.emit(c, content=not c.isspace(), pos=i)
        return i + 1

    def quoted(self, i: int) -> int:
        text = self.text
        if self.dialect == "oracle" and _prefixed(text, i, "q", also="n"):
            # q'[...]': the literal ends at the closing delimiter followed by a quote.
            opener = text[i + 1] if i + 1 < len(text) else ""
            closer = _Q_CLOSERS.get(opener, opener)
            end = text.find(closer + "'", i + 2) if opener else -1
            if end < 0:
                raise self.error(i, "unterminated q'...' literal")
            self.emit(text[i:end + 2], pos=i)
            return end + 2
        backslash = self.dialect == "postgres" and _prefixed(text, i, "e")
        end = self.find_closing(i, "'", doubled=True, backslash=backslash)
        self.emit(text[i:end], pos=i)
        return end

    def find_closing(self, i: int, quote: str, *, doubled: bool, backslash: bool = False) -> int:
        text, j = self.text, i + 1
        while j < len(text):
            if backslash and text[j] == "\\":
                j += 2
                continue
            if text[j] == quote:
                if doubled and text.startswith(quote, j + 1):
                    j += 2
                    continue
                return j + 1
            j += 1
        raise self.error(i, f"unterminated {quote} quote")

    def stored_unit(self) -> bool:
        """A CREATE of a PL/SQL unit: its text goes to Oracle as is (`:new` is not a bind)."""
        if self.dialect != "oracle" or self.words[:1] != ["CREATE"]:
            return False
        words = self.words[1:]
        if words[:2] == ["OR", "REPLACE"]:
            words = words[2:]
        if words[:1] in (["EDITIONABLE"], ["NONEDITIONABLE"], ["EDITIONING"]):
            words = words[1:]
        return bool(words) and words[0] in _PLSQL_UNITS

    def plsql_start(self) -> bool:
        if self.dialect != "oracle" or not self.words:
            return False
        return self.words[0] in ("DECLARE", "BEGIN") or self.stored_unit()

    def semicolon(self, i: int) -> int:
        if not self.plsql and self.plsql_start():
            if self.words in (["BEGIN"], ["BEGIN", "TRANSACTION"], ["BEGIN", "WORK"]):
                raise self.error(i, "transaction control is bulkjob's (see --commit): remove BEGIN")
            self.plsql = True
        if self.plsql:
            self.emit(";", pos=i)
            return i + 1
        if self.dialect == "sqlite" and not sqlite3.complete_statement(self.text[self.start:i + 1]):
            self.emit(";", pos=i)  # inside CREATE TRIGGER ... BEGIN ... END
            return i + 1
        self.end_statement(i)
        self._reset(i + 1)
        return i + 1

    def end_statement(self, pos: int) -> None:
        self.flush_sql()
        if not self.has_content:
            return
        words = self.words
        if (words[:1] and words[0] in _TRANSACTION_CONTROL) or words[:2] == ["START", "TRANSACTION"] \
                or (words[:1] == ["BEGIN"] and not self.plsql):
            raise UsageError(f"{self.source}:{self.first_line}: {words[0]}: transaction control is "
                             "bulkjob's (see --commit); remove it from the steps file")
        if self.step_name is None:
            raise UsageError(f"{self.source}:{self.first_line}: SQL before the first `-- step: NAME` line")
        parts = list(self.parts)
        # Trailing whitespace and comments after the last token are not sent.
        while parts and parts[-1][0] == "sql" and not parts[-1][1].strip():
            parts.pop()
        if parts and parts[-1][0] == "sql":
            parts[-1] = ("sql", parts[-1][1].rstrip())
        if parts and parts[0][0] == "sql":
            parts[0] = ("sql", parts[0][1].lstrip())
        self.statements.append(Statement(self.first_line, tuple(parts), tuple(self.binds),
                                         tuple(self.placeholders)))

    def start_step(self, name: str, pos: int) -> None:
        if self.step_name is not None:
            self.close_step(pos)
        if not _STEP_NAME.match(name):
            raise self.error(pos, f"step name {name!r}: use letters, digits and _ . - (up to 100)")
        if name in self.names:
            raise self.error(pos, f"step {name!r} appears twice")
        self.names.add(name)
        self.step_name, self.step_line, self.statements = name, self.line_of(pos), []

    def close_step(self, pos: int) -> None:
        if not self.statements:
            raise UsageError(f"{self.source}:{self.step_line}: step {self.step_name!r} has no SQL")
        self.steps.append(Step(self.step_name, self.step_line, tuple(self.statements)))


def _is_word_char(c: str) -> bool:
    return bool(c) and (c.isalnum() or c in "_$#")


def _prefixed(text: str, i: int, letter: str, *, also: str = "") -> bool:
    """Whether the quote at `i` follows the letter `letter` (optionally after `also`, as in nq')
    standing alone, not ending a longer word."""
    j = i - 1
    if j < 0 or text[j].lower() != letter:
        return False
    j -= 1
    if also and j >= 0 and text[j].lower() == also:
        j -= 1
    return j < 0 or not _is_word_char(text[j])


def parse_steps(text: str, *, dialect: str, source: str = "<steps>") -> StepsFile:
    """Parse a steps file for a dialect (`oracle`, `postgres`, `sqlite`); raises UsageError."""
    return _Parser(text, dialect, source).parse()


def load_steps(path: str, *, dialect: str) -> StepsFile:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"--handler sql:{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--handler sql:{path}: cannot read it: {e}") from None
    if not text.strip():
        raise UsageError(f"--handler sql:{path}: the steps file is empty")
    return parse_steps(text, dialect=dialect, source=path)
