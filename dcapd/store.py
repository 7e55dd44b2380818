"""The cache: one entry per GET response, keyed by canonical strings.

This is the only module that knows cache keys (design.md §1). Values are bytes in a small
envelope (a JSON header line, then the body) so nothing is ever pickled or unpickled
(CVE-2025-69872), and the cache never evicts (design.md §2): in REQ and OFFLINE modes it is the
data store of record.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from .backends import Backend, StoreUnavailable
from .backends.disk import (
    CACHE_SETTINGS,
    BytesOnlyDisk,
    DiskBackend,
    UnsafeCacheValue,
    open_cache,
)
from .inline import may_wait
from .pcsurls import INTEL_ROOTCA_CRL_URL, canonical_crl_url

__all__ = [
    "CACHE_SETTINGS",
    "Backend",
    "BytesOnlyDisk",
    "Entry",
    "Store",
    "StoreUnavailable",
    "UnsafeCacheValue",
    "lock_owner",
    "open_cache",
    "owner_is_gone",
]


class Entry:
    """One stored response: body bytes exactly as received, the headers to replay, metadata.

    Stored as ``content-type\nName: value\n...\n\n<meta JSON>\n<body>``: reading it for a
    cache hit splits a few short lines and never parses JSON (metadata is decoded only when
    refresh or the status view asks for it). Header values are URL-encoded or hex, so they
    hold no newline.
    """

    __slots__ = ("body", "headers", "content_type", "_meta", "_meta_raw")

    def __init__(
        self,
        body: bytes,
        headers: dict[str, str] | None = None,
        content_type: str = "",
        meta: dict[str, Any] | None = None,
    ):
        self.body = body
        self.headers = headers if headers is not None else {}
        self.content_type = content_type
        self._meta: dict[str, Any] = meta if meta is not None else {}
        self._meta_raw: bytes | None = None

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta_raw is not None:
            self._meta = json.loads(self._meta_raw)
            self._meta_raw = None
        return self._meta

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Entry) and (
            self.body,
            self.headers,
            self.content_type,
            self.meta,
        ) == (other.body, other.headers, other.content_type, other.meta)

    def __repr__(self) -> str:
        return f"Entry({len(self.body)} bytes, {self.content_type!r}, {list(self.headers)})"

    def to_bytes(self) -> bytes:
        for value in (self.content_type, *self.headers, *self.headers.values()):
            if "\n" in value or "\r" in value:
                raise ValueError("a stored header must not contain a line break")
        lines = [self.content_type] + [f"{name}: {value}" for name, value in self.headers.items()]
        return (
            ("\n".join(lines) + "\n\n").encode("utf-8")
            + json.dumps(self.meta, separators=(",", ":")).encode()
            + b"\n"
            + self.body
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Entry:
        head, _, rest = data.partition(b"\n\n")
        meta_raw, _, body = rest.partition(b"\n")
        content_type, *lines = head.decode("utf-8").split("\n")
        # As __init__ would, without its defaults (a cache hit builds one per request).
        entry = cls.__new__(cls)
        entry.body = body
        entry.headers = dict([line.split(": ", 1) for line in lines])
        entry.content_type = content_type
        entry._meta = {}
        entry._meta_raw = meta_raw
        return entry


def node_id() -> str:
    """This machine as lock owners name it: the host name, plus the PID namespace where there
    is one (containers may share a host name, never a PID namespace). Nodes of a fleet on one
    database differ by it, so a PID is only ever looked up where it was taken."""
    name = socket.gethostname()
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # e.g. "pid:[4026531836]"
    except (OSError, AttributeError):
        return name
    digits = "".join(ch for ch in namespace if ch.isdigit())
    return f"{name}/{digits}" if digits else name


def lock_owner() -> str:
    """``node:pid:token``: who holds a lock in the cache, so a crashed holder can be seen."""
    return f"{node_id()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_gone(owner: str) -> bool:
    """True when a lock's owner was a process on this node that has ended (a crash or kill
    leaves its lock behind). Another node's lock (a fleet on one database), and on Windows
    any lock, waits for its expiry: its PID means nothing here."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if os.name != "posix" or host != node_id() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)  # signal 0: existence check only (POSIX)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. EPERM: it exists, under another user
        return False
    return False


# The fields of each collateral kind's key, in the builders' order (below).
COLLATERAL_KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "tcb": ("tee", "version", "fmspc", "update"),
    "identity": ("identity", "version", "update"),
    "pckcrl": ("ca",),
    "rootcacrl": (),
    "crl": ("uri",),
}


class CacheKey(NamedTuple):
    """A cache key's kind and fields: "tcb/sgx/4/00906ED50000/EARLY" -> ("tcb", ("sgx", "4",
    "00906ED50000", "EARLY")); a crl/ key has one field, the URI (which may contain '/')."""

    kind: str
    fields: tuple[str, ...]

    @property
    def well_formed(self) -> bool:
        """False for a collateral key without its kind's fields (one dcapd did not write)."""
        names = COLLATERAL_KEY_FIELDS.get(self.kind)
        return names is None or len(self.fields) == len(names)

    def collateral(self) -> dict[str, Any] | None:
        """A collateral entry's fields by name, with ``kind`` and the API version as an int
        (for refresh and the status view); None for any other key."""
        if self.kind == "extra":
            return Store.parse_extra_key(self.fields)
        names = COLLATERAL_KEY_FIELDS.get(self.kind)
        if names is None or not self.well_formed or (self.kind == "crl" and not self.fields[0]):
            return None
        named: dict[str, Any] = {"kind": self.kind, **dict(zip(names, self.fields))}
        if "version" in named:
            named["version"] = int(named["version"])
        return named


def _upper(value: str) -> str:
    return value.upper()


class Store:
    """Response entries and write-side records, by canonical string key."""

    def __init__(self, directory: str = "", *, backend: Backend | None = None):
        """A store on the diskcache ``directory``, or on the given ``backend`` (see
        :func:`dcapd.backends.open_backend`: a directory or a PostgreSQL database)."""
        if backend is None:
            backend = DiskBackend(directory)
        self.directory = directory
        self.backend = backend
        # Cache locks this process holds (name -> owner), released by release_locks().
        self._held: dict[str, str] = {}
        self._held_lock = threading.Lock()

    @property
    def cache(self) -> Backend:
        """The backend (raw bytes by key; tests and benchmarks look at stored bytes)."""
        return self.backend

    @property
    def reads_wait(self) -> bool:
        """A read can wait on the network (PostgreSQL), not only on local pages."""
        return not isinstance(self.backend, DiskBackend)

    @property
    def description(self) -> str:
        """What the cache is, for logs and /readyz (never a password)."""
        return self.backend.description

    def close(self) -> None:
        self.backend.close()

    def probe(self) -> None:
        """Read the cache once (readiness): raises whatever makes the cache unreadable."""
        self.backend.probe()

    # --- keys (design.md §1): upper-case hex, update defaults to STANDARD, API version 3|4

    @staticmethod
    def tcb_key(tee: str, version: int, fmspc: str, update: str = "STANDARD") -> str:
        return f"tcb/{tee.lower()}/{version}/{_upper(fmspc)}/{update.upper()}"

    @staticmethod
    def identity_key(kind: str, version: int, update: str = "STANDARD") -> str:
        return f"identity/{kind.lower()}/{version}/{update.upper()}"

    # Collateral PCS v4 serves beyond Intel's PCCS (pccs-1.27.md §3), all under one kind so
    # that tools reading Intel's kinds pass them by: TCB infos and identities pinned to a TCB
    # evaluation data number, the QAE identity, the lists of evaluation data numbers.
    EXTRA_PREFIX = "extra/"

    @staticmethod
    def pinned_tcb_key(tee: str, fmspc: str, number: int) -> str:
        return f"extra/tcb/{tee.lower()}/{_upper(fmspc)}/{int(number)}"

    @staticmethod
    def extra_identity_key(kind: str, selector: int | str) -> str:
        """``selector``: a TCB evaluation data number, or STANDARD|EARLY (the QAE identity)."""
        text = str(int(selector)) if isinstance(selector, int) else selector.upper()
        return f"extra/identity/{kind.lower()}/{text}"

    @staticmethod
    def evaluation_numbers_key(tee: str) -> str:
        return f"extra/tcbevaluationdatanumbers/{tee.lower()}"

    @staticmethod
    def pckcrl_key(ca: str) -> str:
        return f"pckcrl/{ca.upper()}"

    @staticmethod
    def rootcacrl_key() -> str:
        return "rootcacrl"

    @classmethod
    def crl_key(cls, uri: str) -> str:
        """One key per CRL distribution point, whatever its spelling (scheme and host case,
        default port, query order): Intel's root CA CRL shares ``rootcacrl``'s entry. A URI
        outside the allow-list (an old entry) keeps its exact spelling."""
        canonical = canonical_crl_url(uri)
        if canonical == INTEL_ROOTCA_CRL_URL:
            return cls.rootcacrl_key()
        return f"crl/{canonical or uri}"

    @staticmethod
    def legacy_crl_key(uri: str) -> str:
        """Where versions before the canonical keys stored ``crl?uri=`` (the exact string)."""
        return f"crl/{uri}"

    @staticmethod
    def pckcert_key(qeid: str, pceid: str, cpusvn: str, pcesvn: str) -> str:
        return f"pckcert/{_upper(qeid)}/{_upper(pceid)}/{_upper(cpusvn)}/{_upper(pcesvn)}"

    @staticmethod
    def pckcert_prefix() -> str:
        return "pckcert/"

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

    # Raw TCBs answered by local selection only (derived data, bounded per platform): a ring
    # of slots, each one small record, and a head saying which slot is next. Under rawtcbs/
    # so that exports skip them with the platform's other raw-TCB records.
    @staticmethod
    def selected_head_key(qeid: str, pceid: str) -> str:
        return f"rawtcbs/{_upper(qeid)}/{_upper(pceid)}/selected"

    @staticmethod
    def selected_slot_key(qeid: str, pceid: str, slot: int) -> str:
        return f"rawtcbs/{_upper(qeid)}/{_upper(pceid)}/selected/{slot}"

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
    def parse_extra_key(fields: tuple[str, ...]) -> dict[str, Any] | None:
        """What an ``extra/`` key says; ``number`` is None for the QAE identity by update."""
        what = fields[0] if fields else ""
        if what == "tcb" and len(fields) == 4 and fields[3].isdigit():
            return {
                "kind": "extra",
                "endpoint": "tcb",
                "tee": fields[1],
                "fmspc": fields[2],
                "number": int(fields[3]),
            }
        if what == "identity" and len(fields) == 3:
            number = int(fields[2]) if fields[2].isdigit() else None
            if number is None and fields[2] not in ("STANDARD", "EARLY"):
                return None
            return {
                "kind": "extra",
                "endpoint": "identity",
                "identity": fields[1],
                "number": number,
                "update": None if number is not None else fields[2],
            }
        if what == "tcbevaluationdatanumbers" and len(fields) == 2:
            return {"kind": "extra", "endpoint": "tcbevaluationdatanumbers", "tee": fields[1]}
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

    def get(self, key: str) -> Entry | None:
        data = self.backend.get(key)
        return None if data is None else Entry.from_bytes(data)

    def put(self, key: str, entry: Entry) -> None:
        may_wait("a cache write")
        self.backend.set(key, entry.to_bytes())

    def pop(self, key: str) -> Entry | None:
        may_wait("a cache write")
        data = self.backend.pop(key)
        return None if data is None else Entry.from_bytes(data)

    def delete(self, key: str) -> bool:
        """Remove one entry; True when it was there (dcapd-admin's delete)."""
        may_wait("a cache write")
        return self.backend.delete(key)

    def entries(self, prefix: str = "") -> Iterator[tuple[str, Entry]]:
        """Every entry whose key starts with ``prefix``, in key order (dcapd-admin's list):
        ``(key, entry)``; ``entry.meta`` has fetched_at, source, next_update where known.
        An entry deleted while listing is left out."""
        for key in sorted(self.keys(prefix)):
            entry = self.get(key)
            if entry is not None:
                yield key, entry

    def get_json(self, key: str) -> Any:
        """A write-side record (platform, cert set, raw TCBs): JSON in the body."""
        entry = self.get(key)
        return None if entry is None else json.loads(entry.body)

    def put_json(self, key: str, record: Any) -> None:
        self.put(
            key,
            Entry(
                body=json.dumps(record, separators=(",", ":")).encode(),
                meta={"stored_at": time.time()},
            ),
        )

    def try_lock(self, name: str, owner: str, ttl: float, now: float) -> bool:
        """A lock shared by every process on this cache directory: it expires after ``ttl``,
        or as soon as its owner (see :func:`lock_owner`) is a process that no longer runs."""
        key = self.lock_key(name)
        with self.transaction():
            held = self.get_json(key)
            if (
                held
                and held["owner"] != owner
                and held["expires"] > now
                and not owner_is_gone(held["owner"])
            ):
                return False
            self.put_json(key, {"owner": owner, "expires": now + ttl})
        with self._held_lock:
            self._held[name] = owner
        return True

    def unlock(self, name: str, owner: str) -> None:
        with self._held_lock:
            if self._held.get(name) == owner:
                del self._held[name]
        key = self.lock_key(name)
        with self.transaction():
            held = self.get_json(key)
            if held and held["owner"] == owner:
                self.delete(key)

    def release_locks(self) -> int:
        """At a stop: give up every cache lock this process still holds (its work was cut),
        so other processes need not wait for them to expire. Returns how many."""
        with self._held_lock:
            held, self._held = self._held, {}
        for name, owner in held.items():
            self.unlock(name, owner)
        return len(held)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Several writes that must land together (or not at all, on a crash or error)."""
        may_wait("a cache transaction")
        with self.backend.transaction():
            yield

    def keys(self, prefix: str = "") -> list[str]:
        may_wait("a scan of the cache")
        return self.backend.keys(prefix)

    @staticmethod
    def parse_key(key: str) -> CacheKey:
        """What any key says, the inverse of the builders above (:class:`CacheKey`)."""
        kind, _, rest = key.partition("/")
        if kind == "crl":
            return CacheKey(kind, (rest,))
        return CacheKey(kind, tuple(rest.split("/")) if rest else ())
