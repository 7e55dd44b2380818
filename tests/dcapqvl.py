"""dcap-qvl (from PyPI) as a verifier for the end-to-end tests: one long-lived child process
per test module, which the ``qvl`` fixture (tests/conftest.py) starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

# dcap-qvl 0.7.0 may crash at interpreter exit, so the child ends with os._exit.
_VERIFY_MAIN = r"""
import asyncio, json, os, sys
import dcap_qvl

async def main(url, quote_path, verify_at):
    quote = open(quote_path, 'rb').read()
    try:
        collateral = await dcap_qvl.get_collateral(url, quote)
    except Exception as exc:
        return {"collateral_error": str(exc)}
    try:
        report = dcap_qvl.verify(quote, collateral, verify_at)
    except Exception as exc:
        return {"error": str(exc)}
    return {"status": report.status, "advisory_ids": list(report.advisory_ids)}
"""
# For each line of [url, quote file, verify_at] on stdin, one verification: one process (and
# one import of dcap-qvl) for a module's verifications rather than one each.
VERIFY_LOOP = (
    _VERIFY_MAIN
    + r"""
for line in sys.stdin:
    url, quote_path, verify_at = json.loads(line)
    result = asyncio.run(main(url, quote_path, int(verify_at)))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
os._exit(0)
"""
)


def _qvl_env(ca_file) -> dict:
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
    env["SSL_CERT_FILE"] = str(ca_file)
    return env


class Verifier:
    """dcap-qvl in one long-lived child process, trusting ``ca_file`` (SSL_CERT_FILE)."""

    def __init__(self, ca_file: Path, log: Path):
        self.log = log
        with open(log, "wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-c", VERIFY_LOOP],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=sink,
                text=True,
                env=_qvl_env(ca_file),
            )

    def verify(self, url: str, quote_path, verify_at: int, timeout: float = 120) -> dict:
        self.process.stdin.write(json.dumps([url, str(quote_path), verify_at]) + "\n")
        self.process.stdin.flush()
        answer: list[str] = []
        reader = threading.Thread(target=lambda: answer.append(self.process.stdout.readline()))
        reader.start()
        reader.join(timeout)
        if reader.is_alive():  # bounded, like one process per verification was
            self.process.kill()
            reader.join(10)
        assert answer and answer[0].strip(), self.log.read_text(errors="replace")[-2000:]
        return json.loads(answer[0])

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
