"""The ``dcapd`` command: read the configuration, open the cache, serve."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import ssl
import sys
from collections.abc import Sequence

from . import __version__
from .app import app_for
from .config import SETTINGS, Config, ConfigError, load_config, unknown_variables
from .eventloop import unavailable
from .intelconfig import intel_tls_files, read_intel_config, report_intel_config
from .logs import configure_from
from .schedule import scheduler_for
from .server import Server
from .services import Services, build_services
from .supervisor import (
    Supervisor,
    WorkerRole,
    as_worker,
    die_with_parent,
    ignore_second_stop_signal,
    unsupported_reason,
    worker_cpu,
    worker_role,
)

log = logging.getLogger("dcapd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcapd",
        description="A drop-in replacement for Intel's SGX/TDX DCAP PCCS. Each option overrides "
        "its environment variable, which overrides the ini file.",
    )
    parser.add_argument("--config", metavar="FILE", help="ini file (see pccs.ini.example)")
    parser.add_argument(
        "--intel-config",
        metavar="FILE",
        help="Intel PCCS config/default.json (and its ssl_key/ certificate, when there); the "
        "ini file, environment and options override its values [DCAPD_INTEL_CONFIG]",
    )
    parser.add_argument("--version", action="version", version=f"dcapd {__version__}")
    for setting in SETTINGS:
        flag = "--" + setting.name.replace("_", "-")
        default = f"default: {setting.default}" if setting.default else "default: empty"
        parser.add_argument(
            flag,
            dest=setting.name,
            metavar=setting.name.upper(),
            help=f"{setting.help} [{setting.env}; [{setting.section}] {setting.key}; {default}]",
        )
    return parser


def pin_to_cpus(cpu_list: str, worker: int | None = None) -> None:
    """Run on the given CPUs only (Linux): one CPU keeps the GIL from moving between CPUs.
    A *worker* process (``[server] workers``) runs on its own one of them."""
    if not cpu_list:
        return
    if worker is not None:
        cpu = worker_cpu(cpu_list, worker)
        if cpu is not None:
            cpu_list = str(cpu)
    if not hasattr(os, "sched_setaffinity"):
        if cpu_list != "auto":
            log.warning("cpu_affinity is not supported on this system; ignored")
        return
    if cpu_list == "auto":
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) <= 1:
            return
        # By process ID, not always the first: several dcapd processes on one host (separate
        # instances, a test run) then spread over the CPUs instead of sharing one.
        cpus = {allowed[os.getpid() % len(allowed)]}
    else:
        cpus = {int(cpu) for cpu in cpu_list.split(",")}
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        log.warning("cpu_affinity %s could not be applied (%s); running on any CPU", cpu_list, exc)
        return
    who = "running" if worker is None else f"worker {worker} (pid {os.getpid()}) running"
    log.info("%s on CPU(s) %s", who, ",".join(map(str, sorted(cpus))))


def setting_label(name: str) -> str:
    """How a setting is named in one-line errors: ``[section] key / VARIABLE``."""
    setting = next(s for s in SETTINGS if s.name == name)
    return f"[{setting.section}] {setting.key} / {setting.env}"


def check_tls_files(config: Config) -> None:
    """Refuse, as a configuration error, certificate and key files that cannot be used
    (missing, unreadable, not PEM, or not a pair) before anything is served."""
    if config.tls == "off" or not config.cert_file:
        return
    for name in ("cert_file", "key_file"):
        path = getattr(config, name)
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(setting_label(name), f"cannot read {path}: {exc.strerror}") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(config.cert_file, config.key_file)
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise ConfigError(
            "[server] cert_file / key_file",
            f"{config.cert_file} and {config.key_file} are not a PEM certificate and its "
            f"private key ({reason})",
        ) from None


def log_roles(config: Config) -> None:
    """Say at start which roles and upstream needs this configuration enables."""
    roles = [
        f"{role} token {'enabled' if digest else 'not set (refused)'}"
        for role, digest in (
            ("user", config.user_token_sha512),
            ("admin", config.admin_token_sha512),
        )
    ]
    log.info("roles: %s", ", ".join(roles))
    # OFFLINE never calls PCS, so it never needs the key.
    if config.cache_mode != "OFFLINE" and not config.api_key:
        log.warning(
            "no Intel API key configured (INTEL_API_KEY): PCK certificates of new "
            "platforms cannot be fetched"
        )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    overrides = {s.name: getattr(args, s.name) for s in SETTINGS}
    intel_config = args.intel_config or os.environ.get("DCAPD_INTEL_CONFIG")
    intel_values: dict[str, str] = {}
    intel_unknown: list[str] = []
    try:
        if intel_config:
            intel_values, intel_unknown = read_intel_config(intel_config)
            intel_values.update(intel_tls_files(intel_config))
        config = load_config(overrides, ini_path=args.config, base=intel_values)
    except ConfigError as exc:
        print(f"dcapd: {exc}", file=sys.stderr)
        return 2
    configure_from(config)
    role = worker_role()
    if role is None:  # a worker's supervisor said all this already
        for line in unknown_variables():
            log.warning("%s", line)
        if intel_config:
            report_intel_config(intel_config, intel_values, intel_unknown)
    else:
        config = as_worker(config, role)
    try:
        check_tls_files(config)
        event_loop_problem = unavailable(config.event_loop)
        if event_loop_problem:
            raise ConfigError(setting_label("event_loop"), event_loop_problem)
        services = build_services(config)
    except ConfigError as exc:
        print(f"dcapd: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the cache directory or the trusted roots file
        name = "trusted_roots" if exc.filename == config.trusted_roots else "cache_dir"
        path = config.trusted_roots if name == "trusted_roots" else config.cache_dir
        print(
            f"dcapd: {setting_label(name)}: cannot use {path}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    if role is None:
        log_roles(config)
        log.info(
            "cache: %s in %s mode; upstream %s",
            services.store.description,
            config.cache_mode,
            config.pcs_url,
        )
        if config.workers > 1:
            reason = unsupported_reason()
            if reason is None:
                services.close()  # checked and opened once (a migration runs here): the
                return supervise(config, argv)  # workers open their own
            log.warning("workers = %d: %s; serving with one process", config.workers, reason)
            config = dataclasses.replace(config, workers=1)
    return serve(config, services, role)


def supervise(config: Config, argv: Sequence[str]) -> int:
    """Become the supervisor of ``config.workers`` worker processes (dcapd.supervisor)."""
    try:
        return Supervisor(config, argv, config.workers).run()
    except OSError as exc:
        print(
            f"dcapd: cannot serve on {config.listen_host}:{config.listen_port}: {exc}",
            file=sys.stderr,
        )
        return 1


def serve(config: Config, services: Services, role: WorkerRole | None) -> int:
    """Serve in this process (alone, or as the worker *role*) until a stop signal."""
    app = app_for(services)
    if role is not None:
        die_with_parent(role)
    pin_to_cpus(config.cpu_affinity, None if role is None else role.index)
    # One refresh schedule between workers: worker 0's (why: dcapd.supervisor).
    scheduler = scheduler_for(services) if role is None or role.index == 0 else None
    if scheduler is not None:
        scheduler.start()
    server = Server(app, config, lifecycle=services.lifecycle, reuse_port=role is not None)
    try:
        if role is not None:
            server.start()
            ignore_second_stop_signal()
        server.serve_forever()
    except OSError as exc:
        print(
            f"dcapd: cannot serve on {config.listen_host}:{config.listen_port}: {exc}",
            file=sys.stderr,
        )
        return 1
    finally:
        if scheduler is not None:
            scheduler.stop(timeout=1.0)  # the grace period was for requests; a refresh is cut
        services.close()
    return 0
