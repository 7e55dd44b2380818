"""Request handling that every route shares: Request-ID, Intel's query rules, access log."""

from __future__ import annotations

import ipaddress
import logging
import re
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, Union, cast

import falcon

from .errors import STATUS_TEXTS, V3_EOL_WARNING, V3_EOL_WARNING_TEXT, PccsError
from .logs import AccessLine, cache_outcome_var, escape, new_request_id, request_id_var

log = logging.getLogger("dcapd.http")
access_line = AccessLine(log)  # the line every answer gets

REQUEST_ID_HEADER = "Request-ID"
_REQUEST_ID_ENV = "HTTP_REQUEST_ID"  # where WSGI puts it
_V3_PATH = re.compile(r"/[^/]*/certification/v3(?:/|$)")
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]  # Python 3.9: no X | Y here


def logged_path(req: falcon.Request) -> str:
    """The path as the client sent it, percent-encoding kept, without the query (it may carry
    an encrypted PPID), escaped for the log: ``%0d%0a`` stays those six characters."""
    env = req.env
    raw = env.get("REQUEST_URI") or env.get("RAW_URI")
    if raw:
        path = raw.split("?", 1)[0].split("#", 1)[0]
    else:  # a WSGI server without the raw URI: re-encode the decoded path (PEP 3333 latin-1)
        path = urllib.parse.quote(
            env.get("SCRIPT_NAME", "") + env.get("PATH_INFO", ""),
            safe="/:@!$&'()*+,;=-._~",
            encoding="latin-1",
        )
    return escape(path)


def request_id_for(client_id: str | None) -> str:
    """The Request-ID of an answer: the client's own when it is a sane one, else a new one."""
    return client_id if client_id and _CLIENT_REQUEST_ID.fullmatch(client_id) else new_request_id()


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


#: The headers a proxy sets about the client (waitress's list): believed from trusted proxies only.
PROXY_HEADERS = (
    "HTTP_FORWARDED",
    "HTTP_X_FORWARDED_FOR",
    "HTTP_X_FORWARDED_HOST",
    "HTTP_X_FORWARDED_PROTO",
    "HTTP_X_FORWARDED_PORT",
    "HTTP_X_FORWARDED_BY",
)


def is_trusted_proxy(address: str, trusted: Iterable[_Network]) -> bool:
    """*address* is in one of *trusted* (``[server] trusted_proxies``); not an IP: never."""
    ip = _parse_ip(address)
    return ip is not None and any(ip in network for network in trusted)


def clear_untrusted_proxy_headers(env: dict[str, Any], trusted: tuple[_Network, ...]) -> None:
    """Remove the proxy headers of a request whose peer (REMOTE_ADDR) is not one of
    *trusted*: a client cannot name another address, host or scheme for itself."""
    present = [name for name in PROXY_HEADERS if name in env]
    if present and not (trusted and is_trusted_proxy(str(env.get("REMOTE_ADDR")), trusted)):
        for name in present:
            del env[name]


def client_address(env: Mapping[str, Any], trusted: Iterable[_Network] = ()) -> str:
    """The client's address for the log: the peer (REMOTE_ADDR, which the TLS front sets to
    the TLS client's), or, when the peer is a trusted proxy, the right-most address of
    X-Forwarded-For that is not a trusted proxy (what the last trusted hop saw)."""
    peer = str(env.get("REMOTE_ADDR") or "-")
    trusted = tuple(trusted)
    forwarded = env.get("HTTP_X_FORWARDED_FOR")
    if not trusted or not forwarded:
        return escape(peer)

    if not is_trusted_proxy(peer, trusted):
        return escape(peer)
    hops = [hop.strip() for hop in str(forwarded).split(",") if hop.strip()]
    for hop in reversed(hops):
        if not is_trusted_proxy(hop, trusted):
            ip = _parse_ip(hop)
            return str(ip) if ip is not None else escape(hop[:64])
    return escape(hops[0] if hops else peer)


class PccsRequestRules:
    """Intel's Express quirks that clients rely on (pccs-reference.md §8.22)."""

    def __init__(self, trusted_proxies: Iterable[_Network] = ()):
        self.trusted_proxies = tuple(trusted_proxies)

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        context = req.context
        # Intel meant to echo the client's Request-ID ([ref-bug]: it never does); we do.
        # (req.get_header(REQUEST_ID_HEADER), without its KeyError when there is none)
        request_id = request_id_for(req.env.get(_REQUEST_ID_ENV))
        context.request_id = request_id
        context.started = time.perf_counter()
        request_id_var.set(request_id)
        cache_outcome_var.set("-")
        # Express matches paths case-insensitively (trailing slash: req_options).
        path = req.path.lower()
        req.path = path
        context.v3 = v3 = _V3_PATH.match(path) is not None
        if v3:
            # Intel 1.27 logs this on every v3 request; the access log line follows it.
            log.warning("%s %s: %s", escape(req.method), logged_path(req), V3_EOL_WARNING_TEXT)
        # Intel: the first of duplicate query parameters wins (falcon keeps the last).
        params = cast("dict[str, Any]", req.params)  # a dict; falcon types it as a Mapping
        for name, value in params.items():
            if value.__class__ is list:
                params[name] = value[0]

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool
    ) -> None:
        context = req.context
        # Here, not in process_request: this runs for every answer, errors included.
        resp.set_header(REQUEST_ID_HEADER, context.get("request_id") or new_request_id())
        v3 = context.get("v3")
        if v3 is None:  # process_request did not get that far
            v3 = _V3_PATH.match(req.path.lower()) is not None
        if v3:
            resp.set_header("Warning", V3_EOL_WARNING)  # pccs-1.27.md §1
        # The query may carry an encrypted PPID: log the path only.
        started = context.get("started")
        duration_ms = (time.perf_counter() - started) * 1000 if started else 0.0
        if log.isEnabledFor(logging.INFO):
            client = client_address(req.env, self.trusted_proxies)
            access_line(
                "%s %s %s %.1fms cache=%s client=%s",
                (
                    escape(req.method),
                    logged_path(req),
                    resp.status_code,
                    duration_ms,
                    cache_outcome_var.get(),
                    client,
                ),
                client,
            )


def serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """Intel answers errors as plain text (its Express labels it text/html; no client reads it)."""
    resp.content_type = "text/plain; charset=utf-8"
    resp.text = exc.title or ""


def handle_http_error(req, resp, exc: falcon.HTTPError, params) -> None:
    """One place that turns any HTTP error into Intel's status and text, logged once."""
    status = exc.status_code
    if isinstance(exc, (falcon.HTTPRouteNotFound, falcon.HTTPMethodNotAllowed)):
        # Express: unknown paths and unsupported methods are a plain 404, never a redirect.
        resp.status = 404
        resp.content_type = "text/plain; charset=utf-8"
        resp.text = f"Cannot {req.method} {req.path}"
        return
    if not isinstance(exc, PccsError):
        reason = exc.description or exc.title
        exc = PccsError(status if status in STATUS_TEXTS else 400, str(reason))
    if exc.reason:
        level = logging.ERROR if exc.status_code >= 500 else logging.WARNING
        log.log(
            level,
            "%s %s -> %s: %s",
            escape(req.method),
            logged_path(req),
            exc.status_code,
            escape(exc.reason),
        )
    resp.status = exc.status
    serialize_error(req, resp, exc)


def handle_store_unavailable(req, resp, exc: Exception, params) -> None:
    """The cache's database cannot be reached: 503 with Intel's text, whatever the route."""
    handle_http_error(req, resp, PccsError(503, str(exc)), params)


def handle_unexpected(req, resp, exc: Exception, params) -> None:
    log.exception(
        "%s %s -> 500: unhandled %s", escape(req.method), logged_path(req), type(exc).__name__
    )
    handle_http_error(req, resp, PccsError(500), params)
