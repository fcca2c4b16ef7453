"""Identifiers from payloads: what a steps file's `{name}` may be, and how it reaches SQL.

A steps file declares every placeholder with the values it may take, a list or a pattern:

    -- allow table: sales_2025, sales_2026
    -- allow region: /[a-z]{2}_[a-z]+/

A payload's value is accepted only when it is a plain name (ASCII letters, digits and `_`, not
starting with a digit: no schema prefix, no quotes, no `$` or `#`), is not a reserved word or
pseudo-column of the database, fits its length limit and is among the declared values (or
matches the pattern as a whole). It then reaches SQL double-quoted, with the database's own case
rule applied so that it names what the same word unquoted would: Oracle upper-cases unquoted
names (`sales_2025` is SALES_2025, sent as "SALES_2025"), PostgreSQL lower-cases them (sent as
"sales_2025"), SQLite compares names ignoring ASCII case (sent as written). A table created with
a quoted mixed-case name cannot be named this way.

Pure: no database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

#: The longest name each database takes (Oracle 12.2+: 128 bytes; PostgreSQL: NAMEDATALEN - 1,
#: beyond which it truncates silently).
MAX_CHARS = {"oracle": 128, "postgres": 63, "sqlite": 128}

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def words(text: str) -> frozenset[str]:
    """The words of a block of text, for tables of keywords."""
    return frozenset(text.split())


#: Words no payload may name on any database: truth values, NULL, the session's user, the clock
#: and row addresses, which a quoted identifier may still reach (a column named so).
_COMMON = words("""
TRUE FALSE NULL UNKNOWN DEFAULT USER CURRENT_USER SESSION_USER SYSTEM_USER CURRENT_ROLE
CURRENT_SCHEMA CURRENT_CATALOG CURRENT_DATE CURRENT_TIME CURRENT_TIMESTAMP LOCALTIME
LOCALTIMESTAMP ROWID ROWNUM OID
""")
#: Oracle's reserved words (V$RESERVED_WORDS, RESERVED = 'Y') and pseudo-columns.
_ORACLE = words("""
ACCESS ADD ALL ALTER AND ANY AS ASC AUDIT BETWEEN BY CHAR CHECK CLUSTER COLUMN COLUMN_VALUE
COMMENT COMPRESS CONNECT CREATE CURRENT DATE DECIMAL DEFAULT DELETE DESC DISTINCT DROP ELSE
EXCLUSIVE EXISTS FILE FLOAT FOR FROM GRANT GROUP HAVING IDENTIFIED IMMEDIATE IN INCREMENT INDEX
INITIAL INSERT INTEGER INTERSECT INTO IS LEVEL LIKE LOCK LONG MAXEXTENTS MINUS MLSLABEL MODE
MODIFY NESTED_TABLE_ID NOAUDIT NOCOMPRESS NOT NOWAIT NULL NUMBER OF OFFLINE ON ONLINE OPTION OR
ORDER PCTFREE PRIOR PUBLIC RAW RENAME RESOURCE REVOKE ROW ROWID ROWNUM ROWS SELECT SESSION SET
SHARE SIZE SMALLINT START SUCCESSFUL SYNONYM SYSDATE TABLE THEN TO TRIGGER UID UNION UNIQUE
UPDATE USER VALIDATE VALUES VARCHAR VARCHAR2 VIEW WHENEVER WHERE WITH
SYSTIMESTAMP DBTIMEZONE SESSIONTIMEZONE ORA_ROWSCN OBJECT_ID OBJECT_VALUE CONNECT_BY_ROOT
CONNECT_BY_ISLEAF CONNECT_BY_ISCYCLE
""")
#: PostgreSQL's reserved key words (both kinds) and system columns.
_POSTGRES = words("""
ALL ANALYSE ANALYZE AND ANY ARRAY AS ASC ASYMMETRIC BOTH CASE CAST CHECK COLLATE COLUMN
CONSTRAINT CREATE CURRENT_CATALOG CURRENT_DATE CURRENT_ROLE CURRENT_TIME CURRENT_TIMESTAMP
CURRENT_USER DEFAULT DEFERRABLE DESC DISTINCT DO ELSE END EXCEPT FALSE FETCH FOR FOREIGN FROM
GRANT GROUP HAVING IN INITIALLY INTERSECT INTO LATERAL LEADING LIMIT LOCALTIME LOCALTIMESTAMP
NOT NULL OFFSET ON ONLY OR ORDER PLACING PRIMARY REFERENCES RETURNING SELECT SESSION_USER SOME
SYMMETRIC SYSTEM_USER TABLE THEN TO TRAILING TRUE UNION UNIQUE USER USING VARIADIC WHEN WHERE
WINDOW WITH AUTHORIZATION BINARY COLLATION CONCURRENTLY CROSS CURRENT_SCHEMA FREEZE FULL ILIKE
INNER IS ISNULL JOIN LEFT LIKE NATURAL NOTNULL OUTER OVERLAPS RIGHT SIMILAR TABLESAMPLE VERBOSE
CTID XMIN XMAX CMIN CMAX TABLEOID
""")
#: SQLite's keywords (sqlite3_keyword_name) and its row id's names.
_SQLITE = words("""
ABORT ACTION ADD AFTER ALL ALTER ALWAYS ANALYZE AND AS ASC ATTACH AUTOINCREMENT BEFORE BEGIN
BETWEEN BY CASCADE CASE CAST CHECK COLLATE COLUMN COMMIT CONFLICT CONSTRAINT CREATE CROSS
CURRENT CURRENT_DATE CURRENT_TIME CURRENT_TIMESTAMP DATABASE DEFAULT DEFERRABLE DEFERRED DELETE
DESC DETACH DISTINCT DO DROP EACH ELSE END ESCAPE EXCEPT EXCLUDE EXCLUSIVE EXISTS EXPLAIN FAIL
FILTER FIRST FOLLOWING FOR FOREIGN FROM FULL GENERATED GLOB GROUP GROUPS HAVING IF IGNORE
IMMEDIATE IN INDEX INDEXED INITIALLY INNER INSERT INSTEAD INTERSECT INTO IS ISNULL JOIN KEY LAST
LEFT LIKE LIMIT MATCH MATERIALIZED NATURAL NO NOT NOTHING NOTNULL NULL NULLS OF OFFSET ON OR
ORDER OTHERS OUTER OVER PARTITION PLAN PRAGMA PRECEDING PRIMARY QUERY RAISE RANGE RECURSIVE
REFERENCES REGEXP REINDEX RELEASE RENAME REPLACE RESTRICT RETURNING RIGHT ROLLBACK ROW ROWS
SAVEPOINT SELECT SET TABLE TEMP TEMPORARY THEN TIES TO TRANSACTION TRIGGER UNBOUNDED UNION
UNIQUE UPDATE USING VACUUM VALUES VIEW VIRTUAL WHEN WHERE WINDOW WITH WITHOUT _ROWID_
""")
RESERVED = {"oracle": _COMMON | _ORACLE, "postgres": _COMMON | _POSTGRES, "sqlite": _COMMON | _SQLITE}


def fold(name: str, dialect: str) -> str:
    """The name as the database reads it unquoted: upper case on Oracle, lower case elsewhere
    (SQLite ignores ASCII case, so lower case only compares)."""
    return name.upper() if dialect == "oracle" else name.lower()


def quote(name: str, dialect: str) -> str:
    """A checked plain name as a quoted identifier naming what the name unquoted names."""
    return f'"{name if dialect == "sqlite" else fold(name, dialect)}"'


def name_problem(value: Any, dialect: str) -> str | None:
    """Why `value` cannot be an identifier on `dialect`, or None if it can."""
    if not isinstance(value, str) or _PLAIN.fullmatch(value) is None:
        return (f"{value!r} is not a plain name (ASCII letters, digits and _, not starting with a "
                "digit; no schema prefix, quotes, spaces or other signs)")
    if len(value) > MAX_CHARS[dialect]:
        return f"{value!r} is longer than {MAX_CHARS[dialect]} characters"
    if value.upper() in RESERVED[dialect]:
        return f"{value!r} is a reserved word or pseudo-column"
    return None


@dataclass(frozen=True, slots=True)
class Allowed:
    """What one `{name}` may be: a fixed list of names (`values`, folded), or a pattern."""

    name: str
    line: int
    spec: str
    values: frozenset[str] | None = None
    pattern: re.Pattern[str] | None = None

    def problem(self, value: Any, dialect: str) -> str | None:
        """Why `value` cannot fill `{name}`, or None if it can (then `quote` it)."""
        why = name_problem(value, dialect)
        if why is None:
            if self.values is not None and fold(value, dialect) not in self.values:
                why = f"{value!r} is not among the names declared by `-- allow {self.name}: {self.spec}`"
            elif self.pattern is not None and self.pattern.fullmatch(value) is None:
                why = f"{value!r} does not match `-- allow {self.name}: {self.spec}`"
        return None if why is None else f"{{{self.name}}}: {why}; refused"


def parse_allowed(name: str, spec: str, *, dialect: str, line: int, where: str) -> Allowed:
    """An `-- allow NAME: SPEC` line: `/REGEX/` (matched against the whole value) or names
    separated by commas; UsageError naming `where` (file:line) when it cannot be used."""
    spec = spec.strip()
    if len(spec) >= 2 and spec.startswith("/") and spec.endswith("/"):
        try:
            pattern = re.compile(spec[1:-1])
        except re.error as e:
            raise UsageError(f"{where}: -- allow {name}: bad pattern {spec}: {e}") from None
        return Allowed(name, line, spec, pattern=pattern)
    names = [n.strip() for n in spec.split(",")]
    if not spec or not all(names):
        raise UsageError(f"{where}: -- allow {name}: expected names separated by commas, or /PATTERN/")
    for n in names:
        why = name_problem(n, dialect)
        if why is not None:
            raise UsageError(f"{where}: -- allow {name}: {why}")
    return Allowed(name, line, spec, values=frozenset(fold(n, dialect) for n in names))
