"""Import Intel PCCS's database into a dcapd cache (pccs-reference.md Appendix B, §4.3).

An operator replacing Intel's PCCS keeps everything it has cached::

    dcapd-admin migrate /opt/intel/sgx-dcap-pccs/pckcache.db --cache-dir /var/cache/dcapd

(``python -m dcapd.migrate`` takes the same arguments.)

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
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, Callable

from ..config import Config, ConfigError, load_config
from ..errors import PccsError
from ..logs import configure_logging as configure_dcapd_logging
from ..services import Services, build_services
from ..store import StoreUnavailable
from ..upload import PCK_CHAINS
from .migrate_collateral import CollateralRows, empty_document, has_collateral
from .migrate_platforms import PlatformRows
from .migrate_read import MigrationError, read_intel_db
from .migrate_rows import ImportSummary, RowReader, Skip, hex_of, hex_of_blob, int_of, text_of

log = logging.getLogger("dcapd.migrate")

# Registration states (9 = DELETED: already read by the admin tool, not imported).
_REG_STATES: dict[int | None, str] = {0: "NEW", 1: "NOT_AVAILABLE"}


def import_intel_db(db_path: Any, services: Services) -> ImportSummary:
    """Import Intel PCCS's SQLite database ``db_path`` (opened read-only) into the cache of
    ``services`` (a :class:`dcapd.services.Services`: its store, upload, pck_certs, policies and
    integrity are used). Raises MigrationError, leaving the cache unchanged, when the file is
    not Intel's database or dcapd refuses the converted data."""
    tables = read_intel_db(db_path)
    return import_tables(tables, services, str(db_path))


def import_tables(tables: dict[str, list[dict]], services: Services, source: str) -> ImportSummary:
    """Import rows read by :func:`read_tables` (from SQLite or any other Intel backend)."""
    return _Importer(services, source).run(tables)


class _Importer(RowReader):
    """The whole import: the collateral and platform parts, then one cache transaction."""

    def __init__(self, services: Services, source: str):
        super().__init__(ImportSummary(source), getattr(services, "integrity", None))
        self.store = services.store
        self.upload = services.upload
        self.policies = services.policies
        self.registrations = services.registrations
        self.collateral = CollateralRows(self.summary, self.integrity, self.store)
        self.platforms = PlatformRows(self.summary, self.integrity, self.store, services.pck_certs)

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
        collateral = self.collateral
        collateral.read_certs(tables["pcs_certificates"])

        docs = {version: empty_document(version) for version in (3, 4)}
        pck_chains = collateral.pck_chains(tables["pck_certchain"])
        collateral.tcb_infos(tables["fmspc_tcbs"], docs)
        collateral.identities(tables["enclave_identities"], docs)
        server_doc = docs[summary.api_version]
        collateral.pck_crls(tables["pck_crl"], pck_chains, server_doc)
        collateral.root_ca_crl(tables["pcs_certificates"], server_doc)
        server_doc["collaterals"]["certificates"][PCK_CHAINS] = pck_chains
        platforms = self.platforms.platforms(tables, pck_chains)
        crls = collateral.crl_cache(tables["crl_cache"], list(pck_chains.values()))
        queue = self._queue(tables["platforms_registered"])

        try:
            with self.store.transaction():
                for version, doc in docs.items():
                    if version != summary.api_version and has_collateral(doc):
                        self.upload.apply(version, doc)
                pins = self.platforms.add_platforms(platforms, server_doc, summary.api_version)
                self.upload.apply(summary.api_version, server_doc)
                self.platforms.write_pins(pins)
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
        # The counts are the summary's (printed by the command), not repeated here.
        log.info("imported %s (%d rows skipped)", summary.source, len(summary.skipped))
        return summary

    # --- appraisal policies and the registration queue

    def _appraisal_policies(self, rows: list[dict]) -> None:
        # Non-defaults first: a default un-defaults the FMSPC's others, as in Intel's PCCS.
        for row in sorted(rows, key=lambda row: bool(row["is_default"])):
            label = f"appraisal_policies {text_of(row['id'])[:16]} (FMSPC {text_of(row['fmspc'])})"
            try:
                self.policies.put(
                    {
                        "policy": text_of(row["policy"]),
                        "is_default": bool(int_of(row["is_default"], 0)),
                        "fmspc": text_of(row["fmspc"]),
                    }
                )
            except (PccsError, Skip) as exc:
                self.skip(label, getattr(exc, "reason", str(exc)))
                continue
            self.summary.appraisal_policies += 1

    def _queue(self, rows: list[dict]) -> list[tuple[str, dict]]:
        queue = []
        for row in rows:
            label = (
                f"platforms_registered {text_of(row['qe_id'])}/{text_of(row['pce_id'])} "
                f"{text_of(row['cpu_svn'])}/{text_of(row['pce_svn'])}"
            )
            try:
                state = _REG_STATES.get(int_of(row["state"]))
                if state is None:
                    continue  # 9: already read by the admin tool
                pce_svn = text_of(row["pce_svn"]).strip()
                if state == "NOT_AVAILABLE" and pce_svn.isdigit() and len(pce_svn) != 4:
                    # Intel writes these as a decimal integer ([ref-bug]); dcapd's queue holds
                    # the little-endian hex the upload schema takes (platforms.py).
                    pce_svn = int(pce_svn).to_bytes(2, "little").hex()
                cpu_svn = text_of(row["cpu_svn"]).strip()
                record = {
                    "qe_id": hex_of(row["qe_id"], "qe_id", max_length=260).upper(),
                    "pce_id": hex_of(row["pce_id"], "pce_id", (4,)).upper(),
                    "cpu_svn": hex_of(cpu_svn, "cpu_svn", (0, 32)),
                    "pce_svn": hex_of(pce_svn, "pce_svn", (0, 4)),
                    "enc_ppid": hex_of_blob(row["enc_ppid"]),
                    "platform_manifest": hex_of_blob(row["platform_manifest"]),
                }
            except Skip as exc:
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
# Command line: dcapd-admin migrate PATH [--cache-dir DIR], python -m dcapd.migrate
# --------------------------------------------------------------------------------------------

DESCRIPTION = (
    "Import Intel PCCS's SQLite database (pckcache.db) into a dcapd cache. "
    "The database is opened read-only; importing again is harmless."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The migration's arguments, for its own parser and for ``dcapd-admin migrate``."""
    parser.add_argument("path", metavar="PATH", help="Intel PCCS database file (pckcache.db)")
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="dcapd cache directory (default: the one dcapd uses: "
        "DCAPD_CACHE_DIR, the ini file, or the per-user cache folder)",
    )
    parser.add_argument(
        "--cache-url",
        metavar="URL",
        help="dcapd's cache on PostgreSQL instead (postgresql://...; default: "
        "DCAPD_CACHE_URL or the ini file); not together with --cache-dir",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="dcapd ini file (cache directory, trusted roots)"
    )


def build_parser(prog: str = "python -m dcapd.migrate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def import_into_cache(
    args: argparse.Namespace, prog: str, configure_logging: Callable[[Config], None] | None
) -> int:
    """Import ``args.path`` into the configured cache and print the summary: 0 imported (rows
    dcapd cannot serve are listed as skipped), 1 not imported, 2 bad configuration or no such
    file. Errors are one line on stderr, after ``prog``; ``configure_logging`` (if any) sets
    up logging from the configuration first."""
    try:
        config = load_config(
            {"cache_dir": args.cache_dir, "cache_url": args.cache_url, "cache_mode": "OFFLINE"},
            ini_path=args.config,
        )
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if not os.path.isfile(args.path):
        print(f"{prog}: {args.path}: no such file", file=sys.stderr)
        return 2
    if configure_logging is not None:
        configure_logging(config)
    try:
        services = build_services(config)
    except StoreUnavailable as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    try:
        summary = import_intel_db(args.path, services)
    except MigrationError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    finally:
        services.close()
    print(f"imported into {services.store.description if config.cache_url else config.cache_dir}")
    for line in summary.lines():
        print(line)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m dcapd.migrate") -> int:
    """``python -m dcapd.migrate``: 0 imported (rows dcapd cannot serve are listed as
    skipped), 1 not imported, 2 bad configuration or no such file."""
    args = build_parser(prog).parse_args(argv)

    def configure(config: Config) -> None:
        configure_dcapd_logging(config.log_level, args.verbose or config.verbose, config.log_format)

    return import_into_cache(args, prog, configure)
