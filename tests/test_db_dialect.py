"""The Dialect contract (job.db.dialect): every database module provides each member of the
protocol, with the right kind and a signature that takes what the protocol passes. mypy checks
the same statically where `dialect_of` loads the modules; this test needs no type checker."""

from __future__ import annotations

import importlib
import inspect
import types

import pytest

from job.db import dialect_of, parse_db_url
from job.db.dialect import Dialect

DIALECTS = {"oracle": "oracle://u@db/S", "postgres": "postgresql://u@db/x", "sqlite": "sqlite:///x.db"}


def members() -> tuple[list[str], dict[str, inspect.Signature]]:
    """The protocol's constants, and its functions with their signatures (without `self`)."""
    constants = [name for name in Dialect.__annotations__ if not name.startswith("_")]
    functions = {}
    for name, value in vars(Dialect).items():
        if inspect.isfunction(value) and not name.startswith("_"):
            signature = inspect.signature(value)
            functions[name] = signature.replace(parameters=list(signature.parameters.values())[1:])
    return constants, functions


def problems(module: types.ModuleType) -> list[str]:
    """What `module` lacks or gets wrong of the protocol, [] if nothing."""
    constants, functions = members()
    found = []
    for name in constants:
        if not isinstance(getattr(module, name, None), str):
            found.append(f"{name}: expected a str constant")
    for name, wanted in functions.items():
        function = getattr(module, name, None)
        if not callable(function):
            found.append(f"{name}: expected a function")
            continue
        given = inspect.signature(function).parameters
        for param in wanted.parameters.values():
            other = given.get(param.name)
            if other is None or other.kind != param.kind:
                found.append(f"{name}: parameter {param.name!r} ({param.kind.description}) missing or of another kind")
        positional = [p.name for p in wanted.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        if [p for p in given if given[p].kind is given[p].POSITIONAL_OR_KEYWORD][:len(positional)] != positional:
            found.append(f"{name}: positional parameters not in the protocol's order {positional}")
        for extra in set(given) - set(wanted.parameters):
            if given[extra].default is inspect.Parameter.empty:
                found.append(f"{name}: parameter {extra!r} is not the protocol's and has no default")
    return found


def test_the_protocol_has_constants_and_functions():
    constants, functions = members()
    assert {"PARAMSTYLE", "NOW", "TRIVIAL_QUERY", "CLAIM_CLOCK", "CLAIM_EXPIRY"} <= set(constants)
    assert {"connect", "classify", "run_transaction", "executemany", "claim", "claim_sql"} <= set(functions)


@pytest.mark.parametrize("name", DIALECTS)
def test_each_dialect_provides_the_whole_protocol(name):
    if name == "postgres":
        pytest.importorskip("psycopg")
    module = importlib.import_module(f"job.db.{name}")
    assert problems(module) == []
    assert dialect_of(parse_db_url(DIALECTS[name])) is module
    assert module.PARAMSTYLE in ("named", "pyformat")


def test_a_module_that_breaks_the_contract_is_told_what_it_lacks():
    sqlite = importlib.import_module("job.db.sqlite")
    broken = types.ModuleType("broken")
    vars(broken).update({name: getattr(sqlite, name) for name in dir(sqlite) if not name.startswith("__")})
    del broken.first_row_sql
    broken.NOW = None
    broken.usable = lambda conn, deadline: True
    broken.claim = lambda conn, statements, runner, ttl, limit: []
    assert sorted(problems(broken)) == [
        "NOW: expected a str constant",
        "claim: parameter 'limit' (keyword-only) missing or of another kind",
        "claim: parameter 'runner' (keyword-only) missing or of another kind",
        "claim: parameter 'ttl' (keyword-only) missing or of another kind",
        "first_row_sql: expected a function",
        "usable: parameter 'deadline' is not the protocol's and has no default",
    ]
