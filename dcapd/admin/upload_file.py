"""Intel's upload file (PccsAdminTool's ``platform_collaterals.json``), as far as more than one
command needs it: its API version, its identity kinds, and how a TCB info travels in it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from ..collateral import BadUpstreamData, crl_meta, signed_json_meta
from ..freshness import EXPIRED, state_of
from ..upload import tcb_info_body
from .common import AdminError, plural

# Identity kinds in the order of Intel's upload file (their PCS paths: upstream).
IDENTITY_KINDS = ("qe", "tdqe", "qve")


def upload_version(body: Any, where: str) -> int:
    collaterals = body.get("collaterals") if isinstance(body, dict) else None
    if not isinstance(collaterals, dict):
        raise AdminError(f"{where}: not an upload file (no collaterals object)")
    version = collaterals.get("version", 3)  # Intel's v3 format has no version key
    if version not in (3, 4):
        raise AdminError(f"{where}: collaterals.version {version!r} is not 3 or 4")
    return version


def tcb_info_fields(name: str, body: bytes) -> dict[str, Any]:
    """``{name: parsed}``, plus ``{name}_raw`` when the original is not what the upload
    stores for the parsed form (Intel's compact JSON)."""
    document = json.loads(body)
    fields: dict[str, Any] = {name: document}
    if tcb_info_body(document) != body:
        fields[f"{name}_raw"] = body.decode("utf-8")
    return fields


def _next_updates(body: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(item, its nextUpdate) for every TCB info, identity and CRL of an upload body (and
    of its dcapd extension keys), the dates read as dcapd stores them (its meta)."""
    if not isinstance(body, dict):
        return
    collaterals = body.get("collaterals")
    if isinstance(collaterals, dict):
        for index, item in enumerate(collaterals.get("tcbinfos") or []):
            for name, document in item.items() if isinstance(item, dict) else ():
                if isinstance(document, dict) and isinstance(document.get("tcbInfo"), dict):
                    meta = signed_json_meta(document["tcbInfo"])
                    yield f"{where}tcbinfos[{index}].{name}", meta["next_update"]
        for name, text in collaterals.items():
            if name.endswith(("identity", "identity_early")) and isinstance(text, str) and text:
                try:
                    inner = json.loads(text).get("enclaveIdentity")
                except (ValueError, AttributeError):
                    continue
                if isinstance(inner, dict):
                    yield f"{where}{name}", signed_json_meta(inner)["next_update"]
        crls = collaterals.get("pckcacrl")
        named = dict(crls) if isinstance(crls, dict) else {}
        named["rootcacrl"] = collaterals.get("rootcacrl")
        for name, value in named.items():
            yield from _crl_next_update(f"{where}{name}", value)
    extra = body.get("dcapd_extra_uploads")
    for index, part in enumerate(extra if isinstance(extra, list) else []):
        yield from _next_updates(part, f"{where}dcapd_extra_uploads[{index}].")
    crls = body.get("dcapd_crls")
    for uri, value in crls.items() if isinstance(crls, dict) else ():
        yield from _crl_next_update(f"{where}dcapd_crls[{uri}]", value)


def _crl_next_update(what: str, value: Any) -> Iterator[tuple[str, Any]]:
    try:
        yield what, crl_meta(bytes.fromhex(value))["next_update"]
    except (TypeError, ValueError, BadUpstreamData):
        return


def expired_items(body: Any, now: float | None = None) -> tuple[int, list[str]]:
    """(how many dated items the upload body holds, those past their nextUpdate)."""
    clock = time.time() if now is None else now
    dated = list(_next_updates(body, ""))
    return len(dated), [what for what, when in dated if state_of(when, clock, 0.0) == EXPIRED]


def expiry_note(body: Any) -> str:
    """The line ``fetch``, ``put`` and ``import`` print about expired collateral, or ""."""
    total, expired = expired_items(body)
    if not expired:
        return ""
    return (
        f"{plural(len(expired), 'collateral item')} of {total} past nextUpdate "
        f"(e.g. {expired[0]}): clients verifying with them may reject quotes"
    )
