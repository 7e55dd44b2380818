"""``python -m dcapd.migrate``: Intel PCCS's database into a dcapd cache, as ``dcapd-admin
migrate`` does (the code: :mod:`dcapd.admin.migrate` and its ``migrate_*`` modules). The names
this module always had stay importable from here."""

from __future__ import annotations

import sys

from .admin.migrate import ImportSummary, import_intel_db, import_tables, main
from .admin.migrate_read import (
    MigrationError,
    connect_read_only,
    export_to_sqlite,
    read_intel_db,
    read_tables,
)

__all__ = [
    "ImportSummary",
    "MigrationError",
    "connect_read_only",
    "export_to_sqlite",
    "import_intel_db",
    "import_tables",
    "main",
    "read_intel_db",
    "read_tables",
]

if __name__ == "__main__":
    sys.exit(main(prog="python -m dcapd.migrate"))
