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

    def refusal(self, header: str, token: str | None) -> str:
        """Why *token* (the value of *header*) does not grant its role; ``""`` when it does.

        The one token check: the app's resources and dcapd's TLS front (which decides from
        the request head, before any body is read) both use it.
        """
        expected = self._hashes[header]
        if not expected:
            return f"{header}: no token hash configured, role refused"
        if not token:
            return f"{header}: missing"
        if not hmac.compare_digest(token_sha512(token), expected):
            return f"{header}: wrong token"
        return ""

    def _require(self, req: falcon.Request, header: str) -> None:
        reason = self.refusal(header, req.get_header(header))
        if reason:
            raise PccsError(401, reason)

    def require_user(self, req: falcon.Request) -> None:
        self._require(req, USER_TOKEN_HEADER)

    def require_admin(self, req: falcon.Request) -> None:
        self._require(req, ADMIN_TOKEN_HEADER)
