"""Platform registration (POST /platforms), the registration queue and the platform list
(GET /platforms): pccs-reference.md §1.7, §1.8, §2.2, §4.1."""

from __future__ import annotations

import json
import logging

from .collateral import Collateral
from .errors import PccsError
from .hexstr import ANY_LENGTH, is_hex
from .pckcerts import PckCerts, RawTcb
from .store import Store

log = logging.getLogger("dcapd.platforms")

# Registration body fields: (name, required, exact hex length or None for 1..260).
_FIELDS = (
    ("qe_id", True, None),
    ("pce_id", True, 4),
    ("cpu_svn", False, 32),
    ("pce_svn", False, 4),
    ("enc_ppid", False, 768),
)


def validate_registration(body) -> dict:
    """Intel's schema, answered with 400 (Intel: 500, [ref-bug]); returns normalised fields."""
    if not isinstance(body, dict):
        raise PccsError(400, "registration body is not a JSON object")
    fields: dict[str, str] = {}
    for name, required, length in _FIELDS:
        value = body.get(name)
        if value is None:
            if required:
                raise PccsError(400, f"registration: {name} is required")
            continue
        if not (is_hex(value, (length,)) if length else is_hex(value, max_length=260)):
            raise PccsError(400, f"registration: {name} is not {length or '1..260'} hex characters")
        fields[name] = value
    manifest = body.get("platform_manifest")
    if manifest not in (None, "") and not is_hex(manifest, max_length=ANY_LENGTH):
        raise PccsError(400, "registration: platform_manifest is not a hex string")
    record = {"qe_id": fields["qe_id"].upper(), "pce_id": fields["pce_id"].upper()}
    if manifest:
        # Intel: with a manifest, the raw TCB and encrypted PPID are ignored.
        record.update(cpu_svn="", pce_svn="", enc_ppid="", platform_manifest=manifest.lower())
    else:
        missing = [n for n in ("cpu_svn", "pce_svn", "enc_ppid") if n not in fields]
        if missing:
            raise PccsError(400, f"registration without a manifest needs {', '.join(missing)}")
        record.update(
            cpu_svn=fields["cpu_svn"].upper(),
            pce_svn=fields["pce_svn"].upper(),
            enc_ppid=fields["enc_ppid"].lower(),
            platform_manifest="",
        )
    return record


def raw_tcb_of_pcs_entry(tcb: dict) -> tuple[str, str]:
    """A "Not available" PCS entry's TCB as (cpu_svn, pce_svn) queue values.

    Intel writes cpu_svn as lower-case hex of the 16 component SVNs and pce_svn as the decimal
    integer ([ref-bug]: no upload schema accepts that); we write the little-endian hex it meant.
    """
    cpu_svn = "".join(f"{int(tcb[f'sgxtcbcomp{i:02d}svn']):02x}" for i in range(1, 17))
    return cpu_svn, int(tcb["pcesvn"]).to_bytes(2, "little").hex()


class Registrations:
    def __init__(self, store: Store, pck_certs: PckCerts, collateral: Collateral, mode: str):
        self.store = store
        self.pck_certs = pck_certs
        self.collateral = collateral
        self.mode = mode

    def register(self, version: int, record: dict, update: str) -> None:
        if not self._is_cached(record):
            if self.mode == "OFFLINE":
                self.enqueue("NEW", record)
            elif self.mode == "REQ":
                self.enqueue("NEW", record)
                fetched = self._fetch(version, record)  # on failure the row stays NEW
                self._dequeue("NEW", record)
                for item in fetched.unavailable:
                    cpu_svn, pce_svn = raw_tcb_of_pcs_entry(item.get("tcb") or {})
                    self.enqueue("NOT_AVAILABLE", dict(record, cpu_svn=cpu_svn, pce_svn=pce_svn))
            else:
                self._fetch(version, record)
        if self.mode != "OFFLINE":
            self.collateral.prefetch_verification_collateral(update)

    def _fetch(self, version: int, record: dict):
        raw = (
            None
            if record["platform_manifest"]
            else RawTcb(record["qe_id"], record["pce_id"], record["cpu_svn"], record["pce_svn"])
        )
        return self.pck_certs.fetch_platform(
            version,
            record["qe_id"],
            record["pce_id"],
            record["enc_ppid"],
            record["platform_manifest"],
            raw,
        )

    def _is_cached(self, record: dict) -> bool:
        platform = self.store.get_json(self.store.platform_key(record["qe_id"], record["pce_id"]))
        if platform is None:
            return False
        if record["platform_manifest"]:
            # Intel compares case-sensitively against lower-case hex; hex case carries no meaning.
            return platform.get("platform_manifest", "").lower() == record["platform_manifest"]
        return self.pck_certs.knows_raw_tcb(
            RawTcb(record["qe_id"], record["pce_id"], record["cpu_svn"], record["pce_svn"])
        )

    def _key(self, state: str, record: dict) -> str:
        return self.store.registration_key(
            state, record["qe_id"], record["pce_id"], record["cpu_svn"], record["pce_svn"]
        )

    def enqueue(self, state: str, record: dict) -> None:
        """Upsert a queue row in ``state`` (a row has one state at a time)."""
        with self.store.transaction():
            for other in self.store.REGISTRATION_STATES:
                if other != state:
                    self.store.delete(self._key(other, record))
            self.store.put_json(self._key(state, record), record)

    def _dequeue(self, state: str, record: dict) -> None:
        self.store.delete(self._key(state, record))

    def drain(self, state: str) -> list[dict]:
        """Return and remove the queue rows in ``state``.

        Each row is popped atomically, so a registration arriving meanwhile is either
        returned now or left for the next drain: never lost (Intel's read-then-mark can lose it).
        """
        rows = []
        for key in self.store.keys(self.store.registration_prefix(state)):
            entry = self.store.pop(key)
            if entry is not None:
                record = json.loads(entry.body)
                rows.append(
                    {
                        "qe_id": record["qe_id"],
                        "pce_id": record["pce_id"],
                        "cpu_svn": record["cpu_svn"],
                        "pce_svn": record["pce_svn"],
                        "platform_manifest": record["platform_manifest"].lower(),
                        "enc_ppid": record["enc_ppid"].lower(),
                    }
                )
        return rows

    def cached_platforms(self, fmspcs: set[str] | None) -> list[dict]:
        """One row per cached raw TCB of the platforms whose FMSPC is listed (None = all)."""
        rows = []
        for key in self.store.keys(self.store.platform_prefix()):
            qeid, pceid = self.store.platform_id_from_key(key)
            platform = self.store.get_json(key)
            if platform is None or (fmspcs is not None and platform["fmspc"].upper() not in fmspcs):
                continue
            for cpu_svn, pce_svn in self.pck_certs.raw_tcbs(qeid, pceid):
                rows.append(
                    {
                        "qe_id": qeid,
                        "pce_id": pceid,
                        "cpu_svn": cpu_svn,
                        "pce_svn": pce_svn,
                        "enc_ppid": platform["enc_ppid"].upper(),
                        "platform_manifest": platform["platform_manifest"].upper(),
                    }
                )
        return rows
