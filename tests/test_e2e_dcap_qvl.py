"""End to end: dcap-qvl 0.7.0 fetches collateral from a running dcapd (HTTPS, LAZY, backed by
the fake PCS) and verifies every fixture quote at its scenario's verify_at time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import upstream_settings
from tests.fakepcs import FIXTURES
from tests.servers import issue_server_cert, running_dcapd

INDEX = json.loads((FIXTURES / "index.json").read_text())

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


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory) -> tuple[Path, Path, Path]:
    """One test CA and server certificate for the module's servers (ca, cert, key)."""
    return issue_server_cert(tmp_path_factory.mktemp("e2e-cert"))


@pytest.fixture(scope="module")
def qvl(server_cert, tmp_path_factory):
    verifier = Verifier(server_cert[0], tmp_path_factory.mktemp("e2e-qvl") / "stderr.log")
    yield verifier
    verifier.close()


@pytest.mark.parametrize(
    "scenario", [s for s in INDEX["scenarios"] if s["quotes"]], ids=lambda s: s["name"]
)
def test_every_fixture_quote_verifies_through_dcapd(
    fake_pcs, make_config, scenario, server_cert, qvl
):
    _ca_file, cert_file, key_file = server_cert
    fake = fake_pcs(scenario["name"])
    config = make_config(
        tls="auto", cert_file=str(cert_file), key_file=str(key_file), **upstream_settings(fake)
    )
    with running_dcapd(config) as server:
        url = f"https://127.0.0.1:{server.port}"
        for quote in scenario["quotes"]:
            got = qvl.verify(url, FIXTURES / quote["file"], scenario["verify_at_unix"])
            assert got == quote["expected_dcap_qvl_0_7_0"], quote["file"]
        calls_after_first_pass = len(fake.calls)
        assert calls_after_first_pass > 0
        # Every item is now cached: verifying again makes no upstream call.
        quote = scenario["quotes"][0]
        got = qvl.verify(url, FIXTURES / quote["file"], scenario["verify_at_unix"])
        assert got == quote["expected_dcap_qvl_0_7_0"]
        assert len(fake.calls) == calls_after_first_pass
