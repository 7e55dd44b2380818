"""Byte-exact replay of every recorded PCS response of a route dcapd serves, in LAZY mode.

Each scenario gets its own cache and its own fake PCS (scenarios are separate worlds).
"""

from __future__ import annotations

import urllib.parse

import pytest

from tests.conftest import BACKENDS, INTEL_ROOT_CDP
from tests.fakepcs import SCENARIOS, load_body, load_manifest

CHAIN_HEADERS = (
    "SGX-PCK-CRL-Issuer-Chain",
    "TCB-Info-Issuer-Chain",
    "SGX-TCB-Info-Issuer-Chain",
    "SGX-Enclave-Identity-Issuer-Chain",
    "TCB-Evaluation-Data-Numbers-Issuer-Chain",
)


def pccs_requests(response: dict):
    """The dcapd requests that must answer with this recorded PCS response.

    Yields (path, query, expected body transform, expected content type, chain header name).
    Recordings of routes dcapd does not serve (fmspcs, the PEM CRL) document PCS only and
    yield nothing; nor do PCS API v3 TCB infos and identities, which a miss never fetches
    (tests/test_v3.py serves them from an upload).
    """
    path, query = response["path"], dict(response["query"])
    if path == "/IntelSGXRootCA.der":
        yield "/sgx/certification/v4/rootcacrl", {}, "hex", "application/pkix-crl", None
        yield "/sgx/certification/v3/rootcacrl", {}, "hex", "application/pkix-crl", None
        yield (
            "/sgx/certification/v4/crl",
            {"uri": INTEL_ROOT_CDP},
            "raw",
            "application/pkix-crl",
            None,
        )
        return
    tee, _, version, endpoint = path.strip("/").split("/", 3)
    if version == "v3" and endpoint != "pckcrl":
        return
    if "tcbEvaluationDataNumber" in query:  # pinned collateral: exactly PCS's query
        chain = (
            "TCB-Info-Issuer-Chain" if endpoint == "tcb" else "SGX-Enclave-Identity-Issuer-Chain"
        )
        yield path, query, "raw", "application/json", chain
        return
    if endpoint == "tcbevaluationdatanumbers":
        yield path, {}, "raw", "application/json", "TCB-Evaluation-Data-Numbers-Issuer-Chain"
        return
    if endpoint == "qae/identity":
        yield path, dict(query), "raw", "application/json", "SGX-Enclave-Identity-Issuer-Chain"
        return
    if endpoint == "pckcrl" and query.get("encoding") == "der":
        yield (
            path,
            {"ca": query["ca"], "encoding": "der"},
            "raw",
            "application/pkix-crl",
            "SGX-PCK-CRL-Issuer-Chain",
        )
        yield (
            path,
            {"ca": query["ca"].upper()},
            "hex",
            "application/x-pem-file",
            "SGX-PCK-CRL-Issuer-Chain",
        )
    elif endpoint == "tcb" and "tcbEvaluationDataNumber" not in query:
        chain = "SGX-TCB-Info-Issuer-Chain" if version == "v3" else "TCB-Info-Issuer-Chain"
        update = query.get("update", "standard")
        yield path, {"fmspc": query["fmspc"], "update": update}, "raw", "application/json", chain
        if update == "standard":
            yield path, {"fmspc": query["fmspc"].lower()}, "raw", "application/json", chain
    elif endpoint in ("qe/identity", "qve/identity") and "tcbEvaluationDataNumber" not in query:
        update = query.get("update", "standard")
        yield (
            path,
            {"update": update},
            "raw",
            "application/json",
            "SGX-Enclave-Identity-Issuer-Chain",
        )


def served_cases():
    for scenario in SCENARIOS:
        for response in load_manifest(scenario)["responses"]:
            if response["status"] == 200 and any(pccs_requests(response)):
                yield pytest.param(scenario, response["id"], id=f"{scenario}:{response['id']}")


def recorded_chain(response: dict) -> str | None:
    return next(
        (response["headers"][name] for name in CHAIN_HEADERS if name in response["headers"]), None
    )


@pytest.mark.parametrize("scenario,response_id", list(served_cases()))
def test_serves_recorded_bytes_on_miss_and_hit(fake_pcs, make_client, scenario, response_id):
    response = next(r for r in load_manifest(scenario)["responses"] if r["id"] == response_id)
    body = load_body(scenario, response)
    fake = fake_pcs(scenario)
    client = make_client(fake)
    for path, query, transform, content_type, chain_name in pccs_requests(response):
        expected = body.hex().encode() if transform == "hex" else body
        for attempt in ("miss", "hit"):
            before = len(fake.calls)
            result = client.simulate_get(path, params=query)
            assert result.status_code == 200, (path, query, attempt, result.text)
            assert result.content == expected, (path, query, attempt)
            assert result.headers["content-type"] == content_type
            assert len(result.headers["request-id"]) == 32
            if chain_name:
                assert result.headers[chain_name] == recorded_chain(response)
                assert result.headers[chain_name].endswith("%0A")
            if attempt == "hit":
                assert len(fake.calls) == before, "a cache hit must not call upstream"


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_upstream_call_per_item_and_none_after_restart(fake_pcs, make_client):
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    paths = [
        ("/sgx/certification/v4/tcb", {"fmspc": "00906ED50000", "update": "early"}),
        ("/tdx/certification/v4/qe/identity", {}),
        ("/sgx/certification/v4/pckcrl", {"ca": "processor", "encoding": "der"}),
        ("/sgx/certification/v4/rootcacrl", {}),
    ]
    first = make_client(fake)
    answers = [first.simulate_get(p, params=q) for p, q in paths]
    assert [a.status_code for a in answers] == [200] * 4
    assert len(fake.calls) == 4
    assert fake.count("/IntelSGXRootCA.der") == 1
    again = [first.simulate_get(p, params=q) for p, q in paths]
    assert len(fake.calls) == 4
    first.app.services.store.close()
    restarted = make_client(fake)  # same cache directory, new app and store
    after_restart = [restarted.simulate_get(p, params=q) for p, q in paths]
    assert len(fake.calls) == 4, "a restart must serve from the cache on disk"
    for a, b, c in zip(answers, again, after_restart):
        assert a.content == b.content == c.content
        assert {k: v for k, v in a.headers.items() if k != "request-id"} == {
            k: v for k, v in c.headers.items() if k != "request-id"
        }


def test_upstream_query_uses_v4_and_the_update(fake_pcs, make_client):
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    client = make_client(fake)
    assert (
        client.simulate_get(
            "/sgx/certification/v4/tcb", params={"fmspc": "00906ed50000"}
        ).status_code
        == 200
    )
    call = fake.calls[-1]
    assert call.path == "/sgx/certification/v4/tcb"
    assert call.query == {"fmspc": ["00906ED50000"], "update": ["standard"]}
    assert "Ocp-Apim-Subscription-Key" not in call.headers
    client.simulate_get("/sgx/certification/v4/pckcrl", params={"ca": "Platform"})
    assert fake.calls[-1].query == {"ca": ["platform"], "encoding": ["der"]}


@pytest.mark.parametrize("mode", ["REQ", "OFFLINE"])
def test_req_and_offline_miss_is_404_without_upstream(fake_pcs, make_client, mode):
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    client = make_client(fake, cache_mode=mode)
    for path, query in [
        ("/sgx/certification/v4/tcb", {"fmspc": "00906ED50000"}),
        ("/sgx/certification/v4/qe/identity", {}),
        ("/sgx/certification/v4/pckcrl", {"ca": "processor"}),
        ("/sgx/certification/v4/rootcacrl", {}),
        ("/sgx/certification/v4/crl", {"uri": INTEL_ROOT_CDP}),
    ]:
        result = client.simulate_get(path, params=query)
        assert result.status_code == 404
        assert result.text == "No cache data for this platform."
    assert fake.calls == []


def test_upstream_404_is_404_and_not_cached(fake_pcs, make_client):
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    client = make_client(fake, not_found_ttl=0)  # 0: a 404 is not remembered at all
    for _ in range(2):
        result = client.simulate_get("/sgx/certification/v4/tcb", params={"fmspc": "AAAAAAAAAAAA"})
        assert result.status_code == 404
    assert fake.count("/tcb") == 2, "errors are never cached: each miss asks upstream again"
    assert client.app.services.store.keys("tcb/") == []


def test_unreachable_upstream_is_502(fake_pcs, make_client):
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    client = make_client(fake)
    fake.fail_with(close=True)
    result = client.simulate_get("/sgx/certification/v4/qe/identity")
    assert result.status_code == 502
    assert result.text == "Unable to retrieve the collateral from the Intel SGX PCS."
    result = client.simulate_get("/sgx/certification/v4/rootcacrl")
    assert result.status_code == 502
    fake.fail_with()
    assert client.simulate_get("/sgx/certification/v4/qe/identity").status_code == 200


def test_upstream_answer_without_issuer_chain_is_502_and_not_cached(fake_pcs, make_client):
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    body = load_body("2025-05-27_intel-pcs-recording", "sgx_qe_identity")
    fake.add_response(
        "GET",
        "/sgx/certification/v4/qe/identity",
        None,
        200,
        {"Content-Type": "application/json"},
        body,
    )
    client = make_client(fake)
    assert client.simulate_get("/sgx/certification/v4/qe/identity").status_code == 502
    assert client.app.services.store.keys("identity/") == []


def test_tcb_info_for_another_fmspc_is_rejected(fake_pcs, make_client):
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    recorded = next(
        r
        for r in load_manifest("2025-05-27_intel-pcs-recording")["responses"]
        if r["id"] == "sgx_tcb_00906ED50000"
    )
    fake.add_response(
        "GET",
        "/sgx/certification/v4/tcb",
        {"fmspc": "00606A000000"},
        200,
        recorded["headers"],
        load_body("2025-05-27_intel-pcs-recording", recorded),
    )
    client = make_client(fake)
    result = client.simulate_get("/sgx/certification/v4/tcb", params={"fmspc": "00606A000000"})
    assert result.status_code == 502
    assert client.app.services.store.keys() == []


@pytest.mark.parametrize(
    "path,query",
    [
        ("/sgx/certification/v4/tcb", {}),
        ("/sgx/certification/v4/tcb", {"fmspc": "00906ED5000"}),
        ("/sgx/certification/v4/tcb", {"fmspc": "00906ED5000G"}),
        ("/sgx/certification/v4/tcb", {"fmspc": "00906ED50000", "update": "late"}),
        ("/tdx/certification/v4/qe/identity", {"update": "x"}),
        ("/sgx/certification/v4/pckcrl", {}),
        ("/sgx/certification/v4/pckcrl", {"ca": "root"}),
        ("/sgx/certification/v4/crl", {}),
        ("/sgx/certification/v4/crl", {"uri": "https://evil.example/?" + INTEL_ROOT_CDP}),
        (
            "/sgx/certification/v4/crl",
            {
                "uri": "https://certificates.trustedservices.intel.com@evil.example/IntelSGXRootCA.der"
            },
        ),
        (
            "/sgx/certification/v4/crl",
            {"uri": "http://certificates.trustedservices.intel.com/IntelSGXRootCA.der"},
        ),
        ("/sgx/certification/v4/crl", {"uri": "https://127.0.0.1/IntelSGXRootCA.der"}),
        ("/sgx/certification/v4/appraisalpolicy", {}),
    ],
)
def test_bad_queries_are_400_without_upstream(fake_pcs, make_client, path, query):
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    client = make_client(fake)
    result = client.simulate_get(path, params=query)
    assert result.status_code == 400
    assert result.text == "Invalid request parameters."
    assert fake.calls == []


def test_query_rules_first_duplicate_wins_case_and_trailing_slash(fake_pcs, make_client):
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    client = make_client(fake)
    result = client.simulate_get(
        "/SGX/Certification/V4/TCB/", query_string="fmspc=00906ED50000&fmspc=zz&update=early"
    )
    assert result.status_code == 200
    assert result.content == load_body(
        "2025-05-27_intel-pcs-recording", "sgx_tcb_00906ED50000_early"
    )


def test_request_id_is_echoed_or_generated(make_client):
    client = make_client(cache_mode="OFFLINE")
    assert (
        client.simulate_get("/nowhere", headers={"Request-ID": "abc123"}).headers["request-id"]
        == "abc123"
    )
    generated = client.simulate_get("/nowhere", headers={"Request-ID": "bad id\x01"})
    assert len(generated.headers["request-id"]) == 32


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/"),
        ("GET", "/sgx/certification/v5/tcb"),
        ("GET", "/tdx/certification/v3/tcb"),
        ("GET", "/tdx/certification/v4/pckcrl"),
        ("GET", "/sgx/certification/v4/fmspcs"),
        ("GET", "/sgx/certification/v3/qae/identity"),
        ("GET", "/tdx/certification/v4/qve/identity"),
        ("POST", "/sgx/certification/v4/tcb"),
        ("DELETE", "/sgx/certification/v4/pckcrl"),
    ],
)
def test_unknown_routes_and_methods_are_404_never_redirects(make_client, method, path):
    result = make_client(cache_mode="OFFLINE").simulate_request(method, path)
    assert result.status_code == 404
    assert "location" not in result.headers


def test_appraisal_policy_is_404_until_uploaded(make_client):
    client = make_client(cache_mode="OFFLINE")
    result = client.simulate_get(
        "/sgx/certification/v4/appraisalpolicy", params={"fmspc": "00906ED50000"}
    )
    assert result.status_code == 404


def test_crl_uri_of_intels_root_ca_is_the_rootcacrl_entry(fake_pcs, make_client):
    """Issue 14: the root CA CRL's distribution point is one entry with rootcacrl (it used to be
    stored again under its exact URI)."""
    fake = fake_pcs("2025-08-15_sgx-00606A000000")
    client = make_client(fake)
    assert (
        client.simulate_get("/sgx/certification/v4/crl", params={"uri": INTEL_ROOT_CDP}).status_code
        == 200
    )
    assert client.app.services.store.keys() == ["rootcacrl"]
    assert urllib.parse.urlsplit(fake.calls[-1].path).path == "/IntelSGXRootCA.der"


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_pcs_404_is_remembered_for_not_found_ttl(fake_pcs, make_client):
    """An SGX-only FMSPC has no TDX TCB info: each new platform's first pckcert would ask
    again. Within not_found_ttl a repeated miss answers 404 without asking PCS."""
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    client = make_client(fake, not_found_ttl=300)
    clock = FakeMonotonic()
    client.app.services.collateral.not_found.clock = clock
    params = {"fmspc": "00906ED50000"}  # SGX only: PCS has no TDX TCB info for it
    for _ in range(3):
        result = client.simulate_get("/tdx/certification/v4/tcb", params=params)
        assert result.status_code == 404
        assert result.text == "No cache data for this platform."
    assert fake.count("/tdx/certification/v4/tcb") == 1
    clock.now += 299
    assert client.simulate_get("/tdx/certification/v4/tcb", params=params).status_code == 404
    assert fake.count("/tdx/certification/v4/tcb") == 1
    clock.now += 2  # past the window: PCS is asked again
    assert client.simulate_get("/tdx/certification/v4/tcb", params=params).status_code == 404
    assert fake.count("/tdx/certification/v4/tcb") == 2
    assert client.app.services.store.keys() == []
    # Another key is not affected.
    assert client.simulate_get("/sgx/certification/v4/tcb", params=params).status_code == 200


def test_a_5xx_is_never_remembered(fake_pcs, make_client):
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    client = make_client(fake, not_found_ttl=300)
    fake.fail_with(status=503, paths="/qe/identity")
    for _ in range(2):
        assert client.simulate_get("/sgx/certification/v4/qe/identity").status_code == 404
    assert fake.count("/qe/identity") == 2
    fake.fail_with()
    assert client.simulate_get("/sgx/certification/v4/qe/identity").status_code == 200


def test_a_refresh_ignores_remembered_404s(fake_pcs, make_client):
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    client = make_client(fake, not_found_ttl=300)
    early = {"update": "early"}  # the recording has no EARLY QE identity
    for _ in range(2):
        assert (
            client.simulate_get("/sgx/certification/v4/qe/identity", params=early).status_code
            == 404
        )

    def early_qe_calls() -> int:
        return sum(
            1
            for c in fake.calls
            if c.path == "/sgx/certification/v4/qe/identity" and c.query.get("update") == ["early"]
        )

    assert early_qe_calls() == 1
    client.app.services.refresher.refresh_collateral()
    assert early_qe_calls() == 2, "the refresh asks PCS whatever a miss remembered"
