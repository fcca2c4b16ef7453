"""Reading a steps file (`--handler sql:PATH`) into a job.db.stepsfile.StepsFile.

A steps file is plain SQL. A line `-- step: NAME` starts a step; a step holds one or more
statements ended by `;`, or by a line holding only `/`. On Oracle, a PL/SQL block (DECLARE or
BEGIN, after optional <<labels>>; CREATE [OR REPLACE] FUNCTION/PROCEDURE/PACKAGE/TRIGGER/TYPE;
or a statement whose WITH clause declares functions) keeps its inner `;` and ends at the `/` line.
Quotes, comments, Oracle q'[...]' and PostgreSQL $$...$$ are respected.

`:name` is a bind and `{name}` a placeholder, which the file must declare (`-- allow name:
...`, see job.db.identifiers); a step may say `-- commits: yes`.

Refused when the file loads, with its line: transaction control (COMMIT, ROLLBACK, SAVEPOINT
... are bulkjob's, see --commit), COMMIT or ROLLBACK inside an Oracle block or a PostgreSQL DO
block unless the step declares `-- commits: yes`, positional binds (`:1`), and the commands of
SQL*Plus, psql and the sqlite3 shell, which are not SQL. A procedure that commits cannot be
seen from here: a step that calls one must declare `-- commits: yes`.

Pure: no database, no I/O but reading the file.
"""

from __future__ import annotations

import re
import sqlite3

from ..errors import UsageError
from .identifiers import Allowed, parse_allowed
from .stepsfile import Statement, Step, StepsFile

_STEP_LINE = re.compile(r"[ \t]*--[ \t]*step:[ \t]*(?P<name>[^\r\n]*?)[ \t]*\r?(?:\n|$)", re.I)
_ALLOW_LINE = re.compile(r"[ \t]*--[ \t]*allow[ \t]+(?P<name>[A-Za-z_][A-Za-z0-9_]*)[ \t]*:"
                         r"(?P<spec>[^\r\n]*)\r?(?:\n|$)", re.I)
_COMMITS_LINE = re.compile(r"[ \t]*--[ \t]*commits:[ \t]*(?P<value>[^\r\n]*?)[ \t]*\r?(?:\n|$)", re.I)
_LABEL = re.compile(r"<<[ \t]*[A-Za-z][A-Za-z0-9_$#]*[ \t]*>>")
_CLIENT_LINE = re.compile(r"[ \t]*(?P<sign>[@!\\.]?)(?P<first>[A-Za-z]*)(?:[ \t]+(?P<second>[A-Za-z]+))?")
_BLOCK_TX = re.compile(r"\b(COMMIT|ROLLBACK)\b", re.I)
_BODY_NOISE = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'", re.S)
_SLASH_LINE = re.compile(r"[ \t]*/[ \t]*\r?(?:\n|$)")
_STEP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$#]*")
_BIND = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")
_Q_CLOSERS = {"[": "]", "{": "}", "(": ")", "<": ">"}
_PLSQL_UNITS = frozenset({"FUNCTION", "PROCEDURE", "PACKAGE", "TRIGGER", "TYPE", "LIBRARY", "JAVA"})
_TRANSACTION_CONTROL = frozenset({"COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "END", "ABORT"})
def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: SQL*Plus commands, which SQL*Plus runs itself and never sends: in a steps file they would
#: reach the server and fail every item.
_SQLPLUS = _words("""
ACCEPT APPEND ARCHIVE ATTRIBUTE BREAK BTITLE CHANGE CLEAR COL COLUMN COMPUTE CONN CONNECT COPY
DEF DEFINE DEL DESC DESCRIBE DISC DISCONNECT EDIT EXEC EXECUTE EXIT GET HOST INPUT LIST PASSWORD
PAUSE PRINT PRO PROMPT QUIT RECOVER REM REMARK REPFOOTER REPHEADER RUN SAVE SET SHO SHOW
SHUTDOWN SPO SPOOL STA START STARTUP STORE TIMING TTITLE UNDEF UNDEFINE VAR VARIABLE WHENEVER
XQUERY
""")
#: What may follow SET in Oracle SQL (anything else after SET is SQL*Plus's).
_SQL_SET = frozenset({"TRANSACTION", "ROLE", "CONSTRAINT", "CONSTRAINTS"})


def client_command(first: str, second: str | None, sign: str, dialect: str) -> str | None:
    """The command of a SQL client (SQL*Plus, psql, the sqlite3 shell) that a statement starting
    with `sign` (@ ! \\ . or nothing), word `first` and word `second` is, or None for SQL."""
    if dialect == "oracle":
        if sign in ("@", "!"):
            return sign
        word = first.upper()
        if sign == "" and word in _SQLPLUS and not (word == "SET" and (second or "").upper() in _SQL_SET):
            return word
    elif dialect == "postgres" and sign == "\\":
        return "\\" + first
    elif dialect == "sqlite" and sign == ".":
        return "." + first
    return None


def _client_message(command: str, dialect: str) -> str:
    client = {"oracle": "a SQL*Plus command", "postgres": "a psql meta-command",
              "sqlite": "a sqlite3 shell command"}[dialect]
    hint = ""
    if command in ("EXEC", "EXECUTE"):
        hint = " (for a call, write a block: `BEGIN name(...); END;` and a line holding only `/`)"
    elif command == "SET":
        hint = " (substitution variables do not exist here: `&` is sent as it is)"
    return (f"{command}: {client}, not SQL: bulkjob sends each statement to the database as it is; "
            f"remove it{hint}")


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
        self.step_commits: bool | None = None
        self.names: set[str] = set()
        self.allowed: dict[str, Allowed] = {}
        #: Where each placeholder is first used, for the message when it is not declared.
        self.placeholder_lines: dict[str, int] = {}
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

    def parse(self) -> StepsFile:
        text, i, n = self.text, 0, len(self.text)
        while i < n:
            if i == 0 or text[i - 1] == "\n":
                at = self.line_start(i)
                if at is not None:
                    i = at
                    continue
            i = self.token(i)
        self.end_statement(n)
        if self.step_name is not None:
            self.close_step(n)
        if not self.steps:
            raise UsageError(f"{self.source}: no steps (start each step with a line `-- step: NAME`)")
        self.check_declarations()
        return StepsFile(self.source, tuple(self.steps), self.dialect,
                         tuple(self.allowed[name] for name in self.placeholder_lines))

    def line_start(self, i: int) -> int | None:
        """Handle a line that means something as a whole (a step, a declaration, a `/`, a
        client's command); the position after it, or None for an ordinary line."""
        text = self.text
        marker = _STEP_LINE.match(text, i)
        if marker:
            self.end_statement(i)
            self.start_step(marker.group("name"), i)
            self._reset(marker.end())
            return marker.end()
        allow = _ALLOW_LINE.match(text, i)
        if allow:
            self.declare(allow.group("name"), allow.group("spec"), i)
            return allow.end()
        commits = _COMMITS_LINE.match(text, i)
        if commits:
            self.declare_commits(commits.group("value"), i)
            return commits.end()
        slash = _SLASH_LINE.match(text, i)
        if slash:
            self.end_statement(i)
            self._reset(slash.end())
            return slash.end()
        line = _CLIENT_LINE.match(text, i)  # every part is optional: it always matches
        if not self.has_content and line is not None:
            command = client_command(line.group("first"), line.group("second"), line.group("sign"), self.dialect)
            if command is not None:
                raise self.error(i, _client_message(command, self.dialect))
        return None

    def declare(self, name: str, spec: str, pos: int) -> None:
        if name in self.allowed:
            raise self.error(pos, f"-- allow {name}: declared twice (lines {self.allowed[name].line} "
                                  f"and {self.line_of(pos)})")
        line = self.line_of(pos)
        self.allowed[name] = parse_allowed(name, spec, dialect=self.dialect, line=line,
                                           where=f"{self.source}:{line}")

    def declare_commits(self, value: str, pos: int) -> None:
        if self.step_name is None:
            raise self.error(pos, "-- commits: belongs inside a step (after its `-- step: NAME` line)")
        if value.lower() not in ("yes", "no"):
            raise self.error(pos, f"-- commits: {value!r}: expected yes or no")
        if self.step_commits is not None:
            raise self.error(pos, f"-- commits: given twice in step {self.step_name!r}")
        self.step_commits = value.lower() == "yes"

    def check_declarations(self) -> None:
        """Every placeholder declared, every declaration used."""
        for name, line in self.placeholder_lines.items():
            if name not in self.allowed:
                raise UsageError(
                    f"{self.source}:{line}: {{{name}}} is not declared: add a line `-- allow {name}: "
                    f"NAME, NAME` (the names it may take) or `-- allow {name}: /PATTERN/` (a regular "
                    "expression the whole name must match); the payload's name is then sent quoted")
        for name, allowed in self.allowed.items():
            if name not in self.placeholder_lines:
                raise UsageError(f"{self.source}:{allowed.line}: -- allow {name}: the file has no {{{name}}}")

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

    def end_statement(self, pos: int) -> None:
        self.flush_sql()
        if not self.has_content:
            return
        words = self.words
        if (words[:1] and words[0] in _TRANSACTION_CONTROL) or words[:2] == ["START", "TRANSACTION"] \
                or (words[:1] == ["BEGIN"] and not self.plsql):
            raise UsageError(f"{self.source}:{self.first_line}: {words[0]}: transaction control is "
                             "bulkjob's (see --commit); remove it from the steps file")
        command = client_command(words[0] if words else "", words[1] if len(words) > 1 else None, "",
                                 self.dialect)
        if command is not None:
            raise UsageError(f"{self.source}:{self.first_line}: {_client_message(command, self.dialect)}")
        if self.step_name is None:
            raise UsageError(f"{self.source}:{self.first_line}: SQL before the first `-- step: NAME` line")
        parts = list(self.parts)
        # Trailing whitespace and comments after the last token are not sent.
        while parts and parts[-1][0] == "sql" and not parts[-1][1].strip():
            parts.pop()
        if parts and parts[-1][0] == "sql":
            parts[-1] = ("sql", parts[-1][1].rstrip())
            if self.with_function() and parts[-1][1].endswith(";"):
                # The query after the functions is SQL: its `;` (kept as PL/SQL's) is not sent.
                parts[-1] = ("sql", parts[-1][1][:-1].rstrip())
        if parts and parts[0][0] == "sql":
            parts[0] = ("sql", parts[0][1].lstrip())
        commits = self.tx_word if self.executable_block() else None
        self.statements.append(Statement(self.first_line, tuple(parts), tuple(self.binds),
                                         tuple(self.placeholders), commits))

    def start_step(self, name: str, pos: int) -> None:
        if self.step_name is not None:
            self.close_step(pos)
        if not _STEP_NAME.match(name):
            raise self.error(pos, f"step name {name!r}: use letters, digits and _ . - (up to 100)")
        if name in self.names:
            raise self.error(pos, f"step {name!r} appears twice")
        self.names.add(name)
        self.step_name, self.step_line, self.statements = name, self.line_of(pos), []
        self.step_commits = None

    def close_step(self, pos: int) -> None:
        if not self.statements:
            raise UsageError(f"{self.source}:{self.step_line}: step {self.step_name!r} has no SQL")
        commits = bool(self.step_commits)
        for statement in self.statements:
            if statement.commits and not commits:
                raise UsageError(
                    f"{self.source}:{statement.line}: {statement.commits} inside a block: transaction "
                    "control is bulkjob's (see --commit); remove it, or declare `-- commits: yes` in "
                    f"step {self.step_name!r} (which needs --commit step)")
        self.steps.append(Step(self.step_name, self.step_line, tuple(self.statements), commits))


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
