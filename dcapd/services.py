"""The one place dcapd's collaborators are built and wired together.

``build_services(config)`` is what the server (``dcapd``), the WSGI entry point, the Intel
database migration and ``dcapd-admin`` use; ``create_app`` only routes requests to them.
Each part gets what it needs here, so no part reaches through another for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .auth import Auth
from .backends import Backend
from .backends.disk import DiskBackend
from .backends.postgres import PostgresBackend
from .collateral import Collateral
from .config import Config
from .extra import ExtraCollateral
from .freshness import ExpiryWarnings
from .instruments import Instruments
from .integrity import Integrity
from .lifecycle import Lifecycle
from .metrics import Metrics
from .pckcerts import PckCerts
from .platforms import Registrations
from .policies import Policies
from .refresh import Refresher
from .store import Store
from .upload import CollateralUpload
from .upstream import Upstream

log = logging.getLogger("dcapd")

# How much longer than one upstream deadline another process's fill lock is honoured.
_FILL_LOCK_SLACK = 5.0
# A platform's fill makes up to three upstream calls (pckcerts, then its TCB info and CRL).
_PLATFORM_FILL_CALLS = 3


def open_backend(config: Config) -> Backend:
    """The cache the configuration names: ``[cache] url`` (PostgreSQL) or ``[cache] dir``."""
    if config.cache_url:
        return PostgresBackend(config.cache_url, config.cache_pool_size, config.cache_timeout)
    return DiskBackend(config.cache_dir)


@dataclass(frozen=True)
class Services:
    """The collaborators a resource, a command or a scheduler may be built from."""

    config: Config
    store: Store
    upstream: Upstream
    integrity: Integrity
    collateral: Collateral
    extra: ExtraCollateral
    pck_certs: PckCerts
    auth: Auth
    registrations: Registrations
    upload: CollateralUpload
    policies: Policies
    refresher: Refresher
    metrics: Metrics | None = None  # None: [metrics] enabled = false
    lifecycle: Lifecycle = field(default_factory=Lifecycle)  # set draining by the server

    def close(self) -> None:
        """Release the cache and the upstream connections (the process is done with them),
        and first any cache lock still held (a refresh or a fill cut at a stop)."""
        try:
            released = self.store.release_locks()
        except Exception as exc:  # the cache may be what failed: the locks then expire
            log.warning("could not release cache locks: %s", type(exc).__name__)
        else:
            if released:
                log.info("released %d cache lock(s) held by work cut at the stop", released)
        self.store.close()
        self.upstream.close()


def build_services(
    config: Config, store: Store | None = None, upstream: Upstream | None = None
) -> Services:
    """Wire dcapd's parts from the configuration; ``store`` and ``upstream`` may be given
    (tests, tools that open their own cache or talk to PCS with their own retry policy)."""
    store = store if store is not None else Store(config.cache_dir, backend=open_backend(config))
    metrics = Metrics(config, store) if config.metrics_enabled else None
    measure = Instruments(metrics)  # what counts upstream calls, rejections, waits, refreshes
    upstream = upstream if upstream is not None else Upstream(config, **measure.upstream)
    integrity = Integrity.from_file(config.trusted_roots)
    checks = measure.integrity(integrity)  # of upstream data; uploads keep ``integrity``
    fill_lock_ttl = config.upstream_timeout + _FILL_LOCK_SLACK
    expiry = ExpiryWarnings(logging.getLogger("dcapd.expiry"))
    collateral = Collateral(
        store,
        upstream,
        config.cache_mode,
        checks,
        fill_lock_ttl,
        not_found_ttl=config.not_found_ttl,
        on_flight_wait=measure.flight_wait,
        expiry=expiry,
    )
    extra = ExtraCollateral(collateral)
    pck_certs = PckCerts(
        store,
        upstream,
        collateral,
        checks,
        config.cache_mode,
        _PLATFORM_FILL_CALLS * config.upstream_timeout + _FILL_LOCK_SLACK,
        config.selected_per_platform,
        measure.flight_wait,
    )
    return Services(
        config=config,
        store=store,
        upstream=upstream,
        integrity=integrity,
        collateral=collateral,
        extra=extra,
        pck_certs=pck_certs,
        auth=Auth(config.user_token_sha512, config.admin_token_sha512),
        registrations=Registrations(store, pck_certs, collateral, config.cache_mode),
        upload=CollateralUpload(store, pck_certs, integrity, extra, expiry),
        policies=Policies(store),
        refresher=measure.refresher(
            store, collateral, pck_certs, config.cache_mode, upstream.version, extra=extra
        ),
        metrics=metrics,
    )
