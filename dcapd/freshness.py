"""How fresh cached collateral is: past its nextUpdate (expired), inside the refresh margin
(expiring), or fresh. Pure: the callers pass the clock. For an air-gapped site, expired
collateral is the day-2 risk, so dcapd says so wherever it stores or serves it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, Callable

EXPIRED, EXPIRING, FRESH, UNKNOWN = "expired", "expiring", "fresh", "unknown"


def parse_iso(value: object) -> float | None:
    """Intel's ``nextUpdate``/``issueDate`` (``2025-06-18T10:00:00Z``, optionally with
    ``.000``) as an epoch, or None when it is not one."""
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


def state_of(next_update: object, now: float, margin: float) -> str:
    """expired (past nextUpdate), expiring (within ``margin`` seconds of it), fresh, or
    unknown (no nextUpdate: PCK certificates, policies)."""
    when = parse_iso(next_update)
    if when is None:
        return UNKNOWN
    if when <= now:
        return EXPIRED
    return EXPIRING if when - now <= margin else FRESH


def annotate(entries: Iterable[dict[str, Any]], now: float, margin: float) -> dict[str, Any]:
    """Mark each status entry with its ``state`` and count entries by kind and by state."""
    by_kind: dict[str, int] = {}
    by_state = {EXPIRED: 0, EXPIRING: 0, FRESH: 0, UNKNOWN: 0}
    for entry in entries:
        entry["state"] = state_of(entry.get("next_update"), now, margin)
        by_state[entry["state"]] += 1
        kind = str(entry.get("kind", "other"))
        by_kind[kind] = by_kind.get(kind, 0) + 1
    return {"entries_by_kind": by_kind, "entries_by_state": by_state}


class ExpiryWarnings:
    """Logs one warning per cache key and action (cached, uploaded, served) at most every
    ``interval`` seconds when collateral past its nextUpdate is stored or served: loud
    enough to be seen, never a flood. A key's verdict is kept for ``recheck`` seconds, so a
    cache hit costs a dict lookup, not a parse."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 3600.0,
        clock: Callable[[], float] = time.time,
        recheck: float = 60.0,
    ):
        self.logger = logger
        self.interval = interval
        self.recheck = recheck
        self.clock = clock
        # key -> (when checked, nextUpdate, nextUpdate as an epoch)
        self._verdicts: dict[str, tuple[float, str | None, float | None]] = {}
        self._warned: dict[tuple[str, str], float] = {}  # (action, key) -> when warned
        self._lock = threading.Lock()

    def check(
        self, key: str, meta: Callable[[], Mapping[str, Any]], action: str, fresh: bool = False
    ) -> bool:
        """Warn if the entry whose metadata ``meta()`` gives is expired; True when it is.
        ``fresh``: the entry was just written (its verdict is not taken from before)."""
        now = self.clock()
        known = None if fresh else self._verdicts.get(key)
        if known is not None and now - known[0] < self.recheck:
            next_update, when = known[1], known[2]
        else:
            value = meta().get("next_update")
            next_update = value if isinstance(value, str) else None
            when = parse_iso(next_update)  # parsed once per recheck, not on every hit
            self._verdicts[key] = (now, next_update, when)
        if when is None or when > now:  # state_of(next_update, now, 0.0) != EXPIRED
            return False
        with self._lock:
            last = self._warned.get((action, key))
            if last is not None and now - last < self.interval:
                return True
            self._warned[(action, key)] = now
        self.logger.warning(
            "%s %s: expired (nextUpdate %s); clients verifying with it may reject quotes",
            action,
            key,
            next_update,
        )
        return True
