"""Slow and hostile clients against the real server (waitress behind the TLS front, the real
dcapd app, OFFLINE with Intel's upload file): they do not stop other clients being served
within normal latency, and the configured timeouts and connection limit apply.

Hostile kinds: connections that never finish the TLS handshake (silent, or half a
ClientHello), that send their request headers one byte a second (slowloris), and that send
many requests for collateral and never read the answers.
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import threading
import time
from contextlib import contextmanager

import pytest
import requests

from tests.servers import running_dcapd
from tests.test_platforms import ADMIN, TOKENS
from tests.uploads import intel_upload

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

UPLOAD = intel_upload()
FMSPC = UPLOAD["collaterals"]["tcbinfos"][0]["fmspc"].upper()
TCB = f"/sgx/certification/v4/tcb?fmspc={FMSPC}"
HOSTILE_PER_KIND = 5  # four kinds (silent, half hello, slowloris, non-reader): 20 clients


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@contextmanager
def serving(make_config, **overrides):
    """dcapd (TLS, OFFLINE) with Intel's upload file cached; yields (server, session)."""
    settings = dict(tls="auto", cache_mode="OFFLINE", **TOKENS)
    settings.update(overrides)
    with running_dcapd(make_config(**settings)) as server, requests.Session() as session:
        session.trust_env = False
        session.verify = False
        reply = session.put(
            f"{server.url}/sgx/certification/v4/platformcollateral",
            data=json.dumps(UPLOAD),
            headers={"admin-token": ADMIN},
            timeout=30,
        )
        assert reply.status_code == 200
        yield server, session


def timed_get(url: str, path: str = TCB) -> tuple[int, float, bytes]:
    """One request on a new connection (new TLS handshake): status, seconds, body."""
    with requests.Session() as session:
        session.trust_env = False
        started = time.monotonic()
        reply = session.get(url + path, verify=False, timeout=10)
        return reply.status_code, time.monotonic() - started, reply.content


class Hostile:
    """Opens hostile connections and keeps them going in background threads."""

    def __init__(self, port: int):
        self.port = port
        self.sockets: list[socket.socket] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.dropped: dict[str, float] = {}  # slowloris name -> seconds until the server hung up
        self.started = time.monotonic()

    def _connect(self, rcvbuf: int = 0) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.port))
        self.sockets.append(sock)
        return sock

    def silent(self) -> None:
        """TCP connected, not a byte of TLS."""
        self._connect()

    def half_hello(self) -> None:
        """A TLS record header announcing 512 bytes of ClientHello, then 20 of them."""
        self._connect().sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(20))

    def slowloris(self, name: str, interval: float = 1.0, tls: bool = True) -> None:
        """Handshake done, then request headers one byte every ``interval`` seconds."""
        sock = self._connect()
        if tls:
            sock = client_context().wrap_socket(sock)
            self.sockets.append(sock)
        request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"p" * 4096

        def hung_up() -> bool:
            """Did the server close? (A TLS 1.3 session ticket also makes it readable.)"""
            if not select.select([sock], [], [], 0)[0]:
                return False
            sock.setblocking(False)
            try:
                return sock.recv(1) == b""
            except (ssl.SSLWantReadError, BlockingIOError):
                return False
            except OSError:
                return True
            finally:
                sock.settimeout(10)

        def trickle():
            for byte in request:
                try:
                    # Between bytes, watch for the server hanging up (every 50 ms), so that a
                    # drop is seen when it happens rather than at the next byte's turn.
                    pause_ends = time.monotonic() + interval
                    while (left := pause_ends - time.monotonic()) > 0:
                        if self.stop.wait(min(0.05, left)):
                            return
                        if hung_up():
                            raise ConnectionResetError
                    if hung_up():
                        raise ConnectionResetError
                    sock.send(bytes([byte]))
                except OSError:
                    self.dropped[name] = time.monotonic() - self.started
                    return

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        self.threads.append(thread)

    def non_reader(self, requests_sent: int = 300) -> socket.socket:
        """Handshake done, many pipelined requests for a TCB info (6.7 kB each), never a byte
        read."""
        raw = self._connect(rcvbuf=4096)
        sock = client_context().wrap_socket(raw)
        self.sockets.append(sock)
        request = f"GET {TCB} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        sock.sendall(request * requests_sent)
        return sock

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed *sock* (None: still open after *seconds*)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while True:
            if not sock.recv(4096):
                return time.monotonic() - started
    except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError, BrokenPipeError):
        return time.monotonic() - started
    except (TimeoutError, socket.timeout):
        return None


@contextmanager
def hostile_clients(port: int):
    hostile = Hostile(port)
    try:
        yield hostile
    finally:
        hostile.close()


def test_twenty_hostile_clients_do_not_delay_a_normal_one(make_config):
    with serving(make_config) as (server, session):
        status, baseline, expected = timed_get(server.url)
        assert status == 200
        with hostile_clients(server.port) as hostile:
            for index in range(HOSTILE_PER_KIND):
                hostile.silent()
                hostile.half_hello()
                hostile.slowloris(f"slowloris {index}")
                hostile.non_reader()
            time.sleep(1.5)  # slowloris clients are well into their headers
            timings = []
            for path in (TCB, "/healthz", "/sgx/certification/v4/rootcacrl", TCB):
                status, elapsed, body = timed_get(server.url, path)
                assert status == 200, path
                timings.append(elapsed)
            assert body == expected, "answers are whole and right"
            assert max(timings) < 2.0, timings
            # Keep-alive requests on one connection too.
            for _ in range(5):
                started = time.monotonic()
                assert session.get(server.url + TCB, timeout=10).status_code == 200
                assert time.monotonic() - started < 2.0


def test_a_flood_of_unfinished_handshakes_is_dropped_and_costs_waitress_nothing(make_config):
    with serving(make_config, tls_handshake_timeout=0.5) as (server, session):
        with hostile_clients(server.port) as hostile:
            for _ in range(40):
                hostile.silent()
                hostile.half_hello()
            time.sleep(0.3)
            assert timed_get(server.url)[0] == 200
            assert len(server._peers) <= 2, "no waitress connection before a handshake"
            # Every hostile connection is closed by the server after the handshake timeout.
            deadline = time.monotonic() + 5
            for sock in hostile.sockets:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    assert sock.recv(100) == b""
                except ConnectionResetError:
                    pass


def test_idle_connection_is_dropped_after_channel_timeout(make_config):
    """A client that sends part of its headers and then waits: gone after channel_timeout."""
    with serving(make_config, channel_timeout=1, tls="off") as (server, session):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        with sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad")
            started = time.monotonic()
            try:
                data = sock.recv(100)
            except ConnectionResetError:
                data = b""
            elapsed = time.monotonic() - started
        assert data == b""
        assert 0.5 < elapsed < 4.0, elapsed


def test_slow_sender_slower_than_channel_timeout_is_dropped(make_config):
    """A slowloris that pauses longer than channel_timeout between bytes is dropped, through
    the TLS front (waitress closes, the front closes the client)."""
    with serving(make_config, channel_timeout=1) as (server, session):
        with hostile_clients(server.port) as hostile:
            hostile.slowloris("slow", interval=2.0)
            deadline = time.monotonic() + 8
            while "slow" not in hostile.dropped and time.monotonic() < deadline:
                time.sleep(0.02)
            assert "slow" in hostile.dropped, "the server never hung up"
            assert timed_get(server.url)[0] == 200


def test_plain_http_clients_with_unfinished_heads_hold_nothing_of_waitress(make_config):
    """tls = off goes through the same front: clients that never finish their head take no
    waitress connection (more of them than connection_limit), a normal request is answered
    at once, and they are dropped at head_timeout."""
    limit = 5
    with serving(make_config, tls="off", connection_limit=limit, head_timeout=2) as (
        server,
        session,
    ):
        session.close()  # no keep-alive connection of our own
        idle = []
        try:
            for _ in range(limit * 2):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never end
                idle.append(sock)
            opened = time.monotonic()
            status, elapsed, _ = timed_get(server.url, "/healthz")
            assert status == 200 and elapsed < 1.0, elapsed
            assert len(server._wmap) <= 3, "only waitress's listener, its wake-up pipe, ours"
            for sock in idle:
                gone = closed_within(sock, 4)
                assert gone is not None, "dropped at head_timeout"
            assert 1.0 < time.monotonic() - opened < 4.0
        finally:
            for sock in idle:
                sock.close()


def test_one_byte_a_second_slowloris_is_eventually_dropped(make_config):
    with serving(make_config, channel_timeout=1) as (server, session):
        with hostile_clients(server.port) as hostile:
            hostile.slowloris("slowloris", interval=0.5)
            deadline = time.monotonic() + 4
            while "slowloris" not in hostile.dropped and time.monotonic() < deadline:
                time.sleep(0.02)
            assert "slowloris" in hostile.dropped


def test_a_client_that_never_reads_is_dropped_after_channel_timeout(make_config):
    with serving(make_config, channel_timeout=1) as (server, session):
        with hostile_clients(server.port) as hostile:
            sock = hostile.non_reader(3000)  # 20 MB of answers: more than the sockets buffer
            me = ("127.0.0.1", sock.getsockname()[1])

            def held() -> set:
                return {conn.peer[:2] for conn in list(server._front._conns.values())}

            deadline = time.monotonic() + 5
            while me not in held() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert me in held(), "the front holds it"
            deadline = time.monotonic() + 5
            while me in held() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert me not in held(), "the front still holds the connection"
