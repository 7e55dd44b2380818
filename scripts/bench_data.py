"""The benchmark's data: the request set, the warm cache, the ceiling app, the comparison upload.

Part of ``scripts/bench.py`` (see its docstring); imported by it and by its client and server
processes.
"""

from __future__ import annotations

import copy
import hashlib
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURES = REPO.parent / "shared" / "fixtures"
if str(REPO) not in sys.path:  # dcapd from this checkout if not installed; tests/ always
    sys.path.insert(0, str(REPO))

V4 = "/sgx/certification/v4"
PCKCERT_PATH = f"{V4}/pckcert"
MIX = (("pckcert", 0.7), ("tcb", 0.2), ("identity", 0.1))
# Request sets of the keep-alive phases: (kind, share) pairs.
WEIGHTS = {"mix": MIX, "tcb": (("tcb", 1.0),), "pckcert": (("pckcert", 1.0),)}

# ------------------------------------------------------------------------------------------
# The request set (shared by the warm-up, the ceiling and the clients)
# ------------------------------------------------------------------------------------------


def qeids(n_platforms: int, base_qeid: str, salt: str = "dcapd-bench") -> list[str]:
    """QE IDs of the cached platforms: the uploaded platform's, then generated ones."""
    return [base_qeid] + [
        hashlib.sha256(b"%s-%d" % (salt.encode(), i)).hexdigest()[:32].upper()
        for i in range(1, n_platforms)
    ]


def pckcert_target(qeid: str, raw: tuple[str, str], pceid: str, enc_ppid: str) -> str:
    return (
        f"{PCKCERT_PATH}?qeid={qeid}&cpusvn={raw[0]}&pcesvn={raw[1]}&pceid={pceid}"
        f"&encrypted_ppid={enc_ppid}"
    )


class Mix:
    """Picks request targets with the given shares (one per client thread: own RNG)."""

    def __init__(self, spec: dict, seed: int, weights=MIX):
        self.rng = random.Random(seed)
        self.qeids = qeids(spec["platforms"], spec["base_qeid"], spec.get("salt", "dcapd-bench"))
        self.raw_tcbs = [tuple(raw) for raw in spec["raw_tcbs"]]
        self.pceid, self.enc_ppid = spec["pceid"], spec["enc_ppid"]
        self.targets = {"tcb": spec["tcb_targets"], "identity": spec["identity_targets"]}
        self.bounds, total = [], 0.0
        for kind, share in weights:
            total += share
            self.bounds.append((total, kind))

    def next(self) -> str:
        rng, roll = self.rng, self.rng.random()
        kind = next((k for bound, k in self.bounds if roll < bound), self.bounds[-1][1])
        if kind == "pckcert":
            return pckcert_target(
                rng.choice(self.qeids), rng.choice(self.raw_tcbs), self.pceid, self.enc_ppid
            )
        return rng.choice(self.targets[kind])


# ------------------------------------------------------------------------------------------
# Warming the cache
# ------------------------------------------------------------------------------------------


def use_fixtures(fixtures: Path) -> list[str]:
    """Point the test suite's fixture loaders at ``fixtures``; returns the PCS scenarios."""
    from tests import fakepcs

    fakepcs.FIXTURES = fixtures
    fakepcs.PCS_FIXTURES = fixtures / "pcs"
    return sorted(p.parent.name for p in (fixtures / "pcs").glob("*/manifest.json"))


def write_trusted_roots(path: Path) -> Path:
    """Intel's SGX Root CA + the test PKI's root (as tests/conftest.py make_config)."""
    from dcapd.integrity import bundled_intel_root_pem
    from tests import pki

    path.write_bytes(bundled_intel_root_pem() + pki.root_ca().pem.encode())
    return path


def sqlite_settings(cache_dir: Path, args) -> str:
    """Apply the what-if sqlite settings (persisted in the cache's Settings table, which
    diskcache reads for every setting its opener does not pass); describe what dcapd gets."""
    import diskcache

    from dcapd.store import CACHE_SETTINGS, BytesOnlyDisk, open_cache

    what_if = {
        name: value
        for name, value in (
            ("sqlite_mmap_size", args.sqlite_mmap_size),
            ("sqlite_cache_size", args.sqlite_cache_size),
        )
        if value is not None
    }
    if what_if:
        diskcache.Cache(
            str(cache_dir), disk=BytesOnlyDisk, **dict(CACHE_SETTINGS, **what_if)
        ).close()
    cache = open_cache(str(cache_dir))
    try:
        text = (
            f"mmap_size {cache.sqlite_mmap_size / 2**20:g} MiB, cache_size "
            f"{cache.sqlite_cache_size} pages"
        )
    finally:
        cache.close()
    overridden = [name for name in what_if if name in CACHE_SETTINGS]
    if overridden:
        text += f" (dcapd sets {', '.join(overridden)} itself: what-if ignored)"
    return text + (" (what-if)" if what_if else "")


def bench_config(cache_dir: Path, roots: Path, cache_url: str = "", **overrides):
    """The benchmark's configuration; ``cache_url``: a PostgreSQL cache instead of the
    directory."""
    from dcapd.config import load_config

    settings = {
        "cache_dir": "" if cache_url else str(cache_dir),
        "cache_url": cache_url,
        "trusted_roots": str(roots),
        "tls": "off",
        "listen": "127.0.0.1:0",
        "cache_mode": "LAZY",
        "upstream_retries": 0,
        "upstream_timeout": 5.0,
        # Nothing must ever leave this machine: a miss (a bug here) fails at once.
        "pcs_url": "http://127.0.0.1:9/sgx/certification/v4/",
        "rootca_crl_url": "http://127.0.0.1:9/IntelSGXRootCA.der",
    }
    settings.update(overrides)
    return load_config(settings, environ={})


def call_wsgi(app, target: str):
    """One GET through the WSGI app: (status, headers, body)."""
    from falcon import testing

    path, _, query = target.partition("?")
    environ = testing.create_environ(path=path, query_string=query, host="127.0.0.1")
    captured = {}

    def start_response(status, headers, exc_info=None):
        captured["status"], captured["headers"] = status, list(headers)

    body = b"".join(app(environ, start_response))
    return captured["status"], captured["headers"], body


def warm_cache(
    cache_dir: Path,
    roots: Path,
    scenarios: list[str],
    n_platforms: int,
    tcbs_per_platform: int,
    cache_url: str = "",
) -> dict:
    """Fill ``cache_dir``; returns the request spec and the answers the ceiling replays."""
    import logging

    from dcapd.app import create_app
    from tests import pki
    from tests.uploads import upload_for_test_platform, upload_from_scenario

    logging.getLogger("dcapd").setLevel(logging.ERROR)  # expired fixture certs are logged
    started = time.perf_counter()
    app = create_app(bench_config(cache_dir, roots, cache_url, cache_mode="OFFLINE"))
    store, upload = app.services.store, app.services.upload
    try:
        for scenario in scenarios:
            upload.apply(4, upload_from_scenario(scenario))
        platform = pki.default_platform()
        raw_tcbs = [(e.cpusvn_hex, e.pcesvn_hex) for e in platform.pck_certs][:tcbs_per_platform]
        upload.apply(4, upload_for_test_platform(platform, raw_tcbs))
        uploaded = time.perf_counter() - started

        # Copy the platform's records (what an upload of it writes) under generated QE IDs, in
        # batched transactions: stored values as they are, keys from dcapd's own builders.
        base, pceid = platform.qeid.upper(), platform.pceid
        keys_of = [
            lambda q: store.platform_key(q, pceid),
            lambda q: store.certs_key(q, pceid),
            lambda q: store.rawtcbs_key(q, pceid),
        ] + [lambda q, raw=raw: store.pckcert_key(q, pceid, *raw) for raw in raw_tcbs]
        values = [store.cache.get(key_of(base)) for key_of in keys_of]
        if any(value is None for value in values):
            raise SystemExit("bench: the uploaded test platform is not in the cache")
        ids = qeids(n_platforms, base)
        for start in range(1, n_platforms, 1000):
            with store.transaction():
                for qeid in ids[start : start + 1000]:
                    for key_of, value in zip(keys_of, values):
                        store.cache.set(key_of(qeid), value)

        tcb_targets = []
        for key in store.keys("tcb/"):
            parsed = store.parse_key(key).collateral()
            if parsed and parsed["version"] == 4 and parsed["update"] == "STANDARD":
                tcb_targets.append(f"/{parsed['tee']}/certification/v4/tcb?fmspc={parsed['fmspc']}")
        identity_targets = [
            f"/{'tdx' if kind == 'tdqe' else 'sgx'}/certification/v4/qe/identity"
            for kind in ("qe", "tdqe")
            if store.get(store.identity_key(kind, 4)) is not None
        ]
        if not tcb_targets or not identity_targets:
            raise SystemExit("bench: the fixtures gave no TCB info or QE identity to serve")
        spec = {
            "platforms": n_platforms,
            "base_qeid": base,
            "raw_tcbs": raw_tcbs,
            "pceid": platform.pceid,
            "enc_ppid": platform.encrypted_ppid,
            "tcb_targets": sorted(tcb_targets),
            "identity_targets": identity_targets,
        }
        # The answers, as dcapd gives them (for the ceiling and to check the cache is warm).
        answers = {}
        for target in (
            spec["tcb_targets"]
            + identity_targets
            + [
                pckcert_target(base, raw, platform.pceid, platform.encrypted_ppid)
                for raw in raw_tcbs
            ]
        ):
            status, headers, body = call_wsgi(app, target)
            if not status.startswith("200"):
                raise SystemExit(f"bench: warm cache answers {status} for {target}")
            answers[target] = (status, headers, body.hex())
        spec["answers"] = answers
        spec["entries"] = len(store.cache)
        spec["warm_s"] = time.perf_counter() - started
        spec["upload_s"] = uploaded
        return spec
    finally:
        store.close()
        app.services.upstream.close()


# ------------------------------------------------------------------------------------------
# The server subprocess (``--serve``): dcapd, or the ceiling app
# ------------------------------------------------------------------------------------------


def ceiling_app(spec: dict):
    """Same bytes as dcapd for every request of the mix, by a dict lookup and nothing else."""
    answers = {
        target: (status, [tuple(h) for h in headers], bytes.fromhex(body))
        for target, (status, headers, body) in spec["answers"].items()
    }
    table = {}
    for target, answer in answers.items():
        if not target.startswith(PCKCERT_PATH):
            table[target] = answer
    for raw in spec["raw_tcbs"]:
        answer = answers[
            pckcert_target(spec["base_qeid"], tuple(raw), spec["pceid"], spec["enc_ppid"])
        ]
        for qeid in qeids(spec["platforms"], spec["base_qeid"]):
            table[pckcert_target(qeid, tuple(raw), spec["pceid"], spec["enc_ppid"])] = answer
    not_found = ("404 Not Found", [("Content-Length", "0")], b"")

    def app(environ, start_response):
        status, headers, body = table.get(
            environ["PATH_INFO"] + "?" + environ["QUERY_STRING"]
            if environ.get("QUERY_STRING")
            else environ["PATH_INFO"],
            not_found,
        )
        start_response(status, headers)
        return [body]

    return app


# ------------------------------------------------------------------------------------------
# The comparison's data: what any PCCS accepts (Intel's checks that the roots agree)
# ------------------------------------------------------------------------------------------


def compare_uploads(n_platforms: int, batch: int = 250) -> tuple[list[dict], dict]:
    """PUT /platformcollateral bodies for ``--compare-url``, and the request spec they serve.

    Intel's PCCS refuses collateral whose roots disagree (460), so the comparison uses the
    upload file Intel's own PCCS 1.23 accepted (``fixtures/intel-pccs``: Intel-signed TCB
    infos, identities, CRLs and one production PCK certificate), its platform repeated under
    generated QE IDs (a PCK certificate does not name its QE ID) up to ``n_platforms``. Both
    servers get the same bodies through the same route, in batches of ``batch`` platforms
    (each batch a whole upload, the collateral repeated)."""
    from tests.uploads import intel_upload

    base = intel_upload()
    platform = base["platforms"][0]
    pck = base["collaterals"]["pck_certs"][0]
    base_qeid, salt = platform["qe_id"].upper(), "dcapd-bench-compare"
    ids = qeids(n_platforms, base_qeid, salt)  # not the QE IDs of the bench's own platforms
    bodies = []
    for start in range(0, n_platforms, batch):
        body = copy.deepcopy(base)  # each batch whole: accepted alone, as Intel's was
        chunk = ids[start : start + batch]
        body["platforms"] = [dict(platform, qe_id=q) for q in chunk]
        collaterals = body["collaterals"]
        collaterals["pck_certs"] = [dict(pck, qe_id=q) for q in chunk]
        bodies.append(body)
    collaterals = base["collaterals"]
    tcb_targets = sorted(
        f"/{tee}/certification/v4/tcb?fmspc={entry['fmspc'].upper()}"
        for entry in collaterals["tcbinfos"]
        for tee in ("sgx", "tdx")
        if entry.get(f"{tee}_tcbinfo")
    )
    identity_targets = [
        path
        for name, path in (
            ("qeidentity", f"{V4}/qe/identity"),
            ("tdqeidentity", "/tdx/certification/v4/qe/identity"),
        )
        if collaterals.get(name)
    ]
    spec = {
        "platforms": n_platforms,
        "base_qeid": base_qeid,
        "salt": salt,
        "raw_tcbs": [(platform["cpu_svn"].upper(), platform["pce_svn"].upper())],
        "pceid": platform["pce_id"],
        # QCNL sends one; a cached answer does not depend on it (the test platform's).
        "enc_ppid": _test_enc_ppid(),
        "tcb_targets": tcb_targets,
        "identity_targets": identity_targets,
    }
    return bodies, spec


def _test_enc_ppid() -> str:
    from tests import pki

    return pki.default_platform().encrypted_ppid


def apply_uploads(cache_dir: Path, roots: Path, bodies: list[dict]) -> float:
    """Load upload bodies into a cache through dcapd's own upload path (``CollateralUpload``,
    what PUT /platformcollateral runs); returns the seconds it took."""
    import logging

    from dcapd.app import create_app

    logging.getLogger("dcapd").setLevel(logging.ERROR)  # expired fixture data is logged
    started = time.perf_counter()
    app = create_app(bench_config(cache_dir, roots, cache_mode="OFFLINE"))
    try:
        for body in bodies:
            app.services.upload.apply(4, body)
    finally:
        app.services.store.close()
        app.services.upstream.close()
    return time.perf_counter() - started
