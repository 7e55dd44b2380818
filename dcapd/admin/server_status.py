"""dcapd's ``GET /dcapd/status`` (:class:`dcapd.resources.Status`) for ``status`` and
``refresh``: read it, show it as a table, and tell two of them apart."""

from __future__ import annotations

import json
from typing import Any

from ..app import STATUS_PATH
from ..freshness import EXPIRED, EXPIRING
from ..resources import iso_time
from .common import AdminError, plural
from .pccs import Pccs

# How each state is marked in the table's first column.
MARKS = {EXPIRED: "!", EXPIRING: "~"}


def fetch_status(pccs: Pccs) -> tuple[dict[str, Any], str]:
    """The server's status document (admin token), parsed and as sent; AdminError when there
    is none."""
    url = pccs.root + STATUS_PATH.lstrip("/")
    reply = pccs.request("GET", url)
    try:
        status = json.loads(reply.content)
        if not isinstance(status, dict) or not isinstance(status.get("entries"), list):
            raise ValueError("no entries list")
    except ValueError as exc:
        raise AdminError(f"GET {url}: not dcapd's status ({exc})") from None
    return status, reply.text


def read_status(pccs: Pccs) -> dict[str, Any]:
    return fetch_status(pccs)[0]


def _when(value: Any) -> str:
    """A refresh time as the status gives it (an epoch), or never."""
    if isinstance(value, (int, float)):
        return iso_time(value) or "?"
    return str(value) if value else "never"


def status_lines(status: dict[str, Any]) -> list[str]:
    """The status as an operator reads it: a line about the server, a table of entries
    (kind, key, next update, state; expired and expiring marked), then the counts."""
    lines = [
        f"mode {status.get('mode', '?')}, now {status.get('now', '?')}, "
        f"last collateral refresh {_when(status.get('last_collateral_refresh'))}, "
        f"last certificate refresh {_when(status.get('last_certs_refresh'))}"
    ]
    rows = [
        (
            MARKS.get(str(entry.get("state")), " "),
            str(entry.get("kind", "")),
            str(entry.get("key", "")),
            str(entry.get("next_update") or "-"),
            str(entry.get("state", "")),
        )
        for entry in sorted(status["entries"], key=lambda e: str(e.get("key", "")))
        if isinstance(entry, dict)
    ]
    header = (" ", "KIND", "KEY", "NEXT UPDATE", "STATE")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    counts = status.get("counts") or {}
    by_state = counts.get("entries_by_state") or {}
    by_kind = counts.get("entries_by_kind") or {}
    lines.append(
        f"{plural(len(rows), 'entry', 'entries')}: "
        + ", ".join(f"{count} {state}" for state, count in by_state.items())
        + (
            "; by kind: " + ", ".join(f"{kind} {n}" for kind, n in by_kind.items())
            if by_kind
            else ""
        )
    )
    if "platforms" in counts:
        lines.append(
            f"{plural(counts['platforms'], 'platform')}, "
            f"{plural(counts.get('pck_certificate_answers', 0), 'PCK certificate answer')}"
        )
    marked = sorted({mark for mark, *_ in rows if mark.strip()})
    if marked:
        legend = {"!": "! expired (past nextUpdate)", "~": "~ expiring (within the refresh margin)"}
        lines.append("; ".join(legend[mark] for mark in marked))
    return lines


def _version(entry: dict[str, Any]) -> str:
    text = str(entry.get("issue_date") or "?")
    if entry.get("tcb_evaluation_data_number") is not None:
        text += f" (TCB eval {entry['tcb_evaluation_data_number']})"
    return text


def status_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What a refresh changed, as two status documents show it: entries new, gone, or with
    another issue date (or TCB evaluation number)."""

    def by_key(status: dict[str, Any]) -> dict[str, dict]:
        return {str(e.get("key")): e for e in status["entries"] if isinstance(e, dict)}

    old, new = by_key(before), by_key(after)
    changes = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            changes.append(f"{key}: new ({_version(new[key])})")
        elif key not in new:
            changes.append(f"{key}: gone")
        elif _version(old[key]) != _version(new[key]):
            changes.append(f"{key}: {_version(old[key])} -> {_version(new[key])}")
    for name in ("platforms", "pck_certificate_answers"):  # what a certificate refresh adds
        counts = [(status.get("counts") or {}).get(name) for status in (before, after)]
        if counts[0] != counts[1]:
            changes.append(f"{name.replace('_', ' ')}: {counts[0]} -> {counts[1]}")
    return changes
