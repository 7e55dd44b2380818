"""Upstream discipline: one call per missing item (threads and processes), retries with
backoff and Retry-After inside a deadline, no retry on 4xx, proxies from the configuration."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dcapd.upstream import Upstream, UpstreamError
from tests.conftest import BACKENDS
from tests.fakepcs import load_body

SCENARIO = "2025-05-27_intel-pcs-recording"
QE = "/sgx/certification/v4/qe/identity"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fifty_concurrent_misses_make_one_upstream_call(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    fake.fail_with(delay=0.3, paths="/qe/identity")
    client = make_client(fake)
    results = []
    barrier = threading.Barrier(50)

    def ask():
        barrier.wait()
        results.append(client.simulate_get(QE))

    threads = [threading.Thread(target=ask) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in results] == [200] * 50
    assert {r.content for r in results} == {load_body(SCENARIO, "sgx_qe_identity")}
    assert fake.count("/qe/identity") == 1


BURST_SCRIPT = r"""
import json, sys, threading
from falcon import testing
from dcapd.app import create_app
from dcapd.config import load_config
settings = json.loads(sys.argv[1])
client = testing.TestClient(create_app(load_config(settings, environ={})))
print("ready", flush=True)
sys.stdin.readline()  # the go, sent once every process is ready
statuses = []
def ask():
    statuses.append(client.simulate_get("/sgx/certification/v4/qe/identity").status_code)
threads = [threading.Thread(target=ask) for _ in range(10)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(statuses))
"""


def test_burst_across_processes_on_one_cache_makes_one_call(fake_pcs, make_config):
    fake = fake_pcs(SCENARIO)
    fake.fail_with(delay=0.5, paths="/qe/identity")
    config = make_config(pcs_url=fake.pcs_url)
    settings = {
        "cache_dir": config.cache_dir,
        "pcs_url": fake.pcs_url,
        "trusted_roots": config.trusted_roots,
        "upstream_retries": 0,
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", BURST_SCRIPT, json.dumps(settings)],
            cwd=str(REPO),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    # The processes start their bursts together: each says when it is ready, then all are
    # told to go at once (rather than at a fixed time far enough ahead for a slow start).
    for process in processes:
        assert process.stdout.readline() == "ready\n"
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = [p.communicate(timeout=60)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes)
    assert [json.loads(o) for o in outputs] == [[200] * 10] * 3
    assert fake.count("/qe/identity") == 1


def test_5xx_and_429_are_retried_with_backoff_honouring_retry_after(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake, upstream_retries=3, upstream_timeout=10.0)
    fake.fail_with(status=503, paths="/qe/identity", times=2)
    started = time.monotonic()
    assert client.simulate_get(QE).status_code == 200
    assert fake.count("/qe/identity") == 3
    assert time.monotonic() - started < 3, "backoff starts small"
    fake.fail_with(status=429, paths="/qve/identity", times=1, headers={"Retry-After": "1"})
    started = time.monotonic()
    assert client.simulate_get("/sgx/certification/v4/qve/identity").status_code == 200
    assert time.monotonic() - started >= 1.0, "Retry-After is honoured"
    assert fake.count("/qve/identity") == 2


def test_network_errors_are_retried(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake, upstream_retries=2, upstream_timeout=10.0)
    fake.fail_with(close=True, paths="/qe/identity", times=1)
    assert client.simulate_get(QE).status_code == 200
    assert fake.count("/qe/identity") == 2


def test_4xx_is_not_retried_and_persistent_5xx_is_404(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake, upstream_retries=3, upstream_timeout=10.0)
    fake.fail_with(status=400, paths="/qe/identity")
    assert client.simulate_get(QE).status_code == 404
    assert fake.count("/qe/identity") == 1
    fake.reset_calls()
    fake.fail_with(status=500, paths="/qe/identity")
    assert client.simulate_get(QE).status_code == 404  # Intel: a PCS non-200 is 404
    assert fake.count("/qe/identity") == 4


def test_retries_stay_inside_the_deadline(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake, upstream_retries=10, upstream_timeout=1.5)
    fake.fail_with(status=503, paths="/qe/identity", headers={"Retry-After": "1"})
    started = time.monotonic()
    assert client.simulate_get(QE).status_code == 404
    assert time.monotonic() - started < 2.5
    assert fake.count("/qe/identity") <= 2


def test_a_slow_upstream_is_cut_at_the_deadline(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake, upstream_retries=0, upstream_timeout=0.5)
    fake.fail_with(delay=3, paths="/qe/identity")
    started = time.monotonic()
    assert client.simulate_get(QE).status_code == 502
    assert time.monotonic() - started < 2


class RecordingProxy(BaseHTTPRequestHandler):
    """A forward proxy stand-in: records the absolute URLs it is asked for, answers 404."""

    seen: list = []

    def do_GET(self):  # noqa: N802
        RecordingProxy.seen.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_proxy_from_configuration(make_config):
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingProxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        RecordingProxy.seen = []
        config = make_config(
            pcs_url="http://pcs.invalid/sgx/certification/v4/",
            proxy=f"http://127.0.0.1:{server.server_address[1]}",
        )
        upstream = Upstream(config)
        reply = upstream.get_enclave_identity("qe", 4, "STANDARD")
        assert reply.status == 404
        assert RecordingProxy.seen == [
            "http://pcs.invalid/sgx/certification/v4/qe/identity?update=standard"
        ]
    finally:
        server.shutdown()
        server.server_close()


def test_api_key_only_on_pckcerts(fake_pcs, make_config):
    fake = fake_pcs(SCENARIO)
    upstream = Upstream(make_config(pcs_url=fake.pcs_url, api_key="secret-key"))
    upstream.get_enclave_identity("qe", 4, "STANDARD")
    upstream.get_pck_certs(4, "00" * 384, "0000")
    qe_call, pckcerts_call = fake.calls
    assert "Ocp-Apim-Subscription-Key" not in qe_call.headers
    assert pckcerts_call.headers["Ocp-Apim-Subscription-Key"] == "secret-key"


@pytest.mark.parametrize("configured", ["v3", "v4"])
def test_every_pcs_request_is_v4_and_v3_is_refused(make_config, configured):
    """PCS retired API v3 (pccs-1.27.md §1): whatever pcs_url names, no v3 request leaves."""
    upstream = Upstream(
        make_config(
            pcs_url=f"https://api.trustedservices.intel.com/sgx/certification/{configured}/"
        )
    )
    assert (
        upstream.endpoint_url("tdx", 4, "tcb")
        == "https://api.trustedservices.intel.com/tdx/certification/v4/tcb"
    )
    with pytest.raises(UpstreamError):
        upstream.endpoint_url("sgx", 3, "tcb")


def test_retry_policy_delays():
    """The server's policy (jittered, capped at 8 s) and a patient one as dcapd-admin fetch
    uses (no jitter); both honour Retry-After in seconds and as an HTTP date."""
    import email.utils

    import requests

    from dcapd.upstream import RetryPolicy

    server = RetryPolicy()
    assert all(0.125 <= server.delay(0, None) <= 0.25 for _ in range(20))
    assert 4.0 <= server.delay(10, None) <= 8.0
    reply = requests.Response()
    reply.headers["Retry-After"] = "7"
    assert server.delay(3, reply) == 7.0
    reply.headers["Retry-After"] = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= server.delay(0, reply) <= 60
    patient = RetryPolicy(first_delay=0.5, max_delay=300.0, jitter=False)
    assert [patient.delay(n, None) for n in (0, 1, 2, 20)] == [0.5, 1.0, 2.0, 300.0]
    assert 55 <= patient.delay(0, reply) <= 60


@pytest.mark.parametrize(
    "spelling",
    [
        "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der",
        "HTTPS://CERTIFICATES.trustedservices.intel.com/IntelSGXRootCA.der",
        "https://certificates.trustedservices.intel.com:443/IntelSGXRootCA.der",
    ],
)
def test_url_map_matches_every_spelling_of_an_origin(make_config, spelling):
    upstream = Upstream(
        make_config(url_map="https://certificates.trustedservices.intel.com=http://127.0.0.1:9")
    )
    assert upstream.mapped_url(spelling) == "http://127.0.0.1:9/IntelSGXRootCA.der"
