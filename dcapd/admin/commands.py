"""The ``dcapd-admin`` subcommands, one ``cmd_*`` function each: they read the options, call
the module doing the work, write the output files and print the one-line summary."""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import logging
import os
import sys
from typing import Callable

from ..auth import token_sha512
from ..backends.postgres import mask_url
from ..config import Config
from ..hexstr import is_hex
from ..integrity import Integrity
from ..pcsurls import INTEL_ROOTCA_CRL_URL
from .cache_entries import delete_entry, entry_lines, list_entries
from .cache_export import Exporter
from .cache_import import check_upload, import_upload, open_services, open_store
from .common import (
    ENV,
    PROG,
    AdminError,
    Progress,
    SettingError,
    check_writable,
    dcapd_config,
    plural,
    read_json,
    read_text,
    write_atomic,
)
from .fetch import Fetcher
from .migrate import import_into_cache
from .pccs import Pccs
from .pcs import JOURNAL_FORMAT, Journal, Pcs
from .platform_list import collect_csv, load_platform_list
from .server_status import fetch_status, read_status, status_changes, status_lines
from .upload_file import expiry_note, upload_version

log = logging.getLogger("dcapd.admin")


def cmd_get(args: argparse.Namespace) -> int:
    pccs = Pccs(args)
    check_writable(args.output)
    params = {"source": args.source} if args.source else None
    reply = pccs.request("GET", pccs.url("platforms"), params=params)
    try:
        rows = json.loads(reply.content)
        if not isinstance(rows, list):
            raise ValueError("not a JSON array")
    except ValueError as exc:
        raise AdminError(
            f"GET {pccs.url('platforms')}: the PCCS sent no platform list ({exc})"
        ) from None
    write_atomic(args.output, reply.content)
    print(f"{args.output}: {plural(len(rows), 'platform')}")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    try:
        names = [] if args.files else os.listdir(args.directory)
    except OSError as exc:
        raise SettingError(f"-d {args.directory}: {exc.strerror or exc}") from None
    files = args.files or sorted(
        os.path.join(args.directory, name)
        for name in names
        if name.lower().endswith(".csv") and os.path.isfile(os.path.join(args.directory, name))
    )
    if not files:
        raise AdminError(f"no .csv files in {args.directory}")
    platforms = collect_csv(files)
    write_atomic(args.output, json.dumps(platforms).encode())
    print(
        f"{args.output}: {plural(len(platforms), 'platform')} from {plural(len(files), 'CSV file')}"
    )
    return 0


def _api_key_getter(config: Config) -> Callable[[], str]:
    """The configured key (--api-key or its variable), else a prompt when first needed."""
    cached: list[str] = [config.api_key] if config.api_key else []

    def get() -> str:
        if not cached:
            if not sys.stdin.isatty():
                raise SettingError(f"no Intel PCS API key: give --api-key or set {ENV['api_key']}")
            cached.append(getpass.getpass("Intel PCS API key: "))
        return cached[0]

    return get


def cmd_fetch(args: argparse.Namespace, sleep: Callable[[float], None]) -> int:
    crl_only = args.crl_only and args.input is None
    if args.crl_only and not crl_only:
        log.warning("--crl-only ignored: an input file was given (as Intel's tool does)")
    input_file = args.input or "platform_list.json"
    platforms = None if crl_only else load_platform_list(input_file)
    try:
        integrity = Integrity.from_file(args.trusted_roots or "")
    except (OSError, ValueError) as exc:
        raise SettingError(f"--trusted-roots: {exc}") from None
    url = args.url.strip()
    config = dcapd_config(
        {
            "pcs_url": (f"PCS URL {url!r}", url if url.endswith("/") else url + "/"),
            "url_map": ("--url-map", args.url_map),
            "api_key": ("--api-key", args.api_key or None),
            "upstream_retries": ("--retries", str(args.retries)),
            "upstream_timeout": ("--timeout", str(args.timeout)),
        }
    )
    check_writable(args.output)
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                JOURNAL_FORMAT,
                args.url,
                args.tcb_update_type,
                args.platform,
                crl_only,
                hashlib.sha256(json.dumps(platforms).encode()).hexdigest(),
            ]
        ).encode()
    ).hexdigest()
    journal = Journal(args.output + ".partial", fingerprint, args.restart)
    progress = Progress()
    pcs = Pcs(config, _api_key_getter(config), journal, args.backoff, sleep)
    fetcher = Fetcher(
        pcs, integrity, args.tcb_update_type, args.platform, progress, args.skip_unknown
    )
    if journal.resumed:
        done = ""
        if platforms is not None:
            total = plural(len(fetcher.wanted(platforms)), "platform")
            done = f"{fetcher.platforms_done(platforms)} of {total} done, "
        progress.announce(
            f"resuming from {journal.path}: {done}"
            f"{plural(journal.resumed, 'PCS answer')} kept (--restart to fetch everything again)"
        )
    try:
        result = fetcher.run(platforms)
    except (AdminError, KeyboardInterrupt):
        progress.close()
        journal.close()
        if journal.replies:
            log.warning(
                "kept %d PCS answers in %s: run the same command again to resume",
                len(journal.replies),
                journal.path,
            )
        raise
    finally:
        pcs.close()
    progress.close()
    write_atomic(args.output, json.dumps(result.upload).encode())
    journal.remove()
    collaterals = result.upload["collaterals"]
    print(
        f"{args.output}: {plural(len(collaterals['pck_certs']), 'platform')}, "
        f"{plural(fetcher.certificates, 'certificate')}, "
        f"{plural(len(collaterals['tcbinfos']), 'FMSPC')} "
        f"({plural(pcs.calls, 'PCS request')}"
        + (f", {plural(journal.resumed, 'answer')} resumed" if journal.resumed else "")
        + ")"
    )
    note = expiry_note(result.upload)
    if note:
        print(f"{args.output}: {note}")
    if result.unknown:
        print(
            f"{plural(len(result.unknown), 'platform')} PCS does not know (404), skipped: "
            + ", ".join(result.unknown)
        )
    if result.not_available:
        path = args.not_available or os.path.join(
            os.path.dirname(args.output), "not_available.json"
        )
        write_atomic(path, json.dumps(result.not_available).encode())
        print(
            f"{path}: {plural(len(result.not_available), 'TCB')} whose certificate is "
            "'Not available'"
        )
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    pccs = Pccs(args)
    policy = args.fmspc is not None or pccs.endpoint == "appraisalpolicy"
    if policy:
        if args.fmspc is None or args.input is None:
            raise AdminError("an appraisal policy needs --fmspc and -i POLICY_FILE (a JWT)")
        if not is_hex(args.fmspc, (12,)):
            raise AdminError(f"--fmspc: {args.fmspc!r} is not 12 hex characters")
        text = read_text(args.input)
        if text.count(".") < 2:
            raise AdminError(f"{args.input}: not a JWT (header.payload.signature)")
        body = json.dumps({"policy": text, "is_default": args.default, "fmspc": args.fmspc})
        reply = pccs.request(
            "PUT",
            pccs.url("appraisalpolicy"),
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        print(f"appraisal policy uploaded for FMSPC {args.fmspc.upper()}: id {reply.text.strip()}")
        return 0
    if args.default:
        raise AdminError("--default is for appraisal policies (with --fmspc)")
    path = args.input or "platform_collaterals.json"
    text = read_text(path)
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise AdminError(f"{path}: not valid JSON ({exc})") from None
    version = upload_version(body, path)
    if args.no_check:
        log.info("%s: not checked before the upload (--no-check)", path)
    else:
        try:
            check_upload(body, path, args.trusted_roots)
        except SettingError:
            raise
        except AdminError as exc:
            raise AdminError(f"{exc} (not sent; see --trusted-roots and --no-check)") from None
    note = expiry_note(body)
    if note:
        print(f"{path}: {note}")
    reply = pccs.request(
        "PUT",
        pccs.url("platformcollateral", version),
        data=text.encode(),
        headers={"Content-Type": "application/json"},
    )
    print(f"{path}: uploaded to {pccs.url('platformcollateral', version)} ({reply.text.strip()})")
    for index, part in enumerate(body.get("dcapd_extra_uploads") or []):
        part_version = upload_version(part, f"{path}: dcapd_extra_uploads[{index}]")
        pccs.request(
            "PUT",
            pccs.url("platformcollateral", part_version),
            data=json.dumps(part).encode(),
            headers={"Content-Type": "application/json"},
        )
        print(f"{path}: extra upload {index} (v{part_version}) uploaded")
    skipped = [name for name in ("dcapd_crls", "dcapd_entries") if body.get(name)]
    if skipped:
        log.warning(
            "%s: %s cannot be uploaded to a PCCS; use dcapd-admin import for them",
            path,
            " and ".join(skipped),
        )
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    pccs = Pccs(args)
    params = {}
    if args.certs or args.fmspc is not None:
        params["type"] = "certs"
        if args.fmspc is not None:
            params["fmspc"] = "" if args.fmspc == "all" else args.fmspc
    try:  # dcapd's status, to tell what changed (Intel's PCCS has none)
        before: dict | None = read_status(pccs)
    except AdminError as exc:
        log.info("no status to compare with (%s): changes not shown", exc)
        before = None
    reply = pccs.request("POST", pccs.url("refresh"), params=params or None)
    what = "certificates" if params else "collateral"
    print(f"{what} refreshed: {reply.text.strip() or reply.status_code}")
    after = None
    if before is not None:
        try:
            after = read_status(pccs)
        except AdminError as exc:
            log.warning("the refresh is done, but the status cannot be read again: %s", exc)
    if before is not None and after is not None:
        changes = status_changes(before, after)
        count = plural(len(changes), "cached entry", "cached entries")
        print(f"{count} changed" + ":" * bool(changes))
        for line in changes:
            print(f"  {line}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status, text = fetch_status(Pccs(args))
    if args.json:
        print(text.rstrip("\n"))
    else:
        for line in status_lines(status):
            print(line)
    return 0


def cmd_hash_token(args: argparse.Namespace) -> int:
    """The SHA-512 dcapd's token settings take, of a token read without echo."""
    if sys.stdin.isatty():
        token = getpass.getpass("Token: ")
    else:
        token = sys.stdin.read()
        if token.endswith("\n"):
            token = token[:-2] if token.endswith("\r\n") else token[:-1]
            print(f"{PROG}: one trailing newline removed from the token read", file=sys.stderr)
    if not token:
        raise AdminError("empty token")
    print(token_sha512(token))
    return 0


def cache_location(args: argparse.Namespace) -> Config:
    """--cache-url (else its variable) or -C (else its variable, else dcapd's per-user cache
    folder): the settings' own resolution; both at once is refused as the server refuses it."""
    return dcapd_config(
        {
            "cache_dir": ("-C/--cache-dir", args.cache_dir),
            "cache_url": ("--cache-url", args.cache_url),
        }
    )


def cache_name(cache: Config) -> str:
    """The cache as output names it: the directory, or the database (never its password)."""
    return mask_url(cache.cache_url) if cache.cache_url else cache.cache_dir


def cmd_import(args: argparse.Namespace) -> int:
    body = read_json(args.input)
    if not isinstance(body, dict):
        raise AdminError(f"{args.input}: not an upload file (not a JSON object)")
    cache = cache_location(args)
    directory = cache_name(cache)
    services = open_services(cache.cache_dir, args.trusted_roots, args.config, cache.cache_url)
    try:
        counts = import_upload(services, body, args.input)
    finally:
        services.store.close()
        services.upstream.close()
    parts = [
        plural(counts["uploads"], "upload body", "upload bodies"),
        plural(counts["crls"], "CRL"),
        plural(counts["entries"], "other entry", "other entries"),
    ]
    print(f"{args.input}: imported into {directory} ({', '.join(parts)})")
    note = expiry_note(body)
    if note:
        print(f"{args.input}: {note}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    store = open_store(cache_location(args), must_exist=True)
    try:
        check_writable(args.output)
        exporter = Exporter(store, INTEL_ROOTCA_CRL_URL)
        body = exporter.run()
    finally:
        store.close()
    for warning in exporter.warnings:
        log.warning("%s", warning)
    write_atomic(args.output, json.dumps(body).encode())
    collaterals = body["collaterals"]
    print(
        f"{args.output}: {plural(len(collaterals['pck_certs']), 'platform')}, "
        f"{plural(len(collaterals['tcbinfos']), 'FMSPC')}"
        + (
            ", "
            + plural(len(body["dcapd_extra_uploads"]), "extra upload body", "extra upload bodies")
            if body.get("dcapd_extra_uploads")
            else ""
        )
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Intel PCCS's database into a dcapd cache, as ``python -m dcapd.migrate`` does; its lines
    are logged as every command's are."""
    return import_into_cache(args, PROG, configure_logging=None)


def cmd_entries(args: argparse.Namespace) -> int:
    cache = cache_location(args)
    directory = cache_name(cache)
    store = open_store(cache, must_exist=True)
    try:
        rows = list_entries(store, args.prefix or "")
    finally:
        store.close()
    for line in entry_lines(rows):
        print(line)
    print(f"{plural(len(rows), 'entry', 'entries')} in {directory}")
    return 0


def cmd_delete_entry(args: argparse.Namespace) -> int:
    cache = cache_location(args)
    directory = cache_name(cache)
    store = open_store(cache, must_exist=True)
    try:
        row = delete_entry(store, args.key, args.force)
    finally:
        store.close()
    print(
        f"deleted {row.key} from {directory} ({row.kind}, {plural(row.size, 'byte')}"
        + (f", next update {row.next_update}" if row.next_update else "")
        + ")"
    )
    return 0
