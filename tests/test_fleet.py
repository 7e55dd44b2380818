"""Several dcapd nodes on one PostgreSQL database and no shared directory: each node is a
real ``dcapd`` process (tests/test_crash.py's launcher) on its own 127.0.0.1 port.

One upstream call for a miss asked of every node at once; one refresh when every node's
schedule fires; what one node writes, the others serve as soon as it has answered; a node
killed mid-write or mid-refresh leaves old or new data and no lock that outlives its lease.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import requests

from dcapd.backends.postgres import PostgresBackend
from dcapd.store import Store
from tests import pki
from tests.conftest import INTEL_ROOT_CDP
from tests.fakepcs import load_body
from tests.test_crash import (
    Dcapd,
    check_platform_answers,
    entries,
    world,
)
from tests.test_pckcert import CASES, raw_tcb
from tests.test_platforms import ADMIN, TOKENS, USER, read_platforms, register, registration
from tests.test_refresh import (
    NEW,
    OLD_TCB,
    SGX_CLASS,
    TDQE_CLASS,
    TDX_CLASS,
    TDX_TCB,
    make_policy,
    older_world,
    put_policy,
)
from tests.uploads import intel_upload

pytestmark = pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")

SCENARIO = "2025-05-27_intel-pcs-recording"
QE = "/sgx/certification/v4/qe/identity"
PLATFORM = pki.default_platform()


class Reply:
    """What the shared test helpers read from a falcon test client's result."""

    def __init__(self, response: requests.Response):
        self.status_code = response.status_code
        self.content = response.content
        self.text = response.text
        self.headers = response.headers
        self._response = response

    @property
    def json(self):
        return self._response.json()


class Node:
    """A running dcapd on the shared database, spoken to like a falcon TestClient."""

    def __init__(self, tmp_path: Path, roots: str, url: str, **env: str):
        settings = dict(
            DCAPD_CACHE_URL=url,
            DCAPD_USER_TOKEN_SHA512=TOKENS["user_token_sha512"],
            DCAPD_CACHE_TIMEOUT="3",
        )
        settings.update(env)
        self.dcapd = Dcapd(tmp_path, None, roots, **settings)
        self.url = self.dcapd.url
        self.session = requests.Session()
        self.session.trust_env = False

    def simulate_request(
        self, method, path, params=None, body=None, headers=None, json=None
    ) -> Reply:
        return Reply(
            self.session.request(
                method,
                self.url + path,
                params=params,
                data=body,
                json=json,
                headers=headers,
                timeout=60,
            )
        )

    def simulate_get(self, path, params=None, headers=None) -> Reply:
        return self.simulate_request("GET", path, params=params, headers=headers)

    def simulate_put(self, path, params=None, body=None, headers=None, json=None) -> Reply:
        return self.simulate_request("PUT", path, params, body, headers, json)

    def simulate_post(self, path, params=None, body=None, headers=None) -> Reply:
        return self.simulate_request("POST", path, params=params, body=body, headers=headers)

    def log(self) -> str:
        return self.dcapd.log.read_text(errors="replace")

    def stop(self) -> None:
        self.session.close()
        self.dcapd.stop()


@pytest.fixture
def roots(make_config) -> str:
    return make_config().trusted_roots


@pytest.fixture
def nodes(tmp_path, roots, pg_url):
    """Starts nodes on one fresh database; all are stopped at the end."""
    started: list[Node] = []

    def start(count: int = 2, **env: str) -> list[Node]:
        new = [None] * count

        def one(index: int) -> None:
            new[index] = Node(tmp_path, roots, pg_url, **env)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(new), "a node did not start"
        started.extend(new)
        return new

    start.url = pg_url
    yield start
    for node in started:
        node.stop()


def upstream_env(fake) -> dict:
    return {
        "DCAPD_PCS_URL": fake.pcs_url,
        "DCAPD_URL_MAP": fake.url_map,
        "DCAPD_ROOTCA_CRL_URL": INTEL_ROOT_CDP,
        "DCAPD_CACHE_MODE": "LAZY",
    }


def test_fifty_misses_over_two_nodes_make_one_upstream_call(nodes, fake_pcs):
    fake = fake_pcs(SCENARIO)
    fake.fail_with(delay=0.3, paths="/qe/identity")
    pair = nodes(2, **upstream_env(fake))
    barrier = threading.Barrier(50)
    replies: list[Reply] = []

    def ask(index: int) -> None:
        barrier.wait()
        replies.append(pair[index % 2].simulate_get(QE))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in replies] == [200] * 50
    assert {r.content for r in replies} == {load_body(SCENARIO, "sgx_qe_identity")}
    assert fake.count("/qe/identity") == 1


def test_what_one_node_writes_the_other_serves_at_once(nodes):
    """Upload, registration and appraisal policy through node A; node B answers with them as
    soon as A has returned; B drains each queued registration exactly once."""
    a, b = nodes(2, DCAPD_CACHE_MODE="OFFLINE")
    admin = {"admin-token": ADMIN, "Content-Type": "application/json"}
    upload = intel_upload()
    assert (
        a.simulate_put(
            "/sgx/certification/v4/platformcollateral", body=json.dumps(upload), headers=admin
        ).status_code
        == 200
    )
    item = upload["collaterals"]["tcbinfos"][0]
    tcb = b.simulate_get("/sgx/certification/v4/tcb", params={"fmspc": item["fmspc"].upper()})
    assert tcb.status_code == 200
    assert json.loads(tcb.content) == item["sgx_tcbinfo"]
    qe = b.simulate_get(QE)
    assert qe.status_code == 200 and qe.content == upload["collaterals"]["qeidentity"].encode()

    # Registrations through A (and one through B), drained through B: each exactly once.
    cases = [raw_tcb(*case[:2]) for case in CASES[:3]]
    for index, (cpusvn, pcesvn) in enumerate(cases):
        node = a if index < 2 else b
        assert register(node, registration(cpusvn, pcesvn), token=USER).status_code == 200
    drained = read_platforms(b)
    assert drained.status_code == 200
    assert sorted(row["cpu_svn"] for row in drained.json) == sorted(c[0] for c in cases)
    assert read_platforms(a, "reg").json == [] and read_platforms(b, "reg").json == []

    # An appraisal policy through A is B's default at once.
    first, second = make_policy([TDQE_CLASS, SGX_CLASS]), make_policy([TDX_CLASS])
    assert put_policy(a, first, True).status_code == 200
    get = {"fmspc": "00906ED50000"}
    assert b.simulate_get("/sgx/certification/v4/appraisalpolicy", params=get).text == first
    assert put_policy(b, second, True).status_code == 200
    assert a.simulate_get("/sgx/certification/v4/appraisalpolicy", params=get).text == second


def cron_at(moment: float) -> str:
    local = dt.datetime.fromtimestamp(moment)
    return f"{local.second} {local.minute} {local.hour} * * *"


def test_schedules_firing_together_refresh_once_and_both_serve_the_result(nodes, fake_pcs):
    fake = fake_pcs(NEW)
    older_world(fake)
    fire_at = time.time() + 8  # nodes start and are warmed before it
    pair = nodes(2, DCAPD_REFRESH_SCHEDULE=cron_at(fire_at), **upstream_env(fake))
    for path, params in [
        TDX_TCB,
        ("/sgx/certification/v4/pckcrl", {"ca": "platform"}),
        ("/sgx/certification/v4/rootcacrl", {}),
    ]:
        assert pair[0].simulate_get(path, params=params).status_code == 200
    assert pair[1].simulate_get(TDX_TCB[0], params=TDX_TCB[1]).content == OLD_TCB.read_bytes()
    # The recorded collateral is past its nextUpdate, so each node's early refresh at start
    # (issue 14) runs first, once between the two: let it finish before the schedule fires.
    early = re.compile(
        r"scheduled refresh \(\d+ entries expire within the margin.*\) (done elsewhere|done)\n"
    )
    deadline = time.monotonic() + 30
    while not all(early.search(node.log()) for node in pair):
        assert time.monotonic() < deadline, [node.log()[-1500:] for node in pair]
        time.sleep(0.1)
    assert time.time() < fire_at - 1, "too slow to start before the schedule fires"
    fake.clear_added()  # PCS now has the newer data
    fake.reset_calls()
    fake.fail_with(delay=0.5, paths="/IntelSGXRootCA.der")  # both nodes fire during it
    deadline = time.monotonic() + 60
    pattern = re.compile(r"scheduled refresh \(schedule\) (done elsewhere|done)\n")
    while not all(pattern.search(node.log()) for node in pair):
        assert time.monotonic() < deadline, [node.log()[-1500:] for node in pair]
        time.sleep(0.2)
    outcomes = sorted(pattern.search(node.log()).group(1) for node in pair)
    assert outcomes == ["done", "done elsewhere"]
    assert fake.count("/IntelSGXRootCA.der") == 1
    assert fake.count("/tdx/certification/v4/tcb") == 1
    new_tcb = load_body(NEW, "tdx_tcb_90C06F000000")
    for node in pair:
        assert node.simulate_get(TDX_TCB[0], params=TDX_TCB[1]).content == new_tcb


def test_a_node_killed_mid_refresh_does_not_block_the_next(nodes, fake_pcs):
    fake = fake_pcs(NEW)
    a, b = nodes(2, **upstream_env(fake))
    assert a.simulate_get(TDX_TCB[0], params=TDX_TCB[1]).status_code == 200
    fake.fail_with(delay=30, paths="/IntelSGXRootCA.der")  # A's refresh hangs there
    outcome = a.dcapd.send("GET", "/sgx/certification/v4/refresh")
    store = Store(backend=PostgresBackend(nodes.url, 1, 3.0))
    try:
        deadline = time.monotonic() + 30
        while store.get_json(store.lock_key("refresh")) is None:
            assert time.monotonic() < deadline and "finished" not in outcome
            time.sleep(0.05)
        held = store.get_json(store.lock_key("refresh"))
        assert held["owner"].split(":")[1] == str(a.dcapd.process.pid)
        a.dcapd.kill()  # dies holding the refresh lock
        fake.clear_fault()
        # B's refresh goes ahead: the dead holder is seen on this host at once (another
        # host's dead node would hold it until its lease, 15 minutes, ran out).
        reply = b.simulate_get("/sgx/certification/v4/refresh", headers={"admin-token": ADMIN})
        assert reply.status_code == 200, b.log()[-2000:]
        assert store.get_json(store.lock_key("refresh")) is None
        assert store.get_json(store.STATUS_KEY)["last_collateral_refresh"] > 0
    finally:
        store.close()


def test_a_node_killed_during_an_upload_leaves_the_old_data(tmp_path, roots, pg_url):
    """Killed inside its write transaction, a node leaves every entry as it was (the lean
    PostgreSQL variant of tests/test_crash.py's kill rounds), and no lock behind."""
    env = {"DCAPD_CACHE_URL": pg_url, "DCAPD_CACHE_MODE": "OFFLINE"}
    path = "/sgx/certification/v4/platformcollateral"
    # The node to be killed starts alongside the first (one process start less to wait for):
    # it writes nothing until its own upload below.
    started: dict = {}
    starting = threading.Thread(
        target=lambda: started.setdefault(
            "killed", Dcapd(tmp_path, None, roots, pause=0.002, **env)
        )
    )
    starting.start()
    first = Dcapd(tmp_path, None, roots, **env)
    starting.join(60)
    assert "killed" in started, "the second node did not start"
    killed = started["killed"]
    outcome = first.send("PUT", path, json.dumps(intel_upload()).encode())
    outcome["thread"].join(120)
    first.stop()
    if outcome.get("status") != 200:
        killed.stop()
    assert outcome.get("status") == 200, first.log.read_text()[-2000:]
    store = Store(backend=PostgresBackend(pg_url, 2, 5.0))
    try:
        before = {key: store.cache.get(key) for key in store.keys()}
        assert len(before) > 10
        outcome = killed.send("PUT", path, world("B")["upload"])
        deadline = time.monotonic() + 60
        while killed.writes() < 100:
            assert time.monotonic() < deadline and "finished" not in outcome
            time.sleep(0.005)
        killed.kill()
        assert {key: store.cache.get(key) for key in store.keys()} == before
        check_platform_answers(entries(store))
        with store.transaction():  # the dead node's transaction no longer holds the writer
            store.put_json("status/after-crash", {"ok": True})
        again = Dcapd(tmp_path, None, roots, **env)
        try:
            reply = requests.get(again.url + QE, timeout=10)
            assert reply.content == intel_upload()["collaterals"]["qeidentity"].encode()
        finally:
            again.stop()
    finally:
        killed.stop()  # (already killed, unless a step above failed)
        store.close()
