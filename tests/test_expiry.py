"""Expired collateral is flagged: the status view marks expired and soon-to-expire entries
and counts them; storing or serving expired collateral logs a rate-limited warning."""

from __future__ import annotations

import json
import logging
import time

from dcapd.freshness import ExpiryWarnings
from dcapd.store import Entry
from tests.fakepcs import load_body
from tests.test_platforms import ADMIN, TOKENS
from tests.uploads import intel_upload

RECORDING = "2025-05-27_intel-pcs-recording"
QE_IDENTITY = "/sgx/certification/v4/qe/identity"


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def test_status_marks_expired_and_expiring_entries_and_counts_them(fake_pcs, make_client):
    client = make_client(fake_pcs(RECORDING), refresh_margin_hours="24", **TOKENS)
    assert client.simulate_get(QE_IDENTITY).status_code == 200
    recorded = json.loads(load_body(RECORDING, "sgx_qe_identity"))["enclaveIdentity"]["nextUpdate"]
    store = client.app.services.store
    # two more identities, whose nextUpdate is soon (inside the margin) and far away
    soon, later = time.time() + 3600, time.time() + 30 * 86400
    for update, next_update in (("EARLY", soon), ("STANDARD", later)):
        key = store.identity_key("qve", 4, update)
        store.put(key, Entry(b"{}", meta={"next_update": _iso(next_update)}))

    status = client.simulate_get("/dcapd/status", headers={"admin-token": ADMIN}).json
    states = {e["key"]: (e["next_update"], e["state"]) for e in status["entries"]}
    assert states == {
        "identity/qe/4/STANDARD": (recorded, "expired"),  # the recording is from 2025
        "identity/qve/4/EARLY": (_iso(soon), "expiring"),
        "identity/qve/4/STANDARD": (_iso(later), "fresh"),
    }
    counts = status["counts"]
    assert counts["entries_by_state"] == {"expired": 1, "expiring": 1, "fresh": 1, "unknown": 0}
    assert counts["entries_by_kind"] == {"identity": 3}
    assert counts["platforms"] == 0


def test_expiry_warnings_are_rate_limited_per_key(caplog):
    now = [1_000_000.0]
    warnings = ExpiryWarnings(logging.getLogger("test.expiry"), 3600, clock=lambda: now[0])
    expired = {"next_update": "1970-01-02T00:00:00Z"}
    fresh = {"next_update": "2999-01-01T00:00:00Z"}
    parsed = []

    def meta(document):
        def read():
            parsed.append(document)
            return document

        return read

    tcb, identity = "tcb/sgx/4/00906ED50000/STANDARD", "identity/qe/4/STANDARD"
    with caplog.at_level(logging.WARNING, logger="test.expiry"):
        assert warnings.check(tcb, meta(expired), "served")
        assert warnings.check(tcb, meta(expired), "served")
        assert len(parsed) == 1, "a hit within the recheck time reads no metadata"
        assert warnings.check(identity, meta(expired), "stored")
        now[0] += 3601
        assert warnings.check(tcb, meta(expired), "served")
        # a refreshed entry is judged anew at once
        assert not warnings.check(identity, meta(fresh), "stored", fresh=True)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"served {tcb}",
        f"stored {identity}",
        f"served {tcb}",
    ]


def test_expired_collateral_is_warned_about_when_cached_served_and_uploaded(
    fake_pcs, make_client, caplog
):
    """The recordings are past their nextUpdate: fetching and serving them each say so once
    (per key and action), naming the key and its nextUpdate; an upload of them too."""
    client = make_client(fake_pcs(RECORDING))
    with caplog.at_level(logging.WARNING, logger="dcapd.expiry"):
        for _ in range(3):
            assert client.simulate_get(QE_IDENTITY).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "dcapd.expiry"]
    recorded = json.loads(load_body(RECORDING, "sgx_qe_identity"))["enclaveIdentity"]["nextUpdate"]
    assert lines == [
        f"cached identity/qe/4/STANDARD: expired (nextUpdate {recorded}); clients verifying "
        "with it may reject quotes",
        f"served identity/qe/4/STANDARD: expired (nextUpdate {recorded}); clients verifying "
        "with it may reject quotes",
    ]


def test_an_upload_of_expired_collateral_is_warned_about(make_client, caplog):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    with caplog.at_level(logging.WARNING, logger="dcapd.expiry"):
        result = client.simulate_put(
            "/sgx/certification/v4/platformcollateral",
            body=json.dumps(intel_upload()),
            headers={"admin-token": ADMIN, "Content-Type": "application/json"},
        )
    assert result.status_code == 200, result.text
    uploaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("uploaded ")]
    assert uploaded and all(": expired (nextUpdate 20" in line for line in uploaded)
    assert any(line.startswith("uploaded tcb/sgx/4/") for line in uploaded)
