"""Prometheus metrics: ``GET /metrics`` in the text format, through prometheus-client, from a
registry of the app's own (several apps in one process do not share one).

Counted where it happens (label values come from fixed sets, never from a query, a token, a
key or a PPID): every HTTP answer by route template, method, status and cache outcome, with
its latency (:class:`RequestMetrics`, a falcon middleware); upstream attempts, retries,
rejected replies, single-flight waits and refresh runs (the parts of ``instruments.py``).
What the cache holds is computed at scrape time (``cachestate.py``).

Several worker processes on one host (gunicorn): start them with ``PROMETHEUS_MULTIPROC_DIR``
naming an empty directory; each process's counters are then summed at scrape
(prometheus-client's multiprocess mode), whichever worker answers. Each node of a cluster
serves its own ``/metrics``.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from typing import Any, Callable

import falcon
import requests
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from .cachestate import CacheStateCollector
from .config import Config
from .logs import cache_outcome_var
from .store import Store

PATH = "/metrics"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Label values: fixed sets; anything else collapses to one value.
UNMATCHED_ROUTE = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
CACHE_OUTCOMES = frozenset({"hit", "selected", "upstream", "miss"})
PCS_ENDPOINTS = ("pckcrl", "tcb", "qe/identity", "qve/identity", "fmspcs", "pckcerts")
_PCS_PATH = re.compile(
    r"/(sgx|tdx)/certification/v([34])/(" + "|".join(map(re.escape, PCS_ENDPOINTS)) + r")$"
)
CRL_ROUTE = "crl"  # any other URL upstream is asked for: the root CA CRL, crl?uri= downloads

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
REFRESH_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900)


def upstream_route(url: str) -> str:
    """The PCS route template of an upstream URL (no host, no query), or ``crl``."""
    match = _PCS_PATH.search(urllib.parse.urlsplit(url).path)
    if match is None:
        return CRL_ROUTE
    return f"/{match.group(1)}/certification/v{match.group(2)}/{match.group(3)}"


def upstream_outcome(status: int) -> str:
    if 200 <= status < 300:
        return "2xx"
    if status in (404, 429):
        return str(status)
    return "5xx" if status >= 500 else "other"


class Metrics:
    """The metrics of one app: its registry, its instruments and what exposes them."""

    def __init__(self, config: Config, store: Store, clock: Callable[[], float] = time.time):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "dcapd_http_requests",
            "HTTP requests answered, by route template, method, status and cache outcome",
            ("route", "method", "status", "cache"),
            registry=registry,
        )
        self.latency = Histogram(
            "dcapd_http_request_duration_seconds",
            "Time from the request's arrival in the app to its answer",
            ("route", "cache"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_requests = Counter(
            "dcapd_upstream_requests",
            "Upstream (PCS) attempts by PCS route and outcome (2xx, 404, 429, 5xx, other, error)",
            ("route", "outcome"),
            registry=registry,
        )
        self.upstream_retries = Counter(
            "dcapd_upstream_retries",
            "Upstream attempts repeated after a network error, 429 or 5xx",
            ("route",),
            registry=registry,
        )
        self.upstream_rejected = Counter(
            "dcapd_upstream_rejected",
            "Upstream replies refused by the integrity check (not cached), by collateral kind",
            ("kind",),
            registry=registry,
        )
        self.flight_waits = Counter(
            "dcapd_single_flight_waits",
            "Cache misses answered by another caller's upstream fill (no upstream call of theirs)",
            registry=registry,
        )
        self.refresh_runs = Counter(
            "dcapd_refresh_runs",
            "Refresh runs by kind (collateral, certs) and result (ok, error)",
            ("kind", "result"),
            registry=registry,
        )
        self.refresh_duration = Histogram(
            "dcapd_refresh_duration_seconds",
            "Duration of refresh runs, failed ones included",
            ("kind",),
            buckets=REFRESH_BUCKETS,
            registry=registry,
        )
        self.state = CacheStateCollector(store, config.cache_mode, clock)
        registry.register(self.state)
        # Several processes: sum every process's counters (their files) at scrape.
        multiproc_dir = os.environ.get(MULTIPROC_ENV)
        if multiproc_dir:
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed, multiproc_dir)
            self.exposed.register(self.state)
        else:
            self.exposed = registry
        self._children: dict[tuple[str, str, int, str], tuple[Any, Any]] = {}

    # --- the hot path: one call per answered request

    def observe_request(
        self, route: str | None, method: str, status: int, cache: str, seconds: float
    ) -> None:
        key = (route or UNMATCHED_ROUTE, method, status, cache)
        children = self._children.get(key)
        if children is None:
            children = self._children_for(*key)
        children[0].inc()
        children[1].observe(seconds)

    def _children_for(self, route: str, method: str, status: int, cache: str) -> tuple[Any, Any]:
        """The label children of one combination; the key space is bounded because every
        value is: route templates of the route table, known methods, statuses, outcomes."""
        method_label = method if method in METHODS else "other"
        cache_label = cache if cache in CACHE_OUTCOMES else "none"
        children = (
            self.requests.labels(route, method_label, str(status), cache_label),
            self.latency.labels(route, cache_label),
        )
        if method in METHODS:  # an unknown method is not a key to remember
            self._children[(route, method, status, cache)] = children
        return children

    # --- upstream

    def upstream_attempt(self, url: str, outcome: str) -> None:
        self.upstream_requests.labels(upstream_route(url), outcome).inc()

    def upstream_retry(
        self, reply: requests.Response | None, error: Exception | None, delay: float
    ) -> None:
        request = reply.request if reply is not None else getattr(error, "request", None)
        url = getattr(request, "url", None) or ""
        self.upstream_retries.labels(upstream_route(url)).inc()

    def single_flight_wait(self) -> None:
        self.flight_waits.inc()

    # --- exposition

    def exposition(self) -> bytes:
        return generate_latest(self.exposed)


class RequestMetrics:
    """Falcon middleware: counts every answer, errors included (process_response)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        started = req.context.get("started")
        self.metrics.observe_request(
            req.uri_template,
            req.method,
            resp.status_code,
            cache_outcome_var.get(),
            time.perf_counter() - started if started else 0.0,
        )


class MetricsResource:
    """GET /metrics: Prometheus text format. No auth (as /healthz): expose it in-cluster only."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self.metrics.exposition()
        resp.content_type = CONTENT_TYPE_LATEST
        resp.cache_control = ["no-store"]


def middleware(metrics: Metrics | None) -> list[RequestMetrics]:
    """The falcon middleware counting requests (none with metrics off)."""
    return [] if metrics is None else [RequestMetrics(metrics)]


def add_route(app: falcon.App, metrics: Metrics | None) -> None:
    """``GET /metrics`` (with metrics off, the path is unknown: 404 like any other)."""
    if metrics is not None:
        app.add_route(PATH, MetricsResource(metrics))
