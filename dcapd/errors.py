"""Intel's PCCS status texts, in one table, and the error type every resource raises.

Intel's PCCS answers every deliberate error with a plain-text body from a fixed table
(pccs-reference.md §0); clients such as QCNL only read the status code, but operators read
the text, so we keep Intel's words exactly.
"""

from __future__ import annotations

import falcon

STATUS_TEXTS: dict[int, str] = {
    200: "Operation successful.",
    400: "Invalid request parameters.",
    401: "Authentication failed.",
    404: "No cache data for this platform.",
    413: "Request body is too large.",
    460: "The integrity of the data can't be verified.",
    461: "The platform was not found in the cache.",
    462: "Certificates are not available for certain TCBs.",
    500: "Internal server error occurred.",
    502: "Unable to retrieve the collateral from the Intel SGX PCS.",
    503: "Server is currently unable to process the request.",
}

# HTTP reason phrases for the status line; the non-standard ones are Intel's own codes.
_REASONS: dict[int, str] = {
    460: "Integrity Error",
    461: "Platform Unknown",
    462: "Certificates Unavailable",
}


class PccsError(falcon.HTTPError):
    """An error answered with Intel's status text; ``reason`` goes to the log only."""

    def __init__(self, status: int, reason: str = ""):
        phrase = _REASONS.get(status) or falcon.code_to_http_status(status).split(" ", 1)[1]
        super().__init__(f"{status} {phrase}", title=STATUS_TEXTS[status])
        self.reason = reason
