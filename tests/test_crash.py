"""Crash safety: a dcapd process killed (SIGKILL) at a random moment during a large
PUT /platformcollateral or during a refresh leaves a cache that opens without repair and in
which everything is either entirely the old or entirely the new data.

Two worlds of collateral, A and B, are made with the test PKI (tests/pki.py): the same cache
keys (many platforms with their PCK certificates and answers, TCB infos for many FMSPCs, PCK
and root CRLs, identities), but every entry differs. Each round starts ``python -m dcapd`` on
the cache left by the previous round, makes it write the other world (an upload, or a refresh
from a fake PCS serving that world), and kills it after a random delay. Then, with the
process dead:

* ``PRAGMA integrity_check`` on cache.db says ok, diskcache opens the cache and its
  ``check()`` finds nothing to fix;
* every cache entry holds A's or B's bytes, all of them the same world (an upload and a
  refresh are each one transaction), and each platform's answers are certificates from its
  own cached certificate set.

Quick profile: a few rounds of each. Long profile (``DCAPD_HARDENING_PROFILE=long``): 50 of
each. With ``DCAPD_HARDENING_REPORT=<file>`` the round counts go there as JSON.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings
from collections import Counter
from functools import cache
from pathlib import Path

import diskcache
import pytest
import requests

from dcapd.app import create_app
from dcapd.config import load_config
from dcapd.store import CACHE_SETTINGS, BytesOnlyDisk, Store
from tests import pki
from tests.conftest import INTEL_ROOT_CDP
from tests.servers import dcapd_environment
from tests.test_pckcert import CASES, raw_tcb
from tests.test_platforms import ADMIN, TOKENS
from tests.test_ssrf import stop_process, wait_listening

pytestmark = pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")

PROFILE = os.environ.get("DCAPD_HARDENING_PROFILE", "quick")
ROUNDS = {"quick": 3, "long": 50}[PROFILE]  # kill rounds, for uploads and for refreshes each
N_FMSPCS = 20
N_PLATFORMS = 100
RAW_TCBS = [raw_tcb(*CASES[i][:2]) for i in (0, 2)]  # two answers per platform
LEVELS = pki.DEFAULT_LEVELS
PCK_CHAINS = {
    "PLATFORM": pki.url_encoded_chain(pki.platform_ca().pem, pki.root_ca().pem),
    "PROCESSOR": pki.url_encoded_chain(pki.processor_ca().pem, pki.root_ca().pem),
}
SIGNING_CHAIN = pki.url_encoded_chain(pki.tcb_signing().pem, pki.root_ca().pem)
FAR = dt.datetime(2048, 1, 1, tzinfo=dt.timezone.utc)  # nothing expires: no early refresh
COUNTS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    path = os.environ.get("DCAPD_HARDENING_REPORT")
    if path and COUNTS:
        report = json.loads(open(path).read()) if os.path.exists(path) else {}
        report["crash"] = dict(COUNTS, profile=PROFILE)
        with open(path, "w") as handle:
            json.dump(report, handle, indent=1)


def digest(*parts) -> bytes:
    return hashlib.sha256(":".join(map(str, parts)).encode()).digest()


def fmspc(index: int) -> str:
    return f"C0DE{index:08X}"


# --- the two worlds ------------------------------------------------------------------------


@cache
def world(name: str) -> dict:
    """Everything world ``name`` ("A" or "B") holds, as PCS would serve it and as an upload."""
    generation = {"A": 17, "B": 18}[name]
    issued = dt.datetime(2025, 1, 1 if name == "A" else 2, tzinfo=dt.timezone.utc)
    ppid = digest("ppid", name)[:16]
    certs = {}  # fmspc -> [(level, pem)]
    tcb_infos = {}
    for index in range(N_FMSPCS):
        code = fmspc(index)
        certs[code] = [
            (
                level,
                pki.make_pck_cert(
                    pki.platform_ca(),
                    ppid,
                    level.components,
                    level.pcesvn,
                    fmspc=bytes.fromhex(code),
                    sgx_type=1,
                ),
            )
            for level in LEVELS
        ]
        tcb_infos[code] = pki.make_tcb_info(
            code, LEVELS, tcb_eval=generation, issue_date=issued, next_update=FAR
        )
    identities = {}
    for kind, identity_id in (("qe", "QE"), ("qve", "QVE"), ("tdqe", "TD_QE")):
        identities[kind] = pki.make_signed_json(
            "enclaveIdentity",
            {
                "id": identity_id,
                "version": 2,
                "issueDate": issued.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "nextUpdate": FAR.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "tcbEvaluationDataNumber": generation,
                "miscselect": "00000000",
                "miscselectMask": "FFFFFFFF",
                "attributes": "11000000000000000000000000000000",
                "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
                "mrsigner": "AB" * 32,
                "isvprodid": 1,
                "tcbLevels": [],
            },
        )
    serials = {"A": [11, 12], "B": [21, 22, 23]}[name]
    crls = {
        "PROCESSOR": pki.make_crl(pki.processor_ca(), serials),
        "PLATFORM": pki.make_crl(pki.platform_ca(), serials),
        "ROOT": pki.make_crl(pki.root_ca(), serials),
    }
    platforms, pck_certs = [], []
    for index in range(N_PLATFORMS):
        qe_id = digest("qe", index)[:16].hex()
        code = fmspc(index % N_FMSPCS)
        enc_ppid = (digest("enc", name, index) * 12).hex()  # 768 hex
        for cpu_svn, pce_svn in RAW_TCBS:
            platforms.append(
                {
                    "qe_id": qe_id,
                    "pce_id": "0000",
                    "cpu_svn": cpu_svn.lower(),
                    "pce_svn": pce_svn.lower(),
                    "enc_ppid": enc_ppid,
                    "platform_manifest": "",
                }
            )
        pck_certs.append(
            {
                "qe_id": qe_id,
                "pce_id": "0000",
                "enc_ppid": enc_ppid,
                "platform_manifest": "",
                "certs": [
                    {
                        "tcb": pki.PckEntry(level.components, level.pcesvn, pem).tcb_json,
                        "tcbm": pki.PckEntry(level.components, level.pcesvn, pem).tcbm,
                        "cert": urllib.parse.quote(pem, safe=""),
                    }
                    for level, pem in certs[code]
                ],
            }
        )
    upload = {
        "platforms": platforms,
        "collaterals": {
            "version": 4,
            "pck_certs": pck_certs,
            "tcbinfos": [
                {"fmspc": code.lower(), "sgx_tcbinfo": json.loads(body)}
                for code, body in tcb_infos.items()
            ],
            "pckcacrl": {
                "processorCrl": crls["PROCESSOR"].hex(),
                "platformCrl": crls["PLATFORM"].hex(),
            },
            "rootcacrl": crls["ROOT"].hex(),
            "rootcacrl_cdp": INTEL_ROOT_CDP,
            "qeidentity": identities["qe"].decode(),
            "qveidentity": identities["qve"].decode(),
            "tdqeidentity": identities["tdqe"].decode(),
            "certificates": {
                "SGX-PCK-Certificate-Issuer-Chain": PCK_CHAINS,
                "TCB-Info-Issuer-Chain": SIGNING_CHAIN,
                "SGX-Enclave-Identity-Issuer-Chain": SIGNING_CHAIN,
            },
        },
    }
    return {
        "tcb_infos": tcb_infos,
        "identities": identities,
        "crls": crls,
        "upload": json.dumps(upload).encode(),
    }


def serve_world(fake, name: str) -> None:
    """The fake PCS answers as world ``name`` (everything a collateral refresh asks)."""
    data = world(name)
    fake.clear_added()
    for code, body in data["tcb_infos"].items():
        fake.add_response(
            "GET",
            "/sgx/certification/v4/tcb",
            {"fmspc": code},
            200,
            {"TCB-Info-Issuer-Chain": SIGNING_CHAIN},
            body,
        )
    for ca in ("processor", "platform"):
        fake.add_response(
            "GET",
            "/sgx/certification/v4/pckcrl",
            {"ca": ca, "encoding": "der"},
            200,
            {"SGX-PCK-CRL-Issuer-Chain": PCK_CHAINS[ca.upper()]},
            data["crls"][ca.upper()],
        )
    fake.add_response("GET", "/IntelSGXRootCA.der", None, 200, {}, data["crls"]["ROOT"])
    for version in (3, 4):
        for kind in ("qe", "qve"):
            fake.add_response(
                "GET",
                f"/sgx/certification/v{version}/{kind}/identity",
                {"update": "standard"},
                200,
                {"SGX-Enclave-Identity-Issuer-Chain": SIGNING_CHAIN},
                data["identities"][kind],
            )
    fake.add_response(
        "GET",
        "/tdx/certification/v4/qe/identity",
        {"update": "standard"},
        200,
        {"SGX-Enclave-Identity-Issuer-Chain": SIGNING_CHAIN},
        data["identities"]["tdqe"],
    )


# --- what a cache holds ----------------------------------------------------------------------

IGNORED = ("lock/", "status/")  # bookkeeping, not responses


def entries(store: Store) -> dict[str, tuple]:
    """Every response entry: key -> (body, headers, content type)."""
    result = {}
    for key in store.keys():
        if not key.startswith(IGNORED):
            entry = store.get(key)
            result[key] = (entry.body, entry.headers, entry.content_type)
    return result


def open_cleanly(directory: Path) -> None:
    """The cache opens without repair: SQLite's integrity check, diskcache's own check."""
    connection = sqlite3.connect(str(directory / "cache.db"))
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        connection.close()
    cache = diskcache.Cache(str(directory), disk=BytesOnlyDisk, **CACHE_SETTINGS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            problems = cache.check(fix=False)
        assert problems == [], [str(problem.message) for problem in problems]
    finally:
        cache.close()


def which_world(
    found: dict[str, tuple], expected: dict[str, dict[str, tuple]], compare=lambda value: value
) -> str:
    """ "A", "B" or "empty" for a cache whose every entry is from one world; else fail."""
    if not any(key in found for key in expected["A"]):
        return "empty"
    worlds = set()
    for key in expected["A"]:
        assert key in found, f"{key} is missing: part of a write was lost"
        value = compare(found[key])
        matches = {name for name in ("A", "B") if compare(expected[name][key]) == value}
        assert matches, f"{key} holds neither world's bytes"
        if len(matches) == 1:
            worlds |= matches
    assert len(worlds) == 1, f"entries from both worlds: {sorted(worlds)}"
    return worlds.pop()


def check_platform_answers(found: dict[str, tuple]) -> None:
    """Each pckcert answer is one of its own platform's cached certificates."""
    for key, (body, headers, _) in found.items():
        if not key.startswith("pckcert/"):
            continue
        _, qeid, pceid, *_ = key.split("/")
        cert_set = json.loads(found[f"certs/{qeid}/{pceid}"][0])
        by_pem = {c["pem"].strip(): c["tcbm"].upper() for c in cert_set["certs"]}
        assert body.decode().strip() in by_pem, f"{key}: not a cert of its platform"
        assert headers["SGX-TCBm"] == by_pem[body.decode().strip()]


# --- the real process -----------------------------------------------------------------------

LAUNCHER = """
import os
import sys
import time

import dcapd.refresh
import dcapd.store

# Each cache write (other than the lock) appends its key to a file the test watches, after a
# short pause, so that the test can kill the process in the middle of a write transaction.
marker = os.open(os.environ["DCAPD_TEST_MARKER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
pause = float(os.environ["DCAPD_TEST_PUT_PAUSE"])
original_put = dcapd.store.Store.put

def put(self, key, entry):
    if not key.startswith("lock/"):
        time.sleep(pause)
        os.write(marker, key.encode() + b"\\n")
    return original_put(self, key, entry)

dcapd.store.Store.put = put
from dcapd.cli import main
sys.exit(main([]))
"""


class Dcapd:
    """``dcapd`` (through the real CLI) on a cache directory, plain HTTP on 127.0.0.1:0."""

    def __init__(
        self, tmp_path: Path, cache_dir: Path | None, roots: str, pause: float = 0.0, **env: str
    ):
        """``cache_dir`` None: the cache is named by ``env`` (DCAPD_CACHE_URL)."""
        self.log = tmp_path / f"dcapd-{time.monotonic_ns()}.log"
        self.marker = tmp_path / f"writes-{time.monotonic_ns()}.txt"
        self.marker.write_bytes(b"")
        environment = dcapd_environment(
            DCAPD_LISTEN="127.0.0.1:0",
            DCAPD_TLS="off",
            DCAPD_TRUSTED_ROOTS=roots,
            DCAPD_ADMIN_TOKEN_SHA512=TOKENS["admin_token_sha512"],
            DCAPD_UPSTREAM_RETRIES="0",
            DCAPD_REFRESH_SCHEDULE="0 0 0 1 1 *",
            NO_PROXY="127.0.0.1",
            no_proxy="127.0.0.1",
            DCAPD_TEST_MARKER=str(self.marker),
            DCAPD_TEST_PUT_PAUSE=str(pause),
        )
        environment.update(env)
        if cache_dir is not None:
            environment["DCAPD_CACHE_DIR"] = str(cache_dir)
        with open(self.log, "wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER],
                env=environment,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        self.url = wait_listening(self.process, self.log)

    def send(self, method: str, path: str, body: bytes = None) -> dict:
        """Start a request in a thread; returns a dict that gets "status" if it completes."""
        outcome: dict = {}

        def run():
            try:
                with requests.Session() as session:
                    session.trust_env = False
                    reply = session.request(
                        method,
                        self.url + path,
                        data=body,
                        timeout=60,
                        headers={"admin-token": ADMIN},
                    )
                    outcome["status"] = reply.status_code
            except requests.RequestException as exc:
                outcome["error"] = type(exc).__name__
            finally:
                outcome["finished"] = time.monotonic()

        outcome["thread"] = threading.Thread(target=run, daemon=True)
        outcome["started"] = time.monotonic()
        outcome["thread"].start()
        return outcome

    def writes(self) -> int:
        """Cache writes so far (each is a line in the marker file)."""
        return self.marker.read_bytes().count(b"\n")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        stop_process(self.process)


def reference(tmp_path: Path, roots: str, name: str) -> dict[str, tuple]:
    """World ``name`` uploaded into a scratch cache in this process: what it must hold."""
    config = load_config(
        {
            "cache_dir": str(tmp_path / f"reference-{name}"),
            "tls": "off",
            "trusted_roots": roots,
            "cache_mode": "OFFLINE",
            **TOKENS,
        },
        environ={},
    )
    app = create_app(config)
    try:
        from falcon import testing

        result = testing.TestClient(app).simulate_put(
            "/sgx/certification/v4/platformcollateral",
            body=world(name)["upload"],
            headers={"admin-token": ADMIN},
        )
        assert result.status_code == 200, result.text
        return entries(app.services.store)
    finally:
        app.services.store.close()
        app.services.upstream.close()


@pytest.fixture
def roots(make_config) -> str:
    return make_config().trusted_roots


def kill_rounds(kind: str, start_round, check) -> None:
    """Round 0 writes the other world unkilled (and is timed; from an empty cache, a round
    before it writes the first world); then ROUNDS rounds, each
    started by ``start_round(target)`` -> (dcapd, outcome) and killed: odd rounds at a random
    moment up to 1.2x the write's duration, even rounds just after a random one of the
    write's cache entries went into the write transaction."""
    rng = random.Random(os.environ.get("DCAPD_HARDENING_SEED") or None)
    state = check()
    warmups = 2 if state == "empty" else 1  # time a write from one world to the other
    duration = writes = 0
    for number in range(1 - warmups, ROUNDS + 1):
        target = "B" if state == "A" else "A"
        dcapd, outcome = start_round(target)
        if number <= 0:
            outcome["thread"].join(120)
            assert outcome.get("status") == 200, (outcome, dcapd.log.read_text()[-2000:])
            duration, writes = outcome["finished"] - outcome["started"], dcapd.writes()
            dcapd.stop()
            state = check()
            assert state == target
            COUNTS[f"{kind} write, seconds"] = round(duration, 2)
            COUNTS[f"{kind} write, cache entries"] = writes
            continue
        inside = number % 2 == 0
        if inside:
            wanted = rng.randint(1, writes)
            deadline = time.monotonic() + 60
            while (
                dcapd.writes() < wanted
                and "finished" not in outcome
                and time.monotonic() < deadline
            ):
                time.sleep(0.0005)
        else:
            delay = rng.uniform(0.0, 1.2 * duration)
            time.sleep(max(0.0, outcome["started"] + delay - time.monotonic()))
        written = dcapd.writes()
        dcapd.kill()
        outcome["thread"].join(30)
        new_state = check()
        COUNTS[f"{kind} rounds"] += 1
        assert new_state in (state, target), (state, target, new_state)
        if outcome.get("status") == 200:
            assert new_state == target, "a write answered 200 is durable"
        if new_state == state and 0 < written:
            COUNTS[f"{kind} rounds killed inside the write transaction"] += 1
        elif new_state == state:
            COUNTS[f"{kind} rounds killed before the write began"] += 1
        else:
            COUNTS[f"{kind} rounds killed after the write committed"] += 1
        COUNTS[f"{kind} rounds passed"] += 1
        state = new_state


def test_kill_during_a_large_upload_leaves_old_or_new(tmp_path, roots):
    cache_dir = tmp_path / "cache"
    expected = {name: reference(tmp_path, roots, name) for name in "AB"}
    assert set(expected["A"]) == set(expected["B"])
    differing = [key for key in expected["A"] if expected["A"][key] != expected["B"][key]]
    assert len(differing) >= len(expected["A"]) - N_PLATFORMS, "B changes (nearly) every entry"
    assert len(world("A")["upload"]) > 1_000_000, "a large upload"
    shutil.copytree(tmp_path / "reference-A", cache_dir)  # start from world A

    def check() -> str:
        if not (cache_dir / "cache.db").exists():
            return "empty"
        open_cleanly(cache_dir)
        store = Store(str(cache_dir))
        try:
            found = entries(store)
        finally:
            store.close()
        assert set(found) <= set(expected["A"]), set(found) - set(expected["A"])
        state = which_world(found, expected)
        check_platform_answers(found)
        return state

    def start_round(target: str):
        dcapd = Dcapd(tmp_path, cache_dir, roots, pause=0.0005, DCAPD_CACHE_MODE="OFFLINE")
        return dcapd, dcapd.send(
            "PUT", "/sgx/certification/v4/platformcollateral", world(target)["upload"]
        )

    kill_rounds("upload", start_round, check)
    # A restarted dcapd serves the surviving world.
    final = check()
    dcapd = Dcapd(tmp_path, cache_dir, roots, DCAPD_CACHE_MODE="OFFLINE")
    try:
        reply = requests.get(
            dcapd.url + "/sgx/certification/v4/tcb", params={"fmspc": fmspc(0)}, timeout=10
        )
        assert reply.status_code == 200 and reply.content == world(final)["tcb_infos"][fmspc(0)]
    finally:
        dcapd.stop()


COLLATERAL = ("tcb/", "identity/", "pckcrl/", "rootcacrl", "crl/")


def test_kill_during_a_refresh_leaves_old_or_new(tmp_path, roots, fake_pcs):
    fake = fake_pcs()
    cache_dir = tmp_path / "cache"
    upstream = {
        "DCAPD_PCS_URL": fake.pcs_url,
        "DCAPD_URL_MAP": fake.url_map,
        "DCAPD_ROOTCA_CRL_URL": INTEL_ROOT_CDP,
        "DCAPD_CACHE_MODE": "LAZY",
    }

    def expected_world(name: str) -> dict[str, bytes]:
        data = world(name)
        keys = {f"tcb/sgx/4/{code}/STANDARD": body for code, body in data["tcb_infos"].items()}
        for kind in ("qe", "qve"):  # (never the v3 ones: PCS API v3 is retired)
            keys[f"identity/{kind}/4/STANDARD"] = data["identities"][kind]
        keys["identity/tdqe/4/STANDARD"] = data["identities"]["tdqe"]
        keys.update(
            {
                "pckcrl/PROCESSOR": data["crls"]["PROCESSOR"],
                "pckcrl/PLATFORM": data["crls"]["PLATFORM"],
                # The upload's rootcacrl_cdp (Intel's root CA CRL) is this same entry.
                "rootcacrl": data["crls"]["ROOT"],
            }
        )
        return {key: (body,) for key, body in keys.items()}

    expected = {name: expected_world(name) for name in "AB"}

    def check() -> str:
        if not (cache_dir / "cache.db").exists():
            return "empty"
        open_cleanly(cache_dir)
        store = Store(str(cache_dir))
        try:
            found = {
                key: (value[0],)
                for key, value in entries(store).items()
                if key.startswith(COLLATERAL)
            }
        finally:
            store.close()
        assert set(found) <= set(expected["A"]), set(found) - set(expected["A"])
        return which_world(found, expected)

    # Seed: world A uploaded; a first refresh from a PCS serving A adds the v4 identities.
    reference(tmp_path, roots, "A")
    shutil.copytree(tmp_path / "reference-A", cache_dir)
    seed = Dcapd(tmp_path, cache_dir, roots, **upstream)
    try:
        serve_world(fake, "A")
        outcome = seed.send("GET", "/sgx/certification/v4/refresh")
        outcome["thread"].join(120)
        assert outcome["status"] == 200, seed.log.read_text()[-2000:]
    finally:
        seed.stop()
    assert check() == "A"

    def start_round(target: str):
        serve_world(fake, target)
        dcapd = Dcapd(tmp_path, cache_dir, roots, pause=0.002, **upstream)
        return dcapd, dcapd.send("GET", "/sgx/certification/v4/refresh")

    kill_rounds("refresh", start_round, check)


def test_refresh_right_after_a_crash_is_not_blocked_by_the_dead_lock(tmp_path, roots, fake_pcs):
    fake = fake_pcs()
    serve_world(fake, "A")
    cache_dir = tmp_path / "cache"
    script = (
        "import json, sys, os, signal\n"
        "from dcapd.app import create_app\nfrom dcapd.config import load_config\n"
        "app = create_app(load_config(json.loads(sys.argv[1]), environ={}))\n"
        "store, refresher = app.services.store, app.services.refresher\n"
        "assert store.try_lock('refresh', refresher.owner, 15 * 60, __import__('time').time())\n"
        "os.kill(os.getpid(), signal.SIGKILL)  # dies holding the lock, as mid-refresh\n"
    )
    settings = {
        "cache_dir": str(cache_dir),
        "tls": "off",
        "trusted_roots": roots,
        "pcs_url": fake.pcs_url,
        "url_map": fake.url_map,
        "rootca_crl_url": INTEL_ROOT_CDP,
        **TOKENS,
    }
    process = subprocess.run(
        [sys.executable, "-c", script, json.dumps(settings)],
        cwd=str(Path(__file__).resolve().parents[1]),
        timeout=60,
    )
    assert process.returncode == -signal.SIGKILL
    config = load_config(dict(settings, upstream_retries=0), environ={})
    app = create_app(config)
    try:
        app.services.refresher.refresh_collateral(wait=1.0)
    finally:
        app.services.store.close()
        app.services.upstream.close()
