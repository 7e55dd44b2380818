"""Refresh: newer Intel data replaces older, a failing refresh changes nothing, the scheduler
fires on its cron schedule and before entries expire, and only one process refreshes at once."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dcapd.schedule import CronSchedule, RefreshScheduler
from tests import pki
from tests.conftest import BACKENDS
from tests.fakepcs import PCS_FIXTURES, load_body, load_manifest
from tests.test_pckcert import CASES, PCKCERT, assert_pck_answer, query, raw_tcb, serve_platform
from tests.test_platforms import ADMIN, TOKENS
from tests.test_upload import snapshot

NEW = "2026-02-18_tdx-90C06F000000"
OLD_TCB = PCS_FIXTURES / NEW / "extra" / "tdx_tcb_90c06f000000_2026-02-01.json"
TDX_TCB = ("/tdx/certification/v4/tcb", {"fmspc": "90C06F000000"})
ADMIN_HEADERS = {"admin-token": ADMIN}


def recorded(scenario: str, response_id: str) -> tuple[dict, bytes]:
    response = next(r for r in load_manifest(scenario)["responses"] if r["id"] == response_id)
    return response, load_body(scenario, response)


def older_world(fake):
    """The fake PCS first serves older data: the 2026-02-01 TDX TCB info, and the platform
    PCK CRL of 2025-10-13 (a different scenario, same Intel CA)."""
    tcb, _ = recorded(NEW, "tdx_tcb_90C06F000000")
    fake.add_response("GET", TDX_TCB[0], TDX_TCB[1], 200, tcb["headers"], OLD_TCB.read_bytes())
    crl, crl_body = recorded("2025-10-19_tdx-00806F050000", "pckcrl_platform")
    fake.add_response(
        "GET",
        "/sgx/certification/v4/pckcrl",
        {"ca": "platform", "encoding": "der"},
        200,
        crl["headers"],
        crl_body,
    )


def warm(client):
    for path, params in [
        TDX_TCB,
        ("/sgx/certification/v4/pckcrl", {"ca": "platform"}),
        ("/tdx/certification/v4/qe/identity", {}),
        ("/sgx/certification/v4/rootcacrl", {}),
    ]:
        assert client.simulate_get(path, params=params).status_code == 200


def refresh(client, method="GET", **params):
    return client.simulate_request(
        method, "/sgx/certification/v4/refresh", params=params, headers=ADMIN_HEADERS
    )


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_refresh_replaces_older_entries_and_logs_what_changed(
    fake_pcs, make_client, caplog, method
):
    fake = fake_pcs(NEW)
    older_world(fake)
    client = make_client(fake, **TOKENS)
    warm(client)
    assert client.simulate_get(*TDX_TCB[:1], params=TDX_TCB[1]).content == OLD_TCB.read_bytes()
    fake.clear_added()  # PCS now has the newer data
    caplog.set_level(logging.INFO, logger="dcapd")
    result = refresh(client, method)
    assert result.status_code == 200 and result.text == "Operation successful."
    new_tcb = load_body(NEW, "tdx_tcb_90C06F000000")
    assert client.simulate_get(TDX_TCB[0], params=TDX_TCB[1]).content == new_tcb
    assert client.simulate_get(
        "/sgx/certification/v4/pckcrl", params={"ca": "platform", "encoding": "der"}
    ).content == load_body(NEW, "pckcrl_platform")
    assert (
        "tcb/tdx/4/90C06F000000/STANDARD: 2026-02-01T14:49:26Z (TCB eval 18) -> "
        "2026-02-18T10:58:51Z (TCB eval 18)" in caplog.text
    )
    assert "pckcrl/PLATFORM: 2025-10-13T10:45:32Z -> 2026-02-18T10:41:15Z" in caplog.text
    status = client.simulate_get("/dcapd/status", headers=ADMIN_HEADERS).json
    assert status["last_collateral_refresh"] is not None
    by_key = {e["key"]: e for e in status["entries"]}
    assert by_key["tcb/tdx/4/90C06F000000/STANDARD"]["issue_date"] == "2026-02-18T10:58:51Z"
    assert by_key["tcb/tdx/4/90C06F000000/STANDARD"]["next_update"] == "2026-03-20T10:58:51Z"


FAULTS = [  # (fault, the entry that fails, the status the refresh ends with)
    ({"status": 500, "paths": "/tcb"}, "tcb/tdx/4/90C06F000000/STANDARD", 503),
    ({"status": 404, "paths": "/pckcrl"}, "pckcrl/PLATFORM", 503),
    ({"close": True, "paths": "/IntelSGXRootCA.der"}, "rootcacrl", 502),
    ({"status": 503, "paths": "/tcb"}, "tcb/tdx/4/90C06F000000/STANDARD", 503),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fault,failing,status", FAULTS)
def test_failing_entry_is_skipped_left_byte_identical_and_the_rest_refreshed(
    fake_pcs, make_client, fault, failing, status
):
    """Issue 13: one entry that fails no longer keeps every other entry stale (this test
    asserted Intel's all-or-nothing refresh before): the others are refreshed, the failing
    one is left byte-identical, and the run reports it (an error status, the skipped key)."""
    fake = fake_pcs(NEW)
    older_world(fake)
    client = make_client(fake, **TOKENS)
    warm(client)
    fake.clear_added()
    store = client.app.services.store
    before = snapshot(store)
    fake.fail_with(**fault)  # PCS fails for one entry
    result = refresh(client)
    assert result.status_code == status
    after = snapshot(store)
    assert after[failing] == before[failing]
    newer = {
        "tcb/tdx/4/90C06F000000/STANDARD": load_body(NEW, "tdx_tcb_90C06F000000"),
        "pckcrl/PLATFORM": load_body(NEW, "pckcrl_platform"),
    }
    for key, body in newer.items():
        if key != failing:
            assert after[key] != before[key] and store.get(key).body == body, key
    status = client.simulate_get("/dcapd/status", headers=ADMIN_HEADERS).json
    assert status["last_collateral_refresh_skipped"] == [failing]
    fake.clear_fault()
    assert refresh(client).status_code == 200, "the next refresh catches up"
    assert store.get("pckcrl/PLATFORM").body == newer["pckcrl/PLATFORM"]
    assert (
        client.simulate_get("/dcapd/status", headers=ADMIN_HEADERS).json[
            "last_collateral_refresh_skipped"
        ]
        == []
    )


@pytest.mark.parametrize("fault,status", [({"close": True}, 502), ({"status": 500}, 503)])
def test_refresh_that_fetches_nothing_leaves_cache_byte_identical(
    fake_pcs, make_client, fault, status
):
    fake = fake_pcs(NEW)
    older_world(fake)
    client = make_client(fake, **TOKENS)
    warm(client)
    fake.clear_added()
    store = client.app.services.store
    before = snapshot(store)
    fake.fail_with(**fault)  # PCS down: every entry fails
    assert refresh(client).status_code == status
    assert snapshot(store) == before


def test_refresh_in_offline_mode_is_503(make_client):
    assert refresh(make_client(cache_mode="OFFLINE", **TOKENS)).status_code == 503


def test_refresh_type_must_be_certs(make_client):
    client = make_client(**TOKENS)
    assert refresh(client, type="CERTS").status_code == 400


def test_clients_are_served_while_a_refresh_runs(fake_pcs, make_client):
    fake = fake_pcs(NEW)
    older_world(fake)
    client = make_client(fake, **TOKENS)
    warm(client)
    fake.clear_added()
    fake.fail_with(delay=0.5, paths="/tcb")  # a slow PCS holds the refresh
    outcome = {}
    refreshing = threading.Thread(target=lambda: outcome.update(result=refresh(client)))
    refreshing.start()
    time.sleep(0.1)
    statuses, started = [], time.monotonic()
    while refreshing.is_alive():
        statuses.append(client.simulate_get(TDX_TCB[0], params=TDX_TCB[1]).status_code)
    refreshing.join()
    assert outcome["result"].status_code == 200
    assert statuses and set(statuses) == {200}
    assert time.monotonic() - started < 5


def test_certs_refresh_picks_up_a_new_cert_set(fake_pcs, make_client):
    """After a TCB recovery PCS issues a higher cert: refresh type=certs re-selects."""
    fake = fake_pcs()
    platform = pki.default_platform()
    lower_only = pki.TestPlatform(**{**platform.__dict__, "pck_certs": platform.pck_certs[1:]})
    serve_platform(fake, lower_only)
    client = make_client(fake, **TOKENS)
    params = query(*raw_tcb(*CASES[0][:2]))
    assert_pck_answer(client.simulate_get(PCKCERT, params=params), platform.pck_certs[1])
    fake.clear_added()
    serve_platform(fake, platform, not_available=True)
    assert refresh(client, type="certs", fmspc=f"[{platform.fmspc}]").status_code == 200
    assert_pck_answer(client.simulate_get(PCKCERT, params=params), platform.pck_certs[0])
    store = client.app.services.store
    certs = store.get_json(store.certs_key(platform.qeid, "0000"))["certs"]
    assert len(certs) == len(platform.pck_certs), "'Not available' entries filtered"
    # Other FMSPCs are left alone; a failing PCS leaves everything as it was.
    calls = fake.count("/pckcerts")
    assert refresh(client, type="certs", fmspc="00606A000000").status_code == 200
    assert fake.count("/pckcerts") == calls
    before = snapshot(store)
    fake.fail_with(status=404, paths="/pckcerts")
    assert refresh(client, type="certs").status_code == 404
    assert snapshot(store) == before


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_scheduler_fires_on_schedule_and_before_expiry(fake_pcs, make_client):
    start = dt.datetime(2026, 11, 27, 12, 0).timestamp()
    clock = FakeClock(start)
    fake = fake_pcs()
    serve_platform(fake)
    client = make_client(fake, **TOKENS)
    services = client.app.services
    services.refresher.clock = clock
    # A fresh TCB info: nextUpdate 30 days after now.
    tcb = pki.make_tcb_info(
        pki.default_platform().fmspc,
        pki.default_platform().levels,
        issue_date=dt.datetime.fromtimestamp(start, dt.timezone.utc),
        next_update=dt.datetime.fromtimestamp(start + 30 * 86400, dt.timezone.utc),
    )
    chain = pki.url_encoded_chain(pki.tcb_signing().pem, pki.root_ca().pem)
    fake.add_response(
        "GET", "/sgx/certification/v4/tcb", None, 200, {"TCB-Info-Issuer-Chain": chain}, tcb
    )
    fake.add_response("GET", "/IntelSGXRootCA.der", None, 200, {}, pki.make_crl(pki.root_ca()))
    assert (
        client.simulate_get(
            "/sgx/certification/v4/tcb", params={"fmspc": pki.default_platform().fmspc}
        ).status_code
        == 200
    )
    scheduler = RefreshScheduler(
        services.refresher, services.store, CronSchedule("0 0 1 * * *"), 24 * 3600, clock=clock
    )
    assert scheduler.tick() is None, "nothing due: fresh data, schedule tomorrow 01:00"
    clock.now = start + 29 * 86400 - 3600  # 25 h before nextUpdate: still nothing ...
    scheduler.next_scheduled = float("inf")
    assert scheduler.tick() is None
    clock.now = start + 29 * 86400 + 3600  # ... 23 h before: early refresh
    assert scheduler.tick() is True
    assert fake.count("/tcb") == 2
    clock.now += 60
    assert scheduler.tick() is None, "no second early refresh right after the first"
    scheduler.next_scheduled = clock.now + 10
    clock.now += 11
    fake.fail_with(close=True)
    before = snapshot(services.store)
    assert scheduler.tick() is False, "a failure is retried later"
    assert snapshot(services.store) == before
    assert scheduler.retry_at == pytest.approx(clock.now + 60)
    assert scheduler.tick() is None
    fake.fail_with()
    clock.now += 61
    assert scheduler.tick() is True
    assert scheduler.retry_at is None and scheduler.failures == 0


def test_scheduler_does_nothing_offline(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    services = client.app.services
    scheduler = RefreshScheduler(
        services.refresher, services.store, CronSchedule("* * * * * *"), 1e9
    )
    assert scheduler.tick() is None


@pytest.mark.parametrize(
    "text,now,expected",
    [
        ("0 0 1 * * *", (2026, 11, 27, 3, 0, 0), (2026, 11, 28, 1, 0, 0)),
        ("0 0 1 * * *", (2026, 11, 27, 0, 59, 59), (2026, 11, 27, 1, 0, 0)),
        ("*/15 * * * *", (2026, 11, 27, 3, 7, 30), (2026, 11, 27, 3, 15, 0)),
        ("30 5 * * 1", (2026, 11, 27, 3, 0, 0), (2026, 11, 30, 5, 30, 0)),  # Mondays
        ("0 0 12 1,15 * *", (2026, 11, 27, 3, 0, 0), (2026, 12, 1, 12, 0, 0)),
        ("0 0 0 29 2 *", (2026, 11, 27, 3, 0, 0), (2028, 2, 29, 0, 0, 0)),
    ],
)
def test_cron_schedule(text, now, expected):
    assert CronSchedule(text).next_after(dt.datetime(*now)) == dt.datetime(*expected)


@pytest.mark.parametrize("text", ["", "0 0 25 * * *", "* * *", "a b c d e", "0 0 1 31 2 *"])
def test_bad_cron_schedule(text):
    with pytest.raises(ValueError):
        CronSchedule(text).next_after(dt.datetime(2026, 1, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lock_lets_one_refresher_at_a_time(fake_pcs, make_client):
    fake = fake_pcs(NEW)
    client = make_client(fake, **TOKENS)
    warm(client)
    store = client.app.services.store
    assert store.try_lock("refresh", "another-process", 600, time.time())
    refresher = client.app.services.refresher
    with pytest.raises(Exception) as caught:
        refresher.refresh_collateral(wait=0)
    assert getattr(caught.value, "status_code", None) == 503
    store.unlock("refresh", "another-process")
    assert refresher.refresh_collateral(wait=0).kind == "collateral"
    # An expired lock (a crashed process) does not block forever.
    assert store.try_lock("refresh", "crashed", -1, time.time())
    assert refresher.refresh_collateral(wait=0).kind == "collateral"


def test_two_processes_on_one_cache_never_refresh_at_once(tmp_path, fake_pcs, make_config):
    fake = fake_pcs(NEW)
    fake.fail_with(delay=0.15, paths="/IntelSGXRootCA.der")
    config = make_config(pcs_url=fake.pcs_url, url_map=fake.url_map)
    settings = {
        name: getattr(config, name)
        for name in ("cache_dir", "pcs_url", "rootca_crl_url", "trusted_roots", "upstream_retries")
    }
    settings["url_map"] = fake.url_map
    settings["listen"] = "127.0.0.1:0"
    windows = tmp_path / "windows.jsonl"
    script = r"""
import json, sys, time
from dcapd.app import create_app
from dcapd.config import load_config
import dcapd.refresh as refresh
settings, out = json.loads(sys.argv[1]), sys.argv[2]
app = create_app(load_config(settings, environ={}))
original = refresh.Refresher._refresh_collateral
def recorded(self):
    start = time.time()
    try:
        return original(self)
    finally:
        with open(out, "a") as handle:
            handle.write(json.dumps([start, time.time()]) + "\n")
refresh.Refresher._refresh_collateral = recorded
for _ in range(3):
    app.services.refresher.refresh_collateral(wait=60)
"""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(settings), str(windows)],
            cwd=str(Path(__file__).resolve().parents[1]),
        )
        for _ in range(2)
    ]
    for process in processes:
        assert process.wait(timeout=120) == 0
    spans = sorted(json.loads(line) for line in windows.read_text().splitlines())
    assert len(spans) == 6
    for (_, end), (next_start, _) in zip(spans, spans[1:]):
        assert next_start >= end, "two refreshes overlapped"


def make_policy(class_ids) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    payload = {
        "policy_payload": json.dumps(
            {"policy_array": [{"environment": {"class_id": c}, "reference": {}} for c in class_ids]}
        )
    }
    return f"{b64(b'{}')}.{b64(json.dumps(payload).encode())}.c2ln"


SGX_CLASS = "3123ec35-8d38-4ea5-87a5-d6c48b567570"
TDX_CLASS = "9EEC018B-7481-4B1C-8E1A-9F7C0C8C777F"
TDQE_CLASS = "3769258c-75e6-4bc7-8d72-d2b0e224cad2"


def put_policy(client, policy, is_default, fmspc="00906ED50000", token=ADMIN):
    return client.simulate_put(
        "/sgx/certification/v4/appraisalpolicy",
        json={"policy": policy, "is_default": is_default, "fmspc": fmspc},
        headers={"admin-token": token},
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_appraisal_policies(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    first, second = make_policy([TDQE_CLASS, SGX_CLASS]), make_policy([TDX_CLASS])
    result = put_policy(client, first, True)
    assert result.status_code == 200
    assert result.text == hashlib.sha384(first.encode()).hexdigest()
    get = client.simulate_get(
        "/sgx/certification/v4/appraisalpolicy", params={"fmspc": "00906ed50000"}
    )
    assert get.status_code == 200 and get.text == first
    assert put_policy(client, second, False).status_code == 200
    assert (
        client.simulate_get(
            "/sgx/certification/v4/appraisalpolicy", params={"fmspc": "00906ED50000"}
        ).text
        == first
    )
    assert put_policy(client, second, True).status_code == 200, "a new default replaces it"
    assert (
        client.simulate_get(
            "/sgx/certification/v4/appraisalpolicy", params={"fmspc": "00906ED50000"}
        ).text
        == second
    )
    store = client.app.services.store
    records = [store.get_json(k) for k in store.keys("policy/00906ED50000/")]
    assert sorted((r["type"], r["is_default"]) for r in records) == [(0, False), (1, True)]
    assert (
        client.simulate_get(
            "/sgx/certification/v4/appraisalpolicy", params={"fmspc": "00606A000000"}
        ).status_code
        == 404
    )


@pytest.mark.parametrize(
    "policy,is_default,fmspc",
    [
        (make_policy(["00000000-0000-0000-0000-000000000000"]), True, "00906ED50000"),
        (make_policy([TDQE_CLASS]), True, "00906ED50000"),
        ("no-dots", True, "00906ED50000"),
        ("a.!!!.c", True, "00906ED50000"),
        (make_policy([SGX_CLASS]), "yes", "00906ED50000"),
        (make_policy([SGX_CLASS]), True, "00906ED5000"),
    ],
)
def test_bad_appraisal_policies_are_400(make_client, policy, is_default, fmspc):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    assert put_policy(client, policy, is_default, fmspc).status_code == 400
    assert client.app.services.store.keys() == []


def test_old_cache_serves_newer_collateral_after_the_schedule_fires(fake_pcs, make_client):
    fake = fake_pcs(NEW)
    older_world(fake)
    client = make_client(fake, **TOKENS)
    warm(client)
    fake.clear_added()  # PCS now has the newer data
    services = client.app.services
    clock = FakeClock(dt.datetime(2026, 11, 27, 12, 0).timestamp())
    scheduler = RefreshScheduler(
        services.refresher, services.store, CronSchedule("0 0 1 * * *"), 60.0, clock=clock
    )
    scheduler.last_early = clock.now  # only the schedule may fire here
    assert scheduler.tick() is None
    assert client.simulate_get(TDX_TCB[0], params=TDX_TCB[1]).content == OLD_TCB.read_bytes()
    clock.now = dt.datetime(2026, 11, 28, 1, 0, 1).timestamp()  # just past 01:00
    assert scheduler.tick() is True
    assert client.simulate_get(TDX_TCB[0], params=TDX_TCB[1]).content == load_body(
        NEW, "tdx_tcb_90C06F000000"
    )
    assert scheduler.next_scheduled == dt.datetime(2026, 11, 29, 1, 0).timestamp()


class _Waits:
    """Stands in for the scheduler's stop event: records each wait, stops on the second."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def wait(self, timeout: float) -> bool:
        self.timeouts.append(timeout)
        return len(self.timeouts) > 1

    def set(self) -> None:
        pass


def test_an_entry_expiring_at_start_is_refreshed_within_seconds_of_the_start(fake_pcs, make_client):
    """dcapd starts with a cached entry whose nextUpdate is already inside the margin: the
    first check comes seconds after the start (not one check interval later) and refreshes."""
    start = dt.datetime(2026, 11, 27, 12, 0).timestamp()
    clock = FakeClock(start)
    fake = fake_pcs()
    serve_platform(fake)
    client = make_client(fake, **TOKENS)
    services = client.app.services
    services.refresher.clock = clock
    tcb = pki.make_tcb_info(
        pki.default_platform().fmspc,
        pki.default_platform().levels,
        issue_date=dt.datetime.fromtimestamp(start - 29 * 86400, dt.timezone.utc),
        next_update=dt.datetime.fromtimestamp(start + 3600, dt.timezone.utc),  # in 1 h
    )
    chain = pki.url_encoded_chain(pki.tcb_signing().pem, pki.root_ca().pem)
    fake.add_response(
        "GET", "/sgx/certification/v4/tcb", None, 200, {"TCB-Info-Issuer-Chain": chain}, tcb
    )
    fake.add_response("GET", "/IntelSGXRootCA.der", None, 200, {}, pki.make_crl(pki.root_ca()))
    fmspc = pki.default_platform().fmspc
    assert (
        client.simulate_get("/sgx/certification/v4/tcb", params={"fmspc": fmspc}).status_code == 200
    )
    assert fake.count("/tcb") == 1
    # The process starts now: a scheduler with a 300 s periodic check, schedule at 01:00.
    scheduler = RefreshScheduler(
        services.refresher,
        services.store,
        CronSchedule("0 0 1 * * *"),
        24 * 3600,
        clock=clock,
        check_interval=300.0,
    )
    assert scheduler.next_check_in() <= 5.0, "the first check is seconds after the start"
    waits = _Waits()
    scheduler._stop = waits  # type: ignore[assignment]
    scheduler._run()  # one check, then "stopped"
    assert waits.timeouts[0] <= 5.0
    assert fake.count("/tcb") == 2, "refreshed at the first check"
    assert scheduler.last_early == clock.now
    # After that first check the periodic interval applies again.
    assert waits.timeouts[1] == scheduler.next_check_in() == 300.0


def test_next_scheduled_run_is_logged_at_start_in_utc(caplog):
    """A five-field cron schedule (minute first) works; start() logs its next run, ISO UTC."""
    now = dt.datetime(2026, 11, 27, 3, 0, 0).timestamp()  # local time, as cron reads it
    scheduler = RefreshScheduler(None, None, CronSchedule("30 5 * * *"), 60.0, clock=lambda: now)
    expected = dt.datetime(2026, 11, 27, 5, 30).astimezone(dt.timezone.utc)
    with caplog.at_level(logging.INFO, logger="dcapd"):
        scheduler.start()
        scheduler.stop(timeout=5)
    lines = [r.getMessage() for r in caplog.records if "refresh schedule" in r.getMessage()]
    assert lines == [f"refresh schedule: next run at {expected:%Y-%m-%dT%H:%M:%S}Z"]
