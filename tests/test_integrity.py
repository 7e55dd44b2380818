"""dcapd.integrity against Intel-signed fixtures: genuine data passes, any tampering is rejected."""

from __future__ import annotations

import datetime as dt
import json
import logging
import urllib.parse
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcapd import integrity
from dcapd.integrity import (
    IntegrityError,
    extract_raw_json_value,
    load_trusted_roots,
    parse_issuer_chain,
    raw_json_value_span,
    verify_chain,
    verify_crl,
    verify_pck_cert,
    verify_signed_json,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
PCS = FIXTURES / "pcs"
CERTS = FIXTURES / "certs"
SIGNED_KINDS = ("tcbInfo", "enclaveIdentity", "tcbEvaluationDataNumbers")

pytestmark = pytest.mark.skipif(not PCS.is_dir(), reason=f"fixtures not found at {FIXTURES}")


# ---------------------------------------------------------------------------------------------
# Fixture inventory
# ---------------------------------------------------------------------------------------------


def _chain_header(headers: dict) -> str | None:
    for name, value in headers.items():
        if name.lower().endswith("issuer-chain"):
            return value
    return None


def _verify_at(manifest: dict) -> dt.datetime:
    return dt.datetime.fromisoformat(manifest["verify_at"].replace("Z", "+00:00"))


def _inventory() -> list[dict]:
    """Every recorded response (and `extra` body) of every scenario, with what it is."""
    items = []
    for path in sorted(PCS.glob("*/manifest.json")):
        manifest = json.loads(path.read_text())
        at = _verify_at(manifest)
        chains_by_kind = {}
        for resp in manifest["responses"]:
            kind = resp.get("summary", {}).get("kind")
            header = _chain_header(resp["headers"])
            chains_by_kind.setdefault(kind, header)
            items.append(
                {
                    "scenario": path.parent.name,
                    "id": resp["id"],
                    "kind": kind,
                    "file": path.parent / resp["body_file"],
                    "chain": header,
                    "at": at,
                    "summary": resp.get("summary", {}),
                }
            )
        for rel, extra in (manifest.get("extra") or {}).items():
            kind = extra["summary"]["kind"]
            items.append(
                {
                    "scenario": path.parent.name,
                    "id": "extra:" + Path(rel).stem,
                    "kind": kind,
                    "file": path.parent / rel,
                    "chain": chains_by_kind[kind],
                    "at": at,
                    "summary": extra["summary"],
                }
            )
    return items


INVENTORY = _inventory() if PCS.is_dir() else []
SIGNED = [i for i in INVENTORY if i["kind"] in SIGNED_KINDS]
CRLS = [i for i in INVENTORY if i["kind"] == "crl"]
PCK_CRLS_DER = [i for i in CRLS if i["chain"] and i["file"].suffix == ".der"]
PCK_CRLS_PEM = [i for i in CRLS if i["chain"] and i["file"].suffix == ".pem"]
ROOT_CRLS = [i for i in CRLS if not i["chain"]]


def _ids(items):
    return [f"{i['scenario'][:10]}:{i['id']}" for i in items]


def _item(scenario_prefix: str, item_id: str) -> dict:
    for i in INVENTORY:
        if i["scenario"].startswith(scenario_prefix) and i["id"] == item_id:
            return i
    raise KeyError((scenario_prefix, item_id))


@pytest.fixture(scope="module")
def roots():
    return load_trusted_roots((CERTS / "intel_sgx_root_ca.pem").read_bytes())


@pytest.fixture(scope="module")
def root_cert(roots):
    return roots[0]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    integrity._warned.clear()
    yield
    integrity._warned.clear()


def _flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _header(*certs: x509.Certificate) -> str:
    return urllib.parse.quote("".join(_pem(c) for c in certs), safe="")


INTEL_ROOT_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.COMMON_NAME, "Intel SGX Root CA"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Intel Corporation"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    ]
)


def _cert(subject, issuer_name, public_key, signing_key, *, ca: bool, path_length=None):
    now = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .sign(signing_key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def foreign_root():
    """A self-signed root that impersonates Intel's name (same subject, different key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return _cert(
        INTEL_ROOT_NAME, INTEL_ROOT_NAME, key.public_key(), key, ca=True, path_length=1
    ), key


def _sign_json(key: ec.EllipticCurvePrivateKey, top_key: str, inner_text: str) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(key.sign(inner_text.encode(), ec.ECDSA(hashes.SHA256())))
    sig = (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()
    return f'{{"{top_key}":{inner_text},"signature":"{sig}"}}'.encode()


# ---------------------------------------------------------------------------------------------
# Inventory sanity: the parametrised tests below really cover what they claim
# ---------------------------------------------------------------------------------------------


def test_inventory_covers_every_kind():
    tcb = [i for i in SIGNED if i["kind"] == "tcbInfo"]
    tees = {json.loads(i["file"].read_bytes())["tcbInfo"].get("id", "SGX") for i in tcb}
    assert tees == {"SGX", "TDX"}  # v2 tcbInfo has no id
    assert any("v3api" in i["id"] for i in tcb)  # v3 API (tcbInfo v2)
    assert any(i["id"].endswith("_early") for i in tcb)  # update=early
    assert any(i["id"].endswith("_eval17") for i in tcb)  # by eval number
    assert any(i["id"].startswith("extra:") for i in tcb)
    ids = {
        json.loads(i["file"].read_bytes())["enclaveIdentity"]["id"]
        for i in SIGNED
        if i["kind"] == "enclaveIdentity"
    }
    assert ids == {"QE", "QVE", "QAE", "TD_QE"}
    assert len(PCK_CRLS_DER) >= 9 and len(PCK_CRLS_PEM) == 2 and len(ROOT_CRLS) == 7
    assert len(SIGNED) + len(CRLS) >= 46  # README: 46 signed items


# ---------------------------------------------------------------------------------------------
# Genuine data passes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("item", SIGNED, ids=_ids(SIGNED))
def test_genuine_signed_json_verifies(item, roots):
    verify_signed_json(item["file"].read_bytes(), item["kind"], item["chain"], roots, at=item["at"])


@pytest.mark.parametrize("item", PCK_CRLS_DER, ids=_ids(PCK_CRLS_DER))
def test_genuine_pck_crl_verifies(item, roots):
    verify_crl(item["file"].read_bytes(), item["chain"], roots, at=item["at"])


@pytest.mark.parametrize("item", PCK_CRLS_PEM, ids=_ids(PCK_CRLS_PEM))
def test_genuine_pck_crl_pem_verifies_as_der(item, roots):
    crl = x509.load_pem_x509_crl(item["file"].read_bytes())
    der = crl.public_bytes(serialization.Encoding.DER)
    verify_crl(der, item["chain"], roots, at=item["at"])
    with pytest.raises(IntegrityError, match="PEM given where DER"):
        verify_crl(item["file"].read_bytes(), item["chain"], roots)


@pytest.mark.parametrize("item", ROOT_CRLS, ids=_ids(ROOT_CRLS))
def test_genuine_root_ca_crl_verifies(item, roots, root_cert):
    der = item["file"].read_bytes()
    verify_crl(der, None, roots, issuer=root_cert)  # issuer given explicitly
    verify_crl(der, None, roots)  # "signed by one of the trusted roots"


def test_chain_headers_parse_root_last(roots):
    root_der = roots[0].public_bytes(serialization.Encoding.DER)
    for item in INVENTORY:
        if item["chain"]:
            chain = parse_issuer_chain(item["chain"])
            assert len(chain) == 2
            assert chain[-1].public_bytes(serialization.Encoding.DER) == root_der
            verify_chain(chain, roots, at=item["at"])


def test_expired_tcb_signer_2023_still_passes_and_warns_once(roots, caplog):
    item = _item("2023", "tdx_tcb_50806F000000")
    later = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)  # signer expired 2025-05-21
    with caplog.at_level(logging.WARNING, logger="dcapd.integrity"):
        verify_signed_json(item["file"].read_bytes(), "tcbInfo", item["chain"], roots, at=later)
        identity = _item("2023", "tdx_qe_identity")  # same signer: no second line
        verify_signed_json(
            identity["file"].read_bytes(), "enclaveIdentity", identity["chain"], roots, at=later
        )
    warnings = [r for r in caplog.records if r.name == "dcapd.integrity"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    message = warnings[0].getMessage()
    assert "Intel SGX TCB Signing" in message and "expired" in message
    assert "2018-05-21" in message and "2025-05-21" in message
    caplog.clear()
    verify_signed_json(item["file"].read_bytes(), "tcbInfo", item["chain"], roots)  # now = 2026+


def test_not_yet_valid_is_logged_not_rejected(roots, caplog):
    item = _item("2025-05-27", "sgx_tcb_00906ED50000")  # TCB Signing 2025 from 2025-05-06
    with caplog.at_level(logging.WARNING, logger="dcapd.integrity"):
        verify_signed_json(
            item["file"].read_bytes(), "tcbInfo", item["chain"], roots, at=dt.datetime(2020, 1, 1)
        )
    assert any("not yet valid" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# PCK certificates: production and sandbox
# ---------------------------------------------------------------------------------------------

PROD_PCK = FIXTURES / "pckcerts" / "prod_pckcert_00606A000000"
SBX_PCK = FIXTURES / "pckcerts" / "sbx_pckcerts_10606A000000"


def test_prod_pck_cert_verifies(roots):
    headers = json.loads((PROD_PCK / "manifest.json").read_text())["headers"]
    pem = (PROD_PCK / "pckcert.pem").read_text()
    verify_pck_cert(pem, headers["SGX-PCK-Certificate-Issuer-Chain"], roots)
    verify_pck_cert(pem.encode(), headers["SGX-PCK-Certificate-Issuer-Chain"], roots)


def test_prod_pck_cert_with_wrong_ca_rejected(roots, root_cert):
    processor_pem = (CERTS / "intel_sgx_pck_processor_ca.pem").read_bytes()
    processor = x509.load_pem_x509_certificate(processor_pem)
    pem = (PROD_PCK / "pckcert.pem").read_text()
    with pytest.raises(IntegrityError, match="PCK certificate .* not issued by"):
        verify_pck_cert(pem, _header(processor, root_cert), roots)


def test_sandbox_pck_certs_rejected_by_production_root_accepted_by_sandbox_root(roots):
    manifest = json.loads((SBX_PCK / "manifest.json").read_text())
    header = manifest["headers"]["SGX-PCK-Certificate-Issuer-Chain"]
    entries = json.loads((SBX_PCK / "pckcerts.json").read_text())
    assert len(entries) == 4
    sandbox_root = parse_issuer_chain(header)[-1]
    sandbox_roots = load_trusted_roots(sandbox_root.public_bytes(serialization.Encoding.PEM))
    for entry in entries:  # certs are URL-encoded PEM here
        with pytest.raises(IntegrityError, match="not a trusted root and not issued by one"):
            verify_pck_cert(entry["cert"], header, roots)
        verify_pck_cert(entry["cert"], header, sandbox_roots)
        verify_pck_cert(entry["cert"], header, roots + sandbox_roots)  # several anchors
    prod_headers = json.loads((PROD_PCK / "manifest.json").read_text())["headers"]
    with pytest.raises(IntegrityError):
        verify_pck_cert(
            (PROD_PCK / "pckcert.pem").read_text(),
            prod_headers["SGX-PCK-Certificate-Issuer-Chain"],
            sandbox_roots,
        )


def test_pck_cert_input_must_be_one_certificate(roots):
    headers = json.loads((PROD_PCK / "manifest.json").read_text())["headers"]
    pem = (PROD_PCK / "pckcert.pem").read_text()
    with pytest.raises(IntegrityError, match="exactly one"):
        verify_pck_cert(pem + pem, headers["SGX-PCK-Certificate-Issuer-Chain"], roots)
    with pytest.raises(IntegrityError, match="no PEM certificate"):
        verify_pck_cert("hello", headers["SGX-PCK-Certificate-Issuer-Chain"], roots)


# ---------------------------------------------------------------------------------------------
# Tampered signed JSON is rejected
# ---------------------------------------------------------------------------------------------

TCB = ("2025-05-27", "sgx_tcb_00906ED50000")
QE = ("2025-05-27", "sgx_qe_identity")


def _body_and_chain(ref):
    item = _item(*ref)
    return item["file"].read_bytes(), item["chain"]


@pytest.mark.parametrize(
    "needle, replace",
    [
        (b'"tcbEvaluationDataNumber":17', b'"tcbEvaluationDataNumber":18'),
        (b'"issueDate":"2025-05-27T19:31:07Z"', b'"issueDate":"2025-05-27T19:31:08Z"'),
        (b'"nextUpdate":"2025-06-26T19:31:07Z"', b'"nextUpdate":"2035-06-26T19:31:07Z"'),
        (b'"tcbStatus":"OutOfDate"', b'"tcbStatus":"UpToDate"'),
    ],
)
def test_one_changed_value_inside_tcb_info_rejected(roots, needle, replace):
    body, chain = _body_and_chain(TCB)
    assert body.count(needle) >= 1
    tampered = body.replace(needle, replace, 1)
    assert tampered != body
    with pytest.raises(IntegrityError, match="tcbInfo signature: does not verify"):
        verify_signed_json(tampered, "tcbInfo", chain, roots)


def test_one_hex_char_of_signature_changed_rejected(roots):
    body, chain = _body_and_chain(TCB)
    doc = json.loads(body)
    sig = doc["signature"]
    for pos in (0, 63, 64, 127):  # r and s, both ends
        new = sig[:pos] + ("0" if sig[pos] != "0" else "1") + sig[pos + 1 :]
        tampered = body.replace(sig.encode(), new.encode())
        with pytest.raises(IntegrityError, match="does not verify"):
            verify_signed_json(tampered, "tcbInfo", chain, roots)


@pytest.mark.parametrize(
    "bad_sig, match",
    [
        ("zz" * 64, "not 128 hex digits"),
        ("ab" * 63, "not 128 hex digits"),
        ("ab " * 64, "not 128 hex digits"),
        ("00" * 64, "does not verify"),
    ],
)
def test_malformed_signature_rejected(roots, bad_sig, match):
    body, chain = _body_and_chain(TCB)
    sig = json.loads(body)["signature"]
    with pytest.raises(IntegrityError, match=match):
        verify_signed_json(body.replace(sig.encode(), bad_sig.encode()), "tcbInfo", chain, roots)


@pytest.mark.parametrize("ref, top_key", [(TCB, "tcbInfo"), (QE, "enclaveIdentity")])
def test_reserialised_body_rejected(roots, ref, top_key):
    body, chain = _body_and_chain(ref)
    for dumped in (
        json.dumps(json.loads(body)),
        json.dumps(json.loads(body), sort_keys=True),
        json.dumps(json.loads(body), separators=(",", ":"), sort_keys=True),
    ):
        assert dumped.encode() != body
        with pytest.raises(IntegrityError, match="does not verify"):
            verify_signed_json(dumped.encode(), top_key, chain, roots)


def test_chain_to_foreign_root_rejected(roots, foreign_root):
    body, header = _body_and_chain(TCB)
    signer = parse_issuer_chain(header)[0]
    fake_root, fake_key = foreign_root
    # [genuine signing cert, foreign root]
    with pytest.raises(IntegrityError, match="not issued by certificate #1"):
        verify_signed_json(body, "tcbInfo", _header(signer, fake_root), roots)
    # the foreign root re-signs a copy of the signing cert (same subject, same key)
    copy = _cert(signer.subject, INTEL_ROOT_NAME, signer.public_key(), fake_key, ca=False)
    with pytest.raises(IntegrityError, match="not a trusted root and not issued by one"):
        verify_signed_json(body, "tcbInfo", _header(copy, fake_root), roots)
    # ... which passes only when the foreign root is trusted: the root is what rejected it
    verify_signed_json(body, "tcbInfo", _header(copy, fake_root), [fake_root])


@pytest.mark.parametrize(
    "header, match",
    [
        ("garbage", "no PEM certificate"),
        ("", "no PEM certificate"),
        (
            "-----BEGIN%20CERTIFICATE-----%0AAAAA%0A-----END%20CERTIFICATE-----%0A"
            "-----BEGIN%20CERTIFICATE-----%0AAAAA%0A-----END%20CERTIFICATE-----%0A",
            "does not parse",
        ),
        ("%ff%fe", "invalid UTF-8"),
    ],
)
def test_garbage_chain_header_rejected(roots, header, match):
    body, _ = _body_and_chain(TCB)
    with pytest.raises(IntegrityError, match=match):
        verify_signed_json(body, "tcbInfo", header, roots)
    with pytest.raises(IntegrityError, match=match):
        parse_issuer_chain(header)


def test_chain_header_structure_rejected(roots):
    body, header = _body_and_chain(TCB)
    signer, root = parse_issuer_chain(header)
    with pytest.raises(IntegrityError, match="1 certificate, need at least 2"):
        parse_issuer_chain(_header(signer))
    with pytest.raises(IntegrityError, match="stray or broken"):
        parse_issuer_chain(header + "garbage")
    with pytest.raises(IntegrityError, match="stray or broken"):
        parse_issuer_chain(header[: len(header) // 2])  # truncated
    with pytest.raises(IntegrityError, match="Root CA' KeyUsage lacks digitalSignature"):
        verify_signed_json(body, "tcbInfo", _header(root, signer), roots)  # reversed
    assert parse_issuer_chain(urllib.parse.unquote(header)) == [signer, root]  # plain PEM too


def test_identity_against_wrong_chain_rejected(roots):
    body, _ = _body_and_chain(QE)
    _, crl_chain = _body_and_chain(("2025-05-27", "pckcrl_platform"))
    with pytest.raises(IntegrityError, match="Platform CA' KeyUsage lacks digitalSignature"):
        verify_signed_json(body, "enclaveIdentity", crl_chain, roots)
    # a PCK leaf (digitalSignature key, chains to the root) is the wrong key, and too deep
    headers = json.loads((PROD_PCK / "manifest.json").read_text())["headers"]
    pck = x509.load_pem_x509_certificate((PROD_PCK / "pckcert.pem").read_bytes())
    pck_chain = [pck, *parse_issuer_chain(headers["SGX-PCK-Certificate-Issuer-Chain"])]
    with pytest.raises(IntegrityError, match="enclaveIdentity signature: does not verify"):
        verify_signed_json(body, "enclaveIdentity", pck_chain, roots)
    # NB: the 2018 and 2025 TCB Signing certs share one key, so the 2023 chain is *not* wrong
    _, old_chain = _body_and_chain(("2023", "tdx_qe_identity"))
    verify_signed_json(body, "enclaveIdentity", old_chain, roots)
    # ... but the 2023 identity does not verify as the 2025 one (different bytes)
    old_body, _ = _body_and_chain(("2023", "tdx_qe_identity"))
    tampered = old_body.replace(
        json.loads(old_body)["signature"].encode(), json.loads(body)["signature"].encode()
    )
    with pytest.raises(IntegrityError, match="enclaveIdentity signature: does not verify"):
        verify_signed_json(tampered, "enclaveIdentity", old_chain, roots)


def test_wrong_top_key_or_shape_rejected(roots):
    body, chain = _body_and_chain(QE)
    with pytest.raises(IntegrityError, match="no top-level 'tcbInfo'"):
        verify_signed_json(body, "tcbInfo", chain, roots)
    with pytest.raises(IntegrityError, match="not valid JSON"):
        verify_signed_json(body[:-10], "enclaveIdentity", chain, roots)
    with pytest.raises(IntegrityError, match="duplicate top-level key"):
        dup = body.rstrip()[:-1] + b',"enclaveIdentity":{}}'
        verify_signed_json(dup, "enclaveIdentity", chain, roots)
    with pytest.raises(IntegrityError, match="not UTF-8"):
        verify_signed_json(body.decode().encode("utf-16"), "enclaveIdentity", chain, roots)


def test_signer_must_hang_directly_off_the_root(foreign_root):
    """A leaf under an intermediate CA (like a PCK cert) cannot sign TCB info."""
    root, root_key = foreign_root
    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Intel SGX PCK Platform CA")])
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Intel SGX PCK Certificate")])
    ca = _cert(ca_name, INTEL_ROOT_NAME, ca_key.public_key(), root_key, ca=True, path_length=0)
    leaf = _cert(leaf_name, ca_name, leaf_key.public_key(), ca_key, ca=False)
    body = _sign_json(leaf_key, "tcbInfo", '{"id":"SGX","version":3}')
    verify_chain([leaf, ca, root], [root])  # a valid path ...
    with pytest.raises(IntegrityError, match="not issued directly by a trusted root"):
        verify_signed_json(body, "tcbInfo", _header(leaf, ca, root), [root])  # ... not a signer
    direct = _cert(leaf_name, INTEL_ROOT_NAME, leaf_key.public_key(), root_key, ca=False)
    verify_signed_json(body, "tcbInfo", _header(direct, root), [root])


def test_non_ca_issuer_and_path_length_rejected(foreign_root):
    root, root_key = foreign_root
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    names = [x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"n{i}")]) for i in range(3)]
    leaf1 = _cert(names[0], INTEL_ROOT_NAME, keys[0].public_key(), root_key, ca=False)
    leaf2 = _cert(names[1], names[0], keys[1].public_key(), keys[0], ca=False)
    with pytest.raises(IntegrityError, match="is not a CA"):
        verify_chain([leaf2, leaf1, root], [root])
    ca0 = _cert(names[0], INTEL_ROOT_NAME, keys[0].public_key(), root_key, ca=True, path_length=0)
    ca1 = _cert(names[1], names[0], keys[1].public_key(), keys[0], ca=True, path_length=0)
    leaf = _cert(names[2], names[1], keys[2].public_key(), keys[1], ca=False)
    with pytest.raises(IntegrityError, match="path length"):
        verify_chain([leaf, ca1, ca0, root], [root])


def test_verify_chain_edge_cases(roots, root_cert):
    signer, _ = parse_issuer_chain(_body_and_chain(TCB)[1])
    verify_chain([root_cert], roots)
    verify_chain([signer], roots)  # directly issued by a trusted root
    with pytest.raises(IntegrityError, match="empty"):
        verify_chain([], roots)
    with pytest.raises(IntegrityError, match="no trusted roots"):
        verify_chain([signer, root_cert], [])


def test_load_trusted_roots():
    prod = (CERTS / "intel_sgx_root_ca.pem").read_bytes()
    assert len(load_trusted_roots(prod)) == 1
    assert len(load_trusted_roots(prod + b"\n" + prod)) == 2
    for bad in (b"", b"not a pem", (CERTS / "intel_sgx_root_ca.der").read_bytes()):
        with pytest.raises(IntegrityError):
            load_trusted_roots(bad)


def test_error_messages_are_one_line(roots):
    body, chain = _body_and_chain(TCB)
    try:
        verify_signed_json(body, "tcbInfo", "x\ny\n", roots)
    except IntegrityError as exc:
        assert "\n" not in str(exc)
    assert "\n" not in str(IntegrityError("a\nb\n  c"))


# ---------------------------------------------------------------------------------------------
# Tampered CRLs are rejected
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("item", PCK_CRLS_DER + ROOT_CRLS, ids=_ids(PCK_CRLS_DER + ROOT_CRLS))
def test_truncated_crl_rejected(item, roots):
    der = item["file"].read_bytes()
    for cut in (1, 10, len(der) // 2):
        with pytest.raises(IntegrityError, match="not a DER CRL"):
            verify_crl(der[:-cut], item["chain"], roots)
    with pytest.raises(IntegrityError, match="not a DER CRL"):
        verify_crl(der + b"\x00", item["chain"], roots)


@pytest.mark.parametrize("item", PCK_CRLS_DER + ROOT_CRLS, ids=_ids(PCK_CRLS_DER + ROOT_CRLS))
def test_crl_with_flipped_byte_in_signed_part_rejected(item, roots):
    der = item["file"].read_bytes()
    crl = x509.load_der_x509_crl(der)
    tbs = crl.tbs_certlist_bytes
    start = der.index(tbs)
    this_update = tbs.index(crl.last_update_utc.strftime("%y%m%d%H%M%S").encode())
    for offset in (this_update + 5, len(tbs) // 2, len(tbs) - 1):
        with pytest.raises(IntegrityError):
            verify_crl(_flip(der, start + offset), item["chain"], roots)


def test_crl_with_wrong_issuer_rejected(roots, root_cert, foreign_root):
    platform_der = _item("2025-05-27", "pckcrl_platform")["file"].read_bytes()
    processor = _item("2025-05-27", "pckcrl_processor")
    root_crl = _item("2025-05-27", "root_ca_crl")["file"].read_bytes()
    with pytest.raises(IntegrityError, match="issuer name differs"):
        verify_crl(platform_der, processor["chain"], roots)  # processor CA chain
    with pytest.raises(IntegrityError, match="issuer name differs"):
        verify_crl(root_crl, processor["chain"], roots)  # root CRL with a CA chain
    platform_ca = parse_issuer_chain(processor["chain"])[0]
    with pytest.raises(IntegrityError, match="issuer name differs"):
        verify_crl(root_crl, None, roots, issuer=platform_ca)
    with pytest.raises(IntegrityError, match="issuer is none of"):
        verify_crl(platform_der, None, roots)  # PCK CRL without its chain
    fake_root, _ = foreign_root  # same name, other key
    with pytest.raises(IntegrityError, match="does not verify with any trusted root"):
        verify_crl(root_crl, None, [fake_root])
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_crl(root_crl, None, [fake_root], issuer=fake_root)
    with pytest.raises(IntegrityError, match="not the first certificate"):
        verify_crl(
            platform_der, _item("2025-05-27", "pckcrl_platform")["chain"], roots, issuer=root_cert
        )


# ---------------------------------------------------------------------------------------------
# The raw extractor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("item", SIGNED, ids=_ids(SIGNED))
def test_extractor_returns_the_signed_substring(item):
    body = item["file"].read_bytes()
    raw = extract_raw_json_value(body, item["kind"])
    assert json.loads(raw) == json.loads(body)[item["kind"]]
    start, end = raw_json_value_span(body, item["kind"])
    assert body[start:end] == raw and raw[:1] == b"{" and raw[-1:] == b"}"
    # The recorded bodies are Intel's {"<key>":<inner>,"signature":"..."} layout.
    assert body.startswith(b'{"' + item["kind"].encode() + b'":' + raw + b',"signature":"')


@pytest.mark.parametrize(
    "body, key, expected",
    [
        # the key inside a nested string, and inside a nested object, is not a match
        (b'{"note":"\\"tcbInfo\\":{\\"x\\":1}","tcbInfo":{"a":"}"}}', "tcbInfo", b'{"a":"}"}'),
        (b'{"outer":{"tcbInfo":{"fake":1}},"tcbInfo":{"real":2}}', "tcbInfo", b'{"real":2}'),
        # escapes, brackets and quotes inside strings, whitespace, a backslash at a string's end
        (
            b' { "tcbInfo" : { "s" : "a\\\\" , "t":"[{\\"]}" , "u":[1,{"v":null}] } , '
            b'"signature":"00" } ',
            "tcbInfo",
            b'{ "s" : "a\\\\" , "t":"[{\\"]}" , "u":[1,{"v":null}] }',
        ),
        # non-ASCII before the key: spans are byte offsets
        (
            '{"z":"\u00e9\u4e2d","tcbInfo":{"k":"\u00fc"}}'.encode(),
            "tcbInfo",
            '{"k":"\u00fc"}'.encode(),
        ),
        # a key spelled with an escape is the same key
        (b'{"tcb\\u0049nfo":{"k":1}}', "tcbInfo", b'{"k":1}'),
        (b'{"a":[],"tcbInfo":[1,2],"b":{}}', "tcbInfo", b"[1,2]"),
        (b'{"a":-1.5e3,"tcbInfo":"x"}', "tcbInfo", b'"x"'),
    ],
)
def test_extractor_edge_cases(body, key, expected):
    assert extract_raw_json_value(body, key) == expected


@pytest.mark.parametrize(
    "body, match",
    [
        (b'{"tcbInfo":{}} x', "not valid JSON"),
        (b'[{"tcbInfo":{}}]', "not a JSON object"),
        (b'{"tcbInfo":{},"tcbInfo":{}}', "duplicate"),
        (b'{"other":{"tcbInfo":{}}}', "no top-level"),
        (b'{"tcbInfo":{"a":NaN}}', "not valid JSON"),
        (b'{"tcbInfo":{"a":[1,-Infinity]}}', "not valid JSON"),
        (b'{"tcbInfo":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not valid JSON"),
    ],
)
def test_extractor_rejects(body, match):
    with pytest.raises(IntegrityError, match=match):
        extract_raw_json_value(body, "tcbInfo")


_json_scalars = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=50, deadline=None)
@given(
    inner=st.dictionaries(st.text(max_size=8), _json_values, max_size=5),
    decoy=_json_values,
    ensure_ascii=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
)
def test_extractor_returns_exact_text_for_generated_json(inner, decoy, ensure_ascii, indent):
    inner_text = json.dumps(inner, ensure_ascii=ensure_ascii, indent=indent)
    decoy_text = json.dumps({"tcbInfo": decoy, "s": '"tcbInfo":{}'}, ensure_ascii=ensure_ascii)
    body = '{"decoy":' + decoy_text + ', "tcbInfo" :' + inner_text + ',"signature":"ab"}\n'
    assert extract_raw_json_value(body.encode(), "tcbInfo") == inner_text.encode()


# ---------------------------------------------------------------------------------------------
# Property: any single flipped byte inside the signed object breaks verification
# ---------------------------------------------------------------------------------------------

_FLIP_TARGETS = [
    (TCB, "tcbInfo"),
    (QE, "enclaveIdentity"),
    (("2026-02-18", "tdx_tcb_90C06F000000"), "tcbInfo"),
]


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    target=st.sampled_from(_FLIP_TARGETS),
    where=st.floats(0, 1, exclude_max=True),
    mask=st.integers(1, 255),
)
def test_any_flipped_byte_in_signed_object_rejected(roots, target, where, mask):
    ref, top_key = target
    body, chain = _body_and_chain(ref)
    start, end = raw_json_value_span(body, top_key)
    index = start + int(where * (end - start))
    with pytest.raises(IntegrityError):
        verify_signed_json(_flip(body, index, mask), top_key, chain, roots)
