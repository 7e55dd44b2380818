"""Intel PCS for ``fetch``: every answer worth keeping journalled as it arrives (so an
interrupted fetch resumes), the rest asked through dcapd's Upstream with a patient retry
policy. Answers are :class:`dcapd.upstream.UpstreamResponse`, whether kept or fresh."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import replace
from typing import Any, Callable

import requests
from requests.structures import CaseInsensitiveDict

from ..config import Config
from ..upstream import (
    PCS_API_VERSION,
    RetryPolicy,
    Upstream,
    UpstreamError,
    UpstreamResponse,
    is_retryable,
)
from .common import USER_AGENT, AdminError, reason

log = logging.getLogger("dcapd.admin")


def header(reply: UpstreamResponse, name: str) -> str:
    """The value of a response header, "" when absent."""
    return reply.headers.get(name) or ""


JOURNAL_FORMAT = 2  # its keys: sha256 of [Upstream method, arguments] (1: of the request)


class Journal:
    """Every PCS answer worth keeping, appended to ``<output>.partial`` as it arrives, so an
    interrupted fetch re-run with the same arguments asks PCS only for what it lacks."""

    def __init__(self, path: str, fingerprint: str, restart: bool):
        self.path = path
        self.replies: dict[str, UpstreamResponse] = {}
        kept = False
        if not restart and os.path.exists(path):
            kept = self._load(fingerprint)
        self.resumed = len(self.replies) if kept else 0
        if kept:  # (fetch announces it, with the platforms already done)
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
                self.replies[record["k"]] = UpstreamResponse(
                    record["s"],
                    CaseInsensitiveDict(record["h"]),
                    base64.b64decode(record["b"]),
                    record.get("u", ""),
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        return True

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def get(self, key: str) -> UpstreamResponse | None:
        return self.replies.get(key)

    def put(self, key: str, reply: UpstreamResponse) -> None:
        self.replies[key] = reply
        self._write(
            {
                "k": key,
                "s": reply.status,
                "h": dict(reply.headers),
                "b": base64.b64encode(reply.body).decode(),
                "u": reply.url,
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
        config: Config,
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
        # PCS API v3 is retired (2026-04-30): fetch always asks v4 and writes v4 files,
        # whatever version --url names (only its host and root are used).
        self.version = PCS_API_VERSION
        self.retries = config.upstream_retries
        self.journal = journal
        self.calls = 0  # requests actually sent (not answered from the journal)
        self._what = ""

    def call(
        self,
        what: str,
        request: Callable[..., UpstreamResponse],
        *args: Any,
        optional: bool = False,
    ) -> UpstreamResponse:
        """The answer to ``request(*args)``, a method of ``self.upstream``. 200s (and, for
        ``optional`` items, 404s) are kept in the journal; a required item is never
        remembered as missing."""
        key = self._key(request, args)
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
                f"{reason(exc.__cause__ or exc)} (after {self.retries} retries)"
            ) from None
        if is_retryable(answer.status):
            raise AdminError(
                f"{what}: PCS answered {answer.status} for "
                f"{answer.url.split('?')[0]} (after {self.retries} retries)"
            )
        if answer.status == 200 or (answer.status == 404 and optional):
            self.journal.put(key, answer)
        return answer

    @staticmethod
    def _key(request: Callable[..., UpstreamResponse], args: tuple) -> str:
        return hashlib.sha256(json.dumps([request.__name__, *args]).encode()).hexdigest()

    def kept(self, request: Callable[..., UpstreamResponse], *args: Any) -> bool:
        """Whether the journal holds the answer to ``request(*args)`` (a resumed item)."""
        return self.journal.get(self._key(request, args)) is not None

    def _retrying(
        self, response: requests.Response | None, error: Exception | None, delay: float
    ) -> None:
        self.calls += 1
        if error is not None or response is None:  # Upstream gives one of the two
            failure = reason(error) if error is not None else "no answer"
        else:
            failure = f"PCS answered {response.status_code}"
        log.warning("%s: %s; retrying in %g s", self._what, failure, delay)

    def close(self) -> None:
        self.upstream.close()


def pcs_failure(what: str, reply: UpstreamResponse) -> AdminError:
    detail = " ".join(
        f"{name} {header(reply, name)}"
        for name in ("Error-Code", "Error-Message")
        if header(reply, name)
    )
    if reply.status == 401:
        return AdminError(f"{what}: Intel PCS refused the API key (401)")
    return AdminError(f"{what}: PCS answered {reply.status}" + (f" ({detail})" if detail else ""))
