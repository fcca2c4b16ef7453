"""`--db URL` read into DbSettings, the frozen settings of a database, and SQL from the command line made plain.

Pure: no I/O (the password is not here: job.db.settings reads it; the driver's own reading of
the URL is the dialect's `check_settings`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, unquote, urlsplit

from ..errors import UsageError

#: Default seconds to wait for a connection, TCP connect and login together: a listener that
#: accepts and never answers must cost a worker this long, not forever.
DEFAULT_CONNECT_TIMEOUT = 10.0

#: --commit: one transaction per item, or a commit after each step.
COMMIT_ITEM = "item"
COMMIT_STEP = "step"

#: URL scheme -> dialect module name.
_SCHEMES = {"oracle": "oracle", "oracle+oracledb": "oracle", "oracle+tcps": "oracle",
            "oracle+oracledb+tcps": "oracle", "postgresql": "postgres", "postgres": "postgres",
            "sqlite": "sqlite"}
#: Schemes that connect over TLS (Oracle's `tcps` protocol; PostgreSQL says it with ?sslmode=).
_TLS_SCHEMES = frozenset({"oracle+tcps", "oracle+oracledb+tcps"})
_DEFAULT_PORTS = {"oracle": 1521, "postgres": 5432}
#: A query parameter whose name holds one of these (lower case, without `_`, `-` and `.`) is a
#: password: libpq's `password` and `sslpassword`, Oracle's `wallet_password`, JDBC's
#: `javax.net.ssl.keyStorePassword`, and the short forms `passwd` and `pwd`.
_PASSWORD_WORDS = ("password", "passwd", "pwd")
#: An Oracle PL/SQL block, whose last `;` belongs to it: DECLARE, BEGIN or a <<label>> first.
_PLSQL_BLOCK = re.compile(r"\s*(?:<<\s*\w+\s*>>\s*)*(?:DECLARE|BEGIN)\b", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class DbSettings:
    """Where and how to connect; the password is not here (workers read it themselves)."""

    dialect: str
    url: str
    user: str | None = None
    host: str | None = None
    port: int | None = None
    #: Oracle service name, PostgreSQL database name, or SQLite file path.
    database: str = ""
    #: Extra driver parameters from the URL's query string.
    params: tuple[tuple[str, str], ...] = ()
    password_file: str | None = None
    #: Connect over TLS (`oracle+tcps://`).
    tls: bool = False
    session_sql: tuple[str, ...] = ()
    statement_timeout: float | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    #: COMMIT_ITEM or COMMIT_STEP.
    commit: str = COMMIT_ITEM


def parse_db_url(url: str, *, password_file: str | None = None, session_sql: tuple[str, ...] = (),
                 statement_timeout: float | None = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 commit: str = COMMIT_ITEM) -> DbSettings:
    """DbSettings from `--db URL` plus the other database options (keyword arguments).

    `oracle://user@host:port/service_name` (`oracle+tcps://` for TLS),
    `postgresql://user@host:port/dbname` and `sqlite:///relative/path` or
    `sqlite:////absolute/path`. A password in the URL, in its authority part or as a query
    parameter (`?password=`, `?sslpassword=`, `?wallet_password=` ...), is refused without
    being echoed: it would show in `ps`, in pod specs and in logs. Raises UsageError.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise UsageError(f"--db {_safe(url)}: expected oracle://, oracle+tcps://, postgresql:// or "
                         "sqlite:/// URL")
    dialect = _SCHEMES[scheme]
    try:
        has_password = parts.password is not None
    except ValueError:  # an unparseable authority: say nothing of what it holds
        raise UsageError("--db: the URL's user@host:port part cannot be read") from None
    if has_password:
        raise UsageError("--db: put the password in BULKJOB_DB_PASSWORD or --db-password-file, "
                         "never in the URL")
    params = tuple(parse_qsl(parts.query, keep_blank_values=True))
    for name, _ in params:
        if is_password_parameter(name):
            raise UsageError(f"--db: the query parameter {name!r} is a password; put it in "
                             "BULKJOB_DB_PASSWORD or --db-password-file (a wallet's in "
                             "BULKJOB_DB_WALLET_PASSWORD), never in the URL")
    settings = DbSettings(dialect, url, params=params, password_file=password_file, session_sql=session_sql,
                          statement_timeout=statement_timeout, connect_timeout=connect_timeout, commit=commit)
    if dialect == "sqlite":
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if parts.netloc or not path or path == ":memory:":
            raise UsageError(f"--db {url}: expected sqlite:///PATH (a file that every worker opens)")
        return replace(settings, database=path)
    try:
        port = parts.port or _DEFAULT_PORTS[dialect]
    except ValueError:
        raise UsageError(f"--db {_safe(url)}: bad port") from None
    database = unquote(parts.path.lstrip("/"))
    if not parts.hostname and not any(k == "host" for k, _ in params):
        raise UsageError(f"--db {_safe(url)}: no host")
    if not database:
        what = "service name" if dialect == "oracle" else "database name"
        raise UsageError(f"--db {_safe(url)}: no {what} after the host")
    return replace(settings, user=unquote(parts.username) if parts.username else None, host=parts.hostname,
                   port=port, database=database, tls=scheme in _TLS_SCHEMES)


def is_password_parameter(name: str) -> bool:
    """Whether a URL query parameter's name says that its value is a password."""
    folded = name.lower().replace("_", "").replace("-", "").replace(".", "")
    return any(word in folded for word in _PASSWORD_WORDS)


def _safe(url: str) -> str:
    """The URL for a message: nothing between `//` and `@` (a password may be there), and no
    query string (a password-like parameter may be there)."""
    head, sep, rest = url.partition("://")
    rest = rest.split("?", 1)[0]
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{head}://***@{rest.split('@', 1)[1]}"
    return f"{head}{sep}{rest}"


def plain_sql(sql: str, dialect: str) -> str:
    """SQL given on the command line (--items-sql, --session-sql) as the driver takes it: a
    trailing `;` (and a SQL*Plus `/` line) pasted from a script is dropped, since Oracle refuses
    it (ORA-00933, ORA-03048), except at the end of an Oracle PL/SQL block, which needs it."""
    text = sql.strip()
    lines = text.splitlines()
    if len(lines) > 1 and lines[-1].strip() == "/":
        text = "\n".join(lines[:-1]).rstrip()
    if dialect == "oracle" and _PLSQL_BLOCK.match(text):
        return text
    while text.endswith(";"):
        text = text[:-1].rstrip()
    return text
