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
    410: (
        "The Intel PCS API version 3 reached planned EOL. Accordingly, collateral from this API "
        "version cannot be retrieved any longer."
    ),
    413: "Content too large.",
    460: "The integrity of the data can't be verified.",
    461: "The platform was not found in the cache.",
    462: "Certificates are not available for certain TCBs.",
    500: "Internal server error occurred.",
    502: "Unable to retrieve the collateral from the Intel SGX PCS.",
    503: "Server is currently unable to process the request.",
}

# Intel's PCCS 1.27 sets this header on every response to a /v3/ request, errors included
# (pccs-1.27.md §1), and logs the text as a warning.
V3_EOL_WARNING_TEXT = (
    "PCS API version 3 is no longer available. Cached collateral downloaded from API version 3 "
    "is deprecated, will not be refreshed, and may expire. Please migrate to API version 4."
)
V3_EOL_WARNING = f'299 - "{V3_EOL_WARNING_TEXT}"'

# dcapd's own texts, for answers Intel's PCCS never gives (collateral pinned to a TCB
# evaluation data number, pccs-1.27.md §3): PCS no longer serves the number asked for.
EVALUATION_NUMBER_GONE = (
    "The Intel SGX PCS no longer serves collateral for this TCB evaluation data number."
)

# HTTP reason phrases for the status line; the non-standard ones are Intel's own codes.
_REASONS: dict[int, str] = {
    460: "Integrity Error",
    461: "Platform Unknown",
    462: "Certificates Unavailable",
}


class PccsError(falcon.HTTPError):
    """An error answered with Intel's status text; ``reason`` goes to the log only."""

    def __init__(self, status: int, reason: str = "", text: str | None = None):
        """``text``: the body, when it is not the status's entry in STATUS_TEXTS (one of the
        texts above)."""
        phrase = _REASONS.get(status) or falcon.code_to_http_status(status).split(" ", 1)[1]
        super().__init__(f"{status} {phrase}", title=text or STATUS_TEXTS[status])
        self.reason = reason
        self.upstream_status: int | None = None  # what upstream answered, when it answered
