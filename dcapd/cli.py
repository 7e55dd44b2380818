"""The ``dcapd`` command: read the configuration, open the cache, serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__
from .app import app_for
from .config import SETTINGS, ConfigError, load_config
from .intelconfig import read_intel_config, report_intel_config
from .logs import configure_from
from .schedule import scheduler_for
from .server import Server
from .services import build_services

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
        help="Intel PCCS config/default.json; the ini file, environment and "
        "options override its values",
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


def pin_to_cpus(cpu_list: str) -> None:
    """Run on the given CPUs only (Linux): one CPU keeps the GIL from moving between CPUs."""
    if not cpu_list:
        return
    if not hasattr(os, "sched_setaffinity"):
        log.warning("cpu_affinity is not supported on this system; ignored")
        return
    os.sched_setaffinity(0, {int(cpu) for cpu in cpu_list.split(",")})
    log.info("running on CPU(s) %s", cpu_list)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {s.name: getattr(args, s.name) for s in SETTINGS}
    intel_values: dict[str, str] = {}
    intel_unknown: list[str] = []
    try:
        if args.intel_config:
            intel_values, intel_unknown = read_intel_config(args.intel_config)
        config = load_config(overrides, ini_path=args.config, base=intel_values)
    except ConfigError as exc:
        print(f"dcapd: {exc}", file=sys.stderr)
        return 2
    configure_from(config)
    if args.intel_config:
        report_intel_config(args.intel_config, intel_values, intel_unknown)

    services = build_services(config)
    app = app_for(services)
    if not config.api_key:
        log.warning(
            "no Intel API key configured (INTEL_API_KEY): PCK certificates of new "
            "platforms cannot be fetched"
        )
    log.info(
        "cache %s in %s mode; upstream %s", config.cache_dir, config.cache_mode, config.pcs_url
    )
    pin_to_cpus(config.cpu_affinity)
    scheduler = scheduler_for(services)
    scheduler.start()
    try:
        Server(app, config).serve_forever()
    except OSError as exc:
        print(
            f"dcapd: cannot serve on {config.listen_host}:{config.listen_port}: {exc}",
            file=sys.stderr,
        )
        return 1
    finally:
        scheduler.stop()
        services.close()
    return 0
