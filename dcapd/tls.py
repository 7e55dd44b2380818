"""TLS material for dcapd's HTTPS front (design.md §5, stack.md §1.5).

* :func:`generate_self_signed` makes an EC P-256 key and a self-signed server
  certificate in memory.
* :func:`server_ssl_context` builds the server-side :class:`ssl.SSLContext`,
  either from the administrator's certificate/key files or from a freshly
  generated certificate.

The standard library loads keys from file paths only.  A generated key is
therefore handed to OpenSSL through an anonymous memory file on Linux
(``os.memfd_create`` + ``/proc/self/fd/N``: nothing is ever created on disk);
elsewhere it is written *encrypted under a random in-process password* into a
private temporary directory that is removed right after loading.  A clear-text
key never touches the disk.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import secrets
import ssl
import tempfile
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["generate_self_signed", "server_ssl_context", "fingerprint_sha256"]

log = logging.getLogger("dcapd.tls")

#: Names always present in a generated certificate's subjectAltName.
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")

# Listen addresses that mean "every interface": not a name a client can use.
_WILDCARDS = {"", "*", "0.0.0.0", "::"}


def _san_entries(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """subjectAltName entries for *hosts* (IP literal -> IPAddress, else DNSName), de-duplicated."""
    entries: list[x509.GeneralName] = []
    seen: set[tuple[str, object]] = set()
    for raw in list(DEFAULT_HOSTS) + [h for h in hosts if h is not None]:
        host = str(raw).strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host in _WILDCARDS:
            continue
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            name = host.rstrip(".").lower()
            key = ("dns", name)
            if not name or key in seen:
                continue
            try:
                entry: x509.GeneralName = x509.DNSName(name)
            except ValueError:  # not a usable DNS name (e.g. non-ASCII): skip it
                log.warning("not adding %r to the certificate: not a DNS name or IP address", host)
                continue
        else:
            key = ("ip", str(ip))
            if key in seen:
                continue
            entry = x509.IPAddress(ip)
        seen.add(key)
        entries.append(entry)
    return entries


def generate_self_signed(hosts: Sequence[str] = ()) -> tuple[bytes, bytes]:
    """Return ``(cert_pem, key_pem)`` for a new EC P-256 self-signed server certificate.

    The subjectAltName holds ``localhost``, ``127.0.0.1``, ``::1`` and every name
    in *hosts* (IP literals as IP addresses, anything else as DNS names;
    wildcard listen addresses such as ``0.0.0.0`` are skipped).  The key is
    returned as unencrypted PKCS#8 PEM: keep it in memory only.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    sans = _san_entries(hosts)
    first_dns = next((e.value for e in sans if isinstance(e, x509.DNSName)), "localhost")
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, first_dns[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dcapd self-signed"),
        ]
    )
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def fingerprint_sha256(cert_der: bytes) -> str:
    """SHA-256 fingerprint of a DER certificate as upper-case, colon-separated hex."""
    digest = hashlib.sha256(cert_der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _new_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= getattr(ssl, "OP_NO_COMPRESSION", 0)
    ctx.options |= getattr(ssl, "OP_CIPHER_SERVER_PREFERENCE", 0)
    # A client that half-closes TCP after its request (or just goes away) ends the
    # connection; OpenSSL 3, reading the socket itself (dcapd.transport), would otherwise
    # answer that EOF with a fatal decode_error alert, which the client, still reading its
    # answer, gets instead of the end of it. Requests are framed by their heads, so a
    # missing close_notify truncates nothing.
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    try:
        ctx.set_alpn_protocols(["http/1.1"])
    except (NotImplementedError, AttributeError):  # pragma: no cover - very old OpenSSL
        pass
    return ctx


def _load_via_memfd(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> bool:
    """Load cert+key through an anonymous memory file. False when that is unavailable."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None or not os.path.isdir("/proc/self/fd"):
        return False
    try:
        fd = memfd_create("dcapd-tls", getattr(os, "MFD_CLOEXEC", 0))
    except OSError:
        return False
    try:
        data = cert_pem + b"\n" + key_pem
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        path = f"/proc/self/fd/{fd}"
        if not os.path.exists(path):
            return False
        # One "file" holding both the certificate and its key (keyfile defaults to certfile).
        ctx.load_cert_chain(path)
        return True
    except FileNotFoundError:  # no usable /proc (e.g. sandboxed): use the portable way
        return False
    finally:
        os.close(fd)


def _load_via_encrypted_tempdir(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Portable fallback: the key goes to disk only encrypted under a random in-process password."""
    password = secrets.token_urlsafe(32).encode("ascii")
    key = serialization.load_pem_private_key(key_pem, password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    # TemporaryDirectory rather than NamedTemporaryFile: on Windows an open
    # delete=True file cannot be reopened by name (delete_on_close is 3.12+).
    with tempfile.TemporaryDirectory(prefix="dcapd-tls-") as tmp:
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, encrypted)):
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600
            )
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        ctx.load_cert_chain(cert_path, key_path, password=password)


def load_in_memory(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> str:
    """Load an in-memory certificate and key into *ctx* without a clear-text key on disk.

    Returns the method used: ``"memfd"`` or ``"encrypted-tempdir"``.
    """
    if _load_via_memfd(ctx, cert_pem, key_pem):
        return "memfd"
    _load_via_encrypted_tempdir(ctx, cert_pem, key_pem)
    return "encrypted-tempdir"


def _first_cert_der(cert_file: str) -> bytes:
    with open(cert_file, "rb") as fh:
        data = fh.read()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificates(data)[0].public_bytes(serialization.Encoding.DER)
    return x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.DER)


KEPT_CERT, KEPT_KEY = "dcapd.crt", "dcapd.key"  # in <cache dir>/tls/
_RENEW_BEFORE = datetime.timedelta(days=30)


def kept_certificate(folder: str, hosts: Sequence[str]) -> tuple[bytes, bytes]:
    """The generated certificate kept in *folder* (its key mode 0600), so its fingerprint
    survives restarts and clients can trust it (``--ca-file folder/dcapd.crt``); a new one
    when it is missing, unreadable, about to expire or not for these host names."""
    cert_path, key_path = os.path.join(folder, KEPT_CERT), os.path.join(folder, KEPT_KEY)
    try:
        with open(cert_path, "rb") as handle:
            cert_pem = handle.read()
        with open(key_path, "rb") as handle:
            key_pem = handle.read()
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, None)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        now = datetime.datetime.now(datetime.timezone.utc)
        usable = (
            key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            == cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            and cert.not_valid_after_utc - _RENEW_BEFORE > now
            and set(_san_entries(hosts)) <= set(names)
        )
        if usable:
            return cert_pem, key_pem
        log.info("the kept TLS certificate in %s is not usable for %s: a new one", folder, hosts)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        log.warning("the kept TLS certificate in %s cannot be read (%s): a new one", folder, exc)
    cert_pem, key_pem = generate_self_signed(hosts)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    _write_private(key_path, key_pem, 0o600)
    _write_private(cert_path, cert_pem, 0o644)
    return cert_pem, key_pem


def _write_private(path: str, data: bytes, mode: int) -> None:
    """Write *path* whole (a new file renamed over the old), created with *mode*."""
    temporary = f"{path}.{os.getpid()}.new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def server_ssl_context(
    cert_file: str = "", key_file: str = "", hosts: Sequence[str] = (), keep_in: str = ""
) -> tuple[ssl.SSLContext, str]:
    """Return ``(context, sha256_fingerprint)`` for dcapd's HTTPS front.

    With *cert_file* (PEM, optionally followed by the chain; its key in
    *key_file*, or in *cert_file* itself when *key_file* is empty) those files
    are loaded.  Without files, an EC P-256 self-signed certificate for
    ``localhost``/``127.0.0.1``/``::1`` plus *hosts* is generated and loaded
    without ever writing a clear-text key to disk.  The fingerprint (SHA-256
    of the leaf certificate, colon-separated hex) is logged on ``dcapd.tls``.
    """
    ctx = _new_context()
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file or None)
        fingerprint = fingerprint_sha256(_first_cert_der(cert_file))
        log.info("TLS certificate %s, SHA-256 fingerprint %s", cert_file, fingerprint)
        return ctx, fingerprint
    if key_file:
        raise ValueError("key_file is set but cert_file is not")
    if keep_in:
        cert_pem, key_pem = kept_certificate(keep_in, hosts)
        ctx.load_cert_chain(os.path.join(keep_in, KEPT_CERT), os.path.join(keep_in, KEPT_KEY))
        how = f"kept in {keep_in}"
    else:
        cert_pem, key_pem = generate_self_signed(hosts)
        how = f"generated, loaded via {load_in_memory(ctx, cert_pem, key_pem)}"
    del key_pem
    fingerprint = fingerprint_sha256(ssl.PEM_cert_to_DER_cert(cert_pem.decode("ascii")))
    log.info("self-signed TLS certificate (EC P-256, %s), SHA-256 fingerprint %s", how, fingerprint)
    return ctx, fingerprint
