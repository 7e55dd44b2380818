"""Platform list files (``get`` writes one, ``collect`` makes one from Intel's PCK ID
retrieval tool CSV files, ``fetch`` reads one): their entries, checked."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from typing import Any

from ..hexstr import ANY_LENGTH, is_hex
from .common import AdminError, SettingError, read_json


def _platform_problem(item: Any) -> str | None:
    if not isinstance(item, dict):
        return "is not a JSON object"
    if not is_hex(item.get("qe_id"), max_length=260):
        return "qe_id is not 1..260 hex characters"
    if not is_hex(item.get("pce_id"), (4,)):
        return "pce_id is not 4 hex characters"
    for name, length in (("enc_ppid", 768), ("cpu_svn", 32), ("pce_svn", 4)):
        value = item.get(name)
        if value not in (None, "") and not is_hex(value, (length,)):
            return f"{name} is not {length} hex characters (or empty)"
    manifest = item.get("platform_manifest")
    if manifest not in (None, "") and not is_hex(manifest, max_length=ANY_LENGTH):
        return "platform_manifest is not a hex string (or empty or null)"
    if not item.get("enc_ppid") and not manifest:
        return "has neither enc_ppid nor platform_manifest: PCS cannot be asked for its certs"
    return None


def load_platform_list(path: str) -> list[dict]:
    """A platform list file, checked; the error names the file and the first bad entry."""
    platforms = read_json(path)
    if not isinstance(platforms, list):
        raise AdminError(f"{path}: not a JSON array of platforms")
    for index, item in enumerate(platforms):
        problem = _platform_problem(item)
        if problem:
            who = f" (qe_id {item.get('qe_id')!r})" if isinstance(item, dict) else ""
            raise AdminError(f"{path}: entry {index}{who}: {problem}")
    return platforms


CSV_FIELDS = ("enc_ppid", "pce_id", "cpu_svn", "pce_svn", "qe_id", "platform_manifest")


def collect_csv(files: Iterable[str]) -> list[dict]:
    """PCK ID retrieval tool CSV files -> platform list (§4.2): no header row; columns
    enc_ppid,pce_id,cpu_svn,pce_svn,qe_id[,platform_manifest]; a missing manifest is null."""
    platforms = []
    for path in files:
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle))
        except OSError as exc:
            raise SettingError(f"cannot read {path}: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, csv.Error) as exc:
            raise AdminError(f"{path}: not a CSV file ({exc})") from None
        for number, row in enumerate(rows, 1):
            values = [value.strip() for value in row]
            if not any(values):
                continue
            if len(values) not in (5, 6):
                raise AdminError(
                    f"{path} line {number}: {len(values)} columns, expected "
                    f"5 or 6 ({','.join(CSV_FIELDS)})"
                )
            item: dict[str, str | None] = dict(zip(CSV_FIELDS, values))
            item.setdefault("platform_manifest", None)
            problem = _platform_problem(item)
            if problem:
                raise AdminError(f"{path} line {number}: {problem}")
            item["pckid_filename"] = os.path.basename(path)
            platforms.append(item)
    return platforms
