"""Upstream faults: whatever Intel's PCS (or the network) does, clients get the status the spec
gives, and nothing wrong is cached.

The fault matrix below is the test: each cell is one test case (a fresh cache, an upstream
that misbehaves in the row's way on the column's route only), asserting the status in the
cell and that the cache holds nothing, or, for a 200 cell, only Intel's genuine bytes.

Statuses follow pccs-reference.md: a PCS answer other than 200 is 404 for the client; PCS
unreachable (timeout, reset, cut-off body) is 502; and dcapd answers 502 where upstream said
200 with something that is not the signed collateral (garbage, an HTML page, a missing issuer
chain), which is never cached. A wrong Content-Type on genuine bytes is harmless: dcapd serves
and stores the bytes with the type the route defines. rootcacrl and crl?uri= carry no issuer
chain, so a missing chain header does not concern them.

The misbehaving upstream is :class:`FaultyPCS`, a raw-socket HTTP server written here (the
fake PCS cannot cut a body short or reset a connection); it answers every request that the
fault does not concern like the fake PCS would.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import urllib.parse

import pytest

from tests.conftest import INTEL_ROOT_CDP
from tests.fakepcs import INTEL_HOSTS, FakePCS, Response, normalize_query
from tests.test_pckcert import CASES, PCKCERT, query, raw_tcb, serve_platform
from tests.test_ssrf import guard

SCENARIO = "2025-05-27_intel-pcs-recording"

# Columns: the client's request, and the upstream path the fault is injected on.
COLUMNS = {
    "tcb": ("/sgx/certification/v4/tcb", {"fmspc": "00906ED50000"}, "/tcb"),
    "qe identity": ("/sgx/certification/v4/qe/identity", {}, "/qe/identity"),
    "pckcrl": ("/sgx/certification/v4/pckcrl", {"ca": "processor", "encoding": "der"}, "/pckcrl"),
    "rootcacrl": ("/sgx/certification/v4/rootcacrl", {}, "/IntelSGXRootCA.der"),
    "crl?uri=": ("/sgx/certification/v4/crl", {"uri": INTEL_ROOT_CDP}, "/IntelSGXRootCA.der"),
    "new pckcert (LAZY)": (PCKCERT, query(*raw_tcb(*CASES[0][:2])), "/pckcerts"),
}

FAULT_MATRIX = """
fault                       | tcb | qe identity | pckcrl | rootcacrl | crl?uri= | new pckcert (LAZY)
timeout                     | 502 | 502         | 502    | 502       | 502      | 502
connection reset            | 502 | 502         | 502    | 502       | 502      | 502
truncated body              | 502 | 502         | 502    | 502       | 502      | 502
wrong content type          | 200 | 200         | 200    | 200       | 200      | 200
missing issuer-chain header | 502 | 502         | 502    | 200       | 200      | 502
folded issuer-chain header  | 502 | 502         | 502    | 200       | 200      | 502
429 without Retry-After     | 404 | 404         | 404    | 404       | 404      | 404
429 with Retry-After        | 404 | 404         | 404    | 404       | 404      | 404
500                         | 404 | 404         | 404    | 404       | 404      | 404
503                         | 404 | 404         | 404    | 404       | 404      | 404
garbage JSON                | 502 | 502         | 502    | 502       | 502      | 502
HTML error page with 200    | 502 | 502         | 502    | 502       | 502      | 502
"""


def parse_matrix(text: str) -> dict[tuple[str, str], int]:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    header = [cell.strip() for cell in lines[0].split("|")]
    assert header[1:] == list(COLUMNS), header
    cells = {}
    for line in lines[1:]:
        fault, *statuses = [cell.strip() for cell in line.split("|")]
        for column, status in zip(header[1:], statuses):
            cells[fault, column] = int(status)
    return cells


MATRIX = parse_matrix(FAULT_MATRIX)
UPSTREAM_TIMEOUT = 0.5  # seconds: the timeout row waits this long per cell

GARBAGE_JSON = b'{"tcbInfo":{"id":"SGX","version":3,"fmspc":"00906ED50000","tcbLevels":[{"tcb":'
HTML_PAGE = (
    b"<!DOCTYPE html><html><head><title>Service Unavailable</title></head>"
    b"<body><h1>The service is temporarily unavailable.</h1></body></html>"
)


class FaultyPCS:
    """An HTTP/1.1 upstream on 127.0.0.1 built on raw sockets.

    Requests whose path contains ``target`` get ``fault`` (the first ``times`` of them, or
    all); every other request gets what ``genuine`` (a FakePCS's table of responses, which
    need not be started) would answer. Each answer closes its connection.
    """

    def __init__(
        self,
        genuine: FakePCS,
        target: str,
        fault: str | None,
        times: int | None = None,
        retry_after: str = "1",
    ):
        self.genuine = genuine
        self.target = target
        self.fault = fault
        self.times = times
        self.retry_after = retry_after
        self.calls: list[str] = []
        self._faulted = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    # -- lifecycle
    def start(self) -> FaultyPCS:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._acceptor.join(5)
        self._sock.close()
        for thread in self._threads:
            thread.join(5)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def settings(self) -> dict:
        return {
            "pcs_url": f"{self.base}/sgx/certification/v4/",
            "rootca_crl_url": INTEL_ROOT_CDP,
            "url_map": ",".join(f"{host}={self.base}" for host in INTEL_HOSTS),
        }

    def count(self, fragment: str) -> int:
        with self._lock:
            return sum(1 for path in self.calls if fragment in path)

    # -- serving
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            request = self._read_request(conn)
            if request is None:
                return
            method, target = request
            split = urllib.parse.urlsplit(target)
            with self._lock:
                self.calls.append(split.path)
                faulty = (
                    self.fault is not None
                    and self.target in split.path
                    and (self.times is None or self._faulted < self.times)
                )
                if faulty:
                    self._faulted += 1
            genuine = self._genuine(method, split)
            if faulty:
                self._misbehave(conn, genuine)
            elif genuine is None:
                self._send(conn, 404, [("Error-Code", "NotFound")], b"")
            else:
                self._send(conn, genuine.status, genuine.headers, genuine.body)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    @staticmethod
    def _read_request(conn: socket.socket) -> tuple[str, str] | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return method, target

    def _genuine(self, method: str, split) -> Response | None:
        wanted = normalize_query(urllib.parse.parse_qs(split.query, keep_blank_values=True))
        path = urllib.parse.unquote(split.path)
        for response in self.genuine.responses:
            if response.matches(method, path, wanted):
                return response
        return None

    @staticmethod
    def _send(
        conn: socket.socket, status: int, headers, body: bytes, content_length: int | None = None
    ) -> None:
        lines = [f"HTTP/1.1 {status} Whatever"]
        lines += [
            f"{name}: {value}"
            for name, value in headers
            if name.lower() not in ("content-length", "connection")
        ]
        lines += [
            f"Content-Length: {len(body) if content_length is None else content_length}",
            "Connection: close",
            "",
            "",
        ]
        conn.sendall("\r\n".join(lines).encode("latin-1") + body)

    def _misbehave(self, conn: socket.socket, genuine: Response | None) -> None:
        fault = self.fault
        status, headers, body = (
            (genuine.status, list(genuine.headers), genuine.body)
            if genuine is not None
            else (404, [], b"")
        )
        if fault == "timeout":
            self._stop.wait(10 * UPSTREAM_TIMEOUT)  # longer than dcapd waits
        elif fault == "connection reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif fault == "truncated body":
            self._send(conn, status, headers, body[: len(body) // 2], len(body))
        elif fault == "wrong content type":
            self._send(
                conn,
                status,
                [
                    (n, "text/html; charset=utf-8") if n.lower() == "content-type" else (n, v)
                    for n, v in headers
                ],
                body,
            )
        elif fault == "folded issuer-chain header":  # obs-fold: CRLF + space in the value
            self._send(
                conn,
                status,
                [
                    (n, v[:-40] + "\r\n " + v[-40:])
                    if n.lower().endswith("issuer-chain")
                    else (n, v)
                    for n, v in headers
                ],
                body,
            )
        elif fault == "missing issuer-chain header":
            self._send(
                conn,
                status,
                [(n, v) for n, v in headers if not n.lower().endswith("issuer-chain")],
                body,
            )
        elif fault == "429 without Retry-After":
            self._send(
                conn,
                429,
                [("Content-Type", "application/json")],
                b'{"statusCode":429,"message":"Rate limit is exceeded."}',
            )
        elif fault == "429 with Retry-After":
            self._send(
                conn,
                429,
                [("Retry-After", self.retry_after), ("Content-Type", "application/json")],
                b'{"statusCode":429,"message":"Rate limit is exceeded."}',
            )
        elif fault in ("500", "503"):
            self._send(
                conn, int(fault), [("Request-ID", "f" * 32), ("Error-Code", "InternalError")], b""
            )
        elif fault == "garbage JSON":
            self._send(conn, 200, headers, GARBAGE_JSON)
        elif fault == "HTML error page with 200":
            self._send(
                conn,
                200,
                [(n, "text/html") if n.lower() == "content-type" else (n, v) for n, v in headers],
                HTML_PAGE,
            )
        else:  # pragma: no cover - a typo in the matrix
            raise AssertionError(f"unknown fault {fault!r}")


@pytest.fixture
def genuine() -> FakePCS:
    """The recorded answers (and the test platform's pckcerts), used as a table only."""
    fake = FakePCS(SCENARIO)
    serve_platform(fake)
    return fake


@pytest.fixture
def faulty(genuine):
    started = []

    def start(target: str, fault: str | None, **kwargs) -> FaultyPCS:
        server = FaultyPCS(genuine, target, fault, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.mark.parametrize(
    "fault,column", sorted(MATRIX), ids=[f"{f} x {c}" for f, c in sorted(MATRIX)]
)
def test_fault_matrix(tmp_path, make_client, genuine, faulty, fault, column):
    route, params, target = COLUMNS[column]
    upstream = faulty(target, fault)
    client = make_client(
        upstream_retries=0, upstream_timeout=UPSTREAM_TIMEOUT, **upstream.settings()
    )
    adapter = guard(client.app)
    store = client.app.services.store
    started = time.monotonic()
    result = client.simulate_get(route, params=params)
    elapsed = time.monotonic() - started
    expected = MATRIX[fault, column]
    assert result.status_code == expected, (result.status_code, result.text)
    assert upstream.count(target) == 1, "no retries configured: one attempt"
    assert adapter.hosts() == {"127.0.0.1"}
    assert elapsed < UPSTREAM_TIMEOUT + 3
    if expected != 200:
        assert store.keys() == [], "nothing is cached from a failed fetch"
        return
    # A 200 cell: served and cached exactly what Intel signed, with the route's own type.
    reference = reference_client(make_client, faulty, route, params, tmp_path / "reference")
    assert result.content == reference.content
    assert result.headers["content-type"] == reference.headers["content-type"]
    assert snapshot_bodies(store) == snapshot_bodies(reference.app.services.store)


def reference_client(make_client, faulty, route, params, cache_dir):
    """The same request against an upstream without faults, on its own cache."""
    upstream = faulty("-", None)
    client = make_client(cache_dir=str(cache_dir), upstream_retries=0, **upstream.settings())
    result = client.simulate_get(route, params=params)
    assert result.status_code == 200
    result.app = client.app
    return result


def snapshot_bodies(store) -> dict[str, tuple]:
    """Cached entries without their timestamps: (body, headers, content type)."""
    entries = {}
    for key in store.keys():
        entry = store.get(key)
        entries[key] = (entry.body, entry.headers, entry.content_type)
    return entries


# --- retries: a few cells with retries on ----------------------------------------------------

TCB = COLUMNS["tcb"]


def retrying_client(make_client, upstream, retries=2, timeout=5.0):
    client = make_client(upstream_retries=retries, upstream_timeout=timeout, **upstream.settings())
    guard(client.app)
    return client


def test_503_once_is_retried_and_the_answer_cached(make_client, faulty):
    upstream = faulty("/tcb", "503", times=1)
    client = retrying_client(make_client, upstream)
    assert client.simulate_get(TCB[0], params=TCB[1]).status_code == 200
    assert upstream.count("/tcb") == 2
    assert client.app.services.store.keys() == ["tcb/sgx/4/00906ED50000/STANDARD"]


def test_reset_once_is_retried(make_client, faulty):
    upstream = faulty("/IntelSGXRootCA.der", "connection reset", times=1)
    client = retrying_client(make_client, upstream)
    assert client.simulate_get("/sgx/certification/v4/rootcacrl").status_code == 200
    assert upstream.count("/IntelSGXRootCA.der") == 2


def test_429_retry_after_is_honoured(make_client, faulty):
    upstream = faulty("/qe/identity", "429 with Retry-After", times=1, retry_after="1")
    client = retrying_client(make_client, upstream)
    started = time.monotonic()
    result = client.simulate_get("/sgx/certification/v4/qe/identity")
    elapsed = time.monotonic() - started
    assert result.status_code == 200
    assert upstream.count("/qe/identity") == 2
    assert 1.0 <= elapsed < 4.0, elapsed


def test_429_without_retry_after_backs_off_and_retries(make_client, faulty):
    upstream = faulty("/pckcrl", "429 without Retry-After", times=2)
    client = retrying_client(make_client, upstream)
    result = client.simulate_get("/sgx/certification/v4/pckcrl", params={"ca": "platform"})
    assert result.status_code == 200
    assert upstream.count("/pckcrl") == 3


def test_retry_after_beyond_the_deadline_is_not_waited_for(make_client, faulty):
    upstream = faulty("/tcb", "429 with Retry-After", retry_after="30")
    client = retrying_client(make_client, upstream, timeout=3.0)
    started = time.monotonic()
    result = client.simulate_get(TCB[0], params=TCB[1])
    assert result.status_code == 404
    assert time.monotonic() - started < 1.5
    assert upstream.count("/tcb") == 1
    assert client.app.services.store.keys() == []


def test_persistent_500_is_retried_then_404_and_nothing_cached(make_client, faulty):
    upstream = faulty("/tcb", "500")
    client = retrying_client(make_client, upstream, retries=2)
    result = client.simulate_get(TCB[0], params=TCB[1])
    assert result.status_code == 404
    assert upstream.count("/tcb") == 3, "1 attempt + 2 retries"
    assert client.app.services.store.keys() == []


def test_timeouts_stop_at_the_overall_deadline(make_client, faulty):
    upstream = faulty("/tcb", "timeout")
    client = retrying_client(make_client, upstream, retries=3, timeout=1.0)
    started = time.monotonic()
    result = client.simulate_get(TCB[0], params=TCB[1])
    elapsed = time.monotonic() - started
    assert result.status_code == 502
    assert elapsed < 2.5, elapsed
    assert client.app.services.store.keys() == []


@pytest.mark.parametrize("fault", ["garbage JSON", "missing issuer-chain header", "404"])
def test_answers_that_are_not_failures_are_not_retried(make_client, faulty, genuine, fault):
    """Upstream answered (200 with bad data, or Intel's 404): retrying cannot help."""
    if fault == "404":
        upstream = faulty("-", None)
        params = {"fmspc": "00000000F00D"}  # PCS: no such FMSPC
        expected = 404
    else:
        upstream = faulty("/tcb", fault)
        params = TCB[1]
        expected = 502
    client = retrying_client(make_client, upstream, retries=3)
    assert client.simulate_get(TCB[0], params=params).status_code == expected
    assert upstream.count("/tcb") == 1
    assert client.app.services.store.keys() == []


def test_failed_then_good_fetch_caches_only_the_good_answer(make_client, faulty):
    """After any fault, the next request fetches again (no negative caching of errors) and
    stores Intel's bytes."""
    upstream = faulty("/tcb", "HTML error page with 200", times=1)
    client = retrying_client(make_client, upstream, retries=0)
    assert client.simulate_get(TCB[0], params=TCB[1]).status_code == 502
    assert client.app.services.store.keys() == []
    result = client.simulate_get(TCB[0], params=TCB[1])
    assert result.status_code == 200
    assert b"<html" not in result.content
    assert upstream.count("/tcb") == 2
