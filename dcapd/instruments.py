"""The measured variants of dcapd's parts, given to them by ``build_services`` when metrics
are on; with metrics off the plain parts are built and nothing is measured.

* :class:`UpstreamSession`: the requests session of :class:`~dcapd.upstream.Upstream`, telling
  every attempt's outcome by PCS route (never a query value or a header);
* the retry callback of its :class:`~dcapd.upstream.RetryPolicy`: every retry;
* :class:`CountedIntegrity`: the checks of upstream data, counting what they reject;
* the single-flight callback of Collateral and PckCerts: callers answered by another's fill;
* :class:`MeasuredRefresher`: every refresh run, its result and duration.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Callable

import requests
from cryptography import x509

from .integrity import Integrity, IntegrityError
from .metrics import Metrics, upstream_outcome
from .refresh import Refresher, RefreshReport
from .upstream import RetryPolicy


class UpstreamSession(requests.Session):
    """Tells :class:`Metrics` the outcome of every upstream attempt."""

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        text = url.decode() if isinstance(url, bytes) else url
        try:
            reply = super().request(method, url, *args, **kwargs)
        except requests.RequestException:
            self.metrics.upstream_attempt(text, "error")
            raise
        self.metrics.upstream_attempt(text, upstream_outcome(reply.status_code))
        return reply


class CountedIntegrity(Integrity):
    """The integrity checks of upstream data (Collateral, PckCerts), counting rejections by
    collateral kind. Uploads keep the plain :class:`Integrity`: they are not upstream replies."""

    def __init__(self, checks: Integrity, metrics: Metrics):
        self.roots = checks.roots  # the same trust anchors, not parsed again
        self.rejected = metrics.upstream_rejected

    @contextmanager
    def _counted(self, kind: str) -> Iterator[None]:
        try:
            yield
        except IntegrityError:
            self.rejected.labels(kind).inc()
            raise

    def check_signed_json(self, body: bytes, top_key: str, chain_header: str) -> None:
        with self._counted("tcb" if top_key == "tcbInfo" else "identity"):
            super().check_signed_json(body, top_key, chain_header)

    def check_crl(self, der: bytes, chain_header: str | None) -> None:
        with self._counted("pckcrl" if chain_header else "rootcacrl"):
            super().check_crl(der, chain_header)

    def check_crl_any_known_issuer(self, der: bytes, chain_headers: Sequence[str]) -> None:
        with self._counted("crl"):
            super().check_crl_any_known_issuer(der, chain_headers)

    def check_pck_cert(
        self,
        pem: str,
        chain_header: str,
        verified_chains: dict[str, list[x509.Certificate]] | None = None,
    ) -> None:
        with self._counted("pckcert"):
            super().check_pck_cert(pem, chain_header, verified_chains)


class MeasuredRefresher(Refresher):
    """A :class:`~dcapd.refresh.Refresher` that counts and times its runs."""

    def __init__(self, metrics: Metrics, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    @contextmanager
    def _measured(self, kind: str) -> Iterator[None]:
        started = time.perf_counter()
        result = "error"
        try:
            yield
            result = "ok"
        finally:
            self.metrics.refresh_duration.labels(kind).observe(time.perf_counter() - started)
            self.metrics.refresh_runs.labels(kind, result).inc()

    def refresh_collateral(
        self, wait: float = 60.0, unless_done_since: float | None = None
    ) -> RefreshReport:
        with self._measured("collateral"):
            return super().refresh_collateral(wait, unless_done_since)

    def refresh_certs(self, fmspcs: set[str] | None = None, wait: float = 60.0) -> RefreshReport:
        with self._measured("certs"):
            return super().refresh_certs(fmspcs, wait)


class Instruments:
    """What ``build_services`` gives its parts: measured ones, or (metrics off) plain ones."""

    def __init__(self, metrics: Metrics | None):
        self.metrics = metrics
        self.upstream: dict[str, Any] = {}  # keyword arguments of Upstream
        self.flight_wait: Callable[[], None] | None = None
        if metrics is not None:
            self.upstream = dict(
                session=UpstreamSession(metrics),
                retry=RetryPolicy(on_retry=metrics.upstream_retry),
            )
            self.flight_wait = metrics.single_flight_wait

    def integrity(self, checks: Integrity) -> Integrity:
        return checks if self.metrics is None else CountedIntegrity(checks, self.metrics)

    def refresher(self, *args: Any, **kwargs: Any) -> Refresher:
        if self.metrics is None:
            return Refresher(*args, **kwargs)
        return MeasuredRefresher(self.metrics, *args, **kwargs)
