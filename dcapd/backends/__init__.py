"""Where the cache's bytes live: a backend stores bytes values under string keys.

:class:`dcapd.store.Store` owns the key format and the entry envelope; a backend only keeps
``str -> bytes`` and provides the few operations the store needs (design.md §1-2). Two exist:
a diskcache directory (the default) and a PostgreSQL database shared by several nodes
(``dcapd.services.open_backend`` picks one from the configuration).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol


class StoreUnavailable(Exception):
    """The cache's database cannot be reached or did not answer in time. Answered 503 with
    Intel's text (one place: the app's error handlers); ``str()`` names the database, never
    its password."""


class Backend(Protocol):
    """``str`` keys, ``bytes`` values, never evicted, nothing else."""

    #: what the cache is, for logs and /readyz ("cache directory /x", "PostgreSQL db@host")
    description: str

    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes) -> None: ...

    def pop(self, key: str) -> bytes | None: ...

    def delete(self, key: str) -> bool:
        """Remove ``key``; True when it was there."""
        ...

    def keys(self, prefix: str = "") -> list[str]:
        """Every key starting with ``prefix``."""
        ...

    def transaction(self) -> AbstractContextManager[None]:
        """Writes inside land together or not at all, and transactions of every process on
        the same cache run one at a time (read-modify-write sections rely on it).
        Re-entrant within one thread."""
        ...

    def probe(self) -> None:
        """Read once; raise if the cache cannot be read (readiness)."""
        ...

    def close(self) -> None: ...
