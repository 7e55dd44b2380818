"""dcapd's HTTPS front (dcapd.tls, dcapd.server): loopback only, every server on 127.0.0.1:0."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import http.client
import ipaddress
import logging
import os
import socket
import ssl
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from dcapd import tls
from dcapd.config import load_config
from dcapd.eventloop import unavailable
from dcapd.server import Server, waitress_options
from tests.servers import running_dcapd

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

LOOPBACK = "127.0.0.1"


def echo_app(environ, start_response):
    """Tiny WSGI app: who called, how, and how much body arrived."""
    if environ["PATH_INFO"] == "/slow":
        time.sleep(0.3)
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    text = " ".join(
        [
            environ["REMOTE_ADDR"],
            str(environ["REMOTE_PORT"]),
            environ["wsgi.url_scheme"],
            environ["REQUEST_METHOD"],
            environ["PATH_INFO"],
            str(len(body)),
            environ.get("HTTP_X_FORWARDED_FOR", "-"),
        ]
    ).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(text)))])
    return [text]


def parse(text):
    addr, port, scheme, method, path, size, xff = text.split(" ")
    return {
        "addr": addr,
        "port": int(port),
        "scheme": scheme,
        "method": method,
        "path": path,
        "size": int(size),
        "xff": xff,
    }


def make_config(listen_port=0, **kw):
    """A real Config (defaults from dcapd.config.SETTINGS only), then the given attributes;
    the cache directory (where the generated certificate is kept) a new temporary one."""
    base = load_config({"listen": f"{LOOPBACK}:{listen_port}", "tls": "auto"}, environ={})
    if "cache_dir" not in kw:
        kw["cache_dir"] = tempfile.mkdtemp(prefix="dcapd-test-tls-")
    return dataclasses.replace(base, **kw)


def client_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture
def session():
    # trust_env=False: REQUESTS_CA_BUNDLE/SSL_CERT_FILE in the environment would override verify.
    with requests.Session() as s:
        s.trust_env = False
        s.verify = False
        yield s


@pytest.fixture
def https_server():
    # gate=None: echo_app takes a body on any path (dcapd's body rules: test_body_rules.py).
    srv = Server(echo_app, make_config(), gate=None)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_https_get_and_large_post_with_real_client_address(https_server, session):
    srv = https_server
    assert srv.url == f"https://127.0.0.1:{srv.port}"
    assert srv.backend_port and srv.backend_port != srv.port

    r = session.get(srv.url + "/hello", headers={"X-Forwarded-For": "6.6.6.6"}, timeout=5)
    assert r.status_code == 200
    assert r.headers["Server"] == "dcapd"
    info = parse(r.text)
    assert info["addr"] == LOOPBACK and info["scheme"] == "https" and info["path"] == "/hello"
    assert info["xff"] == "-"  # untrusted proxy headers are cleared

    payload = os.urandom(200 * 1024)
    r = session.post(srv.url + "/upload", data=payload, timeout=10)
    assert r.status_code == 200
    assert parse(r.text)["size"] == len(payload)

    # The app sees the client's own port, on every request of a keep-alive connection.
    conn = http.client.HTTPSConnection(LOOPBACK, srv.port, timeout=5, context=client_context())
    try:
        conn.connect()
        local_port = conn.sock.getsockname()[1]
        for method, body in (("GET", None), ("POST", payload), ("GET", None)):
            conn.request(method, "/whoami", body=body)
            resp = conn.getresponse()
            info = parse(resp.read().decode())
            assert resp.status == 200
            assert (info["addr"], info["port"], info["method"]) == (LOOPBACK, local_port, method)
            assert info["size"] == (len(body) if body else 0)
    finally:
        conn.close()


def test_concurrent_connections_each_see_their_own_port(https_server):
    def one(_):
        conn = http.client.HTTPSConnection(
            LOOPBACK, https_server.port, timeout=10, context=client_context()
        )
        try:
            conn.connect()
            mine = conn.sock.getsockname()[1]
            seen = []
            for _ in range(3):
                conn.request("POST", "/c", body=b"x" * 20000)
                resp = conn.getresponse()
                seen.append(parse(resp.read().decode())["port"])
            return mine, seen
        finally:
            conn.close()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    for mine, seen in results:
        assert seen == [mine] * 3


def test_generated_certificate():
    cert_pem, key_pem = tls.generate_self_signed(
        ["pccs.example.test", "10.1.2.3", "[fd00::7]", "0.0.0.0", "localhost"]
    )
    assert b"BEGIN PRIVATE KEY" in key_pem
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert sorted(dns) == ["localhost", "pccs.example.test"]
    assert set(ips) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3", "fd00::7")
    }
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - now > datetime.timedelta(days=300)


def test_served_certificate_matches_logged_fingerprint(https_server, caplog):
    der = ssl.PEM_cert_to_DER_cert(
        ssl.get_server_certificate((LOOPBACK, https_server.port), timeout=5)
    )
    fp = hashlib.sha256(der).hexdigest()
    assert https_server.fingerprint.replace(":", "").lower() == fp
    cert = x509.load_der_x509_certificate(der)
    ips = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in ips

    with caplog.at_level("INFO", logger="dcapd.tls"):
        _, fingerprint = tls.server_ssl_context()
    assert fingerprint in caplog.text


def _clear_keys_under(root):
    """Files under *root* holding an unencrypted private key."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            if b"PRIVATE KEY-----" in data.replace(b"ENCRYPTED PRIVATE KEY-----", b""):
                found.append(path)
    return found


@pytest.mark.parametrize("force_fallback", [False, True], ids=["default", "encrypted-tempdir"])
def test_generated_key_never_written_in_clear(tmp_path, monkeypatch, force_fallback, session):
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    monkeypatch.chdir(work)
    if force_fallback:
        monkeypatch.setattr(tls, "_load_via_memfd", lambda *a: False)

    calls = []
    real_load = ssl.SSLContext.load_cert_chain

    def spy(ctx, certfile, keyfile=None, password=None):
        files = {}
        for path in {certfile, keyfile or certfile}:
            with open(path, "rb") as fh:
                files[path] = fh.read()
        calls.append(
            {
                "certfile": certfile,
                "keyfile": keyfile,
                "password": password,
                "files": files,
                "clear": _clear_keys_under(tmp_root) + _clear_keys_under(work),
            }
        )
        return real_load(ctx, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)

    # Nowhere to keep it (a PostgreSQL cache has no directory): generated and loaded in memory.
    config = make_config(cache_dir="", cache_url="postgresql://dcapd@127.0.0.1:1/dcapd")
    with Server(echo_app, config) as srv:
        assert session.get(srv.url + "/k", timeout=5).status_code == 200

    assert len(calls) == 1
    call = calls[0]
    assert call["clear"] == []  # nothing readable was on disk even while loading
    if not force_fallback and hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        assert call["certfile"].startswith("/proc/self/fd/")
    else:
        assert str(tmp_root) in call["keyfile"]
        key_data = call["files"][call["keyfile"]]
        assert b"BEGIN ENCRYPTED PRIVATE KEY" in key_data and call["password"]
    # And nothing is left behind.
    assert list(tmp_root.iterdir()) == []
    assert list(work.iterdir()) == []


def test_given_certificate_files_are_served(tmp_path, session):
    cert_pem, key_pem = tls.generate_self_signed(["given.example.test"])
    cert_file, key_file = tmp_path / "server.crt", tmp_path / "server.key"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    combined = tmp_path / "combined.pem"
    combined.write_bytes(cert_pem + key_pem)
    want = ssl.PEM_cert_to_DER_cert(cert_pem.decode())

    for cert, key in ((str(cert_file), str(key_file)), (str(combined), "")):
        with Server(echo_app, make_config(cert_file=cert, key_file=key)) as srv:
            served = ssl.PEM_cert_to_DER_cert(
                ssl.get_server_certificate((LOOPBACK, srv.port), timeout=5)
            )
            assert served == want
            assert srv.fingerprint.replace(":", "").lower() == hashlib.sha256(want).hexdigest()
            # Verifying against the given certificate works too (IP SAN 127.0.0.1).
            r = session.get(srv.url + "/v", verify=str(cert_file), timeout=5)
            assert r.status_code == 200


def test_tls_off_serves_plain_http(session):
    with Server(echo_app, make_config(tls="off")) as srv:
        assert srv.url == f"http://127.0.0.1:{srv.port}"
        assert srv.fingerprint is None  # the same front, without TLS, before waitress
        r = session.get(srv.url + "/plain", timeout=5)
        assert r.status_code == 200
        info = parse(r.text)
        assert (info["addr"], info["scheme"], info["path"]) == (LOOPBACK, "http", "/plain")


@pytest.mark.parametrize("tls_mode", ["auto", "off"])
def test_proxy_headers_reach_the_app_from_trusted_proxies_only(tls_mode, session):
    """``[server] trusted_proxies``: a request from one keeps its X-Forwarded-* headers (the
    access log names the client from them); from any other peer they are removed."""
    forged = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http"}
    trusting = make_config(tls=tls_mode, trusted_proxies=load_config(
        {"trusted_proxies": "127.0.0.0/8"}, environ={}).trusted_proxies)  # fmt: skip
    for config, expected in ((trusting, "203.0.113.9"), (make_config(tls=tls_mode), "-")):
        with Server(echo_app, config, gate=None) as srv:
            # Answered by the front (dcapd.direct), then relayed to waitress.
            for method, body in (("GET", None), ("POST", b"x" * 10)):
                r = session.request(method, srv.url + "/who", headers=forged, data=body)
                assert r.status_code == 200
                assert parse(r.text)["xff"] == expected, (method, config.trusted_proxies)


@pytest.mark.parametrize("choice", ["asyncio", "auto"])
def test_each_event_loop_serves_keep_alive_and_bodies(choice, session, caplog):
    """``[server] event_loop``: asyncio's selector loop and uvloop (auto, where installed) both
    run the front's own transport, and the start line says which one runs."""
    expected = "asyncio" if choice == "asyncio" or unavailable("uvloop") else "uvloop"
    caplog.set_level(logging.INFO, logger="dcapd")
    with Server(echo_app, make_config(event_loop=choice), gate=None) as srv:
        ports = set()
        for _ in range(3):  # one connection, kept alive
            r = session.get(srv.url + "/again", timeout=5)
            assert r.status_code == 200
            ports.add(parse(r.text)["port"])
        assert len(ports) == 1
        body = os.urandom(300_000)  # relayed to waitress over several reads and writes
        r = session.post(srv.url + "/upload", data=body, timeout=10)
        assert r.status_code == 200 and parse(r.text)["size"] == len(body)
        # The same connection: after answers from callbacks (dcapd.quickconn), the relay's.
        assert parse(r.text)["port"] in ports
        assert session.get(srv.url + "/after", timeout=5).status_code == 200
    started = [m for m in caplog.messages if m.startswith("dcapd listening on")]
    assert started and started[-1].endswith(f"(event loop: {expected})"), started


def _timed_get(url):
    with requests.Session() as s:
        s.trust_env = False
        s.verify = False
        t0 = time.monotonic()
        r = s.get(url, timeout=10)
        return r.status_code, time.monotonic() - t0


def test_silent_and_half_hello_clients_do_not_delay_others():
    cfg = make_config(tls_handshake_timeout=5)
    with Server(echo_app, cfg) as srv:
        hostile = []
        try:
            for _ in range(10):
                hostile.append(socket.create_connection((LOOPBACK, srv.port), timeout=5))
            for _ in range(5):
                s = socket.create_connection((LOOPBACK, srv.port), timeout=5)
                # A TLS handshake record header announcing 512 bytes, then a few bytes only.
                s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(20))
                hostile.append(s)
            time.sleep(0.2)
            timings = []
            for _ in range(3):
                status, elapsed = _timed_get(srv.url + "/fast")
                assert status == 200
                timings.append(elapsed)
            assert max(timings) < 2.0, timings
        finally:
            for s in hostile:
                s.close()


def test_silent_client_dropped_after_handshake_timeout():
    with Server(echo_app, make_config(tls_handshake_timeout=0.5)) as srv:
        s = socket.create_connection((LOOPBACK, srv.port), timeout=5)
        try:
            t0 = time.monotonic()
            try:
                data = s.recv(100)
            except ConnectionResetError:
                data = b""
            elapsed = time.monotonic() - t0
        finally:
            s.close()
        assert data == b""
        assert 0.3 < elapsed < 3.0, elapsed


def test_garbage_on_tls_port_does_not_hurt(https_server):
    # Plain HTTP to the TLS port, and abrupt disconnects mid-handshake.
    s = socket.create_connection((LOOPBACK, https_server.port), timeout=5)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            while s.recv(1000):
                pass
        except ConnectionResetError:
            pass
    finally:
        s.close()
    for _ in range(10):
        s = socket.create_connection((LOOPBACK, https_server.port), timeout=5)
        s.sendall(b"\x16\x03\x01\x00")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    status, _ = _timed_get(https_server.url + "/still-alive")
    assert status == 200


def test_connection_closed_by_client_mid_request_is_not_garbage_collected(https_server, caplog):
    # The client sends a request and hangs up at once: the front's handler then
    # waits for waitress with nothing but its own references keeping it alive
    # (asyncio holds tasks weakly); a GC pass must not destroy it mid-flight.
    import gc

    with caplog.at_level("ERROR", logger="asyncio"):
        for _ in range(5):
            raw = socket.create_connection((LOOPBACK, https_server.port), timeout=5)
            tls_sock = client_context().wrap_socket(raw)
            tls_sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            tls_sock.close()
        time.sleep(0.1)
        gc.collect()
        time.sleep(0.5)
        gc.collect()
        status, _ = _timed_get(https_server.url + "/after")
    assert status == 200
    assert "destroyed" not in caplog.text


def _dcapd_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("dcapd-") and t.is_alive()]


def test_stop_releases_port_and_is_idempotent(session):
    srv = Server(echo_app, make_config())
    srv.start()
    port = srv.port
    assert session.get(srv.url + "/", timeout=5).status_code == 200
    # An idle keep-alive connection and a silent pre-handshake client must not hold stop() up.
    idle = http.client.HTTPSConnection(LOOPBACK, port, timeout=5, context=client_context())
    idle.request("GET", "/idle")
    idle.getresponse().read()
    silent = socket.create_connection((LOOPBACK, port), timeout=5)
    try:
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 3.0
        srv.stop()  # idempotent
        assert silent.recv(10) == b""
    finally:
        silent.close()
        idle.close()
    assert _dcapd_threads() == []
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, port), timeout=2).close()
    # The same port can be served again straight away.
    with Server(echo_app, make_config(listen_port=port)) as again:
        assert again.port == port
        assert session.get(again.url + "/again", timeout=5).status_code == 200
    assert _dcapd_threads() == []


def test_plain_server_stop_releases_port():
    srv = Server(echo_app, make_config(tls="off"))
    with srv:
        port = srv.port
        assert _timed_get(srv.url)[0] == 200
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, port), timeout=2).close()
    with Server(echo_app, make_config(tls="off", listen_port=port)) as again:
        assert again.port == port


def test_serve_forever_returns_on_stop():
    srv = Server(echo_app, make_config())
    runner = threading.Thread(target=srv.serve_forever)
    runner.start()
    try:
        deadline = time.monotonic() + 5
        while not srv.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.running
        assert _timed_get(srv.url + "/sf")[0] == 200
    finally:
        srv.stop()
        runner.join(5)
    assert not runner.is_alive()
    assert _dcapd_threads() == []


def test_unusable_certificate_fails_start_and_frees_port(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    srv = Server(echo_app, make_config(cert_file=str(bad)))
    with pytest.raises((ssl.SSLError, OSError, ValueError)):
        srv.start()
    assert _dcapd_threads() == []
    srv.stop()  # harmless after a failed start


def test_waitress_options_from_config():
    opts = waitress_options(make_config(tls="off"))  # the defaults of dcapd.config.SETTINGS
    assert opts["threads"] == 8
    # Behind the front (which enforces the deadlines and holds at most connection_limit
    # connections to waitress): channel_timeout as configured, room for the front's own.
    assert opts["connection_limit"] > 200
    assert opts["channel_timeout"] == 30
    assert opts["ident"] == "dcapd"
    # dcapd clears proxy headers itself, but from trusted proxies (PeerRestoringMiddleware).
    assert opts["clear_untrusted_proxy_headers"] is False and not opts.get("trusted_proxy")
    assert "sockets" not in opts

    custom = make_config(
        threads=3, connection_limit=50, channel_timeout=7, max_body_bytes=1000, idle_timeout=9
    )
    opts = waitress_options(custom, sockets=[])
    assert (opts["threads"], opts["channel_timeout"]) == (3, 7)
    assert 50 < opts["connection_limit"] <= 60
    assert opts["max_request_body_size"] == 1001  # waitress refuses >= this
    assert opts["sockets"] == []
    assert opts["cleanup_interval"] <= 7
    # Every key is one waitress accepts.
    from waitress.adjustments import Adjustments

    known = {name for name, _ in Adjustments._params}
    assert set(opts) <= known


def test_bad_tls_mode_rejected():
    with pytest.raises(ValueError):
        Server(echo_app, make_config(tls="maybe"))
    with pytest.raises(ValueError):
        tls.server_ssl_context(key_file="key.pem")


def test_the_generated_certificate_is_kept_in_the_cache_and_survives_a_restart(
    make_config, tmp_path
):
    """Issue 18: clients can trust it (--ca-file <cache>/tls/dcapd.crt) across restarts."""
    config = make_config(tls="auto", listen="127.0.0.1:0")
    with running_dcapd(config) as first:
        fingerprint = first.fingerprint
    kept = Path(config.cache_dir) / "tls"
    assert stat.S_IMODE((kept / "dcapd.key").stat().st_mode) == 0o600
    with running_dcapd(config) as again:
        assert again.fingerprint == fingerprint
        context = ssl.create_default_context(cafile=str(kept / "dcapd.crt"))
        with socket.create_connection(("127.0.0.1", again.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls_sock:
                assert tls_sock.version() in ("TLSv1.2", "TLSv1.3")
    (kept / "dcapd.key").write_bytes(b"not a key")
    with running_dcapd(config) as renewed:
        assert renewed.fingerprint != fingerprint
