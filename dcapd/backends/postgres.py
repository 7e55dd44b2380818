"""The PostgreSQL backend: several dcapd nodes share one database (``[cache] url``).

One table of ``key -> bytes`` (the same keys and envelopes as the diskcache directory; the
store owns both), created at first start. Transactions take one advisory lock, so they run
one at a time across every node, as SQLite's writer lock makes them on one machine; reads
never wait. Every failure to reach the database becomes :class:`StoreUnavailable` (503)
within the configured timeout, and the pool reconnects by itself when the database returns.

Needs ``pip install 'dcapd[postgresql]'`` (psycopg 3 with its pool).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..config import ConfigError
from . import StoreUnavailable

log = logging.getLogger("dcapd.store")

#: the schema this code writes; a database recording a newer one is refused
SCHEMA_VERSION = 1

# pg_advisory_xact_lock keys (per database): schema creation, and the writer lock.
_SCHEMA_LOCK = 0x6463_6170_6400_0001
_WRITER_LOCK = 0x6463_6170_6400_0002

# How long a transaction waits for another node's transaction (diskcache waits 60 s too).
_WRITER_WAIT = "60s"

SCHEMA = """
CREATE TABLE IF NOT EXISTS dcapd_meta (
    name  text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS dcapd_entries (
    key   text COLLATE "C" PRIMARY KEY,  -- "C": the primary key index serves LIKE 'prefix%'
    value bytea NOT NULL
);
"""


URL_SETTING = "[cache] url / DCAPD_CACHE_URL"


class SchemaTooNew(ConfigError):
    """The database was set up by a newer dcapd: this one must not write to it."""

    def __init__(self, problem: str):
        super().__init__(URL_SETTING, problem, "cache_url")


def mask_url(url: str) -> str:
    """The URL with its password (in the user part or a ``password=`` parameter) replaced by
    ``***``, for logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://***"
    if parts.password is not None:
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{user}:***@{host}")
    if parts.query:
        query = "&".join(
            "password=***" if pair.partition("=")[0].lower() == "password" else pair
            for pair in parts.query.split("&")
        )
        parts = parts._replace(query=query)
    return urlunsplit(parts)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class PostgresBackend:
    """``str -> bytes`` in one PostgreSQL table, through a bounded connection pool."""

    def __init__(self, url: str, pool_size: int = 10, timeout: float = 3.0):
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise ConfigError(
                URL_SETTING,
                "the PostgreSQL cache needs psycopg: pip install 'dcapd[postgresql]'",
                "cache_url",
            ) from None
        self._psycopg = psycopg
        try:
            params: dict[str, Any] = conninfo_to_dict(url)
        except psycopg.Error:  # never echo it: it may hold a password
            raise ConfigError(URL_SETTING, "not a valid PostgreSQL URL", "cache_url") from None
        self.url = mask_url(url)
        self.description = (
            f"PostgreSQL database {params.get('dbname') or params.get('user') or '?'} "
            f"on {params.get('host') or 'localhost'}:{params.get('port') or 5432}"
        )
        self.timeout = timeout
        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = max(2, int(timeout))
        if "application_name" not in params:
            kwargs["application_name"] = "dcapd"
        if "tcp_user_timeout" not in params:
            # A database that vanished from the network (no reset, no answer) fails the
            # request after the timeout instead of after the kernel's retransmissions.
            kwargs["tcp_user_timeout"] = int(timeout * 1000)
        self._statement_timeout = f"{int(timeout * 1000)}ms"
        self._local = threading.local()
        self.last_connect_error = ""
        backend = self

        class Connection(psycopg.Connection):
            """Remembers why connecting failed, for the 503's log line and /readyz."""

            @classmethod
            def connect(cls, *args, **kwargs):
                try:
                    conn = super().connect(*args, **kwargs)
                except psycopg.OperationalError as exc:
                    backend.last_connect_error = _first_line(exc)
                    raise
                backend.last_connect_error = ""
                return conn

        self.pool = ConnectionPool(
            url,
            connection_class=Connection,
            min_size=1,
            max_size=pool_size,
            kwargs=kwargs,
            configure=self._configure,
            check=self._check,
            timeout=timeout,
            reconnect_timeout=timeout,
            name="dcapd-cache",
            open=False,
        )
        self.pool.open(wait=False)
        log.info("cache: PostgreSQL at %s", self.url)
        self.schema_ready = False
        try:
            self.ensure_schema()
        except StoreUnavailable as exc:
            log.warning("%s; dcapd answers 503 until it is reachable", exc)

    def _check(self, conn) -> None:
        """Before each use, without a round trip: read what the server sent meanwhile, so a
        connection it closed (a restart, an idle timeout) is seen broken and replaced."""
        from psycopg.pq import ConnStatus, TransactionStatus

        pgconn = conn.pgconn
        for _ in range(2):  # a termination message, then the end of the stream
            pgconn.consume_input()  # raises OperationalError once the server has gone
        if (
            conn.closed
            or pgconn.status != ConnStatus.OK
            or pgconn.transaction_status != TransactionStatus.IDLE
        ):
            raise self._psycopg.OperationalError("the connection was closed by the server")

    def _configure(self, conn) -> None:
        # Statements are cut after the timeout (a hung query is a 503, never a hang); a
        # session idle in a transaction (a node frozen with the writer lock) is ended.
        conn.execute(
            f"SET statement_timeout = '{self._statement_timeout}'; "
            "SET idle_in_transaction_session_timeout = '60s'"
        )

    # --- errors and connections

    @contextmanager
    def _errors(self) -> Iterator[None]:
        from psycopg_pool import PoolTimeout

        try:
            yield
        except PoolTimeout as exc:
            why = _first_line(exc)
            if self.last_connect_error:
                why += f" (last: {self.last_connect_error})"
            raise StoreUnavailable(f"{self.description} is unavailable: {why}") from None
        except self._psycopg.OperationalError as exc:
            why = _first_line(exc)
            raise StoreUnavailable(f"{self.description} is unavailable: {why}") from None

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:  # inside this thread's transaction
            yield conn
            return
        if not self.schema_ready:
            self.ensure_schema()
        with self._errors(), self.pool.connection(timeout=self.timeout) as conn:
            yield conn

    def ensure_schema(self) -> None:
        """Create the tables if missing (several nodes may start at once: the advisory lock
        makes the others wait), and refuse a schema newer than this code."""
        with self._errors(), self.pool.connection(timeout=self.timeout) as conn:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                conn.execute(SCHEMA)
                conn.execute(
                    "INSERT INTO dcapd_meta (name, value) VALUES ('schema_version', %s) "
                    "ON CONFLICT (name) DO NOTHING",
                    (str(SCHEMA_VERSION),),
                )
                row = conn.execute(
                    "SELECT value FROM dcapd_meta WHERE name = 'schema_version'"
                ).fetchone()
        found = int(row[0]) if row and str(row[0]).isdigit() else 0
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{self.description} has cache schema version {found}, newer than this "
                f"dcapd knows ({SCHEMA_VERSION}): upgrade dcapd"
            )
        self.schema_ready = True

    # --- the backend interface

    def get(self, key: str) -> bytes | None:
        with self._connection() as conn:
            row = conn.execute("SELECT value FROM dcapd_entries WHERE key = %s", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set(self, key: str, value: bytes) -> None:
        if not isinstance(key, str) or not isinstance(value, bytes):
            raise TypeError("cache keys must be str and values bytes")
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO dcapd_entries (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (key, value),
            )

    def pop(self, key: str) -> bytes | None:
        with self._connection() as conn:
            row = conn.execute(
                "DELETE FROM dcapd_entries WHERE key = %s RETURNING value", (key,)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def delete(self, key: str) -> bool:
        with self._connection() as conn:
            return conn.execute("DELETE FROM dcapd_entries WHERE key = %s", (key,)).rowcount > 0

    def keys(self, prefix: str = "") -> list[str]:
        with self._connection() as conn:
            if not prefix:
                rows = conn.execute("SELECT key FROM dcapd_entries ORDER BY key").fetchall()
            else:
                rows = conn.execute(
                    "SELECT key FROM dcapd_entries WHERE key LIKE %s ORDER BY key",
                    (_like_prefix(prefix),),
                ).fetchall()
        return [row[0] for row in rows]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if getattr(self._local, "conn", None) is not None:
            yield  # nested: part of the enclosing transaction
            return
        if not self.schema_ready:
            self.ensure_schema()
        with self._errors(), self.pool.connection(timeout=self.timeout) as conn:
            with conn.transaction():
                # Wait for another node's transaction longer than for a statement.
                conn.execute(
                    f"SET LOCAL statement_timeout = '{_WRITER_WAIT}'; "
                    f"SELECT pg_advisory_xact_lock({_WRITER_LOCK}); "
                    f"SET LOCAL statement_timeout = '{self._statement_timeout}'"
                )
                self._local.conn = conn
                try:
                    yield
                finally:
                    self._local.conn = None

    def probe(self) -> None:
        with self._connection() as conn:
            conn.execute("SELECT 1 FROM dcapd_entries WHERE key = 'status/readyz-probe'")

    def close(self) -> None:
        self.pool.close(timeout=1.0)  # do not wait on connection attempts in flight

    def __len__(self) -> int:
        with self._connection() as conn:
            row = conn.execute("SELECT count(*) FROM dcapd_entries").fetchone()
        return int(row[0])
