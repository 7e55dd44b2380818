"""End to end: dcap-qvl 0.7.0 fetches collateral from a running dcapd (HTTPS, LAZY, backed by
the fake PCS) and verifies every fixture quote at its scenario's verify_at time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
VERIFY_SCRIPT = (
    _VERIFY_MAIN
    + r"""
result = asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
sys.stdout.write(json.dumps(result) + "\n")
sys.stdout.flush()
os._exit(0)
"""
)
# The same verification, for each line of [url, quote file, verify_at] on stdin: one
# process (and one import of dcap-qvl) for the module's 18 verifications, not one each.
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


def verify_with_dcap_qvl(url: str, quote_path, verify_at: int, ca_file) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", VERIFY_SCRIPT, url, str(quote_path), str(verify_at)],
        capture_output=True,
        text=True,
        env=_qvl_env(ca_file),
        timeout=120,
    )
    assert result.stdout.strip(), result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


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

    def verify(self, url: str, quote_path, verify_at: int) -> dict:
        self.process.stdin.write(json.dumps([url, str(quote_path), verify_at]) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line.strip(), self.log.read_text(errors="replace")[-2000:]
        return json.loads(line)

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
