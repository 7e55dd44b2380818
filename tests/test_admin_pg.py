"""dcapd-admin on a PostgreSQL cache (--cache-url): a cache directory moved into PostgreSQL
(export, then import) answers byte-identically; Intel's database migrates into it too."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dcapd.admin import main
from tests.test_pinned import SCENARIO, answers, fill

INTEL_DB = (
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "intel-pccs" / "pckcache.db"
)
V4 = "/sgx/certification/v4"
COLLATERAL = [
    (f"{V4}/tcb", {"fmspc": "00906ED50000"}),
    (f"{V4}/tcb", {"fmspc": "00906ED50000", "update": "early"}),
    (f"{V4}/qe/identity", {}),
    (f"{V4}/qve/identity", {}),
    (f"{V4}/pckcrl", {"ca": "processor"}),
    (f"{V4}/pckcrl", {"ca": "platform", "encoding": "der"}),
    (f"{V4}/rootcacrl", {}),
]


def served(client) -> list[tuple]:
    replies = [client.simulate_get(path, params=params) for path, params in COLLATERAL]
    return [(r.status_code, r.content, r.headers.get("content-type")) for r in replies]


def test_a_cache_directory_moved_into_postgresql_answers_byte_identically(
    tmp_path, fake_pcs, make_client, pg_url, capsys
):
    cache, exported = tmp_path / "cache", tmp_path / "cache.json"
    fake = fake_pcs(SCENARIO)
    source = make_client(fake, cache_dir=str(cache))
    assert all(status == 200 for status, _, _ in served(source))
    fill(source, fake)  # collateral beyond Intel's format too
    before = served(source), answers(source)
    source.app.services.store.close()
    assert main(["export", "-C", str(cache), "-o", str(exported)]) == 0
    assert main(["import", "-i", str(exported), "--cache-url", pg_url]) == 0
    out = capsys.readouterr().out
    assert f"imported into {pg_url} (" in out
    calls = len(fake.calls)
    moved = make_client(cache_mode="OFFLINE", cache_dir="", cache_url=pg_url)
    assert (served(moved), answers(moved)) == before
    assert len(fake.calls) == calls, "served from PostgreSQL alone"
    # and the listing works on it
    assert main(["entries", "--cache-url", pg_url, "--prefix", "tcb/"]) == 0
    assert "tcb/sgx/4/00906ED50000/STANDARD" in capsys.readouterr().out


def test_dcapd_admin_migrate_into_postgresql(make_client, pg_url, capsys):
    assert main(["migrate", str(INTEL_DB), "--cache-url", pg_url]) == 0
    assert "imported into PostgreSQL database" in capsys.readouterr().out
    with sqlite3.connect(f"file:{INTEL_DB}?mode=ro", uri=True) as db:
        fmspc, tcbinfo = db.execute(
            "SELECT fmspc, tcbinfo FROM fmspc_tcbs WHERE type = 0 AND version = 4"
        ).fetchone()
    client = make_client(cache_mode="OFFLINE", cache_dir="", cache_url=pg_url)
    reply = client.simulate_get(f"{V4}/tcb", params={"fmspc": fmspc})
    assert reply.status_code == 200
    assert reply.content == (tcbinfo if isinstance(tcbinfo, bytes) else tcbinfo.encode())


def test_a_directory_and_a_url_together_are_refused_with_one_line(tmp_path, pg_url, capsys):
    argv = ["export", "-C", str(tmp_path), "--cache-url", pg_url, "-o", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the server's own line for it: both settings named
    assert len(err) == 1 and "[cache] dir" in err[0] and "[cache] url" in err[0], err
