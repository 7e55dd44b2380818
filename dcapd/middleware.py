"""Request handling that every route shares: Request-ID, Intel's query rules, access log."""

from __future__ import annotations

import logging
import re
import time
from typing import Any, cast

import falcon

from .errors import STATUS_TEXTS, PccsError
from .logs import cache_outcome_var, new_request_id, request_id_var

log = logging.getLogger("dcapd.http")

REQUEST_ID_HEADER = "Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class PccsRequestRules:
    """Intel's Express quirks that clients rely on (pccs-reference.md §8.22)."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        # Intel meant to echo the client's Request-ID ([ref-bug]: it never does); we do.
        client_id = req.get_header(REQUEST_ID_HEADER) or ""
        request_id = client_id if _CLIENT_REQUEST_ID.fullmatch(client_id) else new_request_id()
        req.context.request_id = request_id
        req.context.started = time.perf_counter()
        request_id_var.set(request_id)
        cache_outcome_var.set("-")
        # Express matches paths case-insensitively (trailing slash: req_options).
        req.path = req.path.lower()
        # Intel: the first of duplicate query parameters wins (falcon keeps the last).
        params = cast("dict[str, Any]", req.params)  # a dict; falcon types it as a Mapping
        for name, value in params.items():
            if value.__class__ is list:
                params[name] = value[0]

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool
    ) -> None:
        # Here, not in process_request: this runs for every answer, errors included.
        resp.set_header(REQUEST_ID_HEADER, req.context.get("request_id") or new_request_id())
        # The query may carry an encrypted PPID: log the path only.
        started = req.context.get("started")
        duration_ms = (time.perf_counter() - started) * 1000 if started else 0.0
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s %s %.1fms cache=%s",
                req.method,
                req.path,
                resp.status_code,
                duration_ms,
                cache_outcome_var.get(),
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
        log.log(level, "%s %s -> %s: %s", req.method, req.path, exc.status_code, exc.reason)
    resp.status = exc.status
    serialize_error(req, resp, exc)


def handle_store_unavailable(req, resp, exc: Exception, params) -> None:
    """The cache's database cannot be reached: 503 with Intel's text, whatever the route."""
    handle_http_error(req, resp, PccsError(503, str(exc)), params)


def handle_unexpected(req, resp, exc: Exception, params) -> None:
    log.exception("%s %s -> 500: unhandled %s", req.method, req.path, type(exc).__name__)
    handle_http_error(req, resp, PccsError(500), params)
