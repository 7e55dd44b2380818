"""Several worker processes on one cache directory: dcapd.wsgi:application under gunicorn,
under concurrent client load while registration, upload and refresh happen meanwhile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests import pki
from tests.fakepcs import load_body
from tests.servers import free_port
from tests.test_pckcert import CASES, PCKCERT, query, raw_tcb, serve_platform
from tests.test_platforms import ADMIN, TOKENS, USER, registration
from tests.uploads import intel_upload

SCENARIO = "2025-05-27_intel-pcs-recording"
REPO = Path(__file__).resolve().parents[1]
PLATFORM = pki.default_platform()

pytestmark = pytest.mark.skipif(
    shutil.which("gunicorn") is None and sys.platform != "win32",
    reason="gunicorn is in the test extra",
)


def test_two_gunicorn_workers_share_one_cache(tmp_path, fake_pcs, make_config):
    fake = fake_pcs(SCENARIO)
    serve_platform(fake)
    qve = next(r for r in fake.responses if r.path == "/sgx/certification/v4/qve/identity")
    fake.add_response("GET", "/sgx/certification/v3/qve/identity", None, 200, qve.headers, qve.body)
    config = make_config(pcs_url=fake.pcs_url, url_map=fake.url_map, **TOKENS)
    port = free_port()
    log_file = open(tmp_path / "gunicorn.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCAPD_")}
    env.update(
        DCAPD_CACHE_DIR=config.cache_dir,
        DCAPD_PCS_URL=fake.pcs_url,
        DCAPD_URL_MAP=fake.url_map,
        DCAPD_TRUSTED_ROOTS=config.trusted_roots,
        DCAPD_USER_TOKEN_SHA512=TOKENS["user_token_sha512"],
        DCAPD_ADMIN_TOKEN_SHA512=TOKENS["admin_token_sha512"],
        DCAPD_UPSTREAM_RETRIES="0",
    )
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            "2",
            "--threads",
            "4",
            "-b",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "5",
            "dcapd.wsgi:application",
        ],
        cwd=str(REPO),
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    session = requests.Session()
    session.trust_env = False
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                session.get(base + "/healthz", timeout=2)
                break
            except (requests.ConnectionError, requests.Timeout):  # workers still starting
                assert server.poll() is None, (tmp_path / "gunicorn.log").read_text()
                assert time.monotonic() < deadline
                time.sleep(0.2)

        qe_bodies = {
            load_body(SCENARIO, "sgx_qe_identity"),
            intel_upload()["collaterals"]["qeidentity"].encode(),
        }
        tcb_body = load_body(SCENARIO, "sgx_tcb_00906ED50000")
        failures: list[str] = []
        stop = threading.Event()
        counts = {"requests": 0}

        def client_load(worker: int) -> None:
            own = requests.Session()
            own.trust_env = False
            case = CASES[worker % len(CASES)]
            while not stop.is_set():
                for path, params, check in [
                    ("/sgx/certification/v4/qe/identity", None, lambda r: r.content in qe_bodies),
                    (
                        "/sgx/certification/v4/tcb",
                        {"fmspc": "00906ED50000"},
                        lambda r: r.content == tcb_body,
                    ),
                    (
                        PCKCERT,
                        query(*raw_tcb(*case[:2])),
                        lambda r: r.headers.get("SGX-TCBm") == PLATFORM.pck_certs[case[2]].tcbm,
                    ),
                ]:
                    reply = own.get(base + path, params=params, timeout=30)
                    counts["requests"] += 1
                    if reply.status_code != 200 or not check(reply):
                        failures.append(f"{path} {reply.status_code} {reply.text[:80]}")

        threads = [threading.Thread(target=client_load, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        # Meanwhile: registrations, an upload, a refresh.
        admin = {"admin-token": ADMIN}
        for components, pcesvn, _ in CASES[:3]:
            reply = session.post(
                base + "/sgx/certification/v4/platforms",
                json=registration(*raw_tcb(components, pcesvn)),
                headers={"user-token": USER},
                timeout=30,
            )
            assert reply.status_code == 200, reply.text
        reply = session.get(base + "/sgx/certification/v4/refresh", headers=admin, timeout=60)
        assert reply.status_code == 200, reply.text
        # (after the refresh: the fake PCS has no TCB info for the uploaded FMSPCs)
        reply = session.put(
            base + "/sgx/certification/v4/platformcollateral",
            data=json.dumps(intel_upload()),
            headers=admin,
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        # The load goes on after the upload: until 50 more requests (or 1 s, as before).
        after_upload = counts["requests"] + 50
        deadline = time.monotonic() + 1.0
        while counts["requests"] < after_upload and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        for thread in threads:
            thread.join()
        assert failures == []
        assert counts["requests"] > 50
        # Nothing lost: both the fetched and the uploaded platforms are listed.
        listed = session.get(
            base + "/sgx/certification/v4/platforms",
            params={"source": "[]"},
            headers=admin,
            timeout=30,
        ).json()
        qe_ids = {row["qe_id"] for row in listed}
        assert qe_ids == {PLATFORM.qeid, intel_upload()["platforms"][0]["qe_id"]}
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        session.close()
        log_file.close()
