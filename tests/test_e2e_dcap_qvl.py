"""End to end: dcap-qvl 0.7.0 fetches collateral from a running dcapd (HTTPS, LAZY, backed by
the fake PCS) and verifies every fixture quote at its scenario's verify_at time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import upstream_settings
from tests.fakepcs import FIXTURES
from tests.servers import issue_server_cert, running_dcapd

INDEX = json.loads((FIXTURES / "index.json").read_text())

# dcap-qvl 0.7.0 may crash at interpreter exit, so the child ends with os._exit.
VERIFY_SCRIPT = r"""
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

result = asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
sys.stdout.write(json.dumps(result) + "\n")
sys.stdout.flush()
os._exit(0)
"""


def verify_with_dcap_qvl(url: str, quote_path, verify_at: int, ca_file) -> dict:
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
    env["SSL_CERT_FILE"] = str(ca_file)
    result = subprocess.run(
        [sys.executable, "-c", VERIFY_SCRIPT, url, str(quote_path), str(verify_at)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.stdout.strip(), result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "scenario", [s for s in INDEX["scenarios"] if s["quotes"]], ids=lambda s: s["name"]
)
def test_every_fixture_quote_verifies_through_dcapd(tmp_path, fake_pcs, make_config, scenario):
    ca_file, cert_file, key_file = issue_server_cert(tmp_path)
    fake = fake_pcs(scenario["name"])
    config = make_config(
        tls="auto", cert_file=str(cert_file), key_file=str(key_file), **upstream_settings(fake)
    )
    with running_dcapd(config) as server:
        url = f"https://127.0.0.1:{server.port}"
        for quote in scenario["quotes"]:
            got = verify_with_dcap_qvl(
                url, FIXTURES / quote["file"], scenario["verify_at_unix"], ca_file
            )
            assert got == quote["expected_dcap_qvl_0_7_0"], quote["file"]
        calls_after_first_pass = len(fake.calls)
        assert calls_after_first_pass > 0
        # Every item is now cached: verifying again makes no upstream call.
        quote = scenario["quotes"][0]
        got = verify_with_dcap_qvl(
            url, FIXTURES / quote["file"], scenario["verify_at_unix"], ca_file
        )
        assert got == quote["expected_dcap_qvl_0_7_0"]
        assert len(fake.calls) == calls_after_first_pass
