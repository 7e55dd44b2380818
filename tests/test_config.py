"""Configuration: precedence, the documented keys, and bad values stopping with status 2."""

from __future__ import annotations

import configparser
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dcapd import cli
from dcapd.config import (
    INTEL_PCS_URL,
    SETTINGS,
    Config,
    ConfigError,
    default_cache_dir,
    load_config,
    read_ini,
)

REPO = Path(__file__).resolve().parents[1]


def test_defaults():
    config = load_config(environ={})
    assert config.listen == ("localhost", 8081)
    assert config.tls == "auto"
    assert config.cache_mode == "LAZY"
    assert config.pcs_url == INTEL_PCS_URL
    assert (
        config.rootca_crl_url == "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
    )
    assert config.cache_dir == default_cache_dir()
    assert config.api_key == "" and config.user_token_sha512 == ""


def test_precedence_cli_over_env_over_ini(tmp_path):
    ini = tmp_path / "pccs.ini"
    ini.write_text("[cache]\nmode = REQ\ndir = /from/ini\n[server]\nlisten = 0.0.0.0:9000\n")
    environ = {"DCAPD_CACHE_MODE": "offline", "INTEL_API_KEY": "k" * 32}
    config = load_config(environ=environ, ini_path=str(ini))
    assert (config.cache_mode, config.cache_dir, config.listen) == (
        "OFFLINE",
        "/from/ini",
        ("0.0.0.0", 9000),
    )
    assert config.api_key == "k" * 32
    config = load_config({"cache_mode": "lazy"}, environ=environ, ini_path=str(ini))
    assert config.cache_mode == "LAZY"
    assert "k" * 32 not in repr(config), "secrets never appear in reprs or logs"


def test_ini_named_by_environment(tmp_path):
    ini = tmp_path / "x.ini"
    ini.write_text("[server]\ntls = off\n")
    assert load_config(environ={"DCAPD_CONFIG": str(ini)}).tls == "off"


@pytest.mark.parametrize(
    "env,value",
    [
        ("DCAPD_CACHE_MODE", "EAGER"),
        ("DCAPD_LISTEN", "localhost"),
        ("DCAPD_LISTEN", "h:99999"),
        ("DCAPD_PCS_URL", "https://api.trustedservices.intel.com/sgx/certification/"),
        ("DCAPD_PCS_URL", "https://api.trustedservices.intel.com/sgx/certification/v4"),
        ("DCAPD_TLS", "maybe"),
        ("DCAPD_VERBOSE", "loud"),
        ("DCAPD_ADMIN_TOKEN_SHA512", "abc"),
        ("DCAPD_URL_MAP", "https://a.example"),
        ("DCAPD_THREADS", "0"),
    ],
)
def test_bad_values_name_the_key(env, value):
    with pytest.raises(ConfigError) as caught:
        load_config(environ={env: value})
    assert env in str(caught.value)


def test_unknown_ini_key_is_refused(tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text("[server]\nlisten_port = 1\n")
    with pytest.raises(ConfigError, match="listen_port"):
        load_config(environ={}, ini_path=str(ini))


def test_cli_bad_value_exits_2_with_one_line(capsys, monkeypatch):
    monkeypatch.setenv("DCAPD_CACHE_MODE", "SOMETIMES")
    assert cli.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DCAPD_CACHE_MODE" in err


@pytest.mark.parametrize("name", ["DCAPD_USER_TOKEN_SHA512", "DCAPD_ADMIN_TOKEN_SHA512"])
@pytest.mark.parametrize("value", ["abc", "g" * 128, "a" * 127, "a" * 129])
def test_a_token_hash_that_is_not_128_hex_exits_2_naming_the_key(capsys, monkeypatch, name, value):
    """Intel 1.27 only warns and then refuses every request (401); here it stops the start."""
    monkeypatch.setenv(name, value)
    assert cli.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and "128 hex" in err


def test_not_found_ttl_is_a_non_negative_number():
    assert load_config(environ={}).not_found_ttl == 300.0
    assert load_config(environ={"DCAPD_NOT_FOUND_TTL": "0"}).not_found_ttl == 0.0
    for bad in ("-1", "soon", "inf", "nan"):
        with pytest.raises(ConfigError, match="DCAPD_NOT_FOUND_TTL"):
            load_config(environ={"DCAPD_NOT_FOUND_TTL": bad})


def test_example_ini_documents_every_key_and_parses(tmp_path):
    text = (REPO / "pccs.ini.example").read_text()
    parser = configparser.ConfigParser()
    # Uncomment every ";key = value" line: the example must then be a valid config.
    uncommented = "\n".join(
        line[1:] if re.match(r";[a-z_0-9]+ =", line) else line for line in text.splitlines()
    )
    parser.read_string(uncommented)
    for setting in SETTINGS:
        assert parser.has_option(setting.section, setting.key), setting.key
        assert setting.env in text
    path = tmp_path / "example.ini"
    path.write_text(uncommented)
    assert set(read_ini(str(path))) == {s.name for s in SETTINGS}


def test_help_lists_every_option_and_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "dcapd", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for setting in SETTINGS:
        assert "--" + setting.name.replace("_", "-") in result.stdout
        assert setting.env in result.stdout
    assert "--config" in result.stdout


def test_readme_documents_every_environment_variable():
    readme = (REPO / "README.rst").read_text()
    for setting in SETTINGS:
        assert setting.env in readme, setting.env


def test_config_has_one_field_per_setting_and_no_second_copy_of_the_defaults():
    fields = dataclasses.fields(Config)
    assert sorted(f.name for f in fields) == sorted(s.name for s in SETTINGS)
    assert all(f.default is dataclasses.MISSING for f in fields)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("", ""),
        ("all", ""),
        ("ALL", ""),
        ("auto", "auto"),
        (" Auto ", "auto"),
        ("0", "0"),
        ("0,1", "0,1"),
    ],
)
def test_cpu_affinity_values(value, parsed):
    assert load_config(environ={"DCAPD_CPU_AFFINITY": value}).cpu_affinity == parsed


@pytest.mark.parametrize("value", ["any", "0-1", "0,", "one", "-1"])
def test_cpu_affinity_refuses_anything_else(value):
    with pytest.raises(ConfigError, match="DCAPD_CPU_AFFINITY|cpu_affinity"):
        load_config(environ={"DCAPD_CPU_AFFINITY": value})


def test_cpu_affinity_defaults_to_one_cpu_chosen_automatically():
    assert load_config(environ={}).cpu_affinity == "auto"


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="Linux only")
def test_auto_pins_to_one_allowed_cpu():
    import os

    code = (
        "import os; from dcapd.cli import pin_to_cpus; pin_to_cpus('auto');"
        "print(len(os.sched_getaffinity(0)), min(os.sched_getaffinity(0)), os.getpid())"
    )
    before = sorted(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    # One CPU, chosen by process ID so that several processes spread over the CPUs.
    assert out[:2] == ["1", str(before[int(out[2]) % len(before)])]
