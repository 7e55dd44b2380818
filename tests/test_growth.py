"""Issue 13 item 3 / issue 14 item 6: unauthenticated requests cannot grow the cache without
bound, and one entry that no longer downloads cannot block the refresh of the others.

- answers selected locally for made-up raw TCBs are kept per platform up to
  ``[cache] selected_per_platform``, and adding one writes a constant number of bytes;
- every spelling of a CRL distribution point is one key and one upstream fetch; Intel's root
  CA CRL distribution point is ``rootcacrl``'s entry, fetched from ``rootca_crl_url``;
- a refresh skips a CRL entry that fails and refreshes the rest; dcapd-admin's Store side can
  list and delete that entry;
- an upload's ``rootcacrl_cdp`` must be an Intel root CA CRL distribution point.

Everything runs through the falcon test client against a fake PCS on 127.0.0.1.
"""

from __future__ import annotations

import json

import pytest

from dcapd.pcsurls import canonical_crl_url, is_allowed_crl_url
from dcapd.store import Entry
from tests.conftest import INTEL_ROOT_CDP
from tests.fakepcs import load_body
from tests.test_platforms import ADMIN, TOKENS
from tests.test_upload import snapshot
from tests.uploads import upload_from_scenario

SCENARIO = "2025-05-27_intel-pcs-recording"
V4 = "/sgx/certification/v4"
PCK_CDP = (
    "https://api.trustedservices.intel.com/sgx/certification/v4/pckcrl?ca=processor&encoding=der"
)

# --- CRL distribution points: one key and one fetch per point, whatever the spelling ---------

PCK_CDP_SPELLINGS = [
    PCK_CDP,
    "HTTPS://API.TRUSTEDSERVICES.INTEL.COM/sgx/certification/v4/pckcrl?ca=processor&encoding=der",
    "https://api.trustedservices.intel.com:443/sgx/certification/v4/pckcrl?ca=processor&encoding=der",
    "https://Api.TrustedServices.Intel.com:443/sgx/certification/v4/pckcrl?encoding=der&ca=processor",
    "https://api.trustedservices.intel.com/sgx/certification/v4/pckcrl?ca=PROCESSOR&encoding=DER",
]
ROOT_CDP_SPELLINGS = [
    INTEL_ROOT_CDP,
    "HTTPS://CERTIFICATES.TRUSTEDSERVICES.INTEL.COM/IntelSGXRootCA.der",
    "https://certificates.trustedservices.intel.com:443/IntelSGXRootCA.der",
    "https://Certificates.TrustedServices.Intel.Com:443/IntelSGXRootCA.der",
    f"{INTEL_ROOT_CDP}?",
]


@pytest.mark.parametrize(
    "uri",
    [
        # What Intel's regular expressions admit but no Intel collateral names: each would be
        # one more cache key (PCS and the CRL host ignore what follows the path).
        f"{INTEL_ROOT_CDP}?1",
        "https://certificates.trustedservices.intel.com/IntelSGXRootCA.a1",
        "https://x-certificates.trustedservices.intel.com/IntelSGXRootCA.der",
        "https://a.api.trustedservices.intel.com/sgx/certification/v4/pckcrl?ca=processor",
        "https://api.trustedservices.intel.com/sgx/certification/v12/pckcrl?ca=processor",
        "https://api.trustedservices.intel.com/sgx/certification/v4/pckcrl",
        "https://api.trustedservices.intel.com/sgx/certification/v4/pckcrl?ca=processor&x=1",
        "https://api.trustedservices.intel.com/sgx/certification/v4/pckcrl?ca=processor&ca=platform",
        "https://api.trustedservices.intel.com/sgx/certification/v4/pckcrl?ca=processor&",
        "https://api.trustedservices.intel.com/sgx/certification/v4/pckcrl?ca=other",
        "https://api.trustedservices.intel.com/sgx/certification/v4/pckcrl?ca=processor&encoding=pem",
        "https://api.trustedservices.intel.com/sgx/certification/v4/pckcrl?CA=processor",
    ],
)
def test_allow_list_admits_only_what_intels_collateral_can_name(uri):
    assert not is_allowed_crl_url(uri)


def test_canonical_spellings():
    assert {canonical_crl_url(uri) for uri in ROOT_CDP_SPELLINGS} == {INTEL_ROOT_CDP}
    assert {canonical_crl_url(uri) for uri in PCK_CDP_SPELLINGS} == {PCK_CDP}
    sandbox = "https://sbx-certificates.trustedservices.intel.com/IntelSGXRootCA.der"
    assert canonical_crl_url(sandbox.upper().replace("INTELSGXROOTCA.DER", "IntelSGXRootCA.der"))
    assert canonical_crl_url(sandbox) == sandbox


def crl(client, uri):
    return client.simulate_get(f"{V4}/crl", params={"uri": uri})


def test_pck_crl_spellings_make_one_fetch_and_one_key(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake)
    # A PCK CRL fetched by URI is checked against the PCK CA chain cached with the PCK CRL.
    assert client.simulate_get(f"{V4}/pckcrl", params={"ca": "processor"}).status_code == 200
    fake.reset_calls()
    der = load_body(SCENARIO, "pckcrl_processor")
    for _ in range(3):
        for uri in PCK_CDP_SPELLINGS:
            result = crl(client, uri)
            assert result.status_code == 200, uri
            assert result.content == der
            assert result.headers["content-type"] == "application/pkix-crl"
    assert [(c.path, c.query) for c in fake.calls] == [
        ("/sgx/certification/v4/pckcrl", {"ca": ["processor"], "encoding": ["der"]})
    ]
    assert client.app.services.store.keys("crl/") == [f"crl/{PCK_CDP}"]


def test_root_ca_cdp_and_rootcacrl_are_one_entry_and_one_fetch(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake)  # rootca_crl_url = Intel's, url_map sends it to the fake
    der = load_body(SCENARIO, "root_ca_crl")
    for uri in ROOT_CDP_SPELLINGS:
        result = crl(client, uri)
        assert result.status_code == 200
        # Byte-identical to what crl?uri= served before: the DER, as application/pkix-crl.
        assert result.content == der
        assert result.headers["content-type"] == "application/pkix-crl"
    root = client.simulate_get(f"{V4}/rootcacrl")
    # ... and rootcacrl still serves the hex of the same DER, labelled as Intel's does.
    assert root.status_code == 200 and root.content == der.hex().encode()
    assert root.headers["content-type"] == "application/pkix-crl"
    assert fake.count("/IntelSGXRootCA.der") == 1
    assert client.app.services.store.keys() == ["rootcacrl"]


def test_root_ca_cdp_is_fetched_from_the_configured_rootca_crl_url(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    der = load_body(SCENARIO, "root_ca_crl")
    fake.add_response("GET", "/mirror/sgx-root.crl", None, 200, {}, der)
    client = make_client(fake, rootca_crl_url=fake.url("/mirror/sgx-root.crl"))
    assert crl(client, ROOT_CDP_SPELLINGS[1]).content == der
    assert client.simulate_get(f"{V4}/rootcacrl").content == der.hex().encode()
    assert [c.path for c in fake.calls] == ["/mirror/sgx-root.crl"], "the operator's mirror"


def test_root_ca_cdp_in_offline_mode_is_served_from_rootcacrl(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    upload = upload_from_scenario(SCENARIO)
    put = client.simulate_put(
        f"{V4}/platformcollateral", body=json.dumps(upload), headers={"admin-token": ADMIN}
    )
    assert put.status_code == 200, put.text
    assert client.app.services.store.keys("crl/") == [], "rootcacrl_cdp is rootcacrl's entry"
    der = bytes.fromhex(upload["collaterals"]["rootcacrl"])
    assert crl(client, ROOT_CDP_SPELLINGS[2]).content == der


def test_crl_cached_under_an_old_spelling_is_still_served(make_client):
    """A cache written before keys were canonical keeps the exact string as key."""
    client = make_client(cache_mode="OFFLINE")
    store = client.app.services.store
    old_spelling = ROOT_CDP_SPELLINGS[1]
    der = b"0\x03\x02\x01\x00"
    store.put(store.legacy_crl_key(old_spelling), Entry(der, {}, "application/pkix-crl"))
    assert crl(client, old_spelling).content == der
    assert crl(client, INTEL_ROOT_CDP).status_code == 404  # OFFLINE, not cached under it


# --- refresh: a failing entry is skipped; the Store can list and delete it ------------------


def test_refresh_skips_a_crl_that_no_longer_downloads_and_admin_can_delete_it(
    fake_pcs, make_client
):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake, **TOKENS)
    assert client.simulate_get(f"{V4}/pckcrl", params={"ca": "processor"}).status_code == 200
    assert crl(client, PCK_CDP).status_code == 200
    assert client.simulate_get(f"{V4}/rootcacrl").status_code == 200
    store = client.app.services.store
    # An entry no refresh can download again: a distribution point outside the allow-list,
    # as an upload's unchecked rootcacrl_cdp could store before.
    broken = "crl/https://mirror.example/IntelSGXRootCA.der"
    store.put(broken, store.get("rootcacrl"))
    before = snapshot(store)
    fake.reset_calls()
    result = client.simulate_get(f"{V4}/refresh", headers={"admin-token": ADMIN})
    assert result.status_code == 502
    assert snapshot(store)[broken] == before[broken]
    # Everything else was fetched again (and is as PCS has it).
    assert fake.count("/pckcrl") == 2 and fake.count("/IntelSGXRootCA.der") == 1
    status = client.simulate_get("/dcapd/status", headers={"admin-token": ADMIN}).json
    assert status["last_collateral_refresh_skipped"] == [broken]
    assert status["last_collateral_refresh"] is not None
    # dcapd-admin's side: list the CRL entries, delete the broken one.
    listed = dict(store.entries("crl/"))
    assert set(listed) == {broken, f"crl/{PCK_CDP}"}
    assert listed[broken].meta["source"]
    assert store.delete(broken) is True
    assert store.delete(broken) is False
    assert client.simulate_get(f"{V4}/refresh", headers={"admin-token": ADMIN}).status_code == 200


def test_refresh_replaces_old_spellings_by_the_canonical_entry(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    client = make_client(fake, **TOKENS)
    assert client.simulate_get(f"{V4}/pckcrl", params={"ca": "processor"}).status_code == 200
    store = client.app.services.store
    der = load_body(SCENARIO, "pckcrl_processor")
    root = load_body(SCENARIO, "root_ca_crl")
    for spelling, body in ((PCK_CDP_SPELLINGS[1], der), (ROOT_CDP_SPELLINGS[2], root)):
        store.put(store.legacy_crl_key(spelling), Entry(body, {}, "application/pkix-crl", {}))
    fake.reset_calls()
    assert client.simulate_get(f"{V4}/refresh", headers={"admin-token": ADMIN}).status_code == 200
    assert fake.count("/pckcrl") == 2 and fake.count("/IntelSGXRootCA.der") == 1
    assert sorted(store.keys("crl/")) == [f"crl/{PCK_CDP}"]
    assert store.get("rootcacrl").body == root
    assert crl(client, PCK_CDP_SPELLINGS[1]).content == der


# --- upload: rootcacrl_cdp is checked ------------------------------------------------------


@pytest.mark.parametrize(
    "cdp",
    [
        "https://evil.example/IntelSGXRootCA.der",
        "http://certificates.trustedservices.intel.com/IntelSGXRootCA.der",
        "https://mirror.local/root.crl",
        PCK_CDP,  # a PCK CRL distribution point: not where a root CA CRL is published
        f"{INTEL_ROOT_CDP}?x",
    ],
)
def test_upload_with_a_foreign_rootcacrl_cdp_is_400_and_writes_nothing(make_client, cdp):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    store = client.app.services.store
    before = snapshot(store)
    upload = upload_from_scenario(SCENARIO)
    upload["collaterals"]["rootcacrl_cdp"] = cdp
    put = client.simulate_put(
        f"{V4}/platformcollateral", body=json.dumps(upload), headers={"admin-token": ADMIN}
    )
    assert put.status_code == 400
    assert put.text == "Invalid request parameters."
    assert snapshot(store) == before


def test_upload_with_the_sandbox_root_cdp_is_stored_under_it(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    upload = upload_from_scenario(SCENARIO)
    sandbox = "https://SBX-certificates.trustedservices.intel.com:443/IntelSGXRootCA.der"
    upload["collaterals"]["rootcacrl_cdp"] = sandbox
    put = client.simulate_put(
        f"{V4}/platformcollateral", body=json.dumps(upload), headers={"admin-token": ADMIN}
    )
    assert put.status_code == 200, put.text
    assert client.app.services.store.keys("crl/") == [
        "crl/https://sbx-certificates.trustedservices.intel.com/IntelSGXRootCA.der"
    ]
