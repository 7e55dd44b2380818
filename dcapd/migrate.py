"""Import Intel PCCS's database into a dcapd cache (pccs-reference.md Appendix B, §4.3).

An operator replacing Intel's PCCS keeps everything it has cached::

    python -m dcapd.migrate /opt/intel/sgx-dcap-pccs/pckcache.db --cache-dir /var/cache/dcapd

Afterwards an OFFLINE dcapd on that cache answers every request Intel's PCCS answered from that
database with the same bytes: TCB infos and identities (the BLOBs are the bytes Intel served),
PCK CRLs, the root CA CRL, ``crl?uri=`` CRLs, the PCK certificate of every mapped raw TCB with
the same ``SGX-TCBm`` and issuer chain, the appraisal policies and the registration queue.

How
===

1. Every table is read in one read transaction on a read-only connection
   (``file:...?mode=ro``): the file is never written, and a PCCS still running meanwhile is
   seen as one consistent snapshot.
2. The rows become upload documents in Intel's PccsAdminTool format (a v4 document, and a v3
   one for version-3 rows) and are applied with :class:`dcapd.upload.CollateralUpload`, the
   code ``PUT /platformcollateral`` runs: the same validation, integrity checks and entries.
   TCB info BLOBs travel as ``<name>_raw`` strings so their bytes are kept exactly; issuer
   chains are rebuilt from ``pcs_certificates`` (intermediate half + root half, as Intel does).
3. What an upload cannot carry is written next: a raw TCB that Intel mapped to another PCK
   certificate than dcapd's selection would pick today (its TCB info changed since) keeps
   Intel's answer; ``crl_cache`` rows; appraisal policies (through
   :class:`dcapd.policies.Policies`); the registration queue (``platforms_registered`` state
   0 -> NEW, 1 -> NOT_AVAILABLE; 9 = already read, not imported).

All of it lands in one cache transaction: an import that fails leaves the cache as it was, and
importing the same database again gives the same cache. Entries already in the cache that the
database does not hold are kept. A row dcapd cannot serve (a signature that does not verify,
missing issuer certificates, a malformed value) is skipped with a warning and listed in the
summary; the rest is imported.

Intel's MySQL backend
=====================

Copy its tables into an SQLite file with :func:`export_to_sqlite` and any MySQL DB-API driver,
then import that file (see the README).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import decimal
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .collateral import (
    CT_CRL,
    ENCLAVE_IDENTITY_CHAIN,
    TCBM,
    BadUpstreamData,
    crl_meta,
    tcb_info_chain_header,
)
from .config import ConfigError, load_config
from .errors import PccsError
from .hexstr import is_hex
from .integrity import IntegrityError
from .logs import configure_logging
from .pckcerts import RawTcb
from .pcsurls import is_allowed_crl_url
from .selection import SelectionError, parse_pck_cert
from .services import build_services
from .store import Entry
from .upload import PCK_CHAINS, upload_certs

log = logging.getLogger("dcapd.migrate")

# Intel's tables (Appendix B) and the columns this import reads. The optional ones came with
# later Intel migrations; fmspc_tcbs/enclave_identities ``version``/``update_type`` too (read
# when present, else the server's API version and STANDARD).
REQUIRED_TABLES: dict[str, tuple[str, ...]] = {
    "pcs_version": ("api_version",),
    "pcs_certificates": ("id", "cert", "crl"),
    "pck_certchain": ("ca", "root_cert_id", "intmd_cert_id"),
    "pck_crl": ("ca", "pck_crl", "root_cert_id", "intmd_cert_id"),
    "pck_cert": ("qe_id", "pce_id", "tcbm", "pck_cert"),
    "platforms": ("qe_id", "pce_id", "platform_manifest", "enc_ppid"),
    "platform_tcbs": ("qe_id", "pce_id", "cpu_svn", "pce_svn", "tcbm"),
    "platforms_registered": (
        "qe_id",
        "pce_id",
        "cpu_svn",
        "pce_svn",
        "enc_ppid",
        "platform_manifest",
        "state",
    ),
    "fmspc_tcbs": ("fmspc", "type", "tcbinfo", "root_cert_id", "signing_cert_id"),
    "enclave_identities": ("id", "identity", "root_cert_id", "signing_cert_id"),
}
OPTIONAL_TABLES: dict[str, tuple[str, ...]] = {
    "crl_cache": ("cdp_url", "crl"),
    "appraisal_policies": ("id", "type", "policy", "is_default", "fmspc"),
}

ROOT_CERT_ID = 1
_REG_STATES = {0: "NEW", 1: "NOT_AVAILABLE"}  # 9 = DELETED (already read by the admin)
_IDENTITY_NAMES = {1: "qeidentity", 2: "qveidentity", 3: "tdqeidentity"}
_SOURCE = "intel-pccs"


class MigrationError(Exception):
    """The database cannot be imported; ``str()`` is one line for the operator."""


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


# --------------------------------------------------------------------------------------------
# Reading Intel's tables
# --------------------------------------------------------------------------------------------


def connect_read_only(db_path) -> sqlite3.Connection:
    """Intel's SQLite file, opened so that nothing can write it (not even a journal)."""
    path = Path(db_path)
    if not path.is_file():
        raise MigrationError(f"{db_path}: no such file")
    try:
        connection = sqlite3.connect(
            path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None
        )
        connection.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError as exc:
        raise MigrationError(f"{db_path} is not an SQLite database ({exc})") from None
    return connection


def read_tables(connection, source: str) -> dict[str, list[dict]]:
    """Every row of Intel's tables, as dicts by column name (absent optional tables: []).

    Works on any DB-API connection whose tables carry Intel's names (SQLite, or MySQL through
    a driver); raises MigrationError when the schema is not Intel's."""
    present = _table_names(connection, source)
    if present is not None:
        missing = [name for name in REQUIRED_TABLES if name not in present]
        if missing:
            raise MigrationError(
                f"{source} is not an Intel PCCS database: no table {', '.join(missing)}"
            )
    tables: dict[str, list[dict]] = {}
    for name, columns in {**REQUIRED_TABLES, **OPTIONAL_TABLES}.items():
        if present is not None and name not in present:
            tables[name] = []
            continue
        cursor = connection.cursor()
        try:
            cursor.execute(f"SELECT * FROM {name}")
            names = [d[0].lower() for d in cursor.description]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        except Exception as exc:  # the driver's own error classes
            if present is None and name in OPTIONAL_TABLES:
                tables[name] = []
                continue
            raise MigrationError(f"{source}: cannot read table {name}: {exc}") from None
        finally:
            cursor.close()
        lacking = [column for column in columns if column not in names]
        if lacking:
            raise MigrationError(
                f"{source} is not an Intel PCCS database: table {name} has "
                f"no column {', '.join(lacking)}"
            )
        tables[name] = rows
    return tables


def _table_names(connection, source: str) -> set[str] | None:
    if not isinstance(connection, sqlite3.Connection):
        return None
    try:
        return {
            row[0].lower()
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    except sqlite3.DatabaseError as exc:
        raise MigrationError(f"{source} is not an SQLite database ({exc})") from None


def read_intel_db(db_path) -> dict[str, list[dict]]:
    """All of Intel's rows from the SQLite file ``db_path``, read in one read transaction."""
    connection = connect_read_only(db_path)
    try:
        connection.execute("BEGIN")  # one snapshot, even if Intel's PCCS writes meanwhile
        try:
            return read_tables(connection, str(db_path))
        finally:
            connection.execute("ROLLBACK")
    except sqlite3.DatabaseError as exc:
        raise MigrationError(f"{db_path}: {exc}") from None
    finally:
        connection.close()


def export_to_sqlite(connection, path) -> None:
    """Copy Intel's tables from any DB-API ``connection`` (e.g. PyMySQL connected to Intel's
    MySQL ``pckcache`` database) into a new SQLite file that :func:`import_intel_db` reads."""
    if os.path.exists(path):
        raise MigrationError(f"{path} already exists")
    target = sqlite3.connect(str(path))
    try:
        for name in (*REQUIRED_TABLES, *OPTIONAL_TABLES):
            cursor = connection.cursor()
            try:
                cursor.execute(f"SELECT * FROM {name}")
                columns = [d[0].lower() for d in cursor.description]
                rows = [tuple(_portable(value) for value in row) for row in cursor.fetchall()]
            except Exception as exc:  # the driver's own error classes
                if name in OPTIONAL_TABLES:
                    log.info("table %s not copied: %s", name, exc)
                    continue
                raise MigrationError(f"cannot read table {name}: {exc}") from None
            finally:
                cursor.close()
            quoted = ", ".join(f'"{column}"' for column in columns)
            target.execute(f'CREATE TABLE "{name}" ({quoted})')
            target.executemany(
                f'INSERT INTO "{name}" VALUES ({", ".join("?" * len(columns))})', rows
            )
        target.commit()
    finally:
        target.close()


def _portable(value):
    """A value SQLite stores as MySQL gave it (BLOBs as bytes, dates as text)."""
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat(sep=" ") if isinstance(value, _dt.datetime) else value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == int(value) else str(value)
    return value


def _has_collateral(doc: dict) -> bool:
    collaterals = doc["collaterals"]
    return bool(collaterals["tcbinfos"]) or any(
        name.endswith(("identity", "identity_early")) for name in collaterals
    )


# --------------------------------------------------------------------------------------------
# Values as Intel stores them
# --------------------------------------------------------------------------------------------


class _Skip(Exception):
    """One row cannot be imported; the message says why."""


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise _Skip("is not UTF-8 text") from None
    return str(value)


def _blob(value) -> bytes:
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


def _hex_of_blob(value) -> str:
    """A binary column (enc_ppid, platform_manifest) as lower-case hex, "" when NULL."""
    return _blob(value).hex()


def _hex(value, name: str, lengths: tuple[int, ...] = (), max_length: int = 0) -> str:
    text = _text(value).strip()
    if not is_hex(text, lengths, max_length):
        raise _Skip(f"has an invalid {name} {text[:40]!r}")
    return text


def _int(value, default: int | None = None) -> int | None:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _Skip(f"has a non-integer value {value!r}") from None


# --------------------------------------------------------------------------------------------
# The import
# --------------------------------------------------------------------------------------------


def import_intel_db(db_path, services) -> ImportSummary:
    """Import Intel PCCS's SQLite database ``db_path`` (opened read-only) into the cache of
    ``services`` (a :class:`dcapd.services.Services`: its store, upload, pck_certs, policies and
    integrity are used). Raises MigrationError, leaving the cache unchanged, when the file is
    not Intel's database or dcapd refuses the converted data."""
    tables = read_intel_db(db_path)
    return import_tables(tables, services, str(db_path))


def import_tables(tables: dict[str, list[dict]], services, source: str) -> ImportSummary:
    """Import rows read by :func:`read_tables` (from SQLite or any other Intel backend)."""
    return _Importer(services, source).run(tables)


@dataclass
class _Platform:
    qe_id: str
    pce_id: str
    enc_ppid: str
    platform_manifest: str
    fmspc: str
    ca: str
    certs: list[dict]  # {"tcb", "tcbm", "pem"} as CollateralUpload stores them
    raw_tcbs: list[tuple[str, str, str]]  # (cpu_svn, pce_svn, Intel's tcbm)


class _Importer:
    def __init__(self, services, source: str):
        self.store = services.store
        self.upload = services.upload
        self.pck_certs = services.pck_certs
        self.policies = services.policies
        self.registrations = services.registrations
        self.integrity = getattr(services, "integrity", None)
        self.summary = ImportSummary(source)
        self.certs: dict[int, str] = {}

    def skip(self, what: str, reason: str) -> None:
        message = f"{what}: {reason}"
        log.warning("not imported: %s", message)
        self.summary.skipped.append(message)

    def verified(self, what: str, check) -> bool:
        """False (and the row skipped) when the integrity check fails."""
        if self.integrity is None:
            return True
        try:
            check(self.integrity)
            return True
        except IntegrityError as exc:
            self.skip(what, f"not what Intel signed: {exc}")
            return False

    # --- the whole run

    def run(self, tables: dict[str, list[dict]]) -> ImportSummary:
        summary = self.summary
        version_row = tables["pcs_version"][0] if tables["pcs_version"] else {}
        api_version = str(version_row.get("api_version") or "4").strip()
        summary.api_version = int(api_version) if api_version in ("3", "4") else 4
        summary.db_version = version_row.get("db_version")
        log.info(
            "importing %s: PCS %s, API v%d, db_version %s",
            summary.source,
            version_row.get("server_addr"),
            summary.api_version,
            summary.db_version,
        )
        for row in tables["pcs_certificates"]:
            try:
                if row.get("cert"):
                    self.certs[_int(row["id"])] = _text(row["cert"])
            except _Skip as exc:
                self.skip(f"pcs_certificates {row.get('id')}", str(exc))

        docs = {version: self._empty_document(version) for version in (3, 4)}
        pck_chains = self._pck_chains(tables["pck_certchain"])
        self._tcb_infos(tables["fmspc_tcbs"], docs)
        self._identities(tables["enclave_identities"], docs)
        server_doc = docs[summary.api_version]
        self._pck_crls(tables["pck_crl"], pck_chains, server_doc)
        self._root_ca_crl(tables["pcs_certificates"], server_doc)
        server_doc["collaterals"]["certificates"][PCK_CHAINS] = pck_chains
        platforms = self._platforms(tables, pck_chains)
        crls = self._crl_cache(tables["crl_cache"], list(pck_chains.values()))
        queue = self._queue(tables["platforms_registered"])

        try:
            with self.store.transaction():
                for version, doc in docs.items():
                    if version != summary.api_version and _has_collateral(doc):
                        self.upload.apply(version, doc)
                pins = self._add_platforms(platforms, server_doc, summary.api_version)
                self.upload.apply(summary.api_version, server_doc)
                self._write_pins(pins)
                for key, entry in crls.items():
                    self.store.put(key, entry)
                self._appraisal_policies(tables["appraisal_policies"])
                self._write_queue(queue)
        except PccsError as exc:
            raise MigrationError(
                f"{summary.source}: dcapd refused the converted data "
                f"({exc.status_code}: {exc.reason})"
            ) from None
        summary.crls = len(crls)
        log.info(
            "imported %s: %s",
            summary.source,
            "; ".join(line.strip() for line in summary.lines()[1:6]),
        )
        return summary

    # --- collateral

    @staticmethod
    def _empty_document(version: int) -> dict:
        collaterals: dict = {"pck_certs": [], "tcbinfos": [], "certificates": {PCK_CHAINS: {}}}
        if version == 4:
            collaterals = {"version": 4, **collaterals}
        return {"platforms": [], "collaterals": collaterals}

    def _chain(self, intermediate_id, root_id) -> str | None:
        """Intel's issuer chain: the URL-encoded intermediate half, then the root half."""
        try:
            intermediate, root = int(intermediate_id), int(root_id)
        except (TypeError, ValueError):
            return None
        if intermediate in self.certs and root in self.certs:
            return self.certs[intermediate] + self.certs[root]
        return None

    def _pck_chains(self, rows: list[dict]) -> dict[str, str]:
        chains = {}
        for row in rows:
            ca = _text(row["ca"]).upper()
            chain = self._chain(row["intmd_cert_id"], row["root_cert_id"])
            if ca not in ("PROCESSOR", "PLATFORM"):
                self.skip(f"pck_certchain {ca}", "unknown CA")
            elif chain is None:
                self.skip(f"pck_certchain {ca}", "its issuer certificates are missing")
            else:
                chains[ca] = chain
        return chains

    def _signed_row(self, table: str, row: dict, top: str):
        """(version, update, text, inner object, chain) of a TCB info or identity row."""
        version = _int(row.get("version"), self.summary.api_version)
        update = _text(row.get("update_type") or "STANDARD").upper()
        if version not in (3, 4) or update not in ("STANDARD", "EARLY"):
            raise _Skip(f"unsupported version {version} / update type {update}")
        chain = self._chain(row["signing_cert_id"], row["root_cert_id"])
        if chain is None:
            raise _Skip("its issuer certificates are missing (Intel does not serve it either)")
        text = _text(row[table])
        try:
            document = json.loads(text)
        except ValueError:
            raise _Skip("is not JSON") from None
        inner = document.get(top) if isinstance(document, dict) else None
        if not isinstance(inner, dict) or not isinstance(document.get("signature"), str):
            raise _Skip(f"is not a signed {top} document")
        return version, update, text, document, inner, chain

    def _tcb_infos(self, rows: list[dict], docs: dict[int, dict]) -> None:
        items: dict[int, dict[str, dict]] = {3: {}, 4: {}}
        for row in rows:
            tee = {0: "sgx", 1: "tdx"}.get(row["type"], f"type {row['type']!r}")
            label = (
                f"fmspc_tcbs {_text(row['fmspc'])} {tee.upper()} "
                f"v{row.get('version') or self.summary.api_version} "
                f"{_text(row.get('update_type') or 'STANDARD')}"
            )
            try:
                if tee not in ("sgx", "tdx"):
                    raise _Skip("unknown TCB info type")
                fmspc = _hex(row["fmspc"], "fmspc", (12,)).upper()
                version, update, text, document, info, chain = self._signed_row(
                    "tcbinfo", row, "tcbInfo"
                )
                if tee == "tdx" and version == 3:
                    raise _Skip("TDX TCB info is served on v4 only")
                if str(info.get("fmspc", "")).upper() != fmspc:
                    raise _Skip(f"holds the TCB info of FMSPC {info.get('fmspc')!r}")
                if version == 4 and info.get("id") != tee.upper():
                    raise _Skip(f"holds a TCB info with id {info.get('id')!r}")
                header = tcb_info_chain_header(version)
                certificates = docs[version]["collaterals"]["certificates"]
                if certificates.setdefault(header, chain) != chain:
                    raise _Skip("its issuer chain differs from the other TCB infos'")
            except _Skip as exc:
                self.skip(label, str(exc))
                continue
            if not self.verified(
                label, lambda i: i.check_signed_json(text.encode("utf-8"), "tcbInfo", chain)
            ):
                continue
            name = {3: "tcbinfo", 4: f"{tee}_tcbinfo"}[version]
            name += "_early" if update == "EARLY" else ""
            item = items[version].setdefault(fmspc, {"fmspc": fmspc})
            item[name], item[f"{name}_raw"] = document, text
            self.summary.tcb_infos += 1
        for version, by_fmspc in items.items():
            docs[version]["collaterals"]["tcbinfos"] = list(by_fmspc.values())

    def _identities(self, rows: list[dict], docs: dict[int, dict]) -> None:
        for row in rows:
            label = (
                f"enclave_identities id {row['id']} "
                f"v{row.get('version') or self.summary.api_version} "
                f"{_text(row.get('update_type') or 'STANDARD')}"
            )
            try:
                name = _IDENTITY_NAMES.get(_int(row["id"]))
                if name is None:
                    raise _Skip("unknown identity id")
                version, update, text, _, _, chain = self._signed_row(
                    "identity", row, "enclaveIdentity"
                )
                if name == "tdqeidentity" and version == 3:
                    raise _Skip("the TD QE identity is served on v4 only")
                certificates = docs[version]["collaterals"]["certificates"]
                if certificates.setdefault(ENCLAVE_IDENTITY_CHAIN, chain) != chain:
                    raise _Skip("its issuer chain differs from the other identities'")
            except _Skip as exc:
                self.skip(label, str(exc))
                continue
            if not self.verified(
                label, lambda i: i.check_signed_json(text.encode("utf-8"), "enclaveIdentity", chain)
            ):
                continue
            name += "_early" if update == "EARLY" else ""
            docs[version]["collaterals"][name] = text  # identities travel as raw text
            self.summary.identities += 1

    def _pck_crls(self, rows: list[dict], pck_chains: dict[str, str], doc: dict) -> None:
        for row in rows:
            ca = _text(row["ca"]).upper()
            label = f"pck_crl {ca}"
            chain = self._chain(row["intmd_cert_id"], row["root_cert_id"])
            der = _blob(row["pck_crl"])
            if ca not in ("PROCESSOR", "PLATFORM") or not der:
                self.skip(label, "unknown CA or no CRL")
            elif chain is None:
                self.skip(label, "its issuer certificates are missing")
            elif pck_chains.setdefault(ca, chain) != chain:
                self.skip(label, "its issuer chain differs from pck_certchain's")
            elif self._is_crl(label, der) and self.verified(
                label, lambda i: i.check_crl(der, chain)
            ):
                name = {"PROCESSOR": "processorCrl", "PLATFORM": "platformCrl"}[ca]
                doc["collaterals"].setdefault("pckcacrl", {})[name] = der.hex()
                self.summary.pck_crls += 1

    def _is_crl(self, label: str, der: bytes) -> bool:
        try:
            crl_meta(der)
            return True
        except BadUpstreamData as exc:
            self.skip(label, str(exc))
            return False

    def _root_ca_crl(self, rows: list[dict], doc: dict) -> None:
        root = next((row for row in rows if row.get("id") == ROOT_CERT_ID), None)
        der = _blob(root.get("crl")) if root else b""
        if (
            der
            and self._is_crl("root CA CRL", der)
            and self.verified("root CA CRL", lambda i: i.check_crl(der, None))
        ):
            doc["collaterals"]["rootcacrl"] = der.hex()
            self.summary.root_ca_crl = 1

    def _crl_cache(self, rows: list[dict], known_chains: list[str]) -> dict[str, Entry]:
        entries = {}
        for row in rows:
            uri = _text(row["cdp_url"])
            label = f"crl_cache {uri}"
            der = _blob(row["crl"])
            if not is_allowed_crl_url(uri):
                self.skip(label, "dcapd serves crl?uri= only for Intel's CRL distribution points")
            elif self._is_crl(label, der) and self.verified(
                label, lambda i: i.check_crl_any_known_issuer(der, known_chains)
            ):
                entries[self.store.crl_key(uri)] = Entry(
                    der, {}, CT_CRL, dict(crl_meta(der), source=_SOURCE)
                )
        return entries

    # --- platforms, their PCK certificates and raw TCB mappings

    def _platforms(
        self, tables: dict[str, list[dict]], pck_chains: dict[str, str]
    ) -> list[_Platform]:
        certs_of: dict[tuple[str, str], list[dict]] = {}
        for row in tables["pck_cert"]:
            key = (_text(row["qe_id"]).upper(), _text(row["pce_id"]).upper())
            certs_of.setdefault(key, []).append(row)
        raws_of: dict[tuple[str, str], list[dict]] = {}
        for row in tables["platform_tcbs"]:
            key = (_text(row["qe_id"]).upper(), _text(row["pce_id"]).upper())
            raws_of.setdefault(key, []).append(row)

        platforms = []
        for row in tables["platforms"]:
            label = f"platform {_text(row['qe_id'])}/{_text(row['pce_id'])}"
            try:
                qe_id = _hex(row["qe_id"], "qe_id", max_length=260).upper()
                pce_id = _hex(row["pce_id"], "pce_id", (4,)).upper()
                enc_ppid = _hex_of_blob(row["enc_ppid"])
                if len(enc_ppid) not in (0, 768):
                    raise _Skip(f"has an encrypted PPID of {len(enc_ppid) // 2} bytes")
                manifest = _hex_of_blob(row["platform_manifest"])
            except _Skip as exc:
                self.skip(label, str(exc))
                continue
            certs, fmspc, ca = self._certs(label, certs_of.get((qe_id, pce_id), []), pck_chains)
            if not certs:
                self.skip(label, "no usable PCK certificate (dcapd will fetch it in LAZY mode)")
                continue
            raw_tcbs = []
            for raw in raws_of.get((qe_id, pce_id), []):
                try:
                    raw_tcbs.append(
                        (
                            _hex(raw["cpu_svn"], "cpu_svn", (32,)).upper(),
                            _hex(raw["pce_svn"], "pce_svn", (4,)).upper(),
                            _text(raw["tcbm"]).upper(),
                        )
                    )
                except _Skip as exc:
                    self.skip(f"platform_tcbs {qe_id}/{pce_id}", str(exc))
            platforms.append(
                _Platform(qe_id, pce_id, enc_ppid, manifest, fmspc, ca, certs, raw_tcbs)
            )
        return platforms

    def _certs(self, label: str, rows: list[dict], pck_chains: dict[str, str]):
        """The platform's usable certificates (same CA and FMSPC as the first), its FMSPC, CA."""
        certs, fmspc, ca = [], None, None
        for row in rows:
            what = f"{label} PCK certificate {_text(row['tcbm'])}"
            try:
                tcbm = _hex(row["tcbm"], "tcbm", (36,)).upper()
                pem = _text(row["pck_cert"])
                info = parse_pck_cert(pem)
            except _Skip as exc:
                self.skip(what, str(exc))
                continue
            except SelectionError as exc:
                self.skip(what, f"not a PCK certificate: {exc}")
                continue
            if (fmspc, ca) != (None, None) and (info.fmspc_hex, info.ca_type) != (fmspc, ca):
                self.skip(what, "its FMSPC or CA differs from the platform's other certificates")
                continue
            chain = pck_chains.get(info.ca_type)
            if chain is None:
                self.skip(what, f"no {info.ca_type} issuer chain in pcs_certificates")
                continue
            if not self.verified(what, lambda i: i.check_pck_cert(pem, chain)):
                continue
            fmspc, ca = info.fmspc_hex, info.ca_type
            tcb = {
                f"sgxtcbcomp{i:02d}svn": svn for i, svn in enumerate(info.tcb_components, start=1)
            }
            tcb["pcesvn"] = info.pcesvn
            certs.append({"tcb": tcb, "tcbm": tcbm, "pem": pem})
        return certs, fmspc, ca

    def _selection_tcb_info(self, fmspc: str, doc: dict, version: int) -> bytes | None:
        """The SGX TCB info CollateralUpload will select with: this document's (EARLY
        preferred), else the cached one (the other version's document is applied already)."""
        prefix = "sgx_tcbinfo" if version == 4 else "tcbinfo"
        for item in doc["collaterals"]["tcbinfos"]:
            if item["fmspc"] == fmspc:
                raw = item.get(f"{prefix}_early_raw") or item.get(f"{prefix}_raw")
                if raw is not None:
                    return raw.encode("utf-8")
        return self.pck_certs.selection_tcb_info(fmspc, version)

    def _add_platforms(self, platforms: list[_Platform], doc: dict, version: int) -> list:
        """Put the platforms into ``doc`` (raw TCBs that dcapd's selection answers as Intel
        did go into ``platforms[]``) and return the (platform, raw TCB, cert) pins for the rest.
        Runs inside the import's transaction, after the other version's document."""
        pins = []
        chains = doc["collaterals"]["certificates"][PCK_CHAINS]
        for platform in platforms:
            label = f"platform {platform.qe_id}/{platform.pce_id}"
            tcb_info = self._selection_tcb_info(platform.fmspc, doc, version)
            if tcb_info is None:
                self.skip(
                    label,
                    f"no SGX TCB info for FMSPC {platform.fmspc} to select its certificates with",
                )
                continue
            record = {
                "fmspc": platform.fmspc,
                "ca": platform.ca,
                "enc_ppid": platform.enc_ppid,
                "platform_manifest": platform.platform_manifest,
            }
            cert_set = {"certs": platform.certs, "chain": chains[platform.ca]}
            by_tcbm = {cert["tcbm"]: cert for cert in platform.certs}
            selectable, pinned = [], []
            for cpu_svn, pce_svn, tcbm in platform.raw_tcbs:
                raw = RawTcb(platform.qe_id, platform.pce_id, cpu_svn, pce_svn)
                try:
                    selected = self.pck_certs.select(raw, record, cert_set, tcb_info)
                    selected_tcbm = selected.headers[TCBM].upper()
                except PccsError:
                    selected_tcbm = None
                if selected_tcbm is not None and (selected_tcbm == tcbm or tcbm not in by_tcbm):
                    selectable.append(raw)
                elif tcbm in by_tcbm:
                    pinned.append(raw)
                    pins.append((platform, raw, by_tcbm[tcbm], cert_set["chain"]))
                else:  # Intel's mapping points nowhere and selection fails: Intel 404s too
                    log.info(
                        "%s: raw TCB %s/%s not mapped (no certificate for it)",
                        label,
                        cpu_svn,
                        pce_svn,
                    )
            if pinned:
                # A pinned raw TCB must not be re-selected by the upload (it may fail there).
                key = self.store.rawtcbs_key(platform.qe_id, platform.pce_id)
                cached = self.store.get_json(key)
                if cached:
                    pinned_pairs = [[raw.cpusvn, raw.pcesvn] for raw in pinned]
                    self.store.put_json(key, [pair for pair in cached if pair not in pinned_pairs])
            entry = {
                "qe_id": platform.qe_id,
                "pce_id": platform.pce_id,
                "enc_ppid": platform.enc_ppid,
                "platform_manifest": platform.platform_manifest,
            }
            doc["platforms"] += [
                dict(entry, cpu_svn=raw.cpusvn, pce_svn=raw.pcesvn) for raw in selectable
            ]
            doc["collaterals"]["pck_certs"].append(dict(entry, certs=upload_certs(platform.certs)))
            self.summary.platforms += 1
            self.summary.pck_certs += len(platform.certs)
            self.summary.raw_tcbs += len(selectable) + len(pinned)
            self.summary.raw_tcbs_kept_as_mapped += len(pinned)
        return pins

    def _write_pins(self, pins: list) -> None:
        """Intel's answer for a raw TCB, as PckCerts would have stored it had it selected it."""
        for platform, raw, cert, chain in pins:
            entry = self.pck_certs.answer(
                {"fmspc": platform.fmspc, "ca": platform.ca}, {"chain": chain}, cert
            )
            entry.meta["source"] = _SOURCE
            self.store.put(
                self.store.pckcert_key(raw.qeid, raw.pceid, raw.cpusvn, raw.pcesvn), entry
            )
            self.pck_certs.remember_raw_tcb(raw)

    # --- appraisal policies and the registration queue

    def _appraisal_policies(self, rows: list[dict]) -> None:
        # Non-defaults first: a default un-defaults the FMSPC's others, as in Intel's PCCS.
        for row in sorted(rows, key=lambda row: bool(row["is_default"])):
            label = f"appraisal_policies {_text(row['id'])[:16]} (FMSPC {_text(row['fmspc'])})"
            try:
                self.policies.put(
                    {
                        "policy": _text(row["policy"]),
                        "is_default": bool(_int(row["is_default"], 0)),
                        "fmspc": _text(row["fmspc"]),
                    }
                )
            except (PccsError, _Skip) as exc:
                self.skip(label, getattr(exc, "reason", str(exc)))
                continue
            self.summary.appraisal_policies += 1

    def _queue(self, rows: list[dict]) -> list[tuple[str, dict]]:
        queue = []
        for row in rows:
            label = (
                f"platforms_registered {_text(row['qe_id'])}/{_text(row['pce_id'])} "
                f"{_text(row['cpu_svn'])}/{_text(row['pce_svn'])}"
            )
            try:
                state = _REG_STATES.get(_int(row["state"]))
                if state is None:
                    continue  # 9: already read by the admin tool
                pce_svn = _text(row["pce_svn"]).strip()
                if state == "NOT_AVAILABLE" and pce_svn.isdigit() and len(pce_svn) != 4:
                    # Intel writes these as a decimal integer ([ref-bug]); dcapd's queue holds
                    # the little-endian hex the upload schema takes (platforms.py).
                    pce_svn = int(pce_svn).to_bytes(2, "little").hex()
                cpu_svn = _text(row["cpu_svn"]).strip()
                record = {
                    "qe_id": _hex(row["qe_id"], "qe_id", max_length=260).upper(),
                    "pce_id": _hex(row["pce_id"], "pce_id", (4,)).upper(),
                    "cpu_svn": _hex(cpu_svn, "cpu_svn", (0, 32)),
                    "pce_svn": _hex(pce_svn, "pce_svn", (0, 4)),
                    "enc_ppid": _hex_of_blob(row["enc_ppid"]),
                    "platform_manifest": _hex_of_blob(row["platform_manifest"]),
                }
            except _Skip as exc:
                self.skip(label, str(exc))
                continue
            queue.append((state, record))
        return queue

    def _write_queue(self, queue: list[tuple[str, dict]]) -> None:
        """The rows as dcapd's registration queue (platforms.Registrations._queue's layout)."""
        for state, record in queue:
            self.registrations.enqueue(state, record)
            if state == "NEW":
                self.summary.queued_new += 1
            else:
                self.summary.queued_not_available += 1


# --------------------------------------------------------------------------------------------
# Command line: python -m dcapd.migrate PATH [--cache-dir DIR]
# --------------------------------------------------------------------------------------------


def build_parser(prog: str = "python -m dcapd.migrate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Import Intel PCCS's SQLite database (pckcache.db) into a dcapd cache. "
        "The database is opened read-only; importing again is harmless.",
    )
    parser.add_argument("path", metavar="PATH", help="Intel PCCS database file (pckcache.db)")
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="dcapd cache directory (default: the one dcapd uses: "
        "DCAPD_CACHE_DIR, the ini file, or the per-user cache folder)",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="dcapd ini file (cache directory, trusted roots)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m dcapd.migrate") -> int:
    """0 imported (rows dcapd cannot serve are listed as skipped), 1 not imported, 2 bad
    configuration."""
    args = build_parser(prog).parse_args(argv)
    try:
        config = load_config(
            {"cache_dir": args.cache_dir, "cache_mode": "OFFLINE"}, ini_path=args.config
        )
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, args.verbose or config.verbose, config.log_format)
    services = build_services(config)
    try:
        summary = import_intel_db(args.path, services)
    except MigrationError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    finally:
        services.close()
    print(f"imported into {config.cache_dir}")
    for line in summary.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
