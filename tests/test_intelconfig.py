"""dcapd started with Intel PCCS's config/default.json (pccs-reference.md §6)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from dcapd import cli
from dcapd.auth import token_sha512
from dcapd.config import ConfigError, load_config
from dcapd.intelconfig import read_intel_config, report_intel_config
from dcapd.pcsurls import INTEL_PCS_URL

# Intel's shipped config/default.json, with the defaults of pccs-reference.md §6.
INTEL_DEFAULT_JSON = {
    "HTTPS_PORT": 8081,
    "hosts": "127.0.0.1",
    "uri": "https://api.trustedservices.intel.com/sgx/certification/v4/",
    "ApiKey": "",
    "proxy": "",
    "RefreshSchedule": "0 0 1 * * *",
    "UserTokenHash": "",
    "AdminTokenHash": "",
    "CachingFillMode": "LAZY",
    "OPENSSL_FIPS_MODE": False,
    "LogLevel": "info",
    "DB_CONFIG": "sqlite",
    "sqlite": {
        "database": "database",
        "username": "username",
        "password": "password",
        "options": {
            "host": "localhost",
            "dialect": "sqlite",
            "pool": {"max": 5, "min": 0, "acquire": 30000, "idle": 10000},
            "define": {"freezeTableName": True},
            "logging": False,
            "storage": "pckcache.db",
        },
    },
    "mysql": {
        "database": "pckcache",
        "username": "root",
        "password": "mypass",
        "options": {
            "host": "localhost",
            "port": "3306",
            "dialect": "mysql",
            "pool": {"max": 5, "min": 0, "acquire": 30000, "idle": 10000},
            "define": {"freezeTableName": True},
            "logging": False,
        },
        "ssl": {"required": False, "ca": "/if_required/path/to/your_ssl_ca"},
    },
}
API_KEY = "0123456789abcdef0123456789abcdef"


def write(tmp_path, document, name="default.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(document, indent=4) if not isinstance(document, str) else document)
    return str(path)


def operators_file(**changes) -> dict:
    document = dict(
        INTEL_DEFAULT_JSON,
        hosts="0.0.0.0",
        HTTPS_PORT=9443,
        ApiKey=API_KEY,
        UserTokenHash=token_sha512("user"),
        AdminTokenHash=token_sha512("admin"),
        CachingFillMode="OFFLINE",
        LogLevel="debug",
        proxy="http://proxy.example:3128",
    )
    document.update(changes)
    return document


@pytest.fixture
def clean_environment(monkeypatch, tmp_path):
    """No DCAPD_* or INTEL_API_KEY from this machine; the cache in tmp_path."""
    for name in list(os.environ):
        if name.startswith("DCAPD_") or name == "INTEL_API_KEY":
            monkeypatch.delenv(name)
    monkeypatch.setenv("DCAPD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def dcapd_logging():
    """cli.main configures the "dcapd" logger: put it back after the test."""
    logger = logging.getLogger("dcapd")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def test_intels_default_json_gives_dcapds_defaults_on_intels_address(tmp_path):
    overrides, unknown = read_intel_config(write(tmp_path, INTEL_DEFAULT_JSON))
    assert unknown == []
    assert overrides == {
        "listen": "127.0.0.1:8081",
        "pcs_url": INTEL_PCS_URL,
        "api_key": "",
        "proxy": "",
        "refresh_schedule": "0 0 1 * * *",
        "user_token_sha512": "",
        "admin_token_sha512": "",
        "cache_mode": "LAZY",
        "verbose": "0",
        "log_level": "info",
    }
    config = load_config({"cache_dir": str(tmp_path)}, environ={}, base=overrides)
    assert config.listen == ("127.0.0.1", 8081)
    assert (config.pcs_url, config.cache_mode, config.api_key, config.verbose) == (
        INTEL_PCS_URL,
        "LAZY",
        "",
        False,
    )
    assert config.refresh_schedule == "0 0 1 * * *"
    assert config == load_config(
        {"cache_dir": str(tmp_path), "listen": "127.0.0.1:8081"}, environ={}
    )


def test_an_operators_file_gives_the_expected_config(tmp_path):
    document = operators_file(
        uri="https://sbx.api.trustedservices.intel.com/sgx/certification/v3/",
        RefreshSchedule="0 30 2 * * *",
    )
    overrides, unknown = read_intel_config(write(tmp_path, document))
    assert unknown == []
    config = load_config({"cache_dir": str(tmp_path)}, environ={}, base=overrides)
    assert config.listen == ("0.0.0.0", 9443)
    assert config.pcs_url == "https://sbx.api.trustedservices.intel.com/sgx/certification/v3/"
    assert config.api_key == API_KEY and API_KEY not in repr(config)
    assert config.proxy == "http://proxy.example:3128"
    assert config.user_token_sha512 == token_sha512("user")
    assert config.admin_token_sha512 == token_sha512("admin")
    assert (config.cache_mode, config.verbose, config.refresh_schedule) == (
        "OFFLINE",
        True,
        "0 30 2 * * *",
    )


@pytest.mark.parametrize(
    "hosts,port,listen",
    [
        ("::1", 8081, ("::1", 8081)),
        ("::", 443, ("::", 443)),
        ("[::1]", "9000", ("::1", 9000)),
        ("localhost", None, ("localhost", 8081)),
        (None, 1234, ("127.0.0.1", 1234)),
    ],
)
def test_hosts_and_port_become_listen(tmp_path, hosts, port, listen):
    document = {
        key: value for key, value in (("hosts", hosts), ("HTTPS_PORT", port)) if value is not None
    }
    overrides, _ = read_intel_config(write(tmp_path, document))
    assert load_config(environ={}, base=overrides).listen == listen


@pytest.mark.parametrize(
    "level,verbose",
    [
        ("error", False),
        ("warn", False),
        ("info", False),
        ("http", False),
        ("verbose", True),
        ("debug", True),
        ("silly", True),
        ("DEBUG", True),
    ],
)
def test_log_level(tmp_path, level, verbose):
    overrides, _ = read_intel_config(write(tmp_path, {"LogLevel": level}))
    assert load_config(environ={}, base=overrides).verbose is verbose


def test_the_ini_file_environment_and_command_line_override_intels_file(tmp_path):
    overrides, _ = read_intel_config(write(tmp_path, operators_file()))
    ini = tmp_path / "pccs.ini"
    ini.write_text("[cache]\nmode = REQ\n[server]\nlisten = 10.0.0.1:8443\n")
    config = load_config(environ={}, ini_path=str(ini), base=overrides)
    assert (config.cache_mode, config.listen, config.api_key) == (
        "REQ",
        ("10.0.0.1", 8443),
        API_KEY,
    )
    environ = {"DCAPD_CACHE_MODE": "lazy", "INTEL_API_KEY": "k" * 32}
    config = load_config(environ=environ, ini_path=str(ini), base=overrides)
    assert (config.cache_mode, config.api_key, config.verbose) == ("LAZY", "k" * 32, True)
    config = load_config(
        {"cache_mode": "offline", "verbose": "0"},
        environ=environ,
        ini_path=str(ini),
        base=overrides,
    )
    assert (config.cache_mode, config.verbose, config.listen) == (
        "OFFLINE",
        False,
        ("10.0.0.1", 8443),
    )


def test_unknown_keys_are_reported_once(tmp_path, caplog):
    document = dict(INTEL_DEFAULT_JSON, OPENSSL_FIPS_MODE=True, Foo=1, bar={"x": 1})
    path = write(tmp_path, document)
    overrides, unknown = read_intel_config(path)
    assert unknown == ["Foo", "bar", "OPENSSL_FIPS_MODE"]
    assert set(overrides) == {
        "listen",
        "pcs_url",
        "api_key",
        "proxy",
        "refresh_schedule",
        "user_token_sha512",
        "admin_token_sha512",
        "cache_mode",
        "verbose",
        "log_level",
    }
    with caplog.at_level(logging.INFO, logger="dcapd.intelconfig"):
        report_intel_config(path, overrides, unknown)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage().endswith("Foo, bar, OPENSSL_FIPS_MODE")
    assert path in warnings[0].getMessage()


def test_dcapd_starts_from_intels_file_and_reports_unknown_keys_once(
    tmp_path, monkeypatch, capsys, clean_environment, dcapd_logging
):
    started = []

    class NoServer:
        def __init__(self, app, config, **kwargs):
            started.append(config)

        def serve_forever(self):
            pass

    monkeypatch.setattr("dcapd.cli.Server", NoServer)
    path = write(tmp_path, dict(operators_file(CachingFillMode="REQ"), Foo=1, Bar=2))
    assert cli.main(["--intel-config", path, "--listen", "127.0.0.1:0"]) == 0
    (config,) = started
    assert (config.listen, config.cache_mode, config.api_key, config.verbose) == (
        ("127.0.0.1", 0),
        "REQ",
        API_KEY,
        True,
    )
    err = capsys.readouterr().err
    reported = [line for line in err.splitlines() if "Foo" in line]
    assert len(reported) == 1 and "WARNING" in reported[0] and "Foo, Bar" in reported[0]
    assert API_KEY not in err


@pytest.mark.parametrize(
    "changes,names",
    [
        ({"CachingFillMode": "EAGER"}, "CachingFillMode"),
        ({"HTTPS_PORT": 70000}, "hosts / HTTPS_PORT"),
        ({"HTTPS_PORT": "https"}, "HTTPS_PORT"),
        ({"uri": "https://api.trustedservices.intel.com/sgx/certification/v4"}, "uri"),
        ({"LogLevel": "loud"}, "LogLevel"),
        ({"AdminTokenHash": "not-a-hash"}, "AdminTokenHash"),
        ({"ApiKey": 12345}, "ApiKey"),
        ({"RefreshSchedule": "every day"}, "RefreshSchedule"),
        ({"MaxRequestBodySize": "2 lots"}, "MaxRequestBodySize"),
        ({"MaxRequestBodySize": "0MB"}, "MaxRequestBodySize"),
        ({"MaxRequestBodySize": True}, "MaxRequestBodySize"),
        ({"KeepAliveTimeoutSeconds": 0}, "KeepAliveTimeoutSeconds"),
        ({"KeepAliveTimeoutSeconds": "soon"}, "KeepAliveTimeoutSeconds"),
        ({"KeepAliveTimeoutSeconds": [60]}, "KeepAliveTimeoutSeconds"),
    ],
)
def test_a_value_dcapd_cannot_use_exits_2_before_serving(
    tmp_path, monkeypatch, capsys, clean_environment, changes, names
):
    def no_server(*args, **kwargs):
        raise AssertionError("dcapd must stop at config time")

    monkeypatch.setattr("dcapd.cli.Server", no_server)
    monkeypatch.setattr("dcapd.cli.build_services", no_server)
    path = write(tmp_path, dict(INTEL_DEFAULT_JSON, **changes))
    assert cli.main(["--intel-config", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dcapd: {names} in {path}: "), err


@pytest.mark.parametrize(
    "text,problem",
    [
        ('{\n  // Intel ships plain JSON\n  "HTTPS_PORT": 8081\n}\n', "is not valid JSON"),
        ('{"HTTPS_PORT": 8081,}', "is not valid JSON"),
        ('["HTTPS_PORT"]', "is not a JSON object"),
        (None, "cannot read"),
    ],
)
def test_a_file_that_does_not_parse_is_one_line_naming_it(
    tmp_path, capsys, clean_environment, text, problem
):
    path = write(tmp_path, text) if text is not None else str(tmp_path / "missing.json")
    with pytest.raises(ConfigError) as caught:
        read_intel_config(path)
    assert path in str(caught.value) and problem in str(caught.value)
    assert cli.main(["--intel-config", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and path in err[0] and problem in err[0]


def test_help_lists_the_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "--intel-config FILE" in capsys.readouterr().out


# What PCCS 1.27 added to config/default.json (pccs-1.27.md §2).
INTEL_127_KEYS = {
    "MaxRequestBodySize": "2MB",
    "HeadersTimeoutSeconds": 10,
    "RequestTimeoutSeconds": 15,
    "KeepAliveTimeoutSeconds": 60,
}


def test_intels_1_27_default_json_maps_body_size_and_keep_alive(tmp_path, caplog):
    path = write(tmp_path, dict(INTEL_DEFAULT_JSON, **INTEL_127_KEYS))
    overrides, unknown = read_intel_config(path)
    assert overrides["max_body_bytes"] == str(2 * 1024 * 1024)
    assert overrides["channel_timeout"] == "60"
    # No dcapd meaning: reported once, with the other unknown keys.
    assert unknown == ["HeadersTimeoutSeconds", "RequestTimeoutSeconds"]
    with caplog.at_level(logging.INFO, logger="dcapd.intelconfig"):
        report_intel_config(path, overrides, unknown)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].endswith("HeadersTimeoutSeconds, RequestTimeoutSeconds")
    config = load_config({"cache_dir": str(tmp_path)}, environ={}, base=overrides)
    assert (config.max_body_bytes, config.channel_timeout) == (2 * 1024 * 1024, 60)


@pytest.mark.parametrize(
    "size,expected",
    [
        ("2MB", 2 * 1024 * 1024),
        ("2mb", 2 * 1024 * 1024),
        ("100kb", 100 * 1024),
        ("1.5GB", 3 * 1024**3 // 2),
        ("512", 512),
        ("512b", 512),
        (" 10 MB ", 10 * 1024 * 1024),
        (4096, 4096),
    ],
)
def test_intel_size_strings(tmp_path, size, expected):
    overrides, _ = read_intel_config(write(tmp_path, {"MaxRequestBodySize": size}))
    assert overrides == {"max_body_bytes": str(expected)}


def test_keep_alive_seconds_may_be_a_string_or_a_fraction(tmp_path):
    assert read_intel_config(write(tmp_path, {"KeepAliveTimeoutSeconds": "45"}))[0] == {
        "channel_timeout": "45"
    }
    assert read_intel_config(write(tmp_path, {"KeepAliveTimeoutSeconds": 4.2}))[0] == {
        "channel_timeout": "5"
    }
