"""Keeping secret values out of everything a run writes: logs, results, errors, the manifest.

Secrets are values, not names: the database password and the S3 secret key from the
environment, and the values of the payload fields named with `--redact`. Pure functions: the
caller says which values are secret.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from .outcome import Outcome

#: What a secret is replaced with wherever it would be written.
REDACTED = "[redacted]"
#: Shorter values are not treated as secrets: replacing every "1" or "ab" would mangle the logs
#: without protecting anything worth protecting.
MIN_SECRET_CHARS = 4
#: Environment variables whose values are secrets.
SECRET_ENV_VARS = ("BULKJOB_DB_PASSWORD", "BULKJOB_DB_WALLET_PASSWORD", "AWS_SECRET_ACCESS_KEY",
                   "AWS_SESSION_TOKEN")


def env_secrets(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The secret values set in the environment (the database password, S3 secret keys)."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    return secrets_of(env.get(name) for name in SECRET_ENV_VARS)


def secrets_of(values: Iterable[Any]) -> tuple[str, ...]:
    """The values worth redacting, longest first (so a secret containing another is replaced whole)."""
    found = {str(v) for v in values if v is not None and not isinstance(v, bool)}
    return tuple(sorted((v for v in found if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True))


def field_values(payload: Any, fields: Iterable[str]) -> tuple[str, ...]:
    """The values of every key named in `fields`, at any depth of `payload`, as secrets.

    A secret field holding a list or an object makes every scalar inside it secret.
    """
    names = frozenset(fields)
    found: list[Any] = []

    def leaves(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                leaves(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                leaves(v)
        else:
            found.append(value)

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, v in value.items():
                if key in names:
                    leaves(v)
                else:
                    walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    if names:
        walk(payload)
    return secrets_of(found)


def scrub_text(text: str, secrets: tuple[str, ...]) -> str:
    """`text` with every secret value replaced by REDACTED."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def scrub(value: Any, secrets: tuple[str, ...]) -> Any:
    """A copy of a JSON-like value with secrets replaced in every string, key and number."""
    if not secrets:
        return value
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, dict):
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) in secrets:
        return REDACTED
    return value


#: What JSON escapes in a string (and ensure_ascii=False leaves alone): a secret holding one of
#: these may not appear as itself in a JSON text that holds it.
_JSON_TEXT = json.JSONEncoder(ensure_ascii=False, allow_nan=False)
_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')


def _may_hold(value: Any, secrets: tuple[str, ...]) -> bool:
    """Whether a JSON-like value may hold a secret (a string, key or number that scrub would
    change): false only when its JSON text holds none of them. One C-speed pass, where scrub
    walks every key and value; a value JSON cannot write (NaN among them, which str() spells
    otherwise) is scrubbed the slow way."""
    try:
        text = _JSON_TEXT.encode(value)
    except (TypeError, ValueError):
        return True
    return any(secret in text or _JSON_ESCAPED.search(secret) is not None for secret in secrets)


def scrub_outcome(outcome: Outcome, secrets: tuple[str, ...]) -> Outcome:
    """The outcome with secrets removed from what reaches the manifest and the parent's logs:
    the handler's result, the kept progress, and the failure's message, code and traceback."""
    if not secrets or (outcome.result is None and outcome.failure is None and not outcome.progress):
        return outcome
    if outcome.failure is None and not outcome.progress and not _may_hold(outcome.result, secrets):
        return outcome
    failure = outcome.failure
    if failure is not None:
        failure = replace(failure, message=scrub_text(failure.message, secrets),
                          code=scrub_text(failure.code, secrets) if failure.code else failure.code,
                          traceback=scrub_text(failure.traceback, secrets) if failure.traceback else None)
    return replace(outcome, result=scrub(outcome.result, secrets), failure=failure,
                   progress=scrub(outcome.progress, secrets))
