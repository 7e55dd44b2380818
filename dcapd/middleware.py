"""Request handling that every route shares: Request-ID, Intel's query rules, access log."""

from __future__ import annotations

import contextvars
import logging
import os
import re
import time

import falcon

from .errors import STATUS_TEXTS, PccsError

log = logging.getLogger("dcapd.http")

REQUEST_ID_HEADER = "Request-ID"
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# How the request was answered from the cache: hit, selected (local PCK selection), upstream.
cache_outcome_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "cache_outcome", default="-"
)


def note_cache_outcome(outcome: str) -> None:
    cache_outcome_var.set(outcome)


_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def new_request_id() -> str:
    """32 lower-case hex characters, like Intel's dash-less UUIDv4 (4x cheaper than uuid4)."""
    return os.urandom(16).hex()


def request_id_for(client_id: str | None) -> str:
    """The Request-ID of an answer: the client's own when it is a sane one, else a new one."""
    return client_id if client_id and _CLIENT_REQUEST_ID.fullmatch(client_id) else new_request_id()


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every log record so one line ties to one request."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class PccsRequestRules:
    """Intel's Express quirks that clients rely on (pccs-reference.md §8.22)."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        # Intel meant to echo the client's Request-ID ([ref-bug]: it never does); we do.
        request_id = request_id_for(req.get_header(REQUEST_ID_HEADER))
        req.context.request_id = request_id
        req.context.started = time.perf_counter()
        request_id_var.set(request_id)
        cache_outcome_var.set("-")
        # Express matches paths case-insensitively (trailing slash: req_options).
        req.path = req.path.lower()
        # Intel: the first of duplicate query parameters wins (falcon keeps the last).
        params = req.params
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


def handle_unexpected(req, resp, exc: Exception, params) -> None:
    log.exception("%s %s -> 500: unhandled %s", req.method, req.path, type(exc).__name__)
    handle_http_error(req, resp, PccsError(500), params)
