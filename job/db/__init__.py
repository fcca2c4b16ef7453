"""Databases: the names the rest of bulkjob uses, from the modules of job.db that own them.

The dialect modules own the drivers: only `oracle` imports oracledb, only `postgres` imports
psycopg, only `sqlite` imports sqlite3; what each provides is the Dialect protocol
(job.db.dialect). Nothing here connects at import. The parent connects for the preflight and
its own reads (items from a query, a work table's claims and write-back); workers open their
own session after they start (job.db.session).

Where each concern lives: `url` (--db URL into DbSettings), `settings` (the CLI's options, the
password), `errors` (our exceptions, the classifiers), `session` (the worker's Database, the
connect timer), `batch` (batch DML), `preflight`, `parent` (the parent's own connections),
`query` (--items-sql), `claim`, `queue` and `worktable` (a work table), `steps`, `stepsfile`,
`stepsparse`, `stepstokens`, `identifiers` and `transaction` (the SQL steps handler).
"""

from __future__ import annotations

from .batch import DEFAULT_BATCH_SIZE, RowError
from .dialect import Dialect, bind_marker, dialect_of
from .errors import ConnectTimeout, DatabaseUnavailable, InvalidPayload, classifiers
from .preflight import preflight, preflight_failure
from .session import Database, call_with_timeout
from .settings import PASSWORD_ENV, db_settings, read_password
from .url import COMMIT_ITEM, COMMIT_STEP, DEFAULT_CONNECT_TIMEOUT, DbSettings, parse_db_url, plain_sql

__all__ = [
    "COMMIT_ITEM", "COMMIT_STEP", "DEFAULT_BATCH_SIZE", "DEFAULT_CONNECT_TIMEOUT", "PASSWORD_ENV",
    "ConnectTimeout", "Database", "DatabaseUnavailable", "DbSettings", "Dialect", "InvalidPayload", "RowError",
    "bind_marker", "call_with_timeout", "classifiers", "db_settings", "dialect_of", "parse_db_url", "plain_sql",
    "preflight", "preflight_failure", "read_password",
]
