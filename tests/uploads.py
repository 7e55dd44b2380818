"""Upload files (PUT /platformcollateral bodies) built from fixtures, in the format Intel's
PccsAdminTool ``fetch`` writes (pccs-reference.md §4.3)."""

from __future__ import annotations

import json
import urllib.parse

from tests import pki
from tests.fakepcs import FIXTURES, load_body, load_manifest

INTEL_ROOT_CDP = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
INTEL_UPLOAD = FIXTURES / "intel-pccs" / "platform_collaterals.json"


def intel_upload() -> dict:
    """The upload file Intel's own PCCS accepted (fixtures/intel-pccs)."""
    return json.loads(INTEL_UPLOAD.read_text())


def upload_from_scenario(scenario: str) -> dict:
    """Everything a scenario recorded, as one v4 upload: TCB infos as parsed objects,
    identities as raw text, CRLs as hex, issuer chains URL-encoded."""
    tcbinfos: dict[str, dict] = {}
    collaterals: dict = {
        "version": 4,
        "pck_certs": [],
        "tcbinfos": [],
        "pckcacrl": {},
        "certificates": {"SGX-PCK-Certificate-Issuer-Chain": {}},
    }
    chains = collaterals["certificates"]
    for response in load_manifest(scenario)["responses"]:
        path, query, headers = response["path"], response["query"], response["headers"]
        if response["status"] != 200 or "tcbEvaluationDataNumber" in query:
            continue
        body = load_body(scenario, response)
        early = query.get("update") == "early"
        if path == "/IntelSGXRootCA.der":
            collaterals["rootcacrl"] = body.hex()
            collaterals["rootcacrl_cdp"] = INTEL_ROOT_CDP
        elif path.endswith("/v4/pckcrl") and query.get("encoding") == "der":
            ca = query["ca"]
            collaterals["pckcacrl"][f"{ca}Crl"] = body.hex()
            chains["SGX-PCK-Certificate-Issuer-Chain"][ca.upper()] = headers[
                "SGX-PCK-CRL-Issuer-Chain"
            ]
        elif path.endswith("/v4/tcb"):
            tee = "sgx" if path.startswith("/sgx/") else "tdx"
            entry = tcbinfos.setdefault(query["fmspc"].upper(), {"fmspc": query["fmspc"]})
            entry[f"{tee}_tcbinfo{'_early' if early else ''}"] = json.loads(body)
            chains["TCB-Info-Issuer-Chain"] = headers["TCB-Info-Issuer-Chain"]
        elif path.endswith("/v4/qe/identity") or path.endswith("/v4/qve/identity"):
            name = {
                "/sgx/certification/v4/qe/identity": "qeidentity",
                "/sgx/certification/v4/qve/identity": "qveidentity",
                "/tdx/certification/v4/qe/identity": "tdqeidentity",
            }[path]
            collaterals[name + ("_early" if early else "")] = body.decode()
            chains["SGX-Enclave-Identity-Issuer-Chain"] = headers[
                "SGX-Enclave-Identity-Issuer-Chain"
            ]
    collaterals["tcbinfos"] = list(tcbinfos.values())
    return {"platforms": [], "collaterals": collaterals}


def upload_for_test_platform(platform=None, raw_tcbs=()) -> dict:
    """The test PKI platform: its PCK certs, its SGX TCB info, and the given raw TCBs."""
    platform = platform or pki.default_platform()
    tcb_chain = pki.url_encoded_chain(pki.tcb_signing().pem, pki.root_ca().pem)
    certs = [
        {"tcb": entry.tcb_json, "tcbm": entry.tcbm, "cert": urllib.parse.quote(entry.pem, safe="")}
        for entry in platform.pck_certs
    ]
    return {
        "platforms": [
            {
                "qe_id": platform.qeid.lower(),
                "pce_id": platform.pceid,
                "cpu_svn": cpu_svn.lower(),
                "pce_svn": pce_svn.lower(),
                "enc_ppid": platform.encrypted_ppid.lower(),
                "platform_manifest": "",
            }
            for cpu_svn, pce_svn in raw_tcbs
        ],
        "collaterals": {
            "version": 4,
            "pck_certs": [
                {
                    "qe_id": platform.qeid.lower(),
                    "pce_id": platform.pceid,
                    "enc_ppid": platform.encrypted_ppid.lower(),
                    "platform_manifest": "",
                    "certs": certs,
                }
            ],
            "tcbinfos": [
                {"fmspc": platform.fmspc.lower(), "sgx_tcbinfo": json.loads(platform.tcb_info)}
            ],
            "certificates": {
                "SGX-PCK-Certificate-Issuer-Chain": {"PLATFORM": platform.issuer_chain},
                "TCB-Info-Issuer-Chain": tcb_chain,
            },
        },
    }


def v3_upload_from_scenario(scenario: str = "2025-05-27_intel-pcs-recording") -> dict:
    """The scenario's PCS API v3 TCB info and QE identity as a v3 upload (Intel's v3 format:
    no version key); the TCB info also as its exact text (``tcbinfo_raw``)."""
    responses = {r["id"]: r for r in load_manifest(scenario)["responses"]}
    tcb, qe = responses["sgx_tcb_00906ED50000_v3api"], responses["sgx_qe_identity_v3api"]
    tcb_body = load_body(scenario, tcb).decode()
    return {
        "platforms": [],
        "collaterals": {
            "pck_certs": [],
            "tcbinfos": [
                {
                    "fmspc": tcb["query"]["fmspc"].lower(),
                    "tcbinfo": json.loads(tcb_body),
                    "tcbinfo_raw": tcb_body,
                }
            ],
            "qeidentity": load_body(scenario, qe).decode(),
            "certificates": {
                "SGX-PCK-Certificate-Issuer-Chain": {},
                "SGX-TCB-Info-Issuer-Chain": tcb["headers"]["SGX-TCB-Info-Issuer-Chain"],
                "SGX-Enclave-Identity-Issuer-Chain": qe["headers"][
                    "SGX-Enclave-Identity-Issuer-Chain"
                ],
            },
        },
    }
