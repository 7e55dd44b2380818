"""Graceful stop (issue 17 item 3): the real ``dcapd`` process, a fake PCS made slow.

On SIGTERM (Ctrl-C and a Windows service stop take the same path) dcapd stops accepting at
once, lets requests in flight finish within ``[server] grace_period``, cuts those still
running after it, and exits 0; meanwhile ``/readyz`` answers 503 "shutting down".
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import requests
import urllib3
from falcon import testing

from dcapd.app import create_app
from tests.servers import dcapd_environment
from tests.test_platforms import TOKENS
from tests.test_ssrf import wait_listening

pytestmark = pytest.mark.skipif(os.name == "nt", reason="sends POSIX signals to the process")

SCENARIO = "2025-05-27_intel-pcs-recording"
QE = "/sgx/certification/v4/qe/identity"


class Running:
    """``python -m dcapd`` on 127.0.0.1:0 with the fake PCS upstream."""

    def __init__(self, tmp_path: Path, fake, roots: str, tls: str, grace: float):
        env = dcapd_environment(
            DCAPD_LISTEN="127.0.0.1:0",
            DCAPD_TLS=tls,
            DCAPD_GRACE_PERIOD=str(grace),
            DCAPD_CACHE_DIR=str(tmp_path / "cache"),
            DCAPD_TRUSTED_ROOTS=roots,
            DCAPD_PCS_URL=fake.pcs_url,
            DCAPD_URL_MAP=fake.url_map,
            DCAPD_UPSTREAM_RETRIES="0",
            DCAPD_UPSTREAM_TIMEOUT="30",
            DCAPD_REFRESH_SCHEDULE="0 0 1 1 *",
            DCAPD_ADMIN_TOKEN_SHA512=TOKENS["admin_token_sha512"],
            NO_PROXY="127.0.0.1",
            no_proxy="127.0.0.1",
        )
        self.log = tmp_path / f"dcapd-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dcapd"], env=env, stdout=sink, stderr=subprocess.STDOUT
            )
        url = wait_listening(self.process, self.log)
        self.url = url if tls == "off" else url.replace("http://", "https://")
        self.port = int(url.rsplit(":", 1)[1])

    def get(self, path: str) -> dict:
        """Start a GET in a thread; the returned dict gets "status" or "error" when it ends."""
        outcome: dict = {}

        def run() -> None:
            try:
                with requests.Session() as session:
                    session.trust_env = False
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                        reply = session.get(self.url + path, timeout=60, verify=False)
                    outcome["status"] = reply.status_code
            except requests.RequestException as exc:
                outcome["error"] = type(exc).__name__
            finally:
                outcome["finished"] = time.monotonic()

        outcome["thread"] = threading.Thread(target=run, daemon=True)
        outcome["thread"].start()
        return outcome

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def roots(make_config) -> str:
    return str(Path(make_config().trusted_roots))


@pytest.mark.parametrize("tls", ["auto", "off"])
def test_request_in_flight_at_sigterm_completes_and_the_exit_is_clean(
    tmp_path, fake_pcs, roots, tls
):
    fake = fake_pcs(SCENARIO)
    fake.fail_with(delay=2.0, paths="/qe/identity")
    dcapd = Running(tmp_path, fake, roots, tls, grace=10)
    try:
        held = dcapd.get(QE)
        wait_for(lambda: fake.count("/qe/identity") >= 1, 10, "the request never reached PCS")
        signalled = time.monotonic()
        dcapd.process.send_signal(signal.SIGTERM)
        # The listeners close at once: a new connection is refused while the request runs.
        wait_for(lambda: refused(dcapd.port), 1.5, "new connections still accepted")
        assert "finished" not in held, "the held request ended before its upstream answered"
        code = dcapd.process.wait(10)
        held["thread"].join(5)
        assert held.get("status") == 200, (held, dcapd.text()[-2000:])
        assert code == 0, dcapd.text()[-2000:]
        assert time.monotonic() - signalled < 10, "did not exit within the grace period"
        assert "SIGTERM received: shutting down" in dcapd.text()
    finally:
        dcapd.close()


@pytest.mark.parametrize("tls", ["auto", "off"])
def test_request_past_the_grace_period_is_cut_and_the_exit_is_prompt(
    tmp_path, fake_pcs, roots, tls
):
    fake = fake_pcs(SCENARIO)
    fake.fail_with(delay=20.0, paths="/qe/identity")
    dcapd = Running(tmp_path, fake, roots, tls, grace=1)
    try:
        held = dcapd.get(QE)
        wait_for(lambda: fake.count("/qe/identity") >= 1, 10, "the request never reached PCS")
        signalled = time.monotonic()
        dcapd.process.send_signal(signal.SIGTERM)
        code = dcapd.process.wait(8)
        elapsed = time.monotonic() - signalled
        held["thread"].join(5)
        assert code == 0, dcapd.text()[-2000:]
        assert elapsed < 6, f"exit took {elapsed:.1f} s with a 1 s grace period"
        assert "status" not in held or held["status"] != 200, held
        assert re.search(
            r"1 request\(s\) still running after the 1 s grace period are cut", dcapd.text()
        ), dcapd.text()[-2000:]
    finally:
        dcapd.close()


def test_sigint_takes_the_same_path(tmp_path, fake_pcs, roots):
    fake = fake_pcs(SCENARIO)
    fake.fail_with(delay=1.5, paths="/qe/identity")
    dcapd = Running(tmp_path, fake, roots, "auto", grace=10)
    try:
        held = dcapd.get(QE)
        wait_for(lambda: fake.count("/qe/identity") >= 1, 10, "the request never reached PCS")
        signalled = time.monotonic()
        dcapd.process.send_signal(signal.SIGINT)
        code = dcapd.process.wait(10)
        assert time.monotonic() - signalled < 5, dcapd.text()[-2000:]
        held["thread"].join(5)
        assert held.get("status") == 200, (held, dcapd.text()[-2000:])
        assert code == 0, dcapd.text()[-2000:]
        assert "SIGINT received: shutting down" in dcapd.text()
        assert "Traceback" not in dcapd.text()
    finally:
        dcapd.close()


def test_readyz_answers_503_shutting_down_while_draining(make_config):
    app = create_app(make_config(cache_mode="OFFLINE"))
    try:
        client = testing.TestClient(app)
        assert client.simulate_get("/readyz").status_code == 200
        app.services.lifecycle.drain()
        answer = client.simulate_get("/readyz")
        assert answer.status_code == 503
        assert answer.json["status"] == "shutting down"
    finally:
        app.services.close()


def test_grace_period_is_a_setting(make_config):
    assert make_config().grace_period == 10.0
    assert make_config(grace_period="2.5").grace_period == 2.5


def test_cache_locks_held_at_the_stop_are_released(make_config):
    app = create_app(make_config(cache_mode="OFFLINE"))
    store = app.services.store
    assert store.try_lock("refresh", "someone-else-" + "x", 60, time.time())
    store.unlock("refresh", "someone-else-x")
    assert store.try_lock("fill/a", "me", 60, time.time())
    assert store.try_lock("refresh", "me", 60, time.time())
    store.unlock("refresh", "me")
    assert store.get_json(store.lock_key("fill/a")) is not None
    assert store.release_locks() == 1
    assert store.get_json(store.lock_key("fill/a")) is None
    assert store.release_locks() == 0
    app.services.close()
