"""The default backend: a diskcache directory (SQLite in WAL mode), safe for several
processes on one machine (design.md §2). Bytes only, never pickled, never evicted."""

from __future__ import annotations

import os
import sqlite3
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


class DiskBackend:
    """A diskcache directory: ``transact()`` holds SQLite's writer lock, which serialises
    transactions of every process on the directory."""

    def __init__(self, directory: str):
        self.directory = directory
        self.description = f"cache directory {directory}"
        self.cache = open_cache(directory)

    def get(self, key: str) -> bytes | None:
        return self.cache.get(key)

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
        self.cache.close()

    def __len__(self) -> int:
        return len(self.cache)
