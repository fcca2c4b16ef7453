"""The steps file's tokenizer: SQL text cut into statements, with quotes, comments, PL/SQL blocks and binds respected.

One pass over the text (job.db.stepsparse drives it line by line and assembles the steps): a
statement ends at a `;` outside quotes (`'...'`, `"..."`, Oracle's q'[...]', PostgreSQL's
$tag$...$tag$ and E'...'), comments and Oracle PL/SQL blocks (DECLARE or BEGIN after optional
<<labels>>, a CREATE of a PL/SQL unit, a WITH clause that declares functions), which end at a
`/` line instead. Along the way it records each statement's parts (SQL text, `:name` binds,
`{name}` placeholders) and the words that say what the statement is (its first six, a COMMIT
or ROLLBACK inside a block).

Pure: no database, no I/O.
"""

from __future__ import annotations

import re
import sqlite3

from ..errors import UsageError

_LABEL = re.compile(r"<<[ \t]*[A-Za-z][A-Za-z0-9_$#]*[ \t]*>>")
_BLOCK_TX = re.compile(r"\b(COMMIT|ROLLBACK)\b", re.I)
_BODY_NOISE = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'", re.S)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$#]*")
_BIND = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")
_Q_CLOSERS = {"[": "]", "{": "}", "(": ")", "<": ">"}
_PLSQL_UNITS = frozenset({"FUNCTION", "PROCEDURE", "PACKAGE", "TRIGGER", "TYPE", "LIBRARY", "JAVA"})


class StatementScanner:
    """Cuts `text` into statements for a dialect (`oracle`, `postgres`, `sqlite`): `token(i)`
    consumes one token at `i`; the statement being read is in `parts`, `binds`,
    `placeholders`, `words` and the flags below, until `end_statement` (the parser's) takes it
    and `_reset` starts the next. `source` names the text in messages (UsageError, with the
    line)."""

    def __init__(self, text: str, dialect: str, source: str) -> None:
        self.text = text
        self.dialect = dialect
        self.source = source
        #: Where each placeholder is first used, for the message when it is not declared.
        self.placeholder_lines: dict[str, int] = {}
        self._reset(0)

    def end_statement(self, pos: int) -> None:
        """Take the statement read so far, at a `;` that ends it (the parser's to define)."""
        raise NotImplementedError

    def _reset(self, start: int) -> None:
        """Start reading a new statement at `start`."""
        self.start = start
        self.parts: list[tuple[str, str]] = []
        self.sql: list[str] = []
        self.words: list[str] = []
        self.binds: dict[str, None] = {}
        self.placeholders: dict[str, None] = {}
        self.has_content = False
        self.plsql = False
        self.first_line = 0
        #: COMMIT or ROLLBACK seen after the first word (inside a block, if this is one).
        self.tx_word: str | None = None
        self.autonomous = False
        #: The last word, and whether `WITH FUNCTION`/`WITH PROCEDURE` (not a CTE named so)
        #: came before the first `;`: a query, or a DML statement's subquery, that declares
        #: PL/SQL functions.
        self.last_word = ""
        self.with_plsql: bool | None = None

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
                self.block_body(text[tag.end():end])
                self.emit(text[i:end + len(tag.group())], pos=i)
                return end + len(tag.group())
        if c == "<" and nxt == "<" and self.dialect == "oracle" and not self.words:
            label = _LABEL.match(text, i)
            if label:  # <<name>> before a block: the block's first word comes next
                self.emit(label.group(), pos=i)
                return label.end()
        if c == ":":
            if nxt == ":":
                self.emit("::", pos=i)
                return i + 2
            if nxt.isdigit() and self.dialect != "postgres" and not _is_word_char(prev) and not self.stored_unit():
                raise self.error(i, f":{nxt}: positional binds cannot be filled from a payload; name the bind "
                                    "after the payload's key (`:day` takes the payload's \"day\")")
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
                self.placeholder_lines.setdefault(placeholder.group(1), self.line_of(i))
                self.mark_content(i)
                return placeholder.end()
        if c == ";":
            return self.semicolon(i)
        word = _WORD.match(text, i) if not _is_word_char(prev) else None
        if word:
            upper = word.group().upper()
            if self.words and upper in ("COMMIT", "ROLLBACK") and self.tx_word is None:
                self.tx_word = upper
            elif upper == "AUTONOMOUS_TRANSACTION":
                self.autonomous = True
            if not self.plsql:
                if self.with_plsql is None and self.last_word == "WITH" and upper in ("FUNCTION", "PROCEDURE"):
                    self.with_plsql = True
                elif self.with_plsql and self.last_word in ("FUNCTION", "PROCEDURE") and upper == "AS":
                    self.with_plsql = False  # WITH function AS (...): a common table expression
            self.last_word = upper
            if len(self.words) < 6:
                self.words.append(upper)
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
        self.block_body(text[i + 1:end - 1].replace("''", "'"))
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

    def block_body(self, body: str) -> None:
        """A quoted body of a PostgreSQL DO block: note a COMMIT or ROLLBACK in its code."""
        if self.dialect == "postgres" and self.words[:1] == ["DO"] and self.tx_word is None:
            found = _BLOCK_TX.search(_BODY_NOISE.sub(" ", body))
            if found:
                self.tx_word = found.group(1).upper()

    def with_function(self) -> bool:
        """An Oracle statement that declares PL/SQL functions in its WITH clause (`WITH FUNCTION f
        ... END; SELECT ...`, or `INSERT /*+ WITH_PLSQL */ INTO t WITH FUNCTION ...`)."""
        return self.dialect == "oracle" and bool(self.with_plsql)

    def executable_block(self) -> bool:
        """A block whose COMMIT or ROLLBACK ends the item's transaction when it runs (not a stored
        unit's text, not an autonomous transaction)."""
        if self.autonomous:
            return False
        if self.dialect == "oracle":
            return self.plsql and not self.stored_unit() and not self.with_function()
        return self.dialect == "postgres" and self.words[:1] == ["DO"]

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
        return self.words[0] in ("DECLARE", "BEGIN") or self.stored_unit() or self.with_function()

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
