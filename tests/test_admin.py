"""dcapd-admin: the air-gap round trip (REQ dcapd -> get -> fetch -> put -> OFFLINE dcapd),
Intel's file format, collect, import/export byte-identical, errors, retries and resuming."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
import urllib.parse
from functools import cache
from pathlib import Path

import pytest
import requests

from dcapd.admin import main
from dcapd.admin.common import Progress
from tests import pki
from tests.conftest import upstream_settings
from tests.fakepcs import load_body, load_manifest
from tests.servers import issue_server_cert, running_dcapd
from tests.test_pckcert import (
    CASES,
    PCKCERT,
    TCB_CHAIN,
    assert_pck_answer,
    query,
    raw_tcb,
    serve_platform,
)
from tests.test_platforms import ADMIN, PLATFORMS, TOKENS, USER, registration
from tests.uploads import INTEL_ROOT_CDP, intel_upload, v3_upload_from_scenario

PLATFORM = pki.default_platform()
SCENARIO = "2025-05-27_intel-pcs-recording"
API_KEY = "k" * 32
V4 = "/sgx/certification/v4"
COMMANDS = (
    "get",
    "collect",
    "fetch",
    "put",
    "refresh",
    "status",
    "hash-token",
    "import",
    "export",
    "entries",
    "delete-entry",
    "migrate",
)


# --- a complete test-PKI "Intel PCS": the test platform, its TCB info, CRLs and identities


def _identity(identity_id: str) -> bytes:
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    inner = {
        "id": identity_id,
        "version": 2,
        "issueDate": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nextUpdate": (now + dt.timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tcbEvaluationDataNumber": 17,
        "miscselect": "00000000",
        "miscselectMask": "FFFFFFFF",
        "attributes": "11000000000000000000000000000000",
        "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
        "mrsigner": "AB" * 32,
        "isvprodid": 1,
        "tcbLevels": [
            {"tcb": {"isvsvn": 8}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"}
        ],
    }
    return pki.make_signed_json("enclaveIdentity", inner)


@cache
def world() -> dict:
    cas = {"processor": pki.processor_ca(), "platform": pki.platform_ca()}
    return {
        "crls": {ca: pki.make_crl(cert) for ca, cert in cas.items()},
        "crl_chains": {
            ca: pki.url_encoded_chain(cert.pem, pki.root_ca().pem) for ca, cert in cas.items()
        },
        "root_crl": pki.make_crl(pki.root_ca()),
        "identities": {
            f"{V4}/qe/identity": _identity("QE"),
            f"{V4}/qve/identity": _identity("QVE"),
            "/tdx/certification/v4/qe/identity": _identity("TD_QE"),
        },
    }


def serve_test_world(fake) -> dict:
    """Teach an empty FakePCS everything ``fetch`` asks, all under the test PKI root."""
    data = world()
    serve_platform(fake)
    for ca, der in data["crls"].items():
        fake.add_response(
            "GET",
            f"{V4}/pckcrl",
            {"ca": ca, "encoding": "der"},
            200,
            {
                "Content-Type": "application/pkix-crl",
                "SGX-PCK-CRL-Issuer-Chain": data["crl_chains"][ca],
            },
            der,
        )
    fake.add_response(
        "GET",
        "/IntelSGXRootCA.der",
        {},
        200,
        {"Content-Type": "application/pkix-crl"},
        data["root_crl"],
    )
    for path, body in data["identities"].items():
        fake.add_response(
            "GET",
            path,
            {"update": "standard"},
            200,
            {"Content-Type": "application/json", "SGX-Enclave-Identity-Issuer-Chain": TCB_CHAIN},
            body,
        )
    return data


@pytest.fixture
def roots(tmp_path, make_config) -> str:
    """Intel's root and the test PKI root (the file make_config writes)."""
    return str(tmp_path / "trusted_roots.pem")


def fetch_args(fake, roots: str, platform_list, output, *extra) -> list[str]:
    return [
        "fetch",
        "-u",
        fake.pcs_url,
        "--url-map",
        fake.url_map,
        "--api-key",
        API_KEY,
        "--trusted-roots",
        roots,
        "-i",
        str(platform_list),
        "-o",
        str(output),
        "--retries",
        "0",
        *extra,
    ]


@pytest.fixture
def session():
    with requests.Session() as client:
        client.trust_env = False
        yield client


def calls_of(fake) -> list[tuple]:
    return [
        (c.method, c.path, tuple(sorted((k, tuple(v)) for k, v in c.query.items())))
        for c in fake.calls
    ]


def assert_intel_shape(upload: dict) -> None:
    """Same structure as the file Intel's PccsAdminTool wrote (fixtures/intel-pccs)."""
    intel = intel_upload()
    assert set(upload) == set(intel) == {"platforms", "collaterals"}
    ours, theirs = upload["collaterals"], intel["collaterals"]
    assert set(ours) == set(theirs)
    for key in theirs:
        assert type(ours[key]) is type(theirs[key]), key
    assert ours["version"] == 4
    assert set(ours["certificates"]) == set(theirs["certificates"])
    assert set(ours["certificates"]["SGX-PCK-Certificate-Issuer-Chain"]) == {
        "PLATFORM",
        "PROCESSOR",
    }
    for chain in [
        *ours["certificates"]["SGX-PCK-Certificate-Issuer-Chain"].values(),
        ours["certificates"]["TCB-Info-Issuer-Chain"],
        ours["certificates"]["SGX-Enclave-Identity-Issuer-Chain"],
    ]:
        assert chain.startswith("-----BEGIN%20CERTIFICATE-----") and chain.endswith("%0A")
    assert set(ours["pckcacrl"]) == set(theirs["pckcacrl"])
    for value in [*ours["pckcacrl"].values(), ours["rootcacrl"]]:
        assert value == value.lower() and bytes.fromhex(value)
    assert ours["rootcacrl_cdp"] == theirs["rootcacrl_cdp"] == INTEL_ROOT_CDP
    for name in ("qeidentity", "tdqeidentity", "qveidentity"):
        assert set(json.loads(ours[name])) == {"enclaveIdentity", "signature"}
    intel_entry = theirs["pck_certs"][0]
    for entry in ours["pck_certs"]:
        assert set(entry) == set(intel_entry)
        for cert in entry["certs"]:
            assert set(cert) == {"tcb", "tcbm", "cert"}
            assert cert["cert"].startswith("-----BEGIN%20CERTIFICATE-----")
    allowed = {"fmspc", "sgx_tcbinfo", "sgx_tcbinfo_early", "tdx_tcbinfo", "tdx_tcbinfo_early"}
    for item in ours["tcbinfos"]:
        assert set(item) <= allowed | {f"{name}_raw" for name in allowed} and "sgx_tcbinfo" in item
        for name in set(item) & allowed - {"fmspc"}:
            assert set(item[name]) == {"tcbInfo", "signature"}


# --- the air-gap round trip


def test_air_gap_round_trip(tmp_path, fake_pcs, make_config, roots, session, capsys, monkeypatch):
    """REQ dcapd queues registrations -> get -> fetch (connected side) -> put over HTTPS into
    an OFFLINE dcapd, which then serves /pckcert and the collateral without any upstream."""
    offline_pcs = fake_pcs()  # the registering side's PCS: does not know the platform (404)
    intel = fake_pcs()
    data = serve_test_world(intel)
    platform_list, collaterals = tmp_path / "platform_list.json", tmp_path / "collaterals.json"
    registered = [raw_tcb(*CASES[0][:2]), raw_tcb(*CASES[2][:2])]
    config = make_config(
        cache_mode="REQ",
        cache_dir=str(tmp_path / "req"),
        **upstream_settings(offline_pcs),
        **TOKENS,
    )
    with running_dcapd(config) as server:
        base = f"http://127.0.0.1:{server.port}"
        for cpusvn, pcesvn in registered:
            reply = session.post(
                base + PLATFORMS,
                json=registration(cpusvn, pcesvn),
                headers={"user-token": USER},
                timeout=10,
            )
            assert reply.status_code == 404, "PCS cannot answer yet: the row stays queued"
        monkeypatch.setenv("DCAPD_ADMIN_TOKEN", ADMIN)
        assert main(["get", "-u", base, "-o", str(platform_list)]) == 0
        assert "2 platforms" in capsys.readouterr().out
        assert session.get(base + PLATFORMS, headers={"admin-token": ADMIN}).json() == []
    rows = json.loads(platform_list.read_text())
    assert sorted((r["qe_id"], r["cpu_svn"], r["pce_svn"]) for r in rows) == sorted(
        (PLATFORM.qeid, cpusvn, pcesvn) for cpusvn, pcesvn in registered
    )

    # The connected machine: Intel PCS (the fake) for everything in Intel's format.
    assert main(fetch_args(intel, roots, platform_list, collaterals)) == 0
    upload = json.loads(collaterals.read_text())
    assert_intel_shape(upload)
    assert upload["platforms"] == rows
    pckcerts = [c for c in intel.calls if c.path.endswith("/pckcerts")]
    assert len(pckcerts) == 1, "one pckcerts call per platform, not per raw TCB"
    assert pckcerts[0].headers["Ocp-Apim-Subscription-Key"] == API_KEY
    assert all(
        "Ocp-Apim-Subscription-Key" not in c.headers
        for c in intel.calls
        if not c.path.endswith("/pckcerts")
    )
    assert upload["collaterals"]["tcbinfos"] == [
        {"fmspc": PLATFORM.fmspc.lower(), "sgx_tcbinfo": json.loads(PLATFORM.tcb_info)}
    ]
    assert not (tmp_path / "not_available.json").exists()
    assert not (tmp_path / "collaterals.json.partial").exists()

    # Carried back: PUT into an OFFLINE dcapd over HTTPS (its CA given with --ca-file).
    ca_file, cert_file, key_file = issue_server_cert(tmp_path)
    never = fake_pcs()
    config = make_config(
        cache_mode="OFFLINE",
        cache_dir=str(tmp_path / "offline"),
        tls="auto",
        cert_file=str(cert_file),
        key_file=str(key_file),
        **upstream_settings(never),
        **TOKENS,
    )
    with running_dcapd(config) as server:
        base = f"https://127.0.0.1:{server.port}"
        put = ["put", "-u", base, "--ca-file", str(ca_file), "-i", str(collaterals)]
        assert main(put + ["--trusted-roots", roots]) == 0
        assert "Operation successful." in capsys.readouterr().out

        def get(path, **params):
            return session.get(base + path, params=params, verify=str(ca_file), timeout=10)

        for components, pcesvn, expected in CASES:
            assert_pck_answer(
                get(PCKCERT, **query(*raw_tcb(components, pcesvn))), PLATFORM.pck_certs[expected]
            )
        assert get(f"{V4}/tcb", fmspc=PLATFORM.fmspc).content == PLATFORM.tcb_info
        for path, body in data["identities"].items():
            reply = get(path)
            assert reply.content == body
            assert reply.headers["SGX-Enclave-Identity-Issuer-Chain"] == TCB_CHAIN
        for ca, der in data["crls"].items():
            reply = get(f"{V4}/pckcrl", ca=ca, encoding="der")
            assert reply.content == der
            assert reply.headers["SGX-PCK-CRL-Issuer-Chain"] == data["crl_chains"][ca]
        assert get(f"{V4}/rootcacrl").content == data["root_crl"].hex().encode()
        assert get(f"{V4}/crl", uri=INTEL_ROOT_CDP).content == data["root_crl"]
    assert never.calls == [], "the OFFLINE dcapd never contacted upstream"


@pytest.mark.parametrize("api", ["v4", "v3"])
def test_fetch_from_intel_recordings_is_intels_format(tmp_path, fake_pcs, make_client, roots, api):
    """Against recorded Intel PCS answers, fetch writes what Intel's tool wrote for the same
    platform (fixtures/intel-pccs), and dcapd's own upload code serves it byte-identical.
    A v3 URL (PCS API v3 is retired) is asked through v4 all the same."""
    intel = intel_upload()
    fake = fake_pcs(SCENARIO)
    certs = intel["collaterals"]["pck_certs"][0]["certs"]
    fake.add_response(
        "GET",
        f"{V4}/pckcerts",
        None,
        200,
        {
            "Content-Type": "application/json",
            "SGX-FMSPC": "00606A000000",
            "SGX-PCK-Certificate-CA-Type": "platform",
            "SGX-PCK-Certificate-Issuer-Chain": intel["collaterals"]["certificates"][
                "SGX-PCK-Certificate-Issuer-Chain"
            ]["PLATFORM"],
        },
        json.dumps(certs).encode(),
    )
    other = "2025-08-15_sgx-00606A000000"
    recorded = next(
        r for r in load_manifest(other)["responses"] if r["id"] == "sgx_tcb_00606A000000"
    )
    fake.add_response(
        "GET",
        f"{V4}/tcb",
        {"fmspc": "00606A000000"},
        200,
        recorded["headers"],
        load_body(other, recorded),
    )
    # PCS's FMSPC list (upper case): one new FMSPC, and the platform's own again.
    fake.add_response(
        "GET",
        f"{V4}/fmspcs",
        {"platform": "all"},
        200,
        {"Content-Type": "application/json"},
        b'[{"fmspc":"00906ED50000","platform":"E5"},{"fmspc":"00606A000000","platform":"E3"}]',
    )
    platform_list, output = tmp_path / "platform_list.json", tmp_path / "out.json"
    # Intel's file names no encrypted PPID (its qe_id is synthetic); PCS needs one.
    enc_ppid = "5a" * 384
    for item in intel["platforms"] + intel["collaterals"]["pck_certs"]:
        item["enc_ppid"] = enc_ppid
    platform_list.write_text(json.dumps(intel["platforms"]))
    args = fetch_args(fake, roots, platform_list, output, "-t", "all")
    args[args.index(fake.pcs_url)] = fake.pcs_url.replace("/v4/", f"/{api}/")
    assert main(args) == 0
    assert fake.calls and not [c.path for c in fake.calls if "/v3/" in c.path]
    upload = json.loads(output.read_text())
    assert_intel_shape(upload)
    ours = upload["collaterals"]
    assert upload["platforms"] == intel["platforms"]
    assert ours["pck_certs"] == intel["collaterals"]["pck_certs"]
    [pckcerts] = [c for c in fake.calls if c.path.endswith("/pckcerts")]
    assert pckcerts.query == {"encrypted_ppid": [enc_ppid], "pceid": ["0000"]}
    assert ours["certificates"] == intel["collaterals"]["certificates"]
    # The cert's FMSPC first, lower case as parsed from the cert (Intel's PCCS needs that).
    assert [item["fmspc"] for item in ours["tcbinfos"]] == ["00606a000000", "00906ED50000"]
    assert ours["tcbinfos"][0] == next(
        i for i in intel["collaterals"]["tcbinfos"] if i["fmspc"] == "00606a000000"
    )
    assert set(ours["tcbinfos"][1]) == {"fmspc", "sgx_tcbinfo", "sgx_tcbinfo_early"}
    assert fake.count(f"{V4}/tcb") == 4, "SGX standard+early for each FMSPC, none twice"
    assert ours["qeidentity"] == load_body(SCENARIO, "sgx_qe_identity").decode()
    assert "qeidentity_early" not in ours, "early identities are optional (PCS: 404)"

    client = make_client(cache_mode="OFFLINE", **TOKENS)
    result = client.simulate_put(
        f"{V4}/platformcollateral",
        body=output.read_bytes(),
        headers={"admin-token": ADMIN, "Content-Type": "application/json"},
    )
    assert result.status_code == 200, result.text
    served = client.simulate_get(f"{V4}/tcb", params={"fmspc": "00906ED50000", "update": "early"})
    assert served.content == load_body(SCENARIO, "sgx_tcb_00906ED50000_early")
    row = intel["platforms"][0]
    served = client.simulate_get(
        PCKCERT,
        params={"qeid": row["qe_id"], "pceid": "0000", "cpusvn": row["cpu_svn"], "pcesvn": "0D00"},
    )
    assert served.status_code == 200
    assert served.headers["SGX-TCBm"] == "0B0B0303FFFF000000000000000000000D00"


# --- collect, then fetch with manifests, then import with no server


def test_collect_fetch_and_import_without_a_server(tmp_path, fake_pcs, make_client, roots, capsys):
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    cpusvn, pcesvn = raw_tcb(*CASES[0][:2])
    enclave = [
        PLATFORM.encrypted_ppid.lower(),
        "0000",
        cpusvn.lower(),
        pcesvn.lower(),
        PLATFORM.qeid.lower(),
    ]
    platform_id, manifest = "ab" * 20, "cd" * 64
    (csv_dir / "host1.csv").write_text(",".join(enclave) + "\n")
    (csv_dir / "host2.csv").write_text(f",0000,,,{platform_id},{manifest}\n\n")
    (csv_dir / "notes.txt").write_text("not a CSV file")
    platform_list = tmp_path / "platform_list.json"
    assert main(["collect", "-d", str(csv_dir), "-o", str(platform_list)]) == 0
    keys = ("enc_ppid", "pce_id", "cpu_svn", "pce_svn", "qe_id")
    assert json.loads(platform_list.read_text()) == [
        dict(zip(keys, enclave), platform_manifest=None, pckid_filename="host1.csv"),
        dict(
            zip(keys, ["", "0000", "", "", platform_id]),
            platform_manifest=manifest,
            pckid_filename="host2.csv",
        ),
    ]

    fake = fake_pcs()
    serve_test_world(fake)
    fake.add_response(
        "POST",
        f"{V4}/pckcerts",
        None,
        200,
        pki.pckcerts_response_headers(PLATFORM),
        pki.pckcerts_response_body(PLATFORM, not_available=True),
    )
    output = tmp_path / "out" / "collaterals.json"
    output.parent.mkdir()
    assert main(fetch_args(fake, roots, platform_list, output, "-p", "none")) == 0
    [get] = [c for c in fake.calls if c.path.endswith("/pckcerts") and c.method == "GET"]
    assert get.query == {"encrypted_ppid": [PLATFORM.encrypted_ppid.lower()], "pceid": ["0000"]}
    [post] = [c for c in fake.calls if c.method == "POST"]
    assert json.loads(post.body) == {"platformManifest": manifest, "pceid": "0000"}
    assert fake.count(f"{V4}/fmspcs") == 0, "-p none: no FMSPC list"
    not_available = json.loads((output.parent / "not_available.json").read_text())
    assert not_available == [
        {
            "enc_ppid": "",
            "platform_manifest": manifest,
            "qe_id": platform_id,
            "pce_id": "0000",
            "cpu_svn": "04040202ffff01000000000000000000",
            "pce_svn": "0900",
        }
    ]
    upload = json.loads(output.read_text())
    assert [len(e["certs"]) for e in upload["collaterals"]["pck_certs"]] == [4, 4], (
        "'Not available' entries are left out"
    )

    cache = tmp_path / "imported"
    assert main(["import", "-i", str(output), "-C", str(cache), "--trusted-roots", roots]) == 0
    assert str(cache) in capsys.readouterr().out
    client = make_client(cache_mode="OFFLINE", cache_dir=str(cache))
    for components, svn, expected in CASES:
        assert_pck_answer(
            client.simulate_get(PCKCERT, params=query(*raw_tcb(components, svn))),
            PLATFORM.pck_certs[expected],
        )
    result = client.simulate_get(
        PCKCERT, params={"qeid": platform_id, "pceid": "0000", "cpusvn": cpusvn, "pcesvn": pcesvn}
    )
    assert_pck_answer(result, PLATFORM.pck_certs[0])


def test_collect_names_the_bad_file_and_line(tmp_path, capsys):
    (tmp_path / "a.csv").write_text("00,0000,,,ab\n")
    assert main(["collect", "-d", str(tmp_path), "-o", str(tmp_path / "l.json")]) == 1
    err = capsys.readouterr().err
    assert "a.csv line 1: enc_ppid is not 768 hex characters" in err
    (tmp_path / "a.csv").write_text(",0000,,,ab,cd\n,0000,,ab\n")
    assert main(["collect", str(tmp_path / "a.csv"), "-o", str(tmp_path / "l.json")]) == 1
    assert "a.csv line 2: 4 columns" in capsys.readouterr().err
    assert not (tmp_path / "l.json").exists()


# --- export / import: byte-identical answers


def _requests_to_compare(intel: dict) -> list[tuple[str, dict, dict]]:
    """Every GET the populated cache answers (path, params, headers)."""
    admin = {"admin-token": ADMIN}
    paths = [
        (f"/{tee}/certification/v{v}/tcb", {"fmspc": f, "update": u}, {})
        for tee, v, f, u in [
            ("tdx", 4, "50806F000000", "standard"),
            ("sgx", 4, "00906ED50000", "early"),
            ("sgx", 3, "00906ED50000", "standard"),
            ("sgx", 4, PLATFORM.fmspc, "standard"),
        ]
    ]
    for item in intel["collaterals"]["tcbinfos"]:
        for name in set(item) - {"fmspc"}:
            paths.append(
                (
                    f"/{name[:3]}/certification/v4/tcb",
                    {
                        "fmspc": item["fmspc"].upper(),
                        "update": "early" if name.endswith("_early") else "standard",
                    },
                    {},
                )
            )
    paths += [
        (path, {}, {})
        for path in (
            "/sgx/certification/v3/qe/identity",
            f"{V4}/qe/identity",
            f"{V4}/qve/identity",
            "/tdx/certification/v4/qe/identity",
            f"{V4}/rootcacrl",
        )
    ]
    for ca in ("processor", "platform"):
        paths += [
            (f"{V4}/pckcrl", {"ca": ca}, {}),
            (f"{V4}/pckcrl", {"ca": ca, "encoding": "der"}, {}),
        ]
    paths += [(f"{V4}/crl", {"uri": uri}, {}) for uri in (INTEL_ROOT_CDP, PROCESSOR_CRL_URI)]
    paths += [(PCKCERT, query(*raw_tcb(components, pcesvn)), {}) for components, pcesvn, _ in CASES]
    row = intel["platforms"][0]
    paths += [
        (PCKCERT, {"qeid": row["qe_id"], "pceid": "0000", "cpusvn": cpusvn, "pcesvn": "0D00"}, {})
        for cpusvn in (row["cpu_svn"], "0C0C0303FFFF00000000000000000000")
    ]
    paths += [
        (f"{V4}/appraisalpolicy", {"fmspc": PLATFORM.fmspc}, {}),
        (PLATFORMS, {"source": "[]"}, admin),
        (PLATFORMS, {"source": "reg"}, admin),
    ]
    return paths


PROCESSOR_CRL_URI = (
    "https://api.trustedservices.intel.com/sgx/certification/v4/pckcrl?ca=processor&encoding=der"
)


def _jwt(class_id: str = "3123ec35-8d38-4ea5-87a5-d6c48b567570") -> str:
    def part(value) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    payload = {
        "policy_payload": json.dumps(
            {"policy_array": [{"environment": {"class_id": class_id}, "reference": {}}]}
        )
    }
    return f"{part({'alg': 'RS384'})}.{part(payload)}.{part('signature')}"


def _answers(client, requests_: list) -> list[tuple]:
    answers = []
    for path, params, headers in requests_:
        result = client.simulate_get(path, params=params, headers=headers)
        assert result.status_code == 200, (path, params, result.text)
        answers.append(
            (
                result.content,
                sorted(
                    (name.lower(), value)
                    for name, value in result.headers.items()
                    if name.lower() != "request-id"
                ),
            )
        )
    return answers


def test_export_then_import_serves_byte_identical_answers(
    tmp_path, fake_pcs, make_client, make_config, roots, capsys
):
    """One cache filled by LAZY fetches from two recorded worlds (2023: an older TCB signing
    chain), the test PKI platform, Intel's upload file, an appraisal policy and a queued
    registration; exported, imported into an empty cache, it answers every GET identically."""
    cache, imported = tmp_path / "cache", tmp_path / "imported"
    old = fake_pcs("2023-06-18_tdx-50806F000000")
    client = make_client(old, cache_dir=str(cache))
    for path, params in [
        ("/tdx/certification/v4/tcb", {"fmspc": "50806F000000"}),
        ("/tdx/certification/v4/qe/identity", {}),
        (f"{V4}/pckcrl", {"ca": "platform", "encoding": "der"}),
        (f"{V4}/rootcacrl", {}),
        (f"{V4}/crl", {"uri": INTEL_ROOT_CDP}),
    ]:
        assert client.simulate_get(path, params=params).status_code == 200, path
    client.app.services.store.close()
    fake = fake_pcs(SCENARIO)
    serve_platform(fake)
    client = make_client(fake, cache_dir=str(cache), **TOKENS)
    for path, params in [
        (f"{V4}/tcb", {"fmspc": "00906ED50000"}),
        (f"{V4}/tcb", {"fmspc": "00906ED50000", "update": "early"}),
        ("/tdx/certification/v4/tcb", {"fmspc": "00806F050000"}),
        (f"{V4}/pckcrl", {"ca": "processor"}),
        (f"{V4}/crl", {"uri": PROCESSOR_CRL_URI}),
    ] + [(PCKCERT, query(*raw_tcb(c, p))) for c, p, _ in CASES]:
        assert client.simulate_get(path, params=params).status_code == 200, (path, params)
    # v3 collateral is never fetched any more (PCS API v3 is retired): it comes uploaded.
    v3 = client.simulate_put(
        "/sgx/certification/v3/platformcollateral",
        body=json.dumps(v3_upload_from_scenario(SCENARIO)),
        headers={"admin-token": ADMIN},
    )
    assert v3.status_code == 200, v3.text
    intel = intel_upload()
    put = client.simulate_put(
        f"{V4}/platformcollateral", body=json.dumps(intel), headers={"admin-token": ADMIN}
    )
    assert put.status_code == 200, put.text
    policy = client.simulate_put(
        f"{V4}/appraisalpolicy",
        headers={"admin-token": ADMIN},
        json={"policy": _jwt(), "is_default": True, "fmspc": PLATFORM.fmspc},
    )
    assert policy.status_code == 200, policy.text
    client.app.services.store.close()
    queued = make_client(cache_mode="OFFLINE", cache_dir=str(cache), **TOKENS)
    assert (
        queued.simulate_post(
            PLATFORMS,
            json=registration(*raw_tcb(*CASES[1][:2]), qe_id="ab" * 16),
            headers={"user-token": USER},
        ).status_code
        == 200
    )
    exported = tmp_path / "export.json"
    assert main(["export", "-C", str(cache), "-o", str(exported)]) == 0
    to_compare = _requests_to_compare(intel)
    before = _answers(queued, to_compare)  # (the last one empties the registration queue)
    queued.app.services.store.close()
    body = json.loads(exported.read_text())
    assert {"dcapd_extra_uploads", "dcapd_crls", "dcapd_entries"} <= set(body)
    assert body["collaterals"]["version"] == 4
    assert sorted(p["collaterals"]["version"] for p in body["dcapd_extra_uploads"]) == [3, 4, 4]
    assert list(body["dcapd_crls"]) == [PROCESSOR_CRL_URI]
    assert body["collaterals"]["rootcacrl_cdp"] == INTEL_ROOT_CDP
    tdx_2023 = [
        i
        for p in body["dcapd_extra_uploads"]
        for i in p["collaterals"]["tcbinfos"]
        if i["fmspc"] == "50806f000000"
    ]
    assert "tdx_tcbinfo_raw" in tdx_2023[0], "its original ends with a newline"
    assert main(["import", "-i", str(exported), "-C", str(imported), "--trusted-roots", roots]) == 0
    capsys.readouterr()
    after_client = make_client(cache_mode="OFFLINE", cache_dir=str(imported), **TOKENS)
    again = tmp_path / "again.json"
    assert main(["export", "-C", str(imported), "-o", str(again)]) == 0
    assert json.loads(again.read_text()) == body, "export of the import is the same file"
    after = _answers(after_client, to_compare)
    for request, answer_before, answer_after in zip(to_compare, before, after):
        assert answer_after == answer_before, request

    # The same file through PUT: the extra upload bodies go to their routes, v3 included.
    config = make_config(cache_mode="OFFLINE", cache_dir=str(tmp_path / "put"), **TOKENS)
    with running_dcapd(config) as server:
        base = f"http://127.0.0.1:{server.port}"
        put = ["put", "-u", base, "--token", ADMIN, "-i", str(exported), "--trusted-roots", roots]
        assert main(put) == 0
        assert "dcapd_crls and dcapd_entries cannot be uploaded" in capsys.readouterr().err
        reply = requests.get(
            base + "/sgx/certification/v3/tcb", params={"fmspc": "00906ED50000"}, timeout=10
        )
        assert reply.content == load_body(SCENARIO, "sgx_tcb_00906ED50000_v3api")


def test_import_of_a_bad_file_names_it_and_changes_nothing(tmp_path, roots, capsys):
    upload = intel_upload()
    upload["dcapd_extra_uploads"] = [
        {
            "platforms": [],
            "collaterals": {
                "version": 4,
                "pck_certs": [],
                "tcbinfos": [],
                "certificates": {"SGX-PCK-Certificate-Issuer-Chain": {}},
                "rootcacrl": "zz",
            },
        }
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(upload))
    cache = tmp_path / "cache"
    assert main(["import", "-i", str(path), "-C", str(cache), "--trusted-roots", roots]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dcapd-admin: ") and len(err.splitlines()) == 1
    assert "bad.json: dcapd_extra_uploads[0]: refused (400)" in err and "rootcacrl" in err
    from dcapd.store import Store

    store = Store(str(cache))
    try:
        assert store.keys() == [], "the first (valid) body was rolled back too"
    finally:
        store.close()
    assert main(["export", "-C", str(tmp_path / "nothing"), "-o", str(path)]) == 2
    assert "not a dcapd cache directory" in capsys.readouterr().err


# --- errors: one line on stderr, non-zero status


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_pccs_errors_are_one_clear_line(tmp_path, make_config, capsys, monkeypatch):
    monkeypatch.delenv("DCAPD_ADMIN_TOKEN", raising=False)
    out = str(tmp_path / "list.json")
    ca_file, cert_file, key_file = issue_server_cert(tmp_path)
    config = make_config(
        cache_mode="OFFLINE", tls="auto", cert_file=str(cert_file), key_file=str(key_file), **TOKENS
    )
    with running_dcapd(config) as server:
        base = f"https://127.0.0.1:{server.port}"
        assert (
            main(["get", "-u", base, "--ca-file", str(ca_file), "--token", "wrong", "-o", out]) == 1
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "refused the admin token (401 Authentication failed.)" in err
        assert "wrong" not in err
        # A self-signed server without --ca-file: the machine's CA bundle does not trust it.
        assert main(["get", "-u", base, "--token", ADMIN, "-o", out]) == 1
        assert "--ca-file" in capsys.readouterr().err
        assert main(["get", "-u", base, "--insecure", "--token", ADMIN, "-s", "[]", "-o", out]) == 0
        assert json.loads(Path(out).read_text()) == []
        assert main(["refresh", "-u", base, "--ca-file", str(ca_file), "--token", ADMIN]) == 1
        assert "answered 503" in capsys.readouterr().err, "OFFLINE: no refresh (Intel: 503)"
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["get", "-u", url, "--token", ADMIN, "-o", out]) == 1
    err = capsys.readouterr().err
    assert f"cannot connect to {url}/sgx/certification/v4/platforms" in err
    assert "Connection refused" in err
    assert main(["refresh", "-u", url]) == 2  # stdin is not a terminal: no prompt
    assert "no admin token: give --token or set DCAPD_ADMIN_TOKEN" in capsys.readouterr().err


def test_malformed_inputs_name_the_file_and_first_bad_entry(tmp_path, fake_pcs, roots, capsys):
    fake = fake_pcs()
    good = {
        "qe_id": PLATFORM.qeid,
        "pce_id": "0000",
        "cpu_svn": "",
        "pce_svn": "",
        "enc_ppid": PLATFORM.encrypted_ppid,
        "platform_manifest": "",
    }
    listing = tmp_path / "platforms.json"
    for content, message in [
        (
            [good, dict(good, pce_id="00000"), dict(good, qe_id="xyz")],
            f"platforms.json: entry 1 (qe_id '{PLATFORM.qeid}'): pce_id is not 4 hex characters",
        ),
        (
            [dict(good, enc_ppid="", platform_manifest=None)],
            f"entry 0 (qe_id '{PLATFORM.qeid}'): has neither enc_ppid nor platform_manifest",
        ),
        ({"platforms": []}, "platforms.json: not a JSON array of platforms"),
        ("[{", "platforms.json: not valid JSON"),
    ]:
        listing.write_text(content if isinstance(content, str) else json.dumps(content))
        assert main(fetch_args(fake, roots, listing, tmp_path / "out.json")) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert fake.calls == [], "checked before anything is fetched"
    assert main(fetch_args(fake, roots, tmp_path / "missing.json", tmp_path / "o.json")) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "upload.json").write_text('{"platforms": []}')
    assert (
        main(
            ["put", "-u", "http://127.0.0.1:1", "--token", "t", "-i", str(tmp_path / "upload.json")]
        )
        == 1
    )
    assert "upload.json: not an upload file" in capsys.readouterr().err


# --- PCS: retries, Retry-After, resuming


def test_retries_honour_retry_after_and_back_off(tmp_path, fake_pcs, roots, capsys):
    fake = fake_pcs(SCENARIO)
    fake.add_response(
        "GET", f"{V4}/pckcrl", {"ca": "processor", "encoding": "der"}, 429, {"Retry-After": "7"}
    )
    fake.fail_with(status=503, paths="/IntelSGXRootCA.der")
    delays = []

    def sleep(seconds):
        delays.append(seconds)
        if len(delays) == 1:
            fake.clear_added()  # PCS has let us back in
        if len(delays) == 3:
            fake.clear_fault()

    output = tmp_path / "crls.json"
    argv = [
        "fetch",
        "-c",
        "-u",
        fake.pcs_url,
        "--url-map",
        fake.url_map,
        "--trusted-roots",
        roots,
        "-o",
        str(output),
        "--backoff",
        "0.5",
    ]
    assert main(argv, sleep=sleep) == 0
    assert delays == [7.0, 0.5, 1.0]
    assert fake.count("/pckcrl") == 3 and fake.count("/IntelSGXRootCA.der") == 3
    upload = json.loads(output.read_text())
    assert upload["platforms"] == [] and upload["collaterals"]["pck_certs"] == []
    assert upload["collaterals"]["rootcacrl"] == load_body(SCENARIO, "root_ca_crl").hex()
    assert all("Ocp-Apim-Subscription-Key" not in c.headers for c in fake.calls), (
        "-c needs no API key"
    )
    fake.fail_with(status=500)
    assert main(argv + ["--retries", "2", "--restart"], sleep=delays.append) == 1
    err = capsys.readouterr().err
    assert f"processor PCK CRL: PCS answered 500 for {fake.pcs_url}pckcrl (after 2 retries)" in err
    assert delays[3:] == [0.5, 1.0]


def test_interrupted_fetch_resumes_without_asking_pcs_again(tmp_path, fake_pcs, roots, capsys):
    fake = fake_pcs()
    serve_test_world(fake)
    platform_list, output = tmp_path / "platform_list.json", tmp_path / "out.json"
    platform_list.write_text(
        json.dumps(
            [
                {
                    "qe_id": PLATFORM.qeid,
                    "pce_id": "0000",
                    "cpu_svn": cpusvn,
                    "pce_svn": pcesvn,
                    "enc_ppid": PLATFORM.encrypted_ppid,
                    "platform_manifest": "",
                }
                for cpusvn, pcesvn in (raw_tcb(*CASES[0][:2]), raw_tcb(*CASES[1][:2]))
            ]
        )
    )
    argv = fetch_args(fake, roots, platform_list, output)
    partial = tmp_path / "out.json.partial"

    fake.fail_with(status=500, paths=f"{V4}/qe/identity")  # an error mid-way
    assert main(argv) == 1
    assert "QE identity (standard): PCS answered 500" in capsys.readouterr().err
    assert partial.exists() and not output.exists()
    first = calls_of(fake)
    fake.reset_calls()

    def ctrl_c(seconds):
        raise KeyboardInterrupt

    fake.fail_with(status=503, paths=f"{V4}/qve/identity")  # Ctrl-C while waiting to retry
    assert main(argv[:-1] + ["1"], sleep=ctrl_c) == 130
    assert "interrupted" in capsys.readouterr().err
    second = calls_of(fake)
    fake.reset_calls()
    fake.clear_fault()
    assert main(argv) == 0
    third = calls_of(fake)
    assert not partial.exists()

    identity = lambda path: ("GET", path, (("update", ("standard",)),))  # noqa: E731
    assert second == [
        identity(f"{V4}/qe/identity"),
        identity("/tdx/certification/v4/qe/identity"),
        identity(f"{V4}/qve/identity"),
    ]
    assert third == [identity(f"{V4}/qve/identity")]
    assert first[-1] == identity(f"{V4}/qe/identity")
    assert len(first) == len(set(first)), "nothing asked twice in the first run"
    assert "9 answers resumed" in capsys.readouterr().out
    fresh = tmp_path / "fresh.json"
    assert main(fetch_args(fake, roots, platform_list, fresh)) == 0
    assert json.loads(fresh.read_text()) == json.loads(output.read_text())


def test_progress_bar_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    quiet, tty = io.StringIO(), Terminal()
    for stream in (quiet, tty):
        bar = Progress(stream)
        bar.add(4)
        for label in ("processor PCK CRL", "platform PCK CRL"):
            bar.step(label)
        bar.close()
    assert quiet.getvalue() == ""
    assert "2/4 platform PCK CRL" in tty.getvalue() and "[" + "#" * 14 in tty.getvalue()
    assert tty.getvalue().endswith("\r")


def test_fetch_is_quiet_when_not_a_terminal(tmp_path, fake_pcs, roots, capsys):
    fake = fake_pcs(SCENARIO)
    assert (
        main(
            [
                "fetch",
                "-c",
                "-u",
                fake.pcs_url,
                "--url-map",
                fake.url_map,
                "--trusted-roots",
                roots,
                "-o",
                str(tmp_path / "c.json"),
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert err == "", "no platforms: no progress lines"
    summary, expired = out.splitlines()
    assert "0 platforms, 0 certificates, 0 FMSPCs (3 PCS requests)" in summary
    assert "3 collateral items of 3 past nextUpdate (e.g. processorCrl)" in expired


# --- appraisal policy and refresh: Intel's requests, and dcapd's routes


def test_put_policy_and_refresh_send_intels_requests(tmp_path, fake_pcs, make_config, capsys):
    tiny = fake_pcs()  # a stand-in PCCS that records what it is sent
    tiny.add_response("PUT", f"{V4}/appraisalpolicy", None, 200, {}, b"abc123")
    tiny.add_response("POST", f"{V4}/refresh", None, 200, {}, b"Operation successful.")
    policy = tmp_path / "policy.jwt"
    policy.write_text(_jwt() + "\n")
    assert (
        main(
            [
                "put",
                "-u",
                tiny.base,
                "--token",
                ADMIN,
                "-f",
                "00d0c0de0000",
                "-d",
                "-i",
                str(policy),
            ]
        )
        == 0
    )
    assert "id abc123" in capsys.readouterr().out
    [put] = tiny.calls
    assert put.headers["admin-token"] == ADMIN
    assert put.headers["Content-Type"] == "application/json"
    assert json.loads(put.body) == {
        "policy": _jwt() + "\n",
        "is_default": True,
        "fmspc": "00d0c0de0000",
    }
    for argv, expected in [
        ([], {}),
        (["--certs"], {"type": ["certs"]}),
        (
            ["-f", "00D0C0DE0000,00906ED50000"],
            {"type": ["certs"], "fmspc": ["00D0C0DE0000,00906ED50000"]},
        ),
        (["-f", "all"], {"type": ["certs"], "fmspc": [""]}),
    ]:
        tiny.reset_calls()
        assert main(["refresh", "-u", f"{tiny.base}{V4}/refresh", "--token", ADMIN] + argv) == 0
        [call] = [c for c in tiny.calls if c.method == "POST"]
        assert (call.method, call.path, call.query) == ("POST", f"{V4}/refresh", expected)

    config = make_config(cache_dir=str(tmp_path / "lazy"), **TOKENS)
    with running_dcapd(config) as server:
        base = f"http://127.0.0.1:{server.port}"
        code = main(
            [
                "put",
                "-u",
                f"{base}{V4}/appraisalpolicy",
                "--token",
                ADMIN,
                "-f",
                PLATFORM.fmspc,
                "-d",
                "-i",
                str(policy),
            ]
        )
        out, err = capsys.readouterr()
        if "answered 404" in err or "answered 405" in err:
            pytest.skip("this dcapd has no PUT /appraisalpolicy yet")
        assert code == 0, err
        assert hashlib.sha384(policy.read_bytes()).hexdigest() in out
        assert (
            requests.get(
                f"{base}{V4}/appraisalpolicy", params={"fmspc": PLATFORM.fmspc}, timeout=10
            ).text
            == policy.read_text()
        )
        assert main(["refresh", "-u", base, "--token", ADMIN, "--certs"]) == 0, (
            capsys.readouterr().err
        )


# --- the command itself


def test_help_documents_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert f"    {command} " in text or f"    {command}\n" in text, command
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"usage: dcapd-admin {command}" in capsys.readouterr().out
    assert main([]) == 2


def test_console_script_and_module():
    script = shutil.which("dcapd-admin")
    commands = [[sys.executable, "-m", "dcapd.admin", "--help"]]
    if script:
        commands.append([script, "--help"])
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert all(name in result.stdout for name in COMMANDS)
    if not script:
        pytest.skip("dcapd-admin is not installed (pip install -e .): checked the module only")


def test_url_forms_accepted_for_the_pccs():
    from dcapd.admin.pccs import pccs_root

    for url in (
        "https://h:8081",
        "https://h:8081/",
        "https://h:8081/sgx/certification/v4/",
        "https://h:8081/sgx/certification/v4/platformcollateral",
    ):
        assert pccs_root(url)[0] == "https://h:8081/"
    assert pccs_root("https://h/pccs/sgx/certification/v4/appraisalpolicy") == (
        "https://h/pccs/",
        "appraisalpolicy",
    )
    assert urllib.parse.urlsplit(pccs_root("http://h:1")[0]).port == 1
