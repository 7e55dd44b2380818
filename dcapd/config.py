"""dcapd configuration: one table of settings, read from an ini file and the environment.

Precedence: command-line option > environment variable > ini file > default. The table
``SETTINGS`` is the only place a setting is declared; the CLI, ``pccs.ini.example`` and the
README are checked against it by the tests. No I/O here beyond reading the ini file.
"""

from __future__ import annotations

import configparser
import difflib
import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .cron import CronSchedule
from .pcsurls import INTEL_PCS_URL, INTEL_ROOTCA_CRL_URL, canonical_origin

CACHE_MODES = ("LAZY", "REQ", "OFFLINE")
TLS_MODES = ("auto", "off")
EVENT_LOOPS = ("auto", "asyncio", "uvloop")


class ConfigError(ValueError):
    """A setting that cannot be used; ``str()`` is the one line the CLI prints."""

    def __init__(self, key: str, problem: str, setting: str = ""):
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem
        self.setting = setting  # the Setting.name refused, when it is one setting


def default_cache_dir() -> str:
    """The service's cache directory when systemd made one (``CacheDirectory=`` sets
    ``CACHE_DIRECTORY``), else the per-user cache folder (``~/.cache/dcapd``;
    ``%LOCALAPPDATA%\\dcapd\\Cache``)."""
    if os.environ.get("CACHE_DIRECTORY"):
        return os.environ["CACHE_DIRECTORY"].split(":")[0]
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return str(Path(base) / "dcapd" / "Cache")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "dcapd")


# --- value parsers: each takes the raw string and returns the typed value or raises ValueError


def _listen(value: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if not match:
        raise ValueError(f"expected host:port or [ipv6]:port, got {value!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if match.group(1):
        ipaddress.IPv6Address(host)
    if not host:
        raise ValueError(f"no host in {value!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


def _choice(*choices: str, upper: bool = False) -> Callable[[str], str]:
    def parse(value: str) -> str:
        value = value.strip().upper() if upper else value.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def _pcs_url(value: str) -> str:
    value = value.strip()
    if not re.match(r"^https?://[^/]+/", value):
        raise ValueError(f"not an http(s) URL: {value!r}")
    if not re.search(r"/sgx/certification/v[34]/$", value):
        raise ValueError("must contain /sgx/certification/v3/ or /v4/ and end with '/'")
    return value


def _url(value: str) -> str:
    value = value.strip()
    if value and not re.match(r"^https?://[^/]+", value):
        raise ValueError(f"not an http(s) URL: {value!r}")
    return value


def _url_map(value: str) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in value.split(","))):
        original, sep, replacement = pair.partition("=")
        if (
            not sep
            or not re.match(r"^https?://[^/]+$", original.strip().rstrip("/"))
            or not re.match(r"^https?://[^/]+", replacement.strip())
        ):
            raise ValueError(f"expected ORIGIN=REPLACEMENT URL pairs, got {pair!r}")
        mapping[canonical_origin(original.strip().rstrip("/"))] = replacement.strip().rstrip("/")
    return mapping


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 1/true/yes or 0/false/no, got {value!r}")


def _sha512_hex(value: str) -> str:
    value = value.strip().lower()
    if value and not re.fullmatch(r"[0-9a-f]{128}", value):
        raise ValueError("expected 128 hex characters (sha512sum of the token) or empty")
    return value


def _number(kind: type, value: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"expected {what}, got {value!r}") from None


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        number = _number(kind, value)
        if number <= 0:
            raise ValueError(f"must be > 0, got {value!r}")
        return number

    return parse


def _non_negative_int(value: str) -> int:
    number: int = _number(int, value)
    if number < 0:
        raise ValueError(f"must be >= 0, got {value!r}")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"must be a number >= 0, got {value!r}")
    return number


def _cron(value: str) -> str:
    CronSchedule(value)  # raises ValueError with the problem
    return value.strip()


def _cpu_list(value: str) -> str:
    value = value.strip().lower()
    if value in ("auto", "all", ""):
        return "" if value == "all" else value
    if not re.fullmatch(r"\d+(,\d+)*", value):
        raise ValueError(f"expected auto, all or CPU numbers like 0 or 0,1, got {value!r}")
    return value


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Comma-separated addresses or CIDR networks (10.0.0.5, 10.1.0.0/16, ::1)."""
    try:
        return tuple(
            ipaddress.ip_network(item, strict=False)
            for item in filter(None, (part.strip() for part in value.split(",")))
        )
    except ValueError as exc:
        raise ValueError(f"expected comma-separated IP addresses or networks: {exc}") from None


def _size(value: str) -> int:
    """Bytes, or with a K/M/G suffix (binary: 16M = 16 MiB)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B?)?\s*", value, re.I)
    if not match:
        raise ValueError(f"expected a size like 16777216 or 16M, got {value!r}")
    number: int = int(match.group(1)) * 1024 ** " KMG".index((match.group(2) or " ")[0].upper())
    if number <= 0:
        raise ValueError(f"must be > 0, got {value!r}")
    return number


def _database_url(value: str) -> str:
    value = value.strip()
    if value and not re.match(r"^postgres(ql)?://[^?#]*/[^/?#]+([?#]|$)", value):
        raise ValueError(
            "expected postgresql://user@host:port/dbname (with ?sslmode=... if needed), "
            "got a URL of another form"  # never echo it: it may hold a password
        )
    return value


def _text(value: str) -> str:
    return value.strip()


@dataclass(frozen=True)
class Setting:
    """One configuration key: where it lives in the ini file and the environment."""

    name: str  # attribute of Config
    section: str
    key: str
    env: str
    default: str
    parse: Callable[[str], object]
    help: str
    secret: bool = False


# fmt: off
SETTINGS: tuple[Setting, ...] = (
    Setting("listen", "server", "listen", "DCAPD_LISTEN", "localhost:8081", _listen,
            "address to serve on, host:port ([::1]:8081 for IPv6)"),
    Setting("tls", "server", "tls", "DCAPD_TLS", "auto", _choice(*TLS_MODES),
            "auto = HTTPS (given or generated certificate), off = plain HTTP"),
    Setting("cert_file", "server", "cert_file", "DCAPD_CERT_FILE", "", _text,
            "PEM certificate (chain) for HTTPS; empty = generate one at start"),
    Setting("key_file", "server", "key_file", "DCAPD_KEY_FILE", "", _text,
            "PEM private key for cert_file"),
    Setting("threads", "server", "threads", "DCAPD_THREADS", "8", _positive(int),
            "threads for requests that wait (a LAZY miss, a write): the front's pool, and "
            "waitress's for requests with a body"),
    Setting("connection_limit", "server", "connection_limit", "DCAPD_CONNECTION_LIMIT", "200",
            _positive(int), "most client connections served at once"),
    Setting("channel_timeout", "server", "channel_timeout", "DCAPD_CHANNEL_TIMEOUT", "30",
            _positive(int), "seconds an idle client connection is kept open"),
    Setting("tls_handshake_timeout", "server", "tls_handshake_timeout",
            "DCAPD_TLS_HANDSHAKE_TIMEOUT", "10", _positive(float),
            "seconds a client has to finish the TLS handshake"),
    Setting("cpu_affinity", "server", "cpu_affinity", "DCAPD_CPU_AFFINITY", "auto",
            _cpu_list,
            "Linux: CPUs to run on: auto = one CPU of those allowed (keeps the GIL from being "
            "handed between CPUs: several times less CPU per request), all (or empty) = any, "
            "or CPU numbers like 0 or 0,1"),
    Setting("event_loop", "server", "event_loop", "DCAPD_EVENT_LOOP", "auto",
            _choice(*EVENT_LOOPS),
            "the front's event loop: auto = uvloop where installed (it is, with dcapd, "
            "but on Windows: about 0.1 ms less CPU per new TLS connection), else asyncio's own"),
    Setting("workers", "server", "workers", "DCAPD_WORKERS", "1", _positive(int),
            "Linux: processes serving the one port and cache, each on its own CPU, supervised "
            "by the dcapd process (restarted if one dies); elsewhere always 1"),
    Setting("max_body_bytes", "server", "max_body_bytes", "DCAPD_MAX_BODY_BYTES",
            str(512 * 1024 * 1024), _positive(int),
            "largest request body accepted (a 10,000-platform collateral upload fits)"),
    Setting("max_small_body_bytes", "server", "max_small_body_bytes",
            "DCAPD_MAX_SMALL_BODY_BYTES", str(1024 * 1024), _positive(int),
            "largest body accepted without a valid admin token (e.g. POST /platforms)"),
    Setting("head_timeout", "server", "head_timeout", "DCAPD_HEAD_TIMEOUT", "10",
            _positive(float), "seconds from accept (or from a keep-alive request's first byte) "
                              "to the end of the request head (Intel: 10)"),
    Setting("request_timeout", "server", "request_timeout", "DCAPD_REQUEST_TIMEOUT", "15",
            _positive(float), "seconds for a whole request, body included, from the same start "
                              "(Intel: 15; an admin upload gets 1 s more per MiB)"),
    Setting("idle_timeout", "server", "idle_timeout", "DCAPD_IDLE_TIMEOUT", "5",
            _positive(float), "seconds a keep-alive connection may wait for its next request"),
    Setting("trusted_proxies", "server", "trusted_proxies", "DCAPD_TRUSTED_PROXIES", "",
            _networks, "reverse proxies (addresses or networks, comma-separated) whose "
            "X-Forwarded-For names the client in the log; empty = log the peer address"),
    Setting("grace_period", "server", "grace_period", "DCAPD_GRACE_PERIOD", "10",
            _positive(float), "seconds requests in flight at a stop (SIGTERM, Ctrl-C, service "
                              "stop) may take to finish; later ones are cut"),
    Setting("pcs_url", "upstream", "pcs_url", "DCAPD_PCS_URL", INTEL_PCS_URL, _pcs_url,
            "Intel PCS base URL (or another PCCS); the API version is taken from each request"),
    Setting("api_key", "upstream", "api_key", "INTEL_API_KEY", "", _text,
            "Intel PCS subscription key (only pckcerts needs it)", secret=True),
    Setting("rootca_crl_url", "upstream", "rootca_crl_url", "DCAPD_ROOTCA_CRL_URL",
            INTEL_ROOTCA_CRL_URL, _url, "where the Intel SGX Root CA CRL is downloaded"),
    Setting("trusted_roots", "upstream", "trusted_roots", "DCAPD_TRUSTED_ROOTS", "", _text,
            "PEM file of the root CA(s) collateral must chain to; empty = Intel's SGX Root CA"),
    Setting("proxy", "upstream", "proxy", "DCAPD_PROXY", "", _url,
            "HTTP(S) proxy for upstream calls; empty = HTTPS_PROXY etc. from the environment"),
    Setting("url_map", "upstream", "url_map", "DCAPD_URL_MAP", "", _url_map,
            "ORIGIN=MIRROR pairs, comma-separated: fetch allow-listed Intel URLs from a mirror"),
    Setting("upstream_timeout", "upstream", "timeout", "DCAPD_UPSTREAM_TIMEOUT", "20",
            _positive(float),
            "overall deadline in seconds for one upstream fetch, retries included"),
    Setting("upstream_retries", "upstream", "retries", "DCAPD_UPSTREAM_RETRIES", "3",
            _non_negative_int, "retries after a network error, 5xx or 429 from upstream"),
    Setting("upstream_max_body_bytes", "upstream", "max_body_bytes",
            "DCAPD_UPSTREAM_MAX_BODY_BYTES", "16M", _size,
            "largest upstream answer accepted, after decompression (K/M/G suffixes); "
            "a larger one is refused with 502 and not cached"),
    Setting("cache_dir", "cache", "dir", "DCAPD_CACHE_DIR", "", _text,
            "cache directory; empty = the per-user cache folder"),
    Setting("cache_url", "cache", "url", "DCAPD_CACHE_URL", "", _database_url,
            "PostgreSQL cache shared by several nodes, postgresql://user@host:port/db"
            "?sslmode=verify-full; empty = the cache directory (set dir or url, not both)",
            secret=True),
    Setting("cache_pool_size", "cache", "pool_size", "DCAPD_CACHE_POOL_SIZE", "10",
            _positive(int), "PostgreSQL cache: most database connections of this process"),
    Setting("cache_timeout", "cache", "timeout", "DCAPD_CACHE_TIMEOUT", "3", _positive(float),
            "PostgreSQL cache: seconds to connect or run one statement before answering 503"),
    Setting("cache_mode", "cache", "mode", "DCAPD_CACHE_MODE", "LAZY",
            _choice(*CACHE_MODES, upper=True), "LAZY, REQ or OFFLINE (as Intel's CachingFillMode)"),
    Setting("not_found_ttl", "cache", "not_found_ttl", "DCAPD_NOT_FOUND_TTL", "300",
            _non_negative_float, "seconds a PCS 404 on a cache miss is remembered, so the "
            "same miss does not ask PCS again (0 = off; never a 5xx, never for a refresh)"),
    Setting("selected_per_platform", "cache", "selected_per_platform",
            "DCAPD_SELECTED_PER_PLATFORM", "256", _positive(int),
            "answers selected locally for raw TCBs kept per platform (oldest dropped; "
            "selected again when asked)"),
    Setting("refresh_schedule", "refresh", "schedule", "DCAPD_REFRESH_SCHEDULE", "0 0 1 * * *",
            _cron, "cron schedule of the collateral refresh (Intel's RefreshSchedule; "
                   "local time, seconds first)"),
    Setting("refresh_margin_hours", "refresh", "early_margin_hours",
            "DCAPD_REFRESH_MARGIN_HOURS", "24", _positive(float),
            "refresh early when a cached entry's nextUpdate is this close"),
    Setting("user_token_sha512", "auth", "user_token_sha512", "DCAPD_USER_TOKEN_SHA512", "",
            _sha512_hex, "SHA-512 hex of the user token; empty = refuse user requests",
            secret=True),
    Setting("admin_token_sha512", "auth", "admin_token_sha512", "DCAPD_ADMIN_TOKEN_SHA512", "",
            _sha512_hex, "SHA-512 hex of the admin token; empty = refuse admin requests",
            secret=True),
    Setting("verbose", "log", "verbose", "DCAPD_VERBOSE", "", _bool,
            "debug logging, with the upstream details"),
    Setting("log_level", "log", "level", "DCAPD_LOG_LEVEL", "info",
            _choice("debug", "info", "warning", "error"), "debug, info, warning or error"),
    Setting("log_format", "log", "format", "DCAPD_LOG_FORMAT", "text", _choice("text", "json"),
            "text (one line per event) or json (one JSON object per line)"),
    Setting("metrics_enabled", "metrics", "enabled", "DCAPD_METRICS_ENABLED", "true", _bool,
            "serve Prometheus metrics on GET /metrics (no auth: expose it inside the cluster "
            "only)"),
)
# fmt: on

DEFAULTS: dict[str, str] = {s.name: s.default for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    """The parsed settings; built by :func:`load_config`, never mutated. One field per
    setting, without defaults: the defaults live in SETTINGS only."""

    listen: tuple[str, int]
    tls: str
    cert_file: str
    key_file: str
    threads: int
    connection_limit: int
    channel_timeout: int
    tls_handshake_timeout: float
    pcs_url: str
    api_key: str
    rootca_crl_url: str
    trusted_roots: str
    proxy: str
    url_map: dict[str, str] = field(hash=False)
    max_body_bytes: int
    cpu_affinity: str
    event_loop: str
    workers: int
    upstream_timeout: float
    upstream_retries: int
    cache_dir: str
    cache_url: str
    cache_pool_size: int
    cache_timeout: float
    cache_mode: str
    not_found_ttl: float
    selected_per_platform: int
    refresh_schedule: str
    refresh_margin_hours: float
    user_token_sha512: str
    admin_token_sha512: str
    verbose: bool
    log_level: str
    log_format: str
    metrics_enabled: bool
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    upstream_max_body_bytes: int
    max_small_body_bytes: int
    head_timeout: float
    request_timeout: float
    idle_timeout: float
    grace_period: float

    @property
    def listen_host(self) -> str:
        return self.listen[0]

    @property
    def listen_port(self) -> int:
        return self.listen[1]

    def __repr__(self) -> str:  # never show secrets in logs or tracebacks
        shown = ", ".join(
            f"{s.name}={'***' if s.secret and getattr(self, s.name) else getattr(self, s.name)!r}"
            for s in SETTINGS
        )
        return f"Config({shown})"


def read_ini(path: str) -> dict[str, str]:
    """Raw values from an ini file, by setting name; unknown keys are an error."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror or exc}") from None
    except configparser.Error as exc:
        raise ConfigError(
            "--config", f"{path} is not a valid ini file: {exc}".splitlines()[0]
        ) from None
    known = {(s.section, s.key): s.name for s in SETTINGS}
    values: dict[str, str] = {}
    for section in parser.sections():
        for key, value in parser.items(section):
            name = known.get((section, key))
            if name is None:
                raise ConfigError(f"[{section}] {key}", f"unknown setting in {path}")
            values[name] = value
    return values


# Variables dcapd reads beside the settings' own (DCAPD_CONFIG names the ini file; the
# supervisor tells each worker process its number, port and shared certificate with the rest).
OTHER_VARIABLES = (
    "DCAPD_CONFIG",
    "DCAPD_INTEL_CONFIG",
    "DCAPD_WORKER_INDEX",
    "DCAPD_WORKER_PORT",
    "DCAPD_WORKER_TLS_FILE",
)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line for each ``DCAPD_*`` variable no setting reads (a misspelling is otherwise
    silently ignored), with the closest known name."""
    environ = os.environ if environ is None else environ
    known = [s.env for s in SETTINGS] + list(OTHER_VARIABLES)
    lines = []
    for name in sorted(n for n in environ if n.startswith("DCAPD_") and n not in known):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        lines.append(f"environment variable {name} is not a dcapd setting and is ignored{hint}")
    return lines


def load_config(
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    ini_path: str | None = None,
    base: Mapping[str, str] | None = None,
) -> Config:
    """Build a Config: ``overrides`` (by setting name, e.g. from the command line) win over
    ``environ`` which wins over the ini file which wins over ``base`` (raw strings by setting
    name, e.g. from Intel's default.json) which wins over DEFAULTS.

    Overrides may be raw strings (parsed) or already-typed values (used as given), so tests
    and library callers can pass ``cache_dir=tmp_path`` or ``url_map={...}``.
    """
    environ = os.environ if environ is None else environ
    overrides = dict(overrides or {})
    ini_path = ini_path or environ.get("DCAPD_CONFIG") or None
    ini_values = read_ini(ini_path) if ini_path else {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        label = f"[{setting.section}] {setting.key} / {setting.env}"
        if setting.name in overrides and overrides[setting.name] is not None:
            raw = overrides[setting.name]
            if not isinstance(raw, str):
                values[setting.name] = raw
                continue
        elif setting.env in environ:
            raw = environ[setting.env]
        elif setting.name in ini_values:
            raw = ini_values[setting.name]
        elif base and setting.name in base:
            raw = base[setting.name]
        else:
            raw = setting.default
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(label, str(exc), setting.name) from None
    if values["cache_url"] and values["cache_dir"]:
        raise ConfigError(
            "[cache] dir / DCAPD_CACHE_DIR and [cache] url / DCAPD_CACHE_URL",
            "both are set: the cache is either a directory or a PostgreSQL database",
        )
    if not values["cache_dir"] and not values["cache_url"]:
        values["cache_dir"] = default_cache_dir()
    if bool(values["cert_file"]) != bool(values["key_file"]):
        raise ConfigError("[server] cert_file / key_file", "give both or neither")
    return Config(**values)
