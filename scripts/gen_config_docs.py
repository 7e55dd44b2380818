"""Regenerate pccs.ini.example and README.rst's configuration table from dcapd.config.SETTINGS.

Run after adding or changing a setting: ``python scripts/gen_config_docs.py``. The settings
table is the one source; the tests check that both documents name every key.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dcapd.config import SETTINGS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = ".. begin-settings-table", ".. end-settings-table"


def ini_example() -> str:
    lines = [
        "; dcapd configuration. Every key is optional; the value shown is the default.",
        "; Environment variables override this file; command-line options override both.",
        "; Start with: dcapd --config pccs.ini",
        "",
    ]
    section = None
    # Grouped by section (in order of first appearance): rows appended to SETTINGS for an
    # earlier section still land under its one header.
    sections = list(dict.fromkeys(s.section for s in SETTINGS))
    for setting in sorted(SETTINGS, key=lambda s: sections.index(s.section)):
        if setting.section != section:
            section = setting.section
            lines.append(f"[{section}]")
        lines += [
            f"; {setting.help}",
            f"; environment: {setting.env}",
            f";{setting.key} = {setting.default}".rstrip(),
            "",
        ]
    return "\n".join(lines)


def settings_table() -> str:
    rows = [
        (
            f"``[{s.section}] {s.key}``",
            f"``{s.env}``",
            f"``{s.default}``" if s.default else "(empty)",
            s.help,
        )
        for s in SETTINGS
    ]
    header = ("ini", "environment", "default", "meaning")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    rule = "  ".join("=" * w for w in widths)

    def row(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([rule, row(header), rule, *map(row, rows), rule])


def main() -> None:
    (ROOT / "pccs.ini.example").write_text(ini_example())
    readme = (ROOT / "README.rst").read_text()
    block = f"{BEGIN}\n\n{settings_table()}\n\n{END}"
    readme = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)
    (ROOT / "README.rst").write_text(readme)


if __name__ == "__main__":
    main()
