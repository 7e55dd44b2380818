"""End to end: dcap-qvl 0.7.0 fetches collateral from a running dcapd (HTTPS, LAZY, backed by
the fake PCS) and verifies every fixture quote at its scenario's verify_at time."""

from __future__ import annotations

import json

import pytest

from tests.conftest import upstream_settings
from tests.fakepcs import FIXTURES
from tests.servers import running_dcapd

INDEX = json.loads((FIXTURES / "index.json").read_text())


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
