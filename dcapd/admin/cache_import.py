"""``import``: an upload file (and dcapd's extension keys) applied to a dcapd cache directory
with no server running, checked exactly as ``PUT /platformcollateral`` checks it."""

from __future__ import annotations

import base64
import os
import tempfile
from typing import Any

from ..collateral import CT_CRL, PCK_CERT_CHAIN, BadUpstreamData, crl_meta
from ..config import Config, ConfigError, load_config
from ..errors import PccsError
from ..integrity import IntegrityError
from ..services import Services, build_services, open_backend
from ..store import Entry, Store, StoreUnavailable
from .common import AdminError, SettingError
from .upload_file import upload_version

# Entries export copies verbatim (nothing in Intel's format holds them).
RAW_KINDS = ("reg", "appraisal", "policy")


def open_services(
    cache_dir: str, trusted_roots: str | None, config_file: str | None, cache_url: str = ""
) -> Services:
    """dcapd's collaborators for a cache directory (or, with ``cache_url``, a PostgreSQL
    cache), as the server builds them, with an Upstream that is never used (OFFLINE)."""
    try:
        config = load_config(
            {
                "cache_dir": "" if cache_url else cache_dir,
                "cache_url": cache_url,
                "cache_mode": "OFFLINE",
                "trusted_roots": trusted_roots,
            },
            ini_path=config_file,
        )
    except ConfigError as exc:
        raise SettingError(str(exc)) from None
    store = open_store(config)
    try:
        return build_services(config, store)
    except (OSError, ValueError) as exc:
        store.close()
        raise SettingError(f"cannot read the trusted roots: {exc}") from None


def open_store(config: Config, must_exist: bool = False) -> Store:
    """The cache ``config`` names: a directory (created if need be, unless ``must_exist``:
    then it must hold cache.db already) or a PostgreSQL database; SettingError when it
    cannot be opened."""
    directory = config.cache_dir
    if (
        not config.cache_url
        and must_exist
        and not os.path.isfile(os.path.join(directory, "cache.db"))
    ):
        raise SettingError(f"{directory} is not a dcapd cache directory (no cache.db)")
    try:
        return Store(directory, backend=open_backend(config))
    except StoreUnavailable as exc:
        raise SettingError(str(exc)) from None
    except OSError as exc:
        raise SettingError(f"cache directory {directory}: {exc.strerror or exc}") from None


def upload_parts(body: dict[str, Any], path: str) -> list[tuple[int, dict, str]]:
    """(API version, upload body, where) of the file's body and its extra upload bodies."""
    parts = [(upload_version(body, path), body, path)]
    extra = body.get("dcapd_extra_uploads") or []
    if not isinstance(extra, list):
        raise AdminError(f"{path}: dcapd_extra_uploads is not a list")
    for index, part in enumerate(extra):
        where = f"{path}: dcapd_extra_uploads[{index}]"
        parts.append((upload_version(part, where), part, where))
    return parts


def _refused(where: str, exc: PccsError) -> AdminError:
    return AdminError(f"{where}: refused ({exc.status_code}): {exc.reason}")


def check_upload(body: dict[str, Any], path: str, trusted_roots: str | None) -> None:
    """What ``import`` (and ``PUT /platformcollateral``) would refuse in the upload bodies,
    checked against an empty cache with nothing written: an AdminError naming the reason."""
    with tempfile.TemporaryDirectory(prefix="dcapd-admin-check-") as directory:
        services = open_services(directory, trusted_roots, None)
        try:
            for version, part, where in upload_parts(body, path):
                try:
                    services.upload.check(version, part)
                except PccsError as exc:
                    raise _refused(where, exc) from None
        finally:
            services.close()


def import_upload(services: Services, body: dict[str, Any], path: str) -> dict[str, int]:
    """Apply an upload file (and dcapd's extension keys) to the cache, all or nothing."""
    store = services.store
    parts = upload_parts(body, path)
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
                raise _refused(where, exc) from None
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
                kind = store.parse_key(key).kind
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
