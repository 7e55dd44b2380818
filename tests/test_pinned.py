"""Collateral PCS v4 serves beyond Intel's PCCS (pccs-1.27.md §3), replayed from the real
2025-05-27 recording: a TCB info pinned to TCB evaluation data number 17, the SGX and TDX
lists of evaluation data numbers, the QAE identity. Fetched once in LAZY mode, checked like
all collateral, replayed byte-exact; carried by the upload file."""

from __future__ import annotations

import json
import logging

import pytest

from dcapd.admin import main as admin_main
from dcapd.errors import EVALUATION_NUMBER_GONE
from dcapd.extra import extra_collateral_items
from tests.fakepcs import load_body, load_manifest
from tests.test_platforms import ADMIN, TOKENS

SCENARIO = "2025-05-27_intel-pcs-recording"
EVAL17 = {"fmspc": "00806F050000", "tcbEvaluationDataNumber": "17"}
# (dcapd path, query, recording id, issuer-chain header, PCS path)
PINNED = [
    (
        "/tdx/certification/v4/tcb",
        EVAL17,
        "tdx_tcb_00806F050000_eval17",
        "TCB-Info-Issuer-Chain",
    ),
    (
        "/sgx/certification/v4/tcbevaluationdatanumbers",
        {},
        "sgx_tcbevaluationdatanumbers",
        "TCB-Evaluation-Data-Numbers-Issuer-Chain",
    ),
    (
        "/tdx/certification/v4/tcbevaluationdatanumbers",
        {},
        "tdx_tcbevaluationdatanumbers",
        "TCB-Evaluation-Data-Numbers-Issuer-Chain",
    ),
    (
        "/sgx/certification/v4/qae/identity",
        {},
        "sgx_qae_identity",
        "SGX-Enclave-Identity-Issuer-Chain",
    ),
]
IDS = ["tdx-tcb-eval17", "sgx-eval-numbers", "tdx-eval-numbers", "qae-identity"]


def recorded(response_id: str) -> dict:
    return next(r for r in load_manifest(SCENARIO)["responses"] if r["id"] == response_id)


def fill(client, fake) -> None:
    for path, params, *_ in PINNED:
        assert client.simulate_get(path, params=params).status_code == 200, path


def answers(client) -> list[tuple]:
    out = []
    for path, params, _, chain in PINNED:
        result = client.simulate_get(path, params=params)
        assert result.status_code == 200, (path, result.text)
        out.append((result.content, result.headers["content-type"], result.headers[chain]))
    return out


def upload_with(items: list[dict]) -> dict:
    """A v4 upload holding nothing of Intel's format, only dcapd's extra collateral."""
    return {
        "platforms": [],
        "collaterals": {
            "version": 4,
            "pck_certs": [],
            "tcbinfos": [],
            "certificates": {"SGX-PCK-Certificate-Issuer-Chain": {}},
        },
        "dcapd_extra_collateral": items,
    }


def put(client, body):
    return client.simulate_put(
        "/sgx/certification/v4/platformcollateral",
        body=json.dumps(body),
        headers={"Content-Type": "application/json", "admin-token": ADMIN},
    )


@pytest.mark.parametrize("path,params,response_id,chain", PINNED, ids=IDS)
def test_miss_then_hit_byte_exact_with_one_upstream_call(
    fake_pcs, make_client, path, params, response_id, chain
):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake)
    body = load_body(SCENARIO, response_id)
    for attempt in ("miss", "hit"):
        result = client.simulate_get(path, params=params)
        assert result.status_code == 200, (attempt, result.text)
        assert result.content == body, attempt
        assert result.headers["content-type"] == "application/json"
        assert result.headers[chain] == recorded(response_id)["headers"][chain]
        assert len(fake.calls) == 1, attempt
    call = fake.calls[0]
    assert call.path == path
    # Exactly PCS's query: the number without update (PCS refuses both).
    expected = {k: [v] for k, v in recorded(response_id)["query"].items()}
    assert call.query == (expected or ({"update": ["standard"]} if "identity" in path else {}))


def test_pinned_and_standard_tcb_info_are_separate_entries(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake)
    pinned = client.simulate_get("/tdx/certification/v4/tcb", params=EVAL17)
    standard = client.simulate_get("/tdx/certification/v4/tcb", params={"fmspc": "00806F050000"})
    assert pinned.content == load_body(SCENARIO, "tdx_tcb_00806F050000_eval17")
    assert standard.content == load_body(SCENARIO, "tdx_tcb_00806F050000")
    assert fake.count("/tdx/certification/v4/tcb") == 2
    store = client.app.services.store
    assert store.keys("extra/") == ["extra/tcb/tdx/00806F050000/17"]
    assert store.keys("tcb/") == ["tcb/tdx/4/00806F050000/STANDARD"]


@pytest.mark.parametrize(
    "path,params",
    [
        ("/tdx/certification/v4/tcb", dict(EVAL17, update="standard")),
        ("/sgx/certification/v4/qe/identity", {"tcbEvaluationDataNumber": "17", "update": "early"}),
        ("/sgx/certification/v4/tcb", {"fmspc": "00906ED50000", "tcbEvaluationDataNumber": "-1"}),
        ("/sgx/certification/v4/tcb", {"fmspc": "00906ED50000", "tcbEvaluationDataNumber": "x"}),
        ("/tdx/certification/v4/tcb", {"fmspc": "00806F050000", "tcbEvaluationDataNumber": "1.5"}),
        ("/tdx/certification/v4/tcb", {"fmspc": "00806F050000", "tcbEvaluationDataNumber": ""}),
        ("/sgx/certification/v4/qve/identity", {"tcbEvaluationDataNumber": "1e3"}),
        ("/sgx/certification/v4/qae/identity", {"tcbEvaluationDataNumber": "99999999999"}),
        ("/tdx/certification/v4/qe/identity", {"tcbEvaluationDataNumber": "١٧"}),
    ],
)
def test_bad_or_conflicting_number_is_400_without_upstream(fake_pcs, make_client, path, params):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake)
    result = client.simulate_get(path, params=params)
    assert result.status_code == 400
    assert result.text == "Invalid request parameters."
    assert fake.calls == []


def test_pcs_410_for_a_number_is_410_and_not_cached(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    fake.add_response(
        "GET",
        "/tdx/certification/v4/tcb",
        {"fmspc": "00806F050000", "tcbEvaluationDataNumber": "3"},
        410,
    )
    client = make_client(fake)
    for _ in range(2):
        result = client.simulate_get(
            "/tdx/certification/v4/tcb",
            params={"fmspc": "00806F050000", "tcbEvaluationDataNumber": "3"},
        )
        assert result.status_code == 410
        assert result.text == EVALUATION_NUMBER_GONE
    assert fake.count("/tdx/certification/v4/tcb") == 2, "a 410 is neither cached nor remembered"
    assert client.app.services.store.keys() == []


def test_pinned_identity_must_carry_the_number_asked_for(fake_pcs, make_client):
    """A QE identity pinned to 17 is served (the recorded QE identity is of evaluation 17);
    the same body for number 18 is not what was asked: 502, nothing cached."""
    fake = fake_pcs(SCENARIO)
    qe = recorded("sgx_qe_identity")
    body = load_body(SCENARIO, qe)
    for number in ("17", "18"):
        fake.add_response(
            "GET",
            "/sgx/certification/v4/qe/identity",
            {"tcbEvaluationDataNumber": number},
            200,
            qe["headers"],
            body,
        )
    client = make_client(fake)
    ok = client.simulate_get(
        "/sgx/certification/v4/qe/identity", params={"tcbEvaluationDataNumber": "17"}
    )
    assert ok.status_code == 200 and ok.content == body
    wrong = client.simulate_get(
        "/sgx/certification/v4/qe/identity", params={"tcbEvaluationDataNumber": "18"}
    )
    assert wrong.status_code == 502
    assert client.app.services.store.keys("extra/") == ["extra/identity/qe/17"]
    # The standard identity is its own entry, fetched on its own.
    standard = client.simulate_get("/sgx/certification/v4/qe/identity")
    assert standard.content == body and fake.count("/qe/identity") == 3


def test_tampered_pinned_body_is_not_cached(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    entry = recorded("tdx_tcb_00806F050000_eval17")
    body = load_body(SCENARIO, entry).replace(b'"UpToDate"', b'"OutOfDate"', 1)
    fake.add_response("GET", "/tdx/certification/v4/tcb", dict(EVAL17), 200, entry["headers"], body)
    client = make_client(fake)
    assert client.simulate_get("/tdx/certification/v4/tcb", params=EVAL17).status_code == 502
    assert client.app.services.store.keys() == []


@pytest.mark.parametrize("mode", ["REQ", "OFFLINE"])
def test_req_and_offline_serve_only_what_was_uploaded(fake_pcs, make_client, mode):
    fake = fake_pcs(SCENARIO)
    lazy = make_client(fake)
    fill(lazy, fake)
    items, warnings = extra_collateral_items(lazy.app.services.store)
    assert warnings == [] and len(items) == 4
    fake.reset_calls()
    client = make_client(
        fake, cache_mode=mode, cache_dir=str(lazy.app.services.store.directory) + "-2", **TOKENS
    )
    for path, params, *_ in PINNED:
        assert client.simulate_get(path, params=params).status_code == 404
    assert fake.calls == []
    assert put(client, upload_with(items)).status_code == 200
    assert answers(client) == answers(lazy)
    assert fake.calls == []


def test_upload_file_round_trip_is_byte_identical(fake_pcs, make_client, tmp_path):
    """Export (the cache's extra entries as upload items), PUT into an empty OFFLINE dcapd:
    the same bytes and headers, no upstream. (The dcapd-admin export/import round trip is the
    same body through admin; its test belongs with the admin package.)"""
    fake = fake_pcs(SCENARIO)
    source = make_client(fake)
    fill(source, fake)
    calls = len(fake.calls)
    assert calls == 4
    items, _ = extra_collateral_items(source.app.services.store)
    assert {(i["tee"], i["endpoint"]) for i in items} == {
        ("tdx", "tcb"),
        ("sgx", "tcbevaluationdatanumbers"),
        ("tdx", "tcbevaluationdatanumbers"),
        ("sgx", "qae/identity"),
    }
    body = json.loads(json.dumps(upload_with(items)))  # as a file would carry it
    target = make_client(cache_mode="OFFLINE", cache_dir=str(tmp_path / "imported"), **TOKENS)
    assert put(target, body).status_code == 200
    assert answers(target) == answers(source)
    for (_, _, response_id, _), answer in zip(PINNED, answers(target)):
        assert answer[0] == load_body(SCENARIO, response_id)
    source_store, target_store = source.app.services.store, target.app.services.store
    assert source_store.keys("extra/") == target_store.keys("extra/")
    for key in source_store.keys("extra/"):
        a, b = source_store.get(key), target_store.get(key)
        assert (a.body, a.headers, a.content_type) == (b.body, b.headers, b.content_type)
    assert len(fake.calls) == calls
    # And exported again from the imported cache: the same items.
    assert extra_collateral_items(target_store)[0] == items


@pytest.mark.parametrize(
    "change,status",
    [
        (lambda item: item.update(body=item["body"].replace('"UpToDate"', '"OutOfDate"', 1)), 460),
        (lambda item: item.update(tcbEvaluationDataNumber=18), 400),
        (lambda item: item.update(fmspc="00906ED50000"), 400),
        (lambda item: item.update(endpoint="fmspcs"), 400),
        (lambda item: item.update(tcbEvaluationDataNumber=-1), 400),
        (lambda item: item.pop("issuer_chain"), 400),
    ],
)
def test_bad_extra_upload_items_are_refused_and_nothing_is_written(
    fake_pcs, make_client, tmp_path, change, status
):
    fake = fake_pcs(SCENARIO)
    source = make_client(fake)
    fill(source, fake)
    items, _ = extra_collateral_items(source.app.services.store)
    tcb = next(i for i in items if i["endpoint"] == "tcb")
    change(tcb)
    target = make_client(cache_mode="OFFLINE", cache_dir=str(tmp_path / "t"), **TOKENS)
    assert put(target, upload_with(items)).status_code == status
    assert target.app.services.store.keys() == []


def test_refresh_keeps_pinned_collateral_fresh_and_keeps_what_pcs_retired(
    fake_pcs, make_client, caplog
):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake, **TOKENS)
    fill(client, fake)
    refresher = client.app.services.refresher
    refresher.refresh_collateral()
    for path, *_ in PINNED:
        assert fake.count(path) == 2, path  # each asked again by the refresh
    # PCS retires evaluation number 17: the refresh succeeds and the signed entry stays.
    store = client.app.services.store
    before = store.cache.get("extra/tcb/tdx/00806F050000/17")
    fake.add_response("GET", "/tdx/certification/v4/tcb", dict(EVAL17), 410)
    with caplog.at_level(logging.INFO, logger="dcapd.refresh"):
        refresher.refresh_collateral()
    assert store.cache.get("extra/tcb/tdx/00806F050000/17") == before
    assert any("kept as cached" in r.getMessage() for r in caplog.records)
    status = client.simulate_get("/dcapd/status", headers={"admin-token": ADMIN}).json
    extra = [e for e in status["entries"] if e["kind"] == "extra"]
    assert len(extra) == 4 and all(e["next_update"] for e in extra)


def test_dcapd_admin_export_then_import_carries_pinned_collateral(fake_pcs, make_client, tmp_path):
    """The same round trip through dcapd-admin: export a cache, import it into an empty one;
    every pinned answer is byte-identical and nothing is fetched."""
    cache, imported, exported = tmp_path / "cache", tmp_path / "imported", tmp_path / "out.json"
    fake = fake_pcs(SCENARIO)
    source = make_client(fake, cache_dir=str(cache))
    fill(source, fake)
    before = answers(source)
    source.app.services.store.close()
    assert admin_main(["export", "-C", str(cache), "-o", str(exported)]) == 0
    items = json.loads(exported.read_text())["dcapd_extra_collateral"]
    assert len(items) == len(PINNED)
    assert admin_main(["import", "-i", str(exported), "-C", str(imported)]) == 0
    calls = len(fake.calls)
    target = make_client(cache_mode="OFFLINE", cache_dir=str(imported))
    assert answers(target) == before
    assert len(fake.calls) == calls
