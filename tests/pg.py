"""A real PostgreSQL server for the tests: a private cluster in a temporary directory on loopback.

`initdb` refuses to run as root, so as root the cluster belongs to the `postgres` user (made by
Debian's package) or else `nobody`. Host connections need a password (SCRAM), so the tests also
exercise the way bulkjob gets one: from BULKJOB_DB_PASSWORD or --db-password-file.

Used by the database tests and the fault-injection suite: `pg_server` is one server per test
session, `pg_db` a fresh database per test.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

#: Superuser of the test cluster and its password (a test secret, never a real one).
PG_USER = "bulkjob"
PG_PASSWORD = "pg-test-secret-7d1e"
#: Server settings for a throwaway cluster: no durability, quick deadlock detection.
PG_SETTINGS = {
    "listen_addresses": "127.0.0.1", "fsync": "off", "synchronous_commit": "off",
    "full_page_writes": "off", "shared_buffers": "16MB", "max_connections": "60",
    "deadlock_timeout": "200ms", "log_min_messages": "warning",
}


def pg_bindir() -> str | None:
    """Directory holding initdb and pg_ctl: on PATH, else Debian's newest versioned directory."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                  key=lambda d: int(re.sub(r"\D", "", d.split("/")[-2]) or 0))
    return next((d for d in reversed(dirs) if os.path.exists(os.path.join(d, "initdb"))), None)


def _owner() -> str | None:
    """The user to run the server as when we are root (initdb refuses root), else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


class PgServer:
    """One private cluster: `url(db)` is a bulkjob --db URL, `conninfo(db)` a psycopg one."""

    def __init__(self) -> None:
        # conftest registers this module's fixtures, so import its helpers only when used.
        from conftest import free_port, need, wait_for_port

        bindir = pg_bindir()
        need(bindir is not None, "PostgreSQL server binaries (initdb, pg_ctl) not found: "
                                 "apt-get install postgresql")
        self.bindir = bindir
        self.owner = _owner()
        need(os.geteuid() != 0 or (self.owner is not None and shutil.which("runuser") is not None),
             "running as root needs a non-root user and runuser to start PostgreSQL")
        self.dir = Path(tempfile.mkdtemp(prefix="bulkjob-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.password = PG_PASSWORD
        if self.owner:
            shutil.chown(self.dir, self.owner)
        pwfile = self.dir / "pwfile"
        pwfile.write_text(PG_PASSWORD + "\n")
        if self.owner:
            shutil.chown(pwfile, self.owner)
        self._pg("initdb", "-D", str(self.data), "-U", PG_USER, "--pwfile", str(pwfile),
                 "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                 "--no-instructions", "--no-sync")
        options = " ".join(f"-c {k}={v}" for k, v in PG_SETTINGS.items())
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-t", "60",
                 "-o", f"-p {self.port} -k {self.dir} {options}", "start")
        wait_for_port(self.port)

    def _pg(self, tool: str, *args: str) -> None:
        cmd = [os.path.join(self.bindir, tool), *args]
        if self.owner:
            cmd = ["runuser", "-u", self.owner, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if proc.returncode != 0:
            log = self.dir / "server.log"
            raise RuntimeError(f"{tool} failed: {proc.stderr}\n{log.read_text() if log.exists() else ''}")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{db}"

    def conninfo(self, db: str = "postgres") -> str:
        return (f"host=127.0.0.1 port={self.port} user={PG_USER} password={PG_PASSWORD} "
                f"dbname={db} connect_timeout=10")

    def connect(self, db: str = "postgres", *, autocommit: bool = True):
        import psycopg

        return psycopg.connect(self.conninfo(db), autocommit=autocommit)

    def create_database(self, name: str) -> str:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def restart(self) -> None:
        """Restart the server (fast shutdown: every session is cut), same port and settings."""
        # -l again: without it the new server would keep pg_ctl's output pipe open.
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-m", "fast",
                 "-w", "-t", "60", "restart")

    def shutdown(self) -> None:
        """Stop the server as an outage does (fast: every session is cut); start() brings it back."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def start(self) -> None:
        """Start the server again after shutdown(), on the same port with the same settings."""
        options = " ".join(f"-c {k}={v}" for k, v in PG_SETTINGS.items())
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-t", "60",
                 "-o", f"-p {self.port} -k {self.dir} {options}", "start")

    def stop(self) -> None:
        try:
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class PgDatabase:
    """A fresh database of the test server, with what a bulkjob run needs to reach it."""

    def __init__(self, server: PgServer, name: str) -> None:
        self.server = server
        self.name = server.create_database(name)
        self.url = server.url(name)
        #: Environment for a bulkjob run: the password travels only this way (or in a file).
        self.env = {"BULKJOB_DB_PASSWORD": server.password}

    def connect(self, *, autocommit: bool = True):
        return self.server.connect(self.name, autocommit=autocommit)

    def execute(self, sql: str, params=None) -> list[tuple]:
        with self.connect() as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []


@pytest.fixture(scope="session")
def pg_server():
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")
    server = PgServer()
    yield server
    server.stop()


@pytest.fixture
def pg_db(pg_server, request):
    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50].strip("_")
    return PgDatabase(pg_server, name)
