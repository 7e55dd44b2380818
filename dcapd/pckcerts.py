"""PCK certificates: a platform's whole certificate set from PCS, then local selection.

Intel's PCCS asks PCS once for all of a platform's PCK certificates (``pckcerts``) and picks
the one matching each raw TCB with Intel's selection algorithm (pccs-reference.md §1.1, §2.1).
Each selected answer is stored as a ready response, so a repeated request is one cache lookup.

Raw TCBs come two ways. Those of a registration, an upload, a migration or a platform's first
fetch are the platform's record (``rawtcbs/QEID/PCEID``, written only by those). Those only
asked by ``GET /pckcert`` of a known platform -- anyone can make them up -- are derived data:
their answers are kept in a ring of ``selected_per_platform`` slots per platform, one small
record each, so adding one writes a constant number of bytes and the oldest answer is dropped
(it is selected again when asked). Both kinds are re-selected when the certificates change.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import jsonlimits
from .collateral import (
    CT_PEM,
    FMSPC,
    PCK_CA_TYPE,
    PCK_CERT_CHAIN,
    TCBM,
    BadUpstreamData,
    Collateral,
    SingleFlight,
    is_url_encoded_chain,
)
from .errors import PccsError
from .hexstr import is_hex
from .integrity import Integrity, IntegrityError
from .logs import note_cache_outcome
from .selection import SelectionError, select_pck_cert
from .store import Entry, Store
from .upstream import PCS_API_VERSION, Upstream, UpstreamError

log = logging.getLogger("dcapd.pckcerts")

NOT_AVAILABLE = "Not available"
_ALL_ZEROS = re.compile(r"0+")


@dataclass(frozen=True)
class FetchedPlatform:
    entry: Entry | None
    unavailable: list  # PCS entries whose cert is "Not available"


@dataclass(frozen=True)
class FetchedCertSet:
    platform: dict  # fmspc, ca, enc_ppid, platform_manifest
    cert_set: dict  # certs [{tcb, tcbm, pem}], chain
    unavailable: list


@dataclass(frozen=True)
class RawTcb:
    """What a client asks a PCK certificate for (query values, upper-case hex)."""

    qeid: str
    pceid: str
    cpusvn: str
    pcesvn: str  # 2 bytes, little-endian hex, as in the query


def pem_with_newline(pem: str) -> str:
    # Intel's client needs the PEM body to end in a newline; PCS may omit it.
    return pem if pem.endswith("\n") else pem + "\n"


class PckCerts:
    """GET /pckcert: cached answer, else local selection, else (LAZY) the platform from PCS."""

    def __init__(
        self,
        store: Store,
        upstream: Upstream,
        collateral: Collateral,
        integrity: Integrity,
        mode: str,
        fill_lock_ttl: float,
        selected_per_platform: int = 256,
        on_flight_wait: Callable[[], None] | None = None,
    ):
        """``fill_lock_ttl``: how long another process's fill lock is honoured (a platform's
        fill makes up to three upstream calls); ``selected_per_platform``: how many answers
        selected for raw TCBs only asked by GET /pckcert are kept per platform."""
        self.store = store
        self.upstream = upstream
        self.collateral = collateral
        self.integrity = integrity
        self.mode = mode
        self.selected_per_platform = selected_per_platform
        self._flight = SingleFlight(store, fill_lock_ttl, on_flight_wait)

    def pck_cert(self, version: int, raw: RawTcb, encrypted_ppid: str | None) -> Entry:
        key = self.store.pckcert_key(raw.qeid, raw.pceid, raw.cpusvn, raw.pcesvn)
        entry = self.store.get(key)
        if entry is not None:
            note_cache_outcome("hit")
            return entry
        note_cache_outcome("miss")
        entry = self._answer_for_known_platform(version, raw)
        if entry is not None:
            return entry
        if self.mode != "LAZY":
            raise PccsError(461, f"platform {raw.qeid}/{raw.pceid} is not cached ({self.mode})")
        if encrypted_ppid is None:
            raise PccsError(400, "unknown platform and no encrypted_ppid to fetch it with")
        if _ALL_ZEROS.fullmatch(encrypted_ppid):
            # Intel: QCNL sends 768 zeros when it has no PPID; PCS cannot answer that.
            raise PccsError(404, "unknown platform and an all-zero encrypted_ppid")
        # Concurrent misses for one platform share one pckcerts call; the others then
        # select locally from what it stored.
        return self._flight.run(
            self.store.platform_key(raw.qeid, raw.pceid),
            lambda: self._answer_for_known_platform(version, raw),
            lambda: self._fetch_platform(version, raw, encrypted_ppid),
        )

    def _answer_for_known_platform(self, version: int, raw: RawTcb) -> Entry | None:
        """None when the platform is not cached; else its answer, selected locally if new."""
        if self.store.get_json(self.store.platform_key(raw.qeid, raw.pceid)) is None:
            return None
        return self._select_cached(version, raw)

    # --- known platform: select locally, never contacting PCS, in every mode

    def _select_cached(self, version: int, raw: RawTcb) -> Entry:
        key = self.store.pckcert_key(raw.qeid, raw.pceid, raw.cpusvn, raw.pcesvn)
        entry = self.store.get(key)
        if entry is not None:
            return entry
        platform = self.store.get_json(self.store.platform_key(raw.qeid, raw.pceid))
        cert_set = self.store.get_json(self.store.certs_key(raw.qeid, raw.pceid))
        tcb_info = self.selection_tcb_info(platform["fmspc"], version)
        if not cert_set or not cert_set["certs"] or tcb_info is None:
            raise PccsError(
                404,
                f"platform {raw.qeid}/{raw.pceid}: no certificates or TCB info "
                "cached for selection",
            )
        entry = self.select(raw, platform, cert_set, tcb_info)
        with self.store.transaction():
            if self.store.get(key) is None:  # not selected by another process meanwhile
                self.store.put(key, entry)
                self._remember_selected(raw)
        note_cache_outcome("selected")
        return entry

    def selection_tcb_info(self, fmspc: str, version: int) -> bytes | None:
        """Intel: the EARLY SGX TCB info if cached, else STANDARD; TDX info is never used."""
        for api_version in (version, 7 - version):  # the request's version first, then 3<->4
            for update in ("EARLY", "STANDARD"):
                entry = self.store.get(self.store.tcb_key("sgx", api_version, fmspc, update))
                if entry is not None:
                    return entry.body
        return None

    def select(self, raw: RawTcb, platform: dict, cert_set: dict, tcb_info: bytes) -> Entry:
        certs = cert_set["certs"]
        try:
            index = select_pck_cert(
                raw.cpusvn, raw.pcesvn, raw.pceid, tcb_info, [c["pem"] for c in certs]
            )
        except SelectionError as exc:
            raise PccsError(
                404, f"PCK selection for {raw.qeid}/{raw.pceid}: {type(exc).__name__}: {exc}"
            ) from None
        return self.answer(platform, cert_set, certs[index])

    @staticmethod
    def answer(platform: dict, cert_set: dict, cert: dict) -> Entry:
        """The stored /pckcert response for one cert of the platform's set."""
        return Entry(
            pem_with_newline(cert["pem"]).encode(),
            {
                TCBM: cert["tcbm"],
                FMSPC: platform["fmspc"].upper(),
                PCK_CA_TYPE: platform["ca"].upper(),
                PCK_CERT_CHAIN: cert_set["chain"],
            },
            CT_PEM,
            {"selected_at": time.time()},
        )

    def remember_raw_tcb(self, raw: RawTcb) -> None:
        """Add a raw TCB to the platform's record (registration, upload, migration)."""
        key = self.store.rawtcbs_key(raw.qeid, raw.pceid)
        seen = self.store.get_json(key) or []
        if [raw.cpusvn, raw.pcesvn] not in seen:
            self.store.put_json(key, seen + [[raw.cpusvn, raw.pcesvn]])

    def raw_tcbs(self, qeid: str, pceid: str) -> list[tuple[str, str]]:
        """Every raw TCB of the platform: its record's, then those selected locally (oldest
        first). What GET /platforms lists and what a refresh of its certificates re-selects."""
        recorded = self.store.get_json(self.store.rawtcbs_key(qeid, pceid)) or []
        pairs = [(cpusvn, pcesvn) for cpusvn, pcesvn in recorded]
        for _, pair in self._selected(qeid, pceid):
            if pair not in pairs:
                pairs.append(pair)
        return pairs

    def knows_raw_tcb(self, raw: RawTcb) -> bool:
        """True when the raw TCB is mapped: in the platform's record, or answered."""
        key = self.store.pckcert_key(raw.qeid, raw.pceid, raw.cpusvn, raw.pcesvn)
        recorded = self.store.get_json(self.store.rawtcbs_key(raw.qeid, raw.pceid)) or []
        return [raw.cpusvn, raw.pcesvn] in recorded or self.store.get(key) is not None

    # --- the ring of locally selected raw TCBs (call inside a transaction)

    def _selected(self, qeid: str, pceid: str) -> list[tuple[int, tuple[str, str]]]:
        """(slot, (cpusvn, pcesvn)) of the ring, oldest first."""
        head = self.store.get_json(self.store.selected_head_key(qeid, pceid))
        if head is None:
            return []
        count, size = head["next"], head["size"]
        slots = range(count) if count <= size else [(count + i) % size for i in range(size)]
        found = []
        for slot in slots:
            pair = self.store.get_json(self.store.selected_slot_key(qeid, pceid, slot))
            if pair is not None:
                found.append((slot, (pair[0], pair[1])))
        return found

    def _remember_selected(self, raw: RawTcb) -> None:
        """Put ``raw`` in the next slot, dropping the answer of the raw TCB it held: a slot,
        the head and one deletion, whatever the number of raw TCBs asked before."""
        store, qeid, pceid = self.store, raw.qeid, raw.pceid
        head = store.get_json(store.selected_head_key(qeid, pceid)) or {
            "next": 0,
            "size": self.selected_per_platform,
        }
        if head["size"] != self.selected_per_platform:
            head = self._resize_selected(qeid, pceid, head)
        slot_key = store.selected_slot_key(qeid, pceid, head["next"] % head["size"])
        old = store.get_json(slot_key)
        if old is not None and old != [raw.cpusvn, raw.pcesvn]:
            self._forget_selected(qeid, pceid, (old[0], old[1]))
        store.put_json(slot_key, [raw.cpusvn, raw.pcesvn])
        store.put_json(
            store.selected_head_key(qeid, pceid), {"next": head["next"] + 1, "size": head["size"]}
        )

    def _forget_selected(self, qeid: str, pceid: str, pair: tuple[str, str]) -> None:
        """Drop a selected answer, unless the raw TCB is also in the platform's record."""
        if list(pair) not in (self.store.get_json(self.store.rawtcbs_key(qeid, pceid)) or []):
            self.store.delete(self.store.pckcert_key(qeid, pceid, *pair))

    def _resize_selected(self, qeid: str, pceid: str, head: dict) -> dict:
        """``selected_per_platform`` changed: keep the newest, in slots 0.. of the new size."""
        found = self._selected(qeid, pceid)
        keep = found[-self.selected_per_platform :]
        for _, pair in found[: len(found) - len(keep)]:
            self._forget_selected(qeid, pceid, pair)
        for slot in range(head["size"]):
            self.store.delete(self.store.selected_slot_key(qeid, pceid, slot))
        for slot, (_, pair) in enumerate(keep):
            self.store.put_json(self.store.selected_slot_key(qeid, pceid, slot), list(pair))
        return {"next": len(keep), "size": self.selected_per_platform}

    # --- unknown platform in LAZY mode: one pckcerts call, then selection

    def _fetch_platform(self, version: int, raw: RawTcb, encrypted_ppid: str) -> Entry:
        fetched = self.fetch_platform(version, raw.qeid, raw.pceid, encrypted_ppid, "", raw)
        assert fetched.entry is not None  # selected for raw
        return fetched.entry

    def fetch_platform(
        self,
        version: int,
        qeid: str,
        pceid: str,
        encrypted_ppid: str,
        platform_manifest: str,
        raw: RawTcb | None,
    ) -> FetchedPlatform:
        """Ask PCS for all of a platform's PCK certificates, cache them with the TCB infos of
        its FMSPC, and select for ``raw``.

        Shared by GET /pckcert (LAZY) and registration (LAZY, REQ); pccs-reference.md §2.1.
        Whatever the client's API version, PCS is asked through v4 (the certificates are the
        same; Intel's PCCS always used its configured v4 URL) and the TCB infos are cached as
        v4 entries (pccs-1.27.md §1).
        """
        note_cache_outcome("upstream")
        fetched = self.fetch_cert_set(version, qeid, pceid, encrypted_ppid, platform_manifest)
        tcb_info = self._fetch_tcb_infos(PCS_API_VERSION, fetched.platform["fmspc"])
        # Intel: in LAZY mode, when PCS held "Not available" entries, the raw TCB's answer is
        # not kept (the next request selects again); REQ always keeps it.
        keep = not fetched.unavailable or self.mode == "REQ"
        entry = self.store_platform(
            qeid, pceid, fetched.platform, fetched.cert_set, tcb_info, raw, remember_requested=keep
        )
        log.info(
            "cached platform %s/%s: %d PCK certificates (%d not available), FMSPC %s",
            qeid,
            pceid,
            len(fetched.cert_set["certs"]),
            len(fetched.unavailable),
            fetched.platform["fmspc"],
        )
        return FetchedPlatform(entry, fetched.unavailable)

    def fetch_cert_set(
        self, version: int, qeid: str, pceid: str, encrypted_ppid: str, platform_manifest: str
    ) -> FetchedCertSet:
        """One PCS ``pckcerts`` call (POST with the manifest if there is one, else GET with
        the encrypted PPID), checked: nothing is stored here. Always through PCS v4, whatever
        ``version`` the client asked with."""
        try:
            if platform_manifest:
                reply = self.upstream.post_pck_certs(PCS_API_VERSION, platform_manifest, pceid)
            else:
                reply = self.upstream.get_pck_certs(PCS_API_VERSION, encrypted_ppid, pceid)
        except UpstreamError as exc:
            raise PccsError(502, f"pckcerts: {exc}") from None
        if reply.status != 200:
            raise PccsError(404, f"pckcerts for {qeid}/{pceid}: upstream answered {reply.status}")
        try:
            certs, unavailable = parse_pck_certs(reply.body)
            fmspc = _header(reply.headers, FMSPC).upper()
            ca = _header(reply.headers, PCK_CA_TYPE).upper()
            chain = _header(reply.headers, PCK_CERT_CHAIN)
            if not is_url_encoded_chain(chain):
                raise BadUpstreamData(f"{PCK_CERT_CHAIN} header is not a URL-encoded PEM chain")
            if not re.fullmatch(r"[0-9A-F]{12}", fmspc) or ca not in ("PROCESSOR", "PLATFORM"):
                raise BadUpstreamData(f"bad {FMSPC} or {PCK_CA_TYPE} header")
            for cert in certs:
                self.integrity.check_pck_cert(cert["pem"], chain)
        except (BadUpstreamData, IntegrityError) as exc:
            raise PccsError(502, f"pckcerts: upstream sent bad data: {exc}") from None
        if not certs:
            raise PccsError(404, f"pckcerts for {qeid}/{pceid}: no certificate available")
        platform = {
            "fmspc": fmspc,
            "ca": ca,
            "enc_ppid": encrypted_ppid.lower(),
            "platform_manifest": platform_manifest.lower(),
        }
        return FetchedCertSet(platform, {"certs": certs, "chain": chain}, unavailable)

    def _fetch_tcb_infos(self, version: int, fmspc: str) -> bytes:
        """The SGX (and on v4 the TDX) TCB infos of the platform's FMSPC, cached as collateral.

        Returns the SGX TCB info used for selection (EARLY if PCS has it, else STANDARD).
        """
        tcb_info = self.collateral.tcb_info
        early = self._optional(lambda: tcb_info("sgx", version, fmspc, "EARLY", fill=True))
        standard = tcb_info("sgx", version, fmspc, "STANDARD", fill=True)
        if version >= 4:
            for update in ("EARLY", "STANDARD"):
                self._optional(lambda: tcb_info("tdx", version, fmspc, update, fill=True))
        return (early or standard).body

    @staticmethod
    def _optional(fetch) -> Entry | None:
        try:
            return fetch()
        except PccsError as exc:
            if exc.status_code != 404:
                raise
            return None

    def store_platform(
        self,
        qeid: str,
        pceid: str,
        platform: dict,
        cert_set: dict,
        tcb_info: bytes,
        raw: RawTcb | None,
        remember_requested: bool = True,
        extra_raw_tcbs: Sequence[RawTcb] = (),
    ) -> Entry | None:
        """Write the platform, its certs, and re-selected answers for every raw TCB seen
        before (and ``extra_raw_tcbs``), in one transaction: a failure leaves the cache as it
        was. Returns the answer for ``raw``.

        A raw TCB of the platform's record that no longer selects fails it all (Intel); one
        that was only selected locally is dropped instead (anyone can make those up)."""
        requested = self.select(raw, platform, cert_set, tcb_info) if raw else None
        record_key = self.store.rawtcbs_key(qeid, pceid)
        recorded = [(c, p) for c, p in self.store.get_json(record_key) or []]
        record = list(recorded)
        for extra in extra_raw_tcbs:
            if (extra.cpusvn, extra.pcesvn) not in record:
                record.append((extra.cpusvn, extra.pcesvn))
        if raw is not None and remember_requested and (raw.cpusvn, raw.pcesvn) not in record:
            record.append((raw.cpusvn, raw.pcesvn))
        reselected = [
            (pair, self.select(RawTcb(qeid, pceid, *pair), platform, cert_set, tcb_info))
            for pair in record
            if raw is None or pair != (raw.cpusvn, raw.pcesvn)
        ]
        dropped = []
        for slot, pair in self._selected(qeid, pceid):
            if pair in record or (raw is not None and pair == (raw.cpusvn, raw.pcesvn)):
                continue
            try:
                entry = self.select(RawTcb(qeid, pceid, *pair), platform, cert_set, tcb_info)
            except PccsError as exc:
                log.info("dropping the answer selected for %s/%s %s: %s", qeid, pceid, pair, exc)
                dropped.append((slot, pair))
                continue
            reselected.append((pair, entry))
        with self.store.transaction():
            self.store.put_json(self.store.platform_key(qeid, pceid), platform)
            self.store.put_json(self.store.certs_key(qeid, pceid), cert_set)
            for pair, entry in reselected:
                self.store.put(self.store.pckcert_key(qeid, pceid, *pair), entry)
            for slot, pair in dropped:
                self.store.delete(self.store.pckcert_key(qeid, pceid, *pair))
                self.store.delete(self.store.selected_slot_key(qeid, pceid, slot))
            if raw is not None and remember_requested:
                assert requested is not None  # selected for raw above
                self.store.put(
                    self.store.pckcert_key(qeid, pceid, raw.cpusvn, raw.pcesvn), requested
                )
            if record != recorded:
                self.store.put_json(record_key, [list(pair) for pair in record])
        return requested


def _header(headers, name: str) -> str:
    value = headers.get(name)
    if not value:
        raise BadUpstreamData(f"response has no {name} header")
    return value


def parse_pck_certs(body: bytes) -> tuple[list[dict], list[dict]]:
    """PCS ``pckcerts`` JSON -> ([{tcb, tcbm, pem}], the "Not available" entries)."""
    try:
        entries = jsonlimits.loads(body)
    except ValueError:  # JsonTooDeep included
        raise BadUpstreamData("pckcerts body is not JSON") from None
    if not isinstance(entries, list):
        raise BadUpstreamData("pckcerts body is not a JSON array")
    certs, unavailable = [], []
    for item in entries:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("cert"), str)
            or not isinstance(item.get("tcbm"), str)
            or not is_hex(item["tcbm"], (36,))
        ):
            raise BadUpstreamData("pckcerts entry without tcb/tcbm/cert")
        if item["cert"] == NOT_AVAILABLE:
            unavailable.append(item)
            continue
        # Intel: SGX-TCBm is replayed exactly as PCS supplied it for the chosen cert.
        certs.append(
            {
                "tcb": item.get("tcb"),
                "tcbm": item["tcbm"],
                "pem": urllib.parse.unquote(item["cert"]),
            }
        )
    return certs, unavailable
