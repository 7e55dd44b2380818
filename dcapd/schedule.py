"""Scheduled refresh inside the server process: Intel's cron schedule, plus an early refresh
whenever a cached entry's nextUpdate comes within a margin, so nothing expires while PCS is
reachable. Failures are logged once and retried with backoff; serving never waits."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from .backends import StoreUnavailable
from .cron import CronSchedule
from .errors import PccsError
from .freshness import parse_iso
from .logs import escape
from .refresh import Refresher
from .services import Services
from .store import Store

log = logging.getLogger("dcapd.schedule")


class RefreshScheduler:
    """Decides when to refresh; ``tick()`` does one decision (tests call it with a fake clock),
    ``start()`` runs ticks in a daemon thread."""

    MIN_EARLY_INTERVAL = 3600.0  # after an early refresh, wait before the next one
    MAX_BACKOFF = 3600.0
    # The first check comes this soon after start, so an entry whose nextUpdate is already
    # inside the margin is refreshed within seconds, not at the next periodic check.
    STARTUP_DELAY = 2.0

    def __init__(
        self,
        refresher: Refresher,
        store: Store,
        schedule: CronSchedule,
        margin_seconds: float,
        clock: Callable[[], float] = time.time,
        check_interval: float = 300.0,
        lock_wait: float = 0.0,
    ):
        """``lock_wait``: how long to wait for another process's refresh to finish (it may
        be the very refresh that is due)."""
        self.refresher = refresher
        self.store = store
        self.schedule = schedule
        self.margin = margin_seconds
        self.clock = clock
        self.check_interval = check_interval
        self.lock_wait = lock_wait
        now = clock()
        self.next_scheduled = self._next_cron(now)
        self.retry_at: float | None = None
        self.due_since: float | None = None  # when the pending refresh became due
        self.failures = 0
        self.last_early: float = float("-inf")
        self.checked = False  # no tick yet since start
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def next_run_iso(self) -> str:
        """The next scheduled refresh, ISO 8601 UTC (cron fields are in local time)."""
        moment = datetime.fromtimestamp(self.next_scheduled, tz=timezone.utc)
        return moment.isoformat(timespec="seconds").replace("+00:00", "Z")

    def _next_cron(self, now: float) -> float:
        return self.schedule.next_after(datetime.fromtimestamp(now)).timestamp()

    def expiring(self, now: float) -> list[str]:
        """Cached entries whose nextUpdate is within the margin."""
        soon = []
        for entry in self.refresher.status()["entries"]:
            next_update = parse_iso(entry.get("next_update"))
            if next_update is not None and next_update - now < self.margin:
                soon.append(entry["key"])
        return soon

    def due(self, now: float) -> str | None:
        if self.refresher.mode == "OFFLINE":
            return None  # Intel: the scheduled refresh is a silent no-op offline
        if self.retry_at is not None:
            return "retry" if now >= self.retry_at else None
        if now >= self.next_scheduled:
            return "schedule"
        if now - self.last_early >= self.MIN_EARLY_INTERVAL:
            soon = self.expiring(now)
            if soon:
                return f"{len(soon)} entries expire within the margin (e.g. {soon[0]})"
        return None

    def tick(self) -> bool | None:
        """Refresh if due. None = nothing due; True = refreshed; False = failed (retried)."""
        now = self.clock()
        self.checked = True
        reason = self.due(now)
        if reason is None:
            return None
        if reason not in ("schedule", "retry"):
            self.last_early = now
        if reason != "retry" or self.due_since is None:
            self.due_since = self.next_scheduled if reason == "schedule" else now
        try:
            # Nodes sharing one database fire together: one refreshes, the others wait for
            # its lock and then find the refresh done since it was due.
            report = self.refresher.refresh_collateral(
                wait=self.lock_wait, unless_done_since=self.due_since
            )
        except (PccsError, OSError, StoreUnavailable) as exc:
            self.failures += 1
            delay = min(self.MAX_BACKOFF, 60.0 * 2 ** (self.failures - 1))
            self.retry_at = now + delay
            log.warning(
                "scheduled refresh (%s) failed: %s; retrying in %.0f s",
                reason,
                escape(getattr(exc, "reason", "") or exc),  # may quote upstream's answer
                delay,
            )
            return False
        self.failures = 0
        self.retry_at = None
        self.due_since = None
        self.next_scheduled = self._next_cron(now)
        log.info(
            "scheduled refresh (%s) %s", reason, "done elsewhere" if report.skipped else "done"
        )
        return True

    def start(self) -> None:
        log.info("refresh schedule: next run at %s", self.next_run_iso())
        self._thread = threading.Thread(target=self._run, name="dcapd-refresh", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop ticking; wait up to *timeout* for a refresh in progress (then it is cut: each
        refresh is one cache transaction, so the cache keeps its previous data)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                log.info("stop: the refresh in progress is cut; the cache keeps its data")

    def _run(self) -> None:
        while not self._stop.wait(self.next_check_in()):
            try:
                self.tick()
            except Exception:  # never let the refresh thread die
                log.exception("scheduled refresh crashed")

    def next_check_in(self) -> float:
        """Seconds until the next tick: soon after start, then as the schedule, a retry or
        the periodic check of nextUpdate dates asks."""
        if not self.checked:
            return self.STARTUP_DELAY
        now = self.clock()
        until = min(self.next_scheduled, self.retry_at or float("inf")) - now
        return max(1.0, min(self.check_interval, until))


def scheduler_for(services: Services) -> RefreshScheduler:
    """The scheduler the server runs, built from the app's services and configuration."""
    config = services.config
    return RefreshScheduler(
        services.refresher,
        services.store,
        CronSchedule(config.refresh_schedule),
        config.refresh_margin_hours * 3600.0,
        lock_wait=60.0,
    )
