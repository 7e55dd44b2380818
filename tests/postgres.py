"""A private PostgreSQL server for the tests: ``initdb`` into a temporary directory, listening
only on 127.0.0.1 on a free port, ``fsync=off``; one fresh database per test.

Never a mock: the PostgreSQL backend is tested against the real server. Without PostgreSQL
installed the tests that need it skip with one line; with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.servers import free_port


def find_bindir() -> str | None:
    """Where initdb, pg_ctl and postgres are: on PATH, or Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return str(Path(os.path.realpath(found)).parent)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return str(Path(candidates[0]).parent) if candidates else None


def missing(reason: str) -> None:
    """Skip on a developer's machine; fail in CI (CI=true), where PostgreSQL must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


class PostgresServer:
    """One server for the session. Run as the ``postgres`` OS user when we are root
    (PostgreSQL refuses to run as root)."""

    def __init__(self, bindir: str):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="dcapd-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.user = "postgres"
        self._as_user: list[str] = []
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")
        else:
            import getpass

            self.user = getpass.getuser()

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self._as_user, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=check,
            timeout=120,
        )

    def initdb(self) -> None:
        self._run(
            f"{self.bindir}/initdb",
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off "
            f"-c unix_socket_directories={self.root} -c max_connections=200"
        )
        self._run(
            f"{self.bindir}/pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(f"{self.bindir}/pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, dbname: str = "postgres", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}" + (
            f"?{query}" if query else ""
        )

    def admin_sql(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        try:  # a plain file copy of the (tiny) template is the fastest (PostgreSQL >= 15)
            self.admin_sql(f'CREATE DATABASE "{name}" STRATEGY FILE_COPY')
        except psycopg.errors.SyntaxError:
            self.admin_sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PostgresServer:
    """Start the session's server, or skip/fail (see :func:`missing`)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed (pip install 'dcapd[postgresql]')")
    bindir = find_bindir()
    if bindir is None:
        missing("initdb not found (install PostgreSQL, e.g. apt-get install postgresql)")
        raise AssertionError("unreachable")
    server = PostgresServer(bindir)
    try:
        server.initdb()
        server.start()
    except (subprocess.CalledProcessError, OSError) as exc:
        output = getattr(exc, "stdout", b"") or b""
        server.cleanup()
        missing(f"cannot start PostgreSQL: {exc} {output.decode(errors='replace')[-300:]}")
    deadline = time.monotonic() + 30
    while True:
        try:
            server.admin_sql("SELECT 1")
            return server
        except Exception:
            if time.monotonic() > deadline:
                server.cleanup()
                raise
            time.sleep(0.1)
