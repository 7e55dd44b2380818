"""Reading Intel PCCS's database (pccs-reference.md Appendix B): every table in one read
transaction on a read-only connection (the file is never written; a PCCS still running is seen
as one consistent snapshot), or from any DB-API connection; and copying Intel's MySQL tables
into an SQLite file the import reads."""

from __future__ import annotations

import datetime as _dt
import decimal
import logging
import os
import sqlite3
from pathlib import Path

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


class MigrationError(Exception):
    """The database cannot be imported; ``str()`` is one line for the operator."""


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
