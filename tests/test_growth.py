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
from tests import pki
from tests.conftest import INTEL_ROOT_CDP
from tests.fakepcs import load_body
from tests.test_pckcert import CASES, PCKCERT, assert_pck_answer, query, raw_tcb, serve_platform
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


# --- answers selected for made-up raw TCBs: bounded per platform, constant work per request --

PLATFORM = pki.default_platform()
QEID, PCEID = PLATFORM.qeid.upper(), PLATFORM.pceid


def made_up(i: int) -> tuple[str, str]:
    """A raw TCB above every level of the test platform (selects its highest certificate)."""
    components = (9, 9, 9, 9, 255, 255, 9, 0, 0, 0, 0, 0, 0, 0, (i >> 8) & 255, i & 255)
    return raw_tcb(components, 20)


class WriteLog:
    """Every cache write and deletion of a store, as (key, bytes) and keys."""

    def __init__(self, store):
        self.sets: list[tuple[str, int]] = []
        self.deletes: list[str] = []
        cache = store.cache
        set_, delete = cache.set, cache.delete

        def recording_set(key, value, *args, **kwargs):
            self.sets.append((key, len(value)))
            return set_(key, value, *args, **kwargs)

        def recording_delete(key, *args, **kwargs):
            self.deletes.append(key)
            return delete(key, *args, **kwargs)

        cache.set, cache.delete = recording_set, recording_delete

    def take(self) -> tuple[list[tuple[str, int]], list[str]]:
        taken = self.sets, self.deletes
        self.sets, self.deletes = [], []
        return taken


def footprint(store) -> tuple[int, int, int]:
    """(answers, ring records, bytes) the platform holds in the cache."""
    answers = store.keys(f"pckcert/{QEID}/{PCEID}/")
    records = store.keys(f"rawtcbs/{QEID}/{PCEID}")
    size = sum(len(store.cache.get(key)) for key in answers + records)
    return len(answers), len(records), size


def test_5000_made_up_raw_tcbs_leave_the_platform_bounded(fake_pcs, make_client):
    """Issue 13: each made-up raw TCB stored a 4.7 KB answer and rewrote the platform's whole
    raw-TCB list (4,000 requests: 192 KiB -> 23 MB, 2.7 -> 8.8 ms per request)."""
    bound = 64
    fake = fake_pcs()
    serve_platform(fake)
    client = make_client(fake, selected_per_platform=bound)
    store = client.app.services.store
    registered = query(*raw_tcb(*CASES[0][:2]))
    assert client.simulate_get(PCKCERT, params=registered).status_code == 200  # fetch
    calls = len(fake.calls)
    log = WriteLog(store)
    per_request = []
    for i in range(5000):
        result = client.simulate_get(PCKCERT, params=query(*made_up(i)))
        assert result.status_code == 200
        per_request.append(log.take())
        if i < bound:
            first_footprint = footprint(store)
    assert len(fake.calls) == calls, "selected locally, never asking PCS"
    answer_key = f"pckcert/{QEID}/{PCEID}/"
    for i, (sets, deletes) in enumerate(per_request):
        # The answer, the ring slot and the ring head: nothing that grows with the requests.
        assert [key.startswith(answer_key) for key, _ in sets] == [True, False, False], i
        assert sum(size for key, size in sets if not key.startswith(answer_key)) < 300, i
        # Once the ring is full, each new answer drops the oldest one.
        assert deletes == (
            [] if i < bound else [store.pckcert_key(QEID, PCEID, *made_up(i - bound))]
        )
    first = [sum(size for _, size in sets) for sets, _ in per_request[:200]]
    last = [sum(size for _, size in sets) for sets, _ in per_request[-200:]]
    assert max(last) <= max(first) + 8, "bytes written per request do not grow"
    answers, records, size = footprint(store)
    assert answers == bound + 1, "the bound, and the registered raw TCB"
    assert records == bound + 2, "the ring's slots and head, and the platform's record"
    assert size <= first_footprint[2] + 1000, (size, first_footprint)
    # The newest answers are cached; the oldest one is selected again, identically.
    newest = client.simulate_get(PCKCERT, params=query(*made_up(4999)))
    assert store.get(store.pckcert_key(QEID, PCEID, *made_up(4999))) is not None
    oldest = client.simulate_get(PCKCERT, params=query(*made_up(0)))
    assert oldest.status_code == 200 and oldest.content == newest.content
    assert client.simulate_get(PCKCERT, params=registered).status_code == 200
    assert store.get(store.pckcert_key(QEID, PCEID, *raw_tcb(*CASES[0][:2]))) is not None


def test_certs_refresh_and_platform_list_cover_the_selected_raw_tcbs(fake_pcs, make_client):
    """What Intel's PCCS serves: GET /platforms lists, and refresh type=certs re-selects, every
    raw TCB seen (the registered ones and the selected ones within the bound)."""
    fake = fake_pcs()
    lower_only = pki.TestPlatform(**{**PLATFORM.__dict__, "pck_certs": PLATFORM.pck_certs[1:]})
    serve_platform(fake, lower_only)
    client = make_client(fake, selected_per_platform=4, **TOKENS)
    assert client.simulate_get(PCKCERT, params=query(*raw_tcb(*CASES[2][:2]))).status_code == 200
    for i in range(6):
        assert_pck_answer(
            client.simulate_get(PCKCERT, params=query(*made_up(i))), PLATFORM.pck_certs[1]
        )
    listed = client.simulate_get(
        f"{V4}/platforms", params={"source": "[]"}, headers={"admin-token": ADMIN}
    ).json
    assert [(row["cpu_svn"], row["pce_svn"]) for row in listed] == [
        raw_tcb(*CASES[2][:2]),
        *[made_up(i) for i in range(2, 6)],
    ]
    fake.clear_added()
    serve_platform(fake, PLATFORM)  # a TCB recovery: PCS now has the higher certificate
    result = client.simulate_get(
        f"{V4}/refresh", params={"type": "certs"}, headers={"admin-token": ADMIN}
    )
    assert result.status_code == 200
    calls = len(fake.calls)
    for i in range(2, 6):  # re-selected by the refresh: cache hits with the new answer
        assert_pck_answer(
            client.simulate_get(PCKCERT, params=query(*made_up(i))), PLATFORM.pck_certs[0]
        )
    assert len(fake.calls) == calls
    store = client.app.services.store
    assert store.get(store.pckcert_key(QEID, PCEID, *made_up(0))) is None, "dropped earlier"


def test_a_smaller_bound_trims_the_ring_on_the_next_new_raw_tcb(fake_pcs, make_client, tmp_path):
    fake = fake_pcs()
    serve_platform(fake)
    cache = str(tmp_path / "shared-cache")
    client = make_client(fake, cache_dir=cache, selected_per_platform=8)
    for i in range(8):
        assert client.simulate_get(PCKCERT, params=query(*made_up(i))).status_code == 200
    client.app.services.store.close()
    smaller = make_client(fake, cache_dir=cache, selected_per_platform=3)
    store = smaller.app.services.store
    assert smaller.simulate_get(PCKCERT, params=query(*made_up(8))).status_code == 200
    # made_up(0) fetched the platform: it is in the platform's record, not in the ring. The
    # ring held 1..7; trimmed to the newest 3 (5, 6, 7), then 8 took the oldest one's slot.
    kept = {key.split("/")[3] for key in store.keys(f"pckcert/{QEID}/{PCEID}/")}
    assert kept == {made_up(i)[0] for i in (0, 6, 7, 8)}
    assert len(store.keys(f"rawtcbs/{QEID}/{PCEID}/selected/")) == 3
