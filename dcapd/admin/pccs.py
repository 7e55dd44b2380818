"""Talking to a PCCS (``get``, ``put``, ``refresh``): its URL forms, the admin token, TLS
options, and one-line errors."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import re
import sys
from typing import Any

import requests
import urllib3

from ..auth import ADMIN_TOKEN_HEADER
from ..middleware import REQUEST_ID_HEADER
from .common import USER_AGENT, AdminError, SettingError, reason

log = logging.getLogger("dcapd.admin")

DEFAULT_PCCS_URL = "https://localhost:8081/sgx/certification/v4/"
ADMIN_TOKEN_ENV = "DCAPD_ADMIN_TOKEN"


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
        self.verify: bool | str = True
        if args.ca_file:
            if not os.access(args.ca_file, os.R_OK) or os.path.isdir(args.ca_file):
                raise SettingError(f"--ca-file {args.ca_file}: not a readable file")
            self.session.trust_env = False  # neither REQUESTS_CA_BUNDLE nor proxies apply
            self.verify = args.ca_file
        elif args.insecure:
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
                raise SettingError(f"no admin token: give --token or set {ADMIN_TOKEN_ENV}")
            self._token = getpass.getpass(f"Admin token for {self.root}: ")
        return self._token

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
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
                f"TLS connection to {url} failed ({reason(exc)}): give the "
                "server's CA certificate with --ca-file, or use --insecure"
            ) from None
        except requests.exceptions.Timeout:
            raise AdminError(f"no answer from {url} within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise AdminError(f"cannot connect to {url}: {reason(exc)}") from None
        request_id = reply.headers.get(REQUEST_ID_HEADER)
        # The reason is in the server's log, under this Request-ID.
        logged = f" ({REQUEST_ID_HEADER} {request_id[:64]})" if request_id else ""
        if reply.status_code == 401:
            raise AdminError(
                f"the PCCS at {url} refused the admin token (401 {reply.text.strip()[:80]}){logged}"
            )
        if reply.status_code != 200:
            raise AdminError(
                f"{method} {url}: the PCCS answered {reply.status_code} "
                f"{reply.text.strip()[:200]}{logged}"
            )
        return reply
