"""Intel's upload file (PccsAdminTool's ``platform_collaterals.json``), as far as more than one
command needs it: its API version, its identity kinds, and how a TCB info travels in it."""

from __future__ import annotations

import json
from typing import Any

from ..upload import tcb_info_body
from .common import AdminError

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
