#!/usr/bin/env python3
"""The long hardening profile (issue 8): the fuzz tests with more than 10,000 generated
requests, and 50 kill rounds each during a large upload and during a refresh.

    python scripts/long_hardening.py [--report FILE] [-- extra pytest arguments]

Runs tests/test_fuzz.py and tests/test_crash.py with DCAPD_HARDENING_PROFILE=long (the
default suite runs the same tests with a quick profile), then prints the figures that go in
README.rst's "Security" section. Exit status: pytest's (0 = every test passed).
Takes about 6 minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_fuzz.py", "tests/test_crash.py"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", help="keep the JSON figures in this file")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest")
    args = parser.parse_args()

    report = Path(args.report) if args.report else Path(tempfile.mkstemp(suffix=".json")[1])
    report.unlink(missing_ok=True)
    env = dict(os.environ, DCAPD_HARDENING_PROFILE="long", DCAPD_HARDENING_REPORT=str(report))
    started = time.monotonic()
    status = subprocess.call(
        [sys.executable, "-m", "pytest", *TESTS, "-p", "no:cacheprovider", "-q", *args.pytest_args],
        cwd=ROOT,
        env=env,
    )
    minutes = (time.monotonic() - started) / 60
    figures = json.loads(report.read_text()) if report.exists() else {}
    if not args.report:
        report.unlink(missing_ok=True)

    fuzz, crash = figures.get("fuzz", {}), figures.get("crash", {})
    print()
    print(f"long hardening profile, {minutes:.1f} min, pytest exit status {status}")
    if fuzz:
        statuses = ", ".join(f"{k.split()[1]}: {v}" for k, v in fuzz["statuses"].items())
        print(
            f"  fuzz: {fuzz['requests']} generated requests, {fuzz['status_500']} answered 500"
            f" ({statuses})"
        )
    for kind in ("upload", "refresh"):
        rounds = crash.get(f"{kind} rounds", 0)
        if not rounds:
            continue
        killed = {
            when: crash.get(f"{kind} rounds killed {when}", 0)
            for when in (
                "before the write began",
                "inside the write transaction",
                "after the write committed",
            )
        }
        print(
            f"  kill during {kind}: {crash.get(f'{kind} rounds passed', 0)} of {rounds} rounds "
            f"passed; killed "
            + ", ".join(f"{when} {n}" for when, n in killed.items())
            + f" (one write: {crash.get(f'{kind} write, cache entries')} cache entries, "
            f"{crash.get(f'{kind} write, seconds')} s)"
        )
    if args.report:
        print(f"  figures: {report}")
    return status


if __name__ == "__main__":
    sys.exit(main())
