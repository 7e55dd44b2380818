"""What the cache holds, as Prometheus metrics computed when ``/metrics`` is scraped.

Entries by kind, queued registrations, the earliest ``nextUpdate`` of each collateral kind and
the entries already past it, the last successful refresh of each kind. All of it is read from
the cache, so every worker process and node on one cache reports the same. The scan is
bounded: it runs at most once per ``SCAN_INTERVAL`` seconds (concurrent scrapes share it) and
reads at most ``MAX_ENTRIES_READ`` collateral entries; request handling never pays for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Callable

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

from . import __version__
from .store import Store

CACHE_BACKEND = "diskcache"
COLLATERAL_KINDS = ("tcb", "identity", "pckcrl", "rootcacrl", "crl")
# The first part of every key store.py builds; anything else is counted as "other".
ENTRY_KINDS = frozenset(
    {
        *COLLATERAL_KINDS,
        "pckcert",
        "platform",
        "certs",
        "rawtcbs",
        "reg",
        "appraisal",
        "policy",
        "status",
        "lock",
    }
)
REFRESH_KINDS = ("collateral", "certs")
SCAN_INTERVAL = 10.0  # seconds a scrape reuses the previous scan of the cache
MAX_ENTRIES_READ = 10_000  # collateral entries read per scan (more are counted, not read)


def parse_iso(value: object) -> float | None:
    """Seconds since the epoch of an ISO 8601 UTC date (as Intel writes nextUpdate)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


class CacheStateCollector:
    """What the cache holds, computed when scraped (at most once per ``SCAN_INTERVAL``)."""

    def __init__(self, store: Store, mode: str, clock: Callable[[], float] = time.time):
        self.store = store
        self.mode = mode
        self.clock = clock
        self._lock = threading.Lock()
        self.interval = SCAN_INTERVAL
        self._scanned_at: float | None = None
        self._families: list[Metric] = []

    def describe(self) -> Iterator[Metric]:
        yield from self._empty_families()

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # concurrent scrapes share one scan
            now = time.monotonic()
            if self._scanned_at is None or now - self._scanned_at >= self.interval:
                self._families = self._scan()
                self._scanned_at = now
            families = list(self._families)
        yield from families

    def _empty_families(
        self,
    ) -> tuple[
        InfoMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
    ]:
        return (
            InfoMetricFamily("dcapd_build", "dcapd version, cache backend and cache mode"),
            GaugeMetricFamily(
                "dcapd_cache_entries",
                "Cache entries by kind (first part of the key)",
                labels=("kind",),
            ),
            GaugeMetricFamily(
                "dcapd_registrations_queued",
                "Platform registrations queued, by state",
                labels=("state",),
            ),
            GaugeMetricFamily(
                "dcapd_collateral_next_update_earliest_timestamp_seconds",
                "Earliest nextUpdate among cached collateral of each kind (Unix time)",
                labels=("kind",),
            ),
            GaugeMetricFamily(
                "dcapd_collateral_expired_entries",
                "Cached collateral entries whose nextUpdate has passed, by kind",
                labels=("kind",),
            ),
            GaugeMetricFamily(
                "dcapd_refresh_last_success_timestamp_seconds",
                "When the last successful refresh of each kind finished (Unix time)",
                labels=("kind",),
            ),
        )

    def _scan(self) -> list[Metric]:
        build, entries, queued, earliest, expired, last_refresh = self._empty_families()
        build.add_metric(
            [], {"version": __version__, "cache_backend": CACHE_BACKEND, "mode": self.mode}
        )
        now = self.clock()
        counts: dict[str, int] = {}
        states: dict[str, int] = dict.fromkeys(self.store.REGISTRATION_STATES, 0)
        soonest: dict[str, float] = {}
        past: dict[str, int] = dict.fromkeys(COLLATERAL_KINDS, 0)
        read = 0
        for key in self.store.keys():
            kind = key.partition("/")[0]
            kind = kind if kind in ENTRY_KINDS else "other"
            counts[kind] = counts.get(kind, 0) + 1
            if kind == "reg":
                state = key.split("/")[1]
                if state in states:
                    states[state] += 1
            if kind not in past or read >= MAX_ENTRIES_READ:
                continue
            read += 1
            entry = self.store.get(key)
            next_update = parse_iso(entry.meta.get("next_update")) if entry is not None else None
            if next_update is None:
                continue
            soonest[kind] = min(next_update, soonest.get(kind, next_update))
            if next_update <= now:
                past[kind] += 1
        for kind, count in sorted(counts.items()):
            entries.add_metric([kind], count)
        for state, count in states.items():
            queued.add_metric([state], count)
        for kind, moment in sorted(soonest.items()):
            earliest.add_metric([kind], moment)
        for kind, count in past.items():
            expired.add_metric([kind], count)
        status = self.store.get_json(self.store.STATUS_KEY) or {}
        for kind in REFRESH_KINDS:
            if isinstance(status.get(f"last_{kind}_refresh"), (int, float)):
                last_refresh.add_metric([kind], status[f"last_{kind}_refresh"])
        return [build, entries, queued, earliest, expired, last_refresh]
