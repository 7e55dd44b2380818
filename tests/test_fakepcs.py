"""Tests of the fake Intel PCS (tests/fakepcs.py) itself."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from urllib.parse import urlencode

import pytest
import requests

from tests.fakepcs import FIXTURES, SCENARIOS, FakePCS, load_body, load_manifest

REC = "2025-05-27_intel-pcs-recording"
TDX_TCB = "/tdx/certification/v4/tcb"
SGX_TCB = "/sgx/certification/v4/tcb"
TIMEOUT = 5


def _recorded():
    for scenario in SCENARIOS:
        for entry in load_manifest(scenario)["responses"]:
            yield pytest.param(scenario, entry, id=f"{scenario}:{entry['id']}")


@pytest.fixture
def session():
    s = requests.Session()
    s.trust_env = False  # ignore proxy / CA variables of the environment
    yield s
    s.close()


@pytest.fixture(scope="module")
def servers():
    started = {}

    def get(scenario):
        if scenario not in started:
            started[scenario] = FakePCS(scenario).start()
        return started[scenario]

    yield get
    for pcs in started.values():
        pcs.stop()


@pytest.fixture
def rec():
    with FakePCS(REC) as pcs:
        yield pcs


def test_fixtures_located_relative_to_repo():
    assert FIXTURES.is_dir()
    assert (FIXTURES / "README.md").is_file()
    assert SCENARIOS == sorted(
        p.name for p in (FIXTURES / "pcs").iterdir() if (p / "manifest.json").is_file()
    )
    assert len(SCENARIOS) >= 7
    assert REC in SCENARIOS


@pytest.mark.parametrize("scenario,entry", list(_recorded()))
def test_every_recording_is_served_verbatim(servers, session, scenario, entry):
    pcs = servers(scenario)
    url = pcs.base + entry["path"]
    if entry["query"]:
        url += "?" + urlencode(entry["query"])
    r = session.request(entry["method"], url, timeout=TIMEOUT)
    assert r.status_code == entry["status"]
    body = (FIXTURES / "pcs" / scenario / entry["body_file"]).read_bytes()
    assert hashlib.sha256(body).hexdigest() == entry["body_sha256"]
    assert r.content == body
    assert hashlib.sha256(r.content).hexdigest() == entry["body_sha256"]
    assert r.headers["Content-Length"] == str(len(body))
    # every recorded header, byte-for-byte (issuer chains stay URL-encoded)
    raw = {k.lower(): v for k, v in r.raw.headers.items()}
    for name, value in entry["headers"].items():
        assert raw[name.lower()] == value, name
    chains = [h for h in entry["headers"] if h.lower().endswith("issuer-chain")]
    for name in chains:
        assert r.headers[name].startswith("-----BEGIN%20CERTIFICATE-----%0A")


def test_rootca_crl_url(servers, session):
    for scenario in SCENARIOS:
        pcs = servers(scenario)
        assert pcs.rootca_crl_url == pcs.base + "/IntelSGXRootCA.der"
        r = session.get(pcs.rootca_crl_url, timeout=TIMEOUT)
        assert r.status_code == 200
        assert r.content == load_body(scenario, "root_ca_crl")


def test_addresses(rec):
    assert rec._server.server_address[0] == "127.0.0.1"
    assert rec.port > 0
    assert rec.base == f"http://127.0.0.1:{rec.port}"
    assert rec.pcs_url == f"{rec.base}/sgx/certification/v4/"
    assert rec.url_map == (
        f"https://certificates.trustedservices.intel.com={rec.base},"
        f"https://api.trustedservices.intel.com={rec.base}"
    )


def test_update_default_is_standard(rec, session):
    standard = load_body(REC, "sgx_tcb_00906ED50000")  # recorded without update
    early = load_body(REC, "sgx_tcb_00906ED50000_early")
    tdx = load_body(REC, "tdx_tcb_00806F050000")  # recorded with update=standard
    get = lambda path, **q: session.get(rec.base + path, params=q, timeout=TIMEOUT)  # noqa: E731

    assert get(SGX_TCB, fmspc="00906ED50000").content == standard
    assert get(SGX_TCB, fmspc="00906ED50000", update="standard").content == standard
    assert get(SGX_TCB, fmspc="00906ed50000", update="STANDARD").content == standard
    assert get(SGX_TCB, fmspc="00906ED50000", update="early").content == early
    assert get(TDX_TCB, fmspc="00806F050000").content == tdx
    assert get(TDX_TCB, fmspc="00806f050000", update="standard").content == tdx
    assert get(TDX_TCB, fmspc="00806F050000", update="early").status_code == 404
    r = get("/sgx/certification/v4/qe/identity", update="standard")
    assert r.content == load_body(REC, "sgx_qe_identity")


def test_query_must_match_exactly(rec, session):
    get = lambda path, **q: session.get(rec.base + path, params=q, timeout=TIMEOUT)  # noqa: E731
    # extra parameter
    assert get(SGX_TCB, fmspc="00906ED50000", foo="bar").status_code == 404
    # missing parameter
    assert get(SGX_TCB).status_code == 404
    # encoding=der vs default PEM are different recordings
    pem = get("/sgx/certification/v4/pckcrl", ca="platform")
    der = get("/sgx/certification/v4/pckcrl", ca="PLATFORM", encoding="DER")
    assert pem.content == load_body(REC, "pckcrl_platform_pem")
    assert der.content == load_body(REC, "pckcrl_platform")
    assert pem.headers["Content-Type"] == "application/x-pem-file"
    assert der.headers["Content-Type"] == "application/pkix-crl"
    # wrong value
    assert get(SGX_TCB, fmspc="00906ED50001").status_code == 404


def test_not_found(rec, session):
    for path in (
        "/sgx/certification/v4/nope",
        "/SGX/certification/v4/qe/identity",
        "/",
        "/sgx/certification/v4/rootcacrl",
    ):
        r = session.get(rec.base + path, timeout=TIMEOUT)
        assert r.status_code == 404, path
        assert r.headers["Error-Code"] == "NotFound"
        assert r.content == b""
    # wrong method
    r = session.post(rec.base + "/sgx/certification/v4/qe/identity", timeout=TIMEOUT)
    assert r.status_code == 404


def test_empty_fake_and_add_response(session):
    with FakePCS() as pcs:
        assert session.get(pcs.base + "/x", timeout=TIMEOUT).status_code == 404
        pcs.add_response("GET", "/x", None, 200, {"X-A": "1"}, b"any")
        pcs.add_response("GET", "/x", {"k": "V"}, 201, {"X-A": "2"}, b"k=v")
        r = session.get(pcs.base + "/x", params={"q": "1"}, timeout=TIMEOUT)
        assert (r.status_code, r.headers["X-A"], r.content) == (200, "1", b"any")
        r = session.get(pcs.base + "/x", params={"k": "v"}, timeout=TIMEOUT)
        assert (r.status_code, r.headers["X-A"], r.content) == (201, "2", b"k=v")
        r = session.get(pcs.base + "/x", params={"k": "v", "update": "standard"}, timeout=TIMEOUT)
        assert r.status_code == 201
        pcs.clear_added()
        assert session.get(pcs.base + "/x", timeout=TIMEOUT).status_code == 404


def test_added_response_overrides_recording(rec, session):
    pcs = rec
    pcs.add_response("GET", TDX_TCB, {"fmspc": "00806F050000"}, 503, {}, b"")
    assert (
        session.get(
            pcs.base + TDX_TCB, params={"fmspc": "00806F050000"}, timeout=TIMEOUT
        ).status_code
        == 503
    )
    # other query still served from the recording
    r = session.get(
        pcs.base + TDX_TCB,
        params={"fmspc": "00806F050000", "tcbEvaluationDataNumber": "17"},
        timeout=TIMEOUT,
    )
    assert r.content == load_body(REC, "tdx_tcb_00806F050000_eval17")


def test_calls(rec, session):
    pcs = rec
    assert pcs.calls == [] and pcs.count() == 0
    session.get(
        pcs.base + TDX_TCB,
        params={"fmspc": "00806F050000"},
        headers={"X-Trace": "abc"},
        timeout=TIMEOUT,
    )
    session.get(pcs.base + "/tdx/certification/v4/qe/identity", timeout=TIMEOUT)
    session.get(pcs.base + "/tdx/certification/v4/qe/identity", timeout=TIMEOUT)
    session.post(pcs.base + "/sgx/certification/v4/pckcerts", data=b"\x00\x01", timeout=TIMEOUT)
    calls = pcs.calls
    assert [c.method for c in calls] == ["GET", "GET", "GET", "POST"]
    first = calls[0]
    assert first.path == TDX_TCB
    assert first.query == {"fmspc": ["00806F050000"]}
    assert first.headers["X-Trace"] == "abc"
    assert calls[3].body == b"\x00\x01"
    assert pcs.count() == 4
    assert pcs.count("/qe/identity") == 2
    assert pcs.count("/tcb") == 1
    assert pcs.count(method="POST") == 1
    assert pcs.count("/pckcerts", method="get") == 0
    pcs.reset_calls()
    assert pcs.calls == [] and pcs.count() == 0


def test_calls_thread_safe(rec):
    url = rec.base + "/tdx/certification/v4/qe/identity"

    def worker():
        with requests.Session() as s:
            s.trust_env = False
            for _ in range(10):
                assert s.get(url, timeout=TIMEOUT).status_code == 200

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rec.count("/qe/identity") == 80


def test_fail_with_status(rec, session):
    rec.fail_with(status=503, paths="/tcb")
    r = session.get(rec.base + TDX_TCB, params={"fmspc": "00806F050000"}, timeout=TIMEOUT)
    assert r.status_code == 503 and r.content == b""
    r = session.get(rec.base + "/tdx/certification/v4/qe/identity", timeout=TIMEOUT)
    assert r.status_code == 200
    rec.fail_with(status=500)
    r = session.get(rec.base + "/tdx/certification/v4/qe/identity", timeout=TIMEOUT)
    assert r.status_code == 500
    rec.fail_with()
    r = session.get(rec.base + TDX_TCB, params={"fmspc": "00806F050000"}, timeout=TIMEOUT)
    assert r.status_code == 200
    assert rec.count("/tcb") == 2  # faulted requests are recorded too


def test_fail_with_close(rec, session):
    rec.fail_with(close=True)
    with pytest.raises(requests.ConnectionError):
        session.get(rec.base + TDX_TCB, params={"fmspc": "00806F050000"}, timeout=TIMEOUT)
    rec.fail_with(close=True, paths="/qe/identity")
    with pytest.raises(requests.ConnectionError):
        session.get(rec.base + "/tdx/certification/v4/qe/identity", timeout=TIMEOUT)
    assert (
        session.get(
            rec.base + TDX_TCB, params={"fmspc": "00806F050000"}, timeout=TIMEOUT
        ).status_code
        == 200
    )
    rec.fail_with()
    assert (
        session.get(rec.base + "/tdx/certification/v4/qe/identity", timeout=TIMEOUT).status_code
        == 200
    )


def test_fail_with_delay(rec, session):
    url = rec.base + "/tdx/certification/v4/qe/identity"
    rec.fail_with(delay=0.3)
    t0 = time.monotonic()
    r = session.get(url, timeout=TIMEOUT)
    assert time.monotonic() - t0 >= 0.3
    assert r.content == load_body(REC, "tdx_qe_identity")
    with pytest.raises(requests.Timeout):
        session.get(url, timeout=0.1)
    rec.fail_with(delay=0.2, status=502)
    t0 = time.monotonic()
    assert session.get(url, timeout=TIMEOUT).status_code == 502
    assert time.monotonic() - t0 >= 0.2
    rec.fail_with()
    t0 = time.monotonic()
    assert session.get(url, timeout=TIMEOUT).status_code == 200
    assert time.monotonic() - t0 < 0.2


def test_stop_is_prompt_and_closes_sockets(session):
    pcs = FakePCS(REC).start()
    url = pcs.base + "/tdx/certification/v4/qe/identity"
    port = pcs.port
    assert session.get(url, timeout=TIMEOUT).status_code == 200  # keep-alive conn open
    pcs.fail_with(delay=30)
    hung = []

    def slow():
        try:
            with requests.Session() as s:
                s.trust_env = False
                s.get(url, timeout=TIMEOUT)
        except requests.RequestException as exc:
            hung.append(exc)

    t = threading.Thread(target=slow)
    t.start()
    deadline = time.monotonic() + 2
    while pcs.count() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    pcs.stop()
    assert time.monotonic() - t0 < 1.5
    t.join(TIMEOUT)
    assert not t.is_alive()
    assert not pcs.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    pcs.stop()  # idempotent


def test_unknown_scenario():
    with pytest.raises(FileNotFoundError):
        FakePCS("no-such-scenario")
