"""Check that collateral is what Intel signed, before it enters the cache.

Pure functions: no network, no file I/O, no clock other than "now" when the caller gives no
``at``.  Everything that fails raises :class:`IntegrityError` with a one-line message saying
exactly what failed; callers map it to HTTP 460 / an upstream error.

What is checked
===============

* **Issuer chains** (``*-Issuer-Chain`` headers): URL-encoded PEM, leaf first, root last.  Each
  certificate must be signed by the next one; every issuer must be a CA (BasicConstraints
  ``CA:TRUE``, path length respected, ``keyCertSign`` if KeyUsage is present); the last
  certificate must be byte-identical (DER) to a trusted root or be directly issued by one.
  Certificate *validity dates* are not a reason to reject (an offline site serves what it
  has); an expired / not-yet-valid certificate is logged once per process at WARNING.
* **Signed JSON** (TCB info, enclave identities, TCB evaluation data numbers): the body is
  ``{"<top_key>": {...}, "signature": "<128 hex>"}``; the ECDSA P-256/SHA-256 signature (raw
  r||s) covers the *exact bytes* of the inner object as they appear in the body, which we cut
  out with a small raw-JSON scanner (never re-serialised).  As in Intel's QVL, the signing
  certificate must be directly issued by the root (chain of exactly two), so a PCK leaf (issued
  by an intermediate CA) can never pass as a TCB signer.
* **CRLs** (DER): parse, issuer name matches the signing certificate, signature verifies,
  signer is a CRL-signing CA chained to a trusted root (for the Root CA CRL: a trusted root).
* **PCK certificates**: the leaf is signed by the first certificate of the chain header, the
  whole path chains to a trusted root.

Nothing here looks at ``nextUpdate`` / freshness; that is a caching policy, not integrity.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import threading
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn, Union, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from . import jsonlimits

__all__ = [
    "IntegrityError",
    "load_trusted_roots",
    "parse_issuer_chain",
    "verify_chain",
    "verify_signed_json",
    "verify_crl",
    "verify_pck_cert",
    "describe_validity",
    "raw_json_value_span",
    "extract_raw_json_value",
    "tcb_info_mismatch",
]

log = logging.getLogger("dcapd.integrity")

ChainLike = Union[str, Sequence[x509.Certificate]]

# Upper bound for an issuer-chain header (Intel's are ~2-3 KiB URL-encoded).
MAX_CHAIN_HEADER = 64 * 1024
# Upper bound for a signed JSON body (largest Intel TCB info today is ~20 KiB).
MAX_SIGNED_JSON = 4 * 1024 * 1024


class IntegrityError(Exception):
    """Collateral or a certificate chain is not what Intel signed; the message says what failed."""

    def __init__(self, message: str):
        # One line, always: messages may embed subjects or header fragments.
        super().__init__(" ".join(str(message).split()))


# ---------------------------------------------------------------------------------------------
# Certificates and chains
# ---------------------------------------------------------------------------------------------

_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")
_PEM_ONLY = re.compile(
    r"\s*(?:-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----\s*)+"
)


def _name(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except Exception:  # pragma: no cover - undecodable names
        return "<unprintable subject>"


def _load_pem_certs(text: str, what: str) -> list[x509.Certificate]:
    """Every PEM certificate in ``text``, which must hold nothing else but whitespace."""
    if not _PEM_ONLY.fullmatch(text):
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise IntegrityError(f"{what}: no PEM certificate found")
        raise IntegrityError(f"{what}: not a sequence of PEM certificates (stray or broken text)")
    certs = []
    for i, block in enumerate(_PEM_CERT.findall(text)):
        try:
            certs.append(x509.load_pem_x509_certificate(block.encode("ascii")))
        except ValueError as exc:
            raise IntegrityError(f"{what}: certificate #{i} does not parse: {exc}") from None
    return certs


def load_trusted_roots(pem_bytes: bytes) -> list[x509.Certificate]:
    """The trust anchors in a PEM file's content (one or more certificates, nothing else)."""
    if isinstance(pem_bytes, str):
        pem_bytes = pem_bytes.encode("ascii", "replace")
    try:
        text = bytes(pem_bytes).decode("ascii")
    except UnicodeDecodeError:
        raise IntegrityError("trusted roots: not ASCII PEM text") from None
    return _load_pem_certs(text, "trusted roots")


def parse_issuer_chain(header_value: str) -> list[x509.Certificate]:
    """Decode an ``*-Issuer-Chain`` header: URL-encoded PEM, two or more certs, root last."""
    if isinstance(header_value, (bytes, bytearray)):
        try:
            header_value = bytes(header_value).decode("ascii")
        except UnicodeDecodeError:
            raise IntegrityError("issuer chain header: not ASCII") from None
    if not isinstance(header_value, str):
        raise IntegrityError(
            f"issuer chain header: expected text, got {type(header_value).__name__}"
        )
    if len(header_value) > MAX_CHAIN_HEADER:
        raise IntegrityError(
            f"issuer chain header: {len(header_value)} characters, more than {MAX_CHAIN_HEADER}"
        )
    try:
        text = urllib.parse.unquote(header_value, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise IntegrityError("issuer chain header: URL-decoding yields invalid UTF-8") from None
    certs = _load_pem_certs(text, "issuer chain header")
    if len(certs) < 2:
        raise IntegrityError(
            f"issuer chain header: {len(certs)} certificate, need at least 2 (signer and root)"
        )
    return certs


def _as_chain(chain_header: ChainLike) -> list[x509.Certificate]:
    if isinstance(chain_header, (str, bytes, bytearray)):
        return parse_issuer_chain(chain_header)
    chain = list(chain_header)
    if not chain or not all(isinstance(c, x509.Certificate) for c in chain):
        raise IntegrityError("issuer chain: expected a header string or a list of certificates")
    return chain


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        raise IntegrityError(f"certificate '{_name(cert)}': malformed extensions: {exc}") from None


def _check_issuer(issuer: x509.Certificate, intermediates_below: int, what: str) -> None:
    """``issuer`` may issue certificates, with ``intermediates_below`` CA certs under it."""
    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise IntegrityError(
            f"{what}: issuer '{_name(issuer)}' is not a CA (no BasicConstraints)"
        ) from None
    except ValueError as exc:
        raise IntegrityError(
            f"{what}: issuer '{_name(issuer)}': malformed extensions: {exc}"
        ) from None
    if not bc.ca:
        raise IntegrityError(f"{what}: issuer '{_name(issuer)}' is not a CA (CA:FALSE)")
    if bc.path_length is not None and intermediates_below > bc.path_length:
        raise IntegrityError(
            f"{what}: issuer '{_name(issuer)}' allows path length "
            f"{bc.path_length}, chain has {intermediates_below} intermediate(s) "
            "below it"
        )
    ku = _key_usage(issuer)
    if ku is not None and not ku.key_cert_sign:
        raise IntegrityError(f"{what}: issuer '{_name(issuer)}' KeyUsage lacks keyCertSign")


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """None when ``issuer`` signed ``child`` (names and signature), else why not."""
    try:
        child.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return "signature does not verify"
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return str(exc) or type(exc).__name__
    return None


def describe_validity(cert: x509.Certificate, at: dt.datetime | None = None) -> str | None:
    """None if ``cert`` is within its validity period at ``at`` (default now), else one line."""
    at = _utc(at)
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    span = f"valid {nb:%Y-%m-%dT%H:%M:%SZ}..{na:%Y-%m-%dT%H:%M:%SZ}"
    if at > na:
        return f"certificate '{_name(cert)}' expired ({span}, checked at {at:%Y-%m-%dT%H:%M:%SZ})"
    if at < nb:
        return (
            f"certificate '{_name(cert)}' is not yet valid ({span}, checked at "
            f"{at:%Y-%m-%dT%H:%M:%SZ})"
        )
    return None


def _utc(at: dt.datetime | None) -> dt.datetime:
    if at is None:
        return dt.datetime.now(dt.timezone.utc)
    if at.tzinfo is None:
        return at.replace(tzinfo=dt.timezone.utc)
    return at.astimezone(dt.timezone.utc)


_warned: set[tuple[bytes, str]] = set()
_warned_lock = threading.Lock()
_WARNED_MAX = 4096


def _warn_validity(cert: x509.Certificate, at: dt.datetime | None) -> None:
    problem = describe_validity(cert, at)
    if problem is None:
        return
    key = (cert.fingerprint(hashes.SHA256()), problem.split(" (", 1)[0])
    with _warned_lock:
        if key in _warned:
            return
        if len(_warned) >= _WARNED_MAX:
            _warned.clear()
        _warned.add(key)
    log.warning("%s; accepted anyway (dates are not an integrity failure)", problem)


def _verify_chain(
    chain: Sequence[x509.Certificate],
    trusted_roots: Iterable[x509.Certificate],
    at: dt.datetime | None,
    what: str,
) -> bool:
    """Verify ``chain``; True if its last certificate *is* a trusted root (not issued by one)."""
    roots = list(trusted_roots)
    if not roots:
        raise IntegrityError(f"{what}: no trusted roots configured")
    if not chain:
        raise IntegrityError(f"{what}: empty certificate chain")
    for i in range(len(chain) - 1):
        child, issuer = chain[i], chain[i + 1]
        why = _signed_by(child, issuer)
        if why is not None:
            raise IntegrityError(
                f"{what}: certificate #{i} '{_name(child)}' is not issued by "
                f"certificate #{i + 1} '{_name(issuer)}': {why}"
            )
        _check_issuer(issuer, i, what)
    last = chain[-1]
    last_der = _der(last)
    is_root = any(_der(root) == last_der for root in roots)
    if not is_root:
        for root in roots:
            if _signed_by(last, root) is None:
                _check_issuer(root, len(chain) - 1, what)
                break
        else:
            raise IntegrityError(
                f"{what}: last certificate '{_name(last)}' is not a trusted root "
                f"and not issued by one ({len(roots)} trusted root(s) tried)"
            )
    for cert in chain:
        _warn_validity(cert, at)
    return is_root


def verify_chain(
    chain: list[x509.Certificate],
    trusted_roots: Iterable[x509.Certificate],
    at: dt.datetime | None = None,
) -> None:
    """Each certificate is issued by the next; the last is (or is issued by) a trusted root.

    Validity dates are checked against ``at`` (default now) only to log a WARNING.
    """
    _verify_chain(chain, trusted_roots, at, "issuer chain")


# ---------------------------------------------------------------------------------------------
# Raw JSON value extraction
# ---------------------------------------------------------------------------------------------

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
# A string (skipped whole, so brackets and quotes inside it don't count) or a bracket.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]', re.S)
_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")
_WS = re.compile(rb"[ \t\n\r]*")
_CLOSE = {0x7B: 0x7D, 0x5B: 0x5D}  # { -> }, [ -> ]


class _Malformed(Exception):
    pass


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _loads_strict(text: str) -> Any:
    """json.loads without Python's NaN / Infinity extensions, nesting bounded (JsonTooDeep,
    a ValueError, past jsonlimits.MAX_DEPTH)."""
    return jsonlimits.loads(text, parse_constant=_reject_constant)


def _skip_ws(body: bytes, i: int) -> int:
    m = _WS.match(body, i)
    assert m is not None  # [ \t\n\r]* matches the empty string
    return m.end()


def _scan_string(body: bytes, i: int) -> int:
    m = _STRING.match(body, i)
    if m is None:
        raise _Malformed(f"unterminated string at byte {i}")
    return m.end()


def _scan_value(body: bytes, i: int) -> int:
    """Index just past the JSON value starting at ``body[i]`` (no leading whitespace)."""
    if i >= len(body):
        raise _Malformed("value expected at end of input")
    c = body[i]
    m: re.Match[bytes] | None
    if c == 0x22:  # "
        return _scan_string(body, i)
    if c in _CLOSE:
        stack = []
        for m in _TOKEN.finditer(body, i):
            d = body[m.start()]
            if d == 0x22:  # a whole string, escapes included
                continue
            if d in _CLOSE:
                stack.append(_CLOSE[d])
            elif d == stack[-1]:
                stack.pop()
                if not stack:
                    return m.end()
            else:
                raise _Malformed(f"mismatched {chr(d)} at byte {m.start()}")
        raise _Malformed(f"unbalanced {chr(c)} opened at byte {i} (or unterminated string)")
    m = _SCALAR.match(body, i)
    if m is None:
        raise _Malformed(f"unexpected byte 0x{c:02x} at {i}")
    return m.end()


def _top_level_spans(body: bytes) -> dict[str, tuple[int, int]]:
    """Key -> (start, end) of each value of the top-level object; duplicate keys are an error."""
    spans: dict[str, tuple[int, int]] = {}
    i = _skip_ws(body, 0)
    if i >= len(body) or body[i] != 0x7B:
        raise _Malformed("top level is not a JSON object")
    i = _skip_ws(body, i + 1)
    if i < len(body) and body[i] == 0x7D:
        i += 1
    else:
        while True:
            if i >= len(body) or body[i] != 0x22:
                raise _Malformed(f"object key expected at byte {i}")
            k_end = _scan_string(body, i)
            try:
                key = json.loads(body[i:k_end])
            except ValueError as exc:
                raise _Malformed(f"bad object key at byte {i}: {exc}") from None
            i = _skip_ws(body, k_end)
            if i >= len(body) or body[i] != 0x3A:
                raise _Malformed(f"':' expected at byte {i}")
            v_start = _skip_ws(body, i + 1)
            v_end = _scan_value(body, v_start)
            if key in spans:
                raise _Malformed(f"duplicate top-level key {key!r}")
            spans[key] = (v_start, v_end)
            i = _skip_ws(body, v_end)
            if i < len(body) and body[i] == 0x2C:
                i = _skip_ws(body, i + 1)
                continue
            if i < len(body) and body[i] == 0x7D:
                i += 1
                break
            raise _Malformed(f"',' or '}}' expected at byte {i}")
    if _skip_ws(body, i) != len(body):
        raise _Malformed(f"trailing data after the top-level object at byte {i}")
    return spans


def raw_json_value_span(body: bytes, key: str) -> tuple[int, int]:
    """(start, end) of the raw text of top-level ``key``'s value in ``body`` (bytes, UTF-8 JSON).

    Scans the top-level object only (a key appearing inside a nested string or object is not
    a match); strings and escapes are honoured; duplicate top-level keys are rejected.  The body
    as a whole must be valid UTF-8 JSON.
    """
    body = bytes(body)
    _, spans = _parse_with_spans(body, "")
    if key not in spans:
        raise IntegrityError(f"body has no top-level {key!r}")
    return spans[key]


def _parse_with_spans(body: bytes, what: str) -> tuple[dict[str, Any], dict[str, tuple[int, int]]]:
    """The parsed document and the byte spans of its top-level values; IntegrityError (with
    ``what`` before the reason) when the body is not strict UTF-8 JSON."""
    prefix = f"{what}: " if what else ""
    try:
        doc = _loads_strict(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"{prefix}body is not UTF-8: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(
            f"{prefix}body is not valid JSON: {exc or 'nested too deeply'}"
        ) from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"{prefix}body is not a JSON object")
    try:
        return doc, _top_level_spans(body)
    except _Malformed as exc:
        raise IntegrityError(f"{prefix}body: {exc}") from None


def extract_raw_json_value(body: bytes, key: str) -> bytes:
    """The exact bytes of top-level ``key``'s value in ``body`` (see raw_json_value_span)."""
    start, end = raw_json_value_span(body, key)
    return bytes(body[start:end])


# ---------------------------------------------------------------------------------------------
# Signed JSON, CRLs, PCK certificates
# ---------------------------------------------------------------------------------------------

_HEX_SIG = re.compile(r"[0-9a-fA-F]{128}")


def verify_signed_json(
    body: bytes,
    top_key: str,
    chain_header: ChainLike,
    trusted_roots: Iterable[x509.Certificate],
    *,
    at: dt.datetime | None = None,
) -> None:
    """Check a PCS body ``{"<top_key>": {...}, "signature": "<hex r||s>"}``.

    ``top_key`` is ``tcbInfo``, ``enclaveIdentity`` or ``tcbEvaluationDataNumbers``.  The
    signature must verify (ECDSA P-256/SHA-256) over the exact bytes of the inner object with
    the first certificate of ``chain_header`` (URL-encoded PEM, or an already parsed list), which
    must be issued directly by a trusted root.
    """
    what = f"{top_key} signature"
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise IntegrityError(f"{what}: body must be bytes, got {type(body).__name__}")
    body = bytes(body)
    if len(body) > MAX_SIGNED_JSON:
        raise IntegrityError(f"{what}: body of {len(body)} bytes is larger than {MAX_SIGNED_JSON}")
    doc, spans = _parse_with_spans(body, what)
    if top_key not in spans:
        raise IntegrityError(f"{what}: body has no top-level {top_key!r}")
    start, end = spans[top_key]
    if body[start] != 0x7B:
        raise IntegrityError(f"{what}: {top_key!r} is not a JSON object")
    signed = body[start:end]

    sig_hex = doc.get("signature")
    if not isinstance(sig_hex, str):
        raise IntegrityError(f'{what}: body has no "signature" string')
    if not _HEX_SIG.fullmatch(sig_hex):
        raise IntegrityError(
            f'{what}: "signature" is not 128 hex digits (64-byte r||s), '
            f"got {len(sig_hex)} characters"
        )
    raw = bytes.fromhex(sig_hex)
    der_sig = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))

    chain = _as_chain(chain_header)
    signer = chain[0]
    try:
        key = signer.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IntegrityError(
            f"{what}: signing certificate '{_name(signer)}': unusable public key: {exc}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise IntegrityError(f"{what}: signing certificate '{_name(signer)}' has no P-256 key")
    ku = _key_usage(signer)
    if ku is not None and not ku.digital_signature:
        raise IntegrityError(
            f"{what}: signing certificate '{_name(signer)}' KeyUsage lacks digitalSignature"
        )
    try:
        key.verify(der_sig, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise IntegrityError(
            f"{what}: does not verify over the {len(signed)}-byte {top_key} "
            f"object with '{_name(signer)}'"
        ) from None

    is_root = _verify_chain(chain, trusted_roots, at, f"{what} issuer chain")
    # Intel's TCB signing chain is [TCB Signing, Root]: the signer hangs directly off the root.
    if not ((len(chain) == 2 and is_root) or (len(chain) == 1 and not is_root)):
        raise IntegrityError(
            f"{what}: signing certificate '{_name(signer)}' is not issued "
            f"directly by a trusted root (chain of {len(chain)} certificates)"
        )


def verify_crl(
    der: bytes,
    chain_header: ChainLike | None,
    trusted_roots: Iterable[x509.Certificate],
    issuer: x509.Certificate | None = None,
    *,
    at: dt.datetime | None = None,
) -> None:
    """Check a DER CRL: it parses and is signed by a CA chained to a trusted root.

    * PCK CRLs: ``chain_header`` is the ``SGX-PCK-CRL-Issuer-Chain``; the CRL is signed by its
      first certificate.
    * Root CA CRL: no header.  Pass ``issuer=`` (it must be, or be issued by, a trusted root) or
      nothing, meaning "signed by one of the trusted roots".
    If both ``chain_header`` and ``issuer`` are given, ``issuer`` must be the chain's first cert.
    """
    what = "CRL"
    if not isinstance(der, (bytes, bytearray, memoryview)):
        raise IntegrityError(f"{what}: expected DER bytes, got {type(der).__name__}")
    der = bytes(der)
    if der.lstrip().startswith(b"-----BEGIN"):
        raise IntegrityError(f"{what}: PEM given where DER is required")
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError as exc:
        raise IntegrityError(f"{what}: not a DER CRL ({len(der)} bytes): {exc}") from None
    try:
        crl_issuer = crl.issuer.rfc4514_string()
    except Exception:  # pragma: no cover
        crl_issuer = "<unprintable issuer>"
    what = f"CRL of '{crl_issuer}'"

    roots = list(trusted_roots)
    if chain_header is not None:
        chain = _as_chain(chain_header)
        if issuer is not None and _der(issuer) != _der(chain[0]):
            raise IntegrityError(
                f"{what}: issuer '{_name(issuer)}' is not the first certificate "
                f"of the chain '{_name(chain[0])}'"
            )
        candidates = [chain[0]]
    elif issuer is not None:
        chain = [issuer]
        candidates = [issuer]
    else:
        chain = None
        candidates = [r for r in roots if r.subject == crl.issuer]
        if not candidates:
            raise IntegrityError(f"{what}: issuer is none of the {len(roots)} trusted root(s)")

    signer = None
    for cand in candidates:
        if cand.subject != crl.issuer:
            raise IntegrityError(
                f"{what}: issuer name differs from the signing certificate '{_name(cand)}'"
            )
        try:
            # a key type that cannot sign (X25519, X448) raises TypeError, caught below
            key = cast(CertificateIssuerPublicKeyTypes, cand.public_key())
            ok = crl.is_signature_valid(key)
        except (TypeError, ValueError, UnsupportedAlgorithm) as exc:
            raise IntegrityError(
                f"{what}: cannot check signature with '{_name(cand)}': {exc}"
            ) from None
        if ok:
            signer = cand
            break
    if signer is None:
        if chain is None:
            raise IntegrityError(f"{what}: signature does not verify with any trusted root")
        raise IntegrityError(f"{what}: signature does not verify with '{_name(candidates[0])}'")

    try:
        bc = signer.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    except ValueError as exc:
        raise IntegrityError(
            f"{what}: signer '{_name(signer)}': malformed extensions: {exc}"
        ) from None
    if not is_ca:
        raise IntegrityError(f"{what}: signer '{_name(signer)}' is not a CA")
    ku = _key_usage(signer)
    if ku is not None and not ku.crl_sign:
        raise IntegrityError(f"{what}: signer '{_name(signer)}' KeyUsage lacks cRLSign")
    if chain is not None:
        _verify_chain(chain, roots, at, f"{what} issuer chain")


def verify_pck_cert(
    pem: str | bytes,
    chain_header: ChainLike,
    trusted_roots: Iterable[x509.Certificate],
    *,
    at: dt.datetime | None = None,
    verified_chains: dict[str, list[x509.Certificate]] | None = None,
) -> None:
    """A PCK leaf (PEM, possibly URL-encoded as in ``/pckcerts``) issued by the chain's first cert.

    The whole path ``[leaf, *chain]`` must verify up to a trusted root. ``verified_chains``
    (a dict the caller keeps for one batch, with the same roots) remembers chain headers whose
    issuer path verified under an earlier leaf: for the next leaf only its own link is left to
    check, the rest of the path being the same checks on the same certificates.
    """
    what = "PCK certificate"
    if isinstance(pem, (bytes, bytearray)):
        try:
            pem = bytes(pem).decode("ascii")
        except UnicodeDecodeError:
            raise IntegrityError(f"{what}: not ASCII PEM text") from None
    if not isinstance(pem, str):
        raise IntegrityError(f"{what}: expected PEM text, got {type(pem).__name__}")
    try:
        text = urllib.parse.unquote(pem, errors="strict")
    except UnicodeDecodeError:
        raise IntegrityError(f"{what}: URL-decoding yields invalid UTF-8") from None
    certs = _load_pem_certs(text, what)
    if len(certs) != 1:
        raise IntegrityError(f"{what}: expected exactly one certificate, got {len(certs)}")
    leaf = certs[0]
    what = f"{what} '{_name(leaf)}' chain"
    key = chain_header if isinstance(chain_header, str) else None
    known = verified_chains.get(key) if verified_chains is not None and key else None
    if known:
        # What _verify_chain checks at #0; #1 onwards does not depend on the leaf.
        why = _signed_by(leaf, known[0])
        if why is not None:
            raise IntegrityError(
                f"{what}: certificate #0 '{_name(leaf)}' is not issued by "
                f"certificate #1 '{_name(known[0])}': {why}"
            )
        _check_issuer(known[0], 0, what)
        _warn_validity(leaf, at)
        return
    chain = _as_chain(chain_header)
    _verify_chain([leaf, *chain], trusted_roots, at, what)
    if verified_chains is not None and key and chain:
        verified_chains[key] = chain


# ---------------------------------------------------------------------------------------------
# TCB infos: the one asked for
# ---------------------------------------------------------------------------------------------


def tcb_info_mismatch(info: dict[str, Any], fmspc: str, tee: str, version: int) -> str | None:
    """Why the ``tcbInfo`` object ``info`` is not the TCB info of FMSPC ``fmspc`` and TEE
    ``tee`` ("sgx"/"tdx") served under API ``version``, or None when it is. The FMSPC is
    compared case-insensitively; a v4 TCB info must name its TEE in ``id``, a v3 one has no
    ``id`` (if it has one, it must name the TEE too)."""
    if str(info.get("fmspc", "")).upper() != fmspc.upper():
        return f"is for FMSPC {info.get('fmspc')!r}, not {fmspc.upper()}"
    if (version >= 4 or "id" in info) and info.get("id") != tee.upper():
        return f"has id {info.get('id')!r}, not {tee.upper()}"
    return None


BUNDLED_INTEL_ROOT = "intel_sgx_root_ca.pem"


def bundled_intel_root_pem() -> bytes:
    """Intel's SGX Root CA (public, pinned), shipped in the package."""
    from importlib import resources

    return resources.files("dcapd").joinpath("data", BUNDLED_INTEL_ROOT).read_bytes()


class Integrity:
    """The configured trust anchors, and the checks the cache applies before storing."""

    def __init__(self, trusted_roots_pem: bytes):
        self.roots = load_trusted_roots(trusted_roots_pem)

    @classmethod
    def from_file(cls, path: str) -> Integrity:
        """``path`` empty = Intel's SGX Root CA bundled with dcapd."""
        if not path:
            return cls(bundled_intel_root_pem())
        with open(path, "rb") as handle:
            return cls(handle.read())

    def check_signed_json(self, body: bytes, top_key: str, chain_header: str) -> None:
        verify_signed_json(body, top_key, chain_header, self.roots)

    def check_crl(self, der: bytes, chain_header: str | None) -> None:
        """A PCK CRL with its chain header, or (no header) a CRL signed by a trusted root."""
        verify_crl(der, chain_header, self.roots)

    def check_crl_any_known_issuer(self, der: bytes, chain_headers: Sequence[str]) -> None:
        """A CRL downloaded without a chain (crl?uri=): signed by a root or a known PCK CA."""
        failures = []
        for chain in [None, *chain_headers]:
            try:
                verify_crl(der, chain, self.roots)
                return
            except IntegrityError as exc:
                failures.append(str(exc))
        raise IntegrityError(f"CRL is signed by no trusted root or known CA ({failures[0]})")

    def check_pck_cert(
        self,
        pem: str,
        chain_header: str,
        verified_chains: dict[str, list[x509.Certificate]] | None = None,
    ) -> None:
        verify_pck_cert(pem, chain_header, self.roots, verified_chains=verified_chains)
