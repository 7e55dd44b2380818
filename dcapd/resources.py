"""Falcon resources, one per PCCS endpoint: parse the query, ask a service, respond."""

from __future__ import annotations

import datetime
import json
import time
from typing import Literal, overload

import falcon

from . import jsonlimits
from .auth import Auth
from .collateral import CT_CRL, CT_PEM, Collateral
from .errors import STATUS_TEXTS, PccsError
from .extra import EXTRA_IDENTITY_KINDS, ExtraCollateral
from .freshness import annotate
from .hexstr import is_hex
from .lifecycle import Lifecycle
from .pckcerts import PckCerts, RawTcb
from .pcsurls import is_allowed_crl_url
from .platforms import Registrations, validate_registration
from .policies import Policies
from .refresh import Refresher
from .store import Entry, Store
from .upload import CollateralUpload
from .upstream import Upstream

UPDATE_TYPES = ("STANDARD", "EARLY")


@overload
def query_value(req: falcon.Request, name: str, required: Literal[True] = True) -> str: ...
@overload
def query_value(req: falcon.Request, name: str, required: bool) -> str | None: ...
def query_value(req: falcon.Request, name: str, required: bool = True) -> str | None:
    value = req.get_param(name)
    if value is None and required:
        raise PccsError(400, f"missing query parameter {name}")
    return value


@overload
def hex_param(
    req: falcon.Request, name: str, length: int, required: Literal[True] = True
) -> str: ...
@overload
def hex_param(req: falcon.Request, name: str, length: int, required: bool) -> str | None: ...
def hex_param(req: falcon.Request, name: str, length: int, required: bool = True) -> str | None:
    """A hex query value of an exact length, upper-cased (Intel upper-cases query keys)."""
    value = query_value(req, name, required)
    if value is None:
        return None
    # Intel checks only the length; a non-hex value can only be a client bug, and must never
    # reach PCS or a cache key.
    if not is_hex(value, (length,)):
        raise PccsError(400, f"{name} must be {length} hex characters")
    return value.upper()


def qeid_param(req: falcon.Request) -> str:
    # QCNL sends 32 hex; the PCK ID tool in platform-id mode may send longer ids (<= 260).
    value = query_value(req, "qeid")
    if not is_hex(value, max_length=260):
        raise PccsError(400, "qeid must be 1..260 hex characters")
    return value.upper()


def evaluation_number_param(req: falcon.Request) -> int | None:
    """``tcbEvaluationDataNumber`` (pccs-1.27.md §3): a non-negative integer, and never
    together with ``update`` (PCS refuses both); None when absent."""
    value = query_value(req, "tcbEvaluationDataNumber", required=False)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 9):
        raise PccsError(400, "tcbEvaluationDataNumber must be a non-negative integer")
    if req.get_param("update") is not None:
        raise PccsError(400, "give update or tcbEvaluationDataNumber, not both")
    return int(value)


def update_param(req: falcon.Request) -> str:
    value = (query_value(req, "update", required=False) or "standard").upper()
    if value not in UPDATE_TYPES:
        # Intel: 400 intended; its identity controller crashes with 500 ([ref-bug]).
        raise PccsError(400, "update must be standard or early")
    return value


def respond(
    resp: falcon.Response, entry: Entry, body: bytes | None = None, content_type: str | None = None
) -> None:
    """Replay a stored entry: its bytes and headers, as stored."""
    resp.data = entry.body if body is None else body
    resp.content_type = content_type or entry.content_type
    resp.set_headers(entry.headers)  # set_header for each, in order, in one call


class PckCert:
    def __init__(self, pck_certs: PckCerts, version: int):
        self.pck_certs = pck_certs
        self.version = version

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        raw = RawTcb(
            qeid=qeid_param(req),
            pceid=hex_param(req, "pceid", 4),
            cpusvn=hex_param(req, "cpusvn", 32),
            pcesvn=hex_param(req, "pcesvn", 4),
        )
        # Intel: optional, but when present (even empty) it must be 768 characters.
        encrypted_ppid = hex_param(req, "encrypted_ppid", 768, required=False)
        respond(resp, self.pck_certs.pck_cert(self.version, raw, encrypted_ppid))


class PckCrl:
    def __init__(self, collateral: Collateral, version: int):
        self.collateral = collateral
        self.version = version

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ca = (query_value(req, "ca") or "").upper()
        if ca not in ("PROCESSOR", "PLATFORM"):
            raise PccsError(400, "ca must be processor or platform")
        # Intel: only encoding=der gives DER; anything else (even pem) gives lower-case hex.
        der = (req.get_param("encoding") or "").lower() == "der"
        entry = self.collateral.pck_crl(self.version, ca)
        if der:
            respond(resp, entry, content_type=CT_CRL)
        else:
            respond(resp, entry, entry.body.hex().encode(), CT_PEM)


class TcbInfo:
    def __init__(self, collateral: Collateral, extra: ExtraCollateral, tee: str, version: int):
        self.collateral = collateral
        self.extra = extra
        self.tee = tee
        self.version = version

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        fmspc = hex_param(req, "fmspc", 12)
        # v3 routes ignore the number, as Intel's PCCS does on every route.
        number = evaluation_number_param(req) if self.version == 4 else None
        if number is not None:
            respond(resp, self.extra.pinned_tcb_info(self.tee, fmspc, number))
            return
        update = update_param(req)
        respond(resp, self.collateral.tcb_info(self.tee, self.version, fmspc, update))


class EnclaveIdentity:
    def __init__(self, collateral: Collateral, extra: ExtraCollateral, kind: str, version: int):
        self.collateral = collateral
        self.extra = extra
        self.kind = kind
        self.version = version

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        number = evaluation_number_param(req) if self.version == 4 else None
        update = "STANDARD" if number is not None else update_param(req)
        if number is not None or self.kind in EXTRA_IDENTITY_KINDS:
            respond(resp, self.extra.identity(self.kind, number, update))
            return
        respond(resp, self.collateral.enclave_identity(self.kind, self.version, update))


class TcbEvaluationDataNumbers:
    def __init__(self, extra: ExtraCollateral, tee: str):
        self.extra = extra
        self.tee = tee

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        respond(resp, self.extra.evaluation_numbers(self.tee))


class RootCaCrl:
    def __init__(self, collateral: Collateral):
        self.collateral = collateral

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        entry = self.collateral.root_ca_crl()
        # Intel: hex of the DER, labelled application/pkix-crl "to keep backward compatibility".
        respond(resp, entry, entry.body.hex().encode(), CT_CRL)


class Crl:
    def __init__(self, collateral: Collateral):
        self.collateral = collateral

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        uri = query_value(req, "uri")
        if not is_allowed_crl_url(uri):
            raise PccsError(400, "uri is not one of Intel's CRL distribution points")
        respond(resp, self.collateral.crl(uri))


class AppraisalPolicy:
    def __init__(self, auth: Auth, policies: Policies, body_limit: int):
        self.auth = auth
        self.policies = policies
        self.body_limit = body_limit

    def on_put(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.auth.require_admin(req)
        policy_id = self.policies.put(json_body(req, self.body_limit))
        resp.content_type = "text/plain; charset=utf-8"
        resp.text = policy_id

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        respond(resp, self.policies.defaults_for(hex_param(req, "fmspc", 12)))


def json_body(req: falcon.Request, limit: int):
    """The request's JSON body; refused with 413 before reading when it is too large."""
    length = req.content_length
    if length is not None and length > limit:
        raise PccsError(413, f"body of {length} bytes exceeds max_body_bytes ({limit})")
    data = req.bounded_stream.read(limit + 1)
    if len(data) > limit:
        raise PccsError(413, f"body exceeds max_body_bytes ({limit})")
    try:
        return jsonlimits.loads(data)
    except jsonlimits.JsonTooDeep as exc:  # e.g. 100,000 nested "[": a 400, never a 500
        raise PccsError(400, f"body: {exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise PccsError(400, "body is not valid JSON") from None


def operation_successful(resp: falcon.Response) -> None:
    resp.content_type = "text/plain; charset=utf-8"
    resp.text = STATUS_TEXTS[200]


class Platforms:
    def __init__(self, auth: Auth, registrations: Registrations, version: int, body_limit: int):
        self.auth = auth
        self.registrations = registrations
        self.version = version
        self.body_limit = body_limit

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.auth.require_user(req)
        update = (req.get_param("update") or "standard").upper()
        if update not in ("STANDARD", "EARLY", "ALL"):
            raise PccsError(400, "update must be standard, early or all")
        record = validate_registration(json_body(req, self.body_limit))
        self.registrations.register(self.version, record, update)
        operation_successful(resp)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.auth.require_admin(req)
        source = req.get_param("source")
        if source is None or source == "reg":
            rows = self.registrations.drain("NEW")
        elif source == "reg_na":
            rows = self.registrations.drain("NOT_AVAILABLE")
        elif len(source) >= 2 and source.startswith("[") and source.endswith("]"):
            inside = source[1:-1].strip().upper()
            fmspcs = {item.strip() for item in inside.split(",")} if inside else None
            rows = self.registrations.cached_platforms(fmspcs)
        else:
            raise PccsError(400, "source must be reg, reg_na or [FMSPC,...]")
        resp.content_type = "application/json; charset=utf-8"
        resp.data = json.dumps(rows, separators=(",", ":")).encode()  # Express: compact
        resp.set_header("platform-count", str(len(rows)))


class PlatformCollateral:
    def __init__(self, auth: Auth, upload: CollateralUpload, version: int, body_limit: int):
        self.auth = auth
        self.upload = upload
        self.version = version
        self.body_limit = body_limit

    def on_put(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.auth.require_admin(req)
        self.upload.apply(self.version, json_body(req, self.body_limit))
        operation_successful(resp)


class Refresh:
    """GET or POST /refresh (admin): the collateral refresh, or ``type=certs``."""

    def __init__(self, auth: Auth, refresher: Refresher):
        self.auth = auth
        self.refresher = refresher

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.auth.require_admin(req)
        kind = req.get_param("type")
        if kind is None:
            self.refresher.refresh_collateral()
        elif kind == "certs":  # Intel: exactly "certs", case-sensitive
            fmspc = (req.get_param("fmspc") or "").strip().strip("[]").upper()
            fmspcs = {item.strip() for item in fmspc.split(",") if item.strip()} or None
            self.refresher.refresh_certs(fmspcs)
        else:
            raise PccsError(400, "type must be certs or absent")
        operation_successful(resp)

    on_post = on_get


class Status:
    """dcapd's own admin view: every cached collateral entry and how fresh it is (expired,
    expiring within the refresh margin, fresh), with counts."""

    def __init__(self, auth: Auth, refresher: Refresher, store: Store, margin: float):
        self.auth = auth
        self.refresher = refresher
        self.store = store
        self.margin = margin

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.auth.require_admin(req)
        status = self.refresher.status()
        status["now"] = iso_time(time.time())
        status["counts"] = dict(
            annotate(status["entries"], time.time(), self.margin),
            platforms=len(self.store.keys(self.store.platform_prefix())),
            pck_certificate_answers=len(self.store.keys(self.store.pckcert_prefix())),
        )
        resp.content_type = "application/json"
        resp.data = json.dumps(status, indent=1).encode()


class Health:
    """GET /healthz: the process answers (liveness). Never cached, no auth."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "application/json"
        resp.data = b'{"status":"ok"}'
        resp.cache_control = ["no-store"]


class Ready:
    """GET /readyz: 200 while the cache can be read, so a load balancer keeps every node that
    can serve its cache; upstream trouble is reported in the body as "degraded" (cached
    answers still flow), never as not ready. 503 only when the cache cannot be read.
    Never cached, no auth."""

    def __init__(
        self, store: Store, upstream: Upstream, mode: str, lifecycle: Lifecycle | None = None
    ):
        self.store = store
        self.upstream = upstream
        self.mode = mode
        self.lifecycle = lifecycle if lifecycle is not None else Lifecycle()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        problems, warnings = [], []
        try:
            self.store.probe()
        except Exception as exc:  # any failure to read the cache means not ready
            problems.append(
                f"cache: cannot be read ({type(exc).__name__}): {self.store.description}"
            )
        success, failure = self.upstream.last_success, self.upstream.last_failure
        if self.mode != "OFFLINE" and failure is not None and (success or 0) < failure:
            warnings.append(
                f"upstream: the last contact failed at {iso_time(failure)}; "
                "cached answers are served, uncached ones fail until it answers again"
            )
        if self.lifecycle.draining:
            problems.append("shutting down: requests in flight are finishing")
        status = (
            "shutting down"
            if self.lifecycle.draining
            else "not ready"
            if problems
            else "degraded"
            if warnings
            else "ready"
        )
        resp.status = 503 if problems else 200
        resp.content_type = "application/json"
        resp.cache_control = ["no-store"]
        resp.data = json.dumps(
            {
                "status": status,
                "mode": self.mode,
                "problems": problems,
                "warnings": warnings,
                "upstream_last_success": iso_time(success),
                "upstream_last_failure": iso_time(failure),
            }
        ).encode()


def iso_time(epoch: float | None) -> str | None:
    """ISO 8601 UTC to the second, as operators read times (None stays None)."""
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
