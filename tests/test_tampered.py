"""Collateral that is not what Intel signed never enters the cache (upstream: 502; upload: 460)."""

from __future__ import annotations

import urllib.parse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests import pki
from tests.fakepcs import load_body, load_manifest
from tests.test_platforms import TOKENS
from tests.test_upload import put
from tests.uploads import intel_upload

SCENARIO = "2025-05-27_intel-pcs-recording"
FOREIGN_CHAIN = pki.url_encoded_chain(pki.tcb_signing().pem, pki.root_ca().pem)


def recorded(response_id: str) -> tuple[dict, bytes]:
    response = next(r for r in load_manifest(SCENARIO)["responses"] if r["id"] == response_id)
    return response, load_body(SCENARIO, response)


def flip_digit(body: bytes, needle: bytes) -> bytes:
    at = body.index(needle) + len(needle)
    digit = body[at : at + 1]
    return body[:at] + (b"8" if digit != b"8" else b"7") + body[at + 1 :]


def tampered_variants():
    tcb, tcb_body = recorded("sgx_tcb_00906ED50000")
    yield (
        "tcb info, one byte changed",
        "/sgx/certification/v4/tcb",
        {"fmspc": "00906ED50000"},
        tcb["headers"],
        flip_digit(tcb_body, b'"tcbEvaluationDataNumber":'),
    )
    yield (
        "tcb info, foreign root",
        "/sgx/certification/v4/tcb",
        {"fmspc": "00906ED50000"},
        dict(tcb["headers"], **{"TCB-Info-Issuer-Chain": FOREIGN_CHAIN}),
        tcb_body,
    )
    qe, qe_body = recorded("sgx_qe_identity")
    yield (
        "identity, one byte changed",
        "/sgx/certification/v4/qe/identity",
        None,
        qe["headers"],
        flip_digit(qe_body, b'"tcbEvaluationDataNumber":'),
    )
    crl, crl_body = recorded("pckcrl_processor")
    yield (
        "pck crl, truncated",
        "/sgx/certification/v4/pckcrl",
        {"ca": "processor", "encoding": "der"},
        crl["headers"],
        crl_body[:-10],
    )
    yield (
        "pck crl, one byte changed",
        "/sgx/certification/v4/pckcrl",
        {"ca": "processor", "encoding": "der"},
        crl["headers"],
        crl_body[:60] + bytes([crl_body[60] ^ 1]) + crl_body[61:],
    )
    root, root_body = recorded("root_ca_crl")
    yield "root crl, truncated", "/IntelSGXRootCA.der", None, root["headers"], root_body[:100]


@pytest.mark.parametrize(
    "name,path,query,headers,body",
    list(tampered_variants()),
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
def test_tampered_upstream_answer_is_502_and_not_cached(
    fake_pcs, make_client, name, path, query, headers, body
):
    fake = fake_pcs(SCENARIO)
    fake.add_response("GET", path, query, 200, headers, body)
    client = make_client(fake)
    route = {"/IntelSGXRootCA.der": "/sgx/certification/v4/rootcacrl"}.get(path, path)
    params = {k: v for k, v in (query or {}).items() if k != "encoding"}
    result = client.simulate_get(route, params=params)
    assert result.status_code == 502, name
    assert client.app.services.store.keys() == []
    fake.clear_added()
    assert client.simulate_get(route, params=params).status_code == 200, "genuine data passes"


def resign_garbage(url_encoded_pem: str) -> str:
    """The same certificate with one byte of its signature changed (still parses)."""
    cert = x509.load_pem_x509_certificate(urllib.parse.unquote(url_encoded_pem).encode())
    der = cert.public_bytes(serialization.Encoding.DER)
    der = der[:-5] + bytes([der[-5] ^ 0x01]) + der[-4:]
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
    return urllib.parse.quote(pem, safe="")


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["tcbinfos"][0]["sgx_tcbinfo"]["tcbInfo"].__setitem__(
            "tcbEvaluationDataNumber", 99
        ),
        lambda c: c.__setitem__(
            "qeidentity", c["qeidentity"].replace('"version":2', '"version":3')
        ),
        lambda c: c["pckcacrl"].__setitem__("platformCrl", c["pckcacrl"]["platformCrl"][:-8]),
        lambda c: c.__setitem__("rootcacrl", c["rootcacrl"][:40] + "00" + c["rootcacrl"][42:]),
        lambda c: c["pck_certs"][0]["certs"][0].__setitem__(
            "cert", resign_garbage(c["pck_certs"][0]["certs"][0]["cert"])
        ),
    ],
    ids=["tcb info", "identity", "pck crl", "root crl", "pck cert"],
)
def test_tampered_upload_is_460_and_nothing_is_written(make_client, breakage):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    upload = intel_upload()
    breakage(upload["collaterals"])
    result = put(client, upload)
    assert result.status_code == 460, result.text
    assert client.app.services.store.keys() == []
