"""Intel's collateral rows (TCB infos, enclave identities, PCK CRLs, the root CA CRL, the
``crl_cache``) as upload documents in Intel's PccsAdminTool format, a v4 one and a v3 one for
version-3 rows. TCB info BLOBs travel as ``<name>_raw`` strings so their bytes are kept
exactly; issuer chains are rebuilt from ``pcs_certificates`` (intermediate half + root half,
as Intel does)."""

from __future__ import annotations

import json
from typing import Any

from ..collateral import (
    CT_CRL,
    ENCLAVE_IDENTITY_CHAIN,
    BadUpstreamData,
    crl_meta,
    tcb_info_chain_header,
)
from ..integrity import Integrity, tcb_info_mismatch
from ..pcsurls import is_allowed_crl_url
from ..store import Entry, Store
from ..upload import PCK_CHAINS
from .migrate_rows import SOURCE, ImportSummary, RowReader, Skip, blob_of, hex_of, int_of, text_of

ROOT_CERT_ID = 1
_IDENTITY_NAMES: dict[int | None, str] = {1: "qeidentity", 2: "qveidentity", 3: "tdqeidentity"}


def empty_document(version: int) -> dict[str, Any]:
    collaterals: dict = {"pck_certs": [], "tcbinfos": [], "certificates": {PCK_CHAINS: {}}}
    if version == 4:
        collaterals = {"version": 4, **collaterals}
    return {"platforms": [], "collaterals": collaterals}


def has_collateral(doc: dict) -> bool:
    collaterals = doc["collaterals"]
    return bool(collaterals["tcbinfos"]) or any(
        name.endswith(("identity", "identity_early")) for name in collaterals
    )


class CollateralRows(RowReader):
    """The collateral part of the import: rows into upload documents."""

    def __init__(self, summary: ImportSummary, integrity: Integrity | None, store: Store):
        super().__init__(summary, integrity)
        self.store = store
        self.certs: dict[int | None, str] = {}  # by id (a NULL id is kept, never asked for)

    def read_certs(self, rows: list[dict]) -> None:
        """``pcs_certificates``: the halves every issuer chain is rebuilt from."""
        for row in rows:
            try:
                if row.get("cert"):
                    self.certs[int_of(row["id"])] = text_of(row["cert"])
            except Skip as exc:
                self.skip(f"pcs_certificates {row.get('id')}", str(exc))

    def _chain(self, intermediate_id, root_id) -> str | None:
        """Intel's issuer chain: the URL-encoded intermediate half, then the root half."""
        try:
            intermediate, root = int(intermediate_id), int(root_id)
        except (TypeError, ValueError):
            return None
        if intermediate in self.certs and root in self.certs:
            return self.certs[intermediate] + self.certs[root]
        return None

    def pck_chains(self, rows: list[dict]) -> dict[str, str]:
        chains = {}
        for row in rows:
            ca = text_of(row["ca"]).upper()
            chain = self._chain(row["intmd_cert_id"], row["root_cert_id"])
            if ca not in ("PROCESSOR", "PLATFORM"):
                self.skip(f"pck_certchain {ca}", "unknown CA")
            elif chain is None:
                self.skip(f"pck_certchain {ca}", "its issuer certificates are missing")
            else:
                chains[ca] = chain
        return chains

    def _signed_row(self, table: str, row: dict, top: str):
        """(version, update, text, inner object, chain) of a TCB info or identity row."""
        version = int_of(row.get("version"), self.summary.api_version)
        update = text_of(row.get("update_type") or "STANDARD").upper()
        if version not in (3, 4) or update not in ("STANDARD", "EARLY"):
            raise Skip(f"unsupported version {version} / update type {update}")
        chain = self._chain(row["signing_cert_id"], row["root_cert_id"])
        if chain is None:
            raise Skip("its issuer certificates are missing (Intel does not serve it either)")
        text = text_of(row[table])
        try:
            document = json.loads(text)
        except ValueError:
            raise Skip("is not JSON") from None
        inner = document.get(top) if isinstance(document, dict) else None
        if not isinstance(inner, dict) or not isinstance(document.get("signature"), str):
            raise Skip(f"is not a signed {top} document")
        return version, update, text, document, inner, chain

    def tcb_infos(self, rows: list[dict], docs: dict[int, dict]) -> None:
        items: dict[int, dict[str, dict]] = {3: {}, 4: {}}
        for row in rows:
            tee = {0: "sgx", 1: "tdx"}.get(row["type"], f"type {row['type']!r}")
            label = (
                f"fmspc_tcbs {text_of(row['fmspc'])} {tee.upper()} "
                f"v{row.get('version') or self.summary.api_version} "
                f"{text_of(row.get('update_type') or 'STANDARD')}"
            )
            try:
                if tee not in ("sgx", "tdx"):
                    raise Skip("unknown TCB info type")
                fmspc = hex_of(row["fmspc"], "fmspc", (12,)).upper()
                version, update, text, document, info, chain = self._signed_row(
                    "tcbinfo", row, "tcbInfo"
                )
                if tee == "tdx" and version == 3:
                    raise Skip("TDX TCB info is served on v4 only")
                mismatch = tcb_info_mismatch(info, fmspc, tee, version)
                if mismatch:
                    raise Skip(f"holds a TCB info that {mismatch}")
                header = tcb_info_chain_header(version)
                certificates = docs[version]["collaterals"]["certificates"]
                if certificates.setdefault(header, chain) != chain:
                    raise Skip("its issuer chain differs from the other TCB infos'")
            except Skip as exc:
                self.skip(label, str(exc))
                continue
            if not self.verified(
                label, lambda i: i.check_signed_json(text.encode("utf-8"), "tcbInfo", chain)
            ):
                continue
            name = {3: "tcbinfo", 4: f"{tee}_tcbinfo"}[version]
            name += "_early" if update == "EARLY" else ""
            item = items[version].setdefault(fmspc, {"fmspc": fmspc})
            item[name], item[f"{name}_raw"] = document, text
            self.summary.tcb_infos += 1
        for version, by_fmspc in items.items():
            docs[version]["collaterals"]["tcbinfos"] = list(by_fmspc.values())

    def identities(self, rows: list[dict], docs: dict[int, dict]) -> None:
        for row in rows:
            label = (
                f"enclave_identities id {row['id']} "
                f"v{row.get('version') or self.summary.api_version} "
                f"{text_of(row.get('update_type') or 'STANDARD')}"
            )
            try:
                name = _IDENTITY_NAMES.get(int_of(row["id"]))
                if name is None:
                    raise Skip("unknown identity id")
                version, update, text, _, _, chain = self._signed_row(
                    "identity", row, "enclaveIdentity"
                )
                if name == "tdqeidentity" and version == 3:
                    raise Skip("the TD QE identity is served on v4 only")
                certificates = docs[version]["collaterals"]["certificates"]
                if certificates.setdefault(ENCLAVE_IDENTITY_CHAIN, chain) != chain:
                    raise Skip("its issuer chain differs from the other identities'")
            except Skip as exc:
                self.skip(label, str(exc))
                continue
            if not self.verified(
                label, lambda i: i.check_signed_json(text.encode("utf-8"), "enclaveIdentity", chain)
            ):
                continue
            name += "_early" if update == "EARLY" else ""
            docs[version]["collaterals"][name] = text  # identities travel as raw text
            self.summary.identities += 1

    def pck_crls(self, rows: list[dict], pck_chains: dict[str, str], doc: dict) -> None:
        for row in rows:
            ca = text_of(row["ca"]).upper()
            label = f"pck_crl {ca}"
            chain = self._chain(row["intmd_cert_id"], row["root_cert_id"])
            der = blob_of(row["pck_crl"])
            if ca not in ("PROCESSOR", "PLATFORM") or not der:
                self.skip(label, "unknown CA or no CRL")
            elif chain is None:
                self.skip(label, "its issuer certificates are missing")
            elif pck_chains.setdefault(ca, chain) != chain:
                self.skip(label, "its issuer chain differs from pck_certchain's")
            elif self._is_crl(label, der) and self.verified(
                label, lambda i: i.check_crl(der, chain)
            ):
                name = {"PROCESSOR": "processorCrl", "PLATFORM": "platformCrl"}[ca]
                doc["collaterals"].setdefault("pckcacrl", {})[name] = der.hex()
                self.summary.pck_crls += 1

    def _is_crl(self, label: str, der: bytes) -> bool:
        try:
            crl_meta(der)
            return True
        except BadUpstreamData as exc:
            self.skip(label, str(exc))
            return False

    def root_ca_crl(self, rows: list[dict], doc: dict) -> None:
        root = next((row for row in rows if row.get("id") == ROOT_CERT_ID), None)
        der = blob_of(root.get("crl")) if root else b""
        if (
            der
            and self._is_crl("root CA CRL", der)
            and self.verified("root CA CRL", lambda i: i.check_crl(der, None))
        ):
            doc["collaterals"]["rootcacrl"] = der.hex()
            self.summary.root_ca_crl = 1

    def crl_cache(self, rows: list[dict], known_chains: list[str]) -> dict[str, Entry]:
        entries = {}
        for row in rows:
            uri = text_of(row["cdp_url"])
            label = f"crl_cache {uri}"
            der = blob_of(row["crl"])
            if not is_allowed_crl_url(uri):
                self.skip(label, "dcapd serves crl?uri= only for Intel's CRL distribution points")
            elif self._is_crl(label, der) and self.verified(
                label, lambda i: i.check_crl_any_known_issuer(der, known_chains)
            ):
                entries[self.store.crl_key(uri)] = Entry(
                    der, {}, CT_CRL, dict(crl_meta(der), source=SOURCE)
                )
        return entries

    # --- platforms, their PCK certificates and raw TCB mappings
