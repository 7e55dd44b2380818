"""PCS API v3 as Intel's PCCS 1.27 handles it (pccs-1.27.md §1): a v3 TCB info or identity
that is not cached is 410 without asking PCS, in every mode; cached (uploaded) v3 collateral
is served byte-exact and never refreshed; PCK CRLs and the root CA CRL come through v4; every
answer on a /v3/ route carries Intel's Warning header."""

from __future__ import annotations

import json
import logging

import pytest

from dcapd.errors import STATUS_TEXTS, V3_EOL_WARNING
from tests.conftest import INTEL_ROOT_CDP
from tests.fakepcs import load_body, load_manifest
from tests.test_platforms import ADMIN, TOKENS
from tests.uploads import v3_upload_from_scenario

SCENARIO = "2025-05-27_intel-pcs-recording"
V3 = "/sgx/certification/v3"
WARNING = (
    '299 - "PCS API version 3 is no longer available. Cached collateral downloaded from API '
    "version 3 is deprecated, will not be refreshed, and may expire. Please migrate to API "
    'version 4."'
)
EOL_TEXT = (
    "The Intel PCS API version 3 reached planned EOL. Accordingly, collateral from this API "
    "version cannot be retrieved any longer."
)
V3_COLLATERAL = [
    (f"{V3}/tcb", {"fmspc": "00906ED50000"}),
    (f"{V3}/tcb", {"fmspc": "00906ED50000", "update": "early"}),
    (f"{V3}/qe/identity", {}),
    (f"{V3}/qve/identity", {"update": "early"}),
]


def recorded(response_id: str) -> dict:
    return next(r for r in load_manifest(SCENARIO)["responses"] if r["id"] == response_id)


def put_v3_upload(client):
    reply = client.simulate_put(
        f"{V3}/platformcollateral",
        body=json.dumps(v3_upload_from_scenario(SCENARIO)),
        headers={"Content-Type": "application/json", "admin-token": ADMIN},
    )
    assert reply.status_code == 200, reply.text
    return reply


def test_the_texts_are_intels():
    assert V3_EOL_WARNING == WARNING
    assert STATUS_TEXTS[410] == EOL_TEXT
    assert STATUS_TEXTS[413] == "Content too large."


@pytest.mark.parametrize("mode", ["LAZY", "REQ", "OFFLINE"])
def test_v3_tcb_info_and_identity_miss_is_410_with_warning_and_no_upstream(
    fake_pcs, make_client, mode
):
    fake = fake_pcs(SCENARIO)  # it has v3 recordings: they must never be asked for
    client = make_client(fake, cache_mode=mode)
    for path, params in V3_COLLATERAL:
        result = client.simulate_get(path, params=params)
        assert result.status_code == 410, (path, params)
        assert result.text == EOL_TEXT
        assert result.headers["warning"] == WARNING
        assert len(result.headers["request-id"]) == 32
    assert fake.calls == []
    assert client.app.services.store.keys() == []


def test_every_answer_on_a_v3_route_carries_the_warning_and_no_v4_answer_does(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    answers = {
        "bad query": client.simulate_get(f"{V3}/tcb", params={"fmspc": "xyz"}),
        "no cache": client.simulate_get(f"{V3}/pckcrl", params={"ca": "processor"}),
        "unknown path": client.simulate_get(f"{V3}/nowhere"),
        "unknown tdx v3 path": client.simulate_get("/tdx/certification/v3/tcb"),
        "no token": client.simulate_get(f"{V3}/platforms"),
        "upper case": client.simulate_get("/SGX/Certification/V3/QE/Identity"),
        "admin": client.simulate_get(f"{V3}/platforms", headers={"admin-token": ADMIN}),
    }
    assert [a.status_code for a in answers.values()] == [400, 404, 404, 404, 401, 410, 200]
    for name, answer in answers.items():
        assert answer.headers.get("warning") == WARNING, name
    v4 = client.simulate_get("/sgx/certification/v4/pckcrl", params={"ca": "processor"})
    assert v4.status_code == 404 and "warning" not in v4.headers


@pytest.mark.parametrize("mode", ["LAZY", "OFFLINE"])
def test_uploaded_v3_collateral_is_served_byte_exact_without_upstream(fake_pcs, make_client, mode):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake, cache_mode=mode, **TOKENS)
    put_v3_upload(client)
    for path, params, response_id, chain in [
        (
            f"{V3}/tcb",
            {"fmspc": "00906ed50000"},
            "sgx_tcb_00906ED50000_v3api",
            "SGX-TCB-Info-Issuer-Chain",
        ),
        (f"{V3}/qe/identity", {}, "sgx_qe_identity_v3api", "SGX-Enclave-Identity-Issuer-Chain"),
    ]:
        for _ in ("first", "again"):
            result = client.simulate_get(path, params=params)
            assert result.status_code == 200, (path, result.text)
            assert result.content == load_body(SCENARIO, response_id)
            assert result.headers[chain] == recorded(response_id)["headers"][chain]
            assert result.headers["warning"] == WARNING
    assert fake.calls == []


def test_v3_crl_misses_are_fetched_through_v4(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake)
    crl = client.simulate_get(f"{V3}/pckcrl", params={"ca": "processor", "encoding": "der"})
    assert crl.status_code == 200
    assert crl.content == load_body(SCENARIO, "pckcrl_processor")
    assert crl.headers["warning"] == WARNING
    assert [c.path for c in fake.calls] == ["/sgx/certification/v4/pckcrl"]
    assert fake.calls[0].query == {"ca": ["processor"], "encoding": ["der"]}
    root = client.simulate_get(f"{V3}/rootcacrl")
    assert root.content == load_body(SCENARIO, "root_ca_crl").hex().encode()
    uri = client.simulate_get(f"{V3}/crl", params={"uri": INTEL_ROOT_CDP})
    assert uri.content == load_body(SCENARIO, "root_ca_crl")
    assert not any("/v3/" in call.path for call in fake.calls)
    # The v4 route answers from the same entry: no further call.
    calls = len(fake.calls)
    v4 = client.simulate_get("/sgx/certification/v4/pckcrl", params={"ca": "processor"})
    assert v4.content == load_body(SCENARIO, "pckcrl_processor").hex().encode()
    assert len(fake.calls) == calls


def test_refresh_skips_v3_collateral_with_one_log_line(fake_pcs, make_client, caplog):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake, **TOKENS)
    put_v3_upload(client)
    assert (
        client.simulate_get(
            "/sgx/certification/v4/tcb", params={"fmspc": "00906ED50000"}
        ).status_code
        == 200
    )
    store = client.app.services.store
    v3_keys = sorted(k for k in store.keys() if "/3/" in k)
    assert v3_keys == ["identity/qe/3/STANDARD", "tcb/sgx/3/00906ED50000/STANDARD"]
    before = {key: store.cache.get(key) for key in v3_keys}
    with caplog.at_level(logging.INFO, logger="dcapd.refresh"):
        client.app.services.refresher.refresh_collateral()
    assert not any("/v3/" in call.path for call in fake.calls)
    assert fake.count("/sgx/certification/v4/tcb") == 2  # the v4 entry was refreshed
    assert {key: store.cache.get(key) for key in v3_keys} == before
    skipped = [r.getMessage() for r in caplog.records if "PCS API v3" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].startswith("refresh: 2 cached PCS API v3")
