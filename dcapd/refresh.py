"""Keep collateral fresh: the collateral and certificate refreshes (pccs-reference.md §3).

Everything is fetched and checked first, then what succeeded is written in one transaction;
readers never wait (SQLite WAL). An entry (or a platform's certificates) that fails is skipped
and left exactly as it was: one CRL distribution point that no longer downloads must not keep
everything else stale (Intel's refresh is all-or-nothing). The run then ends with the failure
(:class:`RefreshIncomplete`, naming what was skipped); when nothing at all could be fetched,
nothing is written. Only one process on a cache directory refreshes at a time (a lock).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from .collateral import Collateral, Source, fetch_entry
from .errors import PccsError
from .extra import ExtraCollateral
from .pckcerts import PckCerts
from .store import Entry, Store, lock_owner
from .upstream import PCS_API_VERSION

log = logging.getLogger("dcapd.refresh")

# Intel refreshes these identities whether or not they are cached (§3.2 step 3); since 1.27
# no longer the v3 ones (PCS API v3 is retired: pccs-1.27.md §1).
IDENTITIES = (("qe", 4), ("qve", 4), ("tdqe", 4))
LOCK_NAME = "refresh"
LOCK_TTL = 15 * 60.0


@dataclass
class RefreshReport:
    kind: str
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    # Entries skipped because they failed: (key, the error), left as they were in the cache.
    failed: list[tuple[str, PccsError]] = field(default_factory=list)
    skipped: bool = False  # another process had just done it


class RefreshIncomplete(PccsError):
    """Some entries failed and were skipped; everything else was refreshed (``report``)."""

    def __init__(self, report: RefreshReport):
        key, first = report.failed[0]
        super().__init__(
            first.status_code or 502,
            f"{report.kind} refresh: {len(report.failed)} skipped ("
            + "; ".join(e.reason or k for k, e in report.failed[:5])
            + ("; ..." if len(report.failed) > 5 else "")
            + f"), {len(report.changed)} changed, {report.unchanged} unchanged",
        )
        self.report = report


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
        extra: ExtraCollateral | None = None,
    ):
        self.store = store
        self.collateral = collateral
        self.extra = extra or ExtraCollateral(collateral)
        self.pck_certs = pck_certs
        self.mode = mode
        # Intel: "the server's" API version; PCS has only v4 now, whatever pcs_url names.
        self.version = PCS_API_VERSION
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

    def _collateral_sources(
        self,
    ) -> tuple[list[Source], list[Source], list[Source], dict[str, list[str]]]:
        """(required, optional, kept, superseded): every cached entry must refresh; identities
        Intel adds; collateral beyond Intel's PCCS, kept as cached when PCS no longer has it;
        and the old keys of CRLs cached under another spelling of their distribution point
        (before keys were canonical), which the refreshed entry replaces."""
        collateral = self.collateral
        required: list[Source] = [collateral.root_ca_crl_source()]
        kept: list[Source] = []
        superseded: dict[str, list[str]] = {}
        retired = 0
        for key in self.store.keys():
            what = self.store.parse_key(key).collateral()
            if what is None or what["kind"] == "rootcacrl":
                continue
            if what["kind"] in ("tcb", "identity") and what["version"] != PCS_API_VERSION:
                retired += 1  # PCS API v3 collateral: served as cached, never refreshed
            elif what["kind"] == "pckcrl":
                required.append(collateral.pck_crl_source(self.version, what["ca"]))
            elif what["kind"] == "tcb":
                required.append(
                    collateral.tcb_info_source(
                        what["tee"], what["version"], what["fmspc"], what["update"]
                    )
                )
            elif what["kind"] == "crl":
                source = collateral.crl_source(what["uri"])
                if source.key != key:
                    superseded.setdefault(source.key, []).append(key)
                required.append(source)
            elif what["kind"] == "extra":
                kept.append(self.extra.source_for(what))
        if retired:
            log.warning(
                "refresh: %d cached PCS API v3 TCB infos and identities skipped (PCS API v3 "
                "is retired: they are served as cached and never refreshed)",
                retired,
            )
        optional = [
            collateral.enclave_identity_source(kind, version, update)
            for kind, version in IDENTITIES
            for update in ("STANDARD", "EARLY")
        ]
        unique = list({source.key: source for source in required}.values())
        return unique, optional, kept, superseded

    def _refresh_collateral(self) -> RefreshReport:
        required, optional, kept, superseded = self._collateral_sources()
        fresh: dict[str, Entry] = {}
        failed: list[tuple[str, PccsError]] = []
        for source in required:
            try:
                fresh[source.key] = self._fetch_required(source)
            except PccsError as exc:
                failed.append((source.key, exc))
        for source in optional:
            try:
                fresh[source.key] = fetch_entry(source)
            except PccsError as exc:
                if exc.status_code != 404:
                    failed.append((source.key, exc))
                    continue
                # Intel: an identity PCS does not have is skipped, not an error.
                log.debug("refresh: %s not available upstream", source.key)
        for source in kept:
            try:
                fresh[source.key] = fetch_entry(source)
            except PccsError as exc:
                if exc.status_code not in (404, 410):
                    failed.append((source.key, exc))
                    continue
                # e.g. PCS retired that evaluation data number: the signed entry stays.
                log.info("refresh: %s no longer served upstream; kept as cached", source.key)

        def drop_superseded() -> None:
            for key in fresh:
                for old in superseded.get(key, []):
                    self.store.delete(old)

        return self._finish("collateral", fresh, failed, drop_superseded)

    def _finish(
        self,
        kind: str,
        fresh: dict[str, Entry],
        failed: list[tuple[str, PccsError]],
        extra: Callable[[], None] | None,
        done: int = 0,
    ) -> RefreshReport:
        """Write what succeeded; raise when anything failed (nothing written when nothing
        succeeded: an unreachable PCS leaves the cache, and the refresh status, as they were)."""
        for key, exc in failed:
            log.warning("%s refresh: skipped %s (%s)", kind, key, exc.reason or exc.title)
        if failed and not fresh and not done:
            raise failed[0][1]
        report = self._write(kind, fresh, extra, failed)
        if failed:
            raise RefreshIncomplete(report)
        return report

    @staticmethod
    def _fetch_required(source: Source) -> Entry:
        try:
            return fetch_entry(source)
        except PccsError as exc:
            if exc.status_code == 404:  # Intel: a PCS non-200 during refresh is 503
                raise PccsError(503, exc.reason) from None
            raise

    def _write(
        self,
        kind: str,
        fresh: dict[str, Entry],
        extra: Callable[[], None] | None = None,
        failed: list[tuple[str, PccsError]] | None = None,
    ) -> RefreshReport:
        # The same list: failures found while writing (``extra``) are reported too.
        report = RefreshReport(kind, failed=failed if failed is not None else [])
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
            status[f"last_{kind}_refresh_skipped"] = [key for key, _ in report.failed]
            self.store.put_json(self.store.STATUS_KEY, status)
        for line in report.changed:
            log.info("refresh changed %s", line)
        log.info(
            "%s refresh done: %d changed, %d unchanged, %d skipped",
            kind,
            len(report.changed),
            report.unchanged,
            len(report.failed),
        )
        return report

    # --- certificate refresh (§3.3)

    def refresh_certs(self, fmspcs: set[str] | None = None, wait: float = 60.0) -> RefreshReport:
        self._require_refreshable()
        return self._locked(lambda: self._refresh_certs(fmspcs), wait)

    def _refresh_certs(self, fmspcs: set[str] | None) -> RefreshReport:
        plans = []
        failed: list[tuple[str, PccsError]] = []
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
            try:
                fetched = self.pck_certs.fetch_cert_set(
                    self.version, qeid, pceid, platform["enc_ppid"], platform["platform_manifest"]
                )
                tcb_info = self._selection_tcb_info(fetched.platform["fmspc"])
            except PccsError as exc:
                failed.append((key, exc))
                continue
            plans.append(
                (qeid, pceid, dict(platform, **fetched.platform), fetched.cert_set, tcb_info)
            )
        if failed and not plans:
            raise failed[0][1]
        stored = []

        def store_all() -> None:
            for qeid, pceid, platform, cert_set, tcb_info in plans:
                try:  # selects first, then writes: a failure writes nothing of the platform
                    self.pck_certs.store_platform(qeid, pceid, platform, cert_set, tcb_info, None)
                except PccsError as exc:
                    failed.append((self.store.platform_key(qeid, pceid), exc))
                    continue
                stored.append(self.store.platform_key(qeid, pceid))

        report = self._write("certs", {}, store_all, failed)
        report.changed.extend(stored)
        if report.failed:
            for key, error in report.failed:
                log.warning("certs refresh: skipped %s (%s)", key, error.reason or error.title)
            raise RefreshIncomplete(report)
        return report

    def _selection_tcb_info(self, fmspc: str) -> bytes:
        """Intel: selection uses PCS's EARLY TCB info (else STANDARD), fetched, not stored."""
        try:
            return fetch_entry(
                self.collateral.tcb_info_source("sgx", self.version, fmspc, "EARLY")
            ).body
        except PccsError as exc:
            if exc.status_code != 404:
                raise
        return fetch_entry(
            self.collateral.tcb_info_source("sgx", self.version, fmspc, "STANDARD")
        ).body

    # --- what is cached, and how fresh

    def status(self) -> dict:
        entries = []
        for key in self.store.keys():
            what = self.store.parse_key(key).collateral()
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
            "last_collateral_refresh_skipped": status.get("last_collateral_refresh_skipped", []),
            "last_certs_refresh_skipped": status.get("last_certs_refresh_skipped", []),
            "entries": entries,
        }
