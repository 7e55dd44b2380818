"""The PostgreSQL cache's database faults: down, stopped or restarted, requests that need it
are 503 with Intel's text within seconds (never 500, never a hang), /readyz says which
database, /healthz stays 200, and service resumes without a restart with nothing lost or
half-written. TLS to the database is libpq's: asked for, it never falls back to plaintext."""

from __future__ import annotations

import logging
import os
import shutil
import time

import pytest

from dcapd.backends import StoreUnavailable
from dcapd.backends.postgres import PostgresBackend
from dcapd.errors import STATUS_TEXTS
from tests.servers import issue_server_cert
from tests.test_pckcert import CASES, raw_tcb
from tests.test_platforms import TOKENS, read_platforms, register, registration
from tests.test_upload import put, snapshot
from tests.uploads import intel_upload, upload_for_test_platform

QE = "/sgx/certification/v4/qe/identity"
SECRET = "s3cret-pw"


def test_database_down_is_503_and_comes_back_without_a_restart(
    postgres_server, pg_url, make_client, caplog
):
    # The server trusts local connections, so the password is accepted and never checked:
    # it is here to show that it reaches no log line.
    url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@")
    client = make_client(
        cache_mode="OFFLINE", cache_dir="", cache_url=url, cache_timeout=1, **TOKENS
    )
    caplog.set_level(logging.DEBUG)
    assert put(client, intel_upload()).status_code == 200
    served = client.simulate_get(QE)
    assert served.status_code == 200
    store = client.app.services.store
    before = snapshot(store)
    database = f"PostgreSQL database {pg_url.rsplit('/', 1)[1]} on 127.0.0.1:{postgres_server.port}"

    postgres_server.stop()
    try:
        started = time.monotonic()
        reply = client.simulate_get(QE)
        assert reply.status_code == 503 and reply.text == STATUS_TEXTS[503]
        assert time.monotonic() - started < 5, "answered within the timeout, never a hang"
        ready = client.simulate_get("/readyz")
        assert ready.status_code == 503
        assert database in ready.json["problems"][0]
        assert client.simulate_get("/healthz").status_code == 200
        # Writes are refused whole, reads of every kind too: 503, never 500.
        assert put(client, upload_for_test_platform()).status_code == 503
        cpusvn, pcesvn = raw_tcb(*CASES[0][:2])
        assert register(client, registration(cpusvn, pcesvn)).status_code == 503
        assert read_platforms(client).status_code == 503
    finally:
        postgres_server.start()

    # Back without restarting dcapd, with exactly what was there.
    reply = client.simulate_get(QE)
    assert reply.status_code == 200 and reply.content == served.content
    assert snapshot(store) == before
    assert client.simulate_get("/readyz").status_code == 200
    # A restart drops every pooled connection: the next request still succeeds.
    postgres_server.restart()
    assert client.simulate_get(QE).content == served.content
    assert SECRET not in caplog.text
    assert database in caplog.text  # the failures were logged, naming the database


def test_a_url_asking_for_tls_never_falls_back_to_plaintext(postgres_server, pg_url):
    """The session server speaks no TLS: sslmode=require refuses it (libpq)."""
    backend = PostgresBackend(pg_url + "?sslmode=require", 1, 0.5)
    try:
        with pytest.raises(StoreUnavailable):
            backend.get("k")
    finally:
        backend.close()


@pytest.fixture
def server_with_tls(postgres_server, tmp_path):
    """The session server with TLS on (a certificate for 127.0.0.1 from a test CA)."""
    ca_file, cert_file, key_file = issue_server_cert(tmp_path)
    directory = postgres_server.root
    for source, name in ((cert_file, "server.crt"), (key_file, "server.key")):
        target = directory / name
        shutil.copy(source, target)
        os.chmod(target, 0o600)
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            shutil.chown(target, "postgres")
    postgres_server.admin_sql(f"ALTER SYSTEM SET ssl_cert_file = '{directory / 'server.crt'}'")
    postgres_server.admin_sql(f"ALTER SYSTEM SET ssl_key_file = '{directory / 'server.key'}'")
    postgres_server.admin_sql("ALTER SYSTEM SET ssl = on")
    postgres_server.admin_sql("SELECT pg_reload_conf()")
    try:
        yield ca_file
    finally:
        postgres_server.admin_sql("ALTER SYSTEM RESET ssl")
        postgres_server.admin_sql("SELECT pg_reload_conf()")


def test_verify_full_with_sslrootcert_connects_and_checks_the_server(
    server_with_tls, pg_url, tmp_path
):
    good = PostgresBackend(f"{pg_url}?sslmode=verify-full&sslrootcert={server_with_tls}", 1, 3.0)
    try:
        good.set("k", b"over TLS")
        assert good.get("k") == b"over TLS"
        with good.pool.connection() as conn:
            assert conn.info.pgconn.ssl_in_use
    finally:
        good.close()
    (tmp_path / "other").mkdir()
    other_ca = issue_server_cert(tmp_path / "other")[0]  # a CA that did not sign the server
    wrong = PostgresBackend(f"{pg_url}?sslmode=verify-full&sslrootcert={other_ca}", 1, 0.5)
    try:
        with pytest.raises(StoreUnavailable):
            wrong.get("k")
    finally:
        wrong.close()


def test_startup_with_the_database_down_serves_once_it_is_up(postgres_server, pg_url, make_client):
    postgres_server.stop()
    try:
        client = make_client(
            cache_mode="OFFLINE", cache_dir="", cache_url=pg_url, cache_timeout=1, **TOKENS
        )
        assert client.simulate_get(QE).status_code == 503
    finally:
        postgres_server.start()
    assert put(client, intel_upload()).status_code == 200
    reply = client.simulate_get(QE)
    assert reply.status_code == 200
    assert reply.content == intel_upload()["collaterals"]["qeidentity"].encode()


@pytest.fixture
def password_role(postgres_server):
    """A role that must give its password (scram-sha-256 from 127.0.0.1), owning its own
    database and nothing else: the least-privilege setup the README describes."""
    hba = postgres_server.data / "pg_hba.conf"
    original = hba.read_text()
    postgres_server.admin_sql("DROP DATABASE IF EXISTS pwdb")
    postgres_server.admin_sql("DROP ROLE IF EXISTS pwuser")
    postgres_server.admin_sql("CREATE ROLE pwuser LOGIN PASSWORD 'pw-from-file'")
    postgres_server.admin_sql("CREATE DATABASE pwdb OWNER pwuser")
    postgres_server.admin_sql("REVOKE ALL ON DATABASE pwdb FROM PUBLIC")
    hba.write_text("host all pwuser 127.0.0.1/32 scram-sha-256\n" + original)
    postgres_server.admin_sql("SELECT pg_reload_conf()")
    try:
        yield f"postgresql://pwuser@127.0.0.1:{postgres_server.port}/pwdb?sslmode=disable"
    finally:
        hba.write_text(original)
        postgres_server.admin_sql("SELECT pg_reload_conf()")


def test_the_password_comes_from_pgpassfile_or_pgpassword_and_is_never_logged(
    password_role, postgres_server, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{postgres_server.port}:pwdb:pwuser:pw-from-file\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    backend = PostgresBackend(password_role, 1, 3.0)
    try:
        backend.set("k", b"v")  # the role created the tables in its own database
        assert backend.get("k") == b"v"
    finally:
        backend.close()
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    monkeypatch.setenv("PGPASSWORD", "wrong-password")
    backend = PostgresBackend(password_role, 1, 0.5)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            backend.get("k")
        assert "PostgreSQL database pwdb on 127.0.0.1" in str(caught.value)
        assert 'password authentication failed for user "pwuser"' in str(caught.value)
    finally:
        backend.close()
    monkeypatch.setenv("PGPASSWORD", "pw-from-file")
    backend = PostgresBackend(password_role, 1, 3.0)
    try:
        assert backend.get("k") == b"v"
    finally:
        backend.close()
    assert "pw-from-file" not in caplog.text and "wrong-password" not in caplog.text
