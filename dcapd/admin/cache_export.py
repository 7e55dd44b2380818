"""``export``: a dcapd cache directory as an upload file, in Intel's format where it can hold
the entries, in dcapd's extension keys where it cannot, so that ``import`` restores it
exactly."""

from __future__ import annotations

import base64
import urllib.parse
from dataclasses import dataclass, field

from ..collateral import (
    ENCLAVE_IDENTITY_CHAIN,
    PCK_CERT_CHAIN,
    PCK_CRL_CHAIN,
    TCB_INFO_CHAIN_V3,
    TCB_INFO_CHAIN_V4,
    tcb_info_chain_header,
)
from ..extra import extra_collateral_items
from ..store import Entry, Store
from ..upload import chain_halves, upload_certs
from .cache_import import RAW_KINDS
from .common import AdminError
from .upload_file import IDENTITY_KINDS, tcb_info_fields

# Entries export never exports (process state); every kind not here or in RAW_KINDS is
# collateral or a platform.
SKIPPED_KINDS = ("pckcert", "certs", "rawtcbs", "lock", "status")


@dataclass(eq=False)
class _Part:
    """One upload body of an export: a version and one chain per slot, all with one root."""

    version: int
    slots: dict = field(default_factory=dict)
    root: str | None = None
    tcbinfos: dict = field(default_factory=dict)
    identities: dict = field(default_factory=dict)
    pckcacrl: dict = field(default_factory=dict)
    pck_certs: list = field(default_factory=list)
    platforms: list = field(default_factory=list)
    rootcacrl: tuple[str, str] | None = None

    def accepts(self, version: int, slot, chain: str, root: str) -> bool:
        return (
            version == self.version
            and self.slots.get(slot, chain) == chain
            and self.root in (None, root)
        )

    def body(self) -> dict:
        collaterals: dict = {
            "version": self.version,
            "pck_certs": self.pck_certs,
            "tcbinfos": [
                dict(fmspc=fmspc.lower(), **docs) for fmspc, docs in self.tcbinfos.items()
            ],
        }
        if self.pckcacrl:
            collaterals["pckcacrl"] = self.pckcacrl
        for kind in IDENTITY_KINDS:
            for suffix in ("", "_early"):
                if f"{kind}identity{suffix}" in self.identities:
                    collaterals[f"{kind}identity{suffix}"] = self.identities[
                        f"{kind}identity{suffix}"
                    ]
        tcb_name = tcb_info_chain_header(self.version)
        certificates: dict = {
            PCK_CERT_CHAIN: {
                ca: self.slots[("pck", ca)]
                for ca in ("PLATFORM", "PROCESSOR")
                if ("pck", ca) in self.slots
            }
        }
        if ("tcb",) in self.slots:
            certificates[tcb_name] = self.slots[("tcb",)]
        if ("identity",) in self.slots:
            certificates[ENCLAVE_IDENTITY_CHAIN] = self.slots[("identity",)]
        collaterals["certificates"] = certificates
        if self.rootcacrl:
            cdp, hex_der = self.rootcacrl
            if cdp:
                collaterals["rootcacrl_cdp"] = cdp
            collaterals["rootcacrl"] = hex_der
        return {"platforms": self.platforms, "collaterals": collaterals}


class Exporter:
    """A cache directory as upload bodies: the first (v4) one in Intel's format, further ones
    only where one body cannot hold everything (another API version, another issuer chain
    for the same slot, another root: the server checks one root per upload)."""

    def __init__(self, store: Store, preferred_cdp: str):
        self.store = store
        self.preferred_cdp = preferred_cdp
        self.parts = [_Part(4)]
        self.tcb_parts: dict[str, int] = {}  # FMSPC -> last part holding its SGX TCB info
        self.warnings: list[str] = []

    def place(self, version: int, needs: dict, min_index: int = 0) -> _Part:
        roots = set()
        for slot, chain in needs.items():
            try:
                roots.add(urllib.parse.unquote(chain_halves(chain)[1]))
            except ValueError as exc:
                raise AdminError(f"cache entry with a bad {slot[0]} chain: {exc}") from None
        root = roots.pop() if len(roots) == 1 else None
        for index, part in enumerate(self.parts):
            if (
                index >= min_index
                and root is not None
                and all(part.accepts(version, slot, chain, root) for slot, chain in needs.items())
            ):
                break
        else:
            part = _Part(version)
            self.parts.append(part)
        part.slots.update(needs)
        part.root = part.root or root
        return part

    def _entry(self, key: str) -> Entry:
        """The entry of a key ``keys()`` listed (a cache being exported is not written)."""
        entry = self.store.get(key)
        if entry is None:
            raise AdminError(f"{key}: removed from the cache during the export")
        return entry

    def _chain(self, key: str, entry: Entry, *names: str) -> str | None:
        chain = next((entry.headers[n] for n in names if entry.headers.get(n)), None)
        try:
            if chain is None:
                raise ValueError("no issuer chain")
            chain_halves(chain)
        except ValueError:
            self.warnings.append(f"{key}: not exported (no usable issuer chain)")
            return None
        return chain

    def run(self) -> dict:
        store = self.store
        by_kind: dict[str, list] = {}
        for key in store.keys():
            parsed = store.parse_key(key)
            if parsed.well_formed:
                by_kind.setdefault(parsed.kind, []).append((key, parsed.fields))
            else:
                self.warnings.append(f"{key}: not exported (unknown key form)")
        for key, fields in by_kind.pop("pckcrl", []):
            entry = self._entry(key)
            name = {("PROCESSOR",): "processorCrl", ("PLATFORM",): "platformCrl"}.get(fields)
            chain = self._chain(key, entry, PCK_CRL_CHAIN)
            if name and chain:
                self.place(4, {("pck", fields[0]): chain}).pckcacrl[name] = entry.body.hex()
        for key, (kind, version, update) in by_kind.pop("identity", []):
            version = int(version)
            if kind not in IDENTITY_KINDS or (kind == "tdqe" and version != 4):
                self.warnings.append(f"{key}: not exported (no such identity in the format)")
                continue
            entry = self._entry(key)
            chain = self._chain(key, entry, ENCLAVE_IDENTITY_CHAIN)
            if chain:
                suffix = "_early" if update == "EARLY" else ""
                self.place(version, {("identity",): chain}).identities[
                    f"{kind}identity{suffix}"
                ] = entry.body.decode("utf-8")
        for key, (tee, version, fmspc, update) in by_kind.pop("tcb", []):
            version = int(version)
            if tee == "tdx" and version != 4:
                self.warnings.append(f"{key}: not exported (TDX TCB info under v{version})")
                continue
            entry = self._entry(key)
            chain = self._chain(key, entry, TCB_INFO_CHAIN_V4, TCB_INFO_CHAIN_V3)
            if not chain:
                continue
            part = self.place(version, {("tcb",): chain})
            suffix = "_early" if update == "EARLY" else ""
            name = f"{tee}_tcbinfo{suffix}" if version == 4 else f"tcbinfo{suffix}"
            part.tcbinfos.setdefault(fmspc.upper(), {}).update(tcb_info_fields(name, entry.body))
            if tee == "sgx":
                self.tcb_parts[fmspc.upper()] = max(
                    self.tcb_parts.get(fmspc.upper(), 0), self.parts.index(part)
                )
        self._platforms([key for key, _ in by_kind.pop("platform", [])])
        self._crls(by_kind.pop("rootcacrl", []), by_kind.pop("crl", []))
        body = self.parts[0].body()
        extra = [part.body() for part in self.parts[1:]]
        if extra:
            body["dcapd_extra_uploads"] = extra
        raw = []
        for kind in RAW_KINDS:
            for key, _ in by_kind.pop(kind, []):
                entry = self._entry(key)
                raw.append(
                    {
                        "key": key,
                        "body": base64.b64encode(entry.body).decode(),
                        "headers": entry.headers,
                        "content_type": entry.content_type,
                        "meta": entry.meta,
                    }
                )
        if self.crls:
            body["dcapd_crls"] = self.crls
        if raw:
            body["dcapd_entries"] = raw
        # Collateral beyond Intel's format (pinned TCB infos and identities, QAE identity,
        # evaluation-number lists) travels in dcapd's own key; import and PUT restore it.
        by_kind.pop("extra", None)
        items, warnings = extra_collateral_items(store)
        self.warnings.extend(warnings)
        if items:
            body["dcapd_extra_collateral"] = items
        for kind, keys in sorted(by_kind.items()):
            if kind not in SKIPPED_KINDS:
                self.warnings.append(f"{len(keys)} cache entries of kind {kind!r} not exported")
        return body

    def _platforms(self, keys: list[str]) -> None:
        store = self.store
        for key in keys:
            qeid, pceid = store.platform_id_from_key(key)
            platform = store.get_json(key)
            cert_set = store.get_json(store.certs_key(qeid, pceid))
            raw_tcbs = store.get_json(store.rawtcbs_key(qeid, pceid)) or []
            fmspc = (platform or {}).get("fmspc", "").upper()
            if not cert_set or not cert_set.get("certs"):
                self.warnings.append(f"platform {qeid}/{pceid}: no certificates; not exported")
                continue
            if fmspc not in self.tcb_parts:
                self.warnings.append(
                    f"platform {qeid}/{pceid}: no SGX TCB info for FMSPC "
                    f"{fmspc} in the cache; not exported"
                )
                continue
            # After (or with) its FMSPC's TCB info: the server selects with it on import.
            part = self.place(
                4,
                {("pck", platform["ca"].upper()): cert_set["chain"]},
                min_index=self.tcb_parts[fmspc],
            )
            row = {
                "qe_id": qeid,
                "pce_id": pceid,
                "enc_ppid": platform.get("enc_ppid", ""),
                "platform_manifest": platform.get("platform_manifest", ""),
            }
            part.pck_certs.append(dict(row, certs=upload_certs(cert_set["certs"])))
            for cpu_svn, pce_svn in raw_tcbs:
                part.platforms.append(
                    {
                        "qe_id": qeid,
                        "pce_id": pceid,
                        "cpu_svn": cpu_svn,
                        "pce_svn": pce_svn,
                        "enc_ppid": row["enc_ppid"],
                        "platform_manifest": row["platform_manifest"],
                    }
                )

    def _crls(self, root_keys: list, crl_keys: list) -> None:
        crls = {fields[0]: self._entry(key).body for key, fields in crl_keys}
        self.crls: dict[str, str] = {}
        if root_keys:
            der = self._entry(root_keys[0][0]).body
            same = [uri for uri, body in crls.items() if body == der]
            # The root CA CRL is one entry whatever distribution point named it (rootcacrl).
            cdp = (
                self.preferred_cdp
                if self.preferred_cdp in same
                else (same or [self.preferred_cdp])[0]
            )
            self.parts[0].rootcacrl = (cdp, der.hex())
            crls.pop(cdp, None)
        self.crls = {uri: body.hex() for uri, body in crls.items()}
