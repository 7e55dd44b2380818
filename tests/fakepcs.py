"""A fake Intel PCS for the test suite.

Serves the real Intel-signed recordings in ``shared/fixtures/pcs/<scenario>/``
(see ``shared/fixtures/README.md``) over plain HTTP on 127.0.0.1 only.

Usage::

    with FakePCS('2025-06-19_sgx-00A067110000_tdx-B0C06F000000') as pcs:
        settings.url_map = pcs.url_map          # or use pcs.pcs_url / pcs.rootca_crl_url
        ...
        assert pcs.count('/tdx/certification/v4/tcb') == 1

Matching of recorded responses (as the fixtures README says): method + path
(case-sensitive) + query; query *keys* are compared exactly, *values*
case-insensitively; a missing ``update`` is treated as ``update=standard`` on
the request side and on the recording side; any extra or missing parameter
means no match.  No match gives ``404`` with ``Error-Code: NotFound`` and an
empty body.  Responses added with :meth:`FakePCS.add_response` take priority
over the recordings (the most recently added first).

Only the Python standard library is used (no pytest fixtures here).
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional, Union
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "FIXTURES",
    "PCS_FIXTURES",
    "SCENARIOS",
    "Call",
    "FakePCS",
    "Fault",
    "Response",
    "load_manifest",
    "load_body",
    "normalize_query",
]

#: ``shared/fixtures`` beside the repository (repo/tests/fakepcs.py -> ../../shared).
FIXTURES: Path = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
#: ``shared/fixtures/pcs``: one directory per recorded scenario.
PCS_FIXTURES: Path = FIXTURES / "pcs"

#: Scenario directory names (those holding a manifest.json), sorted.
SCENARIOS: list[str] = (
    sorted(p.parent.name for p in PCS_FIXTURES.glob("*/manifest.json"))
    if PCS_FIXTURES.is_dir()
    else []
)

HOST = "127.0.0.1"
INTEL_HOSTS = (
    "https://certificates.trustedservices.intel.com",
    "https://api.trustedservices.intel.com",
)
ROOTCA_CRL_PATH = "/IntelSGXRootCA.der"

_QueryIn = Optional[Mapping[str, Union[str, Sequence[str]]]]
_NormQuery = tuple[tuple[str, tuple[str, ...]], ...]


def load_manifest(scenario: str) -> dict:
    """The parsed ``manifest.json`` of ``scenario``."""
    path = PCS_FIXTURES / scenario / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no such PCS fixture scenario: {scenario!r} ({path})")
    with path.open("rb") as f:
        return json.load(f)


def load_body(scenario: str, response: dict | str) -> bytes:
    """The body bytes of a manifest response (the entry itself or its ``id``)."""
    if isinstance(response, str):
        entries = [r for r in load_manifest(scenario)["responses"] if r["id"] == response]
        if not entries:
            raise KeyError(f"{scenario}: no response with id {response!r}")
        response = entries[0]
    return (PCS_FIXTURES / scenario / response["body_file"]).read_bytes()


def normalize_query(query: _QueryIn) -> _NormQuery:
    """Canonical form used for matching: values lower-cased, ``update`` defaulted.

    ``query`` maps names to a value or a list of values (as ``parse_qs`` gives).
    """
    norm: dict[str, tuple[str, ...]] = {}
    for key, value in (query or {}).items():
        values = (value,) if isinstance(value, str) else tuple(value)
        norm[key] = tuple(v.lower() for v in values)
    norm.setdefault("update", ("standard",))
    return tuple(sorted(norm.items()))


@dataclass
class Call:
    """One request the fake received."""

    method: str
    path: str  # path as sent, without the query string
    query: dict[str, list[str]]  # parse_qs(keep_blank_values=True)
    headers: dict[str, str]  # case-preserved copy of the request headers
    body: bytes = b""


@dataclass
class Response:
    """A response the fake can give (recorded or added)."""

    method: str
    path: str
    query: _NormQuery | None  # None: any query
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    id: str | None = None  # manifest id for recordings
    # Streamed answers (add_stream): the body is made while it is sent.
    chunks: Callable[[], Iterable[bytes]] | None = None
    interval: float = 0.0  # seconds between chunks
    length: int | None = None  # Content-Length; None: the body ends when the connection closes

    def matches(self, method: str, path: str, query: _NormQuery) -> bool:
        return (
            self.method == method
            and self.path == path
            and (self.query is None or self.query == query)
        )


_FAULT_COUNT_LOCK = threading.Lock()


@dataclass
class Fault:
    """Active fault injected by :meth:`FakePCS.fail_with`."""

    status: int | None = None
    delay: float = 0.0
    close: bool = False
    paths: str | None = None  # substring of the request path; None: all
    times: int | None = None  # how many more requests it hits; None: all
    headers: tuple[tuple[str, str], ...] = ()  # sent with ``status``

    def applies(self, path: str) -> bool:
        if self.paths is not None and self.paths not in path:
            return False
        if self.times is None:
            return True
        with _FAULT_COUNT_LOCK:
            if self.times <= 0:
                return False
            self.times -= 1
            return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, fake: FakePCS):
        self.fake = fake
        self.open_connections: set = set()
        self.conn_lock = threading.Lock()
        super().__init__((HOST, 0), _Handler)

    def server_bind(self):
        # Skip HTTPServer.server_bind's socket.getfqdn() (slow with broken DNS).
        socketserver.TCPServer.server_bind(self)
        self.server_name = HOST
        self.server_port = self.server_address[1]

    def handle_error(self, request, client_address):
        pass  # no tracebacks on stderr (client went away, server stopped, ...)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakePCS"
    timeout = 60

    server: _Server

    def setup(self):
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm and
        # the client's delayed ACK hold each answer for ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.conn_lock:
            self.server.open_connections.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.conn_lock:
                self.server.open_connections.discard(self.connection)

    def log_message(self, format, *args):  # noqa: A002 - silence http.server
        pass

    def log_error(self, format, *args):  # noqa: A002
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, headers: Sequence[tuple[str, str]], body: bytes):
        self.send_response_only(status)
        for name, value in headers:
            if name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.wfile.flush()

    def _send_stream(self, response: Response) -> None:
        """A streamed answer; the connection is closed after it (the client may stop
        reading halfway, as dcapd does past its limits)."""
        assert response.chunks is not None
        stopping = self.server.fake._stopping
        self.close_connection = True
        self.send_response_only(response.status)
        for name, value in response.headers:
            if name.lower() not in ("content-length", "connection"):
                self.send_header(name, value)
        if response.length is not None:
            self.send_header("Content-Length", str(response.length))
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for chunk in response.chunks():
                if stopping.is_set():
                    break
                self.wfile.write(chunk)
                if response.interval and stopping.wait(response.interval):
                    break
        except OSError:  # the client hung up
            pass

    def _handle(self):
        fake = self.server.fake
        split = urlsplit(self.path)
        raw_path = split.path
        query = parse_qs(split.query, keep_blank_values=True)
        body = self._read_body()
        fake._record(Call(self.command, raw_path, query, dict(self.headers.items()), body))

        fault = fake._fault
        if fault is not None and fault.applies(raw_path):
            if fault.delay > 0:
                fake._stopping.wait(fault.delay)
            if fault.close:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if fault.status is not None:
                self._send(fault.status, list(fault.headers), b"")
                return

        response = fake._find(self.command, unquote(raw_path), normalize_query(query))
        if response is None:
            self._send(404, [("Error-Code", "NotFound")], b"")
        elif response.chunks is not None:
            self._send_stream(response)
        else:
            self._send(response.status, response.headers, response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle


class FakePCS:
    """Fake Intel PCS on 127.0.0.1 serving one scenario's recordings.

    ``FakePCS(scenario)`` loads the recordings; :meth:`start` (or ``with``)
    binds an ephemeral port on 127.0.0.1 and serves in a background thread;
    :meth:`stop` shuts it down and closes the listening and open sockets.
    """

    def __init__(self, scenario: str | None = None):
        self.scenario = scenario
        self.manifest: dict | None = None
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._added: list[Response] = []
        self._recorded: list[Response] = []
        self._fault: Fault | None = None
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        if scenario is not None:
            self.manifest = load_manifest(scenario)
            for entry in self.manifest["responses"]:
                self._recorded.append(
                    Response(
                        method=entry.get("method", "GET").upper(),
                        path=entry["path"],
                        query=normalize_query(entry.get("query") or {}),
                        status=int(entry["status"]),
                        headers=list(entry.get("headers", {}).items()),
                        body=load_body(scenario, entry),
                        id=entry["id"],
                    )
                )

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> FakePCS:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakePCS:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()  # wakes handlers sleeping in a delay fault
        server.shutdown()
        with server.conn_lock:
            conns = list(server.open_connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    close = stop

    def __enter__(self) -> FakePCS:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __del__(self):
        try:
            self.stop()
        except Exception:
            pass

    # -- addresses ---------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakePCS is not started")
        return self._server.server_address[1]

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pcs_url(self) -> str:
        return f"{self.base}/sgx/certification/v4/"

    @property
    def rootca_crl_url(self) -> str:
        return f"{self.base}{ROOTCA_CRL_PATH}"

    @property
    def url_map(self) -> str:
        return ",".join(f"{host}={self.base}" for host in INTEL_HOSTS)

    def url(self, path: str) -> str:
        """``base`` + ``path`` (``path`` starting with '/')."""
        return self.base + path

    # -- calls -------------------------------------------------------------
    def _record(self, call: Call) -> None:
        with self._lock:
            self._calls.append(call)

    @property
    def calls(self) -> list[Call]:
        """Snapshot (a new list) of the requests received so far, in order."""
        with self._lock:
            return list(self._calls)

    def count(self, path_suffix: str | None = None, method: str | None = None) -> int:
        """Number of requests whose path ends with ``path_suffix`` and method is ``method``."""
        with self._lock:
            return sum(
                1
                for c in self._calls
                if (path_suffix is None or c.path.endswith(path_suffix))
                and (method is None or c.method.upper() == method.upper())
            )

    def reset_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    # -- responses ---------------------------------------------------------
    @property
    def responses(self) -> list[Response]:
        """All responses in matching order (added ones first)."""
        with self._lock:
            return list(reversed(self._added)) + list(self._recorded)

    def _find(self, method: str, path: str, query: _NormQuery) -> Response | None:
        for response in self.responses:
            if response.matches(method, path, query):
                return response
        return None

    def add_response(
        self,
        method: str,
        path: str,
        query: _QueryIn,
        status: int,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> Response:
        """Add a response; it wins over recordings and earlier added ones.

        ``query`` None matches any query; otherwise it is matched like a
        recording (values case-insensitive, missing ``update`` = standard).
        """
        if isinstance(headers, Mapping):
            header_list = list(headers.items())
        else:
            header_list = list(headers or [])
        response = Response(
            method.upper(),
            path,
            None if query is None else normalize_query(query),
            int(status),
            header_list,
            bytes(body),
        )
        with self._lock:
            self._added.append(response)
        return response

    def add_stream(
        self,
        method: str,
        path: str,
        query: _QueryIn,
        chunks: Callable[[], Iterable[bytes]],
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        interval: float = 0.0,
        length: int | None = None,
    ) -> Response:
        """Add a streamed answer (matched like :meth:`add_response`): the body is what
        ``chunks()`` yields, sent as it is made, ``interval`` seconds apart (a slow drip), with
        ``Content-Length: length`` if given, else ended by closing the connection. For bodies
        too large to hold (a decompression bomb, hundreds of MiB) or too slow to wait for."""
        response = self.add_response(method, path, query, status, headers)
        response.chunks, response.interval, response.length = chunks, interval, length
        return response

    def clear_added(self) -> None:
        """Remove every response added with :meth:`add_response`."""
        with self._lock:
            self._added.clear()

    # -- faults ------------------------------------------------------------
    def fail_with(
        self,
        status: int | None = None,
        delay: float = 0.0,
        close: bool = False,
        paths: str | None = None,
        times: int | None = None,
        headers: dict | None = None,
    ) -> None:
        """Inject a fault into requests whose path contains ``paths`` (None: all).

        Matching requests (still recorded in :attr:`calls`) first sleep
        ``delay`` seconds, then either have their connection closed without an
        answer (``close``), or get ``status`` with an empty body, or (delay
        only) the normal answer.  ``times`` limits it to the next N matching
        requests; ``headers`` go out with ``status`` (e.g. Retry-After).
        ``fail_with()`` with no arguments clears it.
        """
        if status is None and not delay and not close:
            self._fault = None
        else:
            self._fault = Fault(
                status, float(delay), bool(close), paths, times, tuple((headers or {}).items())
            )

    def clear_fault(self) -> None:
        self._fault = None

    def __repr__(self) -> str:
        where = self.base if self._server is not None else "stopped"
        return f"<FakePCS {self.scenario or '(empty)'} {where}>"
