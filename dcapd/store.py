"""The cache: one diskcache entry per GET response, keyed by canonical strings.

This is the only module that knows cache keys (design.md §1). Values are bytes in a small
envelope (a JSON header line, then the body) so nothing is ever pickled or unpickled
(CVE-2025-69872), and the cache never evicts (design.md §2): in REQ and OFFLINE modes it is the
data store of record.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

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


@dataclass
class Entry:
    """One stored response: body bytes exactly as received, the headers to replay, metadata."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = ""
    meta: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        head = {"h": self.headers, "ct": self.content_type, "m": self.meta}
        return json.dumps(head, separators=(",", ":")).encode() + b"\n" + self.body

    @classmethod
    def from_bytes(cls, data: bytes) -> "Entry":
        head, _, body = data.partition(b"\n")
        parsed = json.loads(head)
        return cls(body=body, headers=parsed["h"], content_type=parsed["ct"], meta=parsed["m"])


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


def _upper(value: str) -> str:
    return value.upper()


class Store:
    """Response entries and write-side records, by canonical string key."""

    def __init__(self, directory: str):
        self.directory = directory
        self.cache = open_cache(directory)

    def close(self) -> None:
        self.cache.close()

    # --- keys (design.md §1): upper-case hex, update defaults to STANDARD, API version 3|4

    @staticmethod
    def tcb_key(tee: str, version: int, fmspc: str, update: str = "STANDARD") -> str:
        return f"tcb/{tee.lower()}/{version}/{_upper(fmspc)}/{update.upper()}"

    @staticmethod
    def identity_key(kind: str, version: int, update: str = "STANDARD") -> str:
        return f"identity/{kind.lower()}/{version}/{update.upper()}"

    @staticmethod
    def pckcrl_key(ca: str) -> str:
        return f"pckcrl/{ca.upper()}"

    @staticmethod
    def rootcacrl_key() -> str:
        return "rootcacrl"

    @staticmethod
    def crl_key(uri: str) -> str:
        return f"crl/{uri}"

    @staticmethod
    def pckcert_key(qeid: str, pceid: str, cpusvn: str, pcesvn: str) -> str:
        return f"pckcert/{_upper(qeid)}/{_upper(pceid)}/{_upper(cpusvn)}/{_upper(pcesvn)}"

    @staticmethod
    def appraisal_key(fmspc: str) -> str:
        return f"appraisal/{_upper(fmspc)}"

    @staticmethod
    def platform_key(qeid: str, pceid: str) -> str:
        return f"platform/{_upper(qeid)}/{_upper(pceid)}"

    @staticmethod
    def certs_key(qeid: str, pceid: str) -> str:
        return f"certs/{_upper(qeid)}/{_upper(pceid)}"

    @staticmethod
    def rawtcbs_key(qeid: str, pceid: str) -> str:
        return f"rawtcbs/{_upper(qeid)}/{_upper(pceid)}"

    REGISTRATION_STATES = ("NEW", "NOT_AVAILABLE")

    @staticmethod
    def registration_key(state: str, qeid: str, pceid: str, cpusvn: str, pcesvn: str) -> str:
        return f"reg/{state}/{_upper(qeid)}/{_upper(pceid)}/{_upper(cpusvn)}/{_upper(pcesvn)}"

    @staticmethod
    def registration_prefix(state: str) -> str:
        return f"reg/{state}/"

    @staticmethod
    def platform_prefix() -> str:
        return "platform/"

    @staticmethod
    def platform_id_from_key(key: str) -> tuple[str, str]:
        _, qeid, pceid = key.split("/")
        return qeid, pceid

    @staticmethod
    def parse_collateral_key(key: str) -> Optional[dict]:
        """What a collateral entry's key says (for refresh and the status view)."""
        kind, _, rest = key.partition("/")
        parts = rest.split("/")
        if kind == "tcb" and len(parts) == 4:
            return {"kind": "tcb", "tee": parts[0], "version": int(parts[1]),
                    "fmspc": parts[2], "update": parts[3]}
        if kind == "identity" and len(parts) == 3:
            return {"kind": "identity", "identity": parts[0], "version": int(parts[1]),
                    "update": parts[2]}
        if kind == "pckcrl" and len(parts) == 1:
            return {"kind": "pckcrl", "ca": parts[0]}
        if key == "rootcacrl":
            return {"kind": "rootcacrl"}
        if kind == "crl" and rest:
            return {"kind": "crl", "uri": rest}
        return None

    STATUS_KEY = "status/refresh"

    @staticmethod
    def lock_key(name: str) -> str:
        return f"lock/{name}"

    @staticmethod
    def policy_key(fmspc: str, policy_id: str) -> str:
        return f"policy/{_upper(fmspc)}/{policy_id.lower()}"

    @staticmethod
    def policy_prefix(fmspc: str) -> str:
        return f"policy/{_upper(fmspc)}/"

    # --- access

    def get(self, key: str) -> Optional[Entry]:
        data = self.cache.get(key)
        return None if data is None else Entry.from_bytes(data)

    def put(self, key: str, entry: Entry) -> None:
        self.cache.set(key, entry.to_bytes())

    def pop(self, key: str) -> Optional[Entry]:
        data = self.cache.pop(key)
        return None if data is None else Entry.from_bytes(data)

    def delete(self, key: str) -> None:
        self.cache.delete(key)

    def get_json(self, key: str):
        """A write-side record (platform, cert set, raw TCBs): JSON in the body."""
        entry = self.get(key)
        return None if entry is None else json.loads(entry.body)

    def put_json(self, key: str, record) -> None:
        self.put(key, Entry(body=json.dumps(record, separators=(",", ":")).encode(),
                            meta={"stored_at": time.time()}))

    def try_lock(self, name: str, owner: str, ttl: float, now: float) -> bool:
        """A lock shared by every process on this cache directory (expires after ``ttl``)."""
        key = self.lock_key(name)
        with self.transaction():
            held = self.get_json(key)
            if held and held["owner"] != owner and held["expires"] > now:
                return False
            self.put_json(key, {"owner": owner, "expires": now + ttl})
            return True

    def unlock(self, name: str, owner: str) -> None:
        key = self.lock_key(name)
        with self.transaction():
            held = self.get_json(key)
            if held and held["owner"] == owner:
                self.delete(key)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Several writes that must land together (or not at all, on a crash or error)."""
        with self.cache.transact():
            yield

    def keys(self, prefix: str = "") -> list[str]:
        return [key for key in self.cache.iterkeys() if isinstance(key, str)
                and key.startswith(prefix)]
