"""Graceful stop, proven on the real command: SIGTERM (or Ctrl-C) refuses new connections,
lets a request in flight finish within the grace period, cuts what is still running after it,
and exits 0 promptly either way."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import urllib3

from tests.conftest import INTEL_ROOT_CDP
from tests.fakepcs import load_body
from tests.servers import free_port

RECORDING = "2025-05-27_intel-pcs-recording"
QE_IDENTITY = "/sgx/certification/v4/qe/identity"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


class Node:
    """``python -m dcapd`` over HTTPS (a generated certificate) on a free 127.0.0.1 port."""

    def __init__(self, tmp_path: Path, fake, **env: str):
        self.port = free_port()
        self.log = tmp_path / "dcapd.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("DCAPD_")}
        environment.update(
            DCAPD_LISTEN=f"127.0.0.1:{self.port}",
            DCAPD_CACHE_DIR=str(tmp_path / "cache"),
            DCAPD_PCS_URL=fake.pcs_url,
            DCAPD_ROOTCA_CRL_URL=INTEL_ROOT_CDP,
            DCAPD_URL_MAP=fake.url_map,
            DCAPD_UPSTREAM_RETRIES="0",
            DCAPD_UPSTREAM_TIMEOUT="60",
            DCAPD_REFRESH_SCHEDULE="0 0 0 1 1 *",
            NO_PROXY="127.0.0.1",
            no_proxy="127.0.0.1",
            **env,
        )
        with open(self.log, "wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dcapd"], env=environment, stdout=sink, stderr=sink
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.process.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "dcapd did not start"
                time.sleep(0.1)

    def get_in_background(self, path: str) -> dict:
        outcome: dict = {}

        def run() -> None:
            try:
                with urllib3.warnings.catch_warnings():
                    urllib3.disable_warnings()
                    reply = requests.get(
                        f"https://127.0.0.1:{self.port}{path}", verify=False, timeout=60
                    )
                outcome["status"], outcome["body"] = reply.status_code, reply.content
            except requests.RequestException as exc:
                outcome["error"] = type(exc).__name__
            outcome["at"] = time.monotonic()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        outcome["thread"] = thread
        return outcome

    def refuses_connections(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        return False


def test_a_request_in_flight_at_sigterm_completes_and_new_connections_are_refused(
    tmp_path, fake_pcs
):
    fake = fake_pcs(RECORDING)
    fake.fail_with(delay=2.0, paths="/qe/identity")  # PCS is slow: the request is in flight
    node = Node(tmp_path, fake, DCAPD_GRACE_PERIOD="10")
    outcome = node.get_in_background(QE_IDENTITY)
    deadline = time.monotonic() + 10
    while not fake.count("/qe/identity"):
        assert time.monotonic() < deadline, "the request never reached PCS"
        time.sleep(0.05)
    signalled = time.monotonic()
    node.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert node.refuses_connections(), "a new connection after the signal is refused"
    assert node.process.wait(timeout=15) == 0
    exited = time.monotonic() - signalled
    outcome["thread"].join(10)
    assert outcome.get("status") == 200, (outcome, node.log.read_text()[-2000:])
    assert outcome["body"] == load_body(RECORDING, "sgx_qe_identity")
    assert exited < 10, "exits within the grace period"
    log = node.log.read_text()
    assert "finishing the requests in flight (up to 10s)" in log
    assert "requests in flight finished; stopping" in log


def test_a_request_held_past_the_grace_period_is_cut_and_the_exit_is_prompt(tmp_path, fake_pcs):
    fake = fake_pcs(RECORDING)
    fake.fail_with(delay=30.0, paths="/qe/identity")
    node = Node(tmp_path, fake, DCAPD_GRACE_PERIOD="1")
    outcome = node.get_in_background(QE_IDENTITY)
    deadline = time.monotonic() + 10
    while not fake.count("/qe/identity"):
        assert time.monotonic() < deadline, "the request never reached PCS"
        time.sleep(0.05)
    signalled = time.monotonic()
    node.process.send_signal(signal.SIGINT)  # Ctrl-C takes the same path
    assert node.process.wait(timeout=20) == 0
    exited = time.monotonic() - signalled
    outcome["thread"].join(10)
    assert "status" not in outcome, outcome  # cut: no answer
    assert exited < 8, f"{exited:.1f} s: prompt, not the upstream's 30 s"
    assert "grace period of 1s over: cutting 1 request still running" in node.log.read_text()
