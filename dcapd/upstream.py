"""The only module that talks to Intel PCS (or to another PCCS acting as upstream).

One requests.Session; the API key only where Intel needs it; no redirects followed; retries
with backoff for network errors, 5xx and 429 (honouring Retry-After) inside one overall
deadline (the server's :class:`RetryPolicy`; ``dcapd-admin fetch`` passes a patient one).
Errors are returned or raised, never cached (the caller decides what to store).

Bodies are streamed and bounded: at most ``upstream_max_body_bytes`` after decompression
(gzip/deflate are inflated here, chunk by chunk, never past the limit), and the deadline holds
while the body is read (the clock is checked between reads; each read has a socket timeout of
what is left). Header values and URLs are escaped before they are logged.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import math
import mmap
import random
import re
import time
import urllib.parse
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import requests
import urllib3
from requests.structures import CaseInsensitiveDict

from . import __version__
from .config import Config
from .inline import may_wait
from .logs import escape
from .pcsurls import canonical_origin, is_allowed_crl_url

log = logging.getLogger("dcapd.upstream")

API_KEY_HEADER = "Ocp-Apim-Subscription-Key"
# Intel: the early-access portal needs the key on every call, not only on pckcerts.
_KEY_ON_EVERY_CALL = "https://validation.api.trustedservices.intel.com/"

ENCLAVE_IDENTITY_PATHS = {
    "qe": ("sgx", "qe/identity"),
    "qve": ("sgx", "qve/identity"),
    "tdqe": ("tdx", "qe/identity"),
    "qae": ("sgx", "qae/identity"),
}
# PCS retired API v3 on 2026-04-30: no v3 request ever leaves dcapd (pccs-1.27.md §1).
PCS_API_VERSION = 4


class UpstreamError(Exception):
    """Upstream unreachable, timed out, or answering something that is not a response."""

    def __init__(self, message: str, url: str = ""):
        super().__init__(message)
        self.url = url  # what was asked (no query), for a caller's own message


class _BodyRefused(Exception):
    """An answer whose body is not accepted: too large, past the deadline, or undecodable.
    ``retry`` says whether asking again could help (not for an oversized one)."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


_READ_SIZE = 64 * 1024  # raw bytes asked of the socket per read (one recv at most)
_PIECE = 256 * 1024  # decoded bytes made at a time from compressed input
# What ``_Inflater`` decodes; we ask for nothing else (br/zstd would need more libraries).
_ACCEPT_ENCODING = "gzip, deflate"


class _Inflater:
    """Decodes a Content-Encoding (none, gzip or deflate) in pieces of at most
    ``_PIECE`` bytes, so a compressed bomb is inflated only as far as the caller reads."""

    def __init__(self, content_encoding: str):
        encoding = content_encoding.strip().lower()
        self.active = encoding not in ("", "identity")
        if self.active and encoding not in ("gzip", "x-gzip", "deflate"):
            raise _BodyRefused(f"unsupported Content-Encoding {escape(encoding[:40])!r}", False)
        # gzip or zlib header, detected (+32); a headerless deflate stream falls back below.
        self._raw_deflate_allowed = encoding == "deflate"
        self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)
        self._started = False

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """The decoded bytes of ``data``, piece by piece (truncated streams are accepted as
        far as they go, as urllib3 does)."""
        if not self.active:
            yield data
            return
        while data:
            try:
                out = self._decoder.decompress(data, _PIECE)
            except zlib.error:
                if self._started or not self._raw_deflate_allowed:
                    raise _BodyRefused("body does not decompress", True) from None
                self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                self._raw_deflate_allowed = False
                continue
            self._started = True
            yield out
            data = self._decoder.unconsumed_tail
            if not data and self._decoder.eof and self._decoder.unused_data:
                # A second gzip member (rare, allowed by RFC 1952): a new decoder.
                data = self._decoder.unused_data
                self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)


def _set_read_timeout(raw: Any, seconds: float) -> None:
    """Best effort: the socket under ``raw`` (a urllib3 response) waits at most ``seconds``
    for its next bytes, so one read cannot outlast the deadline."""
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.settimeout(max(seconds, 0.01))
        except OSError:
            pass


def read_body(raw: Any, headers: Mapping[str, str], limit: int, deadline: float) -> bytes:
    """The body of a streamed response, decoded; raises :class:`_BodyRefused` past ``limit``
    bytes (decoded) or past ``deadline`` (time.monotonic())."""
    inflater = _Inflater(headers.get("Content-Encoding") or "")
    length = (headers.get("Content-Length") or "").strip()
    if not inflater.active and length.isdigit() and int(length) > limit:
        raise _BodyRefused(f"body of {int(length)} bytes exceeds the limit ({limit})", False)
    read = getattr(raw, "read1", None) or raw.read
    # The body goes into an anonymous mapping of ``limit`` bytes (only what is written takes
    # memory), unmapped when done: memory a refused body took goes back to the system at once,
    # instead of staying in a worker thread's malloc arena and adding up across threads.
    buffer = mmap.mmap(-1, limit)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _BodyRefused(f"deadline passed after {buffer.tell()} bytes of body", True)
            _set_read_timeout(raw, remaining)
            try:
                data = read(_READ_SIZE, decode_content=False)
            except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
                raise _BodyRefused(f"body: {type(exc).__name__}", True) from None
            if not data:
                return buffer[: buffer.tell()]
            for piece in inflater.pieces(data):
                if buffer.tell() + len(piece) > limit:
                    raise _BodyRefused(f"body exceeds the limit ({limit} bytes)", False)
                buffer.write(piece)
    finally:
        buffer.close()


@dataclass
class UpstreamResponse:
    status: int
    headers: CaseInsensitiveDict[str]
    body: bytes
    url: str

    @property
    def ok(self) -> bool:
        return self.status == 200


def _update_or_number(update: str, number: int | None) -> dict[str, str]:
    return (
        {"tcbEvaluationDataNumber": str(number)}
        if number is not None
        else {"update": update.lower()}
    )


def is_retryable(status: int) -> bool:
    """An answer worth asking again for: 429 (throttled) or a 5xx."""
    return status == 429 or status >= 500


@dataclass(frozen=True)
class RetryPolicy:
    """How :class:`Upstream` waits between attempts. The defaults are the server's: jittered
    exponential backoff from 0.25 s up to 8 s, Retry-After (seconds or a date) honoured, and
    ``upstream_timeout`` one deadline for all attempts together. ``dcapd-admin fetch``, a
    patient batch job, waits without jitter for up to minutes and times each attempt alone."""

    first_delay: float = 0.25
    max_delay: float = 8.0
    jitter: bool = True
    timeout_per_attempt: bool = False  # upstream_timeout bounds each attempt, not all of them
    sleep: Callable[[float], None] | None = None  # default time.sleep
    # Told before each wait: (the 429/5xx reply or None, the network error or None, delay).
    on_retry: Callable[[requests.Response | None, Exception | None, float], None] | None = None

    def delay(self, attempt: int, reply: requests.Response | None) -> float:
        """Seconds to wait before retry ``attempt + 1``: Retry-After when upstream gives one,
        else exponential backoff."""
        retry_after = (reply.headers.get("Retry-After") or "").strip() if reply is not None else ""
        if retry_after.isdigit():
            return float(retry_after)
        if retry_after:  # the other form RFC 9110 allows: an HTTP date
            try:
                return max(
                    0.0, email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
                )
            except (TypeError, ValueError, IndexError):
                pass
        delay: float = min(self.max_delay, self.first_delay * 2**attempt)
        return delay * (0.5 + random.random() / 2) if self.jitter else delay


class Upstream:
    """Intel PCS client. ``pcs_url`` names the default; each call says which API version.

    ``api_key`` (default: the configured one) is asked only when a request needs the key;
    ``retry`` says how to wait between attempts (default: the server's policy)."""

    def __init__(
        self,
        config: Config,
        session: requests.Session | None = None,
        *,
        api_key: Callable[[], str] | None = None,
        retry: RetryPolicy | None = None,
    ):
        self.config = config
        self._api_key = api_key or (lambda: self.config.api_key)
        self.retry = retry or RetryPolicy()
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = f"dcapd/{__version__}"
        self.session.headers["Accept-Encoding"] = _ACCEPT_ENCODING
        if config.proxy:
            self.session.proxies = {"http": config.proxy, "https": config.proxy}
        match = re.match(r"^(.*?/)sgx/certification/v([34])/$", config.pcs_url)
        assert match is not None, config.pcs_url  # load_config checked pcs_url
        self._pcs_root = match.group(1)  # e.g. https://api.trustedservices.intel.com/
        self.version = int(match.group(2))  # the API version pcs_url names
        # For /readyz: when upstream last answered, and when it last failed (wall clock).
        self.last_success: float | None = None
        self.last_failure: float | None = None

    def close(self) -> None:
        self.session.close()

    # --- PCS endpoints (Appendix A)

    def endpoint_url(self, tee: str, version: int, endpoint: str) -> str:
        """The PCS URL for an endpoint at the request's API version (the version in pcs_url
        is replaced, as Intel's PCCS does for v3 rows on a v4 server). PCS API v3 is gone:
        asking for it is an error, never a request."""
        if version != PCS_API_VERSION:
            raise UpstreamError(f"PCS API v{version} is not available (only v{PCS_API_VERSION})")
        return f"{self._pcs_root}{tee}/certification/v{version}/{endpoint}"

    def get_pck_crl(self, version: int, ca: str) -> UpstreamResponse:
        return self._get(
            self.endpoint_url("sgx", version, "pckcrl"), {"ca": ca.lower(), "encoding": "der"}
        )

    def get_tcb_info(
        self, tee: str, version: int, fmspc: str, update: str, number: int | None = None
    ) -> UpstreamResponse:
        """``number``: pinned to that TCB evaluation data number (then no ``update``: PCS
        refuses both)."""
        return self._get(
            self.endpoint_url(tee, version, "tcb"),
            {"fmspc": fmspc.upper(), **_update_or_number(update, number)},
        )

    def get_enclave_identity(
        self, kind: str, version: int, update: str, number: int | None = None
    ) -> UpstreamResponse:
        tee, path = ENCLAVE_IDENTITY_PATHS[kind]
        return self._get(self.endpoint_url(tee, version, path), _update_or_number(update, number))

    def get_tcb_evaluation_data_numbers(self, tee: str) -> UpstreamResponse:
        return self._get(self.endpoint_url(tee, PCS_API_VERSION, "tcbevaluationdatanumbers"), {})

    def get_fmspcs(self, version: int, platform: str) -> UpstreamResponse:
        return self._get(self.endpoint_url("sgx", version, "fmspcs"), {"platform": platform})

    def get_pck_certs(self, version: int, encrypted_ppid: str, pceid: str) -> UpstreamResponse:
        return self._get(
            self.endpoint_url("sgx", version, "pckcerts"),
            {"encrypted_ppid": encrypted_ppid, "pceid": pceid},
            api_key=True,
        )

    def post_pck_certs(self, version: int, platform_manifest: str, pceid: str) -> UpstreamResponse:
        return self._request(
            "POST",
            self.endpoint_url("sgx", version, "pckcerts"),
            None,
            api_key=True,
            json_body={"platformManifest": platform_manifest, "pceid": pceid},
        )

    def get_crl(self, uri: str) -> UpstreamResponse:
        """Download a CRL from an allow-listed Intel URL (through url_map, if it names one)."""
        if not is_allowed_crl_url(uri):
            raise UpstreamError("refusing to fetch a URL outside Intel's CRL allow-list")
        return self._request("GET", self.mapped_url(uri), None)

    def get_root_ca_crl(self) -> UpstreamResponse:
        return self.get_url(self.config.rootca_crl_url)

    def get_url(self, url: str) -> UpstreamResponse:
        """GET a URL from trusted data (the configured root CA CRL URL, the CRL distribution
        point of a verified certificate), through url_map; no allow-list check."""
        return self._request("GET", self.mapped_url(url), None)

    def mapped_url(self, url: str) -> str:
        """Rewrite an Intel origin to its configured mirror (``url_map``)."""
        parts = urllib.parse.urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        mirror = self.config.url_map.get(canonical_origin(origin))
        return mirror + url[len(origin) :] if mirror else url

    # --- transport

    def _get(self, url: str, params: Mapping[str, str], api_key: bool = False) -> UpstreamResponse:
        return self._request("GET", url, params, api_key=api_key)

    def _request(
        self,
        method: str,
        url: str,
        params: Mapping[str, str] | None,
        api_key: bool = False,
        json_body: Any = None,
    ) -> UpstreamResponse:
        may_wait("a call to PCS")
        headers = {}
        if api_key or url.startswith(_KEY_ON_EVERY_CALL):
            headers[API_KEY_HEADER] = self._api_key()
        per_attempt = self.retry.timeout_per_attempt
        deadline = math.inf if per_attempt else time.monotonic() + self.config.upstream_timeout
        attempts = 1 + self.config.upstream_retries
        shown = url  # never log query values: they may hold an encrypted PPID
        for attempt in range(attempts):
            started = time.monotonic()
            remaining = deadline - started
            if remaining <= 0:
                raise UpstreamError(f"{method} {shown}: deadline passed", url)
            body_deadline = started + self.config.upstream_timeout if per_attempt else deadline
            reply: requests.Response | None = None
            failure: str | None = None
            error: Exception | None = None
            try:
                reply = self.session.request(
                    method,
                    url,
                    params=params,
                    headers=headers,
                    json=json_body,
                    timeout=self.config.upstream_timeout
                    if per_attempt
                    else (min(5.0, remaining), remaining),
                    allow_redirects=False,
                    stream=True,
                )
                body = read_body(
                    reply.raw, reply.headers, self.config.upstream_max_body_bytes, body_deadline
                )
                reply._content = body  # for anyone reading reply.content (on_retry)
            except requests.RequestException as exc:
                failure, error, reply = type(exc).__name__, exc, None
            except _BodyRefused as exc:
                assert reply is not None
                self._log_reply(method, shown, reply)
                reply.close()  # the rest of the body is never read: drop the connection
                failure, error, reply = str(exc), exc, None
                if not exc.retry:  # an oversized answer would be oversized again
                    self.last_failure = time.time()
                    raise UpstreamError(f"{method} {shown}: {exc}", url) from None
            if reply is not None:
                self._log_reply(method, shown, reply)
                if not is_retryable(reply.status_code):
                    self.last_success = time.time()
                    return UpstreamResponse(reply.status_code, reply.headers, body, url)
            if attempt + 1 == attempts:
                break
            delay = self.retry.delay(attempt, reply)
            if time.monotonic() + delay >= deadline:
                break
            log.info(
                "upstream %s %s failed (%s); retrying in %.2fs",
                method,
                escape(shown),
                failure if reply is None else reply.status_code,
                delay,
            )
            if self.retry.on_retry is not None:
                self.retry.on_retry(reply, error, delay)
            (self.retry.sleep or time.sleep)(delay)
        self.last_failure = time.time()
        if reply is None:
            raise UpstreamError(f"{method} {shown}: {failure}", url) from error
        # Persistent 5xx/429: answered, but not with the collateral (the caller maps it).
        return UpstreamResponse(reply.status_code, reply.headers, body, url)

    @staticmethod
    def _log_reply(method: str, url: str, reply: requests.Response) -> None:
        headers = reply.headers
        if reply.status_code == 200 and "Warning" not in headers:
            log.debug(
                "upstream %s %s -> 200 (Request-ID %s)",
                method,
                escape(url),
                escape(headers.get("Request-ID", "-")),
            )
            return
        log.warning(
            "upstream %s %s -> %s (Request-ID %s, Error-Code %s, Error-Message %s%s)",
            method,
            escape(url),
            reply.status_code,
            escape(headers.get("Request-ID", "-")),
            escape(headers.get("Error-Code", "-")),
            escape(headers.get("Error-Message", "-")),
            f", Warning {escape(headers['Warning'])}" if "Warning" in headers else "",
        )
