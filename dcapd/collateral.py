"""Verification collateral: answer from the cache, fill a miss from upstream (LAZY only).

Data flows one way: resource -> here -> store, falling back to upstream -> store -> resource.
What is stored is exactly what upstream sent (body bytes and issuer-chain header), after a
well-formedness check, so that nothing wrong is ever cached.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timezone
from typing import Callable

from cryptography import x509

from . import jsonlimits
from .errors import EVALUATION_NUMBER_GONE, PccsError
from .freshness import ExpiryWarnings
from .inline import may_wait
from .integrity import Integrity, IntegrityError, tcb_info_mismatch
from .logs import escape, note_cache_outcome
from .pcsurls import canonical_crl_url, is_intel_root_crl_url
from .store import Entry, Store, lock_owner, owner_is_gone
from .upstream import PCS_API_VERSION, Upstream, UpstreamError, UpstreamResponse

log = logging.getLogger("dcapd.collateral")

# Response header names, one place (pccs-reference.md §1.2–§1.4).
PCK_CRL_CHAIN = "SGX-PCK-CRL-Issuer-Chain"
TCB_INFO_CHAIN_V3 = "SGX-TCB-Info-Issuer-Chain"
TCB_INFO_CHAIN_V4 = "TCB-Info-Issuer-Chain"
ENCLAVE_IDENTITY_CHAIN = "SGX-Enclave-Identity-Issuer-Chain"
PCK_CERT_CHAIN = "SGX-PCK-Certificate-Issuer-Chain"
TCBM = "SGX-TCBm"
FMSPC = "SGX-FMSPC"
PCK_CA_TYPE = "SGX-PCK-Certificate-CA-Type"

CT_JSON = "application/json"
CT_PEM = "application/x-pem-file"
CT_CRL = "application/pkix-crl"

# Identity ids inside the signed JSON, by the kind in our routes.
IDENTITY_IDS = {"qe": "QE", "qve": "QVE", "tdqe": "TD_QE", "qae": "QAE"}


def tcb_info_chain_header(version: int) -> str:
    """Intel: the TCB info chain header name follows the API version of the path."""
    return TCB_INFO_CHAIN_V3 if version == 3 else TCB_INFO_CHAIN_V4


class BadUpstreamData(Exception):
    """Upstream answered 200 with something that is not the collateral asked for."""


class SingleFlight:
    """Concurrent misses for one key share one upstream call: within this process through a
    lock per key, and across processes on one cache directory through a lock in the cache
    (the other processes wait for the entry to appear)."""

    POLL = 0.05

    def __init__(self, store: Store, lock_ttl: float, on_wait: Callable[[], None] | None = None):
        self.store = store
        self.lock_ttl = lock_ttl
        # Told when a caller is answered by another caller's fill (metrics).
        self.on_wait = on_wait or (lambda: None)
        self.owner = lock_owner()
        self._lock = threading.Lock()
        self._calls: dict[str, threading.Lock] = {}

    def run(self, key: str, lookup: Callable[[], Entry | None], fill: Callable[[], Entry]) -> Entry:
        may_wait("a fill")  # it may wait for another caller's fill, or fetch
        with self._lock:
            call_lock = self._calls.setdefault(key, threading.Lock())
        with call_lock:
            try:
                # Whoever held the lock may have filled the key meanwhile.
                entry = lookup()
                if entry is not None:
                    self.on_wait()
                    return entry
                return self._across_processes(key, lookup, fill)
            finally:
                with self._lock:
                    self._calls.pop(key, None)

    def _across_processes(
        self, key: str, lookup: Callable[[], Entry | None], fill: Callable[[], Entry]
    ) -> Entry:
        lock_name = f"fill/{key}"
        deadline = time.monotonic() + self.lock_ttl
        while True:
            held = self.store.get_json(self.store.lock_key(lock_name))
            free = held is None or held["expires"] <= time.time() or owner_is_gone(held["owner"])
            if free and self.store.try_lock(lock_name, self.owner, self.lock_ttl, time.time()):
                try:
                    entry = lookup()  # filled by another process just before we got the lock
                    return entry if entry is not None else fill()
                finally:
                    self.store.unlock(lock_name, self.owner)
            time.sleep(self.POLL)
            entry = lookup()
            if entry is not None:
                self.on_wait()
                return entry
            if time.monotonic() > deadline:
                return fill()  # the other process is stuck: do not wait for ever


def is_url_encoded_chain(value: str) -> bool:
    """An issuer chain as PCS sends it: URL-encoded PEM, so without raw whitespace or control
    characters (a folded or unencoded chain could not be stored and replayed as a header)."""
    return "-----BEGIN%20CERTIFICATE-----" in value and not any(
        ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value
    )


def require_chain(reply: UpstreamResponse, *names: str) -> str:
    for name in names:
        value = reply.headers.get(name)
        if value:
            if not is_url_encoded_chain(value):
                raise BadUpstreamData(f"{name} header is not a URL-encoded PEM chain")
            return value
    raise BadUpstreamData(f"response has no {names[0]} header")


def signed_json(body: bytes, top: str) -> dict:
    try:
        document = jsonlimits.loads(body)
    except ValueError as exc:  # JsonTooDeep included: a bad answer, not a crash
        raise BadUpstreamData(f"body is not JSON ({exc})") from None
    if (
        not isinstance(document, dict)
        or not isinstance(document.get(top), dict)
        or not isinstance(document.get("signature"), str)
    ):
        raise BadUpstreamData(f"body is not a signed {top} document")
    return document[top]


def _iso(moment) -> str | None:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def crl_meta(body: bytes) -> dict:
    """Issue and next-update dates of a DER CRL; BadUpstreamData if it is not one."""
    try:
        crl = x509.load_der_x509_crl(body)
    except ValueError:
        raise BadUpstreamData("body is not a DER CRL") from None
    return {"issue_date": _iso(crl.last_update_utc), "next_update": _iso(crl.next_update_utc)}


def signed_json_meta(inner: dict) -> dict:
    """What refresh and the status view report about a TCB info or identity."""
    return {
        "issue_date": inner.get("issueDate"),
        "next_update": inner.get("nextUpdate"),
        "tcb_evaluation_data_number": inner.get("tcbEvaluationDataNumber"),
    }


def fetch_entry(source: Source) -> Entry:
    """Fetch and check one entry; PccsError with Intel's status when that fails (its
    ``upstream_status`` says what upstream answered, when it answered)."""
    if source.retired:
        raise PccsError(410, f"{source.key}: PCS API v3 collateral is never fetched")
    try:
        reply = source.fetch()
    except UpstreamError as exc:
        raise PccsError(502, f"{source.key}: {exc}") from None
    if reply.status != 200:
        if reply.status == 410 and source.pinned:
            error = PccsError(410, f"{source.key}: upstream answered 410", EVALUATION_NUMBER_GONE)
        else:
            error = PccsError(404, f"{source.key}: upstream answered {reply.status}")
        error.upstream_status = reply.status
        raise error
    try:
        return source.entry_from(reply)
    except BadUpstreamData as exc:
        raise PccsError(502, f"{source.key}: upstream sent bad data: {exc}") from None


@dataclass(frozen=True)
class Source:
    """Where one cache entry comes from: its key, how to fetch it, how to check and store it.
    Shared by the miss path and the refresh, so both store exactly the same thing."""

    key: str
    fetch: Callable[[], UpstreamResponse]
    to_entry: Callable[[UpstreamResponse], Entry]
    # A PCS API v3 TCB info or identity: served when cached, never fetched (410 on a miss).
    retired: bool = False
    # Pinned to a TCB evaluation data number: PCS's 410 (number retired) reaches the client.
    pinned: bool = False

    def entry_from(self, reply: UpstreamResponse) -> Entry:
        """The entry for a 200 reply; BadUpstreamData when it is not what Intel signed."""
        try:
            entry = self.to_entry(reply)
        except IntegrityError as exc:
            raise BadUpstreamData(f"integrity check failed: {exc}") from None
        entry.meta.setdefault("fetched_at", time.time())
        entry.meta.setdefault("source", reply.url)
        return entry


def _date(value) -> str | None:
    return value if isinstance(value, str) else None


class NotFoundMemory:
    """Keys PCS recently answered 404 for, so a miss does not ask again within ``ttl``
    seconds (e.g. the TDX TCB info of an SGX-only FMSPC, asked on each new platform's first
    pckcert). Per process and bounded; only ever consulted after a cache miss, so an entry
    that appears in the cache (a fill elsewhere, an upload) is served at once."""

    MAX_KEYS = 10_000

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def remember(self, key: str) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._until) >= self.MAX_KEYS:
                now = self.clock()
                self._until = {k: t for k, t in self._until.items() if t > now}
                while len(self._until) >= self.MAX_KEYS:  # all live: drop the oldest
                    self._until.pop(next(iter(self._until)))
            self._until.pop(key, None)
            self._until[key] = self.clock() + self.ttl

    def recalls(self, key: str) -> bool:
        with self._lock:
            until = self._until.get(key)
            if until is None:
                return False
            if until > self.clock():
                return True
            del self._until[key]
            return False


class Collateral:
    """Answers for pckcrl, tcb, identities, rootcacrl and crl?uri= (extra.py adds what PCS v4
    serves beyond Intel's PCCS, through the same miss path)."""

    def __init__(
        self,
        store: Store,
        upstream: Upstream,
        mode: str,
        integrity: Integrity,
        fill_lock_ttl: float,
        not_found_ttl: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        on_flight_wait: Callable[[], None] | None = None,
        expiry: ExpiryWarnings | None = None,
    ):
        """``fill_lock_ttl``: how long another process's fill lock is honoured (a little more
        than one upstream deadline); ``not_found_ttl``: how long a PCS 404 on a miss is
        remembered (0 = not at all)."""
        self.store = store
        self.upstream = upstream
        self.mode = mode
        self.integrity = integrity
        self._flight = SingleFlight(store, fill_lock_ttl, on_flight_wait)
        self.not_found = NotFoundMemory(not_found_ttl, clock)
        self.expiry = expiry  # warns when collateral past its nextUpdate is served or cached

    # --- the one miss path

    def cached_or_fetched(self, source: Source, fill: bool | None = None) -> Entry:
        """The cached entry; on a miss fetch it when ``fill`` (default: in LAZY mode only)."""
        entry = self._served(source.key)
        return entry if entry is not None else self._missed(source, fill)

    def _served(self, key: str) -> Entry | None:
        """The cached entry under ``key``, noted as a hit (and warned about if expired)."""
        entry = self.store.get(key)
        if entry is not None:
            note_cache_outcome("hit")
            if self.expiry is not None:
                self.expiry.check(key, lambda: entry.meta, "served")
        return entry

    def _missed(self, source: Source, fill: bool | None) -> Entry:
        note_cache_outcome("miss")
        if source.retired:  # in every mode (pccs-1.27.md §1)
            raise PccsError(410, f"{source.key} is not cached; PCS API v3 is retired")
        if not (self.mode == "LAZY" if fill is None else fill):
            raise PccsError(404, f"{source.key} is not cached ({self.mode} mode)")
        if self.not_found.recalls(source.key):
            raise PccsError(404, f"{source.key}: upstream answered 404 a moment ago")
        return self._flight.run(
            source.key, lambda: self.store.get(source.key), lambda: self._fill(source)
        )

    def _fill(self, source: Source) -> Entry:
        note_cache_outcome("upstream")
        try:
            entry = fetch_entry(source)
        except PccsError as exc:
            if exc.upstream_status == 404:
                self.not_found.remember(source.key)
            raise
        self.store.put(source.key, entry)
        log.info("cached %s from upstream", escape(source.key))  # crl/ keys hold a URL
        if self.expiry is not None:
            self.expiry.check(source.key, lambda: entry.meta, "cached", fresh=True)
        return entry

    # --- sources, one per collateral kind

    def pck_crl_source(self, version: int, ca: str) -> Source:
        def to_entry(reply: UpstreamResponse) -> Entry:
            chain = require_chain(reply, PCK_CRL_CHAIN)
            self.integrity.check_crl(reply.body, chain)
            return Entry(reply.body, {PCK_CRL_CHAIN: chain}, CT_CRL, crl_meta(reply.body))

        # The same CRL whatever the client's API version: always fetched through PCS v4.
        return Source(
            self.store.pckcrl_key(ca),
            lambda: self.upstream.get_pck_crl(PCS_API_VERSION, ca),
            to_entry,
        )

    def tcb_info_source(self, tee: str, version: int, fmspc: str, update: str) -> Source:
        def to_entry(reply: UpstreamResponse) -> Entry:
            chain = require_chain(reply, TCB_INFO_CHAIN_V4, TCB_INFO_CHAIN_V3)
            info = signed_json(reply.body, "tcbInfo")
            mismatch = tcb_info_mismatch(info, fmspc, tee, version)
            if mismatch:
                raise BadUpstreamData(f"TCB info {mismatch}")
            self.integrity.check_signed_json(reply.body, "tcbInfo", chain)
            return Entry(
                reply.body, {tcb_info_chain_header(version): chain}, CT_JSON, signed_json_meta(info)
            )

        return Source(
            self.store.tcb_key(tee, version, fmspc, update),
            lambda: self.upstream.get_tcb_info(tee, version, fmspc, update),
            to_entry,
            retired=version != PCS_API_VERSION,
        )

    def enclave_identity_source(self, kind: str, version: int, update: str) -> Source:
        def to_entry(reply: UpstreamResponse) -> Entry:
            chain = require_chain(reply, ENCLAVE_IDENTITY_CHAIN)
            identity = signed_json(reply.body, "enclaveIdentity")
            if "id" in identity and identity["id"] != IDENTITY_IDS[kind]:
                raise BadUpstreamData(f"identity is {identity['id']!r}, not {IDENTITY_IDS[kind]}")
            self.integrity.check_signed_json(reply.body, "enclaveIdentity", chain)
            return Entry(
                reply.body, {ENCLAVE_IDENTITY_CHAIN: chain}, CT_JSON, signed_json_meta(identity)
            )

        return Source(
            self.store.identity_key(kind, version, update),
            lambda: self.upstream.get_enclave_identity(kind, version, update),
            to_entry,
            retired=version != PCS_API_VERSION,
        )

    def root_ca_crl_source(self) -> Source:
        def to_entry(reply: UpstreamResponse) -> Entry:
            self.integrity.check_crl(reply.body, None)
            return Entry(reply.body, {}, CT_CRL, crl_meta(reply.body))

        return Source(self.store.rootcacrl_key(), self.upstream.get_root_ca_crl, to_entry)

    def crl_source(self, uri: str) -> Source:
        """A CRL distribution point, under its one key and fetched at its one spelling; Intel's
        root CA CRL is ``rootcacrl``'s entry, fetched from the configured ``rootca_crl_url``."""
        if is_intel_root_crl_url(uri):
            return self.root_ca_crl_source()
        url = canonical_crl_url(uri) or uri  # an old entry's URI: get_crl refuses it

        def to_entry(reply: UpstreamResponse) -> Entry:
            self.integrity.check_crl_any_known_issuer(reply.body, self._known_crl_chains())
            return Entry(reply.body, {}, CT_CRL, crl_meta(reply.body))

        return Source(self.store.crl_key(uri), lambda: self.upstream.get_crl(url), to_entry)

    def _known_crl_chains(self) -> list[str]:
        """The PCK CA chains cached with the PCK CRLs: a crl?uri= download of a PCK CRL has no
        chain of its own, so it must be signed by one of these CAs (or by the root)."""
        chains = []
        for ca in ("PROCESSOR", "PLATFORM"):
            entry = self.store.get(self.store.pckcrl_key(ca))
            if entry is not None and entry.headers.get(PCK_CRL_CHAIN):
                chains.append(entry.headers[PCK_CRL_CHAIN])
        return chains

    # --- the routes' questions

    # A hit looks up the key first: its Source (a dataclass and two closures) is only built
    # for a miss.

    def pck_crl(self, version: int, ca: str, fill: bool | None = None) -> Entry:
        entry = self._served(self.store.pckcrl_key(ca))
        return entry if entry is not None else self._missed(self.pck_crl_source(version, ca), fill)

    def tcb_info(
        self, tee: str, version: int, fmspc: str, update: str, fill: bool | None = None
    ) -> Entry:
        entry = self._served(self.store.tcb_key(tee, version, fmspc, update))
        if entry is not None:
            return entry
        return self._missed(self.tcb_info_source(tee, version, fmspc, update), fill)

    def enclave_identity(
        self, kind: str, version: int, update: str, fill: bool | None = None
    ) -> Entry:
        entry = self._served(self.store.identity_key(kind, version, update))
        if entry is not None:
            return entry
        return self._missed(self.enclave_identity_source(kind, version, update), fill)

    def root_ca_crl(self, fill: bool | None = None) -> Entry:
        return self.cached_or_fetched(self.root_ca_crl_source(), fill)

    def crl(self, uri: str, fill: bool | None = None) -> Entry:
        source = self.crl_source(uri)
        entry = self.store.get(source.key)
        legacy = self.store.legacy_crl_key(uri)
        if entry is None and legacy != source.key:
            # A cache written before CRL keys were canonical holds it under the exact string.
            entry = self.store.get(legacy)
        if entry is not None:
            note_cache_outcome("hit")
            return entry
        return self.cached_or_fetched(source, fill)

    def prefetch_verification_collateral(self, update: str) -> None:
        """After a registration (LAZY and REQ): fetch what a verifier will ask for, if absent
        (pccs-reference.md §2.2). ``update`` is standard, early or all."""
        updates = {"STANDARD": ("STANDARD",), "EARLY": ("EARLY",), "ALL": ("EARLY", "STANDARD")}[
            update.upper()
        ]
        for ca in ("PROCESSOR", "PLATFORM"):
            self.pck_crl(PCS_API_VERSION, ca, fill=True)
        # Intel 1.27: the v3 identities are no longer asked for (PCS API v3 is retired).
        for kind in ("qe", "qve", "tdqe"):
            for update_type in updates:
                self.enclave_identity(kind, PCS_API_VERSION, update_type, fill=True)
        self.root_ca_crl(fill=True)
