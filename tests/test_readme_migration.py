"""README's migration sequence, run as written (paths moved into a temporary directory):
the migrated collateral is served by the dcapd it starts."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[1]
INTEL_DB = REPO.parent / "shared" / "fixtures" / "intel-pccs" / "pckcache.db"
INTEL_DIR, CACHE_DIR = "/opt/intel/sgx-dcap-pccs", "/var/cache/dcapd"


def readme_migration_commands() -> list[list[str]]:
    text = (REPO / "README.rst").read_text()
    section = text[text.index("Migrating from Intel's PCCS") :]
    block = section[section.index(".. code-block:: sh") :].split("\n\n", 2)[1]
    return [shlex.split(line) for line in block.strip().splitlines()]


def test_readme_migration_sequence_serves_the_migrated_collateral(tmp_path):
    commands = readme_migration_commands()
    assert [c[0] for c in commands] == ["sudo", "dcapd-admin", "dcapd"]
    install, cache = tmp_path / "sgx-dcap-pccs", tmp_path / "cache"
    (install / "config").mkdir(parents=True)
    shutil.copy(INTEL_DB, install / "pckcache.db")
    port = free_port()
    # Intel's default.json as an offline site has it (OFFLINE: nothing is fetched here)
    (install / "config" / "default.json").write_text(
        json.dumps({"HTTPS_PORT": port, "hosts": "127.0.0.1", "CachingFillMode": "OFFLINE"})
    )

    def local(argv: list[str]) -> list[str]:
        program = {"dcapd-admin": "dcapd.admin", "dcapd": "dcapd"}[argv[0]]
        moved = [a.replace(INTEL_DIR, str(install)).replace(CACHE_DIR, str(cache)) for a in argv]
        return [sys.executable, "-m", program, *moved[1:]]

    migrate = subprocess.run(local(commands[1]), capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr
    server = subprocess.Popen(
        local(commands[2]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        with sqlite3.connect(f"file:{INTEL_DB}?mode=ro", uri=True) as db:
            fmspc, tcbinfo = db.execute(
                "SELECT fmspc, tcbinfo FROM fmspc_tcbs WHERE type = 0 AND version = 4"
            ).fetchone()
        url = f"https://127.0.0.1:{port}/sgx/certification/v4/tcb"
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = requests.get(url, params={"fmspc": fmspc}, verify=False, timeout=5)
                break
            except requests.ConnectionError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "dcapd did not start"
                time.sleep(0.2)
        assert answer.status_code == 200
        assert answer.content == (tcbinfo if isinstance(tcbinfo, bytes) else tcbinfo.encode())
        assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["Request-ID"])
    finally:
        server.terminate()
        server.wait(timeout=20)
