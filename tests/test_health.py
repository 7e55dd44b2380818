"""Liveness and readiness for systemd and load balancers."""

from __future__ import annotations


def test_healthz_answers_without_auth_and_is_not_cached(make_client):
    client = make_client(cache_mode="OFFLINE")
    result = client.simulate_get("/healthz")
    assert result.status_code == 200 and result.json == {"status": "ok"}
    assert result.headers["cache-control"] == "no-store"


def test_readyz_follows_upstream_reachability(fake_pcs, make_client):
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    client = make_client(fake)
    assert client.simulate_get("/readyz").status_code == 200, "no contact yet: ready"
    fake.fail_with(close=True)
    assert client.simulate_get("/sgx/certification/v4/qe/identity").status_code == 502
    result = client.simulate_get("/readyz")
    assert result.status_code == 503
    assert result.json["problems"] == ["upstream: the last contact failed"]
    fake.fail_with()
    assert client.simulate_get("/sgx/certification/v4/qe/identity").status_code == 200
    assert client.simulate_get("/readyz").status_code == 200


def test_readyz_offline_ignores_upstream(make_client):
    client = make_client(cache_mode="OFFLINE")
    assert client.simulate_get("/readyz").json["status"] == "ready"
