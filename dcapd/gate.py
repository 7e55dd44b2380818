"""Which requests may carry a body, how large, and for whom: decided from the request head.

Intel's PCCS checks the token before it reads a body, and caps bodies at 2 MB. dcapd decides
the same from the head alone, before a byte of the body is read or spooled:

* a body on a route that takes none is refused (``413``);
* a route that takes a body names the role it needs (:data:`BODY_ROLES`): without a valid
  token for it, ``401`` at once;
* a body is at most ``max_small_body_bytes``, unless the request carries a valid admin
  token: then at most ``max_body_bytes`` (``413`` beyond, from ``Content-Length``; a chunked
  body is counted as it arrives).

dcapd's TLS front asks :meth:`BodyGate.check` with each raw request head; behind
``tls = off`` (and for anything reaching waitress's loopback port directly)
:class:`BodyGateMiddleware` asks it again in front of the app, after waitress has read the
body (waitress can only cap bodies at ``max_body_bytes``).
"""

from __future__ import annotations

import logging
from email.utils import formatdate
from typing import Callable, NamedTuple

from .app import route_paths
from .auth import ADMIN_TOKEN_HEADER, USER_TOKEN_HEADER, Auth
from .config import Config
from .errors import PccsError
from .middleware import REQUEST_ID_HEADER, request_id_for, request_id_var

__all__ = ["ANYONE", "USER", "ADMIN", "BODY_ROLES", "BodyGate", "BodyGateMiddleware", "Verdict"]

log = logging.getLogger("dcapd.http")

ANYONE, USER, ADMIN = "anyone", "user", "admin"

#: The routes that take a body, by endpoint of dcapd.app.ROUTES, and the role each method
#: needs (the resource checks the same token: resources.py). Every other request takes none.
BODY_ROLES: dict[str, dict[str, str]] = {
    "platforms": {"POST": USER},  # registration (Intel's PCK ID retrieval tool)
    "platformcollateral": {"PUT": ADMIN},  # collateral upload (PccsAdminTool)
    "appraisalpolicy": {"PUT": ADMIN, "POST": ADMIN},
    "refresh": {"GET": ADMIN, "POST": ADMIN},
}

_TOKEN_HEADERS = {USER: USER_TOKEN_HEADER, ADMIN: ADMIN_TOKEN_HEADER}


class Verdict(NamedTuple):
    """``status`` 0: go on, with a body of at most ``limit`` bytes; ``large``: the limit is
    ``max_body_bytes`` (a valid admin token), so the body may be streamed rather than held."""

    status: int
    reason: str
    limit: int
    large: bool = False


def _route_endpoints() -> dict[str, str]:
    """Every API path dcapd serves (lower case) -> its endpoint, from the app's route table."""
    return {path: path.split("/", 4)[4] for path, _tee, _version, _factory in route_paths()}


class BodyGate:
    """The body rules of one configuration (token hashes and limits)."""

    def __init__(self, config: Config, endpoints: dict[str, str] | None = None):
        self.auth = Auth(config.user_token_sha512, config.admin_token_sha512)
        self.small = config.max_small_body_bytes
        self.large = config.max_body_bytes
        self.endpoints = _route_endpoints() if endpoints is None else endpoints

    def role(self, method: str, path: str) -> str | None:
        """The role a body on ``method path`` needs, or None when the route takes no body.

        *path* is the decoded path without the query; matched as the app routes it
        (case-insensitive, one trailing slash ignored).
        """
        path = path.lower()
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        endpoint = self.endpoints.get(path)
        if endpoint is None:
            return None
        return BODY_ROLES.get(endpoint, {}).get(method.upper())

    def check(
        self, method: str, path: str, length: int | None, header: Callable[[str], str | None]
    ) -> Verdict:
        """Decide before reading: *length* is the announced body size (None: chunked, still
        unknown), *header* returns a request header's value by (lower-case) name."""
        if length == 0:
            return Verdict(0, "", 0)
        role = self.role(method, path)
        if role is None:
            return Verdict(413, f"{method} {path} takes no body", 0)
        if role != ANYONE:
            refusal = self.auth.refusal(_TOKEN_HEADERS[role], header(_TOKEN_HEADERS[role]))
            if refusal:
                return Verdict(401, refusal, 0)
        admin = role == ADMIN or not self.auth.refusal(
            ADMIN_TOKEN_HEADER, header(ADMIN_TOKEN_HEADER)
        )
        limit = self.large if admin else self.small
        if length is not None and length > limit:
            setting = "max_body_bytes" if admin else "max_small_body_bytes"
            return Verdict(413, f"body of {length} bytes exceeds {setting} ({limit})", limit)
        return Verdict(0, "", limit, admin)


def refusal_headers(status: int, request_id: str) -> tuple[str, list, bytes]:
    """Status, headers and body of a refusal: Intel's text and the Request-ID."""
    error = PccsError(status)
    body = (error.title or "").encode("utf-8")
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        (REQUEST_ID_HEADER, request_id),
    ]
    return str(error.status), headers, body


def refusal_bytes(status: int, request_id: str) -> bytes:
    """A whole HTTP/1.1 refusal, for the TLS front (which answers without waitress)."""
    status_line, headers, body = refusal_headers(status, request_id)
    headers = [("Server", "dcapd"), ("Date", formatdate(usegmt=True)), *headers]
    headers.append(("Connection", "close"))
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"HTTP/1.1 {status_line}\r\n{head}\r\n".encode("latin-1") + body


def log_refusal(method: str, path: str, verdict: Verdict, where: str, request_id: str) -> None:
    """One line with the reason, tied to the answer's Request-ID."""
    request_id_var.set(request_id)
    log.warning("%s %s -> %s: %s (refused %s)", method, path, verdict.status, verdict.reason, where)


class BodyGateMiddleware:
    """WSGI: the same rules in front of the app (waitress has read the body by now)."""

    def __init__(self, app: Callable, gate: BodyGate):
        self.app = app
        self.gate = gate

    def __call__(self, environ, start_response):
        length = environ.get("CONTENT_LENGTH") or ""
        if length in ("", "0"):
            return self.app(environ, start_response)
        try:
            size = int(length)
        except ValueError:
            return self.app(environ, start_response)  # waitress refuses those itself
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        verdict = self.gate.check(
            method, path, size, lambda name: environ.get("HTTP_" + name.upper().replace("-", "_"))
        )
        if not verdict.status:
            return self.app(environ, start_response)
        request_id = request_id_for(environ.get("HTTP_REQUEST_ID"))
        log_refusal(method, path, verdict, "before the app", request_id)
        status, headers, body = refusal_headers(verdict.status, request_id)
        start_response(status, headers)
        return [body]
