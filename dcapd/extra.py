"""Collateral PCS v4 serves beyond Intel's PCCS (pccs-1.27.md §3): TCB infos and enclave
identities pinned to a TCB evaluation data number, the QAE identity, and the signed lists of
TCB evaluation data numbers.

Each is one cache entry under an ``extra/`` key (store.py), filled, checked and refreshed
exactly as the standard collateral is (collateral.py's miss path and :class:`Source`).

The upload file carries them beside Intel's keys (Intel's tools ignore unknown ones) in
``dcapd_extra_collateral``, one object per response::

    {"tee": "sgx"|"tdx",
     "endpoint": "tcb" | "qe/identity" | "qve/identity" | "qae/identity"
                 | "tcbevaluationdatanumbers",
     "fmspc": "00806F050000",            # tcb only
     "tcbEvaluationDataNumber": 17,      # tcb and identities: pinned to that number
     "update": "standard"|"early",       # qae/identity without a number
     "body": "<the response body, exactly as PCS sent it>",
     "issuer_chain": "<its issuer-chain header, URL-encoded PEM as PCS sends it>"}

checked as a fetch from PCS is (signature over the exact bytes, chain to a trusted root) and
stored byte-exact; :func:`extra_collateral_items` writes them from a cache (for an export).
"""

from __future__ import annotations

from requests.structures import CaseInsensitiveDict

from .collateral import (
    CT_JSON,
    ENCLAVE_IDENTITY_CHAIN,
    IDENTITY_IDS,
    TCB_INFO_CHAIN_V4,
    BadUpstreamData,
    Collateral,
    Source,
    require_chain,
    signed_json,
    signed_json_meta,
)
from .errors import PccsError
from .hexstr import is_hex
from .integrity import IntegrityError
from .store import Entry, Store
from .upstream import PCS_API_VERSION, UpstreamResponse

EVALUATION_NUMBERS_CHAIN = "TCB-Evaluation-Data-Numbers-Issuer-Chain"
UPLOAD_KEY = "dcapd_extra_collateral"
# (tee, endpoint) of the identities an upload item may carry -> identity kind.
_IDENTITIES = {
    ("sgx", "qe/identity"): "qe",
    ("sgx", "qve/identity"): "qve",
    ("sgx", "qae/identity"): "qae",
    ("tdx", "qe/identity"): "tdqe",
}
_IDENTITY_ENDPOINTS = {kind: key for key, kind in _IDENTITIES.items()}
# Identities Intel's PCCS does not serve at all: only ever ``extra/`` entries.
EXTRA_IDENTITY_KINDS = ("qae",)


def _require_number(inner: dict, number: int) -> None:
    if inner.get("tcbEvaluationDataNumber") != number:
        raise BadUpstreamData(
            f"tcbEvaluationDataNumber is {inner.get('tcbEvaluationDataNumber')!r}, not {number}"
        )


class ExtraCollateral:
    """Sources and answers for the ``extra/`` entries, through :class:`Collateral`."""

    def __init__(self, collateral: Collateral):
        self.collateral = collateral
        self.store = collateral.store
        self.upstream = collateral.upstream
        self.integrity = collateral.integrity

    # --- sources

    def pinned_tcb_info_source(self, tee: str, fmspc: str, number: int) -> Source:
        def to_entry(reply: UpstreamResponse) -> Entry:
            chain = require_chain(reply, TCB_INFO_CHAIN_V4)
            info = signed_json(reply.body, "tcbInfo")
            if str(info.get("fmspc", "")).upper() != fmspc.upper():
                raise BadUpstreamData(f"TCB info is for FMSPC {info.get('fmspc')!r}")
            if info.get("id", tee.upper()) != tee.upper():
                raise BadUpstreamData(f"TCB info is for {info['id']!r}, not {tee.upper()}")
            _require_number(info, number)
            self.integrity.check_signed_json(reply.body, "tcbInfo", chain)
            return Entry(reply.body, {TCB_INFO_CHAIN_V4: chain}, CT_JSON, signed_json_meta(info))

        return Source(
            self.store.pinned_tcb_key(tee, fmspc, number),
            lambda: self.upstream.get_tcb_info(tee, PCS_API_VERSION, fmspc, "", number),
            to_entry,
            pinned=True,
        )

    def identity_source(self, kind: str, number: int | None, update: str) -> Source:
        """An identity pinned to ``number``, or (``number`` None) the QAE identity."""

        def to_entry(reply: UpstreamResponse) -> Entry:
            chain = require_chain(reply, ENCLAVE_IDENTITY_CHAIN)
            identity = signed_json(reply.body, "enclaveIdentity")
            if identity.get("id", IDENTITY_IDS[kind]) != IDENTITY_IDS[kind]:
                raise BadUpstreamData(f"identity is {identity['id']!r}, not {IDENTITY_IDS[kind]}")
            if number is not None:
                _require_number(identity, number)
            self.integrity.check_signed_json(reply.body, "enclaveIdentity", chain)
            return Entry(
                reply.body, {ENCLAVE_IDENTITY_CHAIN: chain}, CT_JSON, signed_json_meta(identity)
            )

        return Source(
            self.store.extra_identity_key(kind, update if number is None else number),
            lambda: self.upstream.get_enclave_identity(kind, PCS_API_VERSION, update, number),
            to_entry,
            pinned=number is not None,
        )

    def evaluation_numbers_source(self, tee: str) -> Source:
        def to_entry(reply: UpstreamResponse) -> Entry:
            chain = require_chain(reply, EVALUATION_NUMBERS_CHAIN)
            numbers = signed_json(reply.body, "tcbEvaluationDataNumbers")
            if numbers.get("id", tee.upper()) != tee.upper():
                raise BadUpstreamData(f"evaluation data numbers are for {numbers['id']!r}")
            self.integrity.check_signed_json(reply.body, "tcbEvaluationDataNumbers", chain)
            return Entry(
                reply.body, {EVALUATION_NUMBERS_CHAIN: chain}, CT_JSON, signed_json_meta(numbers)
            )

        return Source(
            self.store.evaluation_numbers_key(tee),
            lambda: self.upstream.get_tcb_evaluation_data_numbers(tee),
            to_entry,
        )

    def source_for(self, what: dict) -> Source:
        """The source of an ``extra/`` entry, from :meth:`CacheKey.collateral`'s answer."""
        if what["endpoint"] == "tcb":
            return self.pinned_tcb_info_source(what["tee"], what["fmspc"], what["number"])
        if what["endpoint"] == "identity":
            return self.identity_source(
                what["identity"], what["number"], what["update"] or "STANDARD"
            )
        return self.evaluation_numbers_source(what["tee"])

    # --- the routes' questions (cache, else LAZY fill)

    def pinned_tcb_info(self, tee: str, fmspc: str, number: int) -> Entry:
        return self.collateral.cached_or_fetched(self.pinned_tcb_info_source(tee, fmspc, number))

    def identity(self, kind: str, number: int | None, update: str) -> Entry:
        return self.collateral.cached_or_fetched(self.identity_source(kind, number, update))

    def evaluation_numbers(self, tee: str) -> Entry:
        return self.collateral.cached_or_fetched(self.evaluation_numbers_source(tee))

    # --- the upload file

    def entries_from_upload(self, items) -> dict[str, Entry]:
        """``dcapd_extra_collateral`` items as cache entries, each checked exactly as the
        fetch from PCS would be: 460 when the signature or chain fails, else 400."""
        if items is None:
            return {}
        if not isinstance(items, list):
            raise PccsError(400, f"collateral upload: {UPLOAD_KEY} is not a list")
        entries: dict[str, Entry] = {}
        for index, item in enumerate(items):
            where = f"collateral upload: {UPLOAD_KEY}[{index}]"
            source, header = self._upload_source(item, where)
            reply = UpstreamResponse(
                200,
                CaseInsensitiveDict({header: item["issuer_chain"]}),
                item["body"].encode("utf-8"),
                "upload",
            )
            try:
                entry = source.to_entry(reply)
            except IntegrityError as exc:
                raise PccsError(460, f"{where}: {exc}") from None
            except BadUpstreamData as exc:
                raise PccsError(400, f"{where}: {exc}") from None
            entry.meta["source"] = "upload"
            entries[source.key] = entry
        return entries

    def _upload_source(self, item, where: str) -> tuple[Source, str]:
        if not isinstance(item, dict):
            raise PccsError(400, f"{where} is not an object")
        tee, endpoint = str(item.get("tee")), str(item.get("endpoint"))
        number = item.get("tcbEvaluationDataNumber")
        if not isinstance(item.get("body"), str) or not isinstance(item.get("issuer_chain"), str):
            raise PccsError(400, f"{where} needs body and issuer_chain strings")
        if number is not None and (
            isinstance(number, bool) or not isinstance(number, int) or number < 0
        ):
            raise PccsError(400, f"{where}.tcbEvaluationDataNumber is not a non-negative integer")
        if endpoint == "tcb" and tee in ("sgx", "tdx") and number is not None:
            fmspc = item.get("fmspc")
            if not isinstance(fmspc, str) or not is_hex(fmspc, (12,)):
                raise PccsError(400, f"{where}.fmspc is missing or not 12 hex characters")
            return self.pinned_tcb_info_source(tee, fmspc, number), TCB_INFO_CHAIN_V4
        if (tee, endpoint) in _IDENTITIES and (number is not None or endpoint == "qae/identity"):
            update = str(item.get("update") or "standard").upper()
            if update not in ("STANDARD", "EARLY"):
                raise PccsError(400, f"{where}.update must be standard or early")
            kind = _IDENTITIES[(tee, endpoint)]
            return self.identity_source(kind, number, update), ENCLAVE_IDENTITY_CHAIN
        if endpoint == "tcbevaluationdatanumbers" and tee in ("sgx", "tdx"):
            return self.evaluation_numbers_source(tee), EVALUATION_NUMBERS_CHAIN
        raise PccsError(400, f"{where} is not collateral dcapd serves beyond Intel's format")


def extra_collateral_items(store: Store) -> tuple[list[dict], list[str]]:
    """The cache's ``extra/`` entries as ``dcapd_extra_collateral`` items (an export:
    ``import`` or PUT platformcollateral restores them byte-exact), and warnings for entries
    that cannot be written so."""
    items: list[dict] = []
    warnings: list[str] = []
    for key in sorted(store.keys(Store.EXTRA_PREFIX)):
        what = Store.parse_key(key).collateral()
        entry = store.get(key)
        if what is None or entry is None or what.get("identity", "qe") not in _IDENTITY_ENDPOINTS:
            warnings.append(f"{key}: not exported (unknown key form)")
            continue
        chain = next(
            (
                entry.headers[name]
                for name in (TCB_INFO_CHAIN_V4, ENCLAVE_IDENTITY_CHAIN, EVALUATION_NUMBERS_CHAIN)
                if entry.headers.get(name)
            ),
            None,
        )
        try:
            body = entry.body.decode("utf-8")
        except UnicodeDecodeError:
            body = None
        if chain is None or body is None:
            warnings.append(f"{key}: not exported (no issuer chain, or a body that is not text)")
            continue
        item: dict = {}
        if what["endpoint"] == "identity":
            tee, endpoint = _IDENTITY_ENDPOINTS[what["identity"]]
            item.update(tee=tee, endpoint=endpoint)
            if what["number"] is None:
                item["update"] = what["update"].lower()
        else:
            item.update(tee=what["tee"], endpoint=what["endpoint"])
            if what["endpoint"] == "tcb":
                item["fmspc"] = what["fmspc"]
        if what.get("number") is not None:
            item["tcbEvaluationDataNumber"] = what["number"]
        item.update(body=body, issuer_chain=chain)
        items.append(item)
    return items, warnings
