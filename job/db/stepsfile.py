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
from dataclasses import dataclass
from typing import Any

from . import InvalidPayload, bind_marker
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

    def render(self, values: Mapping[str, str], binds: Mapping[str, Any], paramstyle: str, *,
               numbered: bool = False) -> tuple[str, dict[str, Any] | None]:
        """The SQL for the driver, and its bind values (None when it has no binds). `values`
        are the quoted identifiers; `numbered` sends the binds as :b1, :b2 ... in their order."""
        names = {name: f"b{i}" for i, name in enumerate(self.binds, 1)} if numbered else {}
        out = []
        for kind, value in self.parts:
            if kind == "bind":
                out.append(bind_marker(names.get(value, value), paramstyle))
            elif kind == "ident":
                out.append(values[value])
            elif paramstyle == "pyformat" and self.binds:
                out.append(value.replace("%", "%%"))
            else:
                out.append(value)
        params = {names.get(name, name): binds[name] for name in self.binds} if self.binds else None
        return "".join(out), params


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

    @property
    def binds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b for s in self.steps for st in s.statements for b in st.binds))

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for s in self.steps for st in s.statements for p in st.placeholders))

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
        cannot."""
        problems = self.problems(payload)
        if problems:
            code = "SQL-IDENTIFIER" if problems[0].startswith("{") else "SQL-BIND"
            raise InvalidPayload("; ".join(problems), code=code)
        values = {name: quote(payload[name], self.dialect) for name in self.placeholders}
        binds = {name: bind_value(_lookup(payload, name)) for name in self.binds}
        numbered = self.dialect == "oracle"
        return [RenderedStep(step.name, tuple(st.render(values, binds, paramstyle, numbered=numbered)
                                              for st in step.statements))
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
    """Whether an operator's option (--work-table) may be pasted into SQL as a table name:
    `name` or `schema.name` of ASCII letters, digits, `_`, `$`, `#`, not starting with a digit,
    at most 128 characters. Payload values go through `-- allow` declarations instead."""
    return (isinstance(value, str) and len(value) <= MAX_IDENTIFIER_CHARS
            and _IDENTIFIER.fullmatch(value) is not None)
