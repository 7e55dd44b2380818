"""What a PCS URL may be: Intel's default endpoints, its CRL distribution points, origins.

Pure, at the bottom of the import graph: the configuration (url_map keys), the resources
(``crl?uri=``) and the upstream client all check URLs with these, and import nothing else.
"""

from __future__ import annotations

import re
import urllib.parse

INTEL_PCS_URL = "https://api.trustedservices.intel.com/sgx/certification/v4/"
INTEL_ROOTCA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"

# Intel's CRL distribution points (pccs-reference.md §1.6), narrowed to what Intel's collateral
# can name: the root CA CRL of production and sandbox (and Azure's proxy of it), and the PCK
# CRLs of PCS (production, sandbox, Azure regions). Matched against the WHOLE URL: Intel's own
# check is an unanchored regex search, so a hostile URL that merely contains an allowed one
# passes it ([ref-bug]). Each part below admits a bounded number of spellings once
# canonicalised (:func:`canonical_crl_url`), so a client cannot mint cache keys.
_ROOT_CRL_HOST = re.compile(
    r"(?:sbx-)?certificates\.trustedservices\.intel\.com|certprx\.adsdcsp\.com"
)
_ROOT_CRL_PATH = re.compile(r"/IntelSGXRootCA\.(?:der|crl)")
_PCK_CRL_HOST = re.compile(
    r"(?:sbx\.)?api\.trustedservices\.intel\.com|[a-z0-9-]{1,63}\.az\.sgx(?:prod|np)\.adsdcsp\.com"
)
_PCK_CRL_PATH = re.compile(r"/sgx/certification/v[1-9]/pckcrl")
_PCK_CRL_CAS = ("processor", "platform")


def canonical_origin(origin: str) -> str:
    """``HTTPS://Host:443`` and ``https://host`` are one origin (url_map keys are compared so)."""
    parts = urllib.parse.urlsplit(origin)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        return origin
    default = {"https": 443, "http": 80}.get(scheme)
    return f"{scheme}://{host}" + (f":{port}" if port and port != default else "")


def canonical_crl_url(uri: str) -> str | None:
    """The one spelling of an allowed CRL distribution point, or None when ``uri`` is not one.

    Scheme and host lower-case, no default port, and for a PCK CRL the query rebuilt as
    ``ca=<processor|platform>[&encoding=der]``: ``HTTPS://Certificates...:443/IntelSGXRootCA.der``
    and ``https://certificates.../IntelSGXRootCA.der`` are one distribution point, one cache
    key and one download. Everything else (another host, port, path, query, a fragment,
    userinfo, percent-encoding outside the query) is refused."""
    # ASCII only: str.lower() would turn e.g. U+212A KELVIN SIGN into "k" below.
    if len(uri) > 2048 or not uri.isascii() or any(ch.isspace() or ord(ch) < 0x20 for ch in uri):
        return None
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError:
        return None
    if (
        parts.scheme.lower() != "https"
        or parts.username is not None
        or parts.password is not None
        or port not in (None, 443)
        or "%" in parts.netloc
        or parts.fragment
        or "#" in uri
    ):
        return None
    host = (parts.hostname or "").lower()
    if _ROOT_CRL_HOST.fullmatch(host) and _ROOT_CRL_PATH.fullmatch(parts.path):
        return None if parts.query else f"https://{host}{parts.path}"
    if not (_PCK_CRL_HOST.fullmatch(host) and _PCK_CRL_PATH.fullmatch(parts.path)):
        return None
    query = _pck_crl_query(parts.query)
    return None if query is None else f"https://{host}{parts.path}?{query}"


def _pck_crl_query(query: str) -> str | None:
    """``ca=processor|platform`` and optionally ``encoding=der``, each once (Intel's PCK
    certificates name ``?ca=platform&encoding=der``; QCNL cuts the URL at the ``&``)."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return None
    fields = dict(pairs)
    if len(fields) != len(pairs) or not set(fields) <= {"ca", "encoding"}:
        return None
    ca, encoding = fields.get("ca", "").lower(), fields.get("encoding", "der").lower()
    if ca not in _PCK_CRL_CAS or encoding != "der":
        return None
    return f"ca={ca}" + ("&encoding=der" if "encoding" in fields else "")


def is_intel_root_crl_url(uri: str) -> bool:
    """True for any spelling of Intel's production root CA CRL distribution point (the one
    ``rootcacrl`` serves: one cache entry, fetched from the configured ``rootca_crl_url``)."""
    return canonical_crl_url(uri) == INTEL_ROOTCA_CRL_URL


def is_root_crl_url(uri: str) -> bool:
    """True for a root CA CRL distribution point Intel's collateral can name (any spelling)."""
    canonical = canonical_crl_url(uri)
    return (
        canonical is not None
        and _ROOT_CRL_PATH.fullmatch(urllib.parse.urlsplit(canonical).path) is not None
    )


def is_allowed_crl_url(uri: str) -> bool:
    """True only for an https URL naming one of Intel's CRL distribution points (whole match)."""
    return canonical_crl_url(uri) is not None
