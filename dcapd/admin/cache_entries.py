"""``entries`` and ``delete-entry``: a dcapd cache directory's keys, listed or removed one at a
time, with no server needed (the cache is safe to share with a running dcapd)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..freshness import state_of
from ..store import COLLATERAL_KEY_FIELDS, Store
from .common import AdminError

# Kinds whose entries are answers dcapd serves and fetches (or selects) again when they are
# gone: collateral and PCK certificate answers. Everything else (platforms, certificate
# sets, the registration queue, appraisal policies, locks) needs --force.
DELETABLE_KINDS = (*COLLATERAL_KEY_FIELDS, "pckcert")


@dataclass
class Row:
    key: str
    kind: str
    size: int
    next_update: str | None
    state: str


def list_entries(store: Store, prefix: str = "", now: float | None = None) -> list[Row]:
    """Every key under ``prefix`` (sorted), with its kind, body size, nextUpdate and state."""
    clock = time.time() if now is None else now
    rows = []
    for key, entry in store.entries(prefix):
        next_update = entry.meta.get("next_update")
        rows.append(
            Row(
                key,
                store.parse_key(key).kind,
                len(entry.body),
                next_update,
                state_of(next_update, clock, 0.0),
            )
        )
    return rows


def entry_lines(rows: list[Row]) -> list[str]:
    header = ("KIND", "SIZE", "NEXT UPDATE", "STATE", "KEY")
    cells = [(r.kind, str(r.size), r.next_update or "-", r.state, r.key) for r in rows]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header) - 1)]
    return [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]])
        for row in [header, *cells]
    ]


def delete_entry(store: Store, key: str, force: bool) -> Row:
    """Remove one entry; returns what it was. Refuses keys that are not collateral or PCK
    certificate answers unless ``force``."""
    kind = store.parse_key(key).kind
    if kind not in DELETABLE_KINDS and not force:
        raise AdminError(
            f"{key}: a {kind!r} entry is not a collateral or PCK certificate answer "
            "(dcapd cannot fetch it again); --force deletes it anyway"
        )
    entry = store.pop(key)
    if entry is None:
        raise AdminError(f"{key}: no such entry in {store.directory}")
    next_update = entry.meta.get("next_update")
    return Row(key, kind, len(entry.body), next_update, state_of(next_update, time.time(), 0.0))
