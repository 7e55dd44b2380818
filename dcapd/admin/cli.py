"""The ``dcapd-admin`` command line: its options and subcommands, its logging, ``main``."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Callable

from .. import __version__
from ..backends import StoreUnavailable
from ..pcsurls import INTEL_PCS_URL
from .commands import (
    cmd_collect,
    cmd_delete_entry,
    cmd_entries,
    cmd_export,
    cmd_fetch,
    cmd_get,
    cmd_hash_token,
    cmd_import,
    cmd_migrate,
    cmd_put,
    cmd_refresh,
    cmd_status,
)
from .common import ENV, PROG, AdminError, SettingError
from .migrate import DESCRIPTION as MIGRATE_DESCRIPTION
from .migrate import add_arguments as add_migrate_arguments
from .pccs import ADMIN_TOKEN_ENV, DEFAULT_PCCS_URL

DESCRIPTION = """\
The air-gapped operator's tool for dcapd (and Intel's PCCS): its files are interchangeable
with Intel's PccsAdminTool.

Air-gapped workflow:
  1. platforms register with the offline PCCS (REQ or OFFLINE mode)
  2. dcapd-admin get -u https://pccs:8081 -o platform_list.json   (offline side)
  3. dcapd-admin fetch -i platform_list.json -o platform_collaterals.json   (connected side)
  4. dcapd-admin put -u https://pccs:8081 -i platform_collaterals.json     (offline side)
     or, with no server running: dcapd-admin import -i platform_collaterals.json --cache-dir DIR

The admin token comes from --token, the DCAPD_ADMIN_TOKEN variable or a prompt (its hash
for dcapd's settings: dcapd-admin hash-token); the Intel PCS API key from --api-key, the
{api_key} variable or a prompt.

Exit status: 0 done, 1 failed, 2 an unusable option, setting or path (one line names it).
""".format(api_key=ENV["api_key"])


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log what is done")

    pccs = argparse.ArgumentParser(add_help=False)
    group = pccs.add_argument_group("PCCS connection")
    group.add_argument(
        "-u",
        "--url",
        default=DEFAULT_PCCS_URL,
        help=f"the PCCS: server URL, API base or endpoint URL (default: {DEFAULT_PCCS_URL})",
    )
    group.add_argument(
        "--token",
        help=f"admin token (default: ${ADMIN_TOKEN_ENV}, else a "
        "prompt); prefer the variable: arguments show in ps",
    )
    tls = group.add_mutually_exclusive_group()
    tls.add_argument(
        "--ca-file",
        metavar="PEM",
        help="CA certificate(s) to verify the PCCS's TLS certificate with",
    )
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the PCCS's TLS certificate (self-signed servers)",
    )
    group.add_argument(
        "--timeout", type=float, default=300.0, metavar="SECONDS", help="per request (default: 300)"
    )

    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "-v", "--verbose", dest="verbose_all", action="store_true", help="log what is done"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    get = commands.add_parser(
        "get",
        parents=[common, pccs],
        help="GET /platforms from a PCCS -> platform_list.json",
        description="Read the registration queue (or the cached platforms) of a PCCS into a "
        "platform list file. Reading the queue empties it.",
    )
    get.add_argument(
        "-s",
        "--source",
        default="reg",
        help="reg: new registrations (default); reg_na: those whose certificates "
        "were 'Not available'; [FMSPC1,FMSPC2,...]: cached platforms of "
        "these FMSPCs ([] = all)",
    )
    get.add_argument(
        "-o",
        "--output",
        default="platform_list.json",
        help="platform list file to write (default: platform_list.json)",
    )

    collect = commands.add_parser(
        "collect",
        parents=[common],
        help="PCK ID retrieval tool CSV files -> platform_list.json",
        description="Turn the CSV files of Intel's PCK ID retrieval tool (no header row; "
        "enc_ppid,pce_id,cpu_svn,pce_svn,qe_id[,platform_manifest]) into a "
        "platform list file.",
    )
    collect.add_argument("files", nargs="*", help="CSV files (default: every .csv in -d)")
    collect.add_argument(
        "-d", "--directory", default=".", help="directory holding the CSV files (default: .)"
    )
    collect.add_argument(
        "-o",
        "--output",
        default="platform_list.json",
        help="platform list file to write (default: platform_list.json)",
    )

    fetch = commands.add_parser(
        "fetch",
        parents=[common],
        help="collateral of every listed platform from Intel PCS -> platform_collaterals.json",
        description="On a connected machine: fetch PCK certificates, TCB infos, identities "
        "and CRLs from Intel PCS and write them in Intel's upload format. "
        "PCS 429/5xx answers and network errors are retried with backoff "
        "(Retry-After honoured); an interrupted fetch run again with the same "
        "arguments resumes from <output>.partial.",
    )
    fetch.add_argument(
        "-u", "--url", default=INTEL_PCS_URL, help=f"Intel PCS API base (default: {INTEL_PCS_URL})"
    )
    fetch.add_argument("-i", "--input", help="platform list (default: platform_list.json)")
    fetch.add_argument(
        "-o",
        "--output",
        default="platform_collaterals.json",
        help="upload file to write (default: platform_collaterals.json)",
    )
    fetch.add_argument(
        "-p",
        "--platform",
        default="all",
        choices=["all", "client", "E3", "E5", "none"],
        help="also fetch TCB infos of every FMSPC PCS lists for this platform "
        "type (v4 only; none = only the listed platforms' FMSPCs; "
        "default: all)",
    )
    fetch.add_argument(
        "-t",
        "--tcb-update-type",
        default="standard",
        choices=["standard", "early", "all"],
        help="TCB info and identity update type (default: standard)",
    )
    fetch.add_argument(
        "-c",
        "--crl-only",
        action="store_true",
        help="fetch only the CRLs (ignored when -i is given, as Intel's tool)",
    )
    fetch.add_argument(
        "--api-key", help=f"Intel PCS subscription key (default: ${ENV['api_key']}, else a prompt)"
    )
    fetch.add_argument(
        "--not-available",
        metavar="FILE",
        help="where to list TCBs whose certificate is 'Not available' "
        "(default: not_available.json beside the output)",
    )
    fetch.add_argument(
        "--url-map",
        metavar="ORIGIN=MIRROR,...",
        help=f"fetch Intel URLs from a mirror (default: ${ENV['url_map']}), e.g. "
        "https://certificates.trustedservices.intel.com=http://mirror",
    )
    fetch.add_argument(
        "--trusted-roots",
        metavar="PEM",
        help="root CA(s) everything fetched must chain to (default: Intel's SGX Root CA)",
    )
    fetch.add_argument(
        "--retries",
        type=int,
        default=5,
        help="retries after a 429, 5xx or network error (default: 5)",
    )
    fetch.add_argument(
        "--backoff",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="first retry delay when PCS sends no Retry-After; doubles each time (default: 1)",
    )
    fetch.add_argument(
        "--timeout", type=float, default=120.0, metavar="SECONDS", help="per request (default: 120)"
    )
    fetch.add_argument(
        "--restart", action="store_true", help="ignore <output>.partial and fetch everything again"
    )
    fetch.add_argument(
        "--skip-unknown",
        action="store_true",
        help="go on past platforms PCS does not know (404), listing them at the end "
        "(default: stop at the first)",
    )

    put = commands.add_parser(
        "put",
        parents=[common, pccs],
        help="upload collateral (or an appraisal policy) to a PCCS",
        description="PUT an upload file to <url>/sgx/certification/v4/platformcollateral; "
        "with --fmspc (or a .../appraisalpolicy URL), PUT the JWT in -i as an "
        "appraisal policy.",
    )
    put.add_argument(
        "-i",
        "--input",
        help="upload file (default: platform_collaterals.json) or appraisal policy JWT file",
    )
    put.add_argument("-f", "--fmspc", help="the appraisal policy's FMSPC")
    put.add_argument(
        "-d",
        "--default",
        action="store_true",
        help="make the appraisal policy the default for its FMSPC",
    )
    put.add_argument(
        "--trusted-roots",
        metavar="PEM",
        help="root CA(s) the upload file is checked against before it is sent, as import "
        "checks it (default: Intel's SGX Root CA)",
    )
    put.add_argument(
        "--no-check", action="store_true", help="send the upload file without checking it first"
    )

    refresh = commands.add_parser(
        "refresh",
        parents=[common, pccs],
        help="ask a PCCS to refresh its cache (POST /refresh)",
        description="Refresh the PCCS's collateral (default) or its PCK certificates.",
    )
    refresh.add_argument(
        "--certs",
        action="store_true",
        help="refresh PCK certificates (type=certs) of every platform",
    )
    refresh.add_argument(
        "-f",
        "--fmspc",
        help="refresh PCK certificates only of platforms with these FMSPCs "
        "(comma-separated; implies --certs; 'all' = every platform)",
    )

    status = commands.add_parser(
        "status",
        parents=[common, pccs],
        help="what a dcapd server has cached and how fresh it is (GET /dcapd/status)",
        description="Show dcapd's status view: every cached collateral entry with its next "
        "update and state (! expired, ~ expiring within the refresh margin), and the counts.",
    )
    status.add_argument("--json", action="store_true", help="print the server's JSON as it is")

    commands.add_parser(
        "hash-token",
        parents=[common],
        help="the SHA-512 of a token, for user_token_sha512 / admin_token_sha512",
        description="Read a token without echo (from standard input when it is not a "
        "terminal: one trailing newline is removed) and print its SHA-512 hex, the value "
        "dcapd's token settings take.",
    )

    local = argparse.ArgumentParser(add_help=False)
    group = local.add_argument_group("cache directory")
    group.add_argument(
        "-C",
        "--cache-dir",
        help=f"dcapd's cache directory (default: ${ENV['cache_dir']}, else the "
        "per-user cache folder dcapd uses)",
    )
    group.add_argument(
        "--cache-url",
        metavar="URL",
        help=f"dcapd's cache on PostgreSQL instead (postgresql://...; default: "
        f"${ENV['cache_url']}); not together with --cache-dir",
    )

    imp = commands.add_parser(
        "import",
        parents=[common, local],
        help="apply an upload file to a dcapd cache directory (no server needed)",
        description="Write an upload file (from fetch, export or Intel's tool) straight into a "
        "dcapd cache directory, checked exactly as PUT /platformcollateral checks "
        "it; all or nothing.",
    )
    imp.add_argument(
        "-i",
        "--input",
        default="platform_collaterals.json",
        help="upload file (default: platform_collaterals.json)",
    )
    imp.add_argument(
        "--trusted-roots",
        metavar="PEM",
        help="root CA(s) the collateral must chain to (default: dcapd's setting, "
        "else Intel's SGX Root CA)",
    )
    imp.add_argument("--config", metavar="FILE", help="dcapd ini file (for trusted_roots)")

    exp = commands.add_parser(
        "export",
        parents=[common, local],
        help="dump a dcapd cache directory as an upload file",
        description="Write everything a dcapd cache serves as an upload file; import of it "
        "into an empty cache serves byte-identical answers.",
    )
    exp.add_argument(
        "-o",
        "--output",
        default="platform_collaterals.json",
        help="upload file to write (default: platform_collaterals.json)",
    )

    entries = commands.add_parser(
        "entries",
        parents=[common, local],
        help="list the keys of a dcapd cache directory",
        description="List a dcapd cache directory's entries: kind, body size, next update, "
        "state and key.",
    )
    entries.add_argument("--prefix", metavar="P", help="only keys starting with P (e.g. tcb/)")

    delete = commands.add_parser(
        "delete-entry",
        parents=[common, local],
        help="delete one entry of a dcapd cache directory",
        description="Delete one collateral or PCK certificate answer from a dcapd cache "
        "directory (dcapd fetches it again when next asked, unless OFFLINE).",
    )
    delete.add_argument("key", metavar="KEY", help="the key, as entries lists it")
    delete.add_argument(
        "--force",
        action="store_true",
        help="delete any other entry too (platforms, certificate sets, the registration "
        "queue, appraisal policies)",
    )

    migrate = commands.add_parser(
        "migrate",
        parents=[common],
        help="import Intel PCCS's database (pckcache.db) into a dcapd cache",
        description=MIGRATE_DESCRIPTION,
    )
    add_migrate_arguments(migrate)
    return parser


def _logging(verbose: bool) -> Callable[[], None]:
    """Log lines of this run on stderr (records of the thread running the command only, so a
    server in the same process keeps its own logging); returns the function that undoes it.
    dcapd.upstream's lines are left out: they are the server's log of PCS calls, and ``fetch``
    reports each PCS answer itself, naming the item; so are dcapd.expiry's, one per entry:
    fetch, put and import count the expired items in one line of their own."""
    logger = logging.getLogger("dcapd")
    thread = threading.get_ident()
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    handler.addFilter(
        lambda record: (
            record.thread == thread
            and not record.name.startswith(("dcapd.upstream", "dcapd.expiry"))
        )
    )
    saved_level = logger.level
    logger.addHandler(handler)
    if verbose and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)

    return restore


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "get": cmd_get,
    "collect": cmd_collect,
    "put": cmd_put,
    "refresh": cmd_refresh,
    "status": cmd_status,
    "hash-token": cmd_hash_token,
    "import": cmd_import,
    "export": cmd_export,
    "entries": cmd_entries,
    "delete-entry": cmd_delete_entry,
    "migrate": cmd_migrate,
}


def main(argv: Sequence[str] | None = None, *, sleep: Callable[[float], None] = time.sleep) -> int:
    """``dcapd-admin``: 0 done, 1 failed, 2 an unusable option, setting or path (one line on
    stderr naming it); ``sleep`` is what retries wait with (tests pass a recorder)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    restore = _logging(args.verbose or args.verbose_all)
    try:
        if args.command == "fetch":
            return cmd_fetch(args, sleep)
        return HANDLERS[args.command](args)
    except SettingError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except (AdminError, StoreUnavailable) as exc:  # the database down: one line, no password
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path no check above caught: still one line, naming it
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        restore()
