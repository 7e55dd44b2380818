"""Hostile connections and unwelcome bodies against the real server (issue 13).

The TLS front reads each request head itself: silent, trickling and idle clients never hold
one of waitress's connections, their deadlines count from accept, and a body that is not
welcome (by route and token) is answered 401/413 from the head, before a byte of it is read.
Every server listens on 127.0.0.1 only, every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import resource
import select
import socket
import ssl
import threading
import time
from contextlib import contextmanager

import falcon.testing
import pytest

from dcapd.app import create_app, route_paths
from dcapd.gate import ADMIN, BODY_ROLES, USER
from dcapd.httpframe import Chunked, FramingError, parse_request_head
from tests.test_platforms import ADMIN as ADMIN_TOKEN
from tests.test_platforms import TOKENS
from tests.test_platforms import USER as USER_TOKEN
from tests.test_slow_clients import TCB, client_context, serving, timed_get

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

HOST = "127.0.0.1"
COLLATERAL = "/sgx/certification/v4/platformcollateral"
PLATFORMS = "/sgx/certification/v4/platforms"
MIB = 1024 * 1024


@pytest.fixture(autouse=True, scope="module")
def enough_file_descriptors():
    """1,000 clients and the server's side of them live in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 4096:
        pytest.skip("fewer than 4096 file descriptors")


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def tls_socket(port: int) -> ssl.SSLSocket:
    raw = socket.create_connection((HOST, port), timeout=5)
    return client_context().wrap_socket(raw)


def first_bytes_after(sock: socket.socket, started: float, timeout: float = 3.0) -> float:
    """Seconds from *started* until the server's first bytes are readable (not consumed)."""
    ready = select.select([sock], [], [], timeout)[0]
    assert ready, "no answer"
    return time.monotonic() - started


def read_answer(sock: socket.socket, timeout: float = 3.0) -> bytes:
    """Everything the server sends until it closes (bounded by *timeout*)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            break
        except (TimeoutError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
    return data


def head_of(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


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


# -- 1,000 hostile connections ------------------------------------------------------------


class Swarm:
    """Hostile clients on an asyncio loop in a thread: silent TCP, silent after the
    handshake, a head trickled a byte at a time, a (user-token) body trickled a byte at a
    time. ``closed`` counts the connections the server has hung up."""

    def __init__(self, port: int, per_kind: int, interval: float = 0.5):
        self.port = port
        self.per_kind = per_kind
        self.interval = interval
        self.loop = asyncio.new_event_loop()
        self.writers: list[asyncio.StreamWriter] = []
        self.closed = 0
        self.failed_to_open = 0
        self.stop = asyncio.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        try:
            while await reader.read(4096):
                pass
        except (OSError, ssl.SSLError):
            pass
        self.closed += 1

    async def _trickle(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        try:
            for byte in data:
                await asyncio.sleep(self.interval)
                if self.stop.is_set() or writer.is_closing():
                    return
                writer.write(bytes([byte]))
        except (OSError, ssl.SSLError, RuntimeError):
            pass

    async def _one(self, kind: str, gate: asyncio.Semaphore) -> None:
        async with gate:  # a bounded number of handshakes at a time
            try:
                tls = None if kind == "tcp" else client_context()
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, self.port, ssl=tls), 20
                )
            except (OSError, ssl.SSLError, asyncio.TimeoutError):
                self.failed_to_open += 1
                return
        self.writers.append(writer)
        self.loop.create_task(self._watch(reader))
        if kind == "head":
            head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * 200 + b"\r\n\r\n"
            self.loop.create_task(self._trickle(writer, head))
        elif kind == "body":
            head = (
                f"POST {PLATFORMS} HTTP/1.1\r\nHost: x\r\nuser-token: {USER_TOKEN}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            ).encode()
            writer.write(head)
            self.loop.create_task(self._trickle(writer, b"{" * 1000))

    async def _open(self) -> None:
        gate = asyncio.Semaphore(64)
        kinds = ["tcp", "tls", "head", "body"] * self.per_kind
        await asyncio.gather(*(self._one(kind, gate) for kind in kinds))

    def open(self, timeout: float = 60) -> None:
        self.run(self._open(), timeout)

    async def _close(self) -> None:
        self.stop.set()
        for writer in self.writers:
            writer.transport.abort()
        await asyncio.sleep(0.05)
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    def close(self) -> None:
        try:
            self.run(self._close(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def run_swarm(port: int, per_kind: int, report, finish) -> None:
    """In a child process (its own GIL, like real clients): open the swarm, report, hold it
    until *finish*, report how many the server had not closed by then."""
    hostile = Swarm(port, per_kind, interval=1.0)
    try:
        started = time.monotonic()
        hostile.open(timeout=120)
        report.put((time.monotonic() - started, hostile.failed_to_open))
        finish.wait(120)
        report.put(len(hostile.writers) - hostile.closed)
    finally:
        hostile.close()


@contextmanager
def swarm_process(port: int, per_kind: int):
    """Yields (opened_seconds, failed_to_open, still_open): the last is filled on exit."""
    context = multiprocessing.get_context("spawn")
    report, finish = context.Queue(), context.Event()
    child = context.Process(target=run_swarm, args=(port, per_kind, report, finish), daemon=True)
    child.start()
    outcome: list = []
    try:
        outcome.extend(report.get(timeout=150))
        yield outcome
        finish.set()
        outcome.append(report.get(timeout=30))
    finally:
        finish.set()
        child.join(30)
        if child.is_alive():
            child.kill()


class Prober:
    """GET /healthz every 0.2 s on a new connection while running; records latencies."""

    def __init__(self, url: str):
        self.url = url
        self.results: list[tuple[int, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(600):  # at most 2 minutes
            if self.stop.wait(0.2):
                return
            try:
                status, elapsed, _ = timed_get(self.url, "/healthz")
            except Exception:  # a probe that got no answer at all
                status, elapsed = 0, 10.0
            self.results.append((status, elapsed))

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(15)


def test_a_thousand_hostile_connections_do_not_delay_a_normal_request(make_config):
    """250 each of: silent TCP, silent after the handshake, a head trickled a byte a second,
    a user-token body trickled likewise. Deadlines long enough that they are all still open
    while a normal client is timed, even on a busy machine (test_silent_... checks them)."""
    hold = dict(head_timeout=120, request_timeout=120, tls_handshake_timeout=120)
    with serving(make_config, **hold) as (server, session):
        session.close()
        baseline = sorted(timed_get(server.url, "/healthz")[1] for _ in range(3))[1]
        status, _, expected = timed_get(server.url)
        assert status == 200
        rss_before = rss_mib()
        with Prober(server.url) as prober, swarm_process(server.port, per_kind=250) as outcome:
            time.sleep(1.0)  # trickling clients are into their heads and bodies
            timings = []
            for path in (TCB, "/healthz", TCB, "/healthz", TCB):
                status, elapsed, body = timed_get(server.url, path)
                assert status == 200, path
                timings.append(elapsed)
            assert body == expected, "answers are whole and right"
            held_by_waitress = len(server._peers)
            rss_during = rss_mib()
        opened, failed, still_open = outcome
        probes = prober.results
        print(
            f"\n1,000 hostile: opened in {opened:.1f} s, {failed} failed to open; normal"
            f" requests {[round(t, 3) for t in timings]} s (baseline {baseline:.3f} s);"
            f" {still_open} hostile still open, {held_by_waitress} waitress connections;"
            f" {len(probes)} probes, slowest {max(t for _, t in probes):.3f} s;"
            f" RSS {rss_before:.0f} -> {rss_during:.0f} MiB"
        )
        assert failed == 0
        assert still_open >= 990, "the hostile connections were open during the measurement"
        assert held_by_waitress <= 2, "no hostile connection reached waitress"
        # Within 1 s (more only when this machine is so busy that a request alone is slow).
        assert max(timings) < 1.0 + 3 * baseline, (timings, baseline)
        assert probes and all(status == 200 for status, _ in probes), probes


# -- deadlines ---------------------------------------------------------------------------


def test_silent_and_trickling_clients_are_cut_from_accept(make_config):
    with serving(make_config, head_timeout=1, request_timeout=2, idle_timeout=1) as (server, _):
        silent_tcp = socket.create_connection((HOST, server.port), timeout=5)
        silent_tls = tls_socket(server.port)
        slow_body = tls_socket(server.port)
        slow_body.sendall(
            f"POST {PLATFORMS} HTTP/1.1\r\nHost: x\r\nuser-token: {USER_TOKEN}\r\n"
            "Content-Length: 100\r\n\r\n".encode()
        )
        started = time.monotonic()
        outcome = {}

        def trickle():
            for _ in range(20):  # a byte every 0.25 s: 5 s for the whole body, too slow
                try:
                    slow_body.send(b"{")
                except OSError:
                    outcome["body cut"] = time.monotonic() - started
                    return
                time.sleep(0.25)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            assert 0.5 < closed_within(silent_tls, 4) < 2.0, "silent after the handshake"
            assert closed_within(silent_tcp, 4) < 2.0, "silent TCP: within head_timeout"
            cut = closed_within(slow_body, 5)
            assert cut is not None and 1.5 < time.monotonic() - started < 3.0, cut
        finally:
            thread.join(6)
            for sock in (silent_tcp, silent_tls, slow_body):
                sock.close()
        assert timed_get(server.url)[0] == 200


def test_idle_keep_alive_connection_is_closed_after_idle_timeout(make_config):
    with serving(make_config, idle_timeout=1) as (server, _):
        sock = tls_socket(server.port)
        with sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(5)
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200")
            assert b"connection: close" not in answer.lower()
            gone = closed_within(sock, 4)
        assert gone is not None and 0.7 < gone < 2.5, gone
        assert not server._peers, "its connection to waitress went with it"


def healthz(sock: socket.socket, request: bytes = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"):
    """Send (the rest of) a /healthz request on a kept-alive connection; its whole answer."""
    sock.sendall(request)
    sock.settimeout(5)
    data = b""
    deadline = time.monotonic() + 5
    while not data.endswith(b'{"status":"ok"}') and time.monotonic() < deadline:
        data += sock.recv(65536)
    return data


def test_idle_clients_make_room_when_the_connection_limit_is_reached(make_config):
    with serving(make_config, connection_limit=4, idle_timeout=30) as (server, session):
        session.close()
        idle = []
        try:
            for _ in range(4):
                sock = tls_socket(server.port)
                assert healthz(sock).startswith(b"HTTP/1.1 200")
                idle.append(sock)
            assert len(server._peers) == 4, "each holds its connection to waitress"
            status, elapsed, _ = timed_get(server.url, "/healthz")
            assert status == 200 and elapsed < 1.0, elapsed
            assert closed_within(idle[0], 2) is not None, "the oldest idle client made room"
            assert len(server._peers) <= 4
            # A kept-alive client still sending its next request loses its connection to
            # waitress (not its own) to a new client, and gets one back when its request is.
            for sock in idle[1:]:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            late = tls_socket(server.port)  # takes the free link, then idles
            idle.append(late)
            assert healthz(late).startswith(b"HTTP/1.1 200")
            status, elapsed, _ = timed_get(server.url, "/healthz")
            assert status == 200 and elapsed < 1.0, elapsed
            assert closed_within(idle[1], 0.3) is None, "still sending: not closed"
            for sock in idle[1:4]:
                assert healthz(sock, b"\r\n").startswith(b"HTTP/1.1 200")
        finally:
            for sock in idle:
                sock.close()


# -- bodies, decided from the head ------------------------------------------------------


def test_no_token_200_mib_upload_is_401_before_the_body(make_config, tmp_path):
    with serving(make_config) as (server, _):
        rss_before = rss_mib()
        waitress_before = len(server._wmap)
        sock = tls_socket(server.port)
        with sock:
            started = time.monotonic()
            sock.sendall(
                f"PUT {COLLATERAL} HTTP/1.1\r\nHost: x\r\nRequest-ID: hostile-1\r\n"
                "Content-Type: application/json\r\nContent-Length: 209715200\r\n\r\n{}".encode()
            )
            elapsed = first_bytes_after(sock, started)  # no byte more of the body is sent
            answer = read_answer(sock)
        status, headers, body = head_of(answer)
        assert status == 401 and body == b"Authentication failed."
        assert headers["connection"] == "close"
        assert headers["request-id"] == "hostile-1"
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert elapsed < 1.0, elapsed
        assert len(server._wmap) == waitress_before, "waitress never saw it"
        assert rss_mib() - rss_before < 20


def test_chunked_body_without_token_is_401_at_once(make_config):
    with serving(make_config) as (server, _):
        sock = tls_socket(server.port)
        with sock:
            sock.sendall(
                f"PUT {COLLATERAL} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                "10\r\n".encode()
            )
            status, _, _ = head_of(read_answer(sock))
        assert status == 401


def test_user_token_bodies_are_small_and_counted(make_config):
    with serving(make_config) as (server, _):
        # 2 MiB announced: 413 unread.
        sock = tls_socket(server.port)
        with sock:
            started = time.monotonic()
            sock.sendall(
                f"POST {PLATFORMS} HTTP/1.1\r\nHost: x\r\nuser-token: {USER_TOKEN}\r\n"
                f"Content-Length: {2 * MIB}\r\n\r\n".encode()
            )
            elapsed = first_bytes_after(sock, started)
            status, headers, body = head_of(read_answer(sock))
        assert (status, body) == (413, b"Request body is too large.")
        assert elapsed < 1.0, elapsed
        assert headers["connection"] == "close" and headers["request-id"]
        # Chunked: counted as it arrives, refused once over 1 MiB.
        sock = tls_socket(server.port)
        with sock:
            sock.sendall(
                f"POST {PLATFORMS} HTTP/1.1\r\nHost: x\r\nuser-token: {USER_TOKEN}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
            )
            chunk = b"%x\r\n" % (256 * 1024) + b" " * (256 * 1024) + b"\r\n"
            try:
                for _ in range(5):
                    sock.sendall(chunk)
            except OSError:
                pass
            status, _, _ = head_of(read_answer(sock))
        assert status == 413
        # No token on POST /platforms: 401; a body on a route that takes none: 413.
        for head, expected in (
            (
                f"POST {PLATFORMS} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n",
                401,
            ),
            (f"GET {TCB} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n", 413),
        ):
            sock = tls_socket(server.port)
            with sock:
                sock.sendall(head.encode())
                assert head_of(read_answer(sock))[0] == expected, head
        # A small body with the user token, and a large one with the admin token, go through.
        platform = {"qe_id": "00" * 16, "pce_id": "0000", "cpu_svn": "00" * 16, "pce_svn": "0000"}
        reply = requests_post(server, PLATFORMS, json.dumps(platform), {"user-token": USER_TOKEN})
        assert reply.status_code not in (401, 413)
        large = json.dumps({"padding": " " * (2 * MIB)})
        reply = requests_post(server, COLLATERAL, large, {"admin-token": ADMIN_TOKEN}, "put")
        assert reply.status_code not in (401, 413), reply.status_code


def requests_post(server, path, data, headers, method="post"):
    import requests

    with requests.Session() as session:
        session.trust_env = False
        return session.request(
            method, server.url + path, data=data, headers=headers, verify=False, timeout=10
        )


def test_pipelined_and_keep_alive_requests_still_work(make_config):
    with serving(make_config) as (server, _):
        sock = tls_socket(server.port)
        with sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
            data = b""
            sock.settimeout(5)
            deadline = time.monotonic() + 5
            while data.count(b'{"status":"ok"}') < 3 and time.monotonic() < deadline:
                data += sock.recv(65536)
        assert data.count(b"HTTP/1.1 200") == 3


def test_expect_continue_chunked_bodies_and_bad_chunks(make_config):
    """The front answers 100 Continue itself for a body it accepts; a held chunked body goes
    to the app whole (keep-alive goes on); a malformed chunk is 400."""
    with serving(make_config) as (server, session):
        session.close()  # its keep-alive connection to the server
        body = b'{"qe_id": "00"}'
        sock = tls_socket(server.port)
        first = sock.getsockname()[:2]
        with sock:
            sock.sendall(
                f"POST {PLATFORMS} HTTP/1.1\r\nHost: x\r\nuser-token: {USER_TOKEN}\r\n"
                f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            )
            sock.settimeout(5)
            assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(body)
            data = b""
            deadline = time.monotonic() + 5
            while b"Invalid request parameters." not in data and time.monotonic() < deadline:
                data += sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 400")  # the app's: pce_id is missing
            chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
            sock.sendall(
                f"POST {PLATFORMS} HTTP/1.1\r\nHost: x\r\nuser-token: {USER_TOKEN}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
                + chunked
                + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            data = b""
            deadline = time.monotonic() + 5
            while b'{"status":"ok"}' not in data and time.monotonic() < deadline:
                data += sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 400") and b'\r\n\r\n{"status":"ok"}' in data
        sock = tls_socket(server.port)
        with sock:
            sock.sendall(
                f"POST {PLATFORMS} HTTP/1.1\r\nHost: x\r\nuser-token: {USER_TOKEN}\r\n"
                "Transfer-Encoding: chunked\r\n\r\nzz\r\n".encode()
            )
            assert head_of(read_answer(sock))[0] == 400
        deadline = time.monotonic() + 3
        while first in server._peers.values() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first not in server._peers.values(), "closed with its waitress connection"


def test_tls_off_applies_the_same_body_rules_in_front_of_the_app(make_config):
    with serving(make_config, tls="off") as (server, session):
        reply = session.put(server.url + COLLATERAL, data=b"{}" * 100, timeout=10)
        assert reply.status_code == 401 and reply.text == "Authentication failed."
        reply = session.post(
            server.url + PLATFORMS, data=b" " * (2 * MIB), headers={"user-token": USER_TOKEN}
        )
        assert reply.status_code == 413
        assert reply.headers["Request-ID"]


# -- the rules themselves ---------------------------------------------------------------


def test_body_roles_match_the_routes_and_the_resources(make_config):
    """Every endpoint of the table is a route, and the app itself refuses its body without
    the token of the role the table names."""
    endpoints = {path.split("/", 4)[4] for path, *_ in route_paths()}
    assert set(BODY_ROLES) <= endpoints
    app = create_app(make_config(**TOKENS))
    try:
        client = falcon.testing.TestClient(app)
        for endpoint, methods in BODY_ROLES.items():
            for method, role in methods.items():
                assert role in (USER, ADMIN)
                path = f"/sgx/certification/v4/{endpoint}"
                answer = client.simulate_request(method, path, body="{}")
                assert answer.status_code in (401, 404), (method, path)  # 404: no such method
    finally:
        app.services.store.close()
        app.services.upstream.close()


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nX: a\nContent-Length: 5\r\n\r\n",
        b"POST / HTTP/1.1\r\n folded: x\r\n\r\n",
        b"POST /  HTTP/1.1\r\n\r\n",
    ],
)
def test_ambiguous_heads_are_refused(head):
    with pytest.raises(FramingError):
        parse_request_head(head)


def test_request_head_and_chunked_framing():
    head = parse_request_head(
        b"PUT /SGX/certification/v4/platform%63ollateral/?a=1 HTTP/1.1\r\nExpect: 100-continue"
        b"\r\nuser-token: a\r\nUSER-TOKEN: b\r\nContent-Length: 12\r\n\r\n"
    )
    assert head.path == "/SGX/certification/v4/platformcollateral/"
    assert head.headers["user-token"] == "a, b"  # as waitress joins them
    assert head.length == 12 and head.expect_continue and not head.close
    assert b"Expect" not in head.raw
    body = b"5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nT: v\r\n\r\nGET / HTTP/1.1"
    for step in (1, 3, len(body)):
        chunked, buf, used = Chunked(), bytearray(), 0
        for start in range(0, len(body), step):
            buf += body[start : start + step]
            taken = chunked.scan(buf)
            del buf[:taken]
            used += taken
            if chunked.done:
                break
        assert chunked.done and chunked.size == 11
        assert body[used:].startswith(b"GET") or body[used:] == b"", step
    with pytest.raises(FramingError):
        Chunked().scan(b"zz\r\n")
