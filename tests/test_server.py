"""dcapd through the real server: HTTPS and plain HTTP, restarts, and the dcapd command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests
import urllib3

from tests.conftest import upstream_settings
from tests.fakepcs import load_body
from tests.servers import free_port, issue_server_cert, running_dcapd

SCENARIO = "2025-05-27_intel-pcs-recording"
PATHS = [
    "/sgx/certification/v4/tcb?fmspc=00906ED50000&update=standard",
    "/sgx/certification/v4/qe/identity",
    "/tdx/certification/v4/qe/identity?update=standard",
    "/sgx/certification/v4/pckcrl?ca=processor&encoding=der",
    "/sgx/certification/v4/rootcacrl",
]


@pytest.fixture
def session():
    with requests.Session() as client:
        client.trust_env = False  # this machine may set REQUESTS_CA_BUNDLE and proxies
        yield client


def test_https_with_own_certificate_and_restart(tmp_path, fake_pcs, make_config, session):
    ca_file, cert_file, key_file = issue_server_cert(tmp_path)
    fake = fake_pcs(SCENARIO)
    config = make_config(
        tls="auto", cert_file=str(cert_file), key_file=str(key_file), **upstream_settings(fake)
    )
    with running_dcapd(config) as server:
        base = f"https://127.0.0.1:{server.port}"
        first = [session.get(base + p, verify=str(ca_file), timeout=10) for p in PATHS]
        assert [r.status_code for r in first] == [200] * len(PATHS)
        assert len(fake.calls) == len(PATHS)
        second = [session.get(base + p, verify=str(ca_file), timeout=10) for p in PATHS]
        assert len(fake.calls) == len(PATHS), "the second request is a cache hit"
    with running_dcapd(config) as server:  # a restart on the same cache directory
        base = f"https://127.0.0.1:{server.port}"
        third = [session.get(base + p, verify=str(ca_file), timeout=10) for p in PATHS]
    assert len(fake.calls) == len(PATHS), "nothing is fetched again after a restart"
    for a, b, c in zip(first, second, third):
        assert a.content == b.content == c.content
        assert a.headers.get("SGX-Enclave-Identity-Issuer-Chain") == c.headers.get(
            "SGX-Enclave-Identity-Issuer-Chain"
        )
    assert first[0].content == load_body(SCENARIO, "sgx_tcb_00906ED50000")
    assert first[4].content == load_body(SCENARIO, "root_ca_crl").hex().encode()


def test_plain_http(fake_pcs, make_config, session):
    fake = fake_pcs(SCENARIO)
    with running_dcapd(make_config(tls="off", **upstream_settings(fake))) as server:
        reply = session.get(f"http://127.0.0.1:{server.port}{PATHS[1]}", timeout=10)
        assert reply.status_code == 200
        assert reply.content == load_body(SCENARIO, "sgx_qe_identity")
        assert "Request-ID" in reply.headers
        assert "Warning" not in reply.headers
        v3 = session.get(f"http://127.0.0.1:{server.port}/sgx/certification/v3/qe/identity")
        assert v3.status_code == 410 and v3.headers["Warning"].startswith("299 - ")
        assert session.get(f"http://127.0.0.1:{server.port}/nope", timeout=10).status_code == 404


def test_dcapd_command_serves_https_with_generated_certificate(tmp_path, fake_pcs, session):
    fake = fake_pcs(SCENARIO)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCAPD_")}
    env.update(
        DCAPD_LISTEN=f"127.0.0.1:{port}",
        DCAPD_CACHE_DIR=str(tmp_path / "cache"),
        DCAPD_PCS_URL=fake.pcs_url,
        DCAPD_URL_MAP=fake.url_map,
    )
    env.pop("INTEL_API_KEY", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "dcapd"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = session.get(
                    f"https://127.0.0.1:{port}/sgx/certification/v4/rootcacrl",
                    verify=False,
                    timeout=5,
                )
                break
            except requests.ConnectionError:
                assert process.poll() is None, process.stderr.read().decode()
                assert time.monotonic() < deadline, "dcapd did not start"
                time.sleep(0.1)
        assert reply.status_code == 200
        assert reply.content == load_body(SCENARIO, "root_ca_crl").hex().encode()
    finally:
        process.send_signal(signal.SIGTERM if os.name != "nt" else signal.CTRL_BREAK_EVENT)
        try:
            _, stderr = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    log = stderr.decode()
    assert "no Intel API key" in log, "a missing API key is a warning, not fatal"
    assert process.returncode == 0, log[-2000:]
