"""Intel PCCS's ``config/default.json`` as dcapd settings (pccs-reference.md §6).

An operator replacing Intel's PCCS can start dcapd with the file they already have::

    dcapd --intel-config /opt/intel/sgx-dcap-pccs/config/default.json

Its values are the lowest layer of dcapd's configuration: the ini file, the environment and
the command line override them. The mapping:

==================  ==========================================================================
Intel key           dcapd setting
==================  ==========================================================================
``hosts``,          ``listen`` = ``hosts:HTTPS_PORT`` (an IPv6 host in brackets); the one not
``HTTPS_PORT``      given takes Intel's default (``127.0.0.1``, ``8081``)
``uri``             ``pcs_url``
``ApiKey``          ``api_key``
``proxy``           ``proxy``
``UserTokenHash``   ``user_token_sha512``
``AdminTokenHash``  ``admin_token_sha512``
``CachingFillMode`` ``cache_mode``
``LogLevel``        ``verbose`` (on for ``verbose``, ``debug`` and ``silly``)
``RefreshSchedule`` ``refresh_schedule`` (passed on as is)
``MaxRequest        ``max_body_bytes`` (1.27; Intel's size strings such as ``"2MB"``: units
BodySize``          b, kb, mb, gb, tb, pb of 1024, case-insensitive; a bare number is bytes)
``KeepAlive         ``channel_timeout`` (1.27; seconds)
TimeoutSeconds``
==================  ==========================================================================

Intel's database keys (``DB_CONFIG``, ``sqlite``, ``mysql``, ``init_db``) are accepted and
ignored: dcapd's cache replaces the database (``python -m dcapd.migrate`` imports it).
``OPENSSL_FIPS_MODE: false`` is ignored too; ``true`` cannot be honoured and is reported with
the unknown keys. 1.27's ``HeadersTimeoutSeconds`` and ``RequestTimeoutSeconds`` have no
dcapd meaning (dcapd's TLS front and waitress bound slow clients their own way) and are
reported with the unknown keys. node-config reads plain JSON, and so does this module: a
file that does not parse stops dcapd with one line naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .config import SETTINGS, ConfigError

log = logging.getLogger("dcapd.intelconfig")

INTEL_DEFAULT_HOSTS = "127.0.0.1"
INTEL_DEFAULT_PORT = 8081

# Intel keys that carry one value straight onto a dcapd setting, by the setting's name.
_DIRECT = {
    "uri": "pcs_url",
    "ApiKey": "api_key",
    "proxy": "proxy",
    "UserTokenHash": "user_token_sha512",
    "AdminTokenHash": "admin_token_sha512",
    "CachingFillMode": "cache_mode",
    "RefreshSchedule": "refresh_schedule",
}
# winston/npm levels; the ones below "info" turn dcapd's debug logging on.
_LOG_LEVELS = {
    "error": "0",
    "warn": "0",
    "info": "0",
    "http": "0",
    "verbose": "1",
    "debug": "1",
    "silly": "1",
}
_DCAPD_LEVELS = {
    "error": "error",
    "warn": "warning",
    "info": "info",
    "http": "info",
    "verbose": "debug",
    "debug": "debug",
    "silly": "debug",
}
# Keys Intel's PCCS reads that have no meaning for dcapd: accepted without a word.
IGNORED_KEYS = ("DB_CONFIG", "sqlite", "mysql", "init_db", "OPENSSL_FIPS_MODE")
KNOWN_KEYS = frozenset(_DIRECT) | {"hosts", "HTTPS_PORT", "LogLevel"} | set(IGNORED_KEYS)

_SETTINGS = {setting.name: setting for setting in SETTINGS}
KNOWN_KEYS |= {"MaxRequestBodySize", "KeepAliveTimeoutSeconds"}

# Node's ``bytes`` format, which Intel's body-parser limit reads: "2MB", "100kb", "1.5gb".
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|pb)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40, "pb": 1 << 50}


def parse_size(value) -> int:
    """Bytes in an Intel size value ("2MB", or a number of bytes); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f'expected a size such as "2MB", got {json.dumps(value)}')
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f'expected a size such as "2MB", got {json.dumps(value)}')
    number = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()]
    if not math.isfinite(number):
        raise ValueError(f"size {value!r} is too large")
    return int(number)


def read_intel_config(path: str) -> tuple[dict[str, str], list[str]]:
    """Read Intel's ``default.json``: ``(overrides by dcapd setting name, unknown keys)``.

    Every value is checked with the dcapd setting's own parser, so a value dcapd cannot use
    raises :class:`ConfigError` naming the Intel key and the file. ``unknown_keys`` (in file
    order) are the keys whose values dcapd does not apply; the caller reports them once
    (:func:`report_intel_config`).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError("--intel-config", f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("--intel-config", f"{path} is not UTF-8 text") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ConfigError("--intel-config", f"{path} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError("--intel-config", f"{path} is not a JSON object")

    overrides: dict[str, str] = {}
    for key, name in _DIRECT.items():
        value = document.get(key)
        if value is not None:
            overrides[name] = _checked(path, key, name, _string(path, key, value))
    listen = _listen(path, document)
    if listen is not None:
        overrides["listen"] = listen
    level = document.get("LogLevel")
    if level is not None:
        level = _string(path, "LogLevel", level).strip().lower()
        if level not in _LOG_LEVELS:
            raise ConfigError(
                f"LogLevel in {path}", f"must be one of {', '.join(_LOG_LEVELS)}, got {level!r}"
            )
        overrides["verbose"] = _LOG_LEVELS[level]
        overrides["log_level"] = _DCAPD_LEVELS[level]

    size = document.get("MaxRequestBodySize")
    if size is not None:
        try:
            number = str(parse_size(size))
        except ValueError as exc:
            raise ConfigError(f"MaxRequestBodySize in {path}", str(exc)) from None
        overrides["max_body_bytes"] = _checked(path, "MaxRequestBodySize", "max_body_bytes", number)
    keep_alive = document.get("KeepAliveTimeoutSeconds")
    if keep_alive is not None:
        if (
            isinstance(keep_alive, bool)
            or not isinstance(keep_alive, (int, float, str))
            or (isinstance(keep_alive, float) and not math.isfinite(keep_alive))
        ):
            raise ConfigError(
                f"KeepAliveTimeoutSeconds in {path}",
                f"must be a number of seconds, got {json.dumps(keep_alive)}",
            )
        if isinstance(keep_alive, float):
            keep_alive = math.ceil(keep_alive)  # waitress counts whole seconds
        overrides["channel_timeout"] = _checked(
            path, "KeepAliveTimeoutSeconds", "channel_timeout", str(keep_alive).strip()
        )

    unknown = [key for key in document if key not in KNOWN_KEYS]
    if document.get("OPENSSL_FIPS_MODE") not in (None, False):
        unknown.append("OPENSSL_FIPS_MODE")  # dcapd has no FIPS switch: say so
    return overrides, unknown


def report_intel_config(
    path: str, overrides: Mapping[str, str], unknown_keys: Sequence[str]
) -> None:
    """Log, once per start, what dcapd took from Intel's file and what it did not use."""
    log.info(
        "settings taken from Intel PCCS config %s: %s", path, ", ".join(sorted(overrides)) or "none"
    )
    if unknown_keys:
        log.warning(
            "Intel PCCS config %s: not used by dcapd (unknown or unsupported): %s",
            path,
            ", ".join(unknown_keys),
        )
    unused = sorted(name for name in overrides if name not in _SETTINGS)
    if unused:
        log.warning(
            "Intel PCCS config %s: %s has no dcapd setting yet and is not applied",
            path,
            ", ".join(unused),
        )


def _string(path: str, key: str, value) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} in {path}", f"must be a string, got {json.dumps(value)}")
    return value


def _checked(path: str, key: str, name: str, value: str) -> str:
    """``value`` if the dcapd setting ``name`` accepts it (settings dcapd lacks pass as is)."""
    setting = _SETTINGS.get(name)
    if setting is not None:
        try:
            setting.parse(value)
        except ValueError as exc:
            raise ConfigError(f"{key} in {path}", str(exc)) from None
    return value


def _listen(path: str, document: dict):
    """``hosts`` and ``HTTPS_PORT`` as one ``listen`` value; None when neither is given."""
    hosts, port = document.get("hosts"), document.get("HTTPS_PORT")
    if hosts is None and port is None:
        return None
    host = INTEL_DEFAULT_HOSTS if hosts is None else _string(path, "hosts", hosts).strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if port is None:
        port = INTEL_DEFAULT_PORT
    if isinstance(port, str) and port.strip().isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int):
        raise ConfigError(f"HTTPS_PORT in {path}", f"must be a port number, got {json.dumps(port)}")
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return _checked(path, "hosts / HTTPS_PORT", "listen", listen)


def intel_tls_files(path: str) -> dict[str, str]:
    """Intel's PCCS serves ``ssl_key/file.crt`` and ``ssl_key/private.pem`` from its install
    directory, the parent of ``config/``: dcapd serves them too when both are there (as
    settings below the ini file, the environment and the options)."""
    folder = Path(path).resolve().parent.parent / "ssl_key"
    cert, key = folder / "file.crt", folder / "private.pem"
    if cert.is_file() and key.is_file():
        return {"cert_file": str(cert), "key_file": str(key)}
    return {}
