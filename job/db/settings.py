"""The command line's database options checked into DbSettings, and the password, read where it is used.

The parent checks the options once (`db_settings`); every process that connects reads the
password itself (`read_password`), so that it never travels in settings, arguments or pipes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import replace

from ..errors import UsageError
from .dialect import dialect_of
from .url import COMMIT_ITEM, DEFAULT_CONNECT_TIMEOUT, DbSettings, parse_db_url, plain_sql

#: Where the password comes from when --db-password-file is not given.
PASSWORD_ENV = "BULKJOB_DB_PASSWORD"


def db_settings(url: str | None, *, password_file: str | None = None, session_sql: Iterable[str] = (),
                statement_timeout: float | None = None, connect_timeout: float | None = None,
                commit: str = COMMIT_ITEM) -> DbSettings | None:
    """The CLI's database options as DbSettings, or None without --db; UsageError for options
    that cannot be used (the driver reads the URL too, and its driver must be installed)."""
    statements = tuple(sql for sql in session_sql if sql.strip())
    if url is None:
        if password_file or statements or statement_timeout:
            raise UsageError("--db-password-file, --session-sql and --statement-timeout need --db")
        return None
    if password_file is not None and not os.path.isfile(password_file):
        raise UsageError(f"--db-password-file {password_file}: no such file")
    settings = parse_db_url(url, password_file=password_file, session_sql=statements,
                            statement_timeout=statement_timeout,
                            connect_timeout=connect_timeout or DEFAULT_CONNECT_TIMEOUT, commit=commit)
    settings = replace(settings, session_sql=tuple(plain_sql(sql, settings.dialect) for sql in statements))
    # The driver's own reading of the connection parameters: a typo is a usage error now, not
    # a failed connect in every worker.
    dialect_of(settings).check_settings(settings)
    return settings


def read_password(settings: DbSettings, environ: Mapping[str, str] | None = None) -> str | None:
    """The password: BULKJOB_DB_PASSWORD, else what --db-password-file holds (without its final
    line break), else None. UsageError when the file cannot be read."""
    env = os.environ if environ is None else environ
    if env.get(PASSWORD_ENV):
        return env[PASSWORD_ENV]
    if settings.password_file:
        try:
            with open(settings.password_file, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        except OSError as e:
            raise UsageError(f"--db-password-file: cannot read it: {e.strerror}") from None
    return None
