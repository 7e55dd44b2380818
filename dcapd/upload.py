"""PUT /platformcollateral: the air-gapped site's bulk import (pccs-reference.md §4.3).

The body is what Intel's PccsAdminTool ``fetch`` writes. Everything is validated first, then
written in one cache transaction, as the same entries the GET paths read, so that an OFFLINE
dcapd then serves every uploaded item and a failure leaves the cache exactly as it was.
Beside Intel's keys, ``dcapd_extra_collateral`` carries the collateral PCS v4 serves beyond
Intel's PCCS (its format: extra.py).
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from typing import Callable

from . import jsonlimits
from .collateral import (
    CT_CRL,
    CT_JSON,
    ENCLAVE_IDENTITY_CHAIN,
    PCK_CERT_CHAIN,
    PCK_CRL_CHAIN,
    TCB_INFO_CHAIN_V3,
    TCB_INFO_CHAIN_V4,
    BadUpstreamData,
    crl_meta,
    is_url_encoded_chain,
    signed_json_meta,
    tcb_info_chain_header,
)
from .errors import PccsError
from .extra import UPLOAD_KEY, ExtraCollateral
from .freshness import ExpiryWarnings
from .hexstr import ANY_LENGTH, is_hex
from .integrity import Integrity, IntegrityError, tcb_info_mismatch
from .pckcerts import PckCerts, RawTcb
from .pcsurls import is_root_crl_url
from .selection import SelectionError, parse_memo, parse_pck_cert
from .store import Entry, Store

log = logging.getLogger("dcapd.upload")

PCK_CHAINS = PCK_CERT_CHAIN  # the upload's key for the PCK chains: the PCS header's name
_CHAIN_SPLIT = "-----BEGIN%20CERTIFICATE-----"
_TCB_KEYS = {
    4: {
        "sgx_tcbinfo": ("sgx", "STANDARD"),
        "sgx_tcbinfo_early": ("sgx", "EARLY"),
        "tdx_tcbinfo": ("tdx", "STANDARD"),
        "tdx_tcbinfo_early": ("tdx", "EARLY"),
    },
    3: {"tcbinfo": ("sgx", "STANDARD"), "tcbinfo_early": ("sgx", "EARLY")},
}
_IDENTITY_KEYS = {
    "qeidentity": ("qe", "STANDARD"),
    "qeidentity_early": ("qe", "EARLY"),
    "qveidentity": ("qve", "STANDARD"),
    "qveidentity_early": ("qve", "EARLY"),
    "tdqeidentity": ("tdqe", "STANDARD"),
    "tdqeidentity_early": ("tdqe", "EARLY"),
}
_SVN_FIELDS = tuple(f"sgxtcbcomp{i:02d}svn" for i in range(1, 17))


def _bad(reason: str) -> PccsError:
    return PccsError(400, f"collateral upload: {reason}")


def _hex_field(
    item: dict, name: str, where: str, lengths: tuple[int, ...] = (), max_length: int = 0
) -> str:
    """A hex string of one of ``lengths`` (or 1..max_length); absent means empty."""
    value = item.get(name) or ""
    if not is_hex(value, lengths, max_length):
        raise _bad(f"{where}.{name} is not valid hex")
    return value


def _require(container: dict, name: str, kind: type, where: str):
    value = container.get(name)
    if not isinstance(value, kind):
        raise _bad(f"{where}.{name} is missing or not a {kind.__name__}")
    return value


def chain_halves(chain: str) -> tuple[str, str]:
    """Intel: a chain is split at the LAST URL-encoded BEGIN line into (intermediate, root);
    an unencoded chain cannot be split (ValueError)."""
    if (
        not isinstance(chain, str)
        or chain.count(_CHAIN_SPLIT) < 2
        or not is_url_encoded_chain(chain)
    ):
        raise ValueError("not a URL-encoded certificate chain of two certificates")
    at = chain.rindex(_CHAIN_SPLIT)
    return chain[:at], chain[at:]


def split_chain(chain: str, where: str) -> tuple[str, str]:
    """:func:`chain_halves`, refusing the upload (400) when ``chain`` cannot be split."""
    try:
        return chain_halves(chain)
    except ValueError:
        raise _bad(f"{where} is not a URL-encoded certificate chain") from None


def upload_certs(certs: list[dict]) -> list[dict]:
    """Certificates as an upload stores them ({tcb, tcbm, pem}) in the upload's own form
    ({tcb, tcbm, cert}: the PEM URL-encoded, as PCS sends it); the inverse of apply."""
    return [
        {"tcb": cert["tcb"], "tcbm": cert["tcbm"], "cert": urllib.parse.quote(cert["pem"], safe="")}
        for cert in certs
    ]


def tcb_info_body(document: dict) -> bytes:
    """The bytes Intel signed: its bodies are compact JSON with the keys in PCS order, so a
    compact re-serialisation of the parsed object (insertion order kept) restores them."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class _CheckedOnly(Exception):
    """Ends a :meth:`CollateralUpload.check` run inside its transaction, rolling it back."""


class CollateralUpload:
    def __init__(
        self,
        store: Store,
        pck_certs: PckCerts,
        integrity: Integrity,
        extra: ExtraCollateral,
        expiry: ExpiryWarnings | None = None,
    ):
        """``expiry``: warns about uploaded collateral already past its nextUpdate."""
        self.store = store
        self.pck_certs = pck_certs
        self.integrity = integrity
        self.extra = extra
        self.expiry = expiry

    @staticmethod
    def _verified(what: str, check: Callable[[], None]) -> None:
        """Anything uploaded must be what Intel signed: else 460, as Intel's integrity error."""
        try:
            check()
        except IntegrityError as exc:
            raise PccsError(460, f"collateral upload: {what}: {exc}") from None

    def check(self, version: int, body) -> None:
        """Everything :meth:`apply` checks (the PccsError it would raise), selection included:
        the transaction is rolled back, so nothing is written."""
        self.apply(version, body, write=False)

    def apply(self, version: int, body, write: bool = True) -> None:
        # Each distinct certificate and TCB info is parsed once, however many platforms and
        # raw TCBs use it: the upload's cost grows with its size, not with its size squared.
        with parse_memo():
            self._apply(version, body, write)

    def _apply(self, version: int, body, write: bool) -> None:
        if not isinstance(body, dict):
            raise _bad("body is not a JSON object")
        platforms = _require(body, "platforms", list, "body")
        collaterals = _require(body, "collaterals", dict, "body")
        if version == 4 and collaterals.get("version") != 4:
            raise _bad("collaterals.version must be 4 on the v4 route")
        pck_cert_sets = _require(collaterals, "pck_certs", list, "collaterals")
        tcb_infos = _require(collaterals, "tcbinfos", list, "collaterals")
        certificates = _require(collaterals, "certificates", dict, "collaterals")
        pck_chains = _require(certificates, PCK_CHAINS, dict, "certificates")
        for index, platform in enumerate(platforms):
            self._check_platform(platform, f"platforms[{index}]")

        chains = self._chains(version, certificates, pck_chains)
        writes: dict[str, Entry] = {}
        writes.update(self.extra.entries_from_upload(body.get(UPLOAD_KEY)))
        tcb_bodies = self._tcb_infos(version, tcb_infos, chains, writes)
        self._crls(collaterals, pck_chains, writes)
        self._identities(version, collaterals, chains.get("identity"), writes)
        # PCK certificates last: selection may use the TCB infos of this very upload. One pass
        # over the platforms indexes them by (QE ID, PCE ID): linear in the upload's size.
        by_id: dict[tuple[str, str], list[dict]] = {}
        for platform in platforms:
            ident = (
                str(platform.get("qe_id", "")).upper(),
                str(platform.get("pce_id", "")).upper(),
            )
            by_id.setdefault(ident, []).append(platform)
        verified: set[tuple[str, str]] = set()  # (PEM, chain) pairs already checked
        issuers: dict = {}  # issuer chains verified under a first leaf (integrity.py)
        plans = [
            self._pck_cert_set(
                version, item, f"pck_certs[{i}]", by_id, pck_chains, tcb_bodies, (verified, issuers)
            )
            for i, item in enumerate(pck_cert_sets)
        ]
        try:
            with self.store.transaction():
                for key, entry in writes.items():
                    self.store.put(key, entry)
                # Selection for every raw TCB (the upload's and those cached before) happens
                # here, once: a failure rolls the whole transaction back, so nothing is written.
                for where, qeid, pceid, platform, cert_set, tcb_body, raw_tcbs in plans:
                    try:
                        self.pck_certs.store_platform(
                            qeid, pceid, platform, cert_set, tcb_body, None, extra_raw_tcbs=raw_tcbs
                        )
                    except PccsError as exc:
                        raise _bad(f"{where}: {exc.reason}") from None
                if not write:
                    raise _CheckedOnly  # rolls the transaction back
        except _CheckedOnly:
            return
        if self.expiry is not None:
            for key, entry in writes.items():
                self.expiry.check(key, lambda: entry.meta, "uploaded", fresh=True)
        tcb_infos = sum(1 for key in writes if key.startswith("tcb/"))
        log.info(
            "collateral upload (v%d): %d platforms, %d TCB infos, %d other entries",
            version,
            len(plans),
            tcb_infos,
            len(writes) - tcb_infos,
        )

    @staticmethod
    def _check_platform(item, where: str) -> None:
        if not isinstance(item, dict):
            raise _bad(f"{where} is not an object")
        _hex_field(item, "qe_id", where, max_length=260)
        _hex_field(item, "pce_id", where, (4,))
        _hex_field(item, "cpu_svn", where, (0, 32))
        _hex_field(item, "pce_svn", where, (0, 4))
        _hex_field(item, "enc_ppid", where, (0, 768))
        manifest = item.get("platform_manifest")
        if manifest is not None and not isinstance(manifest, str):
            raise _bad(f"{where}.platform_manifest is not a string")

    @staticmethod
    def _chains(version: int, certificates: dict, pck_chains: dict) -> dict[str, str]:
        """The upload's chains; every root half must be the same certificate (else 460)."""
        # Intel's tool writes "" for a chain it has not got (e.g. ``fetch -c``): absent.
        chains: dict[str, str] = {}
        for ca in ("PROCESSOR", "PLATFORM"):
            if pck_chains.get(ca):
                chains[ca] = pck_chains[ca]
        tcb_chain = certificates.get(tcb_info_chain_header(version)) or certificates.get(
            TCB_INFO_CHAIN_V4 if version == 3 else TCB_INFO_CHAIN_V3
        )
        if tcb_chain:
            chains["tcb"] = tcb_chain
        if certificates.get(ENCLAVE_IDENTITY_CHAIN):
            chains["identity"] = certificates[ENCLAVE_IDENTITY_CHAIN]
        roots = {
            name: split_chain(chain, f"certificates chain {name}")[1]
            for name, chain in chains.items()
        }
        if len(set(urllib.parse.unquote(root) for root in roots.values())) > 1:
            raise PccsError(460, "collateral upload: the chains end in different roots")
        return chains

    def _tcb_infos(
        self, version: int, tcb_infos: list, chains: dict, writes: dict[str, Entry]
    ) -> dict[str, bytes]:
        """Entries for every uploaded TCB info; returns the SGX ones for selection by FMSPC
        (EARLY preferred, as Intel selects with)."""
        for_selection: dict[str, bytes] = {}
        for index, item in enumerate(tcb_infos):
            where = f"tcbinfos[{index}]"
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("fmspc"), str)
                or not is_hex(item["fmspc"], (12,))
            ):
                raise _bad(f"{where}.fmspc is missing or not 12 hex characters")
            # Intel matches this FMSPC case-sensitively against the cert's ([ref-bug]); we don't.
            fmspc = item["fmspc"].upper()
            for name, (tee, update) in _TCB_KEYS[version].items():
                document = item.get(name)
                if document is None:
                    continue
                info = document.get("tcbInfo") if isinstance(document, dict) else None
                if not isinstance(info, dict) or not isinstance(document.get("signature"), str):
                    raise _bad(f"{where}.{name} is not a signed TCB info")
                mismatch = tcb_info_mismatch(info, fmspc, tee, version)
                if mismatch:
                    raise _bad(f"{where}.{name} {mismatch}")
                if "tcb" not in chains:
                    raise _bad("TCB infos uploaded without a TCB info issuer chain")
                body = self._tcb_info_bytes(document, item.get(f"{name}_raw"), where, name)
                self._verified(
                    f"{where}.{name}",
                    lambda: self.integrity.check_signed_json(body, "tcbInfo", chains["tcb"]),
                )
                writes[self.store.tcb_key(tee, version, fmspc, update)] = Entry(
                    body,
                    {tcb_info_chain_header(version): chains["tcb"]},
                    CT_JSON,
                    dict(signed_json_meta(info), source="upload"),
                )
                if tee == "sgx" and (update == "EARLY" or fmspc not in for_selection):
                    for_selection[fmspc] = body
        return for_selection

    @staticmethod
    def _tcb_info_bytes(document: dict, raw, where: str, name: str) -> bytes:
        """The bytes to store. A ``<name>_raw`` string (dcapd's export writes one; Intel's
        tools ignore unknown keys) keeps originals that are not compact JSON byte-exact."""
        if raw is None:
            return tcb_info_body(document)
        if not isinstance(raw, str):
            raise _bad(f"{where}.{name}_raw is not a string")
        try:
            same = jsonlimits.loads(raw) == document
        except jsonlimits.JsonTooDeep as exc:
            raise _bad(f"{where}.{name}_raw: {exc}") from None
        except ValueError:
            same = False
        if not same:
            raise _bad(f"{where}.{name}_raw does not match {name}")
        return raw.encode("utf-8")

    def _crls(self, collaterals: dict, pck_chains: dict, writes: dict[str, Entry]) -> None:
        crls = collaterals.get("pckcacrl")
        if crls is not None:
            if not isinstance(crls, dict):
                raise _bad("pckcacrl is not an object")
            for name, ca in (("processorCrl", "PROCESSOR"), ("platformCrl", "PLATFORM")):
                if crls.get(name) is None:
                    continue
                der = self._hex_bytes(crls[name], f"pckcacrl.{name}")
                # The CRL's chain is its CA's chain (Intel builds it from the same certificates).
                chain = pck_chains.get(ca)
                if not chain:
                    cached = self.store.get(self.store.pckcrl_key(ca))
                    chain = cached.headers.get(PCK_CRL_CHAIN) if cached else None
                if not chain:
                    # Intel's tool leaves out the chain of a CA no platform of the site uses;
                    # Intel's PCCS then cannot serve that CRL either. Skip it, say so.
                    log.warning(
                        "collateral upload: pckcacrl.%s skipped: no %s chain in the "
                        "upload or the cache to serve it with",
                        name,
                        ca,
                    )
                    continue
                self._verified(f"pckcacrl.{name}", lambda: self.integrity.check_crl(der, chain))
                writes[self.store.pckcrl_key(ca)] = Entry(
                    der, {PCK_CRL_CHAIN: chain}, CT_CRL, self._crl_meta(der)
                )
        root_crl = collaterals.get("rootcacrl")
        if root_crl:
            der = self._hex_bytes(root_crl, "rootcacrl")
            self._verified("rootcacrl", lambda: self.integrity.check_crl(der, None))
            writes[self.store.rootcacrl_key()] = Entry(der, {}, CT_CRL, self._crl_meta(der))
            cdp = collaterals.get("rootcacrl_cdp")
            if cdp:
                if not isinstance(cdp, str):
                    raise _bad("rootcacrl_cdp is not a string")
                # Stored as that distribution point's CRL, which every refresh downloads again:
                # only a root CA CRL distribution point Intel's collateral can name.
                if not is_root_crl_url(cdp):
                    raise _bad("rootcacrl_cdp is not an Intel root CA CRL distribution point")
                writes[self.store.crl_key(cdp)] = Entry(der, {}, CT_CRL, self._crl_meta(der))

    @staticmethod
    def _crl_meta(der: bytes) -> dict:
        try:
            return dict(crl_meta(der), source="upload")
        except BadUpstreamData as exc:
            raise PccsError(460, f"collateral upload: {exc}") from None

    @staticmethod
    def _hex_bytes(value, where: str) -> bytes:
        if not is_hex(value, max_length=ANY_LENGTH) or len(value) % 2:
            raise _bad(f"{where} is not hex")
        return bytes.fromhex(value)

    def _identities(
        self, version: int, collaterals: dict, chain: str | None, writes: dict[str, Entry]
    ) -> None:
        for name, (kind, update) in _IDENTITY_KEYS.items():
            text = collaterals.get(name)
            if not text:
                continue
            if kind == "tdqe" and version != 4:
                continue
            if not isinstance(text, str):
                raise _bad(f"{name} is not a string")
            try:
                identity = jsonlimits.loads(text).get("enclaveIdentity")
            except jsonlimits.JsonTooDeep as exc:
                raise _bad(f"{name}: {exc}") from None
            except (ValueError, AttributeError):
                identity = None
            if not isinstance(identity, dict):
                raise _bad(f"{name} is not a signed enclave identity")
            if chain is None:
                raise _bad(f"{name} uploaded without an enclave identity issuer chain")
            body = text.encode("utf-8")
            self._verified(
                name, lambda: self.integrity.check_signed_json(body, "enclaveIdentity", chain)
            )
            # Identities arrive as raw text: stored verbatim.
            writes[self.store.identity_key(kind, version, update)] = Entry(
                body,
                {ENCLAVE_IDENTITY_CHAIN: chain},
                CT_JSON,
                dict(signed_json_meta(identity), source="upload"),
            )

    def _pck_cert_set(
        self,
        version: int,
        item,
        where: str,
        platforms_by_id: dict[tuple[str, str], list[dict]],
        pck_chains: dict,
        tcb_bodies: dict[str, bytes],
        memo: tuple[set[tuple[str, str]], dict],
    ):
        if not isinstance(item, dict):
            raise _bad(f"{where} is not an object")
        qe_id = _hex_field(item, "qe_id", where, max_length=260).upper()
        pce_id = _hex_field(item, "pce_id", where, (4,)).upper()
        certs_in = _require(item, "certs", list, where)
        if not certs_in:
            raise _bad(f"{where}.certs is empty")
        certs = []
        for index, cert in enumerate(certs_in):
            if (
                not isinstance(cert, dict)
                or not isinstance(cert.get("cert"), str)
                or not isinstance(cert.get("tcbm"), str)
                or not is_hex(cert["tcbm"], (36,))
                or not self._valid_tcb(cert.get("tcb"))
            ):
                raise _bad(f"{where}.certs[{index}] needs tcb, tcbm (36 hex) and cert")
            certs.append(
                {
                    "tcb": cert["tcb"],
                    "tcbm": cert["tcbm"].upper(),
                    "pem": urllib.parse.unquote(cert["cert"]),
                }
            )
        try:
            first = parse_pck_cert(certs[0]["pem"])
        except SelectionError as exc:
            raise _bad(f"{where}.certs[0] is not a PCK certificate: {exc}") from None
        fmspc, ca = first.fmspc.hex().upper(), first.ca_type
        if ca not in ("PROCESSOR", "PLATFORM"):
            raise _bad(f"{where}.certs[0] has no PCK CA issuer")
        if not pck_chains.get(ca):
            raise _bad(f"{where}: no {ca} chain in certificates")
        tcb_body = tcb_bodies.get(fmspc) or self.pck_certs.selection_tcb_info(fmspc, version)
        if tcb_body is None:
            raise _bad(f"{where}: no SGX TCB info for FMSPC {fmspc}")
        matching = platforms_by_id.get((qe_id, pce_id), [])
        raw_tcbs = [
            RawTcb(qe_id, pce_id, p["cpu_svn"].upper(), p["pce_svn"].upper())
            for p in matching
            if p.get("cpu_svn") and p.get("pce_svn")
        ]
        source = matching[0] if matching else item
        platform = {
            "fmspc": fmspc,
            "ca": ca,
            "enc_ppid": (source.get("enc_ppid") or "").lower(),
            "platform_manifest": (source.get("platform_manifest") or "").lower(),
        }
        cert_set = {"certs": certs, "chain": pck_chains[ca]}
        verified, issuers = memo
        for index, cert in enumerate(certs):
            if (cert["pem"], pck_chains[ca]) in verified:  # the same cert again: checked
                continue
            self._verified(
                f"{where}.certs[{index}]",
                lambda: self.integrity.check_pck_cert(cert["pem"], pck_chains[ca], issuers),
            )
            verified.add((cert["pem"], pck_chains[ca]))
        return where, qe_id, pce_id, platform, cert_set, tcb_body, raw_tcbs

    @staticmethod
    def _valid_tcb(tcb) -> bool:
        if not isinstance(tcb, dict):
            return False
        svns = [tcb.get(name) for name in _SVN_FIELDS]
        pcesvn = tcb.get("pcesvn")
        return (
            all(isinstance(v, int) and 0 <= v <= 255 for v in svns)
            and isinstance(pcesvn, int)
            and 0 <= pcesvn <= 65535
        )
