"""Keep collateral fresh: the collateral and certificate refreshes (pccs-reference.md §3).

All-or-nothing: everything is fetched and checked first, then written in one transaction, so
a failing upstream leaves every cached entry as it was; readers never wait (SQLite WAL). Only
one process on a cache directory refreshes at a time (a lock in the cache).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from .collateral import Collateral, Source, fetch_entry
from .errors import PccsError
from .pckcerts import PckCerts
from .store import Entry, Store, lock_owner

log = logging.getLogger("dcapd.refresh")

# Intel refreshes these identities whether or not they are cached (§3.2 step 3).
IDENTITIES = (("qe", 3), ("qve", 3), ("qe", 4), ("qve", 4), ("tdqe", 4))
LOCK_NAME = "refresh"
LOCK_TTL = 15 * 60.0


@dataclass
class RefreshReport:
    kind: str
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: bool = False  # another process had just done it


def describe(entry: Entry | None) -> str:
    """How an entry is told apart in the log: issue date and TCB evaluation number."""
    if entry is None:
        return "absent"
    meta = entry.meta
    text = meta.get("issue_date") or "?"
    if meta.get("tcb_evaluation_data_number") is not None:
        text += f" (TCB eval {meta['tcb_evaluation_data_number']})"
    return text


class Refresher:
    def __init__(
        self,
        store: Store,
        collateral: Collateral,
        pck_certs: PckCerts,
        mode: str,
        version: int,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.collateral = collateral
        self.pck_certs = pck_certs
        self.mode = mode
        self.version = version  # the API version pcs_url names (Intel: "the server's")
        self.clock = clock
        self.owner = lock_owner()

    # --- locking: one refresh per cache directory

    def _locked(self, work: Callable[[], RefreshReport], wait: float) -> RefreshReport:
        deadline = time.monotonic() + wait
        while not self.store.try_lock(LOCK_NAME, self.owner, LOCK_TTL, self.clock()):
            if time.monotonic() >= deadline:
                raise PccsError(503, "another refresh is running on this cache")
            time.sleep(0.2)
        try:
            return work()
        finally:
            self.store.unlock(LOCK_NAME, self.owner)

    def _require_refreshable(self) -> None:
        if self.mode == "OFFLINE":
            raise PccsError(503, "refresh is not possible in OFFLINE mode")

    # --- collateral refresh (§3.2)

    def refresh_collateral(
        self, wait: float = 60.0, unless_done_since: float | None = None
    ) -> RefreshReport:
        """Refresh every cached collateral entry. ``unless_done_since``: skip it when a
        collateral refresh finished at or after that time (another node of a fleet on one
        database did the scheduled refresh already: the collateral is fetched once)."""
        self._require_refreshable()

        def work() -> RefreshReport:
            if unless_done_since is not None:
                status = self.store.get_json(self.store.STATUS_KEY) or {}
                last = status.get("last_collateral_refresh")
                if isinstance(last, (int, float)) and last >= unless_done_since:
                    log.info("collateral refresh skipped: done meanwhile by another process")
                    return RefreshReport("collateral", skipped=True)
            return self._refresh_collateral()

        return self._locked(work, wait)

    def _collateral_sources(self) -> tuple[list[Source], list[Source]]:
        """(required, optional): every cached entry must refresh; identities Intel adds."""
        collateral = self.collateral
        required: list[Source] = [collateral.root_ca_crl_source()]
        for key in self.store.keys():
            what = self.store.parse_collateral_key(key)
            if what is None or what["kind"] == "rootcacrl":
                continue
            if what["kind"] == "pckcrl":
                required.append(collateral.pck_crl_source(self.version, what["ca"]))
            elif what["kind"] == "tcb":
                required.append(
                    collateral.tcb_info_source(
                        what["tee"], what["version"], what["fmspc"], what["update"]
                    )
                )
            elif what["kind"] == "crl":
                required.append(collateral.crl_source(what["uri"]))
        optional = [
            collateral.enclave_identity_source(kind, version, update)
            for kind, version in IDENTITIES
            for update in ("STANDARD", "EARLY")
        ]
        return required, optional

    def _refresh_collateral(self) -> RefreshReport:
        required, optional = self._collateral_sources()
        fresh: dict[str, Entry] = {}
        for source in required:
            fresh[source.key] = self._fetch_required(source)
        for source in optional:
            try:
                fresh[source.key] = fetch_entry(source)
            except PccsError as exc:
                if exc.status_code != 404:
                    raise
                # Intel: an identity PCS does not have is skipped, not an error.
                log.debug("refresh: %s not available upstream", source.key)
        return self._write("collateral", fresh)

    @staticmethod
    def _fetch_required(source: Source) -> Entry:
        try:
            return fetch_entry(source)
        except PccsError as exc:
            if exc.status_code == 404:  # Intel: a PCS non-200 during refresh is 503
                raise PccsError(503, exc.reason) from None
            raise

    def _write(
        self, kind: str, fresh: dict[str, Entry], extra: Callable[[], None] | None = None
    ) -> RefreshReport:
        report = RefreshReport(kind)
        now = self.clock()
        with self.store.transaction():
            for key, entry in fresh.items():
                old = self.store.get(key)
                if old is not None and old.body == entry.body and old.headers == entry.headers:
                    report.unchanged += 1
                    continue
                self.store.put(key, entry)
                report.changed.append(f"{key}: {describe(old)} -> {describe(entry)}")
            if extra is not None:
                extra()
            status = self.store.get_json(self.store.STATUS_KEY) or {}
            status[f"last_{kind}_refresh"] = now
            self.store.put_json(self.store.STATUS_KEY, status)
        for line in report.changed:
            log.info("refresh changed %s", line)
        log.info(
            "%s refresh done: %d changed, %d unchanged", kind, len(report.changed), report.unchanged
        )
        return report

    # --- certificate refresh (§3.3)

    def refresh_certs(self, fmspcs: set[str] | None = None, wait: float = 60.0) -> RefreshReport:
        self._require_refreshable()
        return self._locked(lambda: self._refresh_certs(fmspcs), wait)

    def _refresh_certs(self, fmspcs: set[str] | None) -> RefreshReport:
        plans = []
        for key in self.store.keys(self.store.platform_prefix()):
            qeid, pceid = self.store.platform_id_from_key(key)
            platform = self.store.get_json(key)
            if platform is None or (fmspcs and platform["fmspc"].upper() not in fmspcs):
                continue
            if not platform.get("platform_manifest") and not platform.get("enc_ppid"):
                log.warning(
                    "refresh: platform %s/%s has neither manifest nor encrypted PPID; "
                    "its certificates can only be uploaded",
                    qeid,
                    pceid,
                )
                continue
            fetched = self.pck_certs.fetch_cert_set(
                self.version, qeid, pceid, platform["enc_ppid"], platform["platform_manifest"]
            )
            tcb_source = self.collateral.tcb_info_source(
                "sgx", self.version, fetched.platform["fmspc"], "EARLY"
            )
            try:  # Intel: selection uses PCS's EARLY TCB info, fetched, not stored
                tcb_info = fetch_entry(tcb_source).body
            except PccsError as exc:
                if exc.status_code != 404:
                    raise
                tcb_info = fetch_entry(
                    self.collateral.tcb_info_source(
                        "sgx", self.version, fetched.platform["fmspc"], "STANDARD"
                    )
                ).body
            plans.append(
                (qeid, pceid, dict(platform, **fetched.platform), fetched.cert_set, tcb_info)
            )

        def store_all() -> None:
            for qeid, pceid, platform, cert_set, tcb_info in plans:
                self.pck_certs.store_platform(qeid, pceid, platform, cert_set, tcb_info, None)

        report = self._write("certs", {}, store_all)
        report.changed.extend(f"platform/{q}/{p}" for q, p, *_ in plans)
        return report

    # --- what is cached, and how fresh

    def status(self) -> dict:
        entries = []
        for key in self.store.keys():
            what = self.store.parse_collateral_key(key)
            if what is None:
                continue
            entry = self.store.get(key)
            if entry is None:  # deleted since keys() listed it
                continue
            meta = entry.meta
            entries.append(
                dict(
                    what,
                    key=key,
                    issue_date=meta.get("issue_date"),
                    next_update=meta.get("next_update"),
                    tcb_evaluation_data_number=meta.get("tcb_evaluation_data_number"),
                    fetched_at=meta.get("fetched_at"),
                    source=meta.get("source"),
                )
            )
        status = self.store.get_json(self.store.STATUS_KEY) or {}
        return {
            "mode": self.mode,
            "last_collateral_refresh": status.get("last_collateral_refresh"),
            "last_certs_refresh": status.get("last_certs_refresh"),
            "entries": entries,
        }
