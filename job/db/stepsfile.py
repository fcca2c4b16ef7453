"""Steps files: what `--handler sql:PATH` runs for every item, and filling it in for one item.

A parsed file (job.db.stepsparse reads the text) is a list of steps, each a list of statements
whose parts are SQL text, `:name` binds and `{name}` placeholders. Per item, binds take their
values from the payload (only the binds a statement uses are passed; on Oracle they are sent as
:b1, :b2 ..., so a key such as `date` or `level`, a reserved word there, works), and
placeholders are filled with a quoted identifier only when the value passes the placeholder's
`-- allow` declaration (see job.db.identifiers); anything else fails the item as invalid before
any SQL runs.

Pure: no database.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from .dialect import bind_marker
from .errors import InvalidPayload
from .identifiers import Allowed, quote

#: Longest name accepted by `is_identifier` (--work-table).
MAX_IDENTIFIER_CHARS = 128

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$#]*(?:\.[A-Za-z_][A-Za-z0-9_$#]*)?")


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement: `parts` are ("sql", text), ("bind", name) and ("ident", name) in order."""

    line: int
    parts: tuple[tuple[str, str], ...]
    binds: tuple[str, ...]
    placeholders: tuple[str, ...]
    #: COMMIT or ROLLBACK found inside this statement's block, or None.
    commits: str | None = None

    def compile(self, paramstyle: str, *, numbered: bool = False) -> Compiled:
        """The statement for a driver's paramstyle, worked out once for every item: the SQL text
        (bind markers in place, `{name}` placeholders left as parts to fill per item) and which
        bind each parameter the driver is given takes its value from."""
        names = {name: f"b{i}" for i, name in enumerate(self.binds, 1)} if numbered else {}
        texts: list[str] = []
        parts: list[tuple[bool, str]] = []
        for kind, value in self.parts:
            if kind == "ident":
                parts += [(False, "".join(texts)), (True, value)]
                texts = []
            elif kind == "bind":
                texts.append(bind_marker(names.get(value, value), paramstyle))
            elif paramstyle == "pyformat" and self.binds:
                texts.append(value.replace("%", "%%"))
            else:
                texts.append(value)
        parts.append((False, "".join(texts)))
        return Compiled(parts[0][1] if len(parts) == 1 else None, tuple(p for p in parts if p[1]),
                        tuple((names.get(name, name), name) for name in self.binds))


@dataclass(frozen=True, slots=True)
class Compiled:
    """A statement ready to be filled per item (Statement.compile)."""

    #: The whole SQL text, when the statement has no placeholder.
    sql: str | None
    #: Otherwise the text in parts: (False, SQL text) or (True, placeholder name).
    parts: tuple[tuple[bool, str], ...]
    #: (name the driver is given, bind name in the file), in order.
    params: tuple[tuple[str, str], ...]

    def fill(self, values: Mapping[str, str], binds: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None]:
        """The SQL and bind values for one item: `values` are the quoted identifiers."""
        sql = self.sql if self.sql is not None else "".join(values[v] if ident else v for ident, v in self.parts)
        return sql, ({sent: binds[name] for sent, name in self.params} if self.params else None)


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    line: int
    statements: tuple[Statement, ...]
    #: The step declares `-- commits: yes`: it ends transactions itself (a block that commits,
    #: a procedure that does), which only --commit step allows.
    commits: bool = False


@dataclass(frozen=True, slots=True)
class RenderedStep:
    name: str
    statements: tuple[tuple[str, dict[str, Any] | None], ...]


@dataclass(frozen=True, slots=True)
class StepsFile:
    """A parsed steps file: what every item runs."""

    source: str
    steps: tuple[Step, ...]
    dialect: str = "sqlite"
    #: The `-- allow` declaration of each placeholder.
    allowed: tuple[Allowed, ...] = ()
    #: Every bind and placeholder of the file, in order of first use.
    binds: tuple[str, ...] = field(init=False, repr=False, compare=False)
    placeholders: tuple[str, ...] = field(init=False, repr=False, compare=False)
    #: Paramstyle -> every step's statements compiled (render's work that is the same for
    #: every item).
    _compiled: dict[str, tuple[tuple[str, tuple[Compiled, ...]], ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        statements = [st for s in self.steps for st in s.statements]
        object.__setattr__(self, "binds", tuple(dict.fromkeys(b for st in statements for b in st.binds)))
        object.__setattr__(self, "placeholders",
                           tuple(dict.fromkeys(p for st in statements for p in st.placeholders)))

    def problems(self, payload: Mapping[str, Any]) -> list[str]:
        """Why this payload cannot run the file (missing binds, identifiers outside their
        declaration); [] if it can."""
        problems = []
        allowed = {a.name: a for a in self.allowed}
        for name in self.placeholders:
            if name not in payload:
                problems.append(f"{{{name}}}: the payload has no {name!r}")
                continue
            problem = allowed[name].problem(payload[name], self.dialect)
            if problem is not None:
                problems.append(problem)
        for name in self.binds:
            if _lookup(payload, name) is _MISSING:
                problems.append(f":{name}: the payload has no {name!r}")
        return problems

    def render(self, payload: Mapping[str, Any], paramstyle: str) -> list[RenderedStep]:
        """Every step's SQL for one item; raises InvalidPayload (before any SQL runs) if it
        cannot (with the messages of `problems`)."""
        binds = {}
        for name in self.binds:
            value = _lookup(payload, name)
            if value is _MISSING:
                self._refuse(payload)
            binds[name] = bind_value(value)
        values = {}
        allowed = {a.name: a for a in self.allowed} if self.placeholders else {}
        for name in self.placeholders:
            if name not in payload or allowed[name].problem(payload[name], self.dialect) is not None:
                self._refuse(payload)
            values[name] = quote(payload[name], self.dialect)
        compiled = self._compiled.get(paramstyle)
        if compiled is None:
            numbered = self.dialect == "oracle"
            compiled = tuple((step.name, tuple(st.compile(paramstyle, numbered=numbered) for st in step.statements))
                             for step in self.steps)
            self._compiled[paramstyle] = compiled
        return [RenderedStep(name, tuple(st.fill(values, binds) for st in statements))
                for name, statements in compiled]

    def _refuse(self, payload: Mapping[str, Any]) -> NoReturn:
        problems = self.problems(payload)
        code = "SQL-IDENTIFIER" if problems[0].startswith("{") else "SQL-BIND"
        raise InvalidPayload("; ".join(problems), code=code)


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
    """Whether an operator's option (--work-table) may be pasted into SQL as a table name:
    `name` or `schema.name` of ASCII letters, digits, `_`, `$`, `#`, not starting with a digit,
    at most 128 characters. Payload values go through `-- allow` declarations instead."""
    return (isinstance(value, str) and len(value) <= MAX_IDENTIFIER_CHARS
            and _IDENTIFIER.fullmatch(value) is not None)
