"""scripts/bench.py runs end to end with tiny settings (a functional check, not a timing one)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def test_bench_runs_and_prints_the_ratio_and_the_cold_burst():
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--https",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--clients",
            "2",
            "--client-procs",
            "1",
            "--platforms",
            "10",
            "--burst",
            "5",
            "--burst-delay",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^ratio dcapd/ceiling: \d+\.\d\d \(https\)", out, re.M), out
    rows = re.findall(r"^(dcapd 10 platforms|ceiling \(same bytes\)) +(\d+) .* (\d+)$", out, re.M)
    assert len(rows) == 2 and all(int(rps) > 0 and errors == "0" for _, rps, errors in rows), out
    assert re.search(
        r"^cold burst: 5 concurrent identical /pckcert misses .* -> 1 upstream call,"
        r" 5/5 answered 200",
        out,
        re.M,
    ), out
    assert "per cache hit" in out
