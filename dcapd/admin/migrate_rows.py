"""What every part of the import shares: Intel's column values as dcapd takes them (a row
that cannot be taken raises :class:`Skip`), the summary the parts count into, and
:class:`RowReader`, which skips a row with a warning or checks it is what Intel signed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from ..hexstr import is_hex
from ..integrity import Integrity, IntegrityError

log = logging.getLogger("dcapd.migrate")

SOURCE = "intel-pccs"  # the ``source`` of the entries the import writes


@dataclass
class ImportSummary:
    """What an import wrote (counts of imported rows) and what it skipped, with reasons."""

    source: str
    api_version: int = 4
    db_version: int | None = None
    platforms: int = 0
    pck_certs: int = 0
    raw_tcbs: int = 0
    raw_tcbs_kept_as_mapped: int = 0  # answered as Intel mapped them, not by re-selection
    tcb_infos: int = 0
    identities: int = 0
    pck_crls: int = 0
    root_ca_crl: int = 0
    crls: int = 0
    appraisal_policies: int = 0
    queued_new: int = 0
    queued_not_available: int = 0
    skipped: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = [
            f"Intel PCCS database {self.source} (PCS API v{self.api_version}, "
            f"db_version {self.db_version if self.db_version is not None else '?'}):",
            f"  platforms: {self.platforms} ({self.pck_certs} PCK certificates, "
            f"{self.raw_tcbs} raw TCB mappings, {self.raw_tcbs_kept_as_mapped} kept as Intel "
            f"mapped them)",
            f"  TCB infos: {self.tcb_infos}; enclave identities: {self.identities}; "
            f"PCK CRLs: {self.pck_crls}; root CA CRL: {self.root_ca_crl}; "
            f"CRLs by URI: {self.crls}",
            f"  appraisal policies: {self.appraisal_policies}",
            f"  registration queue: {self.queued_new} NEW, "
            f"{self.queued_not_available} NOT_AVAILABLE",
            f"  skipped: {len(self.skipped)}",
        ]
        lines += [f"  skipped {reason}" for reason in self.skipped]
        return lines


class Skip(Exception):
    """One row cannot be imported; the message says why."""


def text_of(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise Skip("is not UTF-8 text") from None
    return str(value)


def blob_of(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


def hex_of_blob(value: Any) -> str:
    """A binary column (enc_ppid, platform_manifest) as lower-case hex, "" when NULL."""
    return blob_of(value).hex()


def hex_of(value: Any, name: str, lengths: tuple[int, ...] = (), max_length: int = 0) -> str:
    text = text_of(value).strip()
    if not is_hex(text, lengths, max_length):
        raise Skip(f"has an invalid {name} {text[:40]!r}")
    return text


def int_of(value: Any, default: int | None = None) -> int | None:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Skip(f"has a non-integer value {value!r}") from None


class RowReader:
    """A part of the import: it counts into the shared summary, skips rows with a reason."""

    def __init__(self, summary: ImportSummary, integrity: Integrity | None):
        self.summary = summary
        self.integrity = integrity

    def skip(self, what: str, reason: str) -> None:
        message = f"{what}: {reason}"
        # The summary lists it (the command prints that): logged for -v only, not twice.
        log.info("not imported: %s", message)
        self.summary.skipped.append(message)

    def verified(self, what: str, check: Callable[[Integrity], None]) -> bool:
        """False (and the row skipped) when the integrity check fails."""
        if self.integrity is None:
            return True
        try:
            check(self.integrity)
            return True
        except IntegrityError as exc:
            self.skip(what, f"not what Intel signed: {exc}")
            return False
