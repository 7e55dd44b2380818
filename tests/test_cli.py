"""The dcapd command refuses unusable settings with exit 2 and one line naming the setting
(never a traceback), and says at start what it will do."""

from __future__ import annotations

import logging
import os
import socket
import subprocess

import pytest

from dcapd import cli
from dcapd.supervisor import unsupported_reason


@pytest.fixture
def no_server(monkeypatch):
    """cli.main up to serving; the "dcapd" logger it configures is put back afterwards."""
    logger = logging.getLogger("dcapd")
    saved = logger.handlers[:], logger.level, logger.propagate
    for name in [n for n in os.environ if n.startswith("DCAPD_") or n == "INTEL_API_KEY"]:
        monkeypatch.delenv(name)
    started = []

    class NoServer:
        def __init__(self, app, config, **kwargs):
            started.append(config)

        def serve_forever(self):
            pass

    monkeypatch.setattr("dcapd.cli.Server", NoServer)
    monkeypatch.setattr("dcapd.cli.scheduler_for", lambda services: _NoScheduler())
    yield started
    logger.handlers[:], logger.level, logger.propagate = saved


class _NoScheduler:
    def start(self):
        pass

    def stop(self, timeout=None):
        pass


def _pem_pair(tmp_path, name):
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost", "-days", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def _refused(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_each_unusable_setting_is_exit_2_and_one_line(tmp_path, capsys, no_server, monkeypatch):
    base = ["--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path / "cache")]
    line = _refused(capsys, base + ["--threads", "eight"])
    assert line == "dcapd: [server] threads / DCAPD_THREADS: expected a whole number, got 'eight'"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = _refused(capsys, base[:2] + ["--cache-dir", str(blocker / "cache")])
    assert line.startswith("dcapd: [cache] dir / DCAPD_CACHE_DIR: cannot use ")
    missing = str(tmp_path / "missing.crt")
    line = _refused(capsys, base + ["--cert-file", missing, "--key-file", missing])
    assert line == (
        f"dcapd: [server] cert_file / DCAPD_CERT_FILE: cannot read {missing}: "
        "No such file or directory"
    )
    cert, _ = _pem_pair(tmp_path, "one")
    _, other_key = _pem_pair(tmp_path, "two")
    line = _refused(capsys, base + ["--cert-file", str(cert), "--key-file", str(other_key)])
    assert line.startswith("dcapd: [server] cert_file / key_file: ") and "MISMATCH" in line
    line = _refused(capsys, base + ["--config", str(tmp_path / "missing.ini")])
    assert line.startswith("dcapd: --config: cannot read ")
    line = _refused(capsys, base + ["--cache-url", "postgresql://dcapd:pw@db.example/dcapd"])
    assert line.startswith(
        "dcapd: [cache] dir / DCAPD_CACHE_DIR and [cache] url / DCAPD_CACHE_URL: both are set"
    )
    assert "pw@" not in line
    assert no_server == []


def test_event_loop_uvloop_where_it_is_not_installed_is_exit_2(
    tmp_path, capsys, no_server, monkeypatch
):
    monkeypatch.setattr("dcapd.eventloop.uvloop", None)
    base = ["--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path / "cache")]
    line = _refused(capsys, base + ["--event-loop", "uvloop"])
    assert line == "dcapd: [server] event_loop / DCAPD_EVENT_LOOP: uvloop is not installed"
    line = _refused(capsys, base + ["--event-loop", "trio"])
    assert line.startswith("dcapd: [server] event_loop / DCAPD_EVENT_LOOP: must be one of ")
    assert cli.main(base + ["--event-loop", "asyncio"]) == 0
    assert [config.event_loop for config in no_server] == ["asyncio"]


def test_a_usable_certificate_pair_is_served(tmp_path, capsys, no_server, monkeypatch):
    cert, key = _pem_pair(tmp_path, "one")
    argv = ["--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(argv + ["--cert-file", str(cert), "--key-file", str(key)]) == 0
    assert len(no_server) == 1


def test_a_misspelt_variable_is_warned_about_with_the_closest_name(
    tmp_path, monkeypatch, no_server, capsys
):
    monkeypatch.setenv("DCAPD_CACHE_MDOE", "OFFLINE")
    assert cli.main(["--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "DCAPD_CACHE_MDOE" in line]
    assert " WARNING dcapd " in line and line.endswith(
        "environment variable DCAPD_CACHE_MDOE is not a dcapd setting and is ignored; "
        "did you mean DCAPD_CACHE_MODE?"
    )
    assert "roles: user token not set (refused), admin token not set (refused)" in err


def test_offline_says_nothing_about_the_api_key(tmp_path, no_server, capsys):
    argv = ["--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path)]
    assert cli.main(argv + ["--cache-mode", "OFFLINE"]) == 0
    assert "API key" not in capsys.readouterr().err
    assert cli.main(argv + ["--cache-mode", "LAZY"]) == 0
    assert "no Intel API key configured" in capsys.readouterr().err


def test_dcapd_intel_config_variable_and_intels_certificate_files_are_used(
    tmp_path, monkeypatch, no_server
):
    """As installed by Intel: <dir>/config/default.json and <dir>/ssl_key/{file.crt,
    private.pem}; the variable works for the dcapd command as for the WSGI entry point."""
    install = tmp_path / "sgx-dcap-pccs"
    (install / "config").mkdir(parents=True)
    (install / "ssl_key").mkdir()
    cert, key = _pem_pair(tmp_path, "intel")
    cert.rename(install / "ssl_key" / "file.crt")
    key.rename(install / "ssl_key" / "private.pem")
    default_json = install / "config" / "default.json"
    default_json.write_text('{"HTTPS_PORT": 8081, "hosts": "127.0.0.1", "CachingFillMode": "REQ"}')
    monkeypatch.setenv("DCAPD_INTEL_CONFIG", str(default_json))
    assert cli.main(["--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path / "cache")]) == 0
    (config,) = no_server
    assert config.cache_mode == "REQ"
    assert config.cert_file == str(install / "ssl_key" / "file.crt")
    assert config.key_file == str(install / "ssl_key" / "private.pem")


def test_without_intels_certificate_files_a_certificate_is_generated(
    tmp_path, monkeypatch, no_server
):
    default_json = tmp_path / "config" / "default.json"
    default_json.parent.mkdir()
    default_json.write_text('{"CachingFillMode": "OFFLINE"}')
    argv = ["--intel-config", str(default_json), "--listen", "127.0.0.1:0"]
    assert cli.main(argv + ["--cache-dir", str(tmp_path / "cache")]) == 0
    (config,) = no_server
    assert (config.cache_mode, config.cert_file, config.key_file) == ("OFFLINE", "", "")


def test_workers_where_unsupported_serve_in_one_process_and_say_so(
    tmp_path, monkeypatch, no_server, capsys
):
    argv = ["--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path), "--workers", "3"]
    assert _refused(capsys, argv[:-1] + ["0"]) == (
        "dcapd: [server] workers / DCAPD_WORKERS: must be > 0, got '0'"
    )
    monkeypatch.setattr("dcapd.cli.unsupported_reason", lambda: "Windows has no SO_REUSEPORT")
    assert cli.main(argv) == 0
    assert [config.workers for config in no_server] == [1]
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "workers =" in line]
    assert line.endswith("workers = 3: Windows has no SO_REUSEPORT; serving with one process")


@pytest.mark.skipif(unsupported_reason() is not None, reason="worker processes need Linux")
def test_workers_on_a_port_another_program_serves_on_is_exit_1_and_one_line(
    tmp_path, no_server, capsys
):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--listen", f"127.0.0.1:{port}", "--cache-dir", str(tmp_path), "--workers", "2"]
        assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"dcapd: cannot serve on 127.0.0.1:{port}: ")
    assert "Address already in use" in err[-1] and "Traceback" not in "".join(err)
    assert "supervisor:" not in "".join(err) and no_server == []
