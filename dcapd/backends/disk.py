"""The default backend: a diskcache directory (SQLite in WAL mode), safe for several
processes on one machine (design.md §2). Bytes only, never pickled, never evicted."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import diskcache

# Settings that must be the same for every opener (they persist in the cache directory and
# the last opener's win), so they are given here and nowhere else.
CACHE_SETTINGS = dict(
    eviction_policy="none",
    cull_limit=0,
    statistics=0,
    tag_index=0,
    size_limit=2**62,
    sqlite_journal_mode="wal",
    disk_min_file_size=2**20,
    # diskcache opens one SQLite connection per thread; its defaults (a 64 MiB memory map and
    # an 8,192-page cache each) multiplied peak RSS to ~400 MiB at 10,000 platforms. A hit
    # costs the same without them (measured: scripts/bench.py).
    sqlite_mmap_size=0,
    sqlite_cache_size=256,
)


class UnsafeCacheValue(Exception):
    """A cache row holds something other than str/bytes: refuse to load it."""


class BytesOnlyDisk(diskcache.Disk):
    """A diskcache Disk that stores only str keys and bytes values and never unpickles."""

    def put(self, key):
        if not isinstance(key, str):
            raise TypeError("cache keys must be str")
        return super().put(key)

    def get(self, key, raw):
        if not raw:
            raise UnsafeCacheValue("cache key is not raw str")
        return super().get(key, raw)

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if read or not isinstance(value, bytes):
            raise TypeError("cache values must be bytes")
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):
        if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY):
            raise UnsafeCacheValue(f"refusing to load a cache value of mode {mode}")
        data = super().fetch(mode, filename, value, read)
        if not isinstance(data, bytes):
            raise UnsafeCacheValue("cache value is not bytes")
        return data


def open_cache(directory: str) -> diskcache.Cache:
    """The one place the cache is opened, with the settings it must always have."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        os.chmod(directory, 0o700)
    except OSError:  # e.g. a directory we do not own; diskcache will still work
        pass
    for attempt in range(5):
        try:
            return diskcache.Cache(directory, disk=BytesOnlyDisk, timeout=60, **CACHE_SETTINGS)
        except (sqlite3.OperationalError, diskcache.Timeout):
            # Several processes creating one cache at once can briefly see "database is locked".
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


# diskcache.Cache.get's own lookup (a str key is stored raw), run on an idle reader.
_SELECT = (
    "SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
    " AND (expire_time IS NULL OR expire_time > ?)"
)


class DiskBackend:
    """A diskcache directory: ``transact()`` holds SQLite's writer lock, which serialises
    transactions of every process on the directory.

    Reads outside a transaction (every cache hit) skip diskcache's per-call bookkeeping and
    its connection per thread: they take an idle read-only connection from a stack (last in,
    first out, so most hits land on the same connection and its page cache) and open one
    more when none is idle, so there are only as many as reads ever ran at once, and no
    thread ever waits for one (a lock waited for while SQLite runs without the GIL made hits
    queue behind each other). Each read is its own SQLite read transaction: it sees every
    commit of any process, as before. Reads inside a transaction of the calling thread keep
    diskcache's connection, so they see that transaction's own writes."""

    def __init__(self, directory: str):
        self.directory = directory
        self.description = f"cache directory {directory}"
        self.cache = open_cache(directory)
        self._idle: list[sqlite3.Connection] = []  # append/pop: atomic, nothing to wait on
        self._pid = os.getpid()

    def _open_reader(self) -> sqlite3.Connection:
        reader = sqlite3.connect(
            os.path.join(self.directory, diskcache.core.DBNAME),
            timeout=60,
            isolation_level=None,
            check_same_thread=False,  # used by one thread at a time, whichever
        )
        reader.execute(f"PRAGMA cache_size = {CACHE_SETTINGS['sqlite_cache_size']}")
        reader.execute(f"PRAGMA mmap_size = {CACHE_SETTINGS['sqlite_mmap_size']}")
        reader.execute("PRAGMA query_only = 1")
        return reader

    def get(self, key: str) -> bytes | None:
        cache = self.cache
        if cache._txn_id == threading.get_ident() or not isinstance(key, str):
            return cache.get(key)  # inside this thread's transaction: see its own writes
        if self._pid != os.getpid():  # a forked child never uses its parent's connections
            self._idle, self._pid = [], os.getpid()
        idle = self._idle
        try:
            reader = idle.pop()
        except IndexError:
            reader = self._open_reader()
        try:
            rows = reader.execute(_SELECT, (key, time.time())).fetchall()
        finally:
            idle.append(reader)
        if not rows:
            return None
        ((mode, filename, value),) = rows
        try:
            return cache._disk.fetch(mode, filename, value, False)
        except OSError:  # a file-backed value deleted meanwhile, as diskcache.get
            return None

    def set(self, key: str, value: bytes) -> None:
        self.cache.set(key, value)

    def pop(self, key: str) -> bytes | None:
        return self.cache.pop(key)

    def delete(self, key: str) -> bool:
        return bool(self.cache.delete(key))

    def keys(self, prefix: str = "") -> list[str]:
        return [
            key for key in self.cache.iterkeys() if isinstance(key, str) and key.startswith(prefix)
        ]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.cache.transact():
            yield

    def probe(self) -> None:
        self.cache.get("status/readyz-probe")

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for reader in idle:
            reader.close()
        self.cache.close()

    def __len__(self) -> int:
        return len(self.cache)
