"""The docs' generated tables: in docs/cli.md the options of `bulkjob run`, `status` and
`report` (from job.options) and the exit codes (from job.exits), in README.md the exit codes in
brief; each written between its two markers, the prose around them left as it is.

    python -m job.clidocs [PATH]          rewrite PATH (default: the checkout's docs/cli.md and README.md)
    python -m job.clidocs --check [PATH]  exit 1 if PATH is not what would be written
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .exits import ENDINGS
from .options import Choice, Flag, Float, Int, Option, ReportOptions, RunOptions, StatusOptions, options_of

#: The command that rewrites the tables, as the markers and a failing check name it.
COMMAND = "python -m job.clidocs"
#: The file the tables live in, in a checkout.
CLI_MD = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
#: The README, with the exit codes in brief.
README_MD = CLI_MD.parent.parent / "README.md"

# An option or environment variable named in plain text, for a code span; not one inside a
# word (sql:PATH) or already in backticks.
_NAMES = re.compile(r"(?<![\w`$-])(--[a-z][a-z0-9-]*|\$[A-Z][A-Z0-9_]*)")


def _markdown(text: str) -> str:
    """Plain help text as a table cell: options and environment variables in code spans, and
    no `|` that would end the cell (what is in backticks already is kept as it is)."""
    parts = text.split("`")
    parts[::2] = [_NAMES.sub(r"`\1`", part) for part in parts[::2]]
    return "`".join(parts).replace("|", "\\|")


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _range(opt: Option) -> str:
    """The values an option accepts beyond its kind, as a sentence ('' when any will do)."""
    kind = opt.kind
    if not isinstance(kind, (Int, Float)) or (kind.min is None and kind.max is None):
        return ""
    low = "" if kind.min is None else _value(kind.min)
    if kind.max is not None:
        return f"From {low or 'any'} to {_value(kind.max)}."
    return f"Above {low}." if isinstance(kind, Float) and kind.min_open else f"At least {low}."


def _option_cell(opt: Option) -> str:
    if isinstance(opt.kind, Choice):
        spelled = f"{opt.flag} {'|'.join(opt.kind.choices)}"
    elif opt.metavar:
        spelled = f"{opt.flag} {opt.metavar}"
    else:
        spelled = opt.flag
    envvars = ", ".join(f"`{name}`" for name in opt.envvars)
    return f"`{spelled}`<br>{envvars}".replace("|", "\\|")


def _default_cell(opt: Option) -> str:
    if opt.required:
        return "required"
    if opt.default_text is not None:
        return _markdown(opt.default_text)
    if isinstance(opt.kind, Flag):
        return "off"
    if opt.default is None or opt.default == ():
        return "none"
    return f"`{_value(opt.default)}`"


def options_table(*classes: type[Any]) -> str:
    """The Markdown table of the options of one command (option and environment variables,
    default, meaning); or of several that share a base, its options once and then each one's own."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    shared = set.intersection(*(set(options_of(cls)) for cls in classes)) if len(classes) > 1 else set()
    seen: set[Option] = set()
    for cls in classes:
        for opt in options_of(cls):
            if opt in seen:
                continue
            seen.add(opt)
            only = "" if len(classes) == 1 or opt in shared else f"`{_command(cls)}` only."
            meaning = " ".join(part for part in (only, _markdown(opt.help), _range(opt), opt.details) if part)
            rows.append(f"| {_option_cell(opt)} | {_default_cell(opt)} | {meaning} |")
    return "\n".join(rows)


def _command(cls: type[Any]) -> str:
    return {RunOptions: "run", StatusOptions: "status", ReportOptions: "report"}[cls]


def exits_table() -> str:
    """The Markdown table of job.exits' endings: code, status, meaning, what to do."""
    rows = ["| code | status | meaning | what to do |", "| --- | --- | --- | --- |"]
    for row in ENDINGS:
        rows.append(f"| {row.code} | `{row.status}` | {_markdown(row.meaning)} | {_markdown(row.action)} |")
    return "\n".join(rows)


def exits_brief() -> str:
    """The README's exit codes: code, status and meaning (docs/cli.md says what to do)."""
    rows = ["| code | status | meaning |", "| --- | --- | --- |"]
    for row in ENDINGS:
        rows.append(f"| {row.code} | `{row.status}` | {_markdown(row.meaning)} |")
    return "\n".join(rows)


Tables = dict[str, tuple[str, Callable[[], str]]]

#: Each generated part of docs/cli.md by the name its markers carry: where it comes from, and
#: how it is written.
TABLES: Tables = {
    "bulkjob run options": ("job/options.py", lambda: options_table(RunOptions)),
    "bulkjob status and report options": ("job/options.py", lambda: options_table(StatusOptions, ReportOptions)),
    "exit codes": ("job/exits.py", exits_table),
}
#: The generated part of README.md.
README_TABLES: Tables = {"exit codes in brief": ("job/exits.py", exits_brief)}


def markers(name: str, tables: Tables = TABLES) -> tuple[str, str]:
    """The lines that open and close the generated part `name`."""
    return (f"<!-- {name}: generated by `{COMMAND}` from {tables[name][0]}; edit that, not this -->",
            f"<!-- end of {name} -->")


def tables_of(path: Path) -> Tables:
    """The generated parts of the file at `path`: the README's, or docs/cli.md's."""
    return README_TABLES if path.name == README_MD.name else TABLES


def generate(text: str, tables: Tables = TABLES) -> str:
    """`text` (docs/cli.md, or the README with `README_TABLES`) with every generated part
    written anew between its markers.

    Raises ValueError when a part's markers are missing, repeated or out of order: the prose
    must say where each table goes.
    """
    for name, (_source, table) in tables.items():
        begin, end = markers(name, tables)
        if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
            raise ValueError(f"the markers of {name!r} must appear once each, in order:\n{begin}\n{end}")
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = f"{head}{begin}\n{table()}\n{end}{tail}"
    return text


def main(argv: list[str]) -> int:
    """Rewrite the file (or, with --check, say whether it is up to date); the exit code."""
    check = "--check" in argv
    paths = [Path(arg) for arg in argv if arg != "--check"] or [CLI_MD, README_MD]
    stale = 0
    for path in paths:
        text = path.read_text(encoding="utf-8")
        wanted = generate(text, tables_of(path))
        if wanted == text:
            continue
        if check:
            print(f"{path} is out of date: run `{COMMAND}`", file=sys.stderr)
            stale += 1
        else:
            path.write_text(wanted, encoding="utf-8")
            print(f"wrote {path}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
