"""PUT /platformcollateral: Intel's upload format, all-or-nothing writes, and an OFFLINE dcapd
that serves everything uploaded with no upstream at all."""

from __future__ import annotations

import json

import pytest

from tests import pki
from tests.conftest import BACKENDS
from tests.fakepcs import FIXTURES, PCS_FIXTURES
from tests.servers import running_dcapd
from tests.test_e2e_dcap_qvl import INDEX
from tests.test_pckcert import CASES, PCKCERT, assert_pck_answer, query, raw_tcb
from tests.test_platforms import ADMIN, TOKENS, read_platforms, register, registration
from tests.uploads import (
    INTEL_ROOT_CDP,
    intel_upload,
    upload_for_test_platform,
    upload_from_scenario,
)

V4 = "/sgx/certification/v4/platformcollateral"
PLATFORM = pki.default_platform()


def put(client, body, path=V4, token=ADMIN):
    return client.simulate_put(
        path,
        body=json.dumps(body),
        headers={"Content-Type": "application/json", "admin-token": token},
    )


def all_fixture_bodies() -> dict[bytes, str]:
    """Every recorded body under fixtures/pcs, by its bytes."""
    return {path.read_bytes(): str(path) for path in PCS_FIXTURES.rglob("*.json")}


def snapshot(store) -> dict[str, bytes]:
    return {key: store.cache.get(key) for key in store.keys()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_intel_upload_file_is_served_byte_identical(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    upload = intel_upload()
    result = put(client, upload)
    assert result.status_code == 200, result.text
    assert result.text == "Operation successful."
    recorded = all_fixture_bodies()
    chains = upload["collaterals"]["certificates"]
    for item in upload["collaterals"]["tcbinfos"]:
        for name, document in item.items():
            if name == "fmspc":
                continue
            tee = "tdx" if name.startswith("tdx") else "sgx"
            params = {
                "fmspc": item["fmspc"].upper(),
                "update": "early" if name.endswith("early") else "standard",
            }
            served = client.simulate_get(f"/{tee}/certification/v4/tcb", params=params)
            assert served.status_code == 200
            assert served.content in recorded, f"{name} {item['fmspc']}: not Intel's bytes"
            assert json.loads(served.content) == document
            assert served.headers["TCB-Info-Issuer-Chain"] == chains["TCB-Info-Issuer-Chain"]
    for path, name in [
        ("/sgx/certification/v4/qe/identity", "qeidentity"),
        ("/sgx/certification/v4/qve/identity", "qveidentity"),
        ("/tdx/certification/v4/qe/identity", "tdqeidentity"),
    ]:
        served = client.simulate_get(path)
        assert served.content == upload["collaterals"][name].encode()
        assert (
            served.headers["SGX-Enclave-Identity-Issuer-Chain"]
            == chains["SGX-Enclave-Identity-Issuer-Chain"]
        )
    for ca, name in [("processor", "processorCrl"), ("platform", "platformCrl")]:
        served = client.simulate_get("/sgx/certification/v4/pckcrl", params={"ca": ca})
        assert served.content == upload["collaterals"]["pckcacrl"][name].encode()
        assert (
            served.headers["SGX-PCK-CRL-Issuer-Chain"]
            == chains["SGX-PCK-Certificate-Issuer-Chain"][ca.upper()]
        )
    root_crl = upload["collaterals"]["rootcacrl"]
    assert client.simulate_get("/sgx/certification/v4/rootcacrl").text == root_crl
    assert client.simulate_get(
        "/sgx/certification/v4/crl", params={"uri": INTEL_ROOT_CDP}
    ).content == bytes.fromhex(root_crl)
    # The uploaded platform's PCK cert, for its raw TCB and (by local selection) a higher one.
    pck_dir = FIXTURES / "pckcerts" / "prod_pckcert_00606A000000"
    expected_pem = (pck_dir / "pckcert.pem").read_text()
    platform = upload["platforms"][0]
    for cpusvn in (platform["cpu_svn"], "0C0C0303FFFF00000000000000000000"):
        served = client.simulate_get(
            PCKCERT,
            params={"qeid": platform["qe_id"], "pceid": "0000", "cpusvn": cpusvn, "pcesvn": "0D00"},
        )
        assert served.status_code == 200, served.text
        assert served.text == expected_pem if expected_pem.endswith("\n") else expected_pem + "\n"
        assert served.headers["SGX-TCBm"] == "0B0B0303FFFF000000000000000000000D00"
        assert served.headers["SGX-FMSPC"] == "00606A000000"
        assert served.headers["SGX-PCK-Certificate-CA-Type"] == "PLATFORM"
        assert (
            served.headers["SGX-PCK-Certificate-Issuer-Chain"]
            == chains["SGX-PCK-Certificate-Issuer-Chain"]["PLATFORM"]
        )


def test_uploaded_tcb_info_bytes_equal_every_recorded_v4_body():
    """Parsing and storing gives back Intel's exact bytes for every compact recording."""
    from dcapd.upload import tcb_info_body

    for body in all_fixture_bodies():
        document = json.loads(body)
        if "tcbInfo" in document and not body.endswith(b"\n"):
            assert tcb_info_body(document) == body


def test_differing_roots_are_460_and_nothing_is_written(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    upload = intel_upload()
    upload["collaterals"]["certificates"]["SGX-Enclave-Identity-Issuer-Chain"] = (
        pki.url_encoded_chain(pki.tcb_signing().pem, pki.root_ca().pem)
    )
    result = put(client, upload)
    assert result.status_code == 460
    assert result.text == "The integrity of the data can't be verified."
    assert client.app.services.store.keys() == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda u: u.pop("platforms"),
        lambda u: u["collaterals"].pop("pck_certs"),
        lambda u: u["collaterals"].__setitem__("version", 3),
        lambda u: u["collaterals"]["certificates"].pop("SGX-PCK-Certificate-Issuer-Chain"),
        lambda u: u["platforms"][0].__setitem__("pce_id", "00000"),
        lambda u: u["platforms"][0].__setitem__("cpu_svn", "xyz"),
        lambda u: u["collaterals"]["pck_certs"][0].__setitem__("certs", []),
        lambda u: u["collaterals"]["pck_certs"][0]["certs"][0].__setitem__("tcbm", "00"),
        lambda u: u["collaterals"]["pck_certs"][0]["certs"][0].__setitem__("cert", "garbage"),
        lambda u: u["collaterals"]["pck_certs"][0]["certs"][0]["tcb"].__setitem__("pcesvn", -1),
        lambda u: u["collaterals"]["tcbinfos"].pop(0),  # the PCK cert's FMSPC has no TCB info
        lambda u: u["collaterals"]["tcbinfos"][0].__setitem__("fmspc", "nothex000000"),
        lambda u: u["collaterals"]["tcbinfos"][0]["sgx_tcbinfo"].pop("signature"),
        lambda u: u["collaterals"]["pckcacrl"].__setitem__("processorCrl", "xyz"),
        lambda u: u["collaterals"].__setitem__("qeidentity", "not json"),
        lambda u: u["collaterals"]["certificates"].__setitem__(
            "TCB-Info-Issuer-Chain", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
        ),
        # A raw TCB below every uploaded cert: selection fails.
        lambda u: u["platforms"][0].__setitem__("cpu_svn", "00" * 16),
    ],
)
def test_invalid_upload_is_400_and_leaves_cache_unchanged(make_client, breakage):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    assert (
        put(client, upload_for_test_platform(raw_tcbs=[raw_tcb(*CASES[0][:2])])).status_code == 200
    )
    before = snapshot(client.app.services.store)
    upload = intel_upload()
    breakage(upload)
    result = put(client, upload)
    assert result.status_code == 400, result.text
    assert result.text == "Invalid request parameters."
    assert snapshot(client.app.services.store) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_failure_inside_the_write_transaction_rolls_everything_back(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    lowest = raw_tcb(PLATFORM.pck_certs[-1].components, PLATFORM.pck_certs[-1].pcesvn)
    assert put(client, upload_for_test_platform(raw_tcbs=[lowest])).status_code == 200
    assert put(client, intel_upload()).status_code == 200
    store = client.app.services.store
    before = snapshot(store)
    # The new cert set holds only the highest cert: re-selecting the cached (lowest) raw TCB
    # fails after the other entries of this upload were already written in the transaction.
    upload = upload_for_test_platform()
    upload["collaterals"]["pck_certs"][0]["certs"] = upload["collaterals"]["pck_certs"][0]["certs"][
        :1
    ]
    upload["collaterals"]["qeidentity"] = pki.make_signed_json(
        "enclaveIdentity",
        {
            "id": "QE",
            "version": 2,
            "issueDate": "2026-11-01T00:00:00Z",
            "nextUpdate": "2026-12-01T00:00:00Z",
            "tcbEvaluationDataNumber": 18,
        },
    ).decode()
    upload["collaterals"]["certificates"]["SGX-Enclave-Identity-Issuer-Chain"] = upload[
        "collaterals"
    ]["certificates"]["TCB-Info-Issuer-Chain"]
    result = put(client, upload)
    assert result.status_code == 400
    assert snapshot(store) == before


def test_upload_then_pckcert_for_uploaded_and_new_raw_tcbs(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    first = raw_tcb(*CASES[0][:2])
    assert put(client, upload_for_test_platform(raw_tcbs=[first])).status_code == 200
    for components, pcesvn, expected in CASES:
        result = client.simulate_get(PCKCERT, params=query(*raw_tcb(components, pcesvn)))
        assert_pck_answer(result, PLATFORM.pck_certs[expected])


def test_v3_upload_schema_and_v3_routes(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    upload = upload_for_test_platform(raw_tcbs=[raw_tcb(*CASES[0][:2])])
    collaterals = upload["collaterals"]
    del collaterals["version"]
    tcb = collaterals["tcbinfos"][0]
    tcb["tcbinfo"] = json.loads(PLATFORM.tcb_info_v2)
    del tcb["sgx_tcbinfo"]
    collaterals["certificates"]["SGX-TCB-Info-Issuer-Chain"] = collaterals["certificates"].pop(
        "TCB-Info-Issuer-Chain"
    )
    assert put(client, upload, path=V4).status_code == 400, "v4 route needs version 4"
    assert put(client, upload, path="/sgx/certification/v3/platformcollateral").status_code == 200
    served = client.simulate_get("/sgx/certification/v3/tcb", params={"fmspc": PLATFORM.fmspc})
    assert served.content == PLATFORM.tcb_info_v2
    assert "SGX-TCB-Info-Issuer-Chain" in served.headers
    result = client.simulate_get(
        "/sgx/certification/v3/pckcert", params=query(*raw_tcb(*CASES[1][:2]))
    )
    assert_pck_answer(result, PLATFORM.pck_certs[1])


def test_fmspc_matching_is_case_insensitive(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    upload = intel_upload()
    upload["collaterals"]["tcbinfos"][0]["fmspc"] = "00606A000000"
    assert put(client, upload).status_code == 200


@pytest.mark.parametrize(
    "scenario", [s for s in INDEX["scenarios"] if s["quotes"]], ids=lambda s: s["name"]
)
def test_offline_end_to_end_with_no_upstream(fake_pcs, make_config, scenario, server_cert, qvl):
    """An OFFLINE dcapd fed only by uploads verifies every fixture quote through dcap-qvl,
    and serves /pckcert for the uploaded test platform; upstream sees no request at all."""
    ca_file, cert_file, key_file = server_cert
    fake = fake_pcs(scenario["name"])  # listening, so any attempt would be recorded
    config = make_config(
        tls="auto",
        cert_file=str(cert_file),
        key_file=str(key_file),
        cache_mode="OFFLINE",
        pcs_url=fake.pcs_url,
        url_map=fake.url_map,
        **TOKENS,
    )
    with running_dcapd(config) as server:
        import requests

        with requests.Session() as session:
            session.trust_env = False
            base = f"https://127.0.0.1:{server.port}"
            for upload in (
                upload_from_scenario(scenario["name"]),
                upload_for_test_platform(raw_tcbs=[raw_tcb(*CASES[0][:2])]),
            ):
                reply = session.put(
                    base + V4,
                    data=json.dumps(upload),
                    verify=str(ca_file),
                    headers={"admin-token": ADMIN},
                    timeout=30,
                )
                assert reply.status_code == 200, reply.text
            for quote in scenario["quotes"]:
                got = qvl.verify(base, FIXTURES / quote["file"], scenario["verify_at_unix"])
                assert got == quote["expected_dcap_qvl_0_7_0"], quote["file"]
            reply = session.get(
                base + PCKCERT,
                params=query(*raw_tcb(*CASES[1][:2])),
                verify=str(ca_file),
                timeout=10,
            )
            assert reply.status_code == 200
            assert reply.headers["SGX-TCBm"] == PLATFORM.pck_certs[1].tcbm
    assert fake.calls == [], "an OFFLINE dcapd never contacts upstream"


def test_operators_mix_of_modes(fake_pcs, make_client):
    """REQ queues a registration PCS cannot answer; the admin drains the queue, uploads the
    platform's collateral, and /pckcert is then served with no PCS call."""
    fake = fake_pcs()
    client = make_client(fake, cache_mode="REQ", **TOKENS)
    cpusvn, pcesvn = raw_tcb(*CASES[2][:2])
    assert register(client, registration(cpusvn, pcesvn)).status_code == 404
    assert client.simulate_get(PCKCERT, params=query(cpusvn, pcesvn)).status_code == 461
    rows = read_platforms(client, "reg").json
    assert [(r["qe_id"], r["cpu_svn"], r["pce_svn"]) for r in rows] == [
        (PLATFORM.qeid, cpusvn, pcesvn)
    ]
    upload = upload_for_test_platform()
    upload["platforms"] = rows  # as the admin tool carries the list back
    assert put(client, upload).status_code == 200
    calls = len(fake.calls)
    result = client.simulate_get(PCKCERT, params=query(cpusvn, pcesvn))
    assert_pck_answer(result, PLATFORM.pck_certs[2])
    assert len(fake.calls) == calls
    assert read_platforms(client, "[]").headers["platform-count"] == "1"


def test_intel_tool_quirks_empty_chains_and_a_missing_ca_chain(make_client):
    """Intel's `fetch -c` writes "" for chains it has not got, and a site whose platforms all
    use the Platform CA has no PROCESSOR chain: Intel's PCCS accepts both, and so do we."""
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    upload = intel_upload()
    chains = upload["collaterals"]["certificates"]
    del chains["SGX-PCK-Certificate-Issuer-Chain"]["PROCESSOR"]
    crl_only = {
        "platforms": [],
        "collaterals": {
            "version": 4,
            "pck_certs": [],
            "tcbinfos": [],
            "pckcacrl": upload["collaterals"]["pckcacrl"],
            "certificates": {
                "SGX-PCK-Certificate-Issuer-Chain": chains["SGX-PCK-Certificate-Issuer-Chain"],
                "TCB-Info-Issuer-Chain": "",
                "SGX-Enclave-Identity-Issuer-Chain": "",
            },
            "rootcacrl": upload["collaterals"]["rootcacrl"],
        },
    }
    assert put(client, crl_only).status_code == 200
    platform_crl = client.simulate_get("/sgx/certification/v4/pckcrl", params={"ca": "platform"})
    assert platform_crl.status_code == 200
    # No PROCESSOR chain anywhere: that CRL cannot be served, as with Intel's PCCS.
    assert (
        client.simulate_get("/sgx/certification/v4/pckcrl", params={"ca": "processor"}).status_code
        == 404
    )
    assert put(client, upload).status_code == 200
