"""User and admin tokens (pccs-reference.md §0): SHA-512 of the token against the configured hash.

Fail closed: a role with no configured hash refuses every request. The comparison is
constant-time (Intel's is not), and tokens never reach a log line.
"""

from __future__ import annotations

import hashlib
import hmac

import falcon

from .errors import PccsError

USER_TOKEN_HEADER = "user-token"
ADMIN_TOKEN_HEADER = "admin-token"


def token_sha512(token: str) -> str:
    """The hash operators configure: ``echo -n "$token" | sha512sum``."""
    return hashlib.sha512(token.encode("utf-8")).hexdigest()


class Auth:
    def __init__(self, user_token_sha512: str, admin_token_sha512: str):
        self._hashes = {
            USER_TOKEN_HEADER: user_token_sha512.lower(),
            ADMIN_TOKEN_HEADER: admin_token_sha512.lower(),
        }

    def _require(self, req: falcon.Request, header: str) -> None:
        expected = self._hashes[header]
        token = req.get_header(header)
        if not expected:
            raise PccsError(401, f"{header}: no token hash configured, role refused")
        if not token:
            raise PccsError(401, f"{header}: missing")
        if not hmac.compare_digest(token_sha512(token), expected):
            raise PccsError(401, f"{header}: wrong token")

    def require_user(self, req: falcon.Request) -> None:
        self._require(req, USER_TOKEN_HEADER)

    def require_admin(self, req: falcon.Request) -> None:
        self._require(req, ADMIN_TOKEN_HEADER)
