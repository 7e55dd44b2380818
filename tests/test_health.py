"""Liveness and readiness for systemd and load balancers."""

from __future__ import annotations

import re
from pathlib import Path


def test_healthz_answers_without_auth_and_is_not_cached(make_client):
    client = make_client(cache_mode="OFFLINE")
    result = client.simulate_get("/healthz")
    assert result.status_code == 200 and result.json == {"status": "ok"}
    assert result.headers["cache-control"] == "no-store"


def test_readyz_stays_ready_but_degraded_while_upstream_is_down(fake_pcs, make_client):
    """One PCS blip must not take a node with a readable cache out of the pool."""
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    client = make_client(fake)
    assert client.simulate_get("/readyz").json["status"] == "ready", "no contact yet"
    assert client.simulate_get("/sgx/certification/v4/qve/identity").status_code == 200
    fake.fail_with(close=True)
    assert client.simulate_get("/sgx/certification/v4/qe/identity").status_code == 502
    result = client.simulate_get("/readyz")
    assert result.status_code == 200
    assert result.json["status"] == "degraded" and result.json["problems"] == []
    (warning,) = result.json["warnings"]
    assert warning.startswith("upstream: the last contact failed at 20")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", result.json["upstream_last_failure"])
    # the cache still answers what it holds
    assert client.simulate_get("/sgx/certification/v4/qve/identity").status_code == 200
    fake.fail_with()
    assert client.simulate_get("/sgx/certification/v4/qe/identity").status_code == 200
    result = client.simulate_get("/readyz")
    assert result.status_code == 200 and result.json["status"] == "ready"


def test_readyz_is_503_when_the_cache_cannot_be_read(make_client):
    client = make_client(cache_mode="OFFLINE")
    assert client.simulate_get("/readyz").status_code == 200
    client.app.services.store.close()
    database = Path(client.app.services.config.cache_dir) / "cache.db"
    for stale in database.parent.glob("cache.db-*"):  # the WAL and its index
        stale.unlink()
    database.write_bytes(b"this is not an SQLite database" * 200)
    result = client.simulate_get("/readyz")
    assert result.status_code == 503
    assert result.json["status"] == "not ready"
    assert result.json["problems"][0].startswith("cache: cannot be read")


def test_readyz_offline_ignores_upstream(make_client):
    client = make_client(cache_mode="OFFLINE")
    assert client.simulate_get("/readyz").json["status"] == "ready"
