"""In-process measurements of ``scripts/bench.py``: the cold burst, one cache hit through the app
alone (and its profile), where a profiled server's CPU goes, and the cache backends side by side.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from bench_data import V4, Mix, bench_config, pckcert_target, warm_cache
from bench_load import Connection
from bench_servers import unverified_context

PROFILE_GROUPS = (  # (label, substrings of a profile entry's "file:function")
    ("TLS front (asyncio, ssl)", ("asyncio", "/ssl.py", "_ssl.", "selectors", "dcapd/server.py")),
    ("waitress (HTTP parsing, channels, task queue)", ("waitress",)),
    ("falcon", ("falcon",)),
    ("dcapd request handling", ("/dcapd/",)),
    ("access log (logging)", ("logging", "posixpath")),
    ("cache lookup (diskcache, sqlite)", ("diskcache", "sqlite3")),
    ("socket syscalls", ("_socket.", "select.poll", "'poll' of", "posix.")),
    ("threads, locks, queues", ("threading", "_thread.", "queue")),
)


def _profile_group(filename: str, name: str) -> str | None:
    where = f"{filename}:{name}"
    for label, marks in PROFILE_GROUPS:
        if any(mark in where for mark in marks):
            return label
    return None if filename == "~" else "other"  # unmatched builtins: charged to callers


def profile_summary(path: Path, top: int) -> list[str]:
    """Server CPU by component (self time of each function, grouped), then the top functions."""
    import io
    import pstats

    stats = pstats.Stats(str(path))
    groups: dict[str, float] = {}
    total = 0.0
    for (filename, _line, name), (_cc, _nc, tottime, _ct, callers) in stats.stats.items():
        total += tottime
        label = _profile_group(filename, name)
        if label is not None:
            groups[label] = groups.get(label, 0.0) + tottime
            continue
        # A generic builtin (len, dict.get, str.split...): its time goes to its callers' groups.
        shares = {caller: info[2] for caller, info in callers.items()} or {("~", 0, ""): 1.0}
        weight = sum(shares.values()) or 1.0
        for (caller_file, _l, caller_name), share in shares.items():
            caller_label = _profile_group(caller_file, caller_name) or "other"
            groups[caller_label] = groups.get(caller_label, 0.0) + tottime * share / weight
    lines = [
        "server CPU by component (cProfile, thread CPU time, all threads; profiling "
        "overhead included, so Python-heavy parts look bigger):"
    ]
    for label, seconds in sorted(groups.items(), key=lambda item: -item[1]):
        lines.append(f"  {seconds / total:6.1%}  {label}")
    calls = {
        (Path(filename).name, name): nc
        for (filename, _l, name), (_cc, nc, _tt, _ct, _c) in stats.stats.items()
        if "waitress" in filename
    }
    requests = calls.get(("task.py", "service"))
    if requests:
        lines.append(
            f"  waitress loop iterations per request: "
            f"{calls.get(('wasyncore.py', 'poll2'), 0) / requests:.1f}"
        )
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    lines.append(f"server: top {top} functions by own CPU time:")
    lines.extend("  " + line for line in text[text.find("   ncalls") :].rstrip().splitlines())
    return lines


# ------------------------------------------------------------------------------------------
# Cold burst: N identical misses, one upstream call
# ------------------------------------------------------------------------------------------


def cold_burst(
    workdir: Path, roots: Path, scenarios: list[str], tls: bool, size: int, delay: float
) -> list[tuple[str, int, int, str]]:
    """Returns (what, upstream calls, 200 answers, note) for a /pckcert and a /tcb burst."""
    from dcapd.app import create_app
    from dcapd.server import Server
    from tests import pki
    from tests.fakepcs import INTEL_HOSTS, FakePCS, load_manifest

    platform = pki.default_platform()
    tcb_chain = pki.url_encoded_chain(pki.tcb_signing().pem, pki.root_ca().pem)
    # A scenario with an SGX TCB info to miss on (the test platform's FMSPC is the other one).
    scenario, fmspc = None, None
    for name in scenarios:
        for response in load_manifest(name)["responses"]:
            if (
                response["path"] == f"{V4}/tcb"
                and response["status"] == 200
                and set(response["query"]) == {"fmspc"}
            ):
                scenario, fmspc = name, response["query"]["fmspc"].upper()
                break
        if scenario:
            break
    fake = FakePCS(scenario).start()
    fake.add_response(
        "GET",
        f"{V4}/pckcerts",
        None,
        200,
        pki.pckcerts_response_headers(platform),
        pki.pckcerts_response_body(platform),
    )
    fake.add_response(
        "GET",
        f"{V4}/tcb",
        {"fmspc": platform.fmspc, "update": "standard"},
        200,
        {"Content-Type": "application/json", "TCB-Info-Issuer-Chain": tcb_chain},
        platform.tcb_info,
    )
    fake.fail_with(delay=delay)  # every answer comes late: the misses pile up
    config = bench_config(
        workdir / "burst-cache",
        roots,
        tls="auto" if tls else "off",
        threads=size + 4,
        pcs_url=fake.pcs_url,
        api_key="k" * 32,
        url_map=",".join(f"{host}={fake.base}" for host in INTEL_HOSTS),
    )
    app = create_app(config)
    server = Server(app, config).start()
    raw = platform.pck_certs[0]
    bursts = [
        (
            "/pckcert",
            "/pckcerts",
            pckcert_target(
                platform.qeid,
                (raw.cpusvn_hex, raw.pcesvn_hex),
                platform.pceid,
                platform.encrypted_ppid,
            ),
        )
    ]
    if fmspc:
        bursts.append(("/tcb", f"{V4}/tcb", f"{V4}/tcb?fmspc={fmspc}"))
    out = []
    try:
        for what, upstream_path, target in bursts:
            ctx = unverified_context() if tls else None
            conns = [Connection("127.0.0.1", server.port, ctx) for _ in range(size)]
            barrier = threading.Barrier(size)
            statuses: list = [None] * size

            def one(i: int) -> None:
                barrier.wait()
                try:
                    statuses[i] = conns[i].get(target)
                except Exception as exc:  # noqa: BLE001
                    statuses[i] = type(exc).__name__

            fake.reset_calls()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(size)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            for conn in conns:
                conn.close()
            calls = fake.count(upstream_path)
            others = len(fake.calls) - calls
            note = f"+{others} other upstream calls (TCB infos of the new FMSPC)" if others else ""
            out.append((what, calls, statuses.count(200), note))
    finally:
        server.stop()
        app.services.store.close()
        app.services.upstream.close()
        fake.stop()
    return out


# ------------------------------------------------------------------------------------------
# The app alone: cost of one cache hit, and a profile
# ------------------------------------------------------------------------------------------


def app_cost(
    cache_dir: Path,
    roots: Path,
    spec: dict,
    profile: bool,
    top: int,
    metrics: bool = True,
    cache_url: str = "",
    n: int = 3000,
) -> list[str]:
    import cProfile
    import io
    import logging
    import pstats

    from falcon import testing

    from dcapd.app import create_app
    from dcapd.logs import configure_from

    config = bench_config(cache_dir, roots, cache_url, metrics_enabled=metrics)
    configure_from(config)  # the access log costs what it costs in production...
    devnull = open(os.devnull, "w")
    logging.getLogger("dcapd").handlers[0].setStream(devnull)  # ...but is not shown
    app = create_app(config)
    lines = []
    try:
        mix = Mix(spec, 7)
        kinds = {
            "pckcert": [
                pckcert_target(q, tuple(r), spec["pceid"], spec["enc_ppid"])
                for q in mix.qeids[:200]
                for r in spec["raw_tcbs"]
            ],
            "tcb": spec["tcb_targets"],
            "qe/identity": spec["identity_targets"],
        }
        environs = {}
        for kind, targets in kinds.items():
            environs[kind] = []
            for target in targets:
                path, _, query = target.partition("?")
                environs[kind].append(
                    testing.create_environ(path=path, query_string=query, host="127.0.0.1")
                )

        def start_response(status, headers, exc_info=None):
            if not status.startswith("200"):
                raise RuntimeError(status)

        def hits(kind: str, n: int) -> None:
            envs = environs[kind]
            for i in range(n):
                for _ in app(dict(envs[i % len(envs)]), start_response):
                    pass

        costs = {}
        for kind in kinds:
            hits(kind, min(200, n))  # warm connections, caches
            t0 = time.perf_counter()
            hits(kind, n)
            costs[kind] = (time.perf_counter() - t0) / n * 1e6
        lines.append(
            f"app alone on {app.services.store.description} (WSGI call in-process, access "
            "log on): "
            + ", ".join(f"{kind} {us:.0f} us" for kind, us in costs.items())
            + " per cache hit"
        )
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            hits("pckcert", 5000)
            profiler.disable()
            for sort in ("tottime", "cumulative"):
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats(sort).print_stats(top)
                text = out.getvalue()
                body = text[text.find("   ncalls") :] if "   ncalls" in text else text
                lines.append(f"profile of 5000 /pckcert hits, top {top} by {sort}:")
                lines.extend("  " + line for line in body.rstrip().splitlines())
    finally:
        app.services.store.close()
        app.services.upstream.close()
        logging.getLogger("dcapd").handlers[:] = []
        devnull.close()
    return lines


def compare_backends(args, workdir: Path, roots: Path, scenarios: list[str], count: int) -> int:
    """--cache-url: the same warm cache in a directory and in PostgreSQL; hit costs of each."""
    from dcapd.backends.postgres import mask_url

    print(f"cache hit cost: directory vs {mask_url(args.cache_url)}, {count} platforms", flush=True)
    results = []
    for name, cache_url in (("diskcache", ""), ("PostgreSQL", args.cache_url)):
        cache_dir = workdir / "cache-compare"
        spec = warm_cache(cache_dir, roots, scenarios, count, args.tcbs_per_platform, cache_url)
        print(f"{name}: warm cache {spec['entries']} entries in {spec['warm_s']:.1f} s", flush=True)
        lines = app_cost(cache_dir, roots, spec, False, args.top, cache_url=cache_url)
        results.append((name, lines[0]))
    for name, line in results:
        print(f"{name:>10}: {line}", flush=True)
    return 0
