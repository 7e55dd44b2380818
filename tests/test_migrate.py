"""Migration from Intel's PCCS: its SQLite database imported into an empty cache makes an
OFFLINE dcapd answer what Intel's PCCS answered from that database, with the same bytes."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from dcapd import migrate
from dcapd.admin import main as admin_main
from dcapd.app import create_app
from dcapd.migrate import MigrationError, export_to_sqlite, import_intel_db
from dcapd.store import Store
from tests.test_platforms import ADMIN, TOKENS

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
INTEL_DB = FIXTURES / "intel-pccs" / "pckcache.db"
PCS = FIXTURES / "pcs"
PCK_FIXTURE = FIXTURES / "pckcerts" / "prod_pckcert_00606A000000"
PLATFORMS = "/sgx/certification/v4/platforms"
PCKCERT = "/sgx/certification/v4/pckcert"
CACHED_QEID = "00112233445566778899AABBCCDDEEFF"
SGX_POLICY_CLASS = "3123ec35-8d38-4ea5-87a5-d6c48b567570"
NOW = "2026-11-27 02:02:40.000 +00:00"


# --- what Intel's PCCS holds and answered, read independently of dcapd


def rows(db: Path, table: str) -> list[dict]:
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        cursor = connection.execute(f"SELECT * FROM {table}")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]
    finally:
        connection.close()


def intel_chain(db: Path, intermediate: int, root: int) -> str:
    certs = {row["id"]: row["cert"].decode() for row in rows(db, "pcs_certificates")}
    return certs[intermediate] + certs[root]


def recorded_pcs_headers() -> dict[bytes, dict]:
    """Every recorded Intel PCS body -> its response headers."""
    recorded = {}
    for manifest in sorted(PCS.glob("*/manifest.json")):
        for response in json.loads(manifest.read_text())["responses"]:
            if response.get("body_file"):
                body = (manifest.parent / response["body_file"]).read_bytes()
                recorded.setdefault(body, response["headers"])
    return recorded


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- helpers


def import_into(make_config, cache_dir: Path, db: Path = INTEL_DB):
    """Import with the services of a dcapd on ``cache_dir`` (then closed, as after the CLI)."""
    app = create_app(make_config(cache_dir=str(cache_dir), cache_mode="OFFLINE"))
    try:
        return import_intel_db(db, app.services)
    finally:
        app.services.store.close()
        app.services.upstream.close()


def snapshot(cache_dir: Path) -> dict:
    """Every entry (body, headers, content type), without the times records carry."""
    store = Store(str(cache_dir))
    try:
        entries = {
            key: (entry.body, entry.headers, entry.content_type)
            for key in store.keys()
            for entry in [store.get(key)]
        }
    finally:
        store.close()
    for key, (body, headers, content_type) in entries.items():
        if key.startswith("policy/"):  # an appraisal policy record: when it was stored
            record = {k: v for k, v in json.loads(body).items() if not k.endswith("_time")}
            entries[key] = (record, headers, content_type)
    return entries


def served(client, path: str, **params):
    return client.simulate_get(path, params=params or None)


def tcb_path(row: dict) -> str:
    return f"/{'tdx' if row['type'] == 1 else 'sgx'}/certification/v{row['version']}/tcb"


IDENTITY_PATHS = {
    1: "/sgx/certification/v{}/qe/identity",
    2: "/sgx/certification/v{}/qve/identity",
    3: "/tdx/certification/v{}/qe/identity",
}


# --- the fixture database, as Intel's PCCS left it


def test_offline_dcapd_answers_every_request_intel_answered_with_the_same_bytes(
    make_config, make_client, tmp_path
):
    intel_dir_before = sorted(p.name for p in INTEL_DB.parent.iterdir())
    db_hash = sha256(INTEL_DB)
    summary = import_into(make_config, tmp_path / "imported")
    assert sha256(INTEL_DB) == db_hash, "the database must never be written"
    assert sorted(p.name for p in INTEL_DB.parent.iterdir()) == intel_dir_before
    assert summary.skipped == []
    assert (
        summary.platforms,
        summary.pck_certs,
        summary.raw_tcbs,
        summary.tcb_infos,
        summary.identities,
        summary.pck_crls,
        summary.root_ca_crl,
        summary.crls,
        summary.queued_new,
    ) == (1, 1, 1, 8, 3, 2, 1, 1, 1)

    client = make_client(cache_dir=str(tmp_path / "imported"), cache_mode="OFFLINE", **TOKENS)
    recorded = recorded_pcs_headers()

    tcb_rows = rows(INTEL_DB, "fmspc_tcbs")
    assert len(tcb_rows) == 8
    for row in tcb_rows:
        got = served(client, tcb_path(row), fmspc=row["fmspc"], update=row["update_type"].lower())
        assert got.status_code == 200, row
        assert got.content == row["tcbinfo"], f"{row['fmspc']}: not the database's bytes"
        assert got.content in recorded, f"{row['fmspc']}: not Intel PCS's bytes"
        assert got.headers["Content-Type"] == "application/json"
        header = "TCB-Info-Issuer-Chain" if row["version"] == 4 else "SGX-TCB-Info-Issuer-Chain"
        chain = intel_chain(INTEL_DB, row["signing_cert_id"], row["root_cert_id"])
        assert got.headers[header] == chain == recorded[got.content][header]

    identity_rows = rows(INTEL_DB, "enclave_identities")
    assert len(identity_rows) == 3
    for row in identity_rows:
        got = served(
            client,
            IDENTITY_PATHS[row["id"]].format(row["version"]),
            update=row["update_type"].lower(),
        )
        assert got.status_code == 200, row
        assert got.content == row["identity"]
        assert got.content in recorded
        chain = intel_chain(INTEL_DB, row["signing_cert_id"], row["root_cert_id"])
        assert (
            got.headers["SGX-Enclave-Identity-Issuer-Chain"]
            == chain
            == recorded[got.content]["SGX-Enclave-Identity-Issuer-Chain"]
        )

    for row in rows(INTEL_DB, "pck_crl"):
        chain = intel_chain(INTEL_DB, row["intmd_cert_id"], row["root_cert_id"])
        der = served(client, "/sgx/certification/v4/pckcrl", ca=row["ca"].lower(), encoding="der")
        assert der.content == row["pck_crl"]
        assert der.headers["Content-Type"] == "application/pkix-crl"
        assert (
            der.headers["SGX-PCK-CRL-Issuer-Chain"]
            == chain
            == recorded[row["pck_crl"]]["SGX-PCK-CRL-Issuer-Chain"]
        )
        text = served(client, "/sgx/certification/v4/pckcrl", ca=row["ca"].lower())
        assert text.text == row["pck_crl"].hex()
        assert text.headers["SGX-PCK-CRL-Issuer-Chain"] == chain

    root_crl = next(r["crl"] for r in rows(INTEL_DB, "pcs_certificates") if r["id"] == 1)
    got = served(client, "/sgx/certification/v4/rootcacrl")
    assert got.status_code == 200 and got.text == root_crl.hex()
    assert root_crl in recorded

    crl_rows = rows(INTEL_DB, "crl_cache")
    assert crl_rows
    for row in crl_rows:
        got = served(client, "/sgx/certification/v4/crl", uri=row["cdp_url"])
        assert got.status_code == 200 and got.content == row["crl"]
        assert got.content in recorded

    # The cached platform's PCK certificate for its mapped raw TCB: Intel's PEM, TCBm, chain.
    platform = rows(INTEL_DB, "platforms")[0]
    chain_row = next(r for r in rows(INTEL_DB, "pck_certchain") if r["ca"] == platform["ca"])
    certs = {(r["qe_id"], r["tcbm"]): r["pck_cert"] for r in rows(INTEL_DB, "pck_cert")}
    pck_manifest = json.loads((PCK_FIXTURE / "manifest.json").read_text())
    for mapping in rows(INTEL_DB, "platform_tcbs"):
        got = served(
            client,
            PCKCERT,
            qeid=mapping["qe_id"],
            pceid=mapping["pce_id"],
            cpusvn=mapping["cpu_svn"],
            pcesvn=mapping["pce_svn"],
        )
        assert got.status_code == 200, got.text
        assert (
            got.content
            == certs[(mapping["qe_id"], mapping["tcbm"])]
            == (PCK_FIXTURE / "pckcert.pem").read_bytes()
        )
        assert got.headers["SGX-TCBm"] == mapping["tcbm"] == pck_manifest["headers"]["SGX-TCBm"]
        assert (
            got.headers["SGX-PCK-Certificate-Issuer-Chain"]
            == intel_chain(INTEL_DB, chain_row["intmd_cert_id"], chain_row["root_cert_id"])
            == pck_manifest["headers"]["SGX-PCK-Certificate-Issuer-Chain"]
        )
        assert got.headers["SGX-FMSPC"] == platform["fmspc"]
        assert got.headers["SGX-PCK-Certificate-CA-Type"] == platform["ca"]

    # The cached platform list (platforms x platform_tcbs), as Intel lists it.
    expected_cached = [
        {
            "qe_id": m["qe_id"],
            "pce_id": m["pce_id"],
            "cpu_svn": m["cpu_svn"],
            "pce_svn": m["pce_svn"],
            "enc_ppid": (platform["enc_ppid"] or b"").hex().upper(),
            "platform_manifest": (platform["platform_manifest"] or b"").hex().upper(),
        }
        for m in rows(INTEL_DB, "platform_tcbs")
    ]
    for source in ("[]", f"[{platform['fmspc']}]"):
        listed = client.simulate_get(
            PLATFORMS, params={"source": source}, headers={"admin-token": ADMIN}
        )
        assert listed.status_code == 200 and listed.json == expected_cached
        assert [list(item) for item in listed.json] == [list(item) for item in expected_cached]

    # The registration queue: Intel's NEW rows, once (reading it empties it, as in Intel's).
    expected_queue = [
        {
            "qe_id": r["qe_id"],
            "pce_id": r["pce_id"],
            "cpu_svn": r["cpu_svn"],
            "pce_svn": r["pce_svn"],
            "platform_manifest": (r["platform_manifest"] or b"").hex(),
            "enc_ppid": (r["enc_ppid"] or b"").hex(),
        }
        for r in rows(INTEL_DB, "platforms_registered")
        if r["state"] == 0
    ]
    assert len(expected_queue) == 1
    queue = client.simulate_get(PLATFORMS, headers={"admin-token": ADMIN})
    assert queue.status_code == 200 and queue.json == expected_queue
    assert [list(item) for item in queue.json] == [list(item) for item in expected_queue]
    assert queue.headers["platform-count"] == "1"
    assert client.simulate_get(PLATFORMS, headers={"admin-token": ADMIN}).json == []

    # What Intel's OFFLINE PCCS did not answer from this database, dcapd does not either.
    queued = expected_queue[0]
    assert (
        served(
            client,
            PCKCERT,
            qeid=queued["qe_id"],
            pceid=queued["pce_id"],
            cpusvn=queued["cpu_svn"],
            pcesvn=queued["pce_svn"],
        ).status_code
        == 461
    )
    assert (
        served(client, "/sgx/certification/v4/appraisalpolicy", fmspc=platform["fmspc"]).status_code
        == 404
    )
    # Not in the database: a v3 TCB info miss is 410 since PCCS 1.27 (PCS API v3 is retired).
    assert served(client, "/sgx/certification/v3/tcb", fmspc=platform["fmspc"]).status_code == 410
    assert sha256(INTEL_DB) == db_hash


def test_importing_twice_changes_nothing(make_config, tmp_path):
    once = import_into(make_config, tmp_path / "once")
    twice_first = import_into(make_config, tmp_path / "twice")
    twice_second = import_into(make_config, tmp_path / "twice")
    assert snapshot(tmp_path / "once") == snapshot(tmp_path / "twice")
    assert once == twice_first == twice_second


@pytest.mark.parametrize(
    "kind", ["other schema", "not sqlite", "empty file", "missing", "missing column"]
)
def test_a_database_that_is_not_intels_is_refused_clearly(make_config, tmp_path, kind):
    path = tmp_path / "other.db"
    if kind == "other schema":
        with sqlite3.connect(path) as connection:
            connection.execute("CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT)")
        expected = "not an Intel PCCS database: no table pcs_version, pcs_certificates"
    elif kind == "not sqlite":
        path.write_text('{"HTTPS_PORT": 8081}\n')
        expected = "is not an SQLite database"
    elif kind == "empty file":
        path.write_bytes(b"")
        expected = "not an Intel PCCS database"
    elif kind == "missing":
        expected = "no such file"
    else:
        shutil.copy(INTEL_DB, path)
        with sqlite3.connect(path) as connection:
            connection.execute("ALTER TABLE pck_cert RENAME COLUMN tcbm TO tcb_m")
        expected = "table pck_cert has no column tcbm"
    with pytest.raises(MigrationError) as caught:
        import_into(make_config, tmp_path / "cache", path)
    assert expected in str(caught.value) and str(path) in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1
    assert snapshot(tmp_path / "cache") == {}, "nothing is written"


@pytest.fixture
def dcapd_logging():
    """The command configures the "dcapd" logger (as the server does): put it back after."""
    logger = logging.getLogger("dcapd")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def test_command_line(tmp_path, monkeypatch, capsys, make_client, dcapd_logging):
    for name in list(os.environ):
        if name.startswith("DCAPD_"):
            monkeypatch.delenv(name)
    assert migrate.main([str(INTEL_DB), "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert f"imported into {tmp_path / 'c'}" in out
    assert "registration queue: 1 NEW, 0 NOT_AVAILABLE" in out and "skipped: 0" in out
    client = make_client(cache_dir=str(tmp_path / "c"), cache_mode="OFFLINE")
    assert served(client, "/sgx/certification/v4/rootcacrl").status_code == 200
    capsys.readouterr()

    assert migrate.main([str(tmp_path / "nothing.db"), "--cache-dir", str(tmp_path / "d")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err.strip().splitlines()[-1]
        == f"python -m dcapd.migrate: {tmp_path / 'nothing.db'}: no such file"
    )


def test_dcapd_admin_migrate_is_the_same_import(
    tmp_path, monkeypatch, capsys, make_client, dcapd_logging
):
    """``dcapd-admin migrate`` is listed in ``dcapd-admin --help`` and imports the database
    exactly as ``python -m dcapd.migrate`` does."""
    with pytest.raises(SystemExit) as exit_:
        admin_main(["--help"])
    assert exit_.value.code == 0
    assert "    migrate " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        admin_main(["migrate", "--help"])
    usage = capsys.readouterr().out
    assert usage.startswith("usage: dcapd-admin migrate")
    assert all(option in usage for option in ("PATH", "--cache-dir", "--config", "--verbose"))

    for name in list(os.environ):
        if name.startswith("DCAPD_"):
            monkeypatch.delenv(name)
    admin_cache, module_cache = tmp_path / "admin", tmp_path / "module"
    assert admin_main(["migrate", str(INTEL_DB), "--cache-dir", str(admin_cache)]) == 0
    out = capsys.readouterr().out
    assert f"imported into {admin_cache}" in out
    assert "registration queue: 1 NEW, 0 NOT_AVAILABLE" in out and "skipped: 0" in out
    client = make_client(cache_dir=str(admin_cache), cache_mode="OFFLINE")
    assert served(client, "/sgx/certification/v4/rootcacrl").status_code == 200
    assert migrate.main([str(INTEL_DB), "--cache-dir", str(module_cache)]) == 0
    assert snapshot(admin_cache) == snapshot(module_cache)
    capsys.readouterr()

    missing = tmp_path / "nothing.db"
    assert admin_main(["migrate", str(missing), "--cache-dir", str(tmp_path / "d")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1] == f"dcapd-admin: {missing}: no such file"


# --- a database with what the fixture lacks: v3 rows, policies, queue states, odd rows


def jwt(payload: dict) -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part(payload)}.c2ln"


def policy(name: str) -> str:
    return jwt(
        {
            "name": name,
            "policy_payload": json.dumps(
                {"policy_array": [{"environment": {"class_id": SGX_POLICY_CLASS}}]}
            ),
        }
    )


def insert(connection, table: str, **values) -> None:
    values.setdefault("created_time", NOW)
    values.setdefault("updated_time", NOW)
    connection.execute(
        f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
        tuple(values.values()),
    )


@pytest.fixture
def richer_db(tmp_path) -> Path:
    """A copy of the fixture database with rows Intel's PCCS writes in other situations."""
    path = tmp_path / "richer.db"
    shutil.copy(INTEL_DB, path)
    recording = PCS / "2025-05-27_intel-pcs-recording"
    tampered = json.loads(
        (
            PCS / "2025-06-19_sgx-00A067110000_tdx-B0C06F000000" / "sgx_tcb_00A067110000.json"
        ).read_bytes()
    )
    tampered["signature"] = "00" + tampered["signature"][2:]
    with sqlite3.connect(path) as connection:
        # A PCS v3 TCB info and QE identity (served on the v3 routes only).
        insert(
            connection,
            "fmspc_tcbs",
            fmspc="00906ED50000",
            type=0,
            version=3,
            update_type="STANDARD",
            root_cert_id=1,
            signing_cert_id=3,
            tcbinfo=(recording / "sgx_tcb_00906ED50000_v3api.json").read_bytes(),
        )
        insert(
            connection,
            "enclave_identities",
            id=1,
            version=3,
            update_type="STANDARD",
            root_cert_id=1,
            signing_cert_id=3,
            identity=(recording / "sgx_qe_identity_v3api.json").read_bytes(),
        )
        # A TCB info whose signature no longer verifies: skipped, the rest imported.
        connection.execute(
            "UPDATE fmspc_tcbs SET tcbinfo = ? WHERE fmspc = '00A067110000'",
            (json.dumps(tampered, separators=(",", ":")).encode(),),
        )
        # A raw TCB Intel mapped to the certificate that today's selection would not pick.
        insert(
            connection,
            "platform_tcbs",
            qe_id=CACHED_QEID,
            pce_id="0000",
            cpu_svn="00000000000000000000000000000000",
            pce_svn="0000",
            tcbm="0B0B0303FFFF000000000000000000000D00",
        )
        # A platform row dcapd cannot serve (Intel checks lengths only).
        insert(
            connection,
            "platforms",
            qe_id="NOT-HEX",
            pce_id="0000",
            fmspc="00606A000000",
            ca="PLATFORM",
        )
        # Appraisal policies: a default and an older non-default for one FMSPC, one invalid.
        for name, is_default, fmspc in [
            ("old", 0, "00606A000000"),
            ("current", 1, "00606A000000"),
            ("other", 1, "00906ED50000"),
        ]:
            text = policy(name)
            insert(
                connection,
                "appraisal_policies",
                id=hashlib.sha384(text.encode()).hexdigest(),
                type=0,
                policy=text,
                is_default=is_default,
                fmspc=fmspc,
            )
        insert(
            connection,
            "appraisal_policies",
            id="bad",
            type=0,
            policy="not a jwt",
            is_default=1,
            fmspc="00A067110000",
        )
        # Queue rows: REQ's "not available" row (Intel's decimal pce_svn), a manifest
        # registration, and one the admin already read (state 9, not imported).
        insert(
            connection,
            "platforms_registered",
            qe_id="AA" * 16,
            pce_id="0000",
            cpu_svn="0c0c0303ffff00000000000000000000",
            pce_svn="13",
            state=1,
            enc_ppid=bytes(range(256)) + bytes(128),
        )
        insert(
            connection,
            "platforms_registered",
            qe_id="BB" * 16,
            pce_id="0000",
            cpu_svn="",
            pce_svn="",
            state=0,
            platform_manifest=bytes.fromhex("abcdef01"),
        )
        insert(
            connection,
            "platforms_registered",
            qe_id="CC" * 16,
            pce_id="0000",
            cpu_svn="0B0B0303FFFF00000000000000000000",
            pce_svn="0D00",
            state=9,
        )
        # A CRL cached for a URL dcapd never serves.
        insert(connection, "crl_cache", cdp_url="https://example.com/IntelSGXRootCA.der", crl=b"0")
    return path


def test_rows_beyond_the_fixture(make_config, make_client, tmp_path, richer_db):
    db_hash = sha256(richer_db)
    summary = import_into(make_config, tmp_path / "c", richer_db)
    assert sha256(richer_db) == db_hash
    skipped = "\n".join(summary.skipped)
    assert len(summary.skipped) == 4, skipped
    assert "fmspc_tcbs 00A067110000 SGX v4 STANDARD: not what Intel signed" in skipped
    assert "platform NOT-HEX/0000: has an invalid qe_id" in skipped
    assert "appraisal_policies bad" in skipped
    assert "crl_cache https://example.com/IntelSGXRootCA.der: dcapd serves crl?uri= only" in skipped
    assert (
        summary.tcb_infos,
        summary.identities,
        summary.raw_tcbs,
        summary.raw_tcbs_kept_as_mapped,
        summary.appraisal_policies,
        summary.queued_new,
        summary.queued_not_available,
    ) == (8, 4, 2, 1, 3, 2, 1)
    client = make_client(cache_dir=str(tmp_path / "c"), cache_mode="OFFLINE", **TOKENS)
    recorded = recorded_pcs_headers()

    for path, header in [
        ("/sgx/certification/v3/tcb", "SGX-TCB-Info-Issuer-Chain"),
        ("/sgx/certification/v3/qe/identity", "SGX-Enclave-Identity-Issuer-Chain"),
    ]:
        got = served(client, path, **({"fmspc": "00906ED50000"} if "tcb" in path else {}))
        assert got.status_code == 200
        assert got.headers[header] == recorded[got.content][header] == intel_chain(richer_db, 3, 1)
    assert served(client, "/sgx/certification/v4/tcb", fmspc="00A067110000").status_code == 404

    # Intel's mapping is kept even where today's selection finds no certificate.
    got = served(
        client,
        PCKCERT,
        qeid=CACHED_QEID,
        pceid="0000",
        cpusvn="00000000000000000000000000000000",
        pcesvn="0000",
    )
    assert got.status_code == 200, got.text
    assert got.content == (PCK_FIXTURE / "pckcert.pem").read_bytes()
    assert got.headers["SGX-TCBm"] == "0B0B0303FFFF000000000000000000000D00"

    got = served(client, "/sgx/certification/v4/appraisalpolicy", fmspc="00606A000000")
    assert got.status_code == 200 and got.text == policy("current")
    assert served(
        client, "/sgx/certification/v4/appraisalpolicy", fmspc="00906ED50000"
    ).text == policy("other")
    store = client.app.services.store
    assert len(store.keys(store.policy_prefix("00606A000000"))) == 2, "non-defaults are kept"

    not_available = client.simulate_get(
        PLATFORMS, params={"source": "reg_na"}, headers={"admin-token": ADMIN}
    ).json
    assert not_available == [
        {
            "qe_id": "AA" * 16,
            "pce_id": "0000",
            "cpu_svn": "0c0c0303ffff00000000000000000000",
            "pce_svn": "0d00",
            "platform_manifest": "",
            "enc_ppid": (bytes(range(256)) + bytes(128)).hex(),
        }
    ]
    new = client.simulate_get(PLATFORMS, headers={"admin-token": ADMIN}).json
    assert sorted(row["qe_id"] for row in new) == ["7BEA0618905862C11F8AE8DA381084D6", "BB" * 16]
    assert next(row for row in new if row["qe_id"] == "BB" * 16)["platform_manifest"] == "abcdef01"

    # Again, with the pinned raw TCB and the policies already in the cache: nothing changes.
    import_into(make_config, tmp_path / "twice", richer_db)
    import_into(make_config, tmp_path / "twice", richer_db)
    import_into(make_config, tmp_path / "once", richer_db)
    assert snapshot(tmp_path / "twice") == snapshot(tmp_path / "once")


# --- Intel's MySQL backend: its tables copied into SQLite import the same


def test_export_from_another_connection_imports_the_same(make_config, tmp_path):
    source = sqlite3.connect(f"file:{INTEL_DB}?mode=ro", uri=True)  # stands in for PyMySQL
    try:
        export_to_sqlite(source, tmp_path / "exported.db")
    finally:
        source.close()
    with pytest.raises(MigrationError, match="already exists"):
        export_to_sqlite(sqlite3.connect(":memory:"), tmp_path / "exported.db")
    import_into(make_config, tmp_path / "direct")
    import_into(make_config, tmp_path / "via-export", tmp_path / "exported.db")
    assert snapshot(tmp_path / "direct") == snapshot(tmp_path / "via-export")
