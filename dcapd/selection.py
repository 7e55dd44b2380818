"""PCK certificate selection, as Intel's PCCS does it (pccs-reference.md §5).

When a platform asks for its PCK certificate with a raw TCB (CPUSVN + PCESVN) that PCS has
never been asked about, Intel's PCCS picks one of the platform's cached certificates locally
with ``PCKCertSelectionLib`` (``pck_cert_select``) and the QVL parsers behind it.  Clients
compare the certificate they get with what Intel's PCCS would have given them, so this module
reproduces that choice exactly, including Intel's validation of the inputs:

* :func:`parse_tcb_info` - QVL ``TcbInfo::parse`` (v2 and v3, SGX and TDX);
* :func:`parse_pck_cert` - QVL ``PckCertificate::parse`` (standard extensions + SGX extension);
* :func:`select_pck_cert` - ``pck_cert_select``: validate every cert, sort them into buckets by
  TCB level, return the first one the raw TCB dominates.

Pure functions, no I/O.  Every failure raises a :class:`SelectionError` subclass whose
``code`` is Intel's ``pck_cert_selection_res_t`` value (PCCS maps any of them to 404/400).
"""

from __future__ import annotations

import contextvars
import functools
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, cast

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

from . import jsonlimits
from .hexstr import is_hex

if TYPE_CHECKING:
    from typing_extensions import TypeGuard

__all__ = [
    "SelectionError",
    "InvalidArgumentError",
    "InvalidCertError",
    "InvalidTcbInfoError",
    "PceIdMismatchError",
    "FmspcMismatchError",
    "PpidMismatchError",
    "PckNotFoundError",
    "Tcb",
    "PckCertInfo",
    "TcbLevel",
    "TcbInfo",
    "parse_pck_cert",
    "parse_tcb_info",
    "select_pck_cert",
    "select_from_parsed",
    "SGX_EXTENSION_OID",
]

# --------------------------------------------------------------------------------------------
# Errors.  ``code`` = Intel's pck_cert_selection_res_t, so logs can be compared with Intel's.
# --------------------------------------------------------------------------------------------


class SelectionError(Exception):
    """Base of every selection failure (Intel: any non-SUCCESS result → PCCS index −1)."""

    code: int = 5  # PCK_CERT_SELECT_UNEXPECTED

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgumentError(SelectionError):
    """Malformed query hex or an empty certificate list (Intel INVALID_ARG)."""

    code = 1


class InvalidCertError(SelectionError):
    """A certificate QVL cannot parse (INVALID_CERT); also used with code 3 (CPUSVN ≠
    components) and 4 (not X.509 v3)."""

    code = 2


class InvalidTcbInfoError(SelectionError):
    """TCB info rejected by QVL ``TcbInfo::parse`` (Intel INVALID_TCB)."""

    code = 9


class PceIdMismatchError(SelectionError):
    """Query PCE-ID differs from the TCB info's (code 10) or a certificate's (code 6)."""

    code = 10


class FmspcMismatchError(SelectionError):
    """A certificate's FMSPC differs from the TCB info's (Intel INVALID_FMSPC)."""

    code = 8


class PpidMismatchError(SelectionError):
    """The certificates do not all belong to one platform (Intel INVALID_PPID)."""

    code = 7


class PckNotFoundError(SelectionError):
    """No certificate has a TCB at or below the platform's raw TCB (Intel PCK_NOT_FOUND)."""

    code = 12


# Intel result codes that share one exception class.
_CODE_INVALID_CERT_CPUSVN = 3
_CODE_INVALID_CERT_VERSION = 4
_CODE_INVALID_PCK_PCEID = 6

# --------------------------------------------------------------------------------------------
# TCB values and the one comparison everything is built on.
# --------------------------------------------------------------------------------------------

SGX_COMPONENT_COUNT = 16
CPUSVN_LEN = 16
PPID_LEN = 16
PCEID_LEN = 2
FMSPC_LEN = 6
PLATFORM_INSTANCE_ID_LEN = 16


class Tcb(NamedTuple):
    """An SGX TCB: the 16 component SVNs plus the PCE SVN."""

    components: tuple[int, ...]
    pcesvn: int

    def ge(self, other: Tcb) -> bool:
        """Intel's ``COMP_EQUAL_OR_GREATER``: no component (nor the PCESVN) is lower.

        A TCB that is higher in one component and lower in another is *not* ≥ (Intel calls that
        COMP_UNDEFINED); so this is a partial order, not the lexicographic one of the level sort.
        """
        return self.pcesvn >= other.pcesvn and all(
            mine >= theirs for mine, theirs in zip(self.components, other.components)
        )


# --------------------------------------------------------------------------------------------
# Minimal DER reader for the SGX extension (SEQUENCE OF SEQUENCE { OID, value }).
# --------------------------------------------------------------------------------------------

_TAG_BOOLEAN = 0x01
_TAG_INTEGER = 0x02
_TAG_OCTET_STRING = 0x04
_TAG_OID = 0x06
_TAG_ENUMERATED = 0x0A
_TAG_SEQUENCE = 0x30


class _Der(NamedTuple):
    tag: int
    value: bytes


def _der_read(data: bytes, pos: int) -> tuple[_Der, int]:
    """Read one TLV at ``pos``; return it and the offset just after it."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags are not used in the SGX extension")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n_bytes = length & 0x7F
        if n_bytes == 0 or n_bytes > 4:
            raise ValueError("indefinite or oversized DER length")
        if pos + n_bytes > len(data):
            raise ValueError("truncated DER length")
        length = int.from_bytes(data[pos : pos + n_bytes], "big")
        pos += n_bytes
    end = pos + length
    if end > len(data):
        raise ValueError("DER value runs past its container")
    return _Der(tag, data[pos:end]), end


def _der_sequence_items(node: _Der) -> list[_Der]:
    """The elements of a SEQUENCE (raises if ``node`` is not one)."""
    if node.tag != _TAG_SEQUENCE:
        raise ValueError(f"expected SEQUENCE, got tag 0x{node.tag:02x}")
    items, pos = [], 0
    while pos < len(node.value):
        item, pos = _der_read(node.value, pos)
        items.append(item)
    return items


def _der_oid(node: _Der) -> str:
    if node.tag != _TAG_OID or not node.value:
        raise ValueError("expected OBJECT IDENTIFIER")
    return _oid_text(node.value)


@lru_cache(maxsize=256)  # a PCK cert has ~30 OIDs, the same in every cert
def _oid_text(encoded: bytes) -> str:
    arcs: list[int] = []
    value = 0
    for byte in encoded:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if encoded[-1] & 0x80:
        raise ValueError("truncated OID arc")
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(arc) for arc in head + arcs[1:])


def _der_int(node: _Der, tag: int = _TAG_INTEGER) -> int:
    if node.tag != tag or not node.value:
        raise ValueError(f"expected tag 0x{tag:02x} with content")
    return int.from_bytes(node.value, "big", signed=True)


def _der_octets(node: _Der, length: int) -> bytes:
    # QVL validateOid(..., V_ASN1_OCTET_STRING, expectedLength): type and exact length.
    if node.tag != _TAG_OCTET_STRING or len(node.value) != length:
        raise ValueError(f"expected OCTET STRING of {length} bytes")
    return node.value


def _der_bool(node: _Der) -> bool:
    if node.tag != _TAG_BOOLEAN or len(node.value) != 1:
        raise ValueError("expected BOOLEAN")
    return node.value != b"\x00"


def _oid_value_pairs(node: _Der) -> Iterator[tuple[str, _Der]]:
    """Iterate a SEQUENCE OF SEQUENCE { OID, value }; QVL wants exactly 2 items per tuple."""
    for pair in _der_sequence_items(node):
        items = _der_sequence_items(pair)
        if len(items) != 2:
            raise ValueError("SGX extension tuple must have exactly 2 elements")
        yield _der_oid(items[0]), items[1]


# --------------------------------------------------------------------------------------------
# PCK certificate parsing (QVL PckCertificate::parse).
# --------------------------------------------------------------------------------------------

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_OID_PPID = SGX_EXTENSION_OID + ".1"
_OID_TCB = SGX_EXTENSION_OID + ".2"
_OID_PCESVN = _OID_TCB + ".17"
_OID_CPUSVN = _OID_TCB + ".18"
_OID_PCEID = SGX_EXTENSION_OID + ".3"
_OID_FMSPC = SGX_EXTENSION_OID + ".4"
_OID_SGX_TYPE = SGX_EXTENSION_OID + ".5"
_OID_PLATFORM_INSTANCE_ID = SGX_EXTENSION_OID + ".6"
_OID_CONFIGURATION = SGX_EXTENSION_OID + ".7"
_COMPONENT_OIDS = {f"{_OID_TCB}.{n}": n - 1 for n in range(1, SGX_COMPONENT_COUNT + 1)}
_CONFIGURATION_NAMES = {
    _OID_CONFIGURATION + ".1": "dynamicPlatform",
    _OID_CONFIGURATION + ".2": "cachedKeys",
    _OID_CONFIGURATION + ".3": "SMTEnabled",
}

# QVL: 5 entries for Processor-CA certs, 7 (+ instance id, configuration) for Platform-CA certs.
_SGX_EXTENSION_ENTRY_COUNTS = (5, 7)
# QVL: the TCB sequence has 16 component SVNs + PCESVN + CPUSVN.
_TCB_ENTRY_COUNT = SGX_COMPONENT_COUNT + 2
_REQUIRED_X509_EXTENSIONS = {
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER: "Authority Key Identifier",
    ExtensionOID.CRL_DISTRIBUTION_POINTS: "CRL Distribution Points",
    ExtensionOID.SUBJECT_KEY_IDENTIFIER: "Subject Key Identifier",
    ExtensionOID.KEY_USAGE: "Key Usage",
    ExtensionOID.BASIC_CONSTRAINTS: "Basic Constraints",
}


@dataclass(frozen=True)
class PckCertInfo:
    """What a PCK certificate says about its platform (SGX extension + issuer CA type).

    ``tcb_components``/``pcesvn`` are what selection compares; ``cpusvn`` is the raw CPUSVN
    the cert was issued for (equal to the components for TCB type 0).
    """

    ppid: bytes
    tcb_components: tuple[int, ...]
    pcesvn: int
    cpusvn: bytes
    pceid: bytes
    fmspc: bytes
    sgx_type: int
    platform_instance_id: bytes | None
    configuration: dict[str, bool] | None
    ca_type: str

    @property
    def tcb(self) -> Tcb:
        return Tcb(self.tcb_components, self.pcesvn)

    @property
    def fmspc_hex(self) -> str:
        """Upper-case, as PCS headers and PCCS URLs carry it (the cert itself is binary)."""
        return self.fmspc.hex().upper()

    @property
    def cpusvn_hex(self) -> str:
        return self.cpusvn.hex().upper()

    @property
    def pceid_hex(self) -> str:
        """PCE-ID as stored in the cert (big-endian bytes); equals the LE query form for 0000."""
        return self.pceid.hex().upper()

    @property
    def pcesvn_hex(self) -> str:
        """PCESVN the way PCCS queries and TCBm carry it: 2 bytes little-endian, upper hex."""
        return self.pcesvn.to_bytes(2, "little").hex().upper()

    @property
    def tcbm(self) -> str:
        """TCBm = CPUSVN ‖ PCESVN (LE) in upper hex, 36 chars, as PCS's ``SGX-TCBm`` header."""
        return self.cpusvn_hex + self.pcesvn_hex


_NOT_AVAILABLE = "Not available"


# Inside ``parse_memo()``: parse results by input, so a bulk import (an upload of thousands of
# platforms selecting for each) parses every distinct certificate and TCB info once.
_memo: contextvars.ContextVar[dict[tuple[str, str | bytes], Any] | None] = contextvars.ContextVar(
    "selection_parse_memo", default=None
)


@contextmanager
def parse_memo() -> Iterator[None]:
    """Within the block (this thread or task), :func:`parse_pck_cert` and
    :func:`parse_tcb_info` remember what they parsed successfully, by input."""
    token = _memo.set({})
    try:
        yield
    finally:
        _memo.reset(token)


def parse_pck_cert(pem: str | bytes) -> PckCertInfo:
    """:func:`parse_pck_cert_uncached`, remembered inside :func:`parse_memo`, and else in a
    small bounded memo of recent certificates: a platform's few PCK certificates are selected
    from again for every raw TCB it is asked about (the result is immutable)."""
    memo = _memo.get()
    if not isinstance(pem, (str, bytes)):
        return parse_pck_cert_uncached(pem)
    if memo is None:
        return _recent_pck_certs(pem)
    found = memo.get(("pck", pem))
    if found is None:
        found = memo[("pck", pem)] = parse_pck_cert_uncached(pem)
    return cast(PckCertInfo, found)


def parse_pck_cert_uncached(pem: str | bytes) -> PckCertInfo:
    """Parse a PEM PCK certificate the way QVL does before selection uses it.

    Requires what ``PckCertificate::parse`` requires: the five standard extensions, the SGX
    extension with 5 or 7 entries holding PPID, TCB (18 entries), PCE-ID, FMSPC and SGX type,
    and an X.509 v3 cert.  Platform instance ID / configuration are returned when present and
    well formed but, as in QVL's generic parser, never required.  Raises InvalidCertError.
    """
    cert = _load_certificate(pem)
    _require_standard_extensions(cert)
    sgx_extension = _sgx_extension_value(cert)
    try:
        fields = _parse_sgx_extension(sgx_extension)
    except ValueError as exc:
        raise InvalidCertError(f"invalid SGX extension: {exc}") from None
    # Intel checks the version after parsing (INVALID_CERT_VERSION); a v1/v2 cert cannot carry
    # extensions, so in practice the checks above already reject it.
    if cert.version != x509.Version.v3:
        raise InvalidCertError("PCK certificate is not X.509 v3", code=_CODE_INVALID_CERT_VERSION)
    return PckCertInfo(ca_type=_ca_type(cert), **fields)


def _load_certificate(pem: str | bytes) -> x509.Certificate:
    if pem is None:
        raise InvalidArgumentError("certificate is None")
    text = pem.decode("latin-1") if isinstance(pem, (bytes, bytearray)) else str(pem)
    if text.strip() == _NOT_AVAILABLE:
        # PCS lists certs it cannot issue as the string "Not available"; PEM parsing fails.
        raise InvalidCertError('certificate is "Not available"')
    try:
        cert = x509.load_pem_x509_certificate(text.encode("latin-1"))
        _ = cert.version  # raises InvalidVersion for version numbers X.509 does not define
        return cert
    except (ValueError, TypeError, x509.InvalidVersion) as exc:
        raise InvalidCertError(f"not a PEM X.509 certificate: {exc}") from None


def _require_standard_extensions(cert: x509.Certificate) -> None:
    try:
        present = {ext.oid for ext in cert.extensions}
    except (ValueError, x509.DuplicateExtension) as exc:
        raise InvalidCertError(f"malformed certificate extensions: {exc}") from None
    missing = [name for oid, name in _REQUIRED_X509_EXTENSIONS.items() if oid not in present]
    if missing:
        raise InvalidCertError("required certificate extensions missing: " + ", ".join(missing))


def _sgx_extension_value(cert: x509.Certificate) -> bytes:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID))
    except x509.ExtensionNotFound:
        raise InvalidCertError("certificate has no SGX extension (not a PCK cert?)") from None
    # UnrecognizedExtension: the raw DER of the extension value
    return cast(x509.UnrecognizedExtension, ext.value).value


def _parse_sgx_extension(der: bytes) -> dict[str, Any]:
    top, end = _der_read(der, 0)
    if end != len(der):
        raise ValueError("trailing bytes after the SGX extension")
    entries = _der_sequence_items(top)
    if len(entries) not in _SGX_EXTENSION_ENTRY_COUNTS:
        raise ValueError(f"{len(entries)} entries, QVL expects 5 (Processor CA) or 7 (Platform CA)")

    fields: dict[str, Any] = {"platform_instance_id": None, "configuration": None}
    for oid, value in _oid_value_pairs(top):
        if oid == _OID_PPID:
            fields["ppid"] = _der_octets(value, PPID_LEN)
        elif oid == _OID_TCB:
            fields["tcb_components"], fields["pcesvn"], fields["cpusvn"] = _parse_tcb_sequence(
                value
            )
        elif oid == _OID_PCEID:
            fields["pceid"] = _der_octets(value, PCEID_LEN)
        elif oid == _OID_FMSPC:
            fields["fmspc"] = _der_octets(value, FMSPC_LEN)
        elif oid == _OID_SGX_TYPE:
            fields["sgx_type"] = _der_int(value, _TAG_ENUMERATED)
        elif oid == _OID_PLATFORM_INSTANCE_ID:
            fields["platform_instance_id"] = _optional(_der_octets, value, PLATFORM_INSTANCE_ID_LEN)
        elif oid == _OID_CONFIGURATION:
            fields["configuration"] = _optional(_parse_configuration, value)
        # QVL ignores unknown OIDs (they still count towards the 5/7 entries).

    missing = {"ppid", "tcb_components", "pceid", "fmspc", "sgx_type"} - fields.keys()
    if missing:
        raise ValueError("required SGX extension fields missing: " + ", ".join(sorted(missing)))
    return fields


def _optional(parse: Callable[..., Any], *args: Any) -> Any:
    """Platform-only fields: QVL's generic PCK parser never looks at them, so a malformed one
    must not make selection fail; we just report it as absent."""
    try:
        return parse(*args)
    except ValueError:
        return None


def _parse_tcb_sequence(node: _Der) -> tuple[tuple[int, ...], int, bytes]:
    if len(_der_sequence_items(node)) != _TCB_ENTRY_COUNT:
        raise ValueError(f"TCB sequence must have {_TCB_ENTRY_COUNT} entries")
    components: list[int | None] = [None] * SGX_COMPONENT_COUNT
    pcesvn: int | None = None
    cpusvn: bytes | None = None
    for oid, value in _oid_value_pairs(node):
        if oid in _COMPONENT_OIDS:
            # QVL truncates to uint8; real certs never exceed it, so reject instead.
            components[_COMPONENT_OIDS[oid]] = _bounded(_der_int(value), 0xFF, oid)
        elif oid == _OID_PCESVN:
            pcesvn = _bounded(_der_int(value), 0xFFFF, oid)
        elif oid == _OID_CPUSVN:
            cpusvn = _der_octets(value, CPUSVN_LEN)
    if None in components or pcesvn is None or cpusvn is None:
        raise ValueError("TCB sequence lacks a component SVN, PCESVN or CPUSVN")
    return tuple(components), pcesvn, cpusvn  # type: ignore[arg-type]


def _bounded(value: int, maximum: int, what: str) -> int:
    if not 0 <= value <= maximum:
        raise ValueError(f"{what} = {value} out of range 0..{maximum}")
    return value


def _parse_configuration(node: _Der) -> dict[str, bool]:
    flags = {}
    for oid, value in _oid_value_pairs(node):
        if oid in _CONFIGURATION_NAMES:
            flags[_CONFIGURATION_NAMES[oid]] = _der_bool(value)
    return flags


def _ca_type(cert: x509.Certificate) -> str:
    """Intel PCCS: 'PLATFORM' if the issuer CN contains "Platform", 'PROCESSOR' if "Processor"."""
    common_names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer_cn = str(common_names[0].value) if common_names else ""
    if "Platform" in issuer_cn:
        return "PLATFORM"
    if "Processor" in issuer_cn:
        return "PROCESSOR"
    return ""


# --------------------------------------------------------------------------------------------
# TCB info parsing (QVL TcbInfo::parse).
# --------------------------------------------------------------------------------------------

_VALID_TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "OutOfDate",
        "ConfigurationNeeded",
        "Revoked",
        "OutOfDateConfigurationNeeded",
        "SWHardeningNeeded",
        "ConfigurationAndSWHardeningNeeded",
    }
)
_SIGNATURE_HEX_LEN = 128  # raw ECDSA P-256 r‖s, hex
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_UINT32_MAX = 0xFFFFFFFF
_INT32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class TcbLevel:
    """One ``tcbLevels`` entry; ``tdx_components`` only for TDX v3 infos."""

    sgx_components: tuple[int, ...]
    pcesvn: int
    status: str
    tcb_date: datetime
    advisory_ids: tuple[str, ...] = ()
    tdx_components: tuple[int, ...] | None = None

    @property
    def tcb(self) -> Tcb:
        return Tcb(self.sgx_components, self.pcesvn)

    def sort_key(self) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
        """QVL's TcbLevel order: SGX components (lexicographic), PCESVN, then TDX components."""
        return self.sgx_components, self.pcesvn, self.tdx_components or ()


@dataclass(frozen=True)
class TcbInfo:
    """A validated TCB info; ``levels`` are in QVL's order (descending), not the JSON order."""

    version: int
    id: str
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    levels: tuple[TcbLevel, ...]

    @property
    def fmspc_hex(self) -> str:
        return self.fmspc.hex().upper()


def parse_tcb_info(tcb_info_json: str | bytes) -> TcbInfo:
    """:func:`parse_tcb_info_uncached`, remembered inside :func:`parse_memo`."""
    memo = _memo.get()
    if memo is None or not isinstance(tcb_info_json, (str, bytes)):
        return parse_tcb_info_uncached(tcb_info_json)
    found = memo.get(("tcb", tcb_info_json))
    if found is None:
        found = memo[("tcb", tcb_info_json)] = parse_tcb_info_uncached(tcb_info_json)
    return cast(TcbInfo, found)


def parse_tcb_info_uncached(tcb_info_json: str | bytes) -> TcbInfo:
    """Validate a PCS TCB info body (``{"tcbInfo": {...}, "signature": "..."}``) like QVL.

    Accepts v2 and v3 (ids SGX and TDX); the signature is only checked for shape, never
    verified (selection trusts what PCCS stored).  Raises InvalidTcbInfoError.
    """
    root = _load_json_object(tcb_info_json)
    info = root.get("tcbInfo")
    if not isinstance(info, dict):
        raise InvalidTcbInfoError("missing or non-object [tcbInfo]")
    if "signature" not in root:
        raise InvalidTcbInfoError("missing [signature]")

    version = _uint_field(info, "version")
    if version not in (2, 3):
        raise InvalidTcbInfoError(f"unsupported TCB info version {version} (QVL: 2 or 3)")
    tcb_id = _tcb_info_id(info, version)
    issue_date = _date_field(info, "issueDate")
    next_update = _date_field(info, "nextUpdate")
    fmspc = _hex_field(info, "fmspc", FMSPC_LEN)
    pce_id = _hex_field(info, "pceId", PCEID_LEN)

    signature = root["signature"]
    if not isinstance(signature, str) or len(signature) != _SIGNATURE_HEX_LEN:
        raise InvalidTcbInfoError(f"[signature] must be a string of {_SIGNATURE_HEX_LEN} hex chars")
    if "tcbLevels" not in info:
        raise InvalidTcbInfoError("missing [tcbLevels]")

    tcb_type = _int_field(info, "tcbType")
    evaluation_number = _uint_field(info, "tcbEvaluationDataNumber")
    if version == 3:
        _check_tdx_module(info, tcb_id)
    if tcb_type != 0:
        # Only TCB type 0 (CPUSVN byte i = component i) exists; Intel rejects the rest here.
        raise InvalidTcbInfoError(f"unsupported tcbType {tcb_type}")

    levels = _parse_levels(info["tcbLevels"], version, tcb_id)
    return TcbInfo(
        version=version,
        id=tcb_id,
        issue_date=issue_date,
        next_update=next_update,
        fmspc=fmspc,
        pce_id=pce_id,
        tcb_type=tcb_type,
        tcb_evaluation_data_number=evaluation_number,
        levels=levels,
    )


def _load_json_object(text: str | bytes) -> dict[str, Any]:
    if text is None:
        raise InvalidArgumentError("TCB info is None")
    try:
        root = jsonlimits.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:  # JsonTooDeep included
        raise InvalidTcbInfoError(f"TCB info is not JSON: {exc}") from None
    if not isinstance(root, dict):
        raise InvalidTcbInfoError("TCB info JSON is not an object")
    return root


def _is_uint(value: Any) -> TypeGuard[int]:
    # rapidjson IsUint(): an integer literal (not bool, not 1.0) that fits in uint32.
    return type(value) is int and 0 <= value <= _UINT32_MAX


def _uint_field(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if not _is_uint(value):
        raise InvalidTcbInfoError(f"[{name}] missing or not an unsigned integer")
    return value


def _int_field(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if type(value) is not int or not _INT32[0] <= value <= _INT32[1]:
        raise InvalidTcbInfoError(f"[{name}] missing or not an integer")
    return value


def _date_field(obj: dict[str, Any], name: str) -> datetime:
    value = obj.get(name)
    if not isinstance(value, str) or not _ISO_DATE.fullmatch(value):
        raise InvalidTcbInfoError(f"[{name}] missing or not a YYYY-MM-DDThh:mm:ssZ date")
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise InvalidTcbInfoError(f"[{name}] is not a valid date: {value}") from None


def _hex_field(obj: dict[str, Any], name: str, n_bytes: int) -> bytes:
    value = obj.get(name)
    if not is_hex(value, (2 * n_bytes,)):
        raise InvalidTcbInfoError(f"[{name}] missing or not {2 * n_bytes} hex chars")
    return bytes.fromhex(value)


def _tcb_info_id(info: dict[str, Any], version: int) -> str:
    if version == 2:
        return "SGX"  # v2 has no id; it is always SGX
    tcb_id = info.get("id")
    if tcb_id not in ("SGX", "TDX"):
        raise InvalidTcbInfoError(f"[id] must be SGX or TDX, got {tcb_id!r}")
    return cast(str, tcb_id)


def _check_tdx_module(info: dict[str, Any], tcb_id: str) -> None:
    if tcb_id == "SGX":
        if "tdxModule" in info or "tdxModuleIdentities" in info:
            raise InvalidTcbInfoError("SGX TCB info must not carry tdxModule/tdxModuleIdentities")
        return
    module = info.get("tdxModule")
    if not isinstance(module, dict):
        raise InvalidTcbInfoError("TDX TCB info needs a [tdxModule] object")
    _hex_field(module, "mrsigner", 48)
    _hex_field(module, "attributes", 8)
    _hex_field(module, "attributesMask", 8)


def _parse_levels(raw_levels: Any, version: int, tcb_id: str) -> tuple[TcbLevel, ...]:
    if not isinstance(raw_levels, list) or not raw_levels:
        raise InvalidTcbInfoError("[tcbLevels] must be a non-empty array")
    levels = [_parse_level(raw, version, tcb_id) for raw in raw_levels]
    # QVL stores levels in a std::set ordered by TcbLevel::operator>; equal keys collide.
    keys = [level.sort_key() for level in levels]
    if len(set(keys)) != len(keys):
        raise InvalidTcbInfoError("duplicated TCB levels")
    return tuple(sorted(levels, key=TcbLevel.sort_key, reverse=True))


def _parse_level(raw: Any, version: int, tcb_id: str) -> TcbLevel:
    if not isinstance(raw, dict):
        raise InvalidTcbInfoError("a TCB level is not an object")
    tcb_date = _date_field(raw, "tcbDate")
    advisory_ids = _advisory_ids(raw)
    status = raw.get("tcbStatus")
    if not isinstance(status, str) or status not in _VALID_TCB_STATUSES:
        raise InvalidTcbInfoError(f"invalid [tcbStatus] {status!r}")
    tcb = raw.get("tcb")
    if not isinstance(tcb, dict):
        raise InvalidTcbInfoError("TCB level needs a [tcb] object")
    pcesvn = _uint_field(tcb, "pcesvn")
    if version == 2:
        sgx_components = tuple(_svn(tcb.get(f"sgxtcbcomp{n:02d}svn")) for n in range(1, 17))
        tdx_components = None
    else:
        sgx_components = _component_array(tcb, "sgxtcbcomponents")
        tdx_components = _component_array(tcb, "tdxtcbcomponents") if tcb_id == "TDX" else None
    return TcbLevel(
        sgx_components=sgx_components,
        pcesvn=pcesvn,
        status=status,
        tcb_date=tcb_date,
        advisory_ids=advisory_ids,
        tdx_components=tdx_components,
    )


def _advisory_ids(raw: dict[str, Any]) -> tuple[str, ...]:
    if "advisoryIDs" not in raw:
        return ()  # optional
    ids = raw["advisoryIDs"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise InvalidTcbInfoError("[advisoryIDs] must be an array of strings")
    return tuple(ids)


def _component_array(tcb: dict[str, Any], name: str) -> tuple[int, ...]:
    components = tcb.get(name)
    if not isinstance(components, list) or len(components) != SGX_COMPONENT_COUNT:
        raise InvalidTcbInfoError(f"[{name}] must be an array of {SGX_COMPONENT_COUNT} objects")
    svns = []
    for component in components:
        if not isinstance(component, dict):
            raise InvalidTcbInfoError(f"[{name}] entries must be objects")
        for optional_text in ("category", "type"):
            if optional_text in component and not isinstance(component[optional_text], str):
                raise InvalidTcbInfoError(f"[{name}].{optional_text} must be a string")
        svns.append(_svn(component.get("svn")))
    return tuple(svns)


def _svn(value: Any) -> int:
    # QVL reads a uint32 and truncates it to uint8; no real TCB info exceeds 255, so reject.
    if not _is_uint(value) or value > 0xFF:
        raise InvalidTcbInfoError(f"component SVN {value!r} is not an integer 0..255")
    return value


# --------------------------------------------------------------------------------------------
# Selection (PCKCertSelectionLib PCKSorter).
# --------------------------------------------------------------------------------------------


def select_pck_cert(
    cpusvn: str,
    pcesvn: str,
    pceid: str,
    tcb_info_json: str | bytes,
    pem_certs: Sequence[str | bytes],
) -> int:
    """Return the index in ``pem_certs`` of the cert Intel's PCCS would serve for this raw TCB.

    Arguments are exactly what PCCS has: the query's hex ``cpusvn`` (32 hex), ``pcesvn`` and
    ``pceid`` (4 hex each, little-endian), the SGX TCB info body used for selection, and every
    cached PEM cert of the platform in DB/PCS order.
    """
    raw_tcb, query_pce_id = _parse_query(cpusvn, pcesvn, pceid)
    if pem_certs is None or len(pem_certs) == 0:
        raise InvalidArgumentError("no certificates to select from")
    tcb_info = parse_tcb_info(tcb_info_json)
    _check_tcb_info_pce_id(tcb_info, query_pce_id)
    certs: list[PckCertInfo] = []
    for index, pem in enumerate(pem_certs):
        # Intel validates cert by cert, so the first failing cert decides the error.
        cert = _parse_candidate(pem)
        _check_cert_belongs(index, cert, query_pce_id, tcb_info.fmspc, certs[0] if certs else cert)
        certs.append(cert)
    return _first_dominated_cert(raw_tcb, tcb_info.levels, certs)


def select_from_parsed(
    raw_tcb: Tcb, pce_id: int, tcb_info: TcbInfo, certs: Sequence[PckCertInfo]
) -> int:
    """Selection on already parsed inputs (§5.2 steps 2-7), for callers that cache parses.

    ``pce_id`` is the query PCE-ID as an integer (already decoded from little-endian hex).
    """
    if not certs:
        raise InvalidArgumentError("no certificates to select from")
    _check_tcb_info_pce_id(tcb_info, pce_id)
    for index, cert in enumerate(certs):
        if tuple(cert.cpusvn) != cert.tcb_components:
            raise InvalidCertError(
                f"cert {index}: CPUSVN does not match its TCB components",
                code=_CODE_INVALID_CERT_CPUSVN,
            )
        _check_cert_belongs(index, cert, pce_id, tcb_info.fmspc, certs[0])
    return _first_dominated_cert(raw_tcb, tcb_info.levels, certs)


def _parse_query(cpusvn: str, pcesvn: str, pceid: str) -> tuple[Tcb, int]:
    raw_cpusvn = _query_hex(cpusvn, CPUSVN_LEN, "cpusvn")
    # Intel: PCESVN and PCE-ID in the query are little-endian ('0D00' = 13).
    raw_pcesvn = int.from_bytes(_query_hex(pcesvn, 2, "pcesvn"), "little")
    pce_id = int.from_bytes(_query_hex(pceid, PCEID_LEN, "pceid"), "little")
    # TCB type 0: the raw CPUSVN bytes *are* the 16 component SVNs.
    return Tcb(tuple(raw_cpusvn), raw_pcesvn), pce_id


def _query_hex(value: Any, n_bytes: int, name: str) -> bytes:
    if not is_hex(value, (2 * n_bytes,)):
        raise InvalidArgumentError(f"{name} must be {2 * n_bytes} hex chars, got {value!r}")
    return bytes.fromhex(value)


def _check_tcb_info_pce_id(tcb_info: TcbInfo, pce_id: int) -> None:
    # Intel: the TCB info pceId is read big-endian, the query little-endian (both 0 in practice).
    if int.from_bytes(tcb_info.pce_id, "big") != pce_id:
        raise PceIdMismatchError(
            f"TCB info pceId {tcb_info.pce_id.hex()} does not match query PCE-ID {pce_id:#06x}"
        )


def _parse_candidate(pem: str | bytes) -> PckCertInfo:
    if pem is None:
        raise InvalidArgumentError("certificate entry is None")
    cert = parse_pck_cert(pem)
    # Intel's shared-library build (the one PCCS loads) also checks that the cert's CPUSVN
    # decomposes (TCB type 0: byte for byte) into its 16 component SVNs.
    if tuple(cert.cpusvn) != cert.tcb_components:
        raise InvalidCertError(
            "PCK cert CPUSVN does not match its TCB components", code=_CODE_INVALID_CERT_CPUSVN
        )
    return cert


def _check_cert_belongs(
    index: int, cert: PckCertInfo, pce_id: int, fmspc: bytes, first_cert: PckCertInfo
) -> None:
    """The cert must be for this PCE, this FMSPC and the same platform (PPID) as cert 0."""
    # Intel: the cert's PCE-ID bytes are read big-endian.
    if int.from_bytes(cert.pceid, "big") != pce_id:
        raise PceIdMismatchError(
            f"cert {index}: PCE-ID {cert.pceid_hex} does not match the query",
            code=_CODE_INVALID_PCK_PCEID,
        )
    if cert.fmspc != fmspc:
        raise FmspcMismatchError(
            f"cert {index}: FMSPC {cert.fmspc_hex} differs from the TCB info's "
            f"{fmspc.hex().upper()}"
        )
    if cert.ppid != first_cert.ppid:
        raise PpidMismatchError(f"cert {index}: PPID differs from cert 0's")


def _first_dominated_cert(
    raw_tcb: Tcb, levels: Sequence[TcbLevel], certs: Sequence[PckCertInfo]
) -> int:
    """Walk the buckets best-first; return the first cert the raw TCB is ≥ (Intel find_best_pck)."""
    for bucket in _sort_into_buckets(levels, [cert.tcb for cert in certs]):
        for index in bucket:
            if raw_tcb.ge(certs[index].tcb):
                return index
    raise PckNotFoundError("no certificate has a TCB at or below the platform's raw TCB")


def _sort_into_buckets(levels: Sequence[TcbLevel], cert_tcbs: Sequence[Tcb]) -> list[list[int]]:
    """Intel PCKSorter::sort_to_buckets: one bucket per level (in QVL order) + 'below all'.

    A cert goes to the first level it is ≥; inside a bucket it is inserted before the first
    member it is ≥, else appended.  Incomparable certs therefore keep input order.
    """
    buckets: list[list[int]] = [[] for _ in range(len(levels) + 1)]
    for index, tcb in enumerate(cert_tcbs):
        bucket_index = next((i for i, level in enumerate(levels) if tcb.ge(level.tcb)), len(levels))
        bucket = buckets[bucket_index]
        position = next(
            (pos for pos, other in enumerate(bucket) if tcb.ge(cert_tcbs[other])), len(bucket)
        )
        bucket.insert(position, index)
    return buckets


# Recently parsed PCK certificates (see parse_pck_cert): bounded, a pure function's results.
_recent_pck_certs = functools.lru_cache(maxsize=1024)(parse_pck_cert_uncached)
