"""PCK certificate selection (dcapd.selection): Intel's vectors, real certs and properties."""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcapd.selection import (
    FmspcMismatchError,
    InvalidArgumentError,
    InvalidCertError,
    InvalidTcbInfoError,
    PceIdMismatchError,
    PckNotFoundError,
    PpidMismatchError,
    SelectionError,
    Tcb,
    parse_pck_cert,
    parse_tcb_info,
    select_pck_cert,
)
from tests import pki

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"
INTEL_SAMPLE = FIXTURES / "pck_selection" / "intel_sample"
PCKCERTS = FIXTURES / "pckcerts"
QUOTES = FIXTURES / "quotes"

needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason="shared/fixtures not beside the repo"
)


def le_hex(value: int) -> str:
    """PCESVN / PCE-ID the way a PCCS query carries them: 2 bytes little-endian, upper hex."""
    return value.to_bytes(2, "little").hex().upper()


def components(*head: int) -> tuple[int, ...]:
    return tuple(head) + (0,) * (16 - len(head))


# ---------------------------------------------------------------------------------------------
# Intel's own selection vectors (tools/PCKCertSelection sample)
# ---------------------------------------------------------------------------------------------


def _intel_cases():
    if not INTEL_SAMPLE.is_dir():
        return []
    return json.loads((INTEL_SAMPLE / "cases.json").read_text())["cases"]


@needs_fixtures
@pytest.mark.parametrize(
    "case", _intel_cases(), ids=lambda c: f"cpusvn{c['cpusvn']}-pcesvn{c['pcesvn']}"
)
def test_intel_sample_cases(case):
    sample = json.loads((INTEL_SAMPLE / "cases.json").read_text())
    pems = [(INTEL_SAMPLE / name).read_text() for name in sample["cert_order"]]
    tcb_info = (INTEL_SAMPLE / sample["tcb_info"]).read_text()
    args = (
        bytes(case["cpusvn"]).hex(),
        le_hex(case["pcesvn"]),
        le_hex(case["pceid"]),
        tcb_info,
        pems,
    )
    if "expected_index" in case:
        assert select_pck_cert(*args) == case["expected_index"]
        assert sample["cert_order"][case["expected_index"]] == case["expected_file"]
    else:
        assert "NOT_FOUND" in case["expected_error"]
        with pytest.raises(PckNotFoundError) as info:
            select_pck_cert(*args)
        assert info.value.code == 12


@pytest.mark.skip(
    reason="platform_sgx_hw_config is a separate Intel API (configuration id from "
    "CPUSVN byte 6) that a PCCS never calls"
)
def test_intel_sample_hw_config_case():
    pass


@needs_fixtures
def test_intel_sample_v1_tcb_info_is_rejected():
    # tcb_info.json is the version-1 sample; QVL only parses v2 and v3.
    with pytest.raises(InvalidTcbInfoError):
        parse_tcb_info((INTEL_SAMPLE / "tcb_info.json").read_bytes())


@needs_fixtures
def test_intel_sample_certs_parse():
    info = parse_pck_cert((INTEL_SAMPLE / "pck0_sample.pem").read_bytes())
    assert info.fmspc_hex == "00707F000000"
    assert info.tcb_components == components(*[1] * 12)
    assert info.pcesvn == 6
    assert info.ca_type == ""  # self-signed "Intel SGX PCK Certificate" issuer: neither CA type
    assert info.platform_instance_id is None and info.configuration is None  # 5 entries


# ---------------------------------------------------------------------------------------------
# Real Intel-format certificates
# ---------------------------------------------------------------------------------------------


@needs_fixtures
def test_production_pckcert_matches_its_pcs_headers():
    folder = PCKCERTS / "prod_pckcert_00606A000000"
    manifest = json.loads((folder / "manifest.json").read_text())
    info = parse_pck_cert((folder / manifest["body_file"]).read_text())
    expected = manifest["pck_extension"]
    assert info.cpusvn.hex() == expected["cpusvn"].lower()
    assert info.pcesvn == expected["pcesvn"]
    assert info.pceid.hex() == expected["pceid"].lower()
    assert info.fmspc.hex() == expected["fmspc"].lower()
    assert info.sgx_type == expected["sgx_type"]
    assert info.ppid.hex() == expected["ppid"].lower()
    assert info.tcbm == manifest["headers"]["SGX-TCBm"]
    assert info.fmspc_hex == manifest["headers"]["SGX-FMSPC"].upper()
    assert info.ca_type == manifest["headers"]["SGX-PCK-Certificate-CA-Type"].upper()
    assert info.configuration == {"dynamicPlatform": True, "cachedKeys": True, "SMTEnabled": True}
    assert info.platform_instance_id is not None and len(info.platform_instance_id) == 16


def _sandbox_pckcerts():
    folder = PCKCERTS / "sbx_pckcerts_10606A000000"
    manifest = json.loads((folder / "manifest.json").read_text())
    entries = json.loads((folder / manifest["body_file"]).read_text())
    return manifest, entries


@needs_fixtures
def test_sandbox_pckcerts_entries_parse_to_their_tcb():
    manifest, entries = _sandbox_pckcerts()
    infos = [parse_pck_cert(urllib.parse.unquote(entry["cert"])) for entry in entries]
    for entry, info in zip(entries, infos):
        tcb = entry["tcb"]
        assert info.tcb_components == tuple(tcb[f"sgxtcbcomp{n:02d}svn"] for n in range(1, 17))
        assert info.pcesvn == tcb["pcesvn"]
        assert info.tcbm == entry["tcbm"].upper()
        assert info.fmspc_hex == manifest["headers"]["SGX-FMSPC"].upper()
        assert info.ca_type == manifest["headers"]["SGX-PCK-Certificate-CA-Type"].upper()
        assert info.pceid == b"\x00\x00"
    assert len({info.ppid for info in infos}) == 1  # one platform


@needs_fixtures
@pytest.mark.parametrize(
    "cpusvn, pcesvn, expected",
    [
        ("03030000000000000000000000000000", 10, 0),
        ("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF", 0xFFFF, 0),
        ("02020000000000000000000000000000", 10, 1),
        ("02030000000000000000000000000000", 10, 1),
        ("01010000000000000000000000000000", 10, 2),  # pcesvn 10 ≥ 9: the 0101/9 cert
        ("01010000000000000000000000000000", 5, 3),  # only the pcesvn 0 cert is ≤
        ("03030000000000000000000000000000", 9, 2),  # 0303/9 is below both pcesvn-10 certs
        ("00000000000000000000000000000000", 10, None),
    ],
)
def test_selection_over_sandbox_certs(cpusvn, pcesvn, expected):
    manifest, entries = _sandbox_pckcerts()
    pems = [urllib.parse.unquote(entry["cert"]) for entry in entries]
    levels = [
        (tuple(e["tcb"][f"sgxtcbcomp{n:02d}svn"] for n in range(1, 17)), e["tcb"]["pcesvn"])
        for e in entries
    ]
    tcb_info = pki.make_tcb_info(manifest["headers"]["SGX-FMSPC"], levels)
    if expected is None:
        with pytest.raises(PckNotFoundError):
            select_pck_cert(cpusvn, le_hex(pcesvn), "0000", tcb_info, pems)
    else:
        assert select_pck_cert(cpusvn, le_hex(pcesvn), "0000", tcb_info, pems) == expected


_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def _quote_entries():
    if not QUOTES.is_dir():
        return []
    return json.loads((QUOTES / "quotes.json").read_text())


@needs_fixtures
@pytest.mark.parametrize("quote", _quote_entries(), ids=lambda q: q["file"])
def test_pck_leaf_embedded_in_quote(quote):
    # Certification data type 5 (or 6 wrapping 5) is a PEM chain: leaf, PCK CA, root.
    blocks = _PEM_BLOCK.findall((QUOTES / quote["file"]).read_bytes())
    assert len(blocks) >= 3
    info = parse_pck_cert(blocks[0])
    assert info.fmspc_hex == quote["fmspc"].upper()
    assert info.cpusvn.hex() == quote["cpusvn"].lower()
    assert info.pcesvn == quote["pcesvn"]
    assert info.pceid.hex() == quote["pceid"].lower()
    assert info.ppid.hex() == quote["ppid"].lower()
    assert info.sgx_type == quote["sgx_type"]
    assert info.ca_type == quote["pck_ca"].upper()
    assert (info.configuration is not None) == (quote["pck_ca"] == "platform")
    # The other blocks are CA certs: no SGX extension, not PCK certs.
    with pytest.raises(InvalidCertError):
        parse_pck_cert(blocks[1])


# ---------------------------------------------------------------------------------------------
# TCB info parsing
# ---------------------------------------------------------------------------------------------


def _tcb_info_files():
    return (
        sorted(p for p in (FIXTURES / "pcs").glob("*/**/*tcb_*.json")) if FIXTURES.is_dir() else []
    )


@needs_fixtures
@pytest.mark.parametrize("path", _tcb_info_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_tcb_infos_parse_and_sort_descending(path):
    body = json.loads(path.read_bytes())
    info = parse_tcb_info(path.read_bytes())
    assert info.version == body["tcbInfo"]["version"]
    assert info.fmspc.hex() == body["tcbInfo"]["fmspc"].lower()
    assert len(info.levels) == len(body["tcbInfo"]["tcbLevels"])
    keys = [level.sort_key() for level in info.levels]
    assert keys == sorted(keys, reverse=True) and len(set(keys)) == len(keys)
    assert info.id == body["tcbInfo"].get("id", "SGX")
    if info.id == "TDX":
        assert all(level.tdx_components is not None for level in info.levels)


@needs_fixtures
def test_tcb_info_v2_and_v3_of_the_same_data_agree():
    folder = FIXTURES / "pcs" / "2025-05-27_intel-pcs-recording"
    v3 = parse_tcb_info((folder / "sgx_tcb_00906ED50000.json").read_bytes())
    v2 = parse_tcb_info((folder / "sgx_tcb_00906ED50000_v3api.json").read_bytes())
    assert (v2.version, v3.version) == (2, 3)
    assert [(lv.tcb, lv.status) for lv in v2.levels] == [(lv.tcb, lv.status) for lv in v3.levels]


def test_level_order_comes_from_values_not_json_order():
    levels = [
        pki.Level(components(1, 1), 2),
        pki.Level(components(2, 0), 0),
        pki.Level(components(1, 1), 3),
        pki.Level(components(0, 9), 9),
    ]
    info = parse_tcb_info(pki.make_tcb_info("00D0C0DE0000", levels))
    # lexicographic on the component vector, then pcesvn; descending
    assert [level.tcb for level in info.levels] == [
        Tcb(components(2, 0), 0),
        Tcb(components(1, 1), 3),
        Tcb(components(1, 1), 2),
        Tcb(components(0, 9), 9),
    ]


def _v3_body() -> dict:
    return json.loads(pki.make_tcb_info("00D0C0DE0000", pki.DEFAULT_LEVELS))


def _mutate(path: str, value, *, delete: bool = False):
    """A mutation of the v3 TCB info body: set (or delete) the item at a dotted path."""

    def apply(body: dict) -> dict:
        target = body
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in keys[:-1]:
            target = target[key]
        if delete:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
        return body

    return apply


_LEVEL0 = "tcbInfo.tcbLevels.0"
INVALID_TCB_INFOS = {
    "no tcbInfo": _mutate("tcbInfo", None, delete=True),
    "tcbInfo not object": _mutate("tcbInfo", []),
    "no signature": _mutate("signature", None, delete=True),
    "short signature": _mutate("signature", "ab" * 63),
    "signature not string": _mutate("signature", 5),
    "version 1": _mutate("tcbInfo.version", 1),
    "version 4": _mutate("tcbInfo.version", 4),
    "version as string": _mutate("tcbInfo.version", "3"),
    "version as float": _mutate("tcbInfo.version", 3.0),
    "no id": _mutate("tcbInfo.id", None, delete=True),
    "unknown id": _mutate("tcbInfo.id", "SEV"),
    "SGX with tdxModule": _mutate("tcbInfo.tdxModule", {"mrsigner": "00" * 48}),
    "SGX with tdxModuleIdentities": _mutate("tcbInfo.tdxModuleIdentities", []),
    "TDX without tdxModule": _mutate("tcbInfo.id", "TDX"),
    "bad issueDate": _mutate("tcbInfo.issueDate", "2025-05-27 19:31:07"),
    "issueDate with millis": _mutate("tcbInfo.issueDate", "2025-05-27T19:31:07.000Z"),
    "impossible nextUpdate": _mutate("tcbInfo.nextUpdate", "2025-02-30T00:00:00Z"),
    "fmspc 11 hex": _mutate("tcbInfo.fmspc", "00D0C0DE000"),
    "fmspc not hex": _mutate("tcbInfo.fmspc", "00D0C0DE00ZZ"),
    "pceId 6 hex": _mutate("tcbInfo.pceId", "000000"),
    "tcbType 1": _mutate("tcbInfo.tcbType", 1),
    "tcbType string": _mutate("tcbInfo.tcbType", "0"),
    "no tcbType": _mutate("tcbInfo.tcbType", None, delete=True),
    "negative eval number": _mutate("tcbInfo.tcbEvaluationDataNumber", -1),
    "no tcbLevels": _mutate("tcbInfo.tcbLevels", None, delete=True),
    "empty tcbLevels": _mutate("tcbInfo.tcbLevels", []),
    "tcbLevels object": _mutate("tcbInfo.tcbLevels", {}),
    "unknown status": _mutate(f"{_LEVEL0}.tcbStatus", "Fine"),
    "no tcbStatus": _mutate(f"{_LEVEL0}.tcbStatus", None, delete=True),
    "no tcbDate": _mutate(f"{_LEVEL0}.tcbDate", None, delete=True),
    "advisoryIDs not array": _mutate(f"{_LEVEL0}.advisoryIDs", "INTEL-SA-00615"),
    "15 components": _mutate(f"{_LEVEL0}.tcb.sgxtcbcomponents", [{"svn": 1}] * 15),
    "svn negative": _mutate(f"{_LEVEL0}.tcb.sgxtcbcomponents.3.svn", -1),
    "svn string": _mutate(f"{_LEVEL0}.tcb.sgxtcbcomponents.3.svn", "1"),
    "svn over 255": _mutate(f"{_LEVEL0}.tcb.sgxtcbcomponents.3.svn", 256),
    "component category not string": _mutate(f"{_LEVEL0}.tcb.sgxtcbcomponents.3.category", 1),
    "no pcesvn": _mutate(f"{_LEVEL0}.tcb.pcesvn", None, delete=True),
    "pcesvn bool": _mutate(f"{_LEVEL0}.tcb.pcesvn", True),
    "duplicate level": _mutate(
        "tcbInfo.tcbLevels.1.tcb",
        {
            "sgxtcbcomponents": [{"svn": s} for s in pki.DEFAULT_LEVELS[0].components],
            "pcesvn": pki.DEFAULT_LEVELS[0].pcesvn,
        },
    ),
}


@pytest.mark.parametrize("mutation", INVALID_TCB_INFOS.values(), ids=INVALID_TCB_INFOS.keys())
def test_invalid_tcb_info_variants(mutation):
    body = json.dumps(mutation(_v3_body()))
    with pytest.raises(InvalidTcbInfoError) as info:
        parse_tcb_info(body)
    assert info.value.code == 9
    platform = pki.default_platform()
    with pytest.raises(InvalidTcbInfoError):  # selection reports it as INVALID_TCB too
        select_pck_cert(
            platform.pck_certs[0].cpusvn_hex,
            "0D00",
            "0000",
            body,
            [entry.pem for entry in platform.pck_certs],
        )


@pytest.mark.parametrize("text", [b"", b"not json", b"[]", b'"tcbInfo"', b"\xff\xfe"])
def test_tcb_info_that_is_not_a_json_object(text):
    with pytest.raises(InvalidTcbInfoError):
        parse_tcb_info(text)


def test_v2_tcb_info_needs_every_named_component():
    body = json.loads(pki.make_tcb_info("00D0C0DE0000", pki.DEFAULT_LEVELS, version=2))
    assert parse_tcb_info(json.dumps(body)).version == 2
    del body["tcbInfo"]["tcbLevels"][0]["tcb"]["sgxtcbcomp16svn"]
    with pytest.raises(InvalidTcbInfoError):
        parse_tcb_info(json.dumps(body))


def test_tdx_tcb_info_made_by_pki_parses_and_orders_by_tdx_components():
    levels = [
        pki.Level(components(2, 2), 5, tdx_components=components(1)),
        pki.Level(components(2, 2), 5, tdx_components=components(3)),
    ]
    info = parse_tcb_info(pki.make_tcb_info("00D0C0DE0000", levels, tee="TDX"))
    assert info.id == "TDX"
    assert [level.tdx_components for level in info.levels] == [components(3), components(1)]
    duplicate = [levels[0], levels[0]]
    with pytest.raises(InvalidTcbInfoError):
        parse_tcb_info(pki.make_tcb_info("00D0C0DE0000", duplicate, tee="TDX"))


# ---------------------------------------------------------------------------------------------
# The test PKI itself
# ---------------------------------------------------------------------------------------------


def test_pki_tcb_info_signature_verifies_over_exact_inner_bytes():
    body = pki.make_tcb_info("00D0C0DE0000", pki.DEFAULT_LEVELS)
    prefix, suffix = b'{"tcbInfo":', b',"signature":"'
    assert body.startswith(prefix)
    inner = body[len(prefix) : body.rindex(suffix)]
    signature = bytes.fromhex(json.loads(body)["signature"])
    assert len(signature) == 64
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    pki.tcb_signing().key.public_key().verify(der, inner, ec.ECDSA(hashes.SHA256()))
    assert json.loads(inner) == json.loads(body)["tcbInfo"]


def test_pki_chain_signatures_and_names():
    root, ca, signer = pki.root_ca(), pki.platform_ca(), pki.tcb_signing()
    ca.cert.verify_directly_issued_by(root.cert)
    signer.cert.verify_directly_issued_by(root.cert)
    root.cert.verify_directly_issued_by(root.cert)
    platform = pki.default_platform()
    for entry in platform.pck_certs:
        x509.load_pem_x509_certificate(entry.pem.encode()).verify_directly_issued_by(ca.cert)
    assert "Platform" in ca.cert.subject.rfc4514_string()
    assert pki.url_encoded_chain(ca.pem, root.pem).endswith("%0A")
    assert urllib.parse.unquote(platform.issuer_chain) == ca.pem + root.pem


def test_pki_processor_cert_has_five_entries():
    pem = pki.make_pck_cert(pki.processor_ca(), b"\x01" * 16, components(3, 3), 7, platform=False)
    info = parse_pck_cert(pem)
    assert info.ca_type == "PROCESSOR"
    assert info.platform_instance_id is None and info.configuration is None
    assert info.tcbm == "03030000000000000000000000000000" + "0700"


def test_pki_pckcerts_response_body_and_headers():
    platform = pki.default_platform()
    assert len(platform.qeid) == 32 and len(platform.encrypted_ppid) == 768
    assert set(platform.encrypted_ppid) != {"0"}
    entries = json.loads(pki.pckcerts_response_body(platform, not_available=True))
    assert entries[-1]["cert"] == "Not available"
    for entry in entries[:-1]:
        assert "%0A" in entry["cert"] and "\n" not in entry["cert"]
        info = parse_pck_cert(urllib.parse.unquote(entry["cert"]))
        assert info.tcbm == entry["tcbm"] and len(entry["tcbm"]) == 36
        assert info.tcb_components == tuple(
            entry["tcb"][f"sgxtcbcomp{n:02d}svn"] for n in range(1, 17)
        )
        assert info.pcesvn == entry["tcb"]["pcesvn"]
    headers = pki.pckcerts_response_headers(platform)
    assert headers["SGX-PCK-Certificate-CA-Type"] == "platform"
    assert headers["SGX-FMSPC"] == platform.fmspc
    assert len(json.loads(pki.pckcerts_response_body(platform))) == len(platform.pck_certs)


# ---------------------------------------------------------------------------------------------
# Selection on PKI-made data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tcb_info_attr", ["tcb_info", "tcb_info_v2"])
def test_each_level_selects_its_own_cert(tcb_info_attr):
    platform = pki.default_platform()
    tcb_info = getattr(platform, tcb_info_attr)
    pems = [entry.pem for entry in platform.pck_certs]
    for index, entry in enumerate(platform.pck_certs):
        assert (
            select_pck_cert(entry.cpusvn_hex, entry.pcesvn_hex, platform.pceid, tcb_info, pems)
            == index
        )
    # A raw TCB between levels gets the best cert it dominates; lower-case hex is fine too.
    between = bytes(components(7, 8, 3, 3, 255, 255, 1)).hex()
    assert select_pck_cert(between, "0e00", "0000", tcb_info, pems) == 1
    # Input order does not matter when the certs are totally ordered.
    assert select_pck_cert(between, "0E00", "0000", tcb_info, pems[::-1]) == 2
    # Bytes inputs work as well.
    assert (
        select_pck_cert(between, "0E00", "0000", tcb_info.decode(), [p.encode() for p in pems]) == 1
    )


def test_pcesvn_is_little_endian():
    platform = pki.default_platform()
    top = platform.pck_certs[0]
    pems = [entry.pem for entry in platform.pck_certs]
    assert select_pck_cert(top.cpusvn_hex, "0D00", "0000", platform.tcb_info, pems) == 0
    # '000D' is 3328 read little-endian: still ≥ 13, same cert.
    assert select_pck_cert(top.cpusvn_hex, "000D", "0000", platform.tcb_info, pems) == 0
    # '0C00' = 12 < 13: the top two certs need 13, so the pcesvn-11 cert wins.
    assert select_pck_cert(top.cpusvn_hex, "0C00", "0000", platform.tcb_info, pems) == 2
    # ... while '000C' = 3072 keeps the top cert.
    assert select_pck_cert(top.cpusvn_hex, "000C", "0000", platform.tcb_info, pems) == 0


def test_not_found_below_every_cert():
    platform = pki.default_platform()
    pems = [entry.pem for entry in platform.pck_certs]
    with pytest.raises(PckNotFoundError):
        select_pck_cert("00" * 16, "FFFF", "0000", platform.tcb_info, pems)
    with pytest.raises(PckNotFoundError):  # components fine, PCESVN 9 below every cert
        select_pck_cert("FF" * 16, "0900", "0000", platform.tcb_info, pems)


# ---------------------------------------------------------------------------------------------
# Typed errors
# ---------------------------------------------------------------------------------------------

PPID = bytes(range(16))
FMSPC = bytes.fromhex("00D0C0DE0000")


def _cert(tcb=None, pcesvn=5, **kwargs) -> str:
    tcb = components(2, 2) if tcb is None else tcb
    kwargs.setdefault("fmspc", FMSPC)
    return pki.make_pck_cert(pki.platform_ca(), kwargs.pop("ppid", PPID), tcb, pcesvn, **kwargs)


def _tcb_info(pce_id="0000", fmspc_hex="00D0C0DE0000") -> bytes:
    return pki.make_tcb_info(
        fmspc_hex, [(components(2, 2), 5), (components(1, 1), 1)], pce_id=pce_id
    )


RAW = bytes(components(2, 2)).hex()


def test_pce_id_mismatch_with_tcb_info():
    with pytest.raises(PceIdMismatchError) as info:
        select_pck_cert(RAW, "0500", "0100", _tcb_info(), [_cert()])
    assert info.value.code == 10


def test_pce_id_endianness_query_le_json_and_cert_be():
    # Query '0100' is PCE-ID 1 (LE); TCB info '0001' and cert bytes 00 01 are 1 (BE).
    assert select_pck_cert(RAW, "0500", "0100", _tcb_info("0001"), [_cert(pceid=b"\x00\x01")]) == 0
    with pytest.raises(PceIdMismatchError) as info:  # TCB info matches, the cert does not
        select_pck_cert(RAW, "0500", "0100", _tcb_info("0001"), [_cert()])
    assert info.value.code == 6
    with pytest.raises(PceIdMismatchError):  # read the wrong way round it would be 256
        select_pck_cert(RAW, "0500", "0001", _tcb_info("0001"), [_cert(pceid=b"\x00\x01")])


def test_fmspc_mismatch():
    with pytest.raises(FmspcMismatchError) as info:
        select_pck_cert(RAW, "0500", "0000", _tcb_info(fmspc_hex="00906ED50000"), [_cert()])
    assert info.value.code == 8
    # Hex case of the TCB info FMSPC does not matter: it is compared as bytes.
    assert select_pck_cert(RAW, "0500", "0000", _tcb_info(fmspc_hex="00d0c0de0000"), [_cert()]) == 0


def test_ppid_mismatch():
    other = _cert(tcb=components(1, 1), pcesvn=1, ppid=b"\xee" * 16)
    with pytest.raises(PpidMismatchError) as info:
        select_pck_cert(RAW, "0500", "0000", _tcb_info(), [_cert(), other])
    assert info.value.code == 7


def test_not_available_cert_is_invalid():
    with pytest.raises(InvalidCertError):
        select_pck_cert(RAW, "0500", "0000", _tcb_info(), [_cert(), "Not available"])
    with pytest.raises(InvalidCertError):
        parse_pck_cert("Not available")


def test_first_failing_cert_decides_the_error():
    # Intel validates cert by cert: an FMSPC mismatch in cert 0 wins over a bad cert 1.
    with pytest.raises(FmspcMismatchError):
        select_pck_cert(
            RAW, "0500", "0000", _tcb_info(), [_cert(fmspc=b"\x01" * 6), "Not available"]
        )


@pytest.mark.parametrize("omit", ["aki", "crl_dp", "ski", "key_usage", "basic_constraints", "sgx"])
def test_cert_missing_a_required_extension(omit):
    with pytest.raises(InvalidCertError):
        parse_pck_cert(_cert(omit_extensions=[omit]))


def _sgx_ext(**overrides) -> bytes:
    args = dict(
        ppid=PPID,
        tcb_components=components(2, 2),
        pcesvn=5,
        cpusvn=bytes(components(2, 2)),
        pceid=b"\x00\x00",
        fmspc=FMSPC,
        sgx_type=0,
        platform=True,
    )
    args.update(overrides)
    return pki.sgx_extension_der(**args)


UNKNOWN_ENTRY = pki.der_entry("1.2.840.113741.1.13.1.99", pki.der(0x04, b"\x00"))

BAD_SGX_EXTENSIONS = {
    "6 entries": lambda: _sgx_ext(drop=[7]),
    "4 entries": lambda: _sgx_ext(platform=False, drop=[5]),
    "5 entries + unknown oid": lambda: _sgx_ext(platform=False, extra=[UNKNOWN_ENTRY]),
    "fmspc replaced by unknown oid": lambda: _sgx_ext(
        platform=False, drop=[4], extra=[UNKNOWN_ENTRY]
    ),
    "ppid replaced by unknown oid": lambda: _sgx_ext(drop=[1], extra=[UNKNOWN_ENTRY]),
    "tcb as octet string": lambda: _sgx_ext(
        drop=[2], extra=[pki.der_entry(f"{pki.SGX_EXTENSION_OID}.2", pki.der(0x04, b"\x00"))]
    ),
    "ppid 15 bytes": lambda: _sgx_ext(ppid=PPID[:15]),
    "fmspc 5 bytes": lambda: _sgx_ext(fmspc=FMSPC[:5]),
    "pceid 3 bytes": lambda: _sgx_ext(pceid=b"\x00\x00\x00"),
    "cpusvn 15 bytes": lambda: _sgx_ext(cpusvn=bytes(15)),
    "17 tcb entries": lambda: _sgx_ext(tcb_components=components(2, 2)[:15]),
    "svn 256": lambda: _sgx_ext(tcb_components=components(256)),
    "not a sequence": lambda: pki.der(0x04, b"\x00"),
    "trailing garbage": lambda: _sgx_ext() + b"\x00",
    "truncated": lambda: _sgx_ext()[:-3],
}


@pytest.mark.parametrize("make_der", BAD_SGX_EXTENSIONS.values(), ids=BAD_SGX_EXTENSIONS.keys())
def test_malformed_sgx_extension(make_der):
    with pytest.raises(InvalidCertError):
        parse_pck_cert(_cert(sgx_extension=make_der()))


def test_unknown_entries_are_ignored_when_the_count_is_right():
    der = _sgx_ext(drop=[6], extra=[UNKNOWN_ENTRY])  # 7 entries, one unknown
    info = parse_pck_cert(_cert(sgx_extension=der))
    assert info.platform_instance_id is None and info.tcb_components == components(2, 2)


def test_malformed_platform_only_fields_are_ignored_like_qvl():
    bad_instance_id = pki.der_entry(f"{pki.SGX_EXTENSION_OID}.6", pki.der(0x04, b"\x01"))
    info = parse_pck_cert(_cert(sgx_extension=_sgx_ext(drop=[6], extra=[bad_instance_id])))
    assert info.platform_instance_id is None and info.configuration is not None


def test_cpusvn_not_matching_components():
    pem = _cert(cpusvn=bytes(components(2, 3)))
    assert parse_pck_cert(pem).cpusvn == bytes(components(2, 3))  # parsing alone accepts it
    with pytest.raises(InvalidCertError) as info:
        select_pck_cert(RAW, "0500", "0000", _tcb_info(), [pem])
    assert info.value.code == 3


def test_ca_certificate_is_not_a_pck_cert():
    with pytest.raises(InvalidCertError):
        parse_pck_cert(pki.platform_ca().pem)


@pytest.mark.parametrize(
    "cpusvn, pcesvn, pceid",
    [
        ("00" * 15, "0500", "0000"),
        ("00" * 17, "0500", "0000"),
        ("ZZ" * 16, "0500", "0000"),
        (RAW, "500", "0000"),
        (RAW, "05000", "0000"),
        (RAW, "0500", "00"),
        (RAW, "0500", "00G0"),
        (None, "0500", "0000"),
        (RAW, 5, "0000"),
    ],
)
def test_invalid_arguments(cpusvn, pcesvn, pceid):
    with pytest.raises(InvalidArgumentError) as info:
        select_pck_cert(cpusvn, pcesvn, pceid, _tcb_info(), [_cert()])
    assert info.value.code == 1


def test_no_certs_or_none_cert_is_invalid_argument():
    with pytest.raises(InvalidArgumentError):
        select_pck_cert(RAW, "0500", "0000", _tcb_info(), [])
    with pytest.raises(InvalidArgumentError):
        select_pck_cert(RAW, "0500", "0000", _tcb_info(), [_cert(), None])


def test_every_error_is_a_selection_error():
    for error in (
        InvalidArgumentError,
        InvalidCertError,
        InvalidTcbInfoError,
        PceIdMismatchError,
        FmspcMismatchError,
        PpidMismatchError,
        PckNotFoundError,
    ):
        assert issubclass(error, SelectionError)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

# Four varying components (positions chosen to include the first and the last) keep the TCBs
# small enough to be often comparable, and the per-TCB certificate cache warm.
_VARYING = (0, 1, 6, 15)


@st.composite
def tcbs(draw, max_svn: int = 3, min_pcesvn: int = 0, max_pcesvn: int = 3) -> Tcb:
    values = [0] * 16
    for position in _VARYING:
        values[position] = draw(st.integers(0, max_svn))
    return Tcb(tuple(values), draw(st.integers(min_pcesvn, max_pcesvn)))


def _pems(cert_tcbs: Sequence[Tcb]) -> list[str]:
    return [
        pki.make_pck_cert(pki.platform_ca(), PPID, t.components, t.pcesvn, fmspc=FMSPC)
        for t in cert_tcbs
    ]


def _tcb_info_for(levels: Sequence[Tcb]) -> bytes:
    return pki.make_tcb_info("00D0C0DE0000", [(t.components, t.pcesvn) for t in levels])


def _bucket_of(tcb: Tcb, sorted_levels: Sequence[Tcb]) -> int:
    return next((i for i, level in enumerate(sorted_levels) if tcb.ge(level)), len(sorted_levels))


def _select(raw: Tcb, tcb_info: bytes, pems: Sequence[str]) -> int:
    return select_pck_cert(bytes(raw.components).hex(), le_hex(raw.pcesvn), "0000", tcb_info, pems)


PROPERTY_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(
    levels=st.lists(tcbs(), min_size=1, max_size=5, unique=True),
    cert_tcbs=st.lists(tcbs(), min_size=1, max_size=8),
    raw=tcbs(),
)
def test_property_choice_is_dominated_and_from_the_best_bucket(levels, cert_tcbs, raw):
    tcb_info = _tcb_info_for(levels)
    sorted_levels = [level.tcb for level in parse_tcb_info(tcb_info).levels]
    eligible = [i for i, tcb in enumerate(cert_tcbs) if raw.ge(tcb)]
    if not eligible:
        with pytest.raises(PckNotFoundError):
            _select(raw, tcb_info, _pems(cert_tcbs))
        return
    chosen = _select(raw, tcb_info, _pems(cert_tcbs))
    chosen_tcb = cert_tcbs[chosen]
    # 1. the platform's raw TCB is ≥ the chosen cert's TCB in every component and PCESVN
    assert all(r >= c for r, c in zip(raw.components, chosen_tcb.components))
    assert raw.pcesvn >= chosen_tcb.pcesvn
    # 2. no eligible cert sits in a better (higher-level) bucket
    best_bucket = _bucket_of(chosen_tcb, sorted_levels)
    assert all(_bucket_of(cert_tcbs[i], sorted_levels) >= best_bucket for i in eligible)
    # 3. inside that bucket, no eligible cert strictly dominates the chosen one
    for i in eligible:
        other = cert_tcbs[i]
        if _bucket_of(other, sorted_levels) == best_bucket and other.ge(chosen_tcb):
            assert chosen_tcb.ge(other), (other, chosen_tcb)


@PROPERTY_SETTINGS
@given(
    levels=st.lists(tcbs(), min_size=1, max_size=5, unique=True),
    cert_tcbs=st.lists(tcbs(), min_size=1, max_size=6),
    raw=tcbs(),
    data=st.data(),
)
def test_property_json_order_of_levels_does_not_matter(levels, cert_tcbs, raw, data):
    shuffled = data.draw(st.permutations(levels))
    pems = _pems(cert_tcbs)

    def outcome(tcb_info):
        try:
            return _select(raw, tcb_info, pems)
        except PckNotFoundError:
            return None

    assert outcome(_tcb_info_for(levels)) == outcome(_tcb_info_for(shuffled))


@PROPERTY_SETTINGS
@given(
    cert_tcbs=st.lists(tcbs(min_pcesvn=1), min_size=1, max_size=6),
    levels=st.lists(tcbs(), min_size=1, max_size=3, unique=True),
    raw_components=tcbs(max_svn=255),
)
def test_property_not_found_when_no_cert_is_dominated(cert_tcbs, levels, raw_components):
    raw = Tcb(raw_components.components, 0)  # every cert needs PCESVN ≥ 1
    with pytest.raises(PckNotFoundError):
        _select(raw, _tcb_info_for(levels), _pems(cert_tcbs))


@PROPERTY_SETTINGS
@given(pcesvn=st.integers(1, 254), base=tcbs(max_pcesvn=0), higher=st.integers(1, 255))
def test_property_pcesvn_byte_order_changes_the_answer(pcesvn, base, higher):
    """Reading the query's PCESVN big-endian would pick a cert above the platform's real SVN."""
    low = Tcb(base.components, pcesvn)
    high = Tcb(base.components, pcesvn + higher)  # needs more than the platform has
    pems = _pems([low, high])
    tcb_info = _tcb_info_for([high, low])
    cpusvn = bytes(base.components).hex()
    little = pcesvn.to_bytes(2, "little").hex()
    swapped = pcesvn.to_bytes(2, "big").hex()  # = pcesvn * 256 when read little-endian
    assert select_pck_cert(cpusvn, little, "0000", tcb_info, pems) == 0
    assert select_pck_cert(cpusvn, swapped, "0000", tcb_info, pems) == 1


@PROPERTY_SETTINGS
@given(cert_tcbs=st.lists(tcbs(), min_size=1, max_size=6, unique=True), data=st.data())
def test_property_exact_match_is_chosen(cert_tcbs, data):
    """A cert issued for exactly the raw TCB is always the answer (PCS's own mapping)."""
    raw = data.draw(st.sampled_from(cert_tcbs))
    levels = data.draw(st.lists(tcbs(), min_size=1, max_size=4, unique=True))
    assert cert_tcbs[_select(raw, _tcb_info_for(levels), _pems(cert_tcbs))] == raw


# Robustness: malformed input only ever raises the typed errors.

_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 300)
    | st.floats(allow_nan=False)
    | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=5,
)


def _json_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _json_paths(child, prefix + (key,))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _json_paths(child, prefix + (index,))


_V3_BODY = _v3_body()
_V3_PATHS = [path for path in _json_paths(_V3_BODY) if path]


@PROPERTY_SETTINGS
@given(path=st.sampled_from(_V3_PATHS), value=_JSON_VALUES)
def test_property_tcb_info_parser_only_raises_typed_errors(path, value):
    body = json.loads(json.dumps(_V3_BODY))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    try:
        parse_tcb_info(json.dumps(body))
    except InvalidTcbInfoError:
        pass


@PROPERTY_SETTINGS
@given(position=st.integers(0, 10_000), byte=st.integers(0, 255), cut=st.booleans())
def test_property_sgx_extension_parser_only_raises_typed_errors(position, byte, cut):
    der = bytearray(_sgx_ext())
    position %= len(der)
    if cut:
        der = der[:position]
    else:
        der[position] = byte
    try:
        parse_pck_cert(_cert(sgx_extension=bytes(der)))
    except InvalidCertError:
        pass
