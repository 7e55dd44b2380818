"""What a PCS URL may be: Intel's default endpoints, its CRL distribution points, origins.

Pure, at the bottom of the import graph: the configuration (url_map keys), the resources
(``crl?uri=``) and the upstream client all check URLs with these, and import nothing else.
"""

from __future__ import annotations

import re
import urllib.parse

INTEL_PCS_URL = "https://api.trustedservices.intel.com/sgx/certification/v4/"
INTEL_ROOTCA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"

# Intel's CRL distribution points (pccs-reference.md §1.6). Matched against the WHOLE URL:
# Intel's own check is an unanchored regex search, so a hostile URL that merely contains an
# allowed one passes it ([ref-bug]).
_ROOT_CRL_HOST = re.compile(
    r"[a-z0-9-]*certificates\.trustedservices\.intel\.com|certprx\.adsdcsp\.com"
)
_ROOT_CRL_PATH = re.compile(r"/IntelSGXRootCA\.[A-Za-z0-9._-]+")
_PCK_CRL_HOST = re.compile(
    r"(?:[a-z0-9-]+\.)?api\.trustedservices\.intel\.com|[a-z0-9-]+\.az\.sgx(?:prod|np)\.adsdcsp\.com"
)
_PCK_CRL_PATH = re.compile(r"/sgx/certification/v[1-9][0-9]*/pckcrl")


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


def is_allowed_crl_url(uri: str) -> bool:
    """True only for an https URL on one of Intel's CRL hosts with a CRL path (whole match)."""
    # ASCII only: str.lower() would turn e.g. U+212A KELVIN SIGN into "k" below.
    if len(uri) > 2048 or not uri.isascii() or any(ch.isspace() or ord(ch) < 0x20 for ch in uri):
        return False
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError:
        return False
    if (
        parts.scheme != "https"
        or parts.username is not None
        or parts.password is not None
        or port not in (None, 443)
        or "%" in parts.netloc
        or parts.fragment
    ):
        return False
    host = (parts.hostname or "").lower()
    if _ROOT_CRL_HOST.fullmatch(host) and _ROOT_CRL_PATH.fullmatch(parts.path):
        return True
    return bool(_PCK_CRL_HOST.fullmatch(host) and _PCK_CRL_PATH.fullmatch(parts.path))
