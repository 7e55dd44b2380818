"""SSRF and access: crl?uri= fetches only Intel's allow-listed CRL hosts, no upstream redirect
is ever followed, every token route refuses missing, wrong and empty tokens, and neither the
log of the app nor that of a running ``dcapd`` ever holds a token, key or encrypted PPID.

Every upstream request dcapd makes in these tests goes through :class:`LoopbackOnly`, which
records it and refuses anything not addressed to 127.0.0.1: a URL that slipped through the
allow-list would show up there instead of leaving the machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import requests

from dcapd.app import STATUS_PATH, route_paths
from dcapd.pcsurls import is_allowed_crl_url
from tests import pki
from tests.conftest import INTEL_ROOT_CDP
from tests.servers import dcapd_environment
from tests.test_pckcert import CASES, PCKCERT, query, raw_tcb, serve_platform
from tests.test_platforms import (
    ADMIN,
    PLATFORMS,
    SCENARIO,
    TOKENS,
    USER,
    fill_prefetch_gap,
    registration,
)
from tests.uploads import upload_for_test_platform

PLATFORM = pki.default_platform()
CRL = "/sgx/certification/v4/crl"
CRL_V3 = "/sgx/certification/v3/crl"
API_KEY = "k3y-" + "s" * 28


class LoopbackOnly(requests.adapters.HTTPAdapter):
    """A requests transport that records every URL and refuses any host but 127.0.0.1."""

    def __init__(self) -> None:
        super().__init__(max_retries=0)
        self.attempts: list[str] = []

    def send(self, request, **kwargs):
        self.attempts.append(request.url)
        if urllib.parse.urlsplit(request.url).hostname != "127.0.0.1":
            raise requests.ConnectionError(f"test guard: refusing {request.url[:120]!r}")
        return super().send(request, **kwargs)

    def hosts(self) -> set[str]:
        return {urllib.parse.urlsplit(url).hostname or "" for url in self.attempts}


def guard(app) -> LoopbackOnly:
    """Route every upstream request of ``app`` through a fresh :class:`LoopbackOnly`."""
    adapter = LoopbackOnly()
    session = app.services.upstream.session
    session.trust_env = False  # no proxy from this machine's environment
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return adapter


def snapshot(store) -> dict[str, bytes]:
    return {key: store.cache.get(key) for key in store.keys()}


# --- crl?uri=: the allow-list --------------------------------------------------------------

ROOT_HOST = "certificates.trustedservices.intel.com"
HOSTILE_URIS = [
    ("other host", "https://evil.example/IntelSGXRootCA.der"),
    ("plain http", f"http://{ROOT_HOST}/IntelSGXRootCA.der"),
    ("ftp", f"ftp://{ROOT_HOST}/IntelSGXRootCA.der"),
    ("file", "file:///etc/passwd"),
    ("gopher", "gopher://127.0.0.1:6379/_INFO"),
    ("no scheme", f"{ROOT_HOST}/IntelSGXRootCA.der"),
    ("scheme-relative", f"//{ROOT_HOST}/IntelSGXRootCA.der"),
    ("one slash", f"https:/{ROOT_HOST}/IntelSGXRootCA.der"),
    ("three slashes", f"https:///{ROOT_HOST}/IntelSGXRootCA.der"),
    ("userinfo, then other host", f"https://{ROOT_HOST}@evil.example/IntelSGXRootCA.der"),
    ("userinfo on Intel's host", f"https://evil.example@{ROOT_HOST}/IntelSGXRootCA.der"),
    ("user and password", f"https://u:p@{ROOT_HOST}/IntelSGXRootCA.der"),
    ("empty userinfo", f"https://@{ROOT_HOST}/IntelSGXRootCA.der"),
    ("Intel's host as a prefix", f"https://{ROOT_HOST}.evil.example/IntelSGXRootCA.der"),
    (
        "Intel's host as a suffix",
        "https://evil-trustedservices.intel.com.evil.example/IntelSGXRootCA.der",
    ),
    ("trailing dot", f"https://{ROOT_HOST}./IntelSGXRootCA.der"),
    ("IPv4 literal", "https://127.0.0.1/IntelSGXRootCA.der"),
    ("IPv4 as one number", "https://2130706433/IntelSGXRootCA.der"),
    ("IPv4 in octal", "https://0177.0.0.1/IntelSGXRootCA.der"),
    ("cloud metadata address", "https://169.254.169.254/IntelSGXRootCA.der"),
    ("IPv6 literal", "https://[::1]/IntelSGXRootCA.der"),
    ("IPv4-mapped IPv6", "https://[::ffff:127.0.0.1]/IntelSGXRootCA.der"),
    ("%2e in the host", "https://certificates%2etrustedservices.intel.com/IntelSGXRootCA.der"),
    ("%40 in the host", f"https://{ROOT_HOST}%40evil.example/IntelSGXRootCA.der"),
    ("%2f in the host", f"https://evil.example%2f{ROOT_HOST}/IntelSGXRootCA.der"),
    ("%2e in the path", f"https://{ROOT_HOST}/IntelSGXRootCA%2eder"),
    ("%2e%2e segment", f"https://{ROOT_HOST}/%2e%2e/IntelSGXRootCA.der"),
    ("dot-dot segment", f"https://{ROOT_HOST}/x/../IntelSGXRootCA.der"),
    ("dot-dot after the file", f"https://{ROOT_HOST}/IntelSGXRootCA.der/../../admin"),
    (
        "ideographic full stops",
        "https://certificates\u3002trustedservices\u3002intel\u3002com/IntelSGXRootCA.der",
    ),
    (
        "fullwidth full stops",
        "https://certificates\uff0etrustedservices\uff0eintel\uff0ecom/IntelSGXRootCA.der",
    ),
    ("fullwidth letters", "https://\uff43ertificates.trustedservices.intel.com/IntelSGXRootCA.der"),
    (
        "Kelvin sign (lower-cases to k)",
        "https://\u212acertificates.trustedservices.intel.com/IntelSGXRootCA.der",
    ),
    ("dotless i", "https://certif\u0131cates.trustedservices.intel.com/IntelSGXRootCA.der"),
    (
        "punycode look-alike",
        "https://xn--certificates-abc.trustedservices.intel.com.evil.example/IntelSGXRootCA.der",
    ),
    ("port 8443", f"https://{ROOT_HOST}:8443/IntelSGXRootCA.der"),
    ("port 80", f"https://{ROOT_HOST}:80/IntelSGXRootCA.der"),
    ("port 0", f"https://{ROOT_HOST}:0/IntelSGXRootCA.der"),
    ("port out of range", f"https://{ROOT_HOST}:99999/IntelSGXRootCA.der"),
    ("port not a number", f"https://{ROOT_HOST}:https/IntelSGXRootCA.der"),
    ("backslash before Intel's host", f"https://evil.example\\{ROOT_HOST}/IntelSGXRootCA.der"),
    ("backslash in userinfo", f"https://{ROOT_HOST}\\@evil.example/IntelSGXRootCA.der"),
    ("backslash path", f"https://{ROOT_HOST}\\IntelSGXRootCA.der"),
    ("fragment", f"https://{ROOT_HOST}/IntelSGXRootCA.der#x"),
    ("fragment hiding the host", f"https://evil.example#@{ROOT_HOST}/IntelSGXRootCA.der"),
    ("query hiding the host", f"https://evil.example?@{ROOT_HOST}/IntelSGXRootCA.der"),
    ("leading space", f" https://{ROOT_HOST}/IntelSGXRootCA.der"),
    ("trailing newline", f"https://{ROOT_HOST}/IntelSGXRootCA.der\n"),
    ("tab in the host", "https://certificates.trusted\tservices.intel.com/IntelSGXRootCA.der"),
    ("CRLF header injection", f"https://{ROOT_HOST}/IntelSGXRootCA.der\r\nHost: evil.example"),
    ("NUL byte", f"https://{ROOT_HOST}/IntelSGXRootCA.der\x00.evil.example"),
    ("very long", f"https://{ROOT_HOST}/IntelSGXRootCA." + "a" * 3000),
    # Intel's check is an unanchored search: these pass Intel's PCCS ([ref-bug]).
    (
        "allowed URL inside another's query",
        f"https://evil.example/?x=https://{ROOT_HOST}/IntelSGXRootCA.der",
    ),
    (
        "allowed URL inside another's path",
        f"https://evil.example/https://{ROOT_HOST}/IntelSGXRootCA.der",
    ),
    (
        "allowed PCK CRL URL inside another's query",
        "https://evil.example/x?https://api.trustedservices.intel.com/sgx/certification/v4/pckcrl"
        "?ca=processor",
    ),
    ("other path on Intel's host", f"https://{ROOT_HOST}/secret"),
    ("root CRL name in a directory", f"https://{ROOT_HOST}/x/IntelSGXRootCA.der"),
    ("PCK CRL path on the root CRL host", f"https://{ROOT_HOST}/sgx/certification/v4/pckcrl"),
    (
        "PCK CRL path on another host",
        "https://evil.example/sgx/certification/v4/pckcrl?ca=processor",
    ),
    ("PCK CRL, API version 0", "https://api.trustedservices.intel.com/sgx/certification/v0/pckcrl"),
    (
        "PCK CRL host, two labels",
        "https://a.b.api.trustedservices.intel.com/sgx/certification/v4/pckcrl",
    ),
    ("Azure host, two labels", "https://a.b.az.sgxprod.adsdcsp.com/sgx/certification/v4/pckcrl"),
    (
        "Azure host, other environment",
        "https://a.az.sgxdev.adsdcsp.com/sgx/certification/v4/pckcrl",
    ),
    ("empty", ""),
    ("host only", f"https://{ROOT_HOST}"),
    ("path only", "/IntelSGXRootCA.der"),
]

# Other spellings of Intel's own URLs: allowed (they name Intel's hosts) and never mapped
# anywhere but Intel.
INTEL_SPELLINGS = [
    f"HTTPS://{ROOT_HOST}/IntelSGXRootCA.der",
    f"https://{ROOT_HOST.upper()}/IntelSGXRootCA.der",
    f"https://{ROOT_HOST}:443/IntelSGXRootCA.der",
    f"https://{ROOT_HOST}/IntelSGXRootCA.crl",
    "https://certprx.adsdcsp.com/IntelSGXRootCA.der",
    "https://api.trustedservices.intel.com/sgx/certification/v3/pckcrl?ca=platform",
    "https://sbx.api.trustedservices.intel.com/sgx/certification/v4/pckcrl?ca=processor",
    "https://x1.az.sgxprod.adsdcsp.com/sgx/certification/v4/pckcrl?ca=processor",
]
INTEL_HOST = re.compile(
    r"([a-z0-9-]*certificates\.trustedservices\.intel\.com"
    r"|certprx\.adsdcsp\.com|([a-z0-9-]+\.)?api\.trustedservices\.intel\.com"
    r"|[a-z0-9-]+\.az\.sgx(prod|np)\.adsdcsp\.com)"
)


@pytest.fixture
def crl_client(fake_pcs, make_client):
    """A LAZY dcapd whose Intel hosts are mapped onto a fake PCS, behind the guard."""
    fake = fake_pcs(SCENARIO)
    client = make_client(fake)
    return client, fake, guard(client.app)


def test_hostile_crl_uris_are_400_and_nothing_is_fetched(crl_client):
    client, fake, adapter = crl_client
    for name, uri in HOSTILE_URIS:
        assert not is_allowed_crl_url(uri), name
        for route in (CRL, CRL_V3):
            result = client.simulate_get(route, params={"uri": uri})
            assert result.status_code == 400, (name, result.status_code)
            assert result.text == "Invalid request parameters."
        # Percent-encoded once more, it arrives as a different (also refused) string.
        result = client.simulate_get(
            CRL, query_string="uri=" + urllib.parse.quote(urllib.parse.quote(uri, safe=""), safe="")
        )
        assert result.status_code == 400, name
        assert adapter.attempts == [] and fake.calls == [], name
    assert client.app.services.store.keys() == []


@pytest.mark.parametrize("uri", INTEL_SPELLINGS)
def test_other_spellings_of_intel_urls_reach_only_intel_hosts(crl_client, uri):
    client, fake, adapter = crl_client
    result = client.simulate_get(CRL, params={"uri": uri})
    # 200 when url_map sends it to the fake, else the guard refused Intel itself (502).
    assert result.status_code in (200, 404, 502)
    for url in adapter.attempts:
        host = urllib.parse.urlsplit(url).hostname
        assert host == "127.0.0.1" or INTEL_HOST.fullmatch(host), url


def test_allowed_uri_is_fetched_from_the_mirror_and_cached(crl_client):
    client, fake, adapter = crl_client
    result = client.simulate_get(CRL, params={"uri": INTEL_ROOT_CDP})
    assert result.status_code == 200
    assert [urllib.parse.urlsplit(u).path for u in adapter.attempts] == ["/IntelSGXRootCA.der"]
    # Intel's root CA CRL distribution point is rootcacrl's entry (issue 14): one key.
    assert client.app.services.store.keys() == ["rootcacrl"]


def test_duplicate_uri_parameters_the_first_wins_and_nothing_hostile_is_fetched(crl_client):
    client, fake, adapter = crl_client
    evil = "https://evil.example/IntelSGXRootCA.der"
    both = urllib.parse.urlencode([("uri", evil), ("uri", INTEL_ROOT_CDP)])
    assert client.simulate_get(CRL, query_string=both).status_code == 400
    assert adapter.attempts == []
    both = urllib.parse.urlencode([("uri", INTEL_ROOT_CDP), ("uri", evil)])
    assert client.simulate_get(CRL, query_string=both).status_code == 200
    assert adapter.hosts() == {"127.0.0.1"}
    assert client.simulate_get(CRL, query_string="uri").status_code == 400
    assert client.simulate_get(CRL, query_string="uri=").status_code == 400
    assert client.simulate_get(CRL).status_code == 400


# --- redirects are never followed ------------------------------------------------------------

REDIRECTED = [  # (route, query, the upstream path that answers with a redirect)
    (CRL, {"uri": INTEL_ROOT_CDP}, "/IntelSGXRootCA.der"),
    ("/sgx/certification/v4/rootcacrl", {}, "/IntelSGXRootCA.der"),
    ("/sgx/certification/v4/tcb", {"fmspc": "00906ED50000"}, "/sgx/certification/v4/tcb"),
    ("/sgx/certification/v4/qe/identity", {}, "/sgx/certification/v4/qe/identity"),
    ("/sgx/certification/v4/pckcrl", {"ca": "processor"}, "/sgx/certification/v4/pckcrl"),
    (PCKCERT, query(*raw_tcb(*CASES[0][:2])), "/sgx/certification/v4/pckcerts"),
]


@pytest.mark.parametrize(
    "route,params,upstream_path", REDIRECTED, ids=[r[0].rsplit("/", 1)[-1] for r in REDIRECTED]
)
def test_upstream_redirect_is_not_followed(fake_pcs, make_client, route, params, upstream_path):
    """An allowed host answering with a redirect to another host: dcapd does not follow it,
    the other host sees no request, the client gets Intel's 404, nothing is cached."""
    fake, elsewhere = fake_pcs(SCENARIO), fake_pcs(SCENARIO)
    serve_platform(elsewhere)
    client = make_client(fake, upstream_retries=2)
    adapter = guard(client.app)
    for status in (301, 302, 303, 307, 308):
        fake.clear_added()
        fake.reset_calls()
        fake.add_response(
            "GET", upstream_path, None, status, {"Location": elsewhere.url(upstream_path)}, b""
        )
        result = client.simulate_get(route, params=params)
        assert result.status_code == 404, (status, result.text)
        assert fake.count(upstream_path) == 1, "a redirect is an answer: not retried either"
    assert elsewhere.calls == []
    assert adapter.hosts() == {"127.0.0.1"}
    assert all(f":{fake.port}/" in url for url in adapter.attempts)
    assert client.app.services.store.keys() == []


# --- every token route refuses missing, wrong and empty tokens ------------------------------


def _token_routes() -> dict[tuple[str, str], str]:
    routes = {("GET", STATUS_PATH): "admin-token"}
    for version in (3, 4):
        base = f"/sgx/certification/v{version}"
        routes.update(
            {
                ("POST", f"{base}/platforms"): "user-token",
                ("GET", f"{base}/platforms"): "admin-token",
                ("PUT", f"{base}/platformcollateral"): "admin-token",
                ("GET", f"{base}/refresh"): "admin-token",
                ("POST", f"{base}/refresh"): "admin-token",
                ("PUT", f"{base}/appraisalpolicy"): "admin-token",
            }
        )
    return routes


TOKEN_ROUTES = _token_routes()
GOOD = {"admin-token": ADMIN, "user-token": USER}
OTHER = {"admin-token": "user-token", "user-token": "admin-token"}


def bad_credentials(header: str) -> list[tuple[str, dict, str]]:
    """(name, headers, extra query string): every way of not holding the right token."""
    right = GOOD[header]
    return [
        ("none", {}, ""),
        ("empty", {header: ""}, ""),
        ("blank", {header: "   "}, ""),
        ("wrong", {header: "wrong"}, ""),
        ("upper-cased", {header: right.upper()}, ""),
        ("with a suffix", {header: right + "x"}, ""),
        ("prefix only", {header: right[:-1]}, ""),
        ("twice", {header: f"{right},{right}"}, ""),
        ("the hash itself", {header: TOKENS[f"{header.split('-')[0]}_token_sha512"]}, ""),
        ("the other role's token", {header: GOOD[OTHER[header]]}, ""),
        ("the right token in the other header", {OTHER[header]: right}, ""),
        ("the right token in the query", {}, f"{header}={right}"),
        ("the right token as a bearer token", {"Authorization": f"Bearer {right}"}, ""),
        ("the right token as a cookie", {"Cookie": f"{header}={right}"}, ""),
        ("non-ASCII", {header: "tok\u00e9n"}, ""),
    ]


@pytest.mark.parametrize(
    "method,path",
    sorted(TOKEN_ROUTES),
    ids=[f"{method} {path}" for method, path in sorted(TOKEN_ROUTES)],
)
def test_token_route_refuses_anything_but_the_right_token(make_client, method, path):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    store = client.app.services.store
    before = snapshot(store)
    for name, headers, qs in bad_credentials(TOKEN_ROUTES[method, path]):
        for variant in (path, path + "/", path.upper()):
            result = client.simulate_request(
                method, variant, headers=headers, query_string=qs or None, body="{}"
            )
            assert result.status_code == 401, (name, variant, result.status_code)
            assert result.text == "Authentication failed."
    assert snapshot(store) == before


def test_every_route_and_method_is_either_token_protected_or_read_only(make_client):
    """No route of the app takes a write without a token: every method of every route,
    without a token, is 401 (a token route), or a read, or Intel's 404 for no such method."""
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    store = client.app.services.store
    paths = [path for path, *_ in route_paths()] + [STATUS_PATH, "/healthz", "/readyz"]
    for path in paths:
        for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            result = client.simulate_request(method, path, body="{}")
            if (method, path) in TOKEN_ROUTES:
                assert result.status_code == 401, (method, path)
            elif method in ("GET", "HEAD"):
                assert result.status_code not in (401, 500), (method, path)
            elif method == "OPTIONS":  # falcon's default responder: the Allow header only
                assert result.status_code == 200 and result.content == b"", path
            else:
                assert result.status_code == 404, (method, path, result.status_code)
                assert result.text.startswith("Cannot "), (method, path)
    assert store.keys() == []


def test_the_right_tokens_are_accepted(make_client):
    """The control for the refusals above: each route with its right token is not 401."""
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    for (method, path), header in TOKEN_ROUTES.items():
        result = client.simulate_request(method, path, headers={header: GOOD[header]}, body="{}")
        assert result.status_code != 401, (method, path)


# --- logs ------------------------------------------------------------------------------------

SECRETS = {
    "user token": USER,
    "admin token": ADMIN,
    "API key": API_KEY,
    "encrypted PPID": PLATFORM.encrypted_ppid,
}


def leaked(text: str) -> list[str]:
    lowered = text.lower()
    return [name for name, value in SECRETS.items() if value.lower() in lowered]


def run_flow(call) -> None:
    """Registration, PCK certs, an upload, the platform list and a certs refresh, with right
    and wrong tokens; ``call(method, path, params, headers, body)`` returns the status."""
    cpusvn, pcesvn = raw_tcb(*CASES[0][:2])
    user, admin = {"user-token": USER}, {"admin-token": ADMIN}
    v4 = "/sgx/certification/v4"
    steps = [
        ("POST", PLATFORMS, None, {"user-token": "not-" + USER}, registration(cpusvn, pcesvn), 401),
        ("POST", PLATFORMS, {"update": "standard"}, user, registration(cpusvn, pcesvn), 200),
        ("GET", PCKCERT, query(*raw_tcb(*CASES[1][:2])), {}, None, 200),
        ("GET", PCKCERT, query(*raw_tcb(*CASES[2][:2]), encrypted_ppid="0" * 768), {}, None, 200),
        (
            "GET",
            PCKCERT,
            dict(query(cpusvn, pcesvn), qeid="AB" * 16, encrypted_ppid="0" * 768),
            {},
            None,
            404,
        ),
        (
            "PUT",
            f"{v4}/platformcollateral",
            None,
            {"admin-token": ADMIN + "!"},
            upload_for_test_platform(raw_tcbs=[(cpusvn, pcesvn)]),
            401,
        ),
        (
            "PUT",
            f"{v4}/platformcollateral",
            None,
            admin,
            upload_for_test_platform(raw_tcbs=[(cpusvn, pcesvn)]),
            200,
        ),
        ("GET", PLATFORMS, {"source": "[]"}, admin, None, 200),
        ("GET", f"{v4}/refresh", {"type": "certs"}, admin, None, 200),
        ("GET", STATUS_PATH, None, {"admin-token": USER}, None, 401),
        ("GET", STATUS_PATH, None, admin, None, 200),
    ]
    for method, path, params, headers, body, expected in steps:
        status = call(method, path, params, headers, body)
        assert status == expected, (method, path, status)


def flow_fake(fake_pcs):
    fake = fake_pcs(SCENARIO)
    serve_platform(fake)
    fill_prefetch_gap(fake)
    return fake


def test_app_log_at_debug_never_holds_secrets(fake_pcs, make_client, caplog):
    fake = flow_fake(fake_pcs)
    client = make_client(fake, api_key=API_KEY, **TOKENS)
    guard(client.app)
    caplog.set_level("DEBUG", logger="dcapd")

    def call(method, path, params, headers, body):
        return client.simulate_request(
            method,
            path,
            params=params,
            headers=headers,
            body=None if body is None else json.dumps(body),
        ).status_code

    run_flow(call)
    assert fake.count("/pckcerts") == 2, "the flow reached PCS with the encrypted PPID"
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert "/pckcert" in text, "the log was captured"
    assert leaked(text) == []


def test_running_dcapd_log_at_debug_never_holds_secrets(tmp_path, fake_pcs, make_config):
    """The real process with DCAPD_VERBOSE: everything it writes, through the whole flow."""
    fake = flow_fake(fake_pcs)
    roots = Path(make_config().trusted_roots)
    env = dcapd_environment(
        DCAPD_LISTEN="127.0.0.1:0",
        DCAPD_TLS="off",
        DCAPD_VERBOSE="1",
        DCAPD_CACHE_DIR=str(tmp_path / "cache"),
        DCAPD_TRUSTED_ROOTS=str(roots),
        DCAPD_PCS_URL=fake.pcs_url,
        DCAPD_URL_MAP=fake.url_map,
        DCAPD_UPSTREAM_RETRIES="0",
        INTEL_API_KEY=API_KEY,
        DCAPD_USER_TOKEN_SHA512=TOKENS["user_token_sha512"],
        DCAPD_ADMIN_TOKEN_SHA512=TOKENS["admin_token_sha512"],
        NO_PROXY="127.0.0.1",
        no_proxy="127.0.0.1",
    )
    log_file = tmp_path / "dcapd.log"
    with open(log_file, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "dcapd"], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        base = wait_listening(process, log_file)
        with requests.Session() as session:
            session.trust_env = False

            def call(method, path, params, headers, body):
                return session.request(
                    method,
                    base + path,
                    params=params,
                    headers=headers,
                    data=None if body is None else json.dumps(body),
                    timeout=30,
                ).status_code

            run_flow(call)
    finally:
        stop_process(process)
    text = log_file.read_text(errors="replace")
    assert "GET /sgx/certification/v4/pckcert 200" in text, text[-2000:]
    assert "DEBUG" in text
    assert leaked(text) == [], text[-3000:]


def wait_listening(process: subprocess.Popen, log_file: Path, timeout: float = 30) -> str:
    """The base URL of a ``dcapd`` started with DCAPD_LISTEN=127.0.0.1:0, from its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(
            r"dcapd listening on 127\.0\.0\.1:(\d+)", log_file.read_text(errors="replace")
        )
        if match:
            return f"http://127.0.0.1:{match.group(1)}"
        if process.poll() is not None:
            raise AssertionError(f"dcapd exited: {log_file.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("dcapd did not start")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM if os.name != "nt" else signal.CTRL_BREAK_EVENT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
