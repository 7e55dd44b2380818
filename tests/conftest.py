"""Shared fixtures: a config isolated from the environment, a fake PCS, the app under test."""

from __future__ import annotations

from pathlib import Path

import pytest
from falcon import testing

from dcapd.app import create_app
from dcapd.config import load_config
from dcapd.integrity import bundled_intel_root_pem
from tests import pki
from tests.dcapqvl import Verifier
from tests.fakepcs import FakePCS
from tests.servers import issue_server_cert

INTEL_ROOT_CDP = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"

# ``@pytest.mark.parametrize("backend", BACKENDS)`` runs a test on both cache backends: the
# diskcache directory and a fresh database on the session's PostgreSQL server.
BACKENDS = ["disk", "postgresql"]


@pytest.fixture
def backend() -> str:
    """The cache backend ``make_config`` uses: the directory, unless a test parametrizes
    ``backend`` with BACKENDS."""
    return "disk"


@pytest.fixture
def make_config(tmp_path, backend, request):
    """A Config built only from the given overrides (never from this machine's DCAPD_* vars);
    its cache is a directory in tmp_path, or a fresh PostgreSQL database (``backend``)."""

    roots = tmp_path / "trusted_roots.pem"
    roots.write_bytes(bundled_intel_root_pem() + pki.root_ca().pem.encode())

    def make(**overrides):
        settings = {
            "cache_dir": str(tmp_path / "cache"),
            "tls": "off",
            "trusted_roots": str(roots),
            "listen": "127.0.0.1:0",
            "upstream_retries": 0,
            "upstream_timeout": 5.0,
        }
        if backend == "postgresql":
            settings.update(cache_dir="", cache_url=request.getfixturevalue("pg_url"))
        settings.update(overrides)
        return load_config(settings, environ={})

    return make


@pytest.fixture
def fake_pcs():
    """Start fake PCS servers for scenarios; all are stopped when the test ends."""
    started = []

    def start(scenario=None) -> FakePCS:
        fake = FakePCS(scenario).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


def upstream_settings(fake: FakePCS) -> dict:
    """Point dcapd at the fake: PCS URL, and Intel's CRL hosts mapped onto it (url_map)."""
    return {"pcs_url": fake.pcs_url, "rootca_crl_url": INTEL_ROOT_CDP, "url_map": fake.url_map}


@pytest.fixture
def make_client(make_config):
    """A falcon TestClient for an app on a fresh cache; closes its store at the end."""
    apps = []

    def make(fake: FakePCS | None = None, **overrides):
        settings = upstream_settings(fake) if fake else {}
        settings.update(overrides)
        app = create_app(make_config(**settings))
        apps.append(app)
        return testing.TestClient(app)

    yield make
    for app in apps:
        app.services.store.close()
        app.services.upstream.close()


@pytest.fixture(scope="session")
def postgres_server():
    """The session's private PostgreSQL server (started on first use, stopped at the end);
    skips without PostgreSQL, fails in CI (tests/postgres.py)."""
    from tests.postgres import start_server

    server = start_server()
    yield server
    server.cleanup()


@pytest.fixture
def pg_url(postgres_server):
    """The URL of a fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.create_database()


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory) -> tuple[Path, Path, Path]:
    """One test CA and server certificate for a module's HTTPS servers (ca, cert, key)."""
    return issue_server_cert(tmp_path_factory.mktemp("server-cert"))


@pytest.fixture(scope="module")
def qvl(server_cert, tmp_path_factory):
    """dcap-qvl in one child process for a module, trusting ``server_cert``'s CA."""
    verifier = Verifier(server_cert[0], tmp_path_factory.mktemp("qvl") / "stderr.log")
    yield verifier
    verifier.close()
