"""``fetch``: Intel's PccsAdminTool ``fetch``, step by step (pccs-reference.md §4.3): the CRLs,
each platform's PCK certificates, the TCB infos of their FMSPCs (and of those PCS lists), the
enclave identities; everything checked against the trusted roots, written in Intel's upload
format."""

from __future__ import annotations

import json
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from cryptography import x509

from ..collateral import (
    ENCLAVE_IDENTITY_CHAIN,
    PCK_CERT_CHAIN,
    PCK_CRL_CHAIN,
    tcb_info_chain_header,
)
from ..hexstr import is_hex
from ..integrity import Integrity, IntegrityError, tcb_info_mismatch
from ..pckcerts import NOT_AVAILABLE
from ..platforms import raw_tcb_of_pcs_entry
from ..selection import SelectionError, parse_pck_cert
from ..upload import chain_halves
from ..upstream import ENCLAVE_IDENTITY_PATHS, UpstreamResponse
from .common import AdminError, Progress, plural
from .pcs import Pcs, header, pcs_failure
from .upload_file import IDENTITY_KINDS, tcb_info_fields

log = logging.getLogger("dcapd.admin")


def root_cert_cdp(chain: str) -> str:
    """The CRL distribution point of the root certificate at the end of a URL-encoded chain
    (where Intel's tool reads the root CA CRL URL from)."""
    try:
        pem = urllib.parse.unquote(chain_halves(chain)[1]).encode()
        cert = x509.load_pem_x509_certificate(pem)
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise AdminError(
            f"cannot read the root CA CRL URL from the processor CRL issuer chain: {exc}"
        ) from None
    for point in points:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier):
                return name.value
    raise AdminError("the root certificate of the processor CRL issuer chain has no CRL URL")


@dataclass
class FetchResult:
    upload: dict
    not_available: list
    unknown: list[str]  # platforms PCS does not know (404), skipped with --skip-unknown


class Fetcher:
    def __init__(
        self,
        pcs: Pcs,
        integrity: Integrity,
        update: str,
        platform_filter: str,
        progress: Progress,
        skip_unknown: bool = False,
    ):
        self.pcs = pcs
        self.upstream = pcs.upstream
        self.integrity = integrity
        self.updates = ["standard", "early"] if update == "all" else [update]
        self.platform_filter = platform_filter
        self.progress = progress
        self.skip_unknown = skip_unknown
        self.unknown: list[str] = []  # "QE_ID/PCE_ID" of each platform PCS answered 404 for
        self.certificates = 0  # PCK certificates fetched so far
        version = pcs.version
        self.version = version
        self.tcb_chain_name = tcb_info_chain_header(version)
        self.collaterals: dict = {
            "version": version,
            "pck_certs": [],
            "tcbinfos": [],
            "pckcacrl": {},
            "qeidentity": "",
            "tdqeidentity": "",
            "qveidentity": "",
        }
        self.pck_chains: dict[str, str] = {}
        self.crl_chains: dict[str, str] = {}
        self.tcb_chain = ""
        self.identity_chain = ""
        self.root_crl: tuple[str, str] = ("", "")
        self.fmspc_order: list[str] = []  # the platforms' FMSPCs, as parsed from their certs

    # --- checks

    def _verify(self, what: str, check: Callable[[], None]) -> None:
        try:
            check()
        except IntegrityError as exc:
            raise AdminError(f"{what}: not what Intel signed: {exc}") from None

    def _required(self, what: str, reply: UpstreamResponse) -> UpstreamResponse:
        if reply.status != 200:
            raise pcs_failure(what, reply)
        return reply

    # --- steps

    def run(self, platforms: list | None) -> FetchResult:
        self.progress.add(3)
        self.crls()
        not_available: list = []
        if platforms is not None:
            self.pck_certs(platforms, not_available)
            fmspcs = self.fmspcs()
            self.progress.line(f"TCB infos of {plural(len(fmspcs), 'FMSPC')}")
            self.tcb_infos(fmspcs)
            self.identities()
        unknown = set(ident.upper() for ident in self.unknown)
        known = [
            item
            for item in platforms or []
            if f"{item['qe_id']}/{item['pce_id']}".upper() not in unknown
        ]
        return FetchResult(self.output(known), not_available, self.unknown)

    @staticmethod
    def wanted(platforms: list) -> list[dict]:
        """One row per platform (QE ID, PCE ID) of the list: one pckcerts call each."""
        wanted: dict[tuple[str, str], dict] = {}
        for item in platforms:
            ident = (item["qe_id"].upper(), item["pce_id"].upper())
            # A manifest wins (Intel: POST with it).
            row = wanted.setdefault(
                ident,
                {
                    "qe_id": item["qe_id"],
                    "pce_id": item["pce_id"],
                    "enc_ppid": item.get("enc_ppid") or "",
                    "platform_manifest": item.get("platform_manifest"),
                },
            )
            if item.get("platform_manifest") and not row["platform_manifest"]:
                row["platform_manifest"] = item["platform_manifest"]
            if item.get("enc_ppid") and not row["enc_ppid"]:
                row["enc_ppid"] = item["enc_ppid"]
        return list(wanted.values())

    def _pck_certs_request(self, platform: dict) -> tuple[Callable[..., UpstreamResponse], tuple]:
        if platform["platform_manifest"]:
            request = self.upstream.post_pck_certs
            return request, (self.version, platform["platform_manifest"], platform["pce_id"])
        return self.upstream.get_pck_certs, (self.version, platform["enc_ppid"], platform["pce_id"])

    def platforms_done(self, platforms: list) -> int:
        """How many of the list's platforms a resumed fetch already has the answer for."""
        requests = [self._pck_certs_request(platform) for platform in self.wanted(platforms)]
        return sum(1 for request, args in requests if self.pcs.kept(request, *args))

    def crls(self) -> None:
        for ca in ("processor", "platform"):
            what = f"{ca} PCK CRL"
            reply = self._required(
                what, self.pcs.call(what, self.upstream.get_pck_crl, self.version, ca)
            )
            chain = header(reply, PCK_CRL_CHAIN)
            if not chain:
                raise AdminError(f"{what}: PCS sent no {PCK_CRL_CHAIN} header")
            self._verify(what, lambda: self.integrity.check_crl(reply.body, chain))
            self.collaterals["pckcacrl"][f"{ca}Crl"] = reply.body.hex()
            self.crl_chains[ca.upper()] = chain
            self.progress.step(what)
        cdp = root_cert_cdp(self.crl_chains["PROCESSOR"])
        what = "root CA CRL"
        reply = self._required(what, self.pcs.call(what, self.upstream.get_url, cdp))
        self._verify(what, lambda: self.integrity.check_crl(reply.body, None))
        self.root_crl = (cdp, reply.body.hex())
        self.progress.step(what)

    def pck_certs(self, platforms: list, not_available: list) -> None:
        wanted = self.wanted(platforms)
        self.progress.add(len(wanted))
        for number, platform in enumerate(wanted, 1):
            ident = f"{platform['qe_id']}/{platform['pce_id']}"
            what = f"PCK certificates of platform {ident}"
            request, args = self._pck_certs_request(platform)
            reply = self.pcs.call(what, request, *args, optional=self.skip_unknown)
            counter = f"platform {number}/{len(wanted)} {ident}"
            if reply.status == 404 and self.skip_unknown:
                self.unknown.append(ident)
                self.progress.step(f"platform {number}/{len(wanted)}, {len(self.unknown)} unknown")
                self.progress.line(f"{counter}: PCS does not know it (404); skipped")
                continue
            self._required(what, reply)
            chain = header(reply, PCK_CERT_CHAIN)
            try:
                entries = json.loads(reply.body)
                if not isinstance(entries, list) or not all(
                    isinstance(e, dict) and isinstance(e.get("cert"), str) for e in entries
                ):
                    raise ValueError("not a JSON array of {tcb, tcbm, cert}")
            except ValueError as exc:
                raise AdminError(f"{what}: PCS sent bad data: {exc}") from None
            available = [e for e in entries if e["cert"] != NOT_AVAILABLE]
            for entry in entries:
                if entry["cert"] == NOT_AVAILABLE:
                    try:
                        cpu_svn, pce_svn = raw_tcb_of_pcs_entry(entry["tcb"])
                    except (KeyError, TypeError, ValueError):
                        raise AdminError(
                            f"{what}: PCS sent bad data: a 'Not available' "
                            "entry without a valid tcb"
                        ) from None
                    not_available.append(
                        {
                            "enc_ppid": platform["enc_ppid"],
                            "platform_manifest": platform["platform_manifest"],
                            "qe_id": platform["qe_id"],
                            "pce_id": platform["pce_id"],
                            "cpu_svn": cpu_svn,
                            "pce_svn": pce_svn,
                        }
                    )
            self.certificates += len(available)
            self.progress.step(f"platform {number}/{len(wanted)}, {self.certificates} certificates")
            self.progress.line(
                f"{counter}: {plural(len(available), 'certificate')} ({self.certificates} so far)"
            )
            if not available:
                log.warning("%s: every certificate is 'Not available'; platform skipped", what)
                continue
            if not chain:
                raise AdminError(f"{what}: PCS sent no {PCK_CERT_CHAIN} header")
            for entry in available:
                self._verify(what, lambda: self.integrity.check_pck_cert(entry["cert"], chain))
            try:
                first = parse_pck_cert(urllib.parse.unquote(available[0]["cert"]))
            except SelectionError as exc:
                raise AdminError(f"{what}: not a PCK certificate: {exc}") from None
            # Intel: the FMSPC as parsed from the cert (lower case), the chain per CA type.
            fmspc = first.fmspc.hex()
            if fmspc.upper() not in (f.upper() for f in self.fmspc_order):
                self.fmspc_order.append(fmspc)
            self.pck_chains.setdefault(first.ca_type, chain)
            self.collaterals["pck_certs"].append(
                {
                    "qe_id": platform["qe_id"],
                    "pce_id": platform["pce_id"],
                    "enc_ppid": platform["enc_ppid"],
                    "platform_manifest": platform["platform_manifest"],
                    "certs": available,
                }
            )

    def fmspcs(self) -> list[str]:
        fmspcs = list(self.fmspc_order)
        if self.version >= 4 and self.platform_filter != "none":
            what = f"FMSPC list (platform={self.platform_filter})"
            reply = self.pcs.call(
                what, self.upstream.get_fmspcs, self.version, self.platform_filter, optional=True
            )
            if reply.status != 200:
                log.warning(
                    "%s: PCS answered %d; only the platforms' FMSPCs are fetched",
                    what,
                    reply.status,
                )
            else:
                try:
                    listed = [item["fmspc"] for item in json.loads(reply.body)]
                    if not all(is_hex(f, (12,)) for f in listed):
                        raise ValueError("bad fmspc")
                except (ValueError, TypeError, KeyError):
                    raise AdminError(f"{what}: PCS sent bad data") from None
                known = {f.upper() for f in fmspcs}
                for fmspc in listed:
                    if fmspc.upper() not in known:
                        known.add(fmspc.upper())
                        fmspcs.append(fmspc)
        self.progress.add(len(fmspcs) * len(self.updates) * (2 if self.version >= 4 else 1))
        return fmspcs

    def tcb_infos(self, fmspcs: list[str]) -> None:
        for fmspc in fmspcs:
            item: dict = {"fmspc": fmspc}
            for update in self.updates:
                suffix = "_early" if update == "early" else ""
                # The SGX TCB info is required for standard; early and TDX ones are optional.
                sgx = self._tcb_info("sgx", fmspc, update, optional=update != "standard")
                if sgx is not None:
                    name = f"sgx_tcbinfo{suffix}" if self.version >= 4 else f"tcbinfo{suffix}"
                    item.update(tcb_info_fields(name, sgx.body))
                    self.tcb_chain = self.tcb_chain or header(sgx, self.tcb_chain_name)
                if self.version >= 4:
                    tdx = self._tcb_info("tdx", fmspc, update, optional=True)
                    if tdx is not None:
                        item.update(tcb_info_fields(f"tdx_tcbinfo{suffix}", tdx.body))
            self.collaterals["tcbinfos"].append(item)

    def _tcb_info(
        self, tee: str, fmspc: str, update: str, optional: bool
    ) -> UpstreamResponse | None:
        what = f"{tee.upper()} TCB info {fmspc.upper()} ({update})"
        reply = self.pcs.call(
            what, self.upstream.get_tcb_info, tee, self.version, fmspc, update, optional=optional
        )
        self.progress.step(what)
        if reply.status != 200:
            if optional and reply.status == 404:
                log.info("%s: not available at PCS (optional)", what)
                return None
            raise pcs_failure(what, reply)
        chain = header(reply, self.tcb_chain_name)
        if not chain:
            raise AdminError(f"{what}: PCS sent no {self.tcb_chain_name} header")
        self._verify(what, lambda: self.integrity.check_signed_json(reply.body, "tcbInfo", chain))
        try:
            info = json.loads(reply.body)["tcbInfo"]
            mismatch = tcb_info_mismatch(info, fmspc, tee, self.version)
            if mismatch:
                raise ValueError(f"it {mismatch}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AdminError(f"{what}: PCS sent bad data: {exc}") from None
        return reply

    def identities(self) -> None:
        kinds = [
            kind
            for kind in IDENTITY_KINDS
            if ENCLAVE_IDENTITY_PATHS[kind][0] == "sgx" or self.version >= 4
        ]
        self.progress.add(len(kinds) * len(self.updates))
        for kind in kinds:
            for update in self.updates:
                what = f"{kind.upper()} identity ({update})"
                optional = update != "standard"
                reply = self.pcs.call(
                    what,
                    self.upstream.get_enclave_identity,
                    kind,
                    self.version,
                    update,
                    optional=optional,
                )
                self.progress.step(what)
                if reply.status != 200:
                    if optional and reply.status == 404:
                        log.info("%s: not available at PCS (optional)", what)
                        continue
                    raise pcs_failure(what, reply)
                chain = header(reply, ENCLAVE_IDENTITY_CHAIN)
                if not chain:
                    raise AdminError(f"{what}: PCS sent no {ENCLAVE_IDENTITY_CHAIN} header")
                self._verify(
                    what,
                    lambda: self.integrity.check_signed_json(reply.body, "enclaveIdentity", chain),
                )
                suffix = "_early" if update == "early" else ""
                self.collaterals[f"{kind}identity{suffix}"] = reply.body.decode("utf-8")
                if kind == "qe" or not self.identity_chain:  # Intel: the QE answer's chain
                    self.identity_chain = chain

    def output(self, platforms: list) -> dict:
        """The upload body, keys in the order of Intel's own file."""
        pck_chains = dict(self.crl_chains)  # a CA with no platform still gets its chain
        pck_chains.update(self.pck_chains)
        certificates: dict = {PCK_CERT_CHAIN: {ca: pck_chains[ca] for ca in sorted(pck_chains)}}
        if self.tcb_chain:
            certificates[self.tcb_chain_name] = self.tcb_chain
        if self.identity_chain:
            certificates[ENCLAVE_IDENTITY_CHAIN] = self.identity_chain
        collaterals = dict(self.collaterals)
        collaterals["certificates"] = certificates
        collaterals["rootcacrl_cdp"], collaterals["rootcacrl"] = self.root_crl
        return {"platforms": platforms, "collaterals": collaterals}
