"""Helpers for tests that run the real server: a test CA for HTTPS, and a running dcapd."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dcapd.app import create_app
from dcapd.config import Config
from dcapd.server import Server


def dcapd_environment(**settings: str) -> dict[str, str]:
    """The environment for a ``dcapd`` subprocess: this one's without any ``DCAPD_`` setting or
    Intel API key (the developer's own must not leak into a test), plus *settings*."""
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith("DCAPD_") and k != "INTEL_API_KEY"
    }
    environment.update(settings)
    return environment


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate it issued for localhost/127.0.0.1.

    Returns (ca_file, cert_file, key_file). dcap-qvl trusts only SSL_CERT_FILE, so HTTPS
    end-to-end tests point it at ca_file.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("dcapd test CA"))
        .issuer_name(_name("dcapd test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = (
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
    )
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, cert_file, key_file


def free_port() -> int:
    """A 127.0.0.1 port free right now, for servers started as subprocesses."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_dcapd(config: Config) -> Iterator[Server]:
    """dcapd's app behind the real server on an ephemeral 127.0.0.1 port; stopped on exit."""
    app = create_app(config)
    server = Server(app, config)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        app.services.store.close()
        app.services.upstream.close()
