"""A throw-away SGX PKI for tests: root CA, PCK Platform/Processor CAs, TCB signing, PCK leafs.

Intel's real collateral (shared/fixtures) cannot be extended: nobody has the keys, and it has no
``/pckcerts`` recording of a platform whose encrypted PPID is known.  This module makes
look-alike data signed by a test root so tests can exercise everything a PCCS does with PCK
certificates, TCB infos and PCS ``pckcerts`` responses.

* Names mirror Intel's (issuer CN "Intel SGX PCK Platform CA", ...), with O = "dcapd Test PKI"
  so a test cert is never mistaken for a real one; fingerprints obviously differ from Intel's.
* CRL Distribution Points use Intel's URLs (:data:`ROOT_CA_CRL_URL`, :data:`PCK_CRL_URL`), so
  code that follows them hits whatever fake host a test maps Intel's hosts to.
* Everything is cached (functools.lru_cache): keys and certs are built once per process.

Usage::

    from tests.pki import default_platform, pckcerts_response_body, pckcerts_response_headers
    platform = default_platform()
    body = pckcerts_response_body(platform)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

__all__ = [
    "ROOT_CA_CRL_URL",
    "PCK_CRL_URL",
    "SGX_EXTENSION_OID",
    "CertAndKey",
    "Level",
    "TestPlatform",
    "PckEntry",
    "root_ca",
    "platform_ca",
    "processor_ca",
    "tcb_signing",
    "make_pck_cert",
    "sgx_extension_der",
    "der",
    "der_entry",
    "make_tcb_info",
    "make_signed_json",
    "sign_raw",
    "make_crl",
    "url_encoded_chain",
    "default_platform",
    "pckcerts_response_body",
    "pckcerts_response_headers",
    "pckcert_response",
    "DEFAULT_FMSPC",
    "DEFAULT_LEVELS",
]

ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
PCK_CRL_URL = (
    "https://api.trustedservices.intel.com/sgx/certification/v4/pckcrl?ca={ca}&encoding=der"
)
SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"

# Long validity so the suite keeps working for years (Intel's own root runs to 2049).
NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
NOT_AFTER = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc)
_ORGANIZATION = "dcapd Test PKI"


@dataclass(frozen=True, eq=False)  # hashed by identity (lru_cache keys)
class CertAndKey:
    """A certificate with its private key (the key signs children / TCB infos)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


# ---------------------------------------------------------------------------------------------
# Certificate authorities
# ---------------------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )


def _crl_distribution_points(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(url)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )


def _key_usage(*, signing_certs: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not signing_certs,
        content_commitment=not signing_certs,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signing_certs,
        crl_sign=signing_certs,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(subject: str, issuer: CertAndKey | None, public_key) -> x509.CertificateBuilder:
    issuer_name = issuer.cert.subject if issuer else _name(subject)
    issuer_public_key = issuer.key.public_key() if issuer else public_key
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _make_ca(subject: str, issuer: CertAndKey | None, path_length: int | None) -> CertAndKey:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(subject, issuer, key.public_key())
        .add_extension(_crl_distribution_points(ROOT_CA_CRL_URL), critical=False)
        .add_extension(_key_usage(signing_certs=True), critical=True)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
    )
    signer = issuer.key if issuer else key
    return CertAndKey(builder.sign(signer, hashes.SHA256()), key)


@cache
def root_ca() -> CertAndKey:
    """Self-signed test root ("Intel SGX Root CA"), with a CRL Distribution Point like Intel's."""
    return _make_ca("Intel SGX Root CA", None, path_length=1)


@cache
def platform_ca() -> CertAndKey:
    """Intermediate whose CN contains "Platform", so PCK leafs it signs are Platform-CA certs."""
    return _make_ca("Intel SGX PCK Platform CA", root_ca(), path_length=0)


@cache
def processor_ca() -> CertAndKey:
    """Intermediate whose CN contains "Processor" (Processor-CA PCK certs, 5 SGX entries)."""
    return _make_ca("Intel SGX PCK Processor CA", root_ca(), path_length=0)


@cache
def tcb_signing() -> CertAndKey:
    """Leaf that signs TCB infos and identities (chain: this + root)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder("Intel SGX TCB Signing", root_ca(), key.public_key())
        .add_extension(_crl_distribution_points(ROOT_CA_CRL_URL), critical=False)
        .add_extension(_key_usage(signing_certs=False), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    return CertAndKey(builder.sign(root_ca().key, hashes.SHA256()), key)


# ---------------------------------------------------------------------------------------------
# The SGX extension (hand-written DER; pccs-reference.md §5.3)
# ---------------------------------------------------------------------------------------------


def der(tag: int, content: bytes) -> bytes:
    """One DER TLV (definite length)."""
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = (length.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + length.to_bytes(size, "big") + content


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1]] + arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return der(0x06, bytes(body))


def _der_int(value: int, tag: int = 0x02) -> bytes:
    return der(tag, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def der_entry(oid: str, value: bytes) -> bytes:
    """SEQUENCE { OID, value } - one SGX extension entry (``value`` already DER-encoded)."""
    return der(0x30, _der_oid(oid) + value)


def sgx_extension_der(
    ppid: bytes,
    tcb_components: Sequence[int],
    pcesvn: int,
    cpusvn: bytes,
    pceid: bytes,
    fmspc: bytes,
    sgx_type: int = 0,
    platform: bool = True,
    platform_instance_id: bytes | None = None,
    configuration: tuple[bool, bool, bool] = (True, True, True),
    *,
    drop: Sequence[int] = (),
    extra: Sequence[bytes] = (),
) -> bytes:
    """The DER value of extension 1.2.840.113741.1.13.1 as Intel's PCS issues it.

    7 entries for Platform-CA certs (+ platform instance id, configuration), 5 otherwise.
    For negative tests: ``drop`` omits top-level entries by number (1 = PPID ... 7 =
    configuration) and ``extra`` appends ready-made entries (see :func:`der_entry`).
    """
    base = SGX_EXTENSION_OID
    tcb_entries = [
        der_entry(f"{base}.2.{n}", _der_int(svn)) for n, svn in enumerate(tcb_components, 1)
    ]
    tcb_entries.append(der_entry(f"{base}.2.17", _der_int(pcesvn)))
    tcb_entries.append(der_entry(f"{base}.2.18", der(0x04, cpusvn)))
    entries = [
        der_entry(f"{base}.1", der(0x04, ppid)),
        der_entry(f"{base}.2", der(0x30, b"".join(tcb_entries))),
        der_entry(f"{base}.3", der(0x04, pceid)),
        der_entry(f"{base}.4", der(0x04, fmspc)),
        der_entry(f"{base}.5", _der_int(sgx_type, tag=0x0A)),
    ]
    if platform:
        instance_id = platform_instance_id or hashlib.sha256(b"instance" + ppid).digest()[:16]
        flags = b"".join(
            der_entry(f"{base}.7.{n}", der(0x01, b"\xff" if flag else b"\x00"))
            for n, flag in enumerate(configuration, 1)
        )
        entries.append(der_entry(f"{base}.6", der(0x04, instance_id)))
        entries.append(der_entry(f"{base}.7", der(0x30, flags)))
    kept = [entry for number, entry in enumerate(entries, 1) if number not in drop]
    return der(0x30, b"".join(kept + list(extra)))


# ---------------------------------------------------------------------------------------------
# PCK leaf certificates
# ---------------------------------------------------------------------------------------------

DEFAULT_FMSPC = bytes.fromhex("00D0C0DE0000")

_STANDARD_EXTENSIONS = ("aki", "crl_dp", "ski", "key_usage", "basic_constraints")


def make_pck_cert(
    ca: CertAndKey,
    ppid: bytes,
    tcb_components: Sequence[int],
    pcesvn: int,
    cpusvn: bytes | None = None,
    pceid: bytes = b"\x00\x00",
    fmspc: bytes = DEFAULT_FMSPC,
    sgx_type: int = 0,
    platform: bool = True,
    *,
    omit_extensions: Sequence[str] = (),
    sgx_extension: bytes | None = None,
) -> str:
    """A PCK leaf (PEM) carrying every extension QVL requires.

    ``cpusvn`` defaults to ``bytes(tcb_components)`` (TCB type 0).  For negative tests,
    ``omit_extensions`` drops some of "aki", "crl_dp", "ski", "key_usage",
    "basic_constraints", "sgx"; ``sgx_extension`` replaces the SGX extension's DER value.
    Cached: identical arguments give the identical certificate.
    """
    return _make_pck_cert(
        ca,
        bytes(ppid),
        tuple(tcb_components),
        pcesvn,
        bytes(cpusvn) if cpusvn is not None else bytes(tcb_components),
        bytes(pceid),
        bytes(fmspc),
        sgx_type,
        platform,
        tuple(omit_extensions),
        sgx_extension,
    )


@lru_cache(maxsize=4096)
def _make_pck_cert(
    ca: CertAndKey,
    ppid: bytes,
    tcb_components: tuple[int, ...],
    pcesvn: int,
    cpusvn: bytes,
    pceid: bytes,
    fmspc: bytes,
    sgx_type: int,
    platform: bool,
    omit: tuple[str, ...],
    sgx_extension: bytes | None,
) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_kind = "platform" if platform else "processor"
    extensions = {
        "aki": (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False),
        "crl_dp": (_crl_distribution_points(PCK_CRL_URL.format(ca=ca_kind)), False),
        "ski": (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
        "key_usage": (_key_usage(signing_certs=False), True),
        "basic_constraints": (x509.BasicConstraints(ca=False, path_length=None), True),
    }
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("Intel SGX PCK Certificate"))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
    )
    for name in _STANDARD_EXTENSIONS:
        if name not in omit:
            value, critical = extensions[name]
            builder = builder.add_extension(value, critical=critical)
    if "sgx" not in omit:
        extension_der = (
            sgx_extension
            if sgx_extension is not None
            else sgx_extension_der(
                ppid, tcb_components, pcesvn, cpusvn, pceid, fmspc, sgx_type, platform
            )
        )
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXTENSION_OID), extension_der),
            critical=False,
        )
    cert = builder.sign(ca.key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# ---------------------------------------------------------------------------------------------
# Signed JSON bodies (TCB info, identities)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One TCB level to put in a TCB info."""

    components: tuple[int, ...]
    pcesvn: int
    status: str = "UpToDate"
    tcb_date: str = "2024-11-13T00:00:00Z"
    advisory_ids: tuple[str, ...] = ()
    tdx_components: tuple[int, ...] | None = None


LevelLike = Union[Level, tuple[Sequence[int], int], tuple[Sequence[int], int, str]]


def _as_level(level: LevelLike) -> Level:
    if isinstance(level, Level):
        return level
    components, pcesvn, *rest = level
    return Level(tuple(components), pcesvn, *rest)


def sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> str:
    """ECDSA P-256/SHA-256 over ``data`` as PCS encodes it: raw r‖s, 128 lower-case hex."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()


def make_signed_json(
    top_key: str, inner: dict[str, Any], signer: CertAndKey | None = None
) -> bytes:
    """``{"<top_key>":<inner>,"signature":"<hex>"}``; the signature covers the exact bytes of
    the compactly serialised inner object, as in Intel's bodies."""
    inner_bytes = json.dumps(inner, separators=(",", ":")).encode()
    signature = sign_raw((signer or tcb_signing()).key, inner_bytes)
    return (
        b'{"'
        + top_key.encode()
        + b'":'
        + inner_bytes
        + b',"signature":"'
        + signature.encode()
        + b'"}'
    )


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _level_json(level: Level, version: int, tee: str) -> dict[str, Any]:
    if version == 2:
        tcb: dict[str, Any] = {
            f"sgxtcbcomp{n:02d}svn": svn for n, svn in enumerate(level.components, 1)
        }
        tcb["pcesvn"] = level.pcesvn
    else:
        tcb = {"sgxtcbcomponents": [{"svn": svn} for svn in level.components]}
        if tee == "TDX":
            tcb["tdxtcbcomponents"] = [{"svn": svn} for svn in (level.tdx_components or (0,) * 16)]
        tcb["pcesvn"] = level.pcesvn
    entry: dict[str, Any] = {"tcb": tcb, "tcbDate": level.tcb_date, "tcbStatus": level.status}
    if level.advisory_ids:
        entry["advisoryIDs"] = list(level.advisory_ids)
    return entry


def make_tcb_info(
    fmspc_hex: str,
    levels: Sequence[LevelLike],
    pce_id: str = "0000",
    version: int = 3,
    tcb_eval: int = 17,
    signer: CertAndKey | None = None,
    *,
    tee: str = "SGX",
    issue_date: dt.datetime | None = None,
    next_update: dt.datetime | None = None,
) -> bytes:
    """A PCS TCB info body ``{"tcbInfo":{...},"signature":"<128 hex>"}`` signed by ``signer``
    (default :func:`tcb_signing`).  ``version`` 2 gives the v3-API format (sgxtcbcompNNsvn),
    3 the v4 one; ``tee="TDX"`` adds a tdxModule and tdxtcbcomponents (v3 only).

    ``levels`` items are :class:`Level` or ``(components, pcesvn[, status])`` tuples, written in
    the given order.  Dates default to now (issue) and now + 30 days (next update).
    """
    issued = issue_date or dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    info: dict[str, Any] = {}
    if version >= 3:
        info["id"] = tee
    info.update(
        {
            "version": version,
            "issueDate": _iso(issued),
            "nextUpdate": _iso(next_update or issued + dt.timedelta(days=30)),
            "fmspc": fmspc_hex,
            "pceId": pce_id,
            "tcbType": 0,
            "tcbEvaluationDataNumber": tcb_eval,
        }
    )
    if tee == "TDX":
        info["tdxModule"] = {
            "mrsigner": "00" * 48,
            "attributes": "00" * 8,
            "attributesMask": "FF" * 8,
        }
    info["tcbLevels"] = [_level_json(_as_level(level), version, tee) for level in levels]
    return make_signed_json("tcbInfo", info, signer)


def make_crl(ca: CertAndKey, revoked_serials: Sequence[int] = (), *, der: bool = True) -> bytes:
    """A CRL issued by ``ca`` (DER by default, as Intel PCCS asks PCS for)."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=30))
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)


def url_encoded_chain(*pems: str) -> str:
    """Issuer-chain header value as PCS sends it (JavaScript encodeURIComponent; ends in %0A)."""
    return "".join(urllib.parse.quote(pem, safe="") for pem in pems)


# ---------------------------------------------------------------------------------------------
# One test platform and PCS's answers about it
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PckEntry:
    """One PCK cert of the platform, as a PCS ``pckcerts`` entry describes it."""

    components: tuple[int, ...]
    pcesvn: int
    pem: str

    @property
    def cpusvn_hex(self) -> str:
        return bytes(self.components).hex().upper()

    @property
    def pcesvn_hex(self) -> str:
        """Little-endian, as PCCS queries and TCBm carry it (13 → '0D00')."""
        return self.pcesvn.to_bytes(2, "little").hex().upper()

    @property
    def tcbm(self) -> str:
        return self.cpusvn_hex + self.pcesvn_hex

    @property
    def tcb_json(self) -> dict[str, int]:
        tcb = {f"sgxtcbcomp{n:02d}svn": svn for n, svn in enumerate(self.components, 1)}
        tcb["pcesvn"] = self.pcesvn
        return tcb


@dataclass(frozen=True)
class TestPlatform:
    """One SGX platform (Platform-CA type) with a TCB info and a PCK cert per TCB level."""

    __test__ = False  # not a pytest test class, despite the name

    qeid: str  # 32 upper hex
    pceid: str  # '0000'
    encrypted_ppid: str  # 768 upper hex (RSA-3072 ciphertext in real life)
    ppid: bytes  # 16 bytes, inside the certs
    fmspc: str  # 12 upper hex
    levels: tuple[Level, ...]  # as written in the TCB info, best first
    tcb_info: bytes  # signed v3 SGX TCB info body
    tcb_info_v2: bytes  # same levels in the v2 (PCS v3 API) format
    pck_certs: tuple[PckEntry, ...]  # one per level, in the same order

    @property
    def ca_type(self) -> str:
        return "platform"

    @property
    def issuer_chain(self) -> str:
        """``SGX-PCK-Certificate-Issuer-Chain``: URL-encoded Platform CA + root."""
        return url_encoded_chain(platform_ca().pem, root_ca().pem)


def _pseudo_random(label: str, n_bytes: int) -> bytes:
    """Deterministic, non-zero-looking bytes (sha256 in counter mode)."""
    out = b""
    counter = 0
    while len(out) < n_bytes:
        out += hashlib.sha256(f"{label}:{counter}".encode()).digest()
        counter += 1
    return out[:n_bytes]


def _components(*head: int) -> tuple[int, ...]:
    return tuple(head) + (0,) * (16 - len(head))


DEFAULT_LEVELS = (
    Level(_components(8, 8, 3, 3, 255, 255, 1), 13, "UpToDate"),
    Level(
        _components(7, 7, 3, 3, 255, 255, 1),
        13,
        "SWHardeningNeeded",
        "2024-03-13T00:00:00Z",
        ("INTEL-SA-00615",),
    ),
    Level(
        _components(6, 6, 2, 2, 255, 255, 1),
        11,
        "OutOfDate",
        "2023-08-09T00:00:00Z",
        ("INTEL-SA-00615", "INTEL-SA-00828"),
    ),
    Level(
        _components(5, 5, 2, 2, 255, 255, 1),
        10,
        "OutOfDate",
        "2022-11-09T00:00:00Z",
        ("INTEL-SA-00615", "INTEL-SA-00828", "INTEL-SA-00767"),
    ),
)


@cache
def default_platform() -> TestPlatform:
    """The standard test platform: FMSPC 00D0C0DE0000, 4 TCB levels, 4 PCK certs."""
    ppid = _pseudo_random("ppid", 16)
    fmspc = DEFAULT_FMSPC.hex().upper()
    pck_certs = tuple(
        PckEntry(
            level.components,
            level.pcesvn,
            make_pck_cert(
                platform_ca(), ppid, level.components, level.pcesvn, fmspc=DEFAULT_FMSPC, sgx_type=1
            ),
        )
        for level in DEFAULT_LEVELS
    )
    return TestPlatform(
        qeid=_pseudo_random("qeid", 16).hex().upper(),
        pceid="0000",
        encrypted_ppid=_pseudo_random("encrypted_ppid", 384).hex().upper(),
        ppid=ppid,
        fmspc=fmspc,
        levels=DEFAULT_LEVELS,
        tcb_info=make_tcb_info(fmspc, DEFAULT_LEVELS),
        tcb_info_v2=make_tcb_info(fmspc, DEFAULT_LEVELS, version=2),
        pck_certs=pck_certs,
    )


# A TCB below every level: PCS lists it but could not issue a cert for it.
_NOT_AVAILABLE_TCB = PckEntry(_components(4, 4, 2, 2, 255, 255, 1), 9, "Not available")


def pckcerts_response_body(platform: TestPlatform, not_available: bool = False) -> bytes:
    """PCS ``GET /sgx/certification/v4/pckcerts`` body: ``[{"tcb":..,"tcbm":..,"cert":..}]``.

    Certs are URL-encoded PEM as PCS sends them; ``not_available`` appends one entry whose
    cert is the string "Not available" (PCS does that for TCBs it cannot issue a cert for).
    """
    entries = list(platform.pck_certs) + ([_NOT_AVAILABLE_TCB] if not_available else [])
    body = [
        {
            "tcb": entry.tcb_json,
            "tcbm": entry.tcbm,
            "cert": entry.pem
            if entry.pem == "Not available"
            else urllib.parse.quote(entry.pem, safe=""),
        }
        for entry in entries
    ]
    return json.dumps(body, separators=(",", ":")).encode()


def pckcerts_response_headers(platform: TestPlatform) -> dict[str, str]:
    """The headers PCS sends with ``pckcerts`` (CA type in lower case, as PCS does)."""
    return {
        "Content-Type": "application/json",
        "SGX-PCK-Certificate-Issuer-Chain": platform.issuer_chain,
        "SGX-FMSPC": platform.fmspc,
        "SGX-PCK-Certificate-CA-Type": platform.ca_type,
    }


def pckcert_response(platform: TestPlatform, index: int) -> tuple[bytes, dict[str, str]]:
    """PCS ``GET /sgx/certification/v4/pckcert`` answer for the platform's ``index``-th cert."""
    entry = platform.pck_certs[index]
    headers = {
        "Content-Type": "application/x-pem-file",
        "SGX-PCK-Certificate-Issuer-Chain": platform.issuer_chain,
        "SGX-TCBm": entry.tcbm,
        "SGX-FMSPC": platform.fmspc,
        "SGX-PCK-Certificate-CA-Type": platform.ca_type,
    }
    return entry.pem.encode(), headers
