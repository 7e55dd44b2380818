"""GET /pckcert in LAZY, REQ and OFFLINE modes, against a fake PCS serving the test PKI."""

from __future__ import annotations

import threading

import pytest

from tests import pki

PLATFORM = pki.default_platform()
TCB_CHAIN = pki.url_encoded_chain(pki.tcb_signing().pem, pki.root_ca().pem)
PCKCERT = "/sgx/certification/v4/pckcert"


def serve_platform(fake, platform=PLATFORM, versions=(4,), not_available=False, headers=None):
    """Teach the fake PCS the platform's pckcerts answer and its FMSPC's SGX TCB info."""
    for version in versions:
        fake.add_response(
            "GET",
            f"/sgx/certification/v{version}/pckcerts",
            None,
            200,
            headers or pki.pckcerts_response_headers(platform),
            pki.pckcerts_response_body(platform, not_available=not_available),
        )
        chain_header = "TCB-Info-Issuer-Chain" if version == 4 else "SGX-TCB-Info-Issuer-Chain"
        fake.add_response(
            "GET",
            f"/sgx/certification/v{version}/tcb",
            {"fmspc": platform.fmspc, "update": "standard"},
            200,
            {"Content-Type": "application/json", chain_header: TCB_CHAIN},
            platform.tcb_info if version == 4 else platform.tcb_info_v2,
        )


def query(cpusvn: str, pcesvn: str, platform=PLATFORM, **extra) -> dict:
    params = {
        "qeid": platform.qeid,
        "encrypted_ppid": platform.encrypted_ppid,
        "cpusvn": cpusvn,
        "pcesvn": pcesvn,
        "pceid": platform.pceid,
    }
    params.update(extra)
    return params


def raw_tcb(components, pcesvn: int) -> tuple[str, str]:
    return bytes(components).hex().upper(), pcesvn.to_bytes(2, "little").hex().upper()


def assert_pck_answer(result, entry, platform=PLATFORM):
    assert result.status_code == 200, result.text
    assert result.text == entry.pem if entry.pem.endswith("\n") else entry.pem + "\n"
    assert result.headers["content-type"] == "application/x-pem-file"
    assert result.headers["SGX-TCBm"] == entry.tcbm
    assert result.headers["SGX-FMSPC"] == platform.fmspc.upper()
    assert result.headers["SGX-PCK-Certificate-CA-Type"] == "PLATFORM"
    assert result.headers["SGX-PCK-Certificate-Issuer-Chain"] == platform.issuer_chain


def pckcerts_calls(fake) -> int:
    return fake.count("/pckcerts")


# Raw TCBs and the cert Intel's algorithm must pick (index into PLATFORM.pck_certs), worked out
# by hand from the levels in tests/pki.py: each level's own TCB picks its own cert; a TCB just
# below level 1 (pcesvn 12) falls to level 2; above everything picks level 0.
CASES = [
    (entry.components, entry.pcesvn, index) for index, entry in enumerate(PLATFORM.pck_certs)
] + [
    (PLATFORM.pck_certs[1].components, 12, 2),
    ((9, 9, 9, 9, 255, 255, 9) + (0,) * 9, 20, 0),
    ((8, 8, 3, 3, 255, 255, 1) + (0,) * 9, 11, 2),
]


def test_lazy_each_level_after_one_pckcerts_call_and_identical_after_restart(fake_pcs, make_client):
    fake = fake_pcs()
    serve_platform(fake)
    client = make_client(fake, api_key="k" * 32)
    answers = []
    for components, pcesvn, expected in CASES:
        result = client.simulate_get(PCKCERT, params=query(*raw_tcb(components, pcesvn)))
        assert_pck_answer(result, PLATFORM.pck_certs[expected])
        answers.append(result)
    assert pckcerts_calls(fake) == 1, "one pckcerts call for the whole platform"
    call = next(c for c in fake.calls if c.path.endswith("/pckcerts"))
    assert call.headers.get("Ocp-Apim-Subscription-Key") == "k" * 32
    assert call.query == {"encrypted_ppid": [PLATFORM.encrypted_ppid], "pceid": ["0000"]}
    calls = len(fake.calls)
    client.app.services.store.close()
    restarted = make_client(fake)
    for (components, pcesvn, _), before in zip(CASES, answers):
        after = restarted.simulate_get(PCKCERT, params=query(*raw_tcb(components, pcesvn)))
        assert after.content == before.content
        assert after.headers["SGX-TCBm"] == before.headers["SGX-TCBm"]
    assert len(fake.calls) == calls, "answers after a restart come from the cache"


def test_raw_tcb_below_every_cert_is_404(fake_pcs, make_client):
    fake = fake_pcs()
    serve_platform(fake)
    client = make_client(fake)
    result = client.simulate_get(PCKCERT, params=query(*raw_tcb((1,) * 16, 1)))
    assert result.status_code == 404


@pytest.mark.parametrize("mode", ["REQ", "OFFLINE"])
def test_unknown_platform_is_461_without_upstream(fake_pcs, make_client, mode):
    fake = fake_pcs()
    serve_platform(fake)
    client = make_client(fake, cache_mode=mode)
    result = client.simulate_get(PCKCERT, params=query(*raw_tcb(*CASES[0][:2])))
    assert result.status_code == 461
    assert result.text == "The platform was not found in the cache."
    assert fake.calls == []


@pytest.mark.parametrize("mode", ["REQ", "OFFLINE"])
def test_known_platform_new_raw_tcb_is_selected_locally_in_every_mode(fake_pcs, make_client, mode):
    fake = fake_pcs()
    serve_platform(fake)
    lazy = make_client(fake)
    assert lazy.simulate_get(PCKCERT, params=query(*raw_tcb(*CASES[0][:2]))).status_code == 200
    lazy.app.services.store.close()
    calls = len(fake.calls)
    other_mode = make_client(fake, cache_mode=mode)
    for components, pcesvn, expected in CASES[1:]:
        result = other_mode.simulate_get(PCKCERT, params=query(*raw_tcb(components, pcesvn)))
        assert_pck_answer(result, PLATFORM.pck_certs[expected])
    assert len(fake.calls) == calls


def test_no_ppid_is_400_and_zero_ppid_is_404_without_upstream(fake_pcs, make_client):
    fake = fake_pcs()
    serve_platform(fake)
    client = make_client(fake)
    params = query(*raw_tcb(*CASES[0][:2]))
    del params["encrypted_ppid"]
    assert client.simulate_get(PCKCERT, params=params).status_code == 400
    result = client.simulate_get(PCKCERT, params=dict(params, encrypted_ppid="0" * 768))
    assert result.status_code == 404
    assert fake.calls == []


@pytest.mark.parametrize(
    "change",
    [
        {"qeid": "A" * 261},
        {"qeid": ""},
        {"qeid": "XYZ"},
        {"cpusvn": "0" * 31},
        {"cpusvn": "G" * 32},
        {"pcesvn": "0D0"},
        {"pceid": "00000"},
        {"encrypted_ppid": ""},
        {"encrypted_ppid": "0" * 767},
        {"encrypted_ppid": "Z" * 768},
    ],
)
def test_invalid_queries_are_400(fake_pcs, make_client, change):
    fake = fake_pcs()
    client = make_client(fake)
    result = client.simulate_get(PCKCERT, params=dict(query(*raw_tcb(*CASES[0][:2])), **change))
    assert result.status_code == 400
    assert fake.calls == []


def test_missing_required_params_are_400(make_client):
    client = make_client(cache_mode="OFFLINE")
    full = query(*raw_tcb(*CASES[0][:2]))
    for name in ("qeid", "cpusvn", "pcesvn", "pceid"):
        params = {k: v for k, v in full.items() if k != name}
        assert client.simulate_get(PCKCERT, params=params).status_code == 400


def test_not_available_entries_in_lazy_mode(fake_pcs, make_client):
    fake = fake_pcs()
    serve_platform(fake, not_available=True)
    client = make_client(fake)
    params = query(*raw_tcb(*CASES[0][:2]))
    assert_pck_answer(client.simulate_get(PCKCERT, params=params), PLATFORM.pck_certs[0])
    store = client.app.services.store
    # Intel (LAZY): with "Not available" entries the raw TCB's answer is not kept...
    assert (
        store.get(store.pckcert_key(PLATFORM.qeid, "0000", params["cpusvn"], params["pcesvn"]))
        is None
    )
    certs = store.get_json(store.certs_key(PLATFORM.qeid, "0000"))["certs"]
    assert len(certs) == len(PLATFORM.pck_certs), "'Not available' entries are filtered"
    # ...but the platform is known, so the next request selects locally.
    assert_pck_answer(client.simulate_get(PCKCERT, params=params), PLATFORM.pck_certs[0])
    assert pckcerts_calls(fake) == 1


def test_upstream_failures(fake_pcs, make_client):
    fake = fake_pcs()
    client = make_client(fake)
    params = query(*raw_tcb(*CASES[0][:2]))
    assert client.simulate_get(PCKCERT, params=params).status_code == 404  # PCS 404
    serve_platform(fake, headers={"Content-Type": "application/json"})  # no FMSPC/CA headers
    assert client.simulate_get(PCKCERT, params=params).status_code == 502
    fake.clear_added()
    fake.fail_with(close=True)
    assert client.simulate_get(PCKCERT, params=params).status_code == 502
    store = client.app.services.store
    assert store.keys("platform/") == [] and store.keys("pckcert/") == []


def test_pem_gets_a_trailing_newline(fake_pcs, make_client):
    fake = fake_pcs()
    serve_platform(fake)
    client = make_client(fake)
    store = client.app.services.store
    result = client.simulate_get(PCKCERT, params=query(*raw_tcb(*CASES[0][:2])))
    assert result.text.endswith("-----END CERTIFICATE-----\n")
    cert_set = store.get_json(store.certs_key(PLATFORM.qeid, "0000"))
    for cert in cert_set["certs"]:
        cert["pem"] = cert["pem"].rstrip("\n")
    store.put_json(store.certs_key(PLATFORM.qeid, "0000"), cert_set)
    result = client.simulate_get(PCKCERT, params=query(*raw_tcb(*CASES[1][:2])))
    assert result.text.endswith("-----END CERTIFICATE-----\n")


def test_v3_pckcert_miss_is_fetched_through_v4(fake_pcs, make_client):
    """Intel's PCCS always fetched PCK certificates through its (v4) PCS URL, whatever the
    client's path; the TCB infos come from v4 too and are cached as v4 entries."""
    fake = fake_pcs()
    serve_platform(fake)
    client = make_client(fake)
    result = client.simulate_get(
        "/sgx/certification/v3/pckcert", params=query(*raw_tcb(*CASES[0][:2]))
    )
    assert_pck_answer(result, PLATFORM.pck_certs[0])
    assert result.headers["warning"].startswith('299 - "PCS API version 3 is no longer')
    assert pckcerts_calls(fake) == 1
    assert fake.count("/sgx/certification/v4/pckcerts") == 1
    assert not any("/v3/" in call.path for call in fake.calls)
    store = client.app.services.store
    assert store.keys("tcb/sgx/3/") == [] and store.keys("tcb/sgx/4/") != []


def test_concurrent_misses_for_one_platform_make_one_pckcerts_call(fake_pcs, make_client):
    fake = fake_pcs()
    serve_platform(fake)
    client = make_client(fake)
    fake.fail_with(delay=0.3, paths="/pckcerts")  # keep the first fetch in flight
    results = []

    def ask(case):
        results.append(client.simulate_get(PCKCERT, params=query(*raw_tcb(*case[:2]))))

    threads = [threading.Thread(target=ask, args=(CASES[i % len(CASES)],)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in results] == [200] * 20
    assert pckcerts_calls(fake) == 1
