"""Cron expressions as Intel's RefreshSchedule writes them (node-schedule's syntax).

Pure: no I/O, no clock. At the bottom of the import graph so that config can validate a
schedule without importing the scheduler (which imports refresh, collateral, upstream...).
"""

from __future__ import annotations

from datetime import datetime, timedelta

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
