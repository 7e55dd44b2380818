"""The WSGI application: ``create_app(config, store, upstream)``; knows nothing about TLS."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Callable

import falcon

from . import metrics, resources
from .backends import StoreUnavailable
from .config import Config, load_config
from .middleware import (
    PccsRequestRules,
    handle_http_error,
    handle_store_unavailable,
    handle_unexpected,
    serialize_error,
)
from .services import Services, build_services
from .store import Store
from .upstream import Upstream

API_VERSIONS = (3, 4)
STATUS_PATH = "/dcapd/status"  # dcapd's own admin view, outside Intel's API


# The route table: (TEE, API versions, path under /<tee>/certification/v<N>/, resource factory).
# Intel serves TDX only under v4, and only tcb and qe/identity there (pccs-reference.md §1.12).
# qae/identity and tcbevaluationdatanumbers are PCS v4 routes Intel's PCCS does not serve
# (pccs-1.27.md §3); tcb and the identities also take tcbEvaluationDataNumber there.
ROUTES: tuple[tuple[str, tuple[int, ...], str, Callable[[Services, int], object]], ...] = (
    ("sgx", API_VERSIONS, "pckcert", lambda s, v: resources.PckCert(s.pck_certs, v)),
    ("sgx", API_VERSIONS, "pckcrl", lambda s, v: resources.PckCrl(s.collateral, v)),
    ("sgx", API_VERSIONS, "tcb", lambda s, v: resources.TcbInfo(s.collateral, s.extra, "sgx", v)),
    ("tdx", (4,), "tcb", lambda s, v: resources.TcbInfo(s.collateral, s.extra, "tdx", v)),
    (
        "sgx",
        API_VERSIONS,
        "qe/identity",
        lambda s, v: resources.EnclaveIdentity(s.collateral, s.extra, "qe", v),
    ),
    (
        "sgx",
        API_VERSIONS,
        "qve/identity",
        lambda s, v: resources.EnclaveIdentity(s.collateral, s.extra, "qve", v),
    ),
    (
        "tdx",
        (4,),
        "qe/identity",
        lambda s, v: resources.EnclaveIdentity(s.collateral, s.extra, "tdqe", v),
    ),
    (
        "sgx",
        (4,),
        "qae/identity",
        lambda s, v: resources.EnclaveIdentity(s.collateral, s.extra, "qae", v),
    ),
    (
        "sgx",
        (4,),
        "tcbevaluationdatanumbers",
        lambda s, v: resources.TcbEvaluationDataNumbers(s.extra, "sgx"),
    ),
    (
        "tdx",
        (4,),
        "tcbevaluationdatanumbers",
        lambda s, v: resources.TcbEvaluationDataNumbers(s.extra, "tdx"),
    ),
    ("sgx", API_VERSIONS, "rootcacrl", lambda s, v: resources.RootCaCrl(s.collateral)),
    ("sgx", API_VERSIONS, "crl", lambda s, v: resources.Crl(s.collateral)),
    (
        "sgx",
        API_VERSIONS,
        "appraisalpolicy",
        lambda s, v: resources.AppraisalPolicy(s.auth, s.policies, s.config.max_body_bytes),
    ),
    ("sgx", API_VERSIONS, "refresh", lambda s, v: resources.Refresh(s.auth, s.refresher)),
    (
        "sgx",
        API_VERSIONS,
        "platforms",
        lambda s, v: resources.Platforms(s.auth, s.registrations, v, s.config.max_body_bytes),
    ),
    (
        "sgx",
        API_VERSIONS,
        "platformcollateral",
        lambda s, v: resources.PlatformCollateral(s.auth, s.upload, v, s.config.max_body_bytes),
    ),
)


def route_paths() -> Iterator[tuple[str, str, int, Callable[[Services, int], object]]]:
    for tee, versions, endpoint, factory in ROUTES:
        for version in versions:
            yield f"/{tee}/certification/v{version}/{endpoint}", tee, version, factory


class DcapdApp(falcon.App):
    """falcon.App that keeps its services reachable (for tests and for closing the cache)."""

    services: Services
    #: Answers may be tried in the server's own thread: every place the app can wait calls
    #: dcapd.inline.may_wait first (dcapd.direct; not with a cache whose reads can wait).
    answers_inline: bool = False


def create_app(
    config: Config | None = None, store: Store | None = None, upstream: Upstream | None = None
) -> DcapdApp:
    """Build the app and its services; collaborators not given are built from the config."""
    return app_for(build_services(config or load_config(), store, upstream))


def app_for(services: Services) -> DcapdApp:
    """The falcon app serving Intel's routes (and dcapd's own) from ``services``."""
    app = DcapdApp(
        middleware=[
            PccsRequestRules(services.config.trusted_proxies),
            *metrics.middleware(services.metrics),
        ],
        cors_enable=False,
    )
    app.req_options.strip_url_path_trailing_slash = True
    app.req_options.keep_blank_qs_values = True
    app.req_options.auto_parse_qs_csv = False
    app.resp_options.secure_cookies_by_default = False
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(StoreUnavailable, handle_store_unavailable)
    for path, _tee, version, factory in route_paths():
        app.add_route(path, factory(services, version))
    app.add_route(
        STATUS_PATH,
        resources.Status(
            services.auth,
            services.refresher,
            services.store,
            services.config.refresh_margin_hours * 3600.0,
        ),
    )
    app.add_route("/healthz", resources.Health())
    app.add_route(
        "/readyz",
        resources.Ready(
            services.store, services.upstream, services.config.cache_mode, services.lifecycle
        ),
    )
    metrics.add_route(app, services.metrics)
    app.services = services
    app.answers_inline = not services.store.reads_wait
    return app
