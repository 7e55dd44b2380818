"""Bodies decided from the request head (issue 13): the TLS front answers 401/413 from the
route, the token and ``Content-Length`` before a byte of the body is read or spooled; with
``tls = off`` the same rules apply in front of the app. Also the framing the front must agree
on with waitress (dcapd.httpframe). Servers on 127.0.0.1 only."""

from __future__ import annotations

import json
import time

import falcon.testing
import pytest

from dcapd.app import create_app, route_paths
from dcapd.errors import STATUS_TEXTS
from dcapd.gate import ADMIN, BODY_ROLES, USER
from dcapd.httpframe import Chunked, FramingError, parse_request_head
from tests.test_hostile_connections import (
    COLLATERAL,
    MIB,
    PLATFORMS,
    first_bytes_after,
    head_of,
    read_answer,
    rss_mib,
    tls_socket,
)
from tests.test_platforms import ADMIN as ADMIN_TOKEN
from tests.test_platforms import TOKENS
from tests.test_platforms import USER as USER_TOKEN
from tests.test_slow_clients import TCB, serving

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


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
        assert (status, body) == (413, STATUS_TEXTS[413].encode())
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
