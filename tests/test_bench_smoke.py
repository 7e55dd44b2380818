"""scripts/bench.py runs end to end with tiny settings (a functional check, not a timing one):
dcapd started as the dcapd command, a new TLS connection per request with resumption, plain
HTTP against bare waitress, 1 vs 2 workers, and the comparison with another PCCS (a second
dcapd command, loaded by the benchmark through PUT /platformcollateral). The keep-alive HTTPS
phases differ from these only by their request set; they are not run here (time budget)."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench.py"
TOKEN = "bench-smoke-admin-token"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _other_pccs(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """A second dcapd, OFFLINE on an empty cache, as someone would have one running."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCAPD_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p]),
        DCAPD_LISTEN=f"127.0.0.1:{port}",
        DCAPD_CACHE_DIR=str(tmp_path / "other-cache"),
        DCAPD_CACHE_MODE="OFFLINE",
        DCAPD_ADMIN_TOKEN_SHA512=hashlib.sha512(TOKEN.encode()).hexdigest(),
        DCAPD_PCS_URL="http://127.0.0.1:9/sgx/certification/v4/",
        DCAPD_ROOTCA_CRL_URL="http://127.0.0.1:9/IntelSGXRootCA.der",
        DCAPD_LOG_LEVEL="warning",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcapd"],
        env=env,
        cwd=str(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "other.log", "wb"),
    )
    deadline = time.monotonic() + 60
    while True:  # listening (a loaded machine can take seconds to start it)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError((tmp_path / "other.log").read_text()) from None
            time.sleep(0.05)
    return proc, port


def test_bench_runs_every_kind_of_phase_and_prints_the_targets(tmp_path):
    other, port = _other_pccs(tmp_path)
    try:
        result = subprocess.run(
            [
                sys.executable,
                str(BENCH),
                "--phases",
                "newconn,http",
                "--duration",
                "0.2",
                "--warmup",
                "0.05",
                "--clients",
                "2",
                "--client-procs",
                "0",
                "--platforms",
                "10",
                "--workers",
                "2",
                "--compare-url",
                f"https://127.0.0.1:{port}",
                "--compare-admin-token",
                TOKEN,
                "--compare-insecure",
                "--compare-pid",
                str(other.pid),
                "--burst",
                "3",
                "--burst-delay",
                "0.02",
                "--app-hits",
                "10",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    finally:
        other.terminate()
        other.wait(30)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    rows = re.findall(
        r"^(\S.*?(?:newconn|http)) +(\d+) .* (\d+)(?:  resumed (\d+)/(\d+) .*)?$", out, re.M
    )
    names = [name for name, *_ in rows]
    assert names == [
        "dcapd newconn",
        "dcapd (same upload) newconn",
        "other newconn",
        "dcapd http",
        "dcapd w2 newconn",
        "bare waitress http",
    ], out
    assert all(int(rps) > 0 and errors == "0" for _, rps, errors, *_ in rows), out
    # Every new connection offered the previous session; dcapd resumes TLS sessions.
    newconn = [(int(reused), int(total)) for name, _, _, reused, total in rows if reused]
    assert len(newconn) == 4 and all(0 < reused <= total for reused, total in newconn), out
    assert re.search(r"^  newconn  req/s \d+ -> \d+ \(x\d+\.\d\d\); CPU/req ", out, re.M), out
    assert re.search(
        r"^  newconn  req/s dcapd \d+ vs other \d+: ratio dcapd/other \d+\.\d\d; CPU/req ",
        out,
        re.M,
    ), out
    for target in (
        r"server CPU per request, /tcb, new TLS connection per request <= 1 ms: \d",
        r"plain HTTP req/s dcapd / bare waitress >= 0.7: \d+\.\d\d",
        r"peak RSS <= 80 MiB: \d+\.\d MiB",
        r"\(issue 7\) cold burst = 1 upstream call: /pckcert 1, /tcb 1 met",
    ):
        assert re.search(r"^  " + target, out, re.M), (target, out)
    assert re.search(
        r"^cold burst: 3 concurrent identical /pckcert misses .* -> 1 upstream call,"
        r" 3/3 answered 200",
        out,
        re.M,
    ), out
    assert "per cache hit" in out
