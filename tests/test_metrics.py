"""GET /metrics: after a known sequence of requests every counter moved by exactly what the
sequence implies; the freshness gauges equal the earliest nextUpdate of what is cached,
computed here from the collateral bytes; no secret or query value is ever a label."""

from __future__ import annotations

import calendar
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from cryptography import x509
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

import dcapd
from dcapd.metrics import PATH
from tests.fakepcs import load_body
from tests.servers import free_port
from tests.test_platforms import ADMIN, TOKENS, USER, register, registration
from tests.test_refresh import NEW, recorded

REPO = Path(__file__).resolve().parents[1]
V4 = "/sgx/certification/v4"
TDX_TCB = "/tdx/certification/v4/tcb"
TDX_FMSPC = "90C06F000000"
SECRET_PPID = "ab" * 384  # an encrypted PPID: must never reach a label
API_KEY = "0123456789abcdef0123456789abcdef"
ROOT_CRL_UPSTREAM = "/IntelSGXRootCA.der"


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of GET /metrics, by (name, sorted labels)."""
    reply = client.simulate_get(PATH)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def series(samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def upstream_route(path: str) -> str:
    """The test's own idea of an upstream route label: PCS paths as they are, the rest crl."""
    return path if "/certification/v" in path else "crl"


def next_update_of(key: str, body: bytes) -> float:
    """nextUpdate of a cached collateral body, read from the bytes (JSON or DER CRL)."""
    if key.startswith(("tcb/", "identity/")):
        document = json.loads(body)
        inner = document.get("tcbInfo") or document["enclaveIdentity"]
        return dt.datetime.fromisoformat(inner["nextUpdate"].replace("Z", "+00:00")).timestamp()
    return x509.load_der_x509_crl(body).next_update_utc.timestamp()


@pytest.fixture
def world(make_client, fake_pcs):
    fake = fake_pcs(NEW)
    client = make_client(fake, api_key=API_KEY, upstream_retries=1, **TOKENS)
    return fake, client


@pytest.mark.filterwarnings("ignore::wsgiref.validate.WSGIWarning")  # the unknown method
def test_counters_move_by_exactly_the_sequence(world):
    fake, client = world
    tcb = (TDX_TCB, {"fmspc": TDX_FMSPC})
    # A miss filled from upstream, then two hits.
    for _ in range(3):
        assert client.simulate_get(tcb[0], params=tcb[1]).status_code == 200
    # An upstream 404 (unknown FMSPC), answered 404.
    assert client.simulate_get(f"{V4}/tcb", params={"fmspc": "00000000AAAA"}).status_code == 404
    # A 503 then a 200: one retry.
    fake.fail_with(status=503, paths="/pckcrl", times=1, headers={"Retry-After": "0"})
    assert client.simulate_get(f"{V4}/pckcrl", params={"ca": "platform"}).status_code == 200
    # The root CA CRL (not a PCS route upstream), and an identity.
    assert client.simulate_get(f"{V4}/rootcacrl").status_code == 200
    assert client.simulate_get("/tdx/certification/v4/qe/identity").status_code == 200
    # A PCK certificate for an unknown platform: upstream pckcerts answers 404.
    pckcert = {
        "qeid": "00" * 16,
        "cpusvn": "00" * 16,
        "pcesvn": "0000",
        "pceid": "0000",
        "encrypted_ppid": SECRET_PPID,
    }
    assert client.simulate_get(f"{V4}/pckcert", params=pckcert).status_code == 404
    # A tampered TCB info: rejected by the integrity check, answered 502, not cached.
    response, body = recorded(NEW, "tdx_tcb_90C06F000000")
    tampered = body.replace(b'"tcbType":0', b'"tcbType":1')
    assert tampered != body
    fake.add_response(
        "GET", TDX_TCB, {"fmspc": TDX_FMSPC, "update": "early"}, 200, response["headers"], tampered
    )
    early = {"fmspc": TDX_FMSPC, "update": "early"}
    assert client.simulate_get(TDX_TCB, params=early).status_code == 502
    # Unknown paths and an unknown method collapse to one label value each.
    assert client.simulate_get(f"/no/such/{SECRET_PPID}").status_code == 404
    assert client.simulate_request("BREW", f"{V4}/tcb").status_code == 400
    calls_before_refresh = len(fake.calls)
    # A refresh that works, then one that fails (PCS down).
    admin = {"admin-token": ADMIN}
    assert client.simulate_get(f"{V4}/refresh", headers=admin).status_code == 200
    refresh_calls = fake.calls[calls_before_refresh:]
    fake.fail_with(status=500, paths=ROOT_CRL_UPSTREAM)
    assert client.simulate_get(f"{V4}/refresh", headers=admin).status_code == 503
    fake.fail_with()
    failed_refresh_calls = len(fake.calls) - calls_before_refresh - len(refresh_calls)

    samples = scrape(client)
    answered = series(samples, "dcapd_http_requests_total")
    expected = {
        (TDX_TCB, "GET", "200", "upstream"): 1,
        (TDX_TCB, "GET", "200", "hit"): 2,
        (f"{V4}/tcb", "GET", "404", "upstream"): 1,
        (f"{V4}/pckcrl", "GET", "200", "upstream"): 1,
        (f"{V4}/rootcacrl", "GET", "200", "upstream"): 1,
        ("/tdx/certification/v4/qe/identity", "GET", "200", "upstream"): 1,
        (f"{V4}/pckcert", "GET", "404", "upstream"): 1,
        (TDX_TCB, "GET", "502", "upstream"): 1,
        ("unmatched", "GET", "404", "none"): 1,
        (f"{V4}/refresh", "GET", "200", "none"): 1,
        (f"{V4}/refresh", "GET", "503", "none"): 1,  # Intel: a PCS non-200 in refresh is 503
    }
    brew = [labels for labels in answered if ("method", "other") in labels]
    assert len(brew) == 1 and answered[brew[0]] == 1
    del answered[brew[0]]
    got = {
        (d["route"], d["method"], d["status"], d["cache"]): v
        for d, v in ((dict(labels), v) for labels, v in answered.items())
    }
    assert got == expected

    # The latency histogram saw every request once, by route and cache outcome.
    counts = series(samples, "dcapd_http_request_duration_seconds_count")
    assert sum(counts.values()) == sum(expected.values()) + 1
    assert value(samples, "dcapd_http_request_duration_seconds_count", route=TDX_TCB, cache="hit")
    assert (
        0
        < value(samples, "dcapd_http_request_duration_seconds_sum", route=TDX_TCB, cache="hit")
        < 5
    )

    # Upstream: every attempt the fake PCS received, by route; the outcomes we know of.
    upstream = series(samples, "dcapd_upstream_requests_total")
    by_route: Counter[str] = Counter()
    for labels, count in upstream.items():
        by_route[dict(labels)["route"]] += int(count)
    assert by_route == Counter(upstream_route(call.path) for call in fake.calls)
    assert value(samples, "dcapd_upstream_requests_total", route=f"{V4}/pckcrl", outcome="5xx") == 1
    assert value(samples, "dcapd_upstream_requests_total", route=f"{V4}/tcb", outcome="404") == 1
    assert (
        value(samples, "dcapd_upstream_requests_total", route=f"{V4}/pckcerts", outcome="404") == 1
    )
    assert value(samples, "dcapd_upstream_requests_total", route="crl", outcome="5xx") == 2
    # Retries: the pckcrl 503, and the failed refresh's root CA CRL 500 (retried once).
    assert series(samples, "dcapd_upstream_retries_total") == {
        (("route", f"{V4}/pckcrl"),): 1,
        (("route", "crl"),): 1,
    }
    # The failing refresh asks for everything the working one did (a failing entry is
    # skipped, the rest refreshed), and the root CA CRL once more (its retry).
    assert failed_refresh_calls == len(refresh_calls) + 1
    assert series(samples, "dcapd_upstream_rejected_total") == {(("kind", "tcb"),): 1}

    # Refresh runs.
    assert value(samples, "dcapd_refresh_runs_total", kind="collateral", result="ok") == 1
    assert value(samples, "dcapd_refresh_runs_total", kind="collateral", result="error") == 1
    assert value(samples, "dcapd_refresh_duration_seconds_count", kind="collateral") == 2
    status = client.app.services.store.get_json(client.app.services.store.STATUS_KEY)
    assert value(
        samples, "dcapd_refresh_last_success_timestamp_seconds", kind="collateral"
    ) == pytest.approx(status["last_collateral_refresh"])
    assert time.time() - status["last_collateral_refresh"] < 60

    # No secret and no query value anywhere in the exposition.
    text = client.simulate_get(PATH).text
    for secret in (SECRET_PPID, API_KEY, ADMIN, USER, TOKENS["admin_token_sha512"], "00AAAA"):
        assert secret not in text


def test_freshness_gauges_are_the_earliest_next_update_of_what_is_cached(world):
    fake, client = world
    for path, params in [
        (TDX_TCB, {"fmspc": TDX_FMSPC}),
        (f"{V4}/pckcrl", {"ca": "platform"}),
        ("/tdx/certification/v4/qe/identity", {}),
        (f"{V4}/rootcacrl", {}),
    ]:
        assert client.simulate_get(path, params=params).status_code == 200
    # The refresh adds the identities the scenario has (several per kind, with several
    # nextUpdates: the gauge is the earliest).
    assert client.simulate_get(f"{V4}/refresh", headers={"admin-token": ADMIN}).status_code == 200
    samples = scrape(client)

    store = client.app.services.store
    expected: dict[str, float] = {}
    cached: Counter[str] = Counter()
    for key in store.keys():
        kind = key.partition("/")[0]
        cached[kind] += 1
        if kind in ("tcb", "identity", "pckcrl", "rootcacrl", "crl"):
            moment = next_update_of(key, store.get(key).body)
            expected[kind] = min(moment, expected.get(kind, moment))
    assert set(expected) == {"tcb", "identity", "pckcrl", "rootcacrl"}
    earliest = series(samples, "dcapd_collateral_next_update_earliest_timestamp_seconds")
    assert {dict(labels)["kind"]: v for labels, v in earliest.items()} == expected
    # The TDX TCB info is the fixture's own: its JSON nextUpdate, as Intel signed it.
    fixture = json.loads(load_body(NEW, recorded(NEW, "tdx_tcb_90C06F000000")[0]))
    signed = time.strptime(fixture["tcbInfo"]["nextUpdate"], "%Y-%m-%dT%H:%M:%SZ")
    assert expected["tcb"] == calendar.timegm(signed)
    # Entries already past their nextUpdate are counted, by kind.
    now = time.time()
    for kind in ("tcb", "identity", "pckcrl", "rootcacrl", "crl"):
        past = sum(
            1
            for key in store.keys(kind if kind == "rootcacrl" else kind + "/")
            if next_update_of(key, store.get(key).body) <= now
        )
        assert value(samples, "dcapd_collateral_expired_entries", kind=kind) == past
    # Entries by kind, and the build.
    entries = series(samples, "dcapd_cache_entries")
    assert {dict(labels)["kind"]: v for labels, v in entries.items()} == cached
    build = series(samples, "dcapd_build_info")
    assert list(build) == [
        (("cache_backend", "diskcache"), ("mode", "LAZY"), ("version", dcapd.__version__))
    ]


def test_queued_registrations_and_the_scan_interval(make_client, fake_pcs):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    first = scrape(client)
    assert value(first, "dcapd_registrations_queued", state="NEW") == 0
    for cpusvn in ("01" * 16, "02" * 16):
        assert register(client, registration(cpusvn, "0d00")).status_code == 200
    # Within the scan interval a scrape reuses the last scan of the cache ...
    assert value(scrape(client), "dcapd_registrations_queued", state="NEW") == 0
    # ... after it, the cache is read again.
    client.app.services.metrics.state.interval = 0
    samples = scrape(client)
    assert value(samples, "dcapd_registrations_queued", state="NEW") == 2
    assert value(samples, "dcapd_registrations_queued", state="NOT_AVAILABLE") == 0
    assert value(samples, "dcapd_cache_entries", kind="reg") == 2


def test_single_flight_wait_is_counted(make_client, fake_pcs):
    fake = fake_pcs(NEW)
    client = make_client(fake)
    fake.fail_with(delay=1.0, paths="/pckcrl")
    statuses = []

    def get() -> None:
        statuses.append(client.simulate_get(f"{V4}/pckcrl", params={"ca": "platform"}).status_code)

    leader = threading.Thread(target=get)
    leader.start()
    deadline = time.monotonic() + 5
    while fake.count("/pckcrl") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    follower = threading.Thread(target=get)
    follower.start()
    leader.join(10)
    follower.join(10)
    assert statuses == [200, 200]
    samples = scrape(client)
    assert fake.count("/pckcrl") == 1
    assert value(samples, "dcapd_single_flight_waits_total") == 1
    assert (
        value(
            samples,
            "dcapd_http_requests_total",
            route=f"{V4}/pckcrl",
            method="GET",
            status="200",
            cache="miss",
        )
        == 1
    )


def test_metrics_off_means_no_route_and_no_counting(make_client):
    client = make_client(metrics_enabled=False)
    assert client.app.services.metrics is None
    assert client.simulate_get(PATH).status_code == 404
    assert client.simulate_get("/healthz").status_code == 200


def test_two_apps_in_one_process_count_apart(make_client):
    first, second = make_client(), make_client()
    for _ in range(3):
        first.simulate_get("/healthz")
    second.simulate_get("/healthz")
    labels = dict(route="/healthz", method="GET", status="200", cache="none")
    assert value(scrape(first), "dcapd_http_requests_total", **labels) == 3
    assert value(scrape(second), "dcapd_http_requests_total", **labels) == 1


WORKER = textwrap.dedent(
    """
    import sys
    from falcon import testing
    from dcapd.app import create_app
    from dcapd.config import load_config
    app = create_app(load_config({"cache_dir": sys.argv[1], "tls": "off"}, environ={}))
    client = testing.TestClient(app)
    for _ in range(int(sys.argv[2])):
        assert client.simulate_get("/healthz").status_code == 200
    if sys.argv[3] == "scrape":
        sys.stdout.write(client.simulate_get("/metrics").text)
    app.services.close()
    """
)


def test_several_processes_sum_in_multiprocess_mode(tmp_path):
    """Worker processes (as gunicorn's) with PROMETHEUS_MULTIPROC_DIR: any one of them answers
    /metrics with every process's counts summed."""
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCAPD_")}
    env.update(PROMETHEUS_MULTIPROC_DIR=str(multiproc), PYTHONPATH=str(REPO))
    cache = str(tmp_path / "cache")

    def start(count: int, scrape_too: bool) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", WORKER, cache, str(count), "scrape" if scrape_too else "-"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )

    writers = [start(2, False), start(3, False)]
    for writer in writers:
        writer.communicate(timeout=60)
        assert writer.returncode == 0
    scraper = start(4, True)
    text = scraper.communicate(timeout=60)[0]
    assert scraper.returncode == 0
    totals = {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "dcapd_http_requests_total"
    }
    labels = dict(route="/healthz", method="GET", status="200", cache="none")
    assert totals[tuple(sorted(labels.items()))] == 2 + 3 + 4
    assert "dcapd_build_info" in text


@pytest.mark.skipif(shutil.which("gunicorn") is None, reason="gunicorn is in the test extra")
def test_gunicorn_workers_report_every_workers_requests(tmp_path, fake_pcs):
    """Two gunicorn workers with PROMETHEUS_MULTIPROC_DIR: while one is busy with a slow
    upstream fetch the other answers; both count, and either answers /metrics with the sum."""
    fake = fake_pcs(NEW)
    fake.fail_with(status=404, delay=2.0, paths="/pckcrl")
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCAPD_")}
    env.update(
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
        PYTHONPATH=str(REPO),
        DCAPD_CACHE_DIR=str(tmp_path / "cache"),
        DCAPD_PCS_URL=fake.pcs_url,
        DCAPD_URL_MAP=fake.url_map,
        DCAPD_UPSTREAM_RETRIES="0",
    )
    log = open(tmp_path / "gunicorn.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}"]
        + ["--graceful-timeout", "5", "dcapd.wsgi:application"],
        cwd=str(REPO),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(base + "/readyz", timeout=2)  # not /healthz: counted below
                break
            except (requests.ConnectionError, requests.Timeout):  # workers still starting
                assert server.poll() is None, (tmp_path / "gunicorn.log").read_text()
                assert time.monotonic() < deadline
                time.sleep(0.2)
        # One worker waits 2 s for upstream (a sync worker: one request at a time) ...
        slow = threading.Thread(
            target=lambda: requests.get(
                base + f"{V4}/pckcrl", params={"ca": "processor"}, timeout=30
            )
        )
        slow.start()
        while fake.count("/pckcrl") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        # ... so the other answers these.
        for _ in range(10):
            assert requests.get(base + "/healthz", timeout=10).status_code == 200
        slow.join(30)
        healthz = (("cache", "none"), ("method", "GET"), ("route", "/healthz"), ("status", "200"))
        pckcrl = (("cache", "upstream"), ("method", "GET"), ("route", f"{V4}/pckcrl"))
        pckcrl += (("status", "404"),)
        # Which worker counted what: prometheus-client's files, one per worker process.
        by_worker: dict[str, float] = {}
        for path in multiproc.glob("counter_*.db"):
            for key, count, _, _ in MmapedDict.read_all_values_from_file(str(path)):
                _, name, key_labels, _ = json.loads(key)
                counted = tuple(sorted(key_labels.items())) in (healthz, pckcrl)
                if name == "dcapd_http_requests_total" and counted and count:
                    by_worker[path.name] = by_worker.get(path.name, 0) + count
        assert len(by_worker) == 2, by_worker
        assert sum(by_worker.values()) == 10 + 1
        for _ in range(4):  # whichever worker answers the scrape
            text = requests.get(base + PATH, timeout=10).text
            samples = {
                tuple(sorted(s.labels.items())): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "dcapd_http_requests_total"
            }
            assert samples[healthz] == 10
            assert samples[pckcrl] == 1
    finally:
        server.terminate()
        server.wait(30)
        log.close()
