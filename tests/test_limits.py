"""Issue 13: logs that cannot lie, limits on what upstream sends, JSON nesting bounded, uploads
imported in linear time. Servers on 127.0.0.1 ephemeral ports only; every wait is bounded."""

from __future__ import annotations

import base64
import json
import logging
import math
import socket
import ssl
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import requests

from dcapd import jsonlimits, selection
from dcapd.config import load_config
from dcapd.errors import STATUS_TEXTS
from dcapd.integrity import IntegrityError, verify_pck_cert, verify_signed_json
from dcapd.logs import JsonFormatter, escape
from dcapd.middleware import client_address
from dcapd.upstream import Upstream, UpstreamError
from tests import pki
from tests.conftest import upstream_settings
from tests.servers import dcapd_environment, running_dcapd
from tests.test_pckcert import PCKCERT, query
from tests.test_platforms import ADMIN, TOKENS, USER
from tests.test_refresh import SGX_CLASS, make_policy
from tests.test_ssrf import stop_process, wait_listening
from tests.uploads import upload_for_test_platform, upload_from_scenario

V4 = "/sgx/certification/v4"
SCENARIO = "2025-05-27_intel-pcs-recording"
MiB = 1024 * 1024


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---------------------------------------------------------------------------------------------
# dcapd as a subprocess (its own RSS, its own log)
# ---------------------------------------------------------------------------------------------


def start_dcapd(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, Path, str]:
    log_file = tmp_path / f"dcapd-{time.monotonic_ns()}.log"
    roots = tmp_path / "roots.pem"
    roots.write_text(pki.root_ca().pem)
    environment = dcapd_environment(
        DCAPD_LISTEN="127.0.0.1:0",
        DCAPD_TLS="off",
        DCAPD_CACHE_DIR=str(tmp_path / "cache"),
        DCAPD_TRUSTED_ROOTS=str(roots),
        DCAPD_REFRESH_SCHEDULE="0 0 0 1 1 *",
        NO_PROXY="127.0.0.1",
        no_proxy="127.0.0.1",
    )
    environment.update(env)
    with open(log_file, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "dcapd"],
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        url = wait_listening(process, log_file)
    except BaseException:
        stop_process(process)
        raise
    return process, log_file, url


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


# ---------------------------------------------------------------------------------------------
# 1. Logs that cannot lie
# ---------------------------------------------------------------------------------------------


def test_escape_writes_controls_and_backslashes_as_escapes():
    assert escape("/a\r\nb\x1b[2J\\x\x00\x7f\x85\u2028é") == (
        "/a\\x0d\\x0ab\\x1b[2J\\\\x\\x00\\x7f\\x85\\u2028é"
    )
    assert escape("/plain/path") == "/plain/path"


def test_client_address_believes_x_forwarded_for_only_from_trusted_proxies():
    trusted = load_config({"trusted_proxies": "10.0.0.1, 192.168.0.0/16"}, environ={})
    proxies = trusted.trusted_proxies
    env = {"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": "6.6.6.6, 203.0.113.9, 192.168.1.2"}
    # The right-most address no trusted proxy added: what the last trusted hop saw.
    assert client_address(env, proxies) == "203.0.113.9"
    assert client_address(env, ()) == "10.0.0.1", "no trusted proxies: the peer"
    assert client_address(dict(env, REMOTE_ADDR="198.51.100.7"), proxies) == "198.51.100.7"
    forged = {"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": "x\r\nGET / 200"}
    assert client_address(forged, proxies) == "x\\x0d\\x0aGET / 200"
    assert client_address({}, proxies) == "-"


def test_behind_a_trusted_proxy_the_access_log_names_the_client(make_config, caplog):
    """dcapd's own server (as behind nginx in deploy/compose.yaml): X-Forwarded-For from a
    trusted proxy reaches the access log; from any other peer the peer is logged."""
    caplog.set_level(logging.INFO, logger="dcapd")
    forwarded = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
    for proxies, expected in (("127.0.0.1", "203.0.113.9"), ("10.0.0.1", "127.0.0.1")):
        caplog.clear()
        with running_dcapd(make_config(trusted_proxies=proxies)) as server:
            url = f"http://127.0.0.1:{server.port}/healthz"
            assert requests.get(url, headers=forwarded, timeout=5).status_code == 200
        (line,) = [m for m in caplog.messages if m.startswith("GET /healthz 200")]
        assert line.endswith(f"client={expected}"), (proxies, line)


def test_json_log_has_the_client_as_its_own_field(make_client, caplog):
    client = make_client()
    caplog.set_level(logging.INFO, logger="dcapd")
    client.simulate_get("/healthz", remote_addr="192.0.2.8")
    (record,) = [r for r in caplog.records if r.name == "dcapd.http"]
    document = json.loads(JsonFormatter().format(record))
    assert document["client"] == "192.0.2.8"
    assert document["message"].endswith("client=192.0.2.8")


def test_forged_lines_in_the_path_are_logged_escaped_on_one_line(tmp_path):
    """Over the real TLS front: the path as sent (percent-encoded), control bytes escaped,
    and the client address the TLS front restored."""
    process, log_file, url = start_dcapd(tmp_path, DCAPD_TLS="auto", DCAPD_LOG_LEVEL="info")
    port = int(url.rsplit(":", 1)[1])
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    targets = [
        b"/sgx/certification/v4/tcb%0d%0aFORGED1%2000:00%20GET%20/x%20200?fmspc=%0a",
        b"/FORGED2\x1b[2J\x1b]0;title\x07/x",
    ]
    try:
        for target in targets:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    assert tls.recv(4096).startswith(b"HTTP/1.1 ")
        deadline = time.monotonic() + 10
        while log_file.read_bytes().count(b"FORGED") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop_process(process)
    text = log_file.read_bytes()
    assert b"\x1b" not in text and b"\x07" not in text
    lines = text.decode().splitlines()
    (first,) = [line for line in lines if "FORGED1" in line]
    assert "GET /sgx/certification/v4/tcb%0d%0aFORGED1%2000:00%20GET%20/x%20200 " in first
    assert "fmspc" not in first, "the query is never logged"
    assert first.endswith("client=127.0.0.1")
    (second,) = [line for line in lines if "FORGED2" in line]
    assert "GET /FORGED2\\x1b[2J\\x1b]0;title\\x07/x 404 " in second
    assert second.endswith("client=127.0.0.1")


# ---------------------------------------------------------------------------------------------
# 2. Upstream limits: size after decompression, deadline while reading
# ---------------------------------------------------------------------------------------------


def gzip_bomb(inflated: int) -> bytes:
    """``inflated`` zero bytes (a whole number of MiB), gzip-compressed without being held
    uncompressed. A block of up to 16 MiB is compressed once and ends with a full flush, which
    resets the compressor: every further block compresses to those same bytes, so they are
    repeated rather than recomputed (500 MiB: ~0.3 s instead of 2.9 s, the CRC being most of
    it; 511 KB, about what compressing it all at once gives)."""
    block = bytes(math.gcd(inflated, 16 * MiB))
    blocks = inflated // len(block) if inflated else 0
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)  # raw deflate: header/trailer below
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = compressor.flush()  # the final (empty) block
    crc = 0
    for _ in range(blocks):
        crc = zlib.crc32(block, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # gzip, deflate, no name, no mtime
    trailer = crc.to_bytes(4, "little") + (inflated % 2**32).to_bytes(4, "little")
    body = first + repeated * (blocks - 1) if blocks else b""
    return header + body + tail + trailer


def test_upstream_bombs_oversized_and_dripped_bodies_are_502_fast_small_and_uncached(
    tmp_path, fake_pcs
):
    fake = fake_pcs(SCENARIO)
    bomb = gzip_bomb(500 * MiB)
    assert len(bomb) < 600_000
    tcb = f"{V4}/tcb"
    fmspcs = {"bomb": "00BB00000001", "plain": "00BB00000002", "drip": "00BB00000003"}
    fake.add_stream(
        "GET",
        tcb,
        {"fmspc": fmspcs["bomb"]},
        lambda: (bomb[i : i + 65536] for i in range(0, len(bomb), 65536)),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        length=len(bomb),
    )
    # No Content-Length: the body must be counted as it arrives.
    fake.add_stream(
        "GET", tcb, {"fmspc": fmspcs["plain"]}, lambda: (bytes(MiB) for _ in range(500))
    )
    fake.add_stream(
        "GET",
        tcb,
        {"fmspc": fmspcs["drip"]},
        lambda: (b"{" for _ in range(100)),
        interval=0.5,
        length=100,
    )
    timeout = 2.0
    process, _log, url = start_dcapd(
        tmp_path,
        DCAPD_PCS_URL=fake.pcs_url,
        DCAPD_URL_MAP=fake.url_map,
        DCAPD_UPSTREAM_TIMEOUT=str(timeout),
        DCAPD_UPSTREAM_RETRIES="2",
    )
    try:
        with requests.Session() as session:
            session.trust_env = False
            for kind, fmspc in fmspcs.items():
                for attempt in (1, 2):  # the second proves nothing was cached
                    started = time.monotonic()
                    reply = session.get(f"{url}{tcb}?fmspc={fmspc}", timeout=30)
                    elapsed = time.monotonic() - started
                    assert reply.status_code == 502, (kind, reply.status_code)
                    assert reply.text == STATUS_TEXTS[502]
                    assert elapsed < timeout + 1.5, (kind, elapsed)
                    print(f"{kind}: 502 in {elapsed:.2f} s")  # figures for README (pytest -s)
                    calls = [c for c in fake.calls if c.query.get("fmspc") == [fmspc]]
                    if kind != "drip":  # oversized: not worth asking again, no retry
                        assert len(calls) == attempt, kind
                    else:  # the deadline ended the attempt and left no time for another
                        assert len(calls) == attempt, kind
        rss = peak_rss_mib(process.pid)
    finally:
        stop_process(process)
    print(f"dcapd peak RSS (VmHWM): {rss:.0f} MiB")
    assert rss < 150, f"peak RSS {rss:.0f} MiB"


def test_an_answer_at_the_limit_is_accepted_and_one_byte_more_refused(make_config, fake_pcs):
    fake = fake_pcs()
    body = b"x" * 1000
    compressed = zlib.compress(body)
    fake.add_response("GET", "/exact", None, 200, {"Content-Encoding": "deflate"}, body=compressed)
    fake.add_response("GET", "/over", None, 200, {}, body=body + b"y")
    fake.add_stream("GET", "/gz", None, lambda: [gzip_bomb(2 * MiB)])
    config = make_config(
        upstream_max_body_bytes=1000, upstream_retries=2, **upstream_settings(fake)
    )
    upstream = Upstream(config)
    try:
        assert upstream.get_url(fake.url("/exact")).body == body
        with pytest.raises(UpstreamError, match="exceeds the limit"):
            upstream.get_url(fake.url("/over"))
        assert fake.count("/over") == 1
        with pytest.raises(UpstreamError, match="exceeds the limit"):
            upstream.get_url(fake.url("/gz"))
    finally:
        upstream.close()


# ---------------------------------------------------------------------------------------------
# 3. JSON nesting bounded: 400, never 500
# ---------------------------------------------------------------------------------------------


def test_nesting_depth_ignores_brackets_inside_strings():
    assert jsonlimits.nesting_depth('{"a": "[[[[\\"]]", "b": [["\\\\"]]}') == 3
    assert jsonlimits.nesting_depth(b"42") == 0
    jsonlimits.loads(deep(64))
    with pytest.raises(jsonlimits.JsonTooDeep):
        jsonlimits.loads(deep(65))
    with pytest.raises(ValueError):
        jsonlimits.loads(deep(100_000))


def put_upload(client, body):
    return client.simulate_put(
        f"{V4}/platformcollateral",
        body=body if isinstance(body, (bytes, str)) else json.dumps(body),
        headers={"admin-token": ADMIN, "Content-Type": "application/json"},
    )


@pytest.mark.parametrize("depth", [100, 500, 100_000])
def test_deeply_nested_bodies_are_400(make_client, depth):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    nested = '{"platforms": [], "collaterals": ' + deep(depth) + "}"
    assert put_upload(client, nested).status_code == 400
    reply = client.simulate_post(
        f"{V4}/platforms",
        body='{"qe_id": ' + deep(depth) + "}",
        headers={"user-token": USER, "Content-Type": "application/json"},
    )
    assert reply.status_code == 400
    reply = client.simulate_put(
        f"{V4}/appraisalpolicy",
        body='{"policy": "x", "is_default": true, "fmspc": ' + deep(depth) + "}",
        headers={"admin-token": ADMIN, "Content-Type": "application/json"},
    )
    assert reply.status_code == 400


def test_deep_json_inside_upload_strings_is_400(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    upload = upload_from_scenario(SCENARIO)
    upload["collaterals"]["qeidentity"] = '{"enclaveIdentity": ' + deep(5000) + "}"
    reply = put_upload(client, upload)
    assert reply.status_code == 400, reply.text

    upload = upload_for_test_platform()
    item = upload["collaterals"]["tcbinfos"][0]
    item["sgx_tcbinfo_raw"] = '{"tcbInfo": ' + deep(5000) + "}"
    reply = put_upload(client, upload)
    assert reply.status_code == 400, reply.text


def test_deep_json_inside_a_policy_is_400(make_client):
    client = make_client(**TOKENS)
    header, _, signature = make_policy([SGX_CLASS]).split(".")
    inner = json.dumps({"policy_payload": '{"policy_array": ' + deep(5000) + "}"}).encode()
    payload = base64.urlsafe_b64encode(inner).rstrip(b"=").decode()
    body = {"policy": f"{header}.{payload}.{signature}", "is_default": True}
    body["fmspc"] = "00906ED50000"
    reply = client.simulate_put(
        f"{V4}/appraisalpolicy",
        body=json.dumps(body),
        headers={"admin-token": ADMIN, "Content-Type": "application/json"},
    )
    assert reply.status_code == 400


def test_signed_json_nested_too_deeply_is_an_integrity_error():
    chain = pki.url_encoded_chain(pki.tcb_signing().pem, pki.root_ca().pem)
    roots = [pki.root_ca().cert]
    for depth in (100, 50_000):
        body = b'{"tcbInfo": ' + deep(depth).encode() + b', "signature": "00"}'
        with pytest.raises(IntegrityError):
            verify_signed_json(body, "tcbInfo", chain, roots)


# ---------------------------------------------------------------------------------------------
# 4. Uploads in linear time (correctness and operation counts; timings: scripts/bench.py)
# ---------------------------------------------------------------------------------------------


def many_platforms_upload(n: int) -> dict:
    """The test platform's certificates under ``n`` QE IDs, one raw TCB each."""
    platform = pki.default_platform()
    raw = (platform.pck_certs[1].cpusvn_hex, platform.pck_certs[1].pcesvn_hex)
    body = upload_for_test_platform(platform, [raw])
    row, cert_set = body["platforms"][0], body["collaterals"]["pck_certs"][0]
    body["platforms"] = [dict(row, qe_id=f"{i:032x}") for i in range(n)]
    body["collaterals"]["pck_certs"] = [dict(cert_set, qe_id=f"{i:032x}") for i in range(n)]
    return body


def test_an_upload_of_hundreds_of_platforms_parses_each_certificate_once(make_client, monkeypatch):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    parses = {"pck": 0, "tcb": 0}
    real_pck, real_tcb = selection.parse_pck_cert_uncached, selection.parse_tcb_info_uncached

    def count_pck(pem):
        parses["pck"] += 1
        return real_pck(pem)

    def count_tcb(text):
        parses["tcb"] += 1
        return real_tcb(text)

    monkeypatch.setattr(selection, "parse_pck_cert_uncached", count_pck)
    monkeypatch.setattr(selection, "parse_tcb_info_uncached", count_tcb)
    n = 300
    assert put_upload(client, many_platforms_upload(n)).status_code == 200
    platform = pki.default_platform()
    assert parses == {"pck": len(platform.pck_certs), "tcb": 1}, parses
    expected = platform.pck_certs[1]
    for i in (0, 150, n - 1):
        params = query(expected.cpusvn_hex, expected.pcesvn_hex, qeid=f"{i:032X}")
        reply = client.simulate_get(PCKCERT, params=params)
        assert reply.status_code == 200
        assert reply.headers["SGX-TCBm"] == expected.tcbm
        assert reply.text == expected.pem if expected.pem.endswith("\n") else expected.pem + "\n"


def test_a_selection_failure_in_a_large_upload_writes_nothing(make_client):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    upload = many_platforms_upload(50)
    upload["platforms"][-1]["cpu_svn"] = "00" * 16  # below every certificate: no PCK cert
    reply = put_upload(client, upload)
    assert reply.status_code == 400
    store = client.app.services.store
    assert store.keys("pckcert/") == [] and store.keys("platform/") == []
    assert store.keys("tcb/") == []


def test_a_remembered_issuer_chain_still_checks_each_leaf():
    """Within one upload the issuer path is verified once; every leaf's own signature still is."""
    platform = pki.default_platform()
    roots = [pki.root_ca().cert]
    chains: dict = {}
    verify_pck_cert(platform.pck_certs[0].pem, platform.issuer_chain, roots, verified_chains=chains)
    assert list(chains) == [platform.issuer_chain]
    verify_pck_cert(platform.pck_certs[1].pem, platform.issuer_chain, roots, verified_chains=chains)
    level = platform.pck_certs[0]
    stranger = pki.make_pck_cert(pki.processor_ca(), platform.ppid, level.components, level.pcesvn)
    with pytest.raises(IntegrityError, match="is not issued by"):
        verify_pck_cert(stranger, platform.issuer_chain, roots, verified_chains=chains)
