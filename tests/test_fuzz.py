"""Bad input: arbitrary methods, paths, query strings, headers and bodies thrown at every route
of the real app (``create_app``, called as WSGI) never give a 500 or an unhandled exception,
and a request answered with anything but 2xx never changes the cache.

Two apps are fuzzed: LAZY against a fake PCS (through :func:`tests.test_ssrf.guard`, so an
allowed crl?uri= spelling that is not mapped onto the fake is refused, never fetched from the
network), and OFFLINE with Intel's upload file and the test platform already uploaded. Admin
and user tokens are sometimes right, sometimes wrong. Requests are mostly near-valid (a real
route, the parameter names it reads, values of the right shape), so the deep code is reached.

Profiles: the default (quick) run generates a few hundred requests; the long one
(``DCAPD_HARDENING_PROFILE=long``, run by ``scripts/long_hardening.py``) more than 10,000.
With ``DCAPD_HARDENING_REPORT=<file>`` the counts are written there as JSON.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import time
import urllib.parse
import warnings
from collections import Counter
from wsgiref.validate import validator

import pytest
from falcon import testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcapd.app import STATUS_PATH, route_paths
from dcapd.errors import STATUS_TEXTS
from tests import pki
from tests.conftest import INTEL_ROOT_CDP
from tests.servers import running_dcapd
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
from tests.test_ssrf import HOSTILE_URIS, INTEL_SPELLINGS, guard, snapshot
from tests.test_upload import put
from tests.uploads import intel_upload, upload_for_test_platform

pytestmark = [
    pytest.mark.filterwarnings("ignore::wsgiref.validate.WSGIWarning"),
    pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"),
]

PROFILE = os.environ.get("DCAPD_HARDENING_PROFILE", "quick")
EXAMPLES = {"quick": 150, "long": 5200}[PROFILE]  # per fuzzed app
PLATFORM = pki.default_platform()
LAZY_BODY_LIMIT = 64 * 1024
OFFLINE_BODY_LIMIT = 128 * 1024
STATS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    path = os.environ.get("DCAPD_HARDENING_REPORT")
    if path:
        report = json.loads(open(path).read()) if os.path.exists(path) else {}
        report["fuzz"] = {
            "profile": PROFILE,
            "requests": STATS["requests"],
            "status_500": STATS["status 500"],
            "statuses": {k: v for k, v in sorted(STATS.items()) if k.startswith("status ")},
        }
        with open(path, "w") as handle:
            json.dump(report, handle, indent=1)


# --- strategies ---------------------------------------------------------------------------

ROUTES = sorted({path for path, *_ in route_paths()} | {STATUS_PATH, "/healthz", "/readyz"})
METHODS = [
    "GET",
    "GET",
    "GET",
    "POST",
    "PUT",
    "HEAD",
    "DELETE",
    "PATCH",
    "OPTIONS",
    "TRACE",
    "CONNECT",
    "PROPFIND",
    "get",
    "Put",
]
HEADER_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_categories=("Cc",))
HEX = "0123456789abcdefABCDEF"


def flip_case(text: str, mask: int) -> str:
    return "".join(c.upper() if (mask >> (i % 60)) & 1 else c.lower() for i, c in enumerate(text))


def huge(chars: str = "0aZ%\u00e9/") -> st.SearchStrategy[str]:
    return st.builds(lambda c, n: c * n, st.sampled_from(list(chars)), st.integers(1000, 70000))


@st.composite
def paths(draw) -> str:
    path = draw(st.sampled_from(ROUTES))
    for change in draw(
        st.lists(
            st.sampled_from(
                [
                    "case",
                    "slash",
                    "slashes",
                    "version",
                    "tee",
                    "percent",
                    "junk",
                    "dotdot",
                    "unicode",
                    "random",
                ]
            ),
            max_size=3,
        )
    ):
        if change == "case":
            path = flip_case(path, draw(st.integers(0, 2**60)))
        elif change == "slash":
            path += "/"
        elif change == "slashes":
            path = path.replace("/", "//", draw(st.integers(1, 3)))
        elif change == "version":
            path = re.sub(r"/v\d+/", f"/v{draw(st.sampled_from([0, 1, 2, 3, 4, 5, 10]))}/", path)
        elif change == "tee":
            path = (
                path.replace("/sgx/", "/tdx/")
                if "/sgx/" in path
                else path.replace("/tdx/", "/sgx/")
            )
        elif change == "percent":
            at = draw(st.integers(0, len(path) - 1))
            path = (
                path[:at]
                + "%"
                + draw(st.sampled_from(["2e", "2f", "2F", "00", "zz", "", "25", "c3%a9"]))
                + path[at:]
            )
        elif change == "junk":
            path += "/" + draw(st.text(max_size=20))
        elif change == "dotdot":
            path = path + "/../" + draw(st.sampled_from(ROUTES)).lstrip("/")
        elif change == "unicode":
            path += draw(st.sampled_from(["\u00e9", "\u212a", "\ufeff", "\U0001f4a9", "\u3002"]))
        else:
            path = "/" + draw(st.text(max_size=60))
    # '?' and '#' would end the path in a real request line.
    return "/" + path.lstrip("/").replace("?", "%3F").replace("#", "%23")


def hexes(*lengths: int) -> st.SearchStrategy[str]:
    return st.integers(0, len(lengths) - 1).flatmap(
        lambda i: st.text(alphabet=HEX, min_size=lengths[i], max_size=lengths[i])
    )


CPUSVNS = [raw_tcb(*case[:2])[0] for case in CASES]
PCESVNS = [raw_tcb(*case[:2])[1] for case in CASES]
PCK_CRL_URL = (
    "https://api.trustedservices.intel.com/sgx/certification/v4/pckcrl?ca=processor&encoding=der"
)
GOOD_VALUES = {
    "fmspc": [
        "00906ED50000",
        "00906ed50000",
        PLATFORM.fmspc,
        "00606A000000",
        "00806F050000",
        f"[{PLATFORM.fmspc}]",
        "[00906ED50000,00606A000000]",
    ],
    "update": ["standard", "early", "all", "STANDARD", "Early"],
    "ca": ["processor", "platform", "PROCESSOR", "Platform"],
    "encoding": ["der", "pem", "DER"],
    "qeid": [PLATFORM.qeid, PLATFORM.qeid.lower()],
    "pceid": ["0000", "0001"],
    "cpusvn": CPUSVNS,
    "pcesvn": PCESVNS,
    "encrypted_ppid": [PLATFORM.encrypted_ppid, "0" * 768],
    "uri": [INTEL_ROOT_CDP, PCK_CRL_URL] + INTEL_SPELLINGS + [uri for _, uri in HOSTILE_URIS],
    "source": ["reg", "reg_na", "[]", f"[{PLATFORM.fmspc}]", "[00906ED50000, x]", "[", "]"],
    "type": ["certs", "CERTS", "collateral"],
}
SHAPES = {
    "fmspc": (12,),
    "qeid": (32, 1, 260, 261),
    "pceid": (4,),
    "cpusvn": (32,),
    "pcesvn": (4,),
    "encrypted_ppid": (768, 767, 0),
}


def values(name: str) -> st.SearchStrategy[str]:
    good = st.sampled_from(GOOD_VALUES.get(name, [""]))
    options = [
        good,
        good,
        good,
        good,
        st.just(""),
        huge(),
        st.text(max_size=30),
        st.text(alphabet=HEX, max_size=40),
    ]
    if name in SHAPES:
        options += [hexes(*SHAPES[name])] * 2
    return st.one_of(*options)


# What each route reads: its methods and query parameters (the rest are ignored or refused).
ROUTE_METHODS = {
    "platforms": ["POST", "GET"],
    "platformcollateral": ["PUT"],
    "appraisalpolicy": ["PUT", "GET"],
    "refresh": ["GET", "POST"],
}
ROUTE_PARAMS = {
    "pckcert": ["qeid", "pceid", "cpusvn", "pcesvn", "encrypted_ppid"],
    "pckcrl": ["ca", "encoding"],
    "tcb": ["fmspc", "update"],
    "identity": ["update"],
    "crl": ["uri"],
    "appraisalpolicy": ["fmspc"],
    "platforms": ["source", "update"],
    "refresh": ["type", "fmspc"],
}
ALL_NAMES = list(GOOD_VALUES) + ["platform", "admin-token", ""]


def endpoint(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1].lower()


@st.composite
def query_strings(draw, names) -> str:
    if names and draw(st.integers(0, 3)):  # mostly: the route's own parameters
        chosen = [name for name in names if draw(st.integers(0, 5))]
        chosen += draw(st.lists(st.sampled_from(ALL_NAMES), max_size=1))
    else:
        chosen = draw(
            st.lists(st.one_of(st.sampled_from(ALL_NAMES), st.text(max_size=10)), max_size=6)
        )
    parts = []
    for name in chosen:
        value = draw(values(name))
        how = draw(st.sampled_from(["quote"] * 4 + ["plus", "raw", "twice", "bare", "broken"]))
        if how == "quote":
            part = f"{urllib.parse.quote(name)}={urllib.parse.quote(value, safe='')}"
        elif how == "plus":
            part = f"{urllib.parse.quote_plus(name)}={urllib.parse.quote_plus(value)}"
        elif how == "raw":
            part = f"{name}={value}"
        elif how == "twice":
            part = f"{name}={urllib.parse.quote(urllib.parse.quote(value, safe=''), safe='')}"
        elif how == "bare":
            part = urllib.parse.quote(name)
        else:
            part = f"{name}=%{value[:1]}%{draw(st.sampled_from(['', 'g', '0', 'zz']))}"
        parts.append(part)
        if draw(st.integers(0, 7)) == 0:
            parts.append(parts[-1])  # a duplicate parameter
    text = draw(st.sampled_from(["&"] * 5 + ["&&", ";"])).join(parts)
    # What a server hands the app: the raw bytes, decoded as latin-1 (PEP 3333).
    return text.replace("#", "%23").encode("utf-8").decode("latin-1")


TOKEN_VALUES = {
    "admin-token": [ADMIN] * 6
    + [
        None,
        "",
        "wrong",
        USER,
        ADMIN.upper(),
        ADMIN + "x",
        TOKENS["admin_token_sha512"],
        "t\u00f6ken",
    ],
    "user-token": [USER] * 6 + [None, "", "wrong", ADMIN, USER + " x", "t\u00f6ken"],
}


@st.composite
def headers(draw) -> dict:
    result = {}
    for name in ("admin-token", "user-token"):
        value = draw(st.sampled_from(TOKEN_VALUES[name]))
        if value is not None:
            result[name] = value
    request_id = draw(
        st.one_of(
            st.none(),
            st.sampled_from(["abc-123", "x" * 64, "x" * 65, "a b", "../etc"]),
            st.text(alphabet=HEADER_CHARS, max_size=80),
        )
    )
    if request_id is not None:
        result["Request-ID"] = request_id
    content_type = draw(
        st.sampled_from(
            [
                None,
                "application/json",
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "application/json; charset=latin-1",
                "\u00e9/\u00e9",
            ]
        )
    )
    if content_type is not None:
        result["Content-Type"] = content_type
    for _ in range(draw(st.integers(0, 2))):
        name = draw(
            st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-", min_size=1, max_size=20)
        )
        if name.lower() not in ("content-length", "content-type"):
            result[name] = draw(st.text(alphabet=HEADER_CHARS, max_size=40))
    return result


CONTENT_LENGTH_LIES = st.one_of(
    st.none(),
    st.none(),
    st.integers(0, 10**7).map(str),
    st.sampled_from(["-1", "abc", "1e3", " 5", "0x10", "", "99999999999999999999999", "1,2"]),
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def leaf_paths(document, prefix=()):
    yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from leaf_paths(value, prefix + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from leaf_paths(value, prefix + (index,))


@st.composite
def mutated(draw, document):
    """``document`` with a few parts replaced by arbitrary JSON or removed."""
    document = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(0, 3))):
        spots = [p for p in leaf_paths(document) if p]
        if not spots:
            break
        spot = draw(st.sampled_from(spots))
        parent = document
        for step in spot[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[spot[-1]]
        else:
            parent[spot[-1]] = draw(JSON | st.sampled_from(["", "00" * 16, "zz", -1, 2**70]))
    return document


POLICY = {"policy": "a.eyJ4Ijp7fX0.c", "is_default": True, "fmspc": PLATFORM.fmspc}
BODY_TEMPLATES = {
    "platforms": [
        registration(CPUSVNS[0], PCESVNS[0]),
        registration(CPUSVNS[3], PCESVNS[3], qe_id="ab" * 16),
        registration(CPUSVNS[5], PCESVNS[5], enc_ppid="0" * 768),
        {"pce_id": "0000", "qe_id": "abcdef", "platform_manifest": "ab" * 50},
    ],
    "platformcollateral": [
        upload_for_test_platform(raw_tcbs=[(CPUSVNS[1], PCESVNS[1])]),
        upload_for_test_platform(raw_tcbs=[(CPUSVNS[4], PCESVNS[4])]),
    ],
    "appraisalpolicy": [POLICY],
}
ANY_TEMPLATE = [t for templates in BODY_TEMPLATES.values() for t in templates]


def bodies(limit: int, templates) -> st.SearchStrategy:
    templates = templates or ANY_TEMPLATE
    as_json = lambda value: json.dumps(value).encode()  # noqa: E731
    return st.one_of(
        st.none(),
        st.binary(max_size=300),
        JSON.map(as_json),
        st.sampled_from(templates).flatmap(mutated).map(as_json),
        st.sampled_from(templates).flatmap(mutated).map(as_json),
        st.sampled_from(templates).map(as_json),
        st.sampled_from(
            [
                b"{",
                b"[]",
                b"null",
                b'"x"',
                b"{}" * 3,
                b"\xff\xfe{}",
                b"[" * 100000,
                b'{"a":' * 50000,
                b"\x00" * 100,
            ]
        ),
        st.integers(limit - 5, limit + 5).map(lambda n: b" " * n),
    )


@st.composite
def requests_(draw, limit: int) -> dict:
    if draw(st.integers(0, 3)):  # mostly: a real route, a method it has, maybe a variant
        path = draw(st.sampled_from(ROUTES))
        method = draw(st.sampled_from(ROUTE_METHODS.get(endpoint(path), ["GET"])))
        if draw(st.integers(0, 3)) == 0:
            path = draw(
                st.sampled_from(
                    [
                        path + "/",
                        path.upper(),
                        flip_case(path, 2**40 - 7),
                        path.replace("/v4/", "/v3/"),
                        path + "//",
                    ]
                )
            )
    else:
        method, path = draw(st.sampled_from(METHODS)), draw(paths())
    name = endpoint(path)
    return {
        "method": method,
        "path": path,
        "query": draw(query_strings(ROUTE_PARAMS.get(name, []))),
        "headers": draw(headers()),
        "body": draw(bodies(limit, BODY_TEMPLATES.get(name))),
        "content_length": draw(CONTENT_LENGTH_LIES),
    }


# --- calling the app and checking the invariants --------------------------------------------


class Unhandled(logging.Handler):
    """Collects the log records of exceptions the app did not expect."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        if record.exc_info or "unhandled" in record.getMessage():
            self.records.append(record)


@pytest.fixture
def unhandled():
    handler = Unhandled()
    logger = logging.getLogger("dcapd")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def call_app(app, request: dict) -> tuple[int, dict, bytes]:
    """One WSGI call, as a server would make it (a lying Content-Length included)."""
    env = testing.create_environ(
        method=request["method"],
        path=request["path"],
        headers=request["headers"],
        body=request["body"] or b"",
    )
    env["QUERY_STRING"] = request["query"]  # as sent, even "?x" (create_environ refuses it)
    lie = request["content_length"]
    sane = True
    if lie is not None:
        env["CONTENT_LENGTH"] = lie
        sane = lie.isdigit()
    wsgi = validator(app) if sane else app
    answer = {}

    def start_response(status, response_headers, exc_info=None):
        answer["status"] = status
        answer["headers"] = {name.lower(): value for name, value in response_headers}
        return lambda data: None

    iterable = wsgi(env, start_response)
    try:
        body = b"".join(iterable)
    finally:
        close = getattr(iterable, "close", None)
        if close:
            close()
    return int(answer["status"].split(" ", 1)[0]), answer["headers"], body


def check_request(app, request: dict, unhandled: Unhandled) -> int:
    store = app.services.store
    before = snapshot(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status, response_headers, body = call_app(app, request)
    STATS["requests"] += 1
    STATS[f"status {status}"] += 1
    assert status != 500, (request, body[:200])
    assert not unhandled.records, unhandled.records[0].getMessage()
    assert status in STATUS_TEXTS, (status, request)
    request_id = response_headers.get("request-id", "")
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", request_id), response_headers
    sent = request["headers"].get("Request-ID", "").strip()
    if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", sent):
        assert request_id == sent
    if not 200 <= status < 300:
        assert snapshot(store) == before, ("a refused request changed the cache", status, request)
    return status


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, print_blob=True, suppress_health_check=list(HealthCheck)
)


def early_identities(fake) -> None:
    """PCS early identities (the recording has only standard ones): a copy of each."""
    for response in list(fake.responses):
        if response.path.endswith("/identity") and response.status == 200:
            fake.add_response(
                "GET", response.path, {"update": "early"}, 200, response.headers, response.body
            )


@pytest.fixture
def lazy_app(fake_pcs, make_client):
    fake = fake_pcs(SCENARIO)
    serve_platform(fake)
    fill_prefetch_gap(fake)
    early_identities(fake)
    client = make_client(fake, max_body_bytes=LAZY_BODY_LIMIT, **TOKENS)
    guard(client.app)
    # Warm: everything a registration prefetches, the platform, a crl?uri= answer.
    assert (
        client.simulate_post(
            PLATFORMS,
            params={"update": "all"},
            headers={"user-token": USER},
            body=json.dumps(registration(CPUSVNS[0], PCESVNS[0])),
        ).status_code
        == 200
    )
    for path, params in [
        ("/sgx/certification/v4/tcb", {"fmspc": "00906ED50000"}),
        ("/sgx/certification/v4/crl", {"uri": INTEL_ROOT_CDP}),
        (PCKCERT, query(CPUSVNS[1], PCESVNS[1])),
    ]:
        assert client.simulate_get(path, params=params).status_code == 200
    return client.app


@pytest.fixture
def offline_app(make_client):
    client = make_client(cache_mode="OFFLINE", max_body_bytes=OFFLINE_BODY_LIMIT, **TOKENS)
    assert put(client, intel_upload()).status_code == 200
    assert (
        put(client, upload_for_test_platform(raw_tcbs=[(CPUSVNS[0], PCESVNS[0])])).status_code
        == 200
    )
    return client.app


def test_any_request_to_a_lazy_dcapd(lazy_app, unhandled):
    @FUZZ_SETTINGS
    @given(request=requests_(LAZY_BODY_LIMIT))
    def run(request):
        check_request(lazy_app, request, unhandled)

    run()


def test_any_request_to_an_offline_dcapd(offline_app, unhandled):
    @FUZZ_SETTINGS
    @given(request=requests_(OFFLINE_BODY_LIMIT))
    def run(request):
        check_request(offline_app, request, unhandled)

    run()


@pytest.mark.parametrize(
    "body",
    [b"[" * 100000, b'{"a":' * 50000, b"[" * 2000 + b"]" * 2000],
    ids=["100000 [", "50000 {", "2000 [ and ]"],
)
@pytest.mark.parametrize(
    "method,path,header",
    [
        ("POST", PLATFORMS, "user-token"),
        ("PUT", "/sgx/certification/v4/platformcollateral", "admin-token"),
        ("PUT", "/sgx/certification/v3/appraisalpolicy", "admin-token"),
    ],
)
def test_deeply_nested_json_is_400(make_client, unhandled, body, method, path, header):
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    result = client.simulate_request(
        method,
        path,
        body=body,
        headers={header: {"user-token": USER, "admin-token": ADMIN}[header]},
    )
    assert result.status_code == 400
    assert not unhandled.records


@pytest.mark.parametrize(
    "junk", ["\n", "\r\n ", "\t", " ", "\x00"], ids=["LF", "CRLF and space", "tab", "space", "NUL"]
)
@pytest.mark.parametrize(
    "chain",
    [
        "TCB-Info-Issuer-Chain",
        "SGX-Enclave-Identity-Issuer-Chain",
        "SGX-PCK-Certificate-Issuer-Chain",
    ],
)
def test_upload_chain_that_is_not_url_encoded_is_400(make_client, unhandled, junk, chain):
    """A chain is stored and replayed as a response header: a raw line break (or any
    whitespace) in it is refused up front, never a 500 when the write fails."""
    client = make_client(cache_mode="OFFLINE", **TOKENS)
    upload = intel_upload()
    chains = upload["collaterals"]["certificates"]
    if isinstance(chains[chain], dict):
        chains[chain] = {
            ca: value[:-40] + junk + value[-40:] for ca, value in chains[chain].items()
        }
    else:
        chains[chain] = chains[chain][:-40] + junk + chains[chain][-40:]
    result = put(client, upload)
    assert result.status_code == 400, result.text
    assert not unhandled.records
    assert client.app.services.store.keys() == []


# --- oversized bodies: 413 before the body is read ------------------------------------------


class Unreadable(io.RawIOBase):
    """A wsgi.input that fails the test if more than ``allowed`` bytes are read from it."""

    def __init__(self, allowed: int = 0, supply: int = 0):
        self.allowed = allowed
        self.supply = supply
        self.given = 0

    def readable(self):
        return True

    def read(self, size=-1):
        wanted = self.supply - self.given if size is None or size < 0 else size
        assert self.given + wanted <= self.allowed, "the body was read"
        wanted = min(wanted, self.supply - self.given)
        self.given += wanted
        return b"{" * wanted

    def readinto(self, buffer):  # pragma: no cover - falcon calls read()
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


BODY_ROUTES = [("POST", f"/sgx/certification/v{v}/platforms", "user-token") for v in (3, 4)] + [
    ("PUT", f"/sgx/certification/v{v}/{route}", "admin-token")
    for v in (3, 4)
    for route in ("platformcollateral", "appraisalpolicy")
]
GOOD = {"user-token": USER, "admin-token": ADMIN}


@pytest.mark.parametrize("method,path,header", BODY_ROUTES)
def test_content_length_over_the_limit_is_413_unread(make_client, method, path, header):
    limit = 1000
    client = make_client(cache_mode="OFFLINE", max_body_bytes=limit, **TOKENS)
    for length in (limit + 1, 10**12):
        env = testing.create_environ(method=method, path=path, headers={header: GOOD[header]})
        env["CONTENT_LENGTH"] = str(length)
        env["wsgi.input"] = Unreadable()
        status, _, body = call_app_env(client.app, env)
        assert status == 413 and body == b"Content too large."
        # Without the right token the body is not read either: 401 first.
        env = testing.create_environ(method=method, path=path, headers={header: "wrong"})
        env["CONTENT_LENGTH"] = str(length)
        env["wsgi.input"] = Unreadable()
        assert call_app_env(client.app, env)[0] == 401
    assert client.app.services.store.keys() == []


@pytest.mark.parametrize("method,path,header", BODY_ROUTES[:2])
def test_body_without_content_length_is_read_only_up_to_the_limit(
    make_client, method, path, header
):
    """No Content-Length (waitress de-chunks a chunked body and sets one; another server
    might not): at most limit + 1 bytes are read."""
    limit = 1000
    client = make_client(cache_mode="OFFLINE", max_body_bytes=limit, **TOKENS)
    env = testing.create_environ(method=method, path=path, headers={header: GOOD[header]})
    env.pop("CONTENT_LENGTH", None)
    stream = Unreadable(allowed=limit + 1, supply=10**9)
    env["wsgi.input"] = stream
    status, _, _ = call_app_env(client.app, env)
    assert status in (400, 413)
    assert stream.given <= limit + 1


def call_app_env(app, env) -> tuple[int, dict, bytes]:
    answer = {}

    def start_response(status, response_headers, exc_info=None):
        answer["status"] = status
        answer["headers"] = dict(response_headers)

    body = b"".join(app(env, start_response))
    return int(answer["status"].split(" ", 1)[0]), answer["headers"], body


@pytest.mark.parametrize("tls", ["off", "auto"])
def test_running_server_refuses_an_oversized_body_before_it_is_sent(make_config, tls):
    """Through waitress (and the TLS front): a Content-Length above max_body_bytes is answered
    413 at once, while the client has sent only the headers."""
    import ssl

    limit = 4096
    config = make_config(tls=tls, cache_mode="OFFLINE", max_body_bytes=limit, **TOKENS)
    with running_dcapd(config) as server:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        if tls == "auto":
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            raw = context.wrap_socket(raw)
        with raw as conn:
            conn.sendall(
                b"PUT /sgx/certification/v4/platformcollateral HTTP/1.1\r\n"
                b"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"admin-token: " + ADMIN.encode() + b"\r\n"
                b"Content-Length: 10000000\r\n\r\n" + b"{" * 100
            )
            started = time.monotonic()
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert time.monotonic() - started < 5
        import requests

        with requests.Session() as session:
            session.trust_env = False
            result = session.put(
                f"{server.url}/sgx/certification/v4/platformcollateral",
                data=b" " * (limit - 1),
                headers={"admin-token": ADMIN},
                verify=False,
                timeout=10,
            )
            assert result.status_code == 400, "under the limit: read, then judged (not JSON)"


def test_running_server_accepts_a_body_of_exactly_the_limit(make_config):
    import requests

    limit = 4096
    config = make_config(cache_mode="OFFLINE", max_body_bytes=limit, **TOKENS)
    with running_dcapd(config) as server, requests.Session() as session:
        session.trust_env = False
        result = session.put(
            f"{server.url}/sgx/certification/v4/platformcollateral",
            data=b" " * limit,
            headers={"admin-token": ADMIN},
            timeout=10,
        )
        assert result.status_code == 400, "at the limit: read, then judged (not JSON)"
