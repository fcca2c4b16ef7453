"""Reading a steps file (`--handler sql:PATH`) into a job.db.stepsfile.StepsFile.

A steps file is plain SQL. A line `-- step: NAME` starts a step; a step holds one or more
statements ended by `;`, or by a line holding only `/`. On Oracle, a PL/SQL block (DECLARE or
BEGIN, after optional <<labels>>; CREATE [OR REPLACE] FUNCTION/PROCEDURE/PACKAGE/TRIGGER/TYPE;
or a statement whose WITH clause declares functions) keeps its inner `;` and ends at the `/` line.
Quotes, comments, Oracle q'[...]' and PostgreSQL $$...$$ are respected (job.db.stepstokens
cuts the text; this module assembles the steps and checks them).

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

from ..errors import UsageError
from .identifiers import Allowed, parse_allowed, words
from .stepsfile import Statement, Step, StepsFile
from .stepstokens import StatementScanner

_STEP_LINE = re.compile(r"[ \t]*--[ \t]*step:[ \t]*(?P<name>[^\r\n]*?)[ \t]*\r?(?:\n|$)", re.I)
_ALLOW_LINE = re.compile(r"[ \t]*--[ \t]*allow[ \t]+(?P<name>[A-Za-z_][A-Za-z0-9_]*)[ \t]*:"
                         r"(?P<spec>[^\r\n]*)\r?(?:\n|$)", re.I)
_COMMITS_LINE = re.compile(r"[ \t]*--[ \t]*commits:[ \t]*(?P<value>[^\r\n]*?)[ \t]*\r?(?:\n|$)", re.I)
_CLIENT_LINE = re.compile(r"[ \t]*(?P<sign>[@!\\.]?)(?P<first>[A-Za-z]*)(?:[ \t]+(?P<second>[A-Za-z]+))?")
_SLASH_LINE = re.compile(r"[ \t]*/[ \t]*\r?(?:\n|$)")
_STEP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_TRANSACTION_CONTROL = frozenset({"COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "END", "ABORT"})
#: SQL*Plus commands, which SQL*Plus runs itself and never sends: in a steps file they would
#: reach the server and fail every item.
_SQLPLUS = words("""
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


class _Parser(StatementScanner):
    """One pass over the text: statements end at `;` (outside quotes, comments and PL/SQL
    blocks: see StatementScanner), at a `/` line, or at the next `-- step:` line."""

    def __init__(self, text: str, dialect: str, source: str) -> None:
        super().__init__(text, dialect, source)
        self.steps: list[Step] = []
        self.step_name: str | None = None
        self.step_line = 0
        self.statements: list[Statement] = []
        self.step_commits: bool | None = None
        self.names: set[str] = set()
        self.allowed: dict[str, Allowed] = {}

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
            self.close_step(self.step_name)
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
            self.close_step(self.step_name)
        if not _STEP_NAME.match(name):
            raise self.error(pos, f"step name {name!r}: use letters, digits and _ . - (up to 100)")
        if name in self.names:
            raise self.error(pos, f"step {name!r} appears twice")
        self.names.add(name)
        self.step_name, self.step_line, self.statements = name, self.line_of(pos), []
        self.step_commits = None

    def close_step(self, name: str) -> None:
        """The statements read since step `name`'s line are that step."""
        if not self.statements:
            raise UsageError(f"{self.source}:{self.step_line}: step {name!r} has no SQL")
        commits = bool(self.step_commits)
        for statement in self.statements:
            if statement.commits and not commits:
                raise UsageError(
                    f"{self.source}:{statement.line}: {statement.commits} inside a block: transaction "
                    "control is bulkjob's (see --commit); remove it, or declare `-- commits: yes` in "
                    f"step {name!r} (which needs --commit step)")
        self.steps.append(Step(name, self.step_line, tuple(self.statements), commits))


def parse_steps(text: str, *, dialect: str, source: str = "<steps>") -> StepsFile:
    """Parse a steps file for a dialect (`oracle`, `postgres`, `sqlite`); raises UsageError."""
    return _Parser(text, dialect, source).parse()


def load_steps(path: str, *, dialect: str) -> StepsFile:
    """Read and parse the steps file at `path`; raises UsageError (naming `--handler sql:PATH`
    when the file cannot be read)."""
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
