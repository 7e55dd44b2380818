"""Intel's platforms, their PCK certificates and raw TCB mappings: into the upload document
where dcapd's selection answers a raw TCB as Intel did, else pinned (the raw TCB keeps the
certificate Intel mapped it to: its TCB info changed since)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..collateral import TCBM
from ..errors import PccsError
from ..integrity import Integrity
from ..pckcerts import PckCerts, RawTcb
from ..selection import SelectionError, parse_pck_cert
from ..store import Store
from ..upload import PCK_CHAINS, upload_certs
from .migrate_rows import SOURCE, ImportSummary, RowReader, Skip, hex_of, hex_of_blob, text_of

log = logging.getLogger("dcapd.migrate")


@dataclass
class _Platform:
    qe_id: str
    pce_id: str
    enc_ppid: str
    platform_manifest: str
    fmspc: str
    ca: str
    certs: list[dict]  # {"tcb", "tcbm", "pem"} as CollateralUpload stores them
    raw_tcbs: list[tuple[str, str, str]]  # (cpu_svn, pce_svn, Intel's tcbm)


class PlatformRows(RowReader):
    """The platform part of the import."""

    def __init__(
        self,
        summary: ImportSummary,
        integrity: Integrity | None,
        store: Store,
        pck_certs: PckCerts,
    ):
        super().__init__(summary, integrity)
        self.store = store
        self.pck_certs = pck_certs

    def platforms(
        self, tables: dict[str, list[dict]], pck_chains: dict[str, str]
    ) -> list[_Platform]:
        certs_of: dict[tuple[str, str], list[dict]] = {}
        for row in tables["pck_cert"]:
            key = (text_of(row["qe_id"]).upper(), text_of(row["pce_id"]).upper())
            certs_of.setdefault(key, []).append(row)
        raws_of: dict[tuple[str, str], list[dict]] = {}
        for row in tables["platform_tcbs"]:
            key = (text_of(row["qe_id"]).upper(), text_of(row["pce_id"]).upper())
            raws_of.setdefault(key, []).append(row)

        platforms = []
        for row in tables["platforms"]:
            label = f"platform {text_of(row['qe_id'])}/{text_of(row['pce_id'])}"
            try:
                qe_id = hex_of(row["qe_id"], "qe_id", max_length=260).upper()
                pce_id = hex_of(row["pce_id"], "pce_id", (4,)).upper()
                enc_ppid = hex_of_blob(row["enc_ppid"])
                if len(enc_ppid) not in (0, 768):
                    raise Skip(f"has an encrypted PPID of {len(enc_ppid) // 2} bytes")
                manifest = hex_of_blob(row["platform_manifest"])
            except Skip as exc:
                self.skip(label, str(exc))
                continue
            certs, fmspc, ca = self._certs(label, certs_of.get((qe_id, pce_id), []), pck_chains)
            if not certs:
                self.skip(label, "no usable PCK certificate (dcapd will fetch it in LAZY mode)")
                continue
            raw_tcbs = []
            for raw in raws_of.get((qe_id, pce_id), []):
                try:
                    raw_tcbs.append(
                        (
                            hex_of(raw["cpu_svn"], "cpu_svn", (32,)).upper(),
                            hex_of(raw["pce_svn"], "pce_svn", (4,)).upper(),
                            text_of(raw["tcbm"]).upper(),
                        )
                    )
                except Skip as exc:
                    self.skip(f"platform_tcbs {qe_id}/{pce_id}", str(exc))
            platforms.append(
                _Platform(qe_id, pce_id, enc_ppid, manifest, fmspc, ca, certs, raw_tcbs)
            )
        return platforms

    def _certs(self, label: str, rows: list[dict], pck_chains: dict[str, str]):
        """The platform's usable certificates (same CA and FMSPC as the first), its FMSPC, CA."""
        certs: list[dict] = []
        fmspc: str | None = None
        ca: str | None = None
        for row in rows:
            what = f"{label} PCK certificate {text_of(row['tcbm'])}"
            try:
                tcbm = hex_of(row["tcbm"], "tcbm", (36,)).upper()
                pem = text_of(row["pck_cert"])
                info = parse_pck_cert(pem)
            except Skip as exc:
                self.skip(what, str(exc))
                continue
            except SelectionError as exc:
                self.skip(what, f"not a PCK certificate: {exc}")
                continue
            if (fmspc, ca) != (None, None) and (info.fmspc_hex, info.ca_type) != (fmspc, ca):
                self.skip(what, "its FMSPC or CA differs from the platform's other certificates")
                continue
            chain = pck_chains.get(info.ca_type)
            if chain is None:
                self.skip(what, f"no {info.ca_type} issuer chain in pcs_certificates")
                continue
            if not self.verified(what, lambda i: i.check_pck_cert(pem, chain)):
                continue
            fmspc, ca = info.fmspc_hex, info.ca_type
            tcb = {
                f"sgxtcbcomp{i:02d}svn": svn for i, svn in enumerate(info.tcb_components, start=1)
            }
            tcb["pcesvn"] = info.pcesvn
            certs.append({"tcb": tcb, "tcbm": tcbm, "pem": pem})
        return certs, fmspc, ca

    def _selection_tcb_info(self, fmspc: str, doc: dict, version: int) -> bytes | None:
        """The SGX TCB info CollateralUpload will select with: this document's (EARLY
        preferred), else the cached one (the other version's document is applied already)."""
        prefix = "sgx_tcbinfo" if version == 4 else "tcbinfo"
        for item in doc["collaterals"]["tcbinfos"]:
            if item["fmspc"] == fmspc:
                raw = item.get(f"{prefix}_early_raw") or item.get(f"{prefix}_raw")
                if raw is not None:
                    return raw.encode("utf-8")
        return self.pck_certs.selection_tcb_info(fmspc, version)

    def add_platforms(self, platforms: list[_Platform], doc: dict, version: int) -> list:
        """Put the platforms into ``doc`` (raw TCBs that dcapd's selection answers as Intel
        did go into ``platforms[]``) and return the (platform, raw TCB, cert) pins for the rest.
        Runs inside the import's transaction, after the other version's document."""
        pins = []
        chains = doc["collaterals"]["certificates"][PCK_CHAINS]
        for platform in platforms:
            label = f"platform {platform.qe_id}/{platform.pce_id}"
            tcb_info = self._selection_tcb_info(platform.fmspc, doc, version)
            if tcb_info is None:
                self.skip(
                    label,
                    f"no SGX TCB info for FMSPC {platform.fmspc} to select its certificates with",
                )
                continue
            record = {
                "fmspc": platform.fmspc,
                "ca": platform.ca,
                "enc_ppid": platform.enc_ppid,
                "platform_manifest": platform.platform_manifest,
            }
            cert_set = {"certs": platform.certs, "chain": chains[platform.ca]}
            by_tcbm = {cert["tcbm"]: cert for cert in platform.certs}
            selectable, pinned = [], []
            for cpu_svn, pce_svn, tcbm in platform.raw_tcbs:
                raw = RawTcb(platform.qe_id, platform.pce_id, cpu_svn, pce_svn)
                try:
                    selected = self.pck_certs.select(raw, record, cert_set, tcb_info)
                    selected_tcbm = selected.headers[TCBM].upper()
                except PccsError:
                    selected_tcbm = None
                if selected_tcbm is not None and (selected_tcbm == tcbm or tcbm not in by_tcbm):
                    selectable.append(raw)
                elif tcbm in by_tcbm:
                    pinned.append(raw)
                    pins.append((platform, raw, by_tcbm[tcbm], cert_set["chain"]))
                else:  # Intel's mapping points nowhere and selection fails: Intel 404s too
                    log.info(
                        "%s: raw TCB %s/%s not mapped (no certificate for it)",
                        label,
                        cpu_svn,
                        pce_svn,
                    )
            if pinned:
                # A pinned raw TCB must not be re-selected by the upload (it may fail there).
                key = self.store.rawtcbs_key(platform.qe_id, platform.pce_id)
                cached = self.store.get_json(key)
                if cached:
                    pinned_pairs = [[raw.cpusvn, raw.pcesvn] for raw in pinned]
                    self.store.put_json(key, [pair for pair in cached if pair not in pinned_pairs])
            entry = {
                "qe_id": platform.qe_id,
                "pce_id": platform.pce_id,
                "enc_ppid": platform.enc_ppid,
                "platform_manifest": platform.platform_manifest,
            }
            doc["platforms"] += [
                dict(entry, cpu_svn=raw.cpusvn, pce_svn=raw.pcesvn) for raw in selectable
            ]
            doc["collaterals"]["pck_certs"].append(dict(entry, certs=upload_certs(platform.certs)))
            self.summary.platforms += 1
            self.summary.pck_certs += len(platform.certs)
            self.summary.raw_tcbs += len(selectable) + len(pinned)
            self.summary.raw_tcbs_kept_as_mapped += len(pinned)
        return pins

    def write_pins(self, pins: list) -> None:
        """Intel's answer for a raw TCB, as PckCerts would have stored it had it selected it."""
        for platform, raw, cert, chain in pins:
            entry = self.pck_certs.answer(
                {"fmspc": platform.fmspc, "ca": platform.ca}, {"chain": chain}, cert
            )
            entry.meta["source"] = SOURCE
            self.store.put(
                self.store.pckcert_key(raw.qeid, raw.pceid, raw.cpusvn, raw.pcesvn), entry
            )
            self.pck_certs.remember_raw_tcb(raw)

    # --- appraisal policies and the registration queue
