"""docs/cli.md's tables are generated from the options and the exit-code table: the committed
file is what the generator writes, and the generator touches nothing but its tables. And the
tests the docs cite are tests that exist."""

from __future__ import annotations

import ast
import re

import pytest
from conftest import ROOT

from job.clidocs import CLI_MD, COMMAND, README_MD, README_TABLES, TABLES, generate, main, markers
from job.exits import ENDINGS
from job.options import ReportOptions, RunOptions, StatusOptions, options_of


def test_docs_cli_md_is_what_the_options_generate():
    text = CLI_MD.read_text(encoding="utf-8")
    assert generate(text) == text, f"docs/cli.md differs from job/options.py or job/exits.py: run `{COMMAND}`"


def test_the_readmes_exit_codes_are_what_job_exits_generates():
    text = README_MD.read_text(encoding="utf-8")
    assert generate(text, README_TABLES) == text, f"README.md's exit codes differ from job/exits.py: run `{COMMAND}`"
    for ending in ENDINGS:
        assert f"| {ending.code} | `{ending.status}` | {ending.meaning.split('--')[0]}" in text


def test_the_command_checks_both_files_and_a_readme_by_its_own_parts(tmp_path, capsys):
    readme = tmp_path / "README.md"
    begin, end = markers("exit codes in brief", README_TABLES)
    readme.write_text(f"# x\n\n{begin}\n| stale |\n{end}\n")
    assert main(["--check", str(readme)]) == 1
    assert main([str(readme)]) == 0 and "| 70 | `internal_error` |" in readme.read_text()
    assert main(["--check"]) == 0  # the checkout's docs/cli.md and README.md


def test_every_option_and_exit_code_is_in_the_docs():
    text = CLI_MD.read_text(encoding="utf-8")
    for cls in (RunOptions, StatusOptions, ReportOptions):
        for opt in options_of(cls):
            assert f"| `{opt.flag}" in text and f"`{opt.envvars[0]}`" in text, opt.flag
    for ending in ENDINGS:
        assert f"| {ending.code} | `{ending.status}` |" in text


def skeleton(between: str) -> str:
    """A document with prose around every generated part, each holding `between`."""
    parts = ["# Title\n\nprose before\n"]
    for name in TABLES:
        begin, end = markers(name)
        parts.append(f"{begin}\n{between}\n{end}\n\nprose after {name}\n")
    return "\n".join(parts)


def test_generate_rewrites_only_what_is_between_the_markers():
    stale = skeleton("| a stale row |")
    text = generate(stale)
    assert "a stale row" not in text
    assert text.startswith("# Title\n\nprose before\n")
    for name in TABLES:
        assert f"prose after {name}\n" in text
    assert "| `--max-attempts N`<br>`BULKJOB_MAX_ATTEMPTS` | `6` |" in text
    assert generate(text) == text


@pytest.mark.parametrize("name", sorted(TABLES))
def test_a_part_without_its_markers_is_refused(name):
    begin, end = markers(name)
    for broken in (skeleton("").replace(begin, ""), skeleton("").replace(end, ""),
                   skeleton("").replace(begin, "@@").replace(end, begin).replace("@@", end)):
        with pytest.raises(ValueError, match=name):
            generate(broken)


def test_check_fails_on_a_stale_file_and_the_command_rewrites_it(tmp_path, capsys):
    path = tmp_path / "cli.md"
    path.write_text(skeleton("| a stale row |"))
    assert main(["--check", str(path)]) == 1
    assert COMMAND in capsys.readouterr().err
    assert main([str(path)]) == 0
    assert main(["--check", str(path)]) == 0 and "a stale row" not in path.read_text()


@pytest.mark.parametrize("plain, cell", [
    ("or use --items-sql / --work-table.", "or use `--items-sql` / `--work-table`."),
    ("Password: $BULKJOB_DB_PASSWORD or --db-password-file", "Password: `$BULKJOB_DB_PASSWORD` or `--db-password-file`"),
    ("handle(item, ctx) -> dict | None; or sql:PATH", "handle(item, ctx) -> dict \\| None; or sql:PATH"),
    ("`--retry-on` already code; non--flag", "`--retry-on` already code; non--flag"),
])
def test_help_text_becomes_a_table_cell(plain, cell):
    from job.clidocs import _markdown

    assert _markdown(plain) == cell


def _test_names() -> dict[str, set[str]]:
    """Every test function of tests/, by name: the files that define it."""
    names: dict[str, set[str]] = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                names.setdefault(node.name, set()).add(path.name)
    return names


def test_every_test_the_docs_name_exists():
    """The fault table and the docs cite tests as `file.py::name` or `name` (a trailing `*` for a
    prefix): each must name a test that is there, so a rename cannot leave a guarantee uncited."""
    names = _test_names()
    cited = 0
    for doc in [ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")]:
        for m in re.finditer(r"`(?:(test_\w+\.py)::)?(test_[\w*]+)`", doc.read_text()):
            file, pattern = m.groups()
            cited += 1
            wanted = re.compile(re.escape(pattern).replace(r"\*", ".*") + ("" if pattern.endswith("*") else "$"))
            assert any(wanted.match(name) and (file is None or file in files) for name, files in names.items()), \
                f"{doc.name} cites {m.group(0)}, which no test of tests/ is"
    assert cited > 20
