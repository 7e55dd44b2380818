"""Tokens, platform registration (POST /platforms) and the queue / platform list (GET)."""

from __future__ import annotations

import json

import pytest

from dcapd.auth import token_sha512
from tests import pki
from tests.conftest import BACKENDS
from tests.test_pckcert import CASES, PCKCERT, pckcerts_calls, query, raw_tcb, serve_platform

PLATFORM = pki.default_platform()
USER, ADMIN = "user-secret", "admin-secret"
TOKENS = {"user_token_sha512": token_sha512(USER), "admin_token_sha512": token_sha512(ADMIN)}
PLATFORMS = "/sgx/certification/v4/platforms"
SCENARIO = "2025-05-27_intel-pcs-recording"


def registration(cpusvn: str, pcesvn: str, platform=PLATFORM, **changes) -> dict:
    """The body Intel's PCK ID retrieval tool sends (lower-case hex, its key order)."""
    body = {
        "enc_ppid": platform.encrypted_ppid.lower(),
        "pce_id": platform.pceid,
        "cpu_svn": cpusvn.lower(),
        "pce_svn": pcesvn.lower(),
        "qe_id": platform.qeid.lower(),
        "platform_manifest": "",
    }
    body.update(changes)
    return body


def register(client, body, update=None, token=USER):
    params = {"update": update} if update else None
    return client.simulate_post(
        PLATFORMS,
        params=params,
        body=json.dumps(body),
        headers={"Content-Type": "application/json", "user-token": token},
    )


def read_platforms(client, source=None, token=ADMIN):
    return client.simulate_get(
        PLATFORMS, params={"source": source} if source else None, headers={"admin-token": token}
    )


def fill_prefetch_gap(fake):
    """The recording has no v3 QvE identity: serve the v4 one there (the prefetch asks)."""
    qve = next(r for r in fake.responses if r.path == "/sgx/certification/v4/qve/identity")
    fake.add_response("GET", "/sgx/certification/v3/qve/identity", None, 200, qve.headers, qve.body)


ADMIN_ROUTES = [
    ("GET", PLATFORMS),
    ("PUT", "/sgx/certification/v4/platformcollateral"),
    ("GET", "/sgx/certification/v3/platforms"),
    ("PUT", "/sgx/certification/v3/platformcollateral"),
    ("GET", "/sgx/certification/v4/refresh"),
    ("POST", "/sgx/certification/v4/refresh"),
    ("POST", "/sgx/certification/v3/refresh"),
    ("PUT", "/sgx/certification/v4/appraisalpolicy"),
    ("GET", "/dcapd/status"),
]


@pytest.mark.parametrize("method,path", ADMIN_ROUTES + [("POST", PLATFORMS)])
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"admin-token": ""},
        {"admin-token": "wrong"},
        {"user-token": USER},
        {"admin-token": USER},
    ],
)
def test_token_routes_refuse_missing_wrong_and_empty_tokens(make_client, method, path, headers):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    if method == "POST" and headers.get("user-token") == USER:
        headers = {"user-token": "wrong"}
    result = client.simulate_request(method, path, headers=headers, body="{}")
    assert result.status_code == 401
    assert result.text == "Authentication failed."


@pytest.mark.parametrize("method,path", ADMIN_ROUTES + [("POST", PLATFORMS)])
def test_no_configured_hash_refuses_every_token(make_client, method, path):
    client = make_client(cache_mode="OFFLINE")  # fail closed
    for header in ("admin-token", "user-token"):
        result = client.simulate_request(method, path, headers={header: ""}, body="{}")
        assert result.status_code == 401
        result = client.simulate_request(method, path, headers={header: "anything"}, body="{}")
        assert result.status_code == 401


def test_tokens_never_reach_the_log(make_client, caplog):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    caplog.set_level("DEBUG", logger="dcapd")
    read_platforms(client, token="wrong-token-value")
    register(client, registration(*raw_tcb(*CASES[0][:2])), token=USER)
    assert "wrong-token-value" not in caplog.text and USER not in caplog.text
    assert PLATFORM.encrypted_ppid.lower() not in caplog.text.lower()


@pytest.mark.parametrize(
    "body",
    [
        [],
        "x",
        {"pce_id": "0000"},
        {"qe_id": "AB", "pce_id": "000"},
        {"qe_id": "AB", "pce_id": "0000", "cpu_svn": "00" * 16, "pce_svn": "0000"},
        {
            "qe_id": "AB",
            "pce_id": "0000",
            "cpu_svn": "0" * 31,
            "pce_svn": "0000",
            "enc_ppid": "0" * 768,
        },
        {"qe_id": "AB", "pce_id": "0000", "platform_manifest": 7},
        {"qe_id": 5, "pce_id": "0000", "platform_manifest": "ab"},
    ],
)
def test_schema_violations_are_400_not_intels_500(make_client, body):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    result = register(client, body)
    assert result.status_code == 400
    assert result.text == "Invalid request parameters."


def test_malformed_json_is_400(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    result = client.simulate_post(PLATFORMS, body="{not json", headers={"user-token": USER})
    assert result.status_code == 400


def test_oversized_body_is_413(make_client):
    client = make_client(cache_mode="OFFLINE", max_body_bytes=1000, **TOKENS)
    result = client.simulate_post(PLATFORMS, body="x" * 5000, headers={"user-token": USER})
    assert result.status_code == 413


@pytest.mark.parametrize("backend", BACKENDS)
def test_offline_registration_queues_and_get_drains(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    cpusvn, pcesvn = raw_tcb(*CASES[0][:2])
    assert register(client, registration(cpusvn, pcesvn)).text == "Operation successful."
    assert register(client, registration(cpusvn, pcesvn)).status_code == 200  # upsert
    result = read_platforms(client)
    assert result.status_code == 200
    assert result.headers["platform-count"] == "1"
    assert result.json == [
        {
            "qe_id": PLATFORM.qeid,
            "pce_id": "0000",
            "cpu_svn": cpusvn,
            "pce_svn": pcesvn,
            "platform_manifest": "",
            "enc_ppid": PLATFORM.encrypted_ppid.lower(),
        }
    ]
    assert list(result.json[0]) == [
        "qe_id",
        "pce_id",
        "cpu_svn",
        "pce_svn",
        "platform_manifest",
        "enc_ppid",
    ]
    again = read_platforms(client, "reg")
    assert again.json == [] and again.headers["platform-count"] == "0"


def test_registration_with_manifest_ignores_raw_tcb(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    body = {"pce_id": "0000", "qe_id": "abcdef", "platform_manifest": "AB" * 100}
    assert register(client, body).status_code == 200
    [row] = read_platforms(client).json
    assert row == {
        "qe_id": "ABCDEF",
        "pce_id": "0000",
        "cpu_svn": "",
        "pce_svn": "",
        "platform_manifest": "ab" * 100,
        "enc_ppid": "",
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_lazy_registration_fetches_platform_and_prefetches_collateral(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    serve_platform(fake)
    fill_prefetch_gap(fake)
    client = make_client(fake, **TOKENS)
    cpusvn, pcesvn = raw_tcb(*CASES[0][:2])
    # update=all also wants EARLY identities, which PCS has not got here: Intel's 404.
    assert register(client, registration(cpusvn, pcesvn), update="all").status_code == 404
    assert register(client, registration(cpusvn, pcesvn), update="standard").status_code == 200
    assert pckcerts_calls(fake) == 1
    paths = {(c.path, c.query.get("update", [""])[0]) for c in fake.calls}
    assert not any("/v3/" in path for path, _ in paths), "registration never asks PCS for v3"
    for expected in [
        ("/sgx/certification/v4/qe/identity", "early"),
        ("/sgx/certification/v4/qe/identity", "standard"),
        ("/sgx/certification/v4/qve/identity", "standard"),
        ("/tdx/certification/v4/qe/identity", "standard"),
        ("/IntelSGXRootCA.der", ""),
    ]:
        assert expected in paths
    assert fake.count("/pckcrl") == 2
    calls = len(fake.calls)
    # Registered: the client's /pckcert is now a cache hit; registering again fetches nothing.
    assert client.simulate_get(PCKCERT, params=query(cpusvn, pcesvn)).status_code == 200
    assert register(client, registration(cpusvn, pcesvn)).status_code == 200
    assert len(fake.calls) == calls
    assert read_platforms(client).json == [], "LAZY registrations are not queued"


def test_lazy_registration_with_manifest_posts_pckcerts(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    fake.add_response(
        "POST",
        "/sgx/certification/v4/pckcerts",
        None,
        200,
        pki.pckcerts_response_headers(PLATFORM),
        pki.pckcerts_response_body(PLATFORM),
    )
    serve_platform(fake)
    fill_prefetch_gap(fake)
    client = make_client(fake, **TOKENS)
    body = {"pce_id": "0000", "qe_id": PLATFORM.qeid.lower(), "platform_manifest": "ab" * 50}
    assert register(client, body).status_code == 200
    [post] = [c for c in fake.calls if c.method == "POST"]
    assert json.loads(post.body) == {"platformManifest": "ab" * 50, "pceid": "0000"}
    # No raw TCB was registered; the first /pckcert selects locally without PCS.
    calls = len(fake.calls)
    result = client.simulate_get(PCKCERT, params=query(*raw_tcb(*CASES[1][:2])))
    assert result.status_code == 200 and len(fake.calls) == calls
    assert read_platforms(client, "[]").json[0]["platform_manifest"] == "AB" * 50


def test_req_registration_fetches_dequeues_and_queues_not_available(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    serve_platform(fake, not_available=True)
    fill_prefetch_gap(fake)
    client = make_client(fake, cache_mode="REQ", **TOKENS)
    cpusvn, pcesvn = raw_tcb(*CASES[0][:2])
    assert register(client, registration(cpusvn, pcesvn)).status_code == 200
    assert read_platforms(client, "reg").json == [], "fetched rows leave the NEW queue"
    [row] = read_platforms(client, "reg_na").json
    # The "Not available" TCB of tests/pki.py: components 4,4,2,2,255,255,1 and PCESVN 9.
    assert row["cpu_svn"] == "04040202ffff01000000000000000000"
    assert row["pce_svn"] == "0900"
    assert read_platforms(client, "reg_na").json == []
    # REQ keeps the answer even with "Not available" entries: a cache hit, no PCS call.
    calls = len(fake.calls)
    assert client.simulate_get(PCKCERT, params=query(cpusvn, pcesvn)).status_code == 200
    assert len(fake.calls) == calls


def test_req_registration_failure_stays_queued(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake, cache_mode="REQ", **TOKENS)
    cpusvn, pcesvn = raw_tcb(*CASES[0][:2])
    assert register(client, registration(cpusvn, pcesvn)).status_code == 404  # PCS: 404
    assert len(read_platforms(client, "reg").json) == 1


def test_cached_platform_list_by_fmspc(fake_pcs, make_client):
    fake = fake_pcs()
    serve_platform(fake)
    client = make_client(fake, **TOKENS)
    for components, pcesvn, _ in CASES[:2]:
        assert (
            client.simulate_get(PCKCERT, params=query(*raw_tcb(components, pcesvn))).status_code
            == 200
        )
    everything = read_platforms(client, "[]")
    assert everything.headers["platform-count"] == "2"
    assert list(everything.json[0]) == [
        "qe_id",
        "pce_id",
        "cpu_svn",
        "pce_svn",
        "enc_ppid",
        "platform_manifest",
    ]
    assert everything.json[0]["enc_ppid"] == PLATFORM.encrypted_ppid.upper()
    assert (
        read_platforms(client, f"[{PLATFORM.fmspc.lower()},00606A000000]").json == everything.json
    )
    assert read_platforms(client, "[00606A000000]").json == []
    assert read_platforms(client, "00606A000000").status_code == 400
    assert read_platforms(client, "[]").json == everything.json, "listing is not destructive"
