"""Deployment files and portability: the systemd unit, Windows defaults, several workers."""

from __future__ import annotations

import configparser
from pathlib import Path

from dcapd import config as config_module

REPO = Path(__file__).resolve().parents[1]


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((REPO / "scripts" / "dcapd.service").read_text())
    return parser


def test_systemd_unit_is_hardened_and_holds_no_secret():
    service = unit()["Service"]
    assert service["User"] == "dcapd"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/cache/" + service["CacheDirectory"]
    # the ini file's [cache] dir is the operator's: the unit does not override it
    assert "Environment" not in service
    assert service["EnvironmentFile"] == "/etc/dcapd/dcapd.env"
    assert service["CapabilityBoundingSet"] == ""
    text = (REPO / "scripts" / "dcapd.service").read_text()
    assert "INTEL_API_KEY" not in text.replace("# The Intel API key", "")
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_environment_file_example_names_the_secrets():
    text = (REPO / "scripts" / "dcapd.env.example").read_text()
    for name in ("INTEL_API_KEY=", "DCAPD_USER_TOKEN_SHA512=", "DCAPD_ADMIN_TOKEN_SHA512="):
        assert name in text


def test_windows_cache_dir_is_under_localappdata(monkeypatch):
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setattr(config_module.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", r"C:\Users\op\AppData\Local")
    assert config_module.default_cache_dir() == str(
        Path(r"C:\Users\op\AppData\Local") / "dcapd" / "Cache"
    )
    monkeypatch.delenv("LOCALAPPDATA")
    assert config_module.default_cache_dir().endswith(str(Path("dcapd") / "Cache"))


def test_systemd_cache_directory_is_the_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/dcapd")
    assert config_module.default_cache_dir() == "/var/cache/dcapd"
    ini = tmp_path / "pccs.ini"
    ini.write_text("[cache]\ndir = /srv/dcapd\n")
    assert config_module.load_config(environ={}, ini_path=str(ini)).cache_dir == "/srv/dcapd"


def test_linux_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setattr(config_module.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert config_module.default_cache_dir() == str(tmp_path / "dcapd")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert config_module.default_cache_dir() == str(Path.home() / ".cache" / "dcapd")


def test_no_posix_only_calls_in_the_package():
    """No fork and no fcntl: dcapd must run as a Windows service too."""
    for path in (REPO / "dcapd").rglob("*.py"):
        text = path.read_text()
        assert "os.fork" not in text and "import fcntl" not in text, path


def test_windows_server_paths(monkeypatch, make_config):
    """On Windows waitress must use select() (no poll there), and the in-memory certificate
    falls back to an encrypted key in a temporary directory (no memfd)."""
    import ssl

    from dcapd import server, tls

    config = make_config()
    assert server.waitress_options(config)["asyncore_use_poll"] is True
    monkeypatch.setattr(server.os, "name", "nt")
    assert server.waitress_options(config)["asyncore_use_poll"] is False
    monkeypatch.undo()
    monkeypatch.delattr(tls.os, "memfd_create", raising=False)
    cert_pem, key_pem = tls.generate_self_signed()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert tls.load_in_memory(context, cert_pem, key_pem) == "encrypted-tempdir"
