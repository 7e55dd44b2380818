"""Scheduled refresh inside the server process: Intel's cron schedule, plus an early refresh
whenever a cached entry's nextUpdate comes within a margin, so nothing expires while PCS is
reachable. Failures are logged once and retried with backoff; serving never waits."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

from .errors import PccsError
from .refresh import Refresher
from .store import Store

log = logging.getLogger("dcapd.schedule")

_FIELDS = (
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day", 1, 31),
    ("month", 1, 12),
    ("weekday", 0, 7),
)


def _parse_field(text: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if body == "*":
            start, end = low, high
        elif "-" in body:
            start, end = (int(v) for v in body.split("-", 1))
        else:
            start = end = int(body)
            if step_text:
                end = high
        if step < 1 or not low <= start <= end <= high:
            raise ValueError(f"{part!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


class CronSchedule:
    """node-schedule's cron strings as Intel's RefreshSchedule uses them: six fields
    (second minute hour day-of-month month day-of-week) or the classic five (no seconds)."""

    def __init__(self, text: str):
        fields = text.split()
        if len(fields) == 5:
            fields = ["0"] + fields
        if len(fields) != 6:
            raise ValueError(f"expected 5 or 6 cron fields, got {text!r}")
        parsed = [_parse_field(f, low, high) for f, (_, low, high) in zip(fields, _FIELDS)]
        self.seconds, self.minutes, self.hours, self.days, self.months, weekdays = parsed
        self.weekdays = frozenset(d % 7 for d in weekdays)  # 0 and 7 are both Sunday
        self.any_day = fields[3] == "*"
        self.any_weekday = fields[5] == "*"
        self.text = text

    def _day_matches(self, moment: datetime) -> bool:
        weekday = (moment.weekday() + 1) % 7  # cron: Sunday = 0
        day_ok, weekday_ok = moment.day in self.days, weekday in self.weekdays
        if self.any_day or self.any_weekday:  # cron: restricted fields are ANDed ...
            return day_ok and weekday_ok
        return day_ok or weekday_ok  # ... unless both are restricted: then ORed

    def next_after(self, moment: datetime) -> datetime:
        """The first matching time strictly after ``moment`` (a naive local datetime)."""
        candidate = moment.replace(microsecond=0) + timedelta(seconds=1)
        limit = candidate + timedelta(days=366 * 5)
        while candidate < limit:
            if candidate.month not in self.months or not self._day_matches(candidate):
                candidate = (candidate + timedelta(days=1)).replace(hour=0, minute=0, second=0)
                continue
            if candidate.hour not in self.hours:
                candidate = (candidate + timedelta(hours=1)).replace(minute=0, second=0)
                continue
            if candidate.minute not in self.minutes:
                candidate = (candidate + timedelta(minutes=1)).replace(second=0)
                continue
            if candidate.second not in self.seconds:
                candidate += timedelta(seconds=1)
                continue
            return candidate
        raise ValueError(f"cron schedule {self.text!r} never fires")


def parse_iso(value) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return (
            datetime.strptime(value.replace(".000Z", "Z"), "%Y-%m-%dT%H:%M:%SZ")
            .replace(tzinfo=timezone.utc)
            .timestamp()
        )
    except ValueError:
        return None


class RefreshScheduler:
    """Decides when to refresh; ``tick()`` does one decision (tests call it with a fake clock),
    ``start()`` runs ticks in a daemon thread."""

    MIN_EARLY_INTERVAL = 3600.0  # after an early refresh, wait before the next one
    MAX_BACKOFF = 3600.0

    def __init__(
        self,
        refresher: Refresher,
        store: Store,
        schedule: CronSchedule,
        margin_seconds: float,
        clock: Callable[[], float] = time.time,
        check_interval: float = 300.0,
    ):
        self.refresher = refresher
        self.store = store
        self.schedule = schedule
        self.margin = margin_seconds
        self.clock = clock
        self.check_interval = check_interval
        now = clock()
        self.next_scheduled = self._next_cron(now)
        self.retry_at: float | None = None
        self.failures = 0
        self.last_early: float = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        reason = self.due(now)
        if reason is None:
            return None
        if reason not in ("schedule", "retry"):
            self.last_early = now
        try:
            self.refresher.refresh_collateral(wait=0)
        except (PccsError, OSError) as exc:
            self.failures += 1
            delay = min(self.MAX_BACKOFF, 60.0 * 2 ** (self.failures - 1))
            self.retry_at = now + delay
            log.warning(
                "scheduled refresh (%s) failed: %s; retrying in %.0f s",
                reason,
                getattr(exc, "reason", "") or exc,
                delay,
            )
            return False
        self.failures = 0
        self.retry_at = None
        self.next_scheduled = self._next_cron(now)
        log.info("scheduled refresh (%s) done", reason)
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dcapd-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._sleep_time()):
            try:
                self.tick()
            except Exception:  # never let the refresh thread die
                log.exception("scheduled refresh crashed")

    def _sleep_time(self) -> float:
        now = self.clock()
        until = min(self.next_scheduled, self.retry_at or float("inf")) - now
        return max(1.0, min(self.check_interval, until))


def scheduler_for(services) -> RefreshScheduler:
    """The scheduler the server runs, built from the app's services and configuration."""
    config = services.config
    return RefreshScheduler(
        services.refresher,
        services.store,
        CronSchedule(config.refresh_schedule),
        config.refresh_margin_hours * 3600.0,
    )
