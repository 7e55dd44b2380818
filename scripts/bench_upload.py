#!/usr/bin/env python3
"""How long PUT /platformcollateral takes for n platforms (issue 13 item 4: linear in size).

    python scripts/bench_upload.py                      # 1000, 2000, 5000, 10000 platforms
    python scripts/bench_upload.py --platforms 10000 --distinct-certs

Each size gets a fresh cache and one upload through dcapd's WSGI app in-process (the JSON body
parsed, every certificate integrity-checked, selection for every raw TCB, one transaction),
as Intel's PccsAdminTool would send it. Platforms are the test PKI's platform (tests/pki.py)
under n QE IDs, one raw TCB each: by default they share its 4 PCK certificates (as
scripts/bench.py's warm cache does); with ``--distinct-certs`` each platform has its own PPID
and so 4 certificates of its own (real sites look like that: every certificate is then
verified and parsed, which bounds the rate). Prints seconds (and the CPU seconds this process
used: steadier on a busy machine) and microseconds per platform, so linear growth shows as a
flat last column. Everything on 127.0.0.1-free in-process calls, in a
temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def build_upload(n: int, distinct_certs: bool) -> dict:
    from tests import pki
    from tests.uploads import upload_for_test_platform

    platform = pki.default_platform()
    level = platform.pck_certs[1]
    body = upload_for_test_platform(platform, [(level.cpusvn_hex, level.pcesvn_hex)])
    row, cert_set = body["platforms"][0], body["collaterals"]["pck_certs"][0]
    platforms, cert_sets = [], []
    for i in range(n):
        qeid = f"{i:032x}"
        platforms.append(dict(row, qe_id=qeid))
        certs = cert_set["certs"]
        if distinct_certs:
            ppid = i.to_bytes(16, "big")
            certs = [
                dict(
                    cert,
                    cert=urllib.parse.quote(
                        pki.make_pck_cert(
                            pki.platform_ca(),
                            ppid,
                            entry.components,
                            entry.pcesvn,
                            fmspc=pki.DEFAULT_FMSPC,
                            sgx_type=1,
                        ),
                        safe="",
                    ),
                )
                for cert, entry in zip(cert_set["certs"], platform.pck_certs)
            ]
        cert_sets.append(dict(cert_set, qe_id=qeid, certs=certs))
    body["platforms"], body["collaterals"]["pck_certs"] = platforms, cert_sets
    return body


def measure(n: int, distinct_certs: bool, workdir: Path) -> tuple[float, float, int]:
    from falcon import testing

    from dcapd.app import create_app
    from dcapd.auth import token_sha512
    from dcapd.config import load_config
    from tests import pki

    roots = workdir / "roots.pem"
    roots.write_text(pki.root_ca().pem)
    config = load_config(
        {
            "cache_dir": str(workdir / f"cache-{n}"),
            "cache_mode": "OFFLINE",
            "trusted_roots": str(roots),
            "admin_token_sha512": token_sha512("bench"),
        },
        environ={},
    )
    body = json.dumps(build_upload(n, distinct_certs)).encode()
    app = create_app(config)
    try:
        client = testing.TestClient(app)
        started, cpu_started = time.perf_counter(), time.process_time()
        reply = client.simulate_put(
            "/sgx/certification/v4/platformcollateral",
            body=body,
            headers={"admin-token": "bench", "Content-Type": "application/json"},
        )
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        if reply.status_code != 200:
            raise SystemExit(f"bench_upload: {n} platforms answered {reply.status_code}")
    finally:
        app.services.store.close()
        app.services.upstream.close()
    return elapsed, cpu, len(body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--platforms", default="1000,2000,5000,10000", help="sizes, comma-separated"
    )
    parser.add_argument(
        "--distinct-certs", action="store_true", help="4 PCK certificates of its own per platform"
    )
    args = parser.parse_args(argv)
    logging.getLogger("dcapd").setLevel(logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="dcapd-bench-upload-"))
    try:
        kind = "distinct" if args.distinct_certs else "shared"
        print(f"PUT /platformcollateral, {kind} PCK certificates, 1 raw TCB per platform")
        for n in (int(c) for c in args.platforms.split(",")):
            seconds, cpu, size = measure(n, args.distinct_certs, workdir)
            print(
                f"{n:>7} platforms  {size / 1e6:7.1f} MB  {seconds:7.2f} s  "
                f"(CPU {cpu:6.2f} s)  {seconds / n * 1e6:7.0f} us/platform",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
