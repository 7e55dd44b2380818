"""``dcapd-admin``: the air-gapped operator's tool, interoperable with Intel's PccsAdminTool.

Subcommands (pccs-reference.md §4.2-§4.4, Appendix A):

* ``get``      GET /platforms from a PCCS -> ``platform_list.json``
* ``collect``  PCK ID retrieval tool CSV files -> ``platform_list.json``
* ``fetch``    every platform's collateral from Intel PCS -> ``platform_collaterals.json``
  (Intel's upload format), plus ``not_available.json``; resumable, retried with backoff
* ``put``      PUT the collateral file (or an appraisal policy) to a PCCS
* ``refresh``  ask a PCCS to refresh its collateral or certificates
* ``import``   apply an upload file to a dcapd cache directory, no server needed
* ``export``   dump a dcapd cache directory as an upload file (``import`` restores it exactly)

Files are interchangeable with Intel's tool. Keys Intel's tools do not know (they ignore
unknown keys) carry what Intel's format cannot express, so ``export`` then ``import`` gives
byte-identical answers: ``<name>_raw`` beside a parsed TCB info (its exact original text),
``dcapd_extra_uploads`` (further upload bodies, e.g. v3 collateral or items with a different
issuer chain, applied in order), ``dcapd_crls`` (``crl?uri=`` entries by URI, DER as hex) and
``dcapd_entries`` (registration-queue rows and appraisal policies, copied verbatim).
"""

from __future__ import annotations

import argparse
import base64
import csv
import getpass
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Callable

import requests
from requests.structures import CaseInsensitiveDict

from . import __version__
from .auth import ADMIN_TOKEN_HEADER
from .collateral import (
    ENCLAVE_IDENTITY_CHAIN,
    PCK_CERT_CHAIN,
    PCK_CRL_CHAIN,
    TCB_INFO_CHAIN_V3,
    TCB_INFO_CHAIN_V4,
    tcb_info_chain_header,
)
from .config import SETTINGS, ConfigError, load_config
from .hexstr import ANY_LENGTH, is_hex
from .pckcerts import NOT_AVAILABLE
from .pcsurls import INTEL_PCS_URL, INTEL_ROOTCA_CRL_URL
from .services import build_services
from .store import Store
from .upload import chain_halves, tcb_info_body, upload_certs
from .upstream import (
    ENCLAVE_IDENTITY_PATHS,
    RetryPolicy,
    Upstream,
    UpstreamError,
    UpstreamResponse,
    is_retryable,
)

log = logging.getLogger("dcapd.admin")

PROG = "dcapd-admin"
DEFAULT_PCCS_URL = "https://localhost:8081/sgx/certification/v4/"
USER_AGENT = f"dcapd-admin/{__version__}"
ADMIN_TOKEN_ENV = "DCAPD_ADMIN_TOKEN"
# dcapd settings the admin takes from the environment, and their variables.
ENV = {s.name: s.env for s in SETTINGS if s.name in ("api_key", "url_map", "cache_dir")}

# Identity kinds in the order of Intel's upload file (their PCS paths: upstream).
IDENTITY_KINDS = ("qe", "tdqe", "qve")
# Entries export copies verbatim (nothing in Intel's format holds them), and ones it never
# exports (process state); every other kind is collateral or a platform.
RAW_KINDS = ("reg", "appraisal", "policy")
SKIPPED_KINDS = ("pckcert", "certs", "rawtcbs", "lock", "status")

_ERRNO = re.compile(
    r"\[Errno -?\d+\] [^'\")\]]+|Connection refused|Name or service not known|"
    r"timed out|Remote end closed connection without response"
)


class AdminError(Exception):
    """What went wrong, as the one line ``dcapd-admin`` prints on stderr."""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def write_atomic(path: str, data: bytes) -> None:
    """Write ``path`` so that it is either the old file or the complete new one."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        handle, temp = tempfile.mkstemp(prefix=".dcapd-admin-", dir=directory)
    except OSError as exc:
        raise AdminError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    except OSError as exc:
        raise AdminError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def check_writable(path: str) -> None:
    """Fail before a destructive request if the output cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise AdminError(f"cannot write {path}: directory {directory} is not writable")


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise AdminError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise AdminError(f"{path}: not UTF-8 text") from None


def read_json(path: str):
    text = read_text(path)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise AdminError(f"{path}: not valid JSON ({exc})") from None


def _reason(exc: BaseException) -> str:
    """The useful part of a requests exception (its str() nests several layers)."""
    match = _ERRNO.search(str(exc))
    return match.group(0) if match else type(exc).__name__


def root_cert_cdp(chain: str) -> str:
    """The CRL distribution point of the root certificate at the end of a URL-encoded chain
    (where Intel's tool reads the root CA CRL URL from)."""
    from cryptography import x509

    try:
        pem = urllib.parse.unquote(chain_halves(chain)[1]).encode()
        cert = x509.load_pem_x509_certificate(pem)
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise AdminError(
            f"cannot read the root CA CRL URL from the processor CRL issuer chain: {exc}"
        ) from None
    for point in points:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier):
                return name.value
    raise AdminError("the root certificate of the processor CRL issuer chain has no CRL URL")


def dcapd_config(options: dict[str, tuple[str, object]]):
    """dcapd's Config (:func:`dcapd.config.load_config`, its parsers and defaults) from the
    admin's options: ``{setting name: (option, value or None)}``. A setting in ``ENV`` the
    option does not give comes from its environment variable; nothing else is read (no other
    variable, no ini file). A refused value is an error naming the option."""
    environ = {
        ENV[name]: os.environ[ENV[name]]
        for name in options
        if name in ENV and ENV[name] in os.environ
    }
    try:
        return load_config({name: value for name, (_, value) in options.items()}, environ=environ)
    except ConfigError as exc:
        option = options[exc.setting][0] if exc.setting in options else exc.key
        raise AdminError(f"{option}: {exc.problem}") from None


class Progress:
    """A one-line progress bar on stderr, drawn only when it is a terminal."""

    def __init__(self, stream=None, width: int = 28):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty())
        self.width = width
        self.total = 0
        self.done = 0
        self.label = ""
        self._drawn = 0

    def add(self, count: int) -> None:
        self.total += count
        self._draw()

    def step(self, label: str) -> None:
        self.done += 1
        self.label = label
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        total = max(self.total, self.done, 1)
        filled = int(self.width * self.done / total)
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{total} {self.label[:40]}"
        )
        self.stream.write("\r" + line.ljust(self._drawn))
        self.stream.flush()
        self._drawn = len(line)

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0


# ---------------------------------------------------------------------------------------------
# Platform lists (get, collect, fetch's input)
# ---------------------------------------------------------------------------------------------


def _platform_problem(item) -> str | None:
    if not isinstance(item, dict):
        return "is not a JSON object"
    if not is_hex(item.get("qe_id"), max_length=260):
        return "qe_id is not 1..260 hex characters"
    if not is_hex(item.get("pce_id"), (4,)):
        return "pce_id is not 4 hex characters"
    for name, length in (("enc_ppid", 768), ("cpu_svn", 32), ("pce_svn", 4)):
        value = item.get(name)
        if value not in (None, "") and not is_hex(value, (length,)):
            return f"{name} is not {length} hex characters (or empty)"
    manifest = item.get("platform_manifest")
    if manifest not in (None, "") and not is_hex(manifest, max_length=ANY_LENGTH):
        return "platform_manifest is not a hex string (or empty or null)"
    if not item.get("enc_ppid") and not manifest:
        return "has neither enc_ppid nor platform_manifest: PCS cannot be asked for its certs"
    return None


def load_platform_list(path: str) -> list[dict]:
    """A platform list file, checked; the error names the file and the first bad entry."""
    platforms = read_json(path)
    if not isinstance(platforms, list):
        raise AdminError(f"{path}: not a JSON array of platforms")
    for index, item in enumerate(platforms):
        problem = _platform_problem(item)
        if problem:
            who = f" (qe_id {item.get('qe_id')!r})" if isinstance(item, dict) else ""
            raise AdminError(f"{path}: entry {index}{who}: {problem}")
    return platforms


CSV_FIELDS = ("enc_ppid", "pce_id", "cpu_svn", "pce_svn", "qe_id", "platform_manifest")


def collect_csv(files: Iterable[str]) -> list[dict]:
    """PCK ID retrieval tool CSV files -> platform list (§4.2): no header row; columns
    enc_ppid,pce_id,cpu_svn,pce_svn,qe_id[,platform_manifest]; a missing manifest is null."""
    platforms = []
    for path in files:
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle))
        except OSError as exc:
            raise AdminError(f"cannot read {path}: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, csv.Error) as exc:
            raise AdminError(f"{path}: not a CSV file ({exc})") from None
        for number, row in enumerate(rows, 1):
            values = [value.strip() for value in row]
            if not any(values):
                continue
            if len(values) not in (5, 6):
                raise AdminError(
                    f"{path} line {number}: {len(values)} columns, expected "
                    f"5 or 6 ({','.join(CSV_FIELDS)})"
                )
            item = dict(zip(CSV_FIELDS, values))
            item.setdefault("platform_manifest", None)
            problem = _platform_problem(item)
            if problem:
                raise AdminError(f"{path} line {number}: {problem}")
            item["pckid_filename"] = os.path.basename(path)
            platforms.append(item)
    return platforms


# ---------------------------------------------------------------------------------------------
# Talking to a PCCS (get, put, refresh)
# ---------------------------------------------------------------------------------------------


def pccs_root(url: str) -> tuple[str, str | None]:
    """(``scheme://host[:port][/prefix]/``, endpoint named in the URL or None).

    Accepts a bare server URL, the API base (``.../sgx/certification/v4/``) or an endpoint URL
    as Intel's tool takes it (``.../sgx/certification/v4/platformcollateral``)."""
    match = re.fullmatch(r"(https?://[^/?#]+)(/[^?#]*)?", url.strip())
    if not match:
        raise AdminError(f"not an http(s) URL: {url!r}")
    path = match.group(2) or "/"
    api = re.search(r"/sgx/certification/v\d+(?:/|$)", path)
    if not api:
        return match.group(1) + path.rstrip("/") + "/", None
    endpoint = path[api.end() :].strip("/") or None
    return match.group(1) + path[: api.start()] + "/", endpoint


class Pccs:
    """Admin requests to a PCCS: admin-token header, TLS options, one-line errors."""

    def __init__(self, args: argparse.Namespace):
        self.root, self.endpoint = pccs_root(args.url)
        version = re.search(r"/sgx/certification/v(\d+)", args.url)
        self.version = int(version.group(1)) if version else 4
        self.timeout = args.timeout
        self._token = args.token
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        # Passed with every request: a session-level verify loses to REQUESTS_CA_BUNDLE.
        self.verify: object = True
        if args.ca_file:
            self.session.trust_env = False  # neither REQUESTS_CA_BUNDLE nor proxies apply
            self.verify = args.ca_file
        elif args.insecure:
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            self.verify = False
            log.warning("TLS certificate of %s not verified (--insecure)", self.root)

    def url(self, endpoint: str, version: int | None = None) -> str:
        return f"{self.root}sgx/certification/v{version or self.version}/{endpoint}"

    def token(self) -> str:
        if self._token is None:
            self._token = os.environ.get(ADMIN_TOKEN_ENV) or None
        if self._token is None:
            if not sys.stdin.isatty():
                raise AdminError(f"no admin token: give --token or set {ADMIN_TOKEN_ENV}")
            self._token = getpass.getpass(f"Admin token for {self.root}: ")
        return self._token

    def request(self, method: str, url: str, **kwargs) -> requests.Response:
        headers = {ADMIN_TOKEN_HEADER: self.token(), **kwargs.pop("headers", {})}
        try:
            reply = self.session.request(
                method,
                url,
                headers=headers,
                timeout=self.timeout,
                verify=self.verify,
                allow_redirects=False,
                **kwargs,
            )
        except requests.exceptions.SSLError as exc:
            raise AdminError(
                f"TLS connection to {url} failed ({_reason(exc)}): give the "
                "server's CA certificate with --ca-file, or use --insecure"
            ) from None
        except requests.exceptions.Timeout:
            raise AdminError(f"no answer from {url} within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise AdminError(f"cannot connect to {url}: {_reason(exc)}") from None
        if reply.status_code == 401:
            raise AdminError(
                f"the PCCS at {url} refused the admin token (401 {reply.text.strip()[:80]})"
            )
        if reply.status_code != 200:
            raise AdminError(
                f"{method} {url}: the PCCS answered {reply.status_code} {reply.text.strip()[:200]}"
            )
        return reply


# ---------------------------------------------------------------------------------------------
# Talking to Intel PCS (fetch): journal for resuming, retries with backoff
# ---------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CaseInsensitiveDict
    body: bytes

    def header(self, name: str) -> str:
        return self.headers.get(name) or ""


JOURNAL_FORMAT = 2  # its keys: sha256 of [Upstream method, arguments] (1: of the request)


class Journal:
    """Every PCS answer worth keeping, appended to ``<output>.partial`` as it arrives, so an
    interrupted fetch re-run with the same arguments asks PCS only for what it lacks."""

    def __init__(self, path: str, fingerprint: str, restart: bool):
        self.path = path
        self.replies: dict[str, Reply] = {}
        kept = False
        if not restart and os.path.exists(path):
            kept = self._load(fingerprint)
        self.resumed = len(self.replies) if kept else 0
        if kept:
            log.info("resuming from %s (%d PCS answers kept)", path, len(self.replies))
            self._file = open(path, "a", encoding="utf-8")
        else:
            self.replies.clear()
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self._file = os.fdopen(handle, "w", encoding="utf-8")
            self._write({"dcapd_admin_fetch": 1, "fingerprint": fingerprint})

    def _load(self, fingerprint: str) -> bool:
        try:
            with open(self.path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except (OSError, UnicodeDecodeError):
            return False
        try:
            head = json.loads(lines[0])
        except (ValueError, IndexError):
            return False
        if not isinstance(head, dict) or head.get("fingerprint") != fingerprint:
            log.warning(
                "%s is from a fetch with other arguments or inputs: starting afresh", self.path
            )
            return False
        for line in lines[1:]:
            try:  # a line cut short by a crash is simply not there
                record = json.loads(line)
                self.replies[record["k"]] = Reply(
                    record["s"], CaseInsensitiveDict(record["h"]), base64.b64decode(record["b"])
                )
            except (ValueError, KeyError, TypeError):
                continue
        return True

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def get(self, key: str) -> Reply | None:
        return self.replies.get(key)

    def put(self, key: str, reply: Reply) -> None:
        self.replies[key] = reply
        self._write(
            {
                "k": key,
                "s": reply.status,
                "h": dict(reply.headers),
                "b": base64.b64encode(reply.body).decode(),
            }
        )

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Pcs:
    """Intel PCS for ``fetch``: the journal first, then dcapd's Upstream (endpoints, API key,
    url_map, retries with backoff and Retry-After), reporting each item by its name."""

    def __init__(
        self,
        config,
        api_key: Callable[[], str],
        journal: Journal,
        backoff: float,
        sleep: Callable[[float], None],
    ):
        # Patient, as a batch job may be: no jitter, long waits, a timeout per attempt.
        retry = RetryPolicy(
            first_delay=backoff,
            max_delay=300.0,
            jitter=False,
            timeout_per_attempt=True,
            sleep=sleep,
            on_retry=self._retrying,
        )
        self.upstream = Upstream(config, api_key=api_key, retry=retry)
        mirror = self.upstream.mapped_url(config.pcs_url)
        if mirror != config.pcs_url:  # --url-map covers PCS too (dcapd's: only CRL URLs)
            self.upstream.close()
            config = replace(config, pcs_url=mirror)
            self.upstream = Upstream(config, api_key=api_key, retry=retry)
        self.upstream.session.headers["User-Agent"] = USER_AGENT
        self.version = self.upstream.version
        self.retries = config.upstream_retries
        self.journal = journal
        self.calls = 0  # requests actually sent (not answered from the journal)
        self._what = ""

    def call(
        self, what: str, request: Callable[..., UpstreamResponse], *args, optional: bool = False
    ) -> Reply:
        """The answer to ``request(*args)``, a method of ``self.upstream``. 200s (and, for
        ``optional`` items, 404s) are kept in the journal; a required item is never
        remembered as missing."""
        key = hashlib.sha256(json.dumps([request.__name__, *args]).encode()).hexdigest()
        kept = self.journal.get(key)
        if kept is not None:
            return kept
        self._what = what
        self.calls += 1
        try:
            answer = request(*args)
        except UpstreamError as exc:
            raise AdminError(
                f"{what}: cannot connect to {exc.url.split('?')[0]}: "
                f"{_reason(exc.__cause__ or exc)} (after {self.retries} retries)"
            ) from None
        if is_retryable(answer.status):
            raise AdminError(
                f"{what}: PCS answered {answer.status} for "
                f"{answer.url.split('?')[0]} (after {self.retries} retries)"
            )
        reply = Reply(answer.status, CaseInsensitiveDict(answer.headers), answer.body)
        if reply.status == 200 or (reply.status == 404 and optional):
            self.journal.put(key, reply)
        return reply

    def _retrying(
        self, response: requests.Response | None, error: Exception | None, delay: float
    ) -> None:
        self.calls += 1
        failure = _reason(error) if error is not None else f"PCS answered {response.status_code}"
        log.warning("%s: %s; retrying in %g s", self._what, failure, delay)

    def close(self) -> None:
        self.upstream.close()


def _pcs_failure(what: str, reply: Reply) -> AdminError:
    detail = " ".join(
        f"{name} {reply.header(name)}"
        for name in ("Error-Code", "Error-Message")
        if reply.header(name)
    )
    if reply.status == 401:
        return AdminError(f"{what}: Intel PCS refused the API key (401)")
    return AdminError(f"{what}: PCS answered {reply.status}" + (f" ({detail})" if detail else ""))


# ---------------------------------------------------------------------------------------------
# fetch: Intel's PccsAdminTool ``fetch``, step by step (§4.3)
# ---------------------------------------------------------------------------------------------


def tcb_info_fields(name: str, body: bytes) -> dict:
    """``{name: parsed}``, plus ``{name}_raw`` when the original is not what the upload
    stores for the parsed form (Intel's compact JSON)."""
    document = json.loads(body)
    fields = {name: document}
    if tcb_info_body(document) != body:
        fields[f"{name}_raw"] = body.decode("utf-8")
    return fields


@dataclass
class FetchResult:
    upload: dict
    not_available: list


class Fetcher:
    def __init__(self, pcs: Pcs, integrity, update: str, platform_filter: str, progress: Progress):
        self.pcs = pcs
        self.upstream = pcs.upstream
        self.integrity = integrity
        self.updates = ["standard", "early"] if update == "all" else [update]
        self.platform_filter = platform_filter
        self.progress = progress
        version = pcs.version
        self.version = version
        self.tcb_chain_name = tcb_info_chain_header(version)
        self.collaterals: dict = {
            "version": version,
            "pck_certs": [],
            "tcbinfos": [],
            "pckcacrl": {},
            "qeidentity": "",
            "tdqeidentity": "",
            "qveidentity": "",
        }
        self.pck_chains: dict[str, str] = {}
        self.crl_chains: dict[str, str] = {}
        self.tcb_chain = ""
        self.identity_chain = ""
        self.root_crl: tuple[str, str] = ("", "")
        self.fmspc_order: list[str] = []  # the platforms' FMSPCs, as parsed from their certs

    # --- checks

    def _verify(self, what: str, check: Callable[[], None]) -> None:
        from .integrity import IntegrityError

        try:
            check()
        except IntegrityError as exc:
            raise AdminError(f"{what}: not what Intel signed: {exc}") from None

    def _required(self, what: str, reply: Reply) -> Reply:
        if reply.status != 200:
            raise _pcs_failure(what, reply)
        return reply

    # --- steps

    def run(self, platforms: list | None) -> FetchResult:
        self.progress.add(3)
        self.crls()
        not_available: list = []
        if platforms is not None:
            self.pck_certs(platforms, not_available)
            self.tcb_infos(self.fmspcs())
            self.identities()
        return FetchResult(self.output(platforms or []), not_available)

    def crls(self) -> None:
        for ca in ("processor", "platform"):
            what = f"{ca} PCK CRL"
            reply = self._required(
                what, self.pcs.call(what, self.upstream.get_pck_crl, self.version, ca)
            )
            chain = reply.header(PCK_CRL_CHAIN)
            if not chain:
                raise AdminError(f"{what}: PCS sent no {PCK_CRL_CHAIN} header")
            self._verify(what, lambda: self.integrity.check_crl(reply.body, chain))
            self.collaterals["pckcacrl"][f"{ca}Crl"] = reply.body.hex()
            self.crl_chains[ca.upper()] = chain
            self.progress.step(what)
        cdp = root_cert_cdp(self.crl_chains["PROCESSOR"])
        what = "root CA CRL"
        reply = self._required(what, self.pcs.call(what, self.upstream.get_url, cdp))
        self._verify(what, lambda: self.integrity.check_crl(reply.body, None))
        self.root_crl = (cdp, reply.body.hex())
        self.progress.step(what)

    def pck_certs(self, platforms: list, not_available: list) -> None:
        from .platforms import raw_tcb_of_pcs_entry
        from .selection import SelectionError, parse_pck_cert

        wanted: dict[tuple[str, str], dict] = {}
        for item in platforms:
            ident = (item["qe_id"].upper(), item["pce_id"].upper())
            # One pckcerts call per platform; a manifest wins (Intel: POST with it).
            row = wanted.setdefault(
                ident,
                {
                    "qe_id": item["qe_id"],
                    "pce_id": item["pce_id"],
                    "enc_ppid": item.get("enc_ppid") or "",
                    "platform_manifest": item.get("platform_manifest"),
                },
            )
            if item.get("platform_manifest") and not row["platform_manifest"]:
                row["platform_manifest"] = item["platform_manifest"]
            if item.get("enc_ppid") and not row["enc_ppid"]:
                row["enc_ppid"] = item["enc_ppid"]
        self.progress.add(len(wanted))
        for platform in wanted.values():
            what = f"PCK certificates of platform {platform['qe_id']}/{platform['pce_id']}"
            if platform["platform_manifest"]:
                reply = self.pcs.call(
                    what,
                    self.upstream.post_pck_certs,
                    self.version,
                    platform["platform_manifest"],
                    platform["pce_id"],
                )
            else:
                reply = self.pcs.call(
                    what,
                    self.upstream.get_pck_certs,
                    self.version,
                    platform["enc_ppid"],
                    platform["pce_id"],
                )
            self._required(what, reply)
            chain = reply.header(PCK_CERT_CHAIN)
            try:
                entries = json.loads(reply.body)
                if not isinstance(entries, list) or not all(
                    isinstance(e, dict) and isinstance(e.get("cert"), str) for e in entries
                ):
                    raise ValueError("not a JSON array of {tcb, tcbm, cert}")
            except ValueError as exc:
                raise AdminError(f"{what}: PCS sent bad data: {exc}") from None
            available = [e for e in entries if e["cert"] != NOT_AVAILABLE]
            for entry in entries:
                if entry["cert"] == NOT_AVAILABLE:
                    try:
                        cpu_svn, pce_svn = raw_tcb_of_pcs_entry(entry["tcb"])
                    except (KeyError, TypeError, ValueError):
                        raise AdminError(
                            f"{what}: PCS sent bad data: a 'Not available' "
                            "entry without a valid tcb"
                        ) from None
                    not_available.append(
                        {
                            "enc_ppid": platform["enc_ppid"],
                            "platform_manifest": platform["platform_manifest"],
                            "qe_id": platform["qe_id"],
                            "pce_id": platform["pce_id"],
                            "cpu_svn": cpu_svn,
                            "pce_svn": pce_svn,
                        }
                    )
            self.progress.step(what)
            if not available:
                log.warning("%s: every certificate is 'Not available'; platform skipped", what)
                continue
            if not chain:
                raise AdminError(f"{what}: PCS sent no {PCK_CERT_CHAIN} header")
            for entry in available:
                self._verify(what, lambda: self.integrity.check_pck_cert(entry["cert"], chain))
            try:
                first = parse_pck_cert(urllib.parse.unquote(available[0]["cert"]))
            except SelectionError as exc:
                raise AdminError(f"{what}: not a PCK certificate: {exc}") from None
            # Intel: the FMSPC as parsed from the cert (lower case), the chain per CA type.
            fmspc = first.fmspc.hex()
            if fmspc.upper() not in (f.upper() for f in self.fmspc_order):
                self.fmspc_order.append(fmspc)
            self.pck_chains.setdefault(first.ca_type, chain)
            self.collaterals["pck_certs"].append(
                {
                    "qe_id": platform["qe_id"],
                    "pce_id": platform["pce_id"],
                    "enc_ppid": platform["enc_ppid"],
                    "platform_manifest": platform["platform_manifest"],
                    "certs": available,
                }
            )

    def fmspcs(self) -> list[str]:
        fmspcs = list(self.fmspc_order)
        if self.version >= 4 and self.platform_filter != "none":
            what = f"FMSPC list (platform={self.platform_filter})"
            reply = self.pcs.call(
                what, self.upstream.get_fmspcs, self.version, self.platform_filter, optional=True
            )
            if reply.status != 200:
                log.warning(
                    "%s: PCS answered %d; only the platforms' FMSPCs are fetched",
                    what,
                    reply.status,
                )
            else:
                try:
                    listed = [item["fmspc"] for item in json.loads(reply.body)]
                    if not all(is_hex(f, (12,)) for f in listed):
                        raise ValueError("bad fmspc")
                except (ValueError, TypeError, KeyError):
                    raise AdminError(f"{what}: PCS sent bad data") from None
                known = {f.upper() for f in fmspcs}
                for fmspc in listed:
                    if fmspc.upper() not in known:
                        known.add(fmspc.upper())
                        fmspcs.append(fmspc)
        self.progress.add(len(fmspcs) * len(self.updates) * (2 if self.version >= 4 else 1))
        return fmspcs

    def tcb_infos(self, fmspcs: list[str]) -> None:
        for fmspc in fmspcs:
            item: dict = {"fmspc": fmspc}
            for update in self.updates:
                suffix = "_early" if update == "early" else ""
                # The SGX TCB info is required for standard; early and TDX ones are optional.
                sgx = self._tcb_info("sgx", fmspc, update, optional=update != "standard")
                if sgx is not None:
                    name = f"sgx_tcbinfo{suffix}" if self.version >= 4 else f"tcbinfo{suffix}"
                    item.update(tcb_info_fields(name, sgx.body))
                    self.tcb_chain = self.tcb_chain or sgx.header(self.tcb_chain_name)
                if self.version >= 4:
                    tdx = self._tcb_info("tdx", fmspc, update, optional=True)
                    if tdx is not None:
                        item.update(tcb_info_fields(f"tdx_tcbinfo{suffix}", tdx.body))
            self.collaterals["tcbinfos"].append(item)

    def _tcb_info(self, tee: str, fmspc: str, update: str, optional: bool) -> Reply | None:
        what = f"{tee.upper()} TCB info {fmspc.upper()} ({update})"
        reply = self.pcs.call(
            what, self.upstream.get_tcb_info, tee, self.version, fmspc, update, optional=optional
        )
        self.progress.step(what)
        if reply.status != 200:
            if optional and reply.status == 404:
                log.info("%s: not available at PCS (optional)", what)
                return None
            raise _pcs_failure(what, reply)
        chain = reply.header(self.tcb_chain_name)
        if not chain:
            raise AdminError(f"{what}: PCS sent no {self.tcb_chain_name} header")
        self._verify(what, lambda: self.integrity.check_signed_json(reply.body, "tcbInfo", chain))
        try:
            info = json.loads(reply.body)["tcbInfo"]
            if str(info.get("fmspc", "")).upper() != fmspc.upper():
                raise ValueError(f"it is for FMSPC {info.get('fmspc')!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AdminError(f"{what}: PCS sent bad data: {exc}") from None
        return reply

    def identities(self) -> None:
        kinds = [
            kind
            for kind in IDENTITY_KINDS
            if ENCLAVE_IDENTITY_PATHS[kind][0] == "sgx" or self.version >= 4
        ]
        self.progress.add(len(kinds) * len(self.updates))
        for kind in kinds:
            for update in self.updates:
                what = f"{kind.upper()} identity ({update})"
                optional = update != "standard"
                reply = self.pcs.call(
                    what,
                    self.upstream.get_enclave_identity,
                    kind,
                    self.version,
                    update,
                    optional=optional,
                )
                self.progress.step(what)
                if reply.status != 200:
                    if optional and reply.status == 404:
                        log.info("%s: not available at PCS (optional)", what)
                        continue
                    raise _pcs_failure(what, reply)
                chain = reply.header(ENCLAVE_IDENTITY_CHAIN)
                if not chain:
                    raise AdminError(f"{what}: PCS sent no {ENCLAVE_IDENTITY_CHAIN} header")
                self._verify(
                    what,
                    lambda: self.integrity.check_signed_json(reply.body, "enclaveIdentity", chain),
                )
                suffix = "_early" if update == "early" else ""
                self.collaterals[f"{kind}identity{suffix}"] = reply.body.decode("utf-8")
                if kind == "qe" or not self.identity_chain:  # Intel: the QE answer's chain
                    self.identity_chain = chain

    def output(self, platforms: list) -> dict:
        """The upload body, keys in the order of Intel's own file."""
        pck_chains = dict(self.crl_chains)  # a CA with no platform still gets its chain
        pck_chains.update(self.pck_chains)
        certificates: dict = {PCK_CERT_CHAIN: {ca: pck_chains[ca] for ca in sorted(pck_chains)}}
        if self.tcb_chain:
            certificates[self.tcb_chain_name] = self.tcb_chain
        if self.identity_chain:
            certificates[ENCLAVE_IDENTITY_CHAIN] = self.identity_chain
        collaterals = dict(self.collaterals)
        collaterals["certificates"] = certificates
        collaterals["rootcacrl_cdp"], collaterals["rootcacrl"] = self.root_crl
        return {"platforms": platforms, "collaterals": collaterals}


# ---------------------------------------------------------------------------------------------
# import / export: a dcapd cache directory <-> an upload file
# ---------------------------------------------------------------------------------------------


def open_services(cache_dir: str, trusted_roots: str | None, config_file: str | None):
    """dcapd's collaborators for a cache directory, as the server builds them, with an
    Upstream that is never used (OFFLINE)."""
    try:
        config = load_config(
            {"cache_dir": cache_dir, "cache_mode": "OFFLINE", "trusted_roots": trusted_roots},
            ini_path=config_file,
        )
    except ConfigError as exc:
        raise AdminError(str(exc)) from None
    store = Store(config.cache_dir)
    try:
        return build_services(config, store)
    except OSError as exc:
        store.close()
        raise AdminError(f"cannot read the trusted roots: {exc}") from None


def _upload_version(body: dict, where: str) -> int:
    collaterals = body.get("collaterals") if isinstance(body, dict) else None
    if not isinstance(collaterals, dict):
        raise AdminError(f"{where}: not an upload file (no collaterals object)")
    version = collaterals.get("version", 3)  # Intel's v3 format has no version key
    if version not in (3, 4):
        raise AdminError(f"{where}: collaterals.version {version!r} is not 3 or 4")
    return version


def import_upload(services, body: dict, path: str) -> dict:
    """Apply an upload file (and dcapd's extension keys) to the cache, all or nothing."""
    from .collateral import CT_CRL, BadUpstreamData, crl_meta
    from .errors import PccsError
    from .integrity import IntegrityError
    from .store import Entry

    store = services.store
    parts = [(_upload_version(body, path), body, path)]
    extra = body.get("dcapd_extra_uploads") or []
    if not isinstance(extra, list):
        raise AdminError(f"{path}: dcapd_extra_uploads is not a list")
    for index, part in enumerate(extra):
        where = f"{path}: dcapd_extra_uploads[{index}]"
        parts.append((_upload_version(part, where), part, where))
    crls = body.get("dcapd_crls") or {}
    entries = body.get("dcapd_entries") or []
    if not isinstance(crls, dict) or not isinstance(entries, list):
        raise AdminError(f"{path}: dcapd_crls is not an object or dcapd_entries not a list")
    counts = {"uploads": len(parts), "crls": 0, "entries": 0}
    with store.transaction():  # every part, or (on any error) nothing
        for version, part, where in parts:
            try:
                services.upload.apply(version, part)
            except PccsError as exc:
                raise AdminError(f"{where}: refused ({exc.status_code}): {exc.reason}") from None
        # (the upload code has checked these)
        known_chains = [
            chain
            for _, part, _ in parts
            for chain in part["collaterals"]["certificates"][PCK_CERT_CHAIN].values()
            if chain
        ]
        for uri, hex_der in crls.items():
            try:
                der = bytes.fromhex(hex_der)
                services.integrity.check_crl_any_known_issuer(der, known_chains)
                meta = dict(crl_meta(der), source="import")
            except (ValueError, TypeError, IntegrityError, BadUpstreamData) as exc:
                raise AdminError(
                    f"{path}: dcapd_crls[{uri!r}]: not a CRL Intel signed ({exc})"
                ) from None
            store.put(store.crl_key(uri), Entry(der, {}, CT_CRL, meta))
            counts["crls"] += 1
        for index, item in enumerate(entries):
            try:
                key = item["key"]
                kind = store.parse_key(key)[0]
                if kind not in RAW_KINDS:
                    raise ValueError(f"entries of kind {kind!r} cannot be imported")
                entry = Entry(
                    base64.b64decode(item["body"]),
                    dict(item.get("headers") or {}),
                    str(item.get("content_type") or ""),
                    dict(item.get("meta") or {}),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise AdminError(f"{path}: dcapd_entries[{index}]: {exc}") from None
            store.put(key, entry)
            counts["entries"] += 1
    return counts


@dataclass(eq=False)
class _Part:
    """One upload body of an export: a version and one chain per slot, all with one root."""

    version: int
    slots: dict = field(default_factory=dict)
    root: str | None = None
    tcbinfos: dict = field(default_factory=dict)
    identities: dict = field(default_factory=dict)
    pckcacrl: dict = field(default_factory=dict)
    pck_certs: list = field(default_factory=list)
    platforms: list = field(default_factory=list)
    rootcacrl: tuple[str, str] | None = None

    def accepts(self, version: int, slot, chain: str, root: str) -> bool:
        return (
            version == self.version
            and self.slots.get(slot, chain) == chain
            and self.root in (None, root)
        )

    def body(self) -> dict:
        collaterals: dict = {
            "version": self.version,
            "pck_certs": self.pck_certs,
            "tcbinfos": [
                dict(fmspc=fmspc.lower(), **docs) for fmspc, docs in self.tcbinfos.items()
            ],
        }
        if self.pckcacrl:
            collaterals["pckcacrl"] = self.pckcacrl
        for kind in IDENTITY_KINDS:
            for suffix in ("", "_early"):
                if f"{kind}identity{suffix}" in self.identities:
                    collaterals[f"{kind}identity{suffix}"] = self.identities[
                        f"{kind}identity{suffix}"
                    ]
        tcb_name = tcb_info_chain_header(self.version)
        certificates: dict = {
            PCK_CERT_CHAIN: {
                ca: self.slots[("pck", ca)]
                for ca in ("PLATFORM", "PROCESSOR")
                if ("pck", ca) in self.slots
            }
        }
        if ("tcb",) in self.slots:
            certificates[tcb_name] = self.slots[("tcb",)]
        if ("identity",) in self.slots:
            certificates[ENCLAVE_IDENTITY_CHAIN] = self.slots[("identity",)]
        collaterals["certificates"] = certificates
        if self.rootcacrl:
            cdp, hex_der = self.rootcacrl
            if cdp:
                collaterals["rootcacrl_cdp"] = cdp
            collaterals["rootcacrl"] = hex_der
        return {"platforms": self.platforms, "collaterals": collaterals}


class Exporter:
    """A cache directory as upload bodies: the first (v4) one in Intel's format, further ones
    only where one body cannot hold everything (another API version, another issuer chain
    for the same slot, another root: the server checks one root per upload)."""

    def __init__(self, store, preferred_cdp: str):
        self.store = store
        self.preferred_cdp = preferred_cdp
        self.parts = [_Part(4)]
        self.tcb_parts: dict[str, int] = {}  # FMSPC -> last part holding its SGX TCB info
        self.warnings: list[str] = []

    def place(self, version: int, needs: dict, min_index: int = 0) -> _Part:
        roots = set()
        for slot, chain in needs.items():
            try:
                roots.add(urllib.parse.unquote(chain_halves(chain)[1]))
            except ValueError as exc:
                raise AdminError(f"cache entry with a bad {slot[0]} chain: {exc}") from None
        root = roots.pop() if len(roots) == 1 else None
        for index, part in enumerate(self.parts):
            if (
                index >= min_index
                and root is not None
                and all(part.accepts(version, slot, chain, root) for slot, chain in needs.items())
            ):
                break
        else:
            part = _Part(version)
            self.parts.append(part)
        part.slots.update(needs)
        part.root = part.root or root
        return part

    def _chain(self, key: str, entry, *names: str) -> str | None:
        chain = next((entry.headers[n] for n in names if entry.headers.get(n)), None)
        try:
            chain_halves(chain)
        except ValueError:
            self.warnings.append(f"{key}: not exported (no usable issuer chain)")
            return None
        return chain

    def run(self) -> dict:
        store = self.store
        by_kind: dict[str, list] = {}
        for key in store.keys():
            kind, fields = store.parse_key(key)
            by_kind.setdefault(kind, []).append((key, fields))
        for kind, count in (("pckcrl", 1), ("identity", 3), ("tcb", 4)):
            for key, fields in list(by_kind.get(kind, [])):
                if len(fields) != count:
                    self.warnings.append(f"{key}: not exported (unknown key form)")
                    by_kind[kind].remove((key, fields))
        for key, fields in by_kind.pop("pckcrl", []):
            entry = store.get(key)
            name = {("PROCESSOR",): "processorCrl", ("PLATFORM",): "platformCrl"}.get(fields)
            chain = self._chain(key, entry, PCK_CRL_CHAIN)
            if name and chain:
                self.place(4, {("pck", fields[0]): chain}).pckcacrl[name] = entry.body.hex()
        for key, (kind, version, update) in by_kind.pop("identity", []):
            version = int(version)
            if kind not in IDENTITY_KINDS or (kind == "tdqe" and version != 4):
                self.warnings.append(f"{key}: not exported (no such identity in the format)")
                continue
            entry = store.get(key)
            chain = self._chain(key, entry, ENCLAVE_IDENTITY_CHAIN)
            if chain:
                suffix = "_early" if update == "EARLY" else ""
                self.place(version, {("identity",): chain}).identities[
                    f"{kind}identity{suffix}"
                ] = entry.body.decode("utf-8")
        for key, (tee, version, fmspc, update) in by_kind.pop("tcb", []):
            version = int(version)
            if tee == "tdx" and version != 4:
                self.warnings.append(f"{key}: not exported (TDX TCB info under v{version})")
                continue
            entry = store.get(key)
            chain = self._chain(key, entry, TCB_INFO_CHAIN_V4, TCB_INFO_CHAIN_V3)
            if not chain:
                continue
            part = self.place(version, {("tcb",): chain})
            suffix = "_early" if update == "EARLY" else ""
            name = f"{tee}_tcbinfo{suffix}" if version == 4 else f"tcbinfo{suffix}"
            part.tcbinfos.setdefault(fmspc.upper(), {}).update(tcb_info_fields(name, entry.body))
            if tee == "sgx":
                self.tcb_parts[fmspc.upper()] = max(
                    self.tcb_parts.get(fmspc.upper(), 0), self.parts.index(part)
                )
        self._platforms([key for key, _ in by_kind.pop("platform", [])])
        self._crls(by_kind.pop("rootcacrl", []), by_kind.pop("crl", []))
        body = self.parts[0].body()
        extra = [part.body() for part in self.parts[1:]]
        if extra:
            body["dcapd_extra_uploads"] = extra
        raw = []
        for kind in RAW_KINDS:
            for key, _ in by_kind.pop(kind, []):
                entry = store.get(key)
                raw.append(
                    {
                        "key": key,
                        "body": base64.b64encode(entry.body).decode(),
                        "headers": entry.headers,
                        "content_type": entry.content_type,
                        "meta": entry.meta,
                    }
                )
        if self.crls:
            body["dcapd_crls"] = self.crls
        if raw:
            body["dcapd_entries"] = raw
        for kind, keys in sorted(by_kind.items()):
            if kind not in SKIPPED_KINDS:
                self.warnings.append(f"{len(keys)} cache entries of kind {kind!r} not exported")
        return body

    def _platforms(self, keys: list[str]) -> None:
        store = self.store
        for key in keys:
            qeid, pceid = store.platform_id_from_key(key)
            platform = store.get_json(key)
            cert_set = store.get_json(store.certs_key(qeid, pceid))
            raw_tcbs = store.get_json(store.rawtcbs_key(qeid, pceid)) or []
            fmspc = (platform or {}).get("fmspc", "").upper()
            if not cert_set or not cert_set.get("certs"):
                self.warnings.append(f"platform {qeid}/{pceid}: no certificates; not exported")
                continue
            if fmspc not in self.tcb_parts:
                self.warnings.append(
                    f"platform {qeid}/{pceid}: no SGX TCB info for FMSPC "
                    f"{fmspc} in the cache; not exported"
                )
                continue
            # After (or with) its FMSPC's TCB info: the server selects with it on import.
            part = self.place(
                4,
                {("pck", platform["ca"].upper()): cert_set["chain"]},
                min_index=self.tcb_parts[fmspc],
            )
            row = {
                "qe_id": qeid,
                "pce_id": pceid,
                "enc_ppid": platform.get("enc_ppid", ""),
                "platform_manifest": platform.get("platform_manifest", ""),
            }
            part.pck_certs.append(dict(row, certs=upload_certs(cert_set["certs"])))
            for cpu_svn, pce_svn in raw_tcbs:
                part.platforms.append(
                    {
                        "qe_id": qeid,
                        "pce_id": pceid,
                        "cpu_svn": cpu_svn,
                        "pce_svn": pce_svn,
                        "enc_ppid": row["enc_ppid"],
                        "platform_manifest": row["platform_manifest"],
                    }
                )

    def _crls(self, root_keys: list, crl_keys: list) -> None:
        store = self.store
        crls = {fields[0]: store.get(key).body for key, fields in crl_keys}
        self.crls: dict[str, str] = {}
        if root_keys:
            der = store.get(root_keys[0][0]).body
            same = [uri for uri, body in crls.items() if body == der]
            cdp = self.preferred_cdp if self.preferred_cdp in same else (same or [""])[0]
            self.parts[0].rootcacrl = (cdp, der.hex())
            crls.pop(cdp, None)
        self.crls = {uri: body.hex() for uri, body in crls.items()}


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------


def cmd_get(args) -> int:
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
    print(f"{args.output}: {len(rows)} platform{'s' * (len(rows) != 1)}")
    return 0


def cmd_collect(args) -> int:
    files = args.files or sorted(
        os.path.join(args.directory, name)
        for name in os.listdir(args.directory)
        if name.lower().endswith(".csv") and os.path.isfile(os.path.join(args.directory, name))
    )
    if not files:
        raise AdminError(f"no .csv files in {args.directory}")
    platforms = collect_csv(files)
    write_atomic(args.output, json.dumps(platforms).encode())
    print(f"{args.output}: {len(platforms)} platforms from {len(files)} CSV files")
    return 0


def _api_key_getter(config) -> Callable[[], str]:
    """The configured key (--api-key or its variable), else a prompt when first needed."""
    cached: list[str] = [config.api_key] if config.api_key else []

    def get() -> str:
        if not cached:
            if not sys.stdin.isatty():
                raise AdminError(f"no Intel PCS API key: give --api-key or set {ENV['api_key']}")
            cached.append(getpass.getpass("Intel PCS API key: "))
        return cached[0]

    return get


def cmd_fetch(args, sleep: Callable[[float], None]) -> int:
    from .integrity import Integrity

    crl_only = args.crl_only and args.input is None
    if args.crl_only and not crl_only:
        log.warning("--crl-only ignored: an input file was given (as Intel's tool does)")
    input_file = args.input or "platform_list.json"
    platforms = None if crl_only else load_platform_list(input_file)
    try:
        integrity = Integrity.from_file(args.trusted_roots or "")
    except (OSError, ValueError) as exc:
        raise AdminError(f"--trusted-roots: {exc}") from None
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
    try:
        result = Fetcher(pcs, integrity, args.tcb_update_type, args.platform, progress).run(
            platforms
        )
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
        f"{args.output}: {len(collaterals['pck_certs'])} platforms, "
        f"{len(collaterals['tcbinfos'])} FMSPCs ({pcs.calls} PCS requests"
        + (f", {journal.resumed} answers resumed" if journal.resumed else "")
        + ")"
    )
    if result.not_available:
        path = args.not_available or os.path.join(
            os.path.dirname(args.output), "not_available.json"
        )
        write_atomic(path, json.dumps(result.not_available).encode())
        print(f"{path}: {len(result.not_available)} TCBs whose certificate is 'Not available'")
    return 0


def cmd_put(args) -> int:
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
    version = _upload_version(body, path)
    reply = pccs.request(
        "PUT",
        pccs.url("platformcollateral", version),
        data=text.encode(),
        headers={"Content-Type": "application/json"},
    )
    print(f"{path}: uploaded to {pccs.url('platformcollateral', version)} ({reply.text.strip()})")
    for index, part in enumerate(body.get("dcapd_extra_uploads") or []):
        part_version = _upload_version(part, f"{path}: dcapd_extra_uploads[{index}]")
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


def cmd_refresh(args) -> int:
    pccs = Pccs(args)
    params = {}
    if args.certs or args.fmspc is not None:
        params["type"] = "certs"
        if args.fmspc is not None:
            params["fmspc"] = "" if args.fmspc == "all" else args.fmspc
    pccs.request("POST", pccs.url("refresh"), params=params or None)
    print("certificates refreshed" if params else "collateral refreshed")
    return 0


def cache_dir(args) -> str:
    """-C, else the variable, else dcapd's per-user cache folder (the setting's resolution)."""
    return dcapd_config({"cache_dir": ("-C/--cache-dir", args.cache_dir)}).cache_dir


def cmd_import(args) -> int:
    body = read_json(args.input)
    if not isinstance(body, dict):
        raise AdminError(f"{args.input}: not an upload file (not a JSON object)")
    directory = cache_dir(args)
    services = open_services(directory, args.trusted_roots, args.config)
    try:
        counts = import_upload(services, body, args.input)
    finally:
        services.store.close()
        services.upstream.close()
    print(
        f"{args.input}: imported into {directory} ({counts['uploads']} upload bodies, "
        f"{counts['crls']} CRLs, {counts['entries']} other entries)"
    )
    return 0


def cmd_export(args) -> int:
    from .store import Store

    directory = cache_dir(args)
    if not os.path.isfile(os.path.join(directory, "cache.db")):
        raise AdminError(f"{directory} is not a dcapd cache directory (no cache.db)")
    check_writable(args.output)
    store = Store(directory)
    try:
        exporter = Exporter(store, INTEL_ROOTCA_CRL_URL)
        body = exporter.run()
    finally:
        store.close()
    for warning in exporter.warnings:
        log.warning("%s", warning)
    write_atomic(args.output, json.dumps(body).encode())
    collaterals = body["collaterals"]
    print(
        f"{args.output}: {len(collaterals['pck_certs'])} platforms, "
        f"{len(collaterals['tcbinfos'])} FMSPCs"
        + (
            f", {len(body['dcapd_extra_uploads'])} extra upload bodies"
            if body.get("dcapd_extra_uploads")
            else ""
        )
    )
    return 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

DESCRIPTION = """\
The air-gapped operator's tool for dcapd (and Intel's PCCS): its files are interchangeable
with Intel's PccsAdminTool.

Air-gapped workflow:
  1. platforms register with the offline PCCS (REQ or OFFLINE mode)
  2. dcapd-admin get -u https://pccs:8081 -o platform_list.json   (offline side)
  3. dcapd-admin fetch -i platform_list.json -o platform_collaterals.json   (connected side)
  4. dcapd-admin put -u https://pccs:8081 -i platform_collaterals.json     (offline side)
     or, with no server running: dcapd-admin import -i platform_collaterals.json --cache-dir DIR

The admin token comes from --token, the DCAPD_ADMIN_TOKEN variable or a prompt; the Intel PCS
API key from --api-key, the {api_key} variable or a prompt.
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

    local = argparse.ArgumentParser(add_help=False)
    group = local.add_argument_group("cache directory")
    group.add_argument(
        "-C",
        "--cache-dir",
        help=f"dcapd's cache directory (default: ${ENV['cache_dir']}, else the "
        "per-user cache folder dcapd uses)",
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
    return parser


def _logging(verbose: bool) -> Callable[[], None]:
    """Log lines of this run on stderr (records of the thread running the command only, so a
    server in the same process keeps its own logging); returns the function that undoes it.
    dcapd.upstream's lines are left out: they are the server's log of PCS calls, and ``fetch``
    reports each PCS answer itself, naming the item."""
    import threading

    logger = logging.getLogger("dcapd")
    thread = threading.get_ident()
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    handler.addFilter(
        lambda record: record.thread == thread and not record.name.startswith("dcapd.upstream")
    )
    saved_level = logger.level
    logger.addHandler(handler)
    if verbose and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)

    return restore


def main(argv: Sequence[str] | None = None, *, sleep: Callable[[float], None] = time.sleep) -> int:
    """``dcapd-admin``; ``sleep`` is what retries wait with (tests pass a recorder)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    restore = _logging(args.verbose)
    try:
        handlers = {
            "get": cmd_get,
            "collect": cmd_collect,
            "put": cmd_put,
            "refresh": cmd_refresh,
            "import": cmd_import,
            "export": cmd_export,
        }
        if args.command == "fetch":
            return cmd_fetch(args, sleep)
        return handlers[args.command](args)
    except AdminError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        restore()


if __name__ == "__main__":
    raise SystemExit(main())
