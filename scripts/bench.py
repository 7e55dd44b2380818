#!/usr/bin/env python3
"""Benchmark dcapd's cache hits as a user runs it, against issue 15's targets.

One command, from a checkout (``pip install .`` or not)::

    python scripts/bench.py                      # every phase below, ~70 s on 2 cores
    python scripts/bench.py --repeat 3           # ranges over 3 runs of each (for README)
    python scripts/bench.py --phases tcb,newconn # only some phases
    python scripts/bench.py --sweep 10,10000     # flatness: 10 vs 10,000 cached platforms
    python scripts/bench.py --workers 2          # dcapd with 1 worker process, then with 2
    python scripts/bench.py --compare-url https://127.0.0.1:8081 --compare-admin-token T \\
        --compare-insecure --compare-pid PID     # the same requests against another PCCS
    python scripts/bench.py --profile --profile-server   # where a cache hit's time goes
    python scripts/bench.py --cache-url postgresql://bench@127.0.0.1/scratch   # vs PostgreSQL

What it does, all on 127.0.0.1 (but --compare-url), in a temporary directory removed at the end:

1. Warms a cache: every recorded scenario in ``shared/fixtures/pcs`` goes in through dcapd's own
   upload path (``CollateralUpload``: integrity-checked, as ``PUT /platformcollateral``), and so
   does the test-PKI platform of ``tests/pki.py`` with ``--tcbs-per-platform`` raw TCBs. That
   platform's records are then copied under generated QE IDs up to ``--platforms`` platforms:
   the answers are the same bytes, only the cache keys differ, which is all a cache hit sees.
2. Starts dcapd as shipped: the ``python -m dcapd --config FILE`` command of this checkout, on a
   free port, with dcapd's defaults (``cpu_affinity = auto`` included) but for the benchmark's
   settings (the cache, OFFLINE, the trusted roots; ``--set`` adds any).
3. Measures, each phase for ``--duration`` seconds after ``--warmup``, with ``--clients``
   clients (threads in ``--client-procs`` processes, unpinned unless ``--pin``):

   ``tcb``, ``pckcert``, ``mix``  HTTPS keep-alive: /tcb only, /pckcert only (random cached
                                  platform and raw TCB, with an ``encrypted_ppid`` as QCNL
                                  sends), and the mix: 70% /pckcert, 20% /tcb, 10% /qe/identity
   ``newconn``                    HTTPS /tcb, a new TLS connection per request (QCNL's way:
                                  connect, handshake, one GET with ``Connection: close``, close),
                                  the client offering TLS session resumption
   ``http``                       plain HTTP keep-alive mix: dcapd with ``tls = off``, then a bare
                                  waitress serving the same bytes (on the CPU dcapd picks)
   ``ceiling``                    (not by default) the same bytes behind dcapd's TLS front

   Server CPU per request and peak RSS come from ``/proc/<pid>`` of the dcapd process and of
   every process under it (``--workers``), read before and after each measured window, so the
   clients' work is never in them.
4. ``--workers N``: the HTTPS phases again with ``DCAPD_WORKERS=N``; 1 vs N side by side.
5. ``--compare-url``: the selected HTTPS phases (or the mix) against another PCCS, alternating
   with dcapd, on requests both can answer: the same upload (Intel's accepted upload file, its
   platform under ``--platforms`` QE IDs) goes into dcapd's cache through its upload path and
   to the other PCCS through ``PUT /sgx/certification/v4/platformcollateral`` (with
   ``--compare-admin-token``; without it, the other must hold that upload already).
6. Cold burst: ``--burst`` concurrent identical misses against a LAZY dcapd on an empty cache
   (the fake PCS of the tests answering after ``--burst-delay`` s): upstream calls (target 1).
7. One cache hit through the WSGI app alone (``--profile``: its cProfile).

Then a block of issue 15's targets, each with its measured figure and "met" or "NOT met".
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_data import (
    DEFAULT_FIXTURES,
    WEIGHTS,
    apply_uploads,
    compare_uploads,
    sqlite_settings,
    use_fixtures,
    warm_cache,
    write_trusted_roots,
)
from bench_extra import app_cost, cold_burst, compare_backends, profile_summary
from bench_load import run_load
from bench_servers import DcapdCommand, Remote, ServeProcess, put_collateral, serve_main

PHASES = {  # name: (what, request set, connection mode, over TLS)
    "tcb": ("HTTPS keep-alive, /tcb only", "tcb", "keepalive", True),
    "pckcert": ("HTTPS keep-alive, /pckcert only", "pckcert", "keepalive", True),
    "mix": ("HTTPS keep-alive, the mix", "mix", "keepalive", True),
    "newconn": ("HTTPS, a new TLS connection per request, /tcb", "tcb", "newconn", True),
    "http": ("plain HTTP keep-alive, the mix", "mix", "keepalive", False),
    "ceiling": ("HTTPS keep-alive, the mix", "mix", "keepalive", True),
}
DEFAULT_PHASES = "tcb,pckcert,mix,newconn,http"
BY_COUNT = ("pckcert", "mix")  # phases whose requests depend on the number of platforms
TARGETS = {  # issue 15 (and issue 7's p99 and cold burst)
    "cpu_keepalive_ms": 0.45,
    "cpu_newconn_ms": 1.0,
    "http_ratio": 0.7,
    "rss_mib": 80.0,
    "flat": 0.10,
    "p99_ms": 10.0,
}


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark dcapd as shipped (the dcapd command, default settings) on "
        "cache hits: HTTPS keep-alive per path and mixed, a new TLS connection per request, "
        "plain HTTP vs bare waitress; prints issue 15's targets with the figures.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""phases:
  tcb, pckcert, mix  HTTPS keep-alive: /tcb only, /pckcert only, and the mix
                     (70% /pckcert, 20% /tcb, 10% /qe/identity)
  newconn            HTTPS /tcb, a new TLS connection per request (resumption offered)
  http               the mix over plain HTTP: dcapd with tls = off, then bare waitress
                     serving the same bytes
  ceiling            the mix, the same bytes behind dcapd's TLS front (not by default)

columns:
  CPU/req            server CPU time (all its processes) per request
  srvCPU, cliCPU     cores used by the server and by the load generator
  other, busy        cores used by every other process; the whole machine's use
  peakMiB, procs     largest VmHWM of the server's processes; their number""",
    )
    what = parser.add_argument_group("what to measure")
    what.add_argument(
        "--phases",
        default=DEFAULT_PHASES,
        metavar="LIST",
        help=f"comma-separated phases (default {DEFAULT_PHASES}; see below)",
    )
    what.add_argument("--https", action="store_true", help="shortcut: tcb,pckcert,mix,newconn")
    what.add_argument("--http", action="store_true", help="shortcut: http")
    what.add_argument("--platforms", type=int, default=1000, help="cached platforms (1000)")
    what.add_argument(
        "--sweep",
        metavar="N,M,...",
        help="run the pckcert and mix phases at each platform count (flatness: 10,10000); "
        "the other phases at the last count",
    )
    what.add_argument(
        "--tcbs-per-platform",
        type=int,
        default=2,
        choices=(1, 2, 3, 4),
        help="cached raw TCBs (/pckcert answers) per platform",
    )
    what.add_argument(
        "--burst", type=int, default=50, help="concurrent identical misses in the cold burst"
    )
    what.add_argument(
        "--burst-delay", type=float, default=0.3, help="seconds the fake PCS takes to answer"
    )
    load = parser.add_argument_group("load")
    load.add_argument("--clients", type=int, default=32, help="concurrent clients (32)")
    load.add_argument(
        "--client-procs",
        type=int,
        default=2,
        help="processes the clients are spread over (2; 0: threads of this process, for "
        "quick checks)",
    )
    load.add_argument("--duration", type=float, default=8.0, help="seconds measured per run (8)")
    load.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of load before each measurement (1)"
    )
    load.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="run everything this many times (servers restarted, alternating): ranges, and "
        "medians for the targets (default 1; 3 with --sweep, whose 10%% bound one run on a "
        "shared machine cannot show)",
    )
    load.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="offered load in req/s over all clients (open loop, latency from each "
        "request's due time); default 0: as fast as answered",
    )
    load.add_argument(
        "--no-resumption",
        action="store_true",
        help="newconn: a full TLS handshake every time (the client offers no session)",
    )
    load.add_argument(
        "--pin",
        action="store_true",
        help="Linux: dcapd on one CPU (cpu_affinity), the clients on the others",
    )
    server = parser.add_argument_group("dcapd settings (default: dcapd's own)")
    server.add_argument(
        "--workers",
        type=int,
        default=1,
        help="N > 1: the HTTPS phases with 1 worker process (default), then with "
        "DCAPD_WORKERS=N ([server] workers), side by side",
    )
    server.add_argument("--threads", type=int, help="[server] threads")
    server.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any dcapd setting, as in its ini file (repeatable), e.g. server.cpu_affinity=",
    )
    server.add_argument(
        "--no-access-log", action="store_true", help="what-if: [log] level = warning"
    )
    server.add_argument(
        "--no-metrics", action="store_true", help="what-if: [metrics] enabled = false"
    )
    server.add_argument(
        "--sqlite-mmap-size",
        type=int,
        metavar="BYTES",
        help="what-if: persist this diskcache sqlite_mmap_size in the benchmark cache",
    )
    server.add_argument(
        "--sqlite-cache-size",
        type=int,
        metavar="PAGES",
        help="what-if: persist this diskcache sqlite_cache_size (pages per connection)",
    )
    other = parser.add_argument_group("compare with another PCCS already running")
    other.add_argument(
        "--compare-url",
        metavar="URL",
        help="its root, e.g. https://127.0.0.1:8081: the selected HTTPS phases (else the mix) "
        "run against it and dcapd, alternating, on the same upload; prints the ratios",
    )
    other.add_argument(
        "--compare-admin-token",
        metavar="TOKEN",
        help="its admin token: the benchmark's collateral is uploaded with it "
        "(PUT /sgx/certification/v4/platformcollateral); without one, the PCCS must hold "
        "that upload already",
    )
    other.add_argument(
        "--compare-pid",
        type=int,
        metavar="PID",
        help="its server process (Linux: CPU and peak RSS from /proc, its children included)",
    )
    other.add_argument(
        "--compare-insecure",
        action="store_true",
        help="upload without checking its TLS certificate (a self-signed one); the load "
        "never checks certificates",
    )
    prof = parser.add_argument_group("profiles and other measurements")
    prof.add_argument(
        "--profile", action="store_true", help="cProfile 5000 /pckcert hits through the WSGI app"
    )
    prof.add_argument(
        "--profile-server",
        action="store_true",
        help="one more mix run of dcapd's Server in this script's child, all threads under "
        "cProfile: where the server's CPU goes",
    )
    prof.add_argument("--top", type=int, default=15, help="profile lines shown")
    prof.add_argument(
        "--app-hits",
        type=int,
        default=3000,
        metavar="N",
        help="cache hits of each kind timed through the WSGI app alone (0: skip)",
    )
    prof.add_argument(
        "--cache-url",
        metavar="URL",
        help="warm this (empty, scratch) PostgreSQL database too and print the cost of a cache "
        "hit (the WSGI app alone) on the directory and on PostgreSQL; no load runs",
    )
    parser.add_argument(
        "--fixtures",
        type=Path,
        default=DEFAULT_FIXTURES,
        help=f"Intel-signed fixtures (default {DEFAULT_FIXTURES})",
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep caches, configs and server logs here (default: temp)"
    )
    parser.add_argument("--serve", metavar="SPEC", help=argparse.SUPPRESS)
    return parser


def parse_phases(args) -> list[str]:
    if args.https or args.http:
        names = (["tcb", "pckcert", "mix", "newconn"] if args.https else []) + (
            ["http"] if args.http else []
        )
    else:
        names = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in names if p not in PHASES]
    if unknown or not names:
        raise SystemExit(f"bench: unknown phase(s) {unknown}; known: {', '.join(PHASES)}")
    return [p for p in PHASES if p in names]  # in the order of PHASES


def dcapd_extra(args) -> dict:
    """``[section] key`` -> value for the dcapd command, from the options."""
    extra: dict = {}
    if args.threads:
        extra[("server", "threads")] = str(args.threads)
    if args.no_access_log:
        extra[("log", "level")] = "warning"
    if args.no_metrics:
        extra[("metrics", "enabled")] = "false"
    if args.pin:
        extra[("server", "cpu_affinity")] = ",".join(map(str, pinning(args)[0]))
    for item in args.set:
        name, sep, value = item.partition("=")
        section, dot, key = name.partition(".")
        if not (sep and dot and section and key):
            raise SystemExit(f"bench: --set {item!r}: expected SECTION.KEY=VALUE")
        extra[(section.strip(), key.strip())] = value.strip()
    return extra


def pinning(args) -> tuple[list, list]:
    """(server CPUs, client CPUs) for --pin: the server on one CPU, the clients on the others."""
    if not args.pin:
        return [], []
    if not hasattr(os, "sched_setaffinity"):
        raise SystemExit("bench: --pin needs Linux (os.sched_setaffinity)")
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[:1], cpus[1:] or cpus[:1]


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------

HEADER = (
    f"{'':<40} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'CPU/req ms':>10} {'srvCPU':>6} "
    f"{'cliCPU':>6} {'other':>6} {'busy':>5} {'peakMiB':>7} {'procs':>5} {'errors':>6}"
)


def fmt_row(name: str, r: dict) -> str:
    errors = sum(r["errors"].values())
    line = (
        f"{name:<40} {r['rps']:>7.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
        f"{r['server_cpu_per_req_ms']:>10.3f} {r['server_cpu_cores']:>6.2f} "
        f"{r['client_cpu_cores']:>6.2f} {r['other_cores']:>6.2f} "
        f"{r['machine_busy'] * 100:>4.0f}% {r['hwm_mib']:>7.1f} {r['server_procs']:>5} "
        f"{errors:>6}"
    )
    if r["handshakes"]:
        line += f"  resumed {r['reused']}/{r['handshakes']} handshakes"
    return line


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """One value, or the median and the range of several."""
    if len(values) == 1:
        return fmt.format(values[0])
    return (
        f"{fmt.format(statistics.median(values))} "
        f"({fmt.format(min(values))} - {fmt.format(max(values))})"
    )


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


class Bench:
    """One benchmark run: the warm caches, the servers, every measured run and the report."""

    def __init__(self, args, workdir: Path, roots: Path, phases: list[str], counts: list[int]):
        self.args, self.workdir, self.roots = args, workdir, roots
        self.phases, self.counts = phases, counts
        self.specs: dict[int, tuple[Path, dict]] = {}
        self.runs: dict[tuple, list[dict]] = {}
        self.extra = dcapd_extra(args)
        self.client_cpus = pinning(args)[1]

    def measure(self, server, label: str, phase: str, count: int, spec: dict) -> dict:
        _what, weights, mode, _tls = PHASES[phase]
        r = run_load(server, spec, self.args, WEIGHTS[weights], mode, self.client_cpus)
        self.runs.setdefault((label, phase, count), []).append(r)
        where = f", {count} platforms" if len(self.counts) > 1 and phase in BY_COUNT else ""
        print(fmt_row(f"{label} {phase}{where}", r), flush=True)
        if r["errors"]:
            print(f"  errors: {r['errors']}\n{server.log_tail(5)}", flush=True)
        return r

    def dcapd(self, name: str, cache_dir: Path, tls: bool, workers: int | None):
        return DcapdCommand(
            name, self.workdir, cache_dir, self.roots, tls, workers=workers, extra=self.extra
        )

    def dcapd_phases(self, label: str, workers: int | None, compare=None) -> None:
        """The selected dcapd phases: one dcapd (HTTPS) per platform count (then ``compare``
        with the last one), one over HTTP (with the default workers only)."""
        last = self.counts[-1]
        for count in self.counts:
            todo = [
                p
                for p in ("tcb", "pckcert", "mix", "newconn")
                if p in self.phases and (p in BY_COUNT or count == last)
            ]
            if not todo and not (compare and count == last):
                continue
            cache_dir, spec = self.specs[count]
            server = self.dcapd(f"https-{count}", cache_dir, True, workers)
            try:
                for phase in todo:
                    self.measure(server, label, phase, count, spec)
                if compare and count == last:
                    compare(server)
            finally:
                server.stop()
        if "http" in self.phases and workers is None:
            cache_dir, spec = self.specs[last]
            server = self.dcapd("http", cache_dir, False, workers)
            try:
                self.measure(server, label, "http", last, spec)
            finally:
                server.stop()

    def ceilings(self) -> None:
        last = self.counts[-1]
        cache_dir, spec = self.specs[last]
        common = dict(
            cache_dir=str(cache_dir),
            roots=str(self.roots),
            threads=self.args.threads or default_threads(),
            cpus=pinning(self.args)[0],
        )
        script = Path(__file__).resolve()
        if "http" in self.phases:
            server = ServeProcess("waitress", self.workdir, spec, script, tls=False, **common)
            try:
                self.measure(server, "bare waitress", "http", last, spec)
            finally:
                server.stop()
        if "ceiling" in self.phases:
            server = ServeProcess("ceiling", self.workdir, spec, script, tls=True, **common)
            try:
                self.measure(server, "same bytes, dcapd's TLS front", "ceiling", last, spec)
            finally:
                server.stop()


def default_threads() -> int:
    from dcapd.config import SETTINGS

    return int(next(s.default for s in SETTINGS if s.name == "threads"))


def compare_phases(bench: Bench) -> list[str]:
    return [p for p in ("tcb", "pckcert", "mix", "newconn") if p in bench.phases] or ["mix"]


def compare_with(bench: Bench, remote: Remote, spec: dict):
    """The compare phases against the dcapd ``server`` and against the other PCCS, alternating
    (both hold the comparison's upload)."""

    def run(server) -> None:
        count = bench.counts[-1]
        for phase in compare_phases(bench):
            bench.measure(server, "dcapd (same upload)", phase, count, spec)
            bench.measure(remote, "other", phase, count, spec)

    return run


def report(bench: Bench, remote: Remote | None, burst: list) -> None:
    """Summaries (ranges with --repeat), 1 vs N workers, the comparison, the targets."""
    args, runs, counts = bench.args, bench.runs, bench.counts
    last = counts[-1]
    if args.repeat > 1:
        print(f"\nmedian (min - max) of {args.repeat} runs:")
        print(f"{'':<40} {'req/s':>22} {'CPU/req ms':>26} {'peak MiB':>10}")
        for (label, phase, count), rs in runs.items():
            where = f", {count}" if len(counts) > 1 and phase in BY_COUNT else ""
            print(
                f"{label + ' ' + phase + where:<40} "
                f"{spread([r['rps'] for r in rs], '{:.0f}'):>22} "
                f"{spread([r['server_cpu_per_req_ms'] for r in rs]):>26} "
                f"{max(r['hwm_mib'] for r in rs):>10.1f}"
            )
    n = args.workers
    workers_runs = {k: rs for k, rs in runs.items() if k[0] == f"dcapd w{n}"}
    if n > 1 and workers_runs:
        print(f"\nworkers: 1 (default) vs {n} (DCAPD_WORKERS={n}), medians:")
        for phase in bench.phases:
            one, many = runs.get(("dcapd", phase, last)), runs.get((f"dcapd w{n}", phase, last))
            if not one or not many:
                continue
            print(
                f"  {phase:<8} req/s {med(one, 'rps'):.0f} -> {med(many, 'rps'):.0f} "
                f"(x{med(many, 'rps') / med(one, 'rps'):.2f}); CPU/req "
                f"{med(one, 'server_cpu_per_req_ms'):.3f} -> "
                f"{med(many, 'server_cpu_per_req_ms'):.3f} ms; busy "
                f"{med(one, 'machine_busy'):.0%} -> {med(many, 'machine_busy'):.0%}; server "
                f"processes {max(r['server_procs'] for r in many)}; the clients used "
                f"{med(many, 'client_cpu_cores'):.2f} of {os.cpu_count()} cores, leaving "
                f"{os.cpu_count() - med(many, 'client_cpu_cores'):.2f} for the server"
            )
        procs = max(r["server_procs"] for rs in workers_runs.values() for r in rs)
        if procs <= 1:
            print(
                f"  note: dcapd ran as {procs} process with DCAPD_WORKERS={n}: this dcapd has no "
                "[server] workers setting yet (the variable is ignored)"
            )
    if remote is not None:
        print(f"\ncompare with {remote.url} (same upload, same requests), medians:")
        for phase in compare_phases(bench):
            ours, theirs = runs[("dcapd (same upload)", phase, last)], runs[("other", phase, last)]
            cpu = ""
            if remote.pid:
                ours_cpu = med(ours, "server_cpu_per_req_ms")
                theirs_cpu = med(theirs, "server_cpu_per_req_ms")
                cpu = (
                    f"; CPU/req {ours_cpu:.3f} vs {theirs_cpu:.3f} ms (other/dcapd "
                    f"{theirs_cpu / ours_cpu:.2f})"
                )
            print(
                f"  {phase:<8} req/s dcapd {med(ours, 'rps'):.0f} vs other "
                f"{med(theirs, 'rps'):.0f}: ratio dcapd/other "
                f"{med(ours, 'rps') / med(theirs, 'rps'):.2f}" + cpu
            )
        if remote.pid:
            peak = {
                who: max(r["hwm_mib"] for k, rs in runs.items() if k[0] == who for r in rs)
                for who in ("dcapd (same upload)", "other")
            }
            print(
                f"  peak RSS over each process's life (VmHWM, largest process): dcapd "
                f"{peak['dcapd (same upload)']:.0f} MiB, other {peak['other']:.0f} MiB"
            )
        else:
            print("  (server CPU and peak RSS of the other: give --compare-pid)")

    print(
        f"\ntargets (issue 15; dcapd as shipped, default settings, {args.clients} clients, "
        f"{last} platforms" + (f"; median of {args.repeat} runs" if args.repeat > 1 else "") + "):"
    )
    for phase, limit, what in (
        ("tcb", TARGETS["cpu_keepalive_ms"], "/tcb, HTTPS keep-alive"),
        ("pckcert", TARGETS["cpu_keepalive_ms"], "/pckcert, HTTPS keep-alive"),
        ("newconn", TARGETS["cpu_newconn_ms"], "/tcb, new TLS connection per request"),
    ):
        rs = runs.get(("dcapd", phase, last))
        if not rs:
            continue
        value = med(rs, "server_cpu_per_req_ms")
        note = ""
        if phase == "newconn":
            shakes = sum(r["handshakes"] for r in rs)
            if shakes:
                resumed = sum(r["reused"] for r in rs) / shakes
                note = f" ({resumed:.0%} of the handshakes resumed)"
        print(
            f"  server CPU per request, {what} <= {limit:g} ms: "
            f"{spread([r['server_cpu_per_req_ms'] for r in rs])} ms {verdict(value <= limit)}{note}"
        )
    ours, bare = runs.get(("dcapd", "http", last)), runs.get(("bare waitress", "http", last))
    if ours and bare:
        ratio = med(ours, "rps") / med(bare, "rps")
        print(
            f"  plain HTTP req/s dcapd / bare waitress >= {TARGETS['http_ratio']}: {ratio:.2f} "
            f"({med(ours, 'rps'):.0f} / {med(bare, 'rps'):.0f}) "
            f"{verdict(ratio >= TARGETS['http_ratio'])}"
        )
    peaks = [r["hwm_mib"] for k, rs in runs.items() if k[0] == "dcapd" for r in rs]
    if peaks:
        peak = max(peaks)
        print(
            f"  peak RSS <= {TARGETS['rss_mib']:g} MiB: {peak:.1f} MiB (largest dcapd process, "
            f"every run) {verdict(peak <= TARGETS['rss_mib'])}"
        )
    if len(counts) > 1:
        for phase in BY_COUNT:
            first, end = runs.get(("dcapd", phase, counts[0])), runs.get(("dcapd", phase, last))
            if not first or not end:
                continue
            rps = med(end, "rps") / med(first, "rps") - 1
            cpu = med(end, "server_cpu_per_req_ms") / med(first, "server_cpu_per_req_ms") - 1
            flat = abs(rps) <= TARGETS["flat"] and abs(cpu) <= TARGETS["flat"]
            print(
                f"  flat {counts[0]} -> {last} platforms, {phase} (req/s and CPU/req within "
                f"10%): req/s {rps:+.1%}, CPU/req {cpu:+.1%} {verdict(flat)}"
            )
    else:
        print("  flatness: run with --sweep 10,10000")
    mix = runs.get(("dcapd", "mix", last))
    if mix:
        p99 = med(mix, "p99_ms")
        print(
            f"  (issue 7) p99 of the HTTPS mix <= {TARGETS['p99_ms']:g} ms: {p99:.1f} ms "
            f"{verdict(p99 <= TARGETS['p99_ms'])}"
        )
    if burst:
        print(
            f"  (issue 7) cold burst = 1 upstream call: "
            f"{', '.join(f'{w} {c}' for w, c, _, _ in burst)} "
            f"{verdict(all(c == 1 for _, c, _, _ in burst))}"
        )
    if n <= 1:
        print("  workers: run with --workers 2")
    noisy = max((r["other_cores"] for rs in runs.values() for r in rs), default=0.0)
    if noisy > 0.05:
        print(
            f"warning: other processes used up to {noisy:.2f} cores during the runs; the "
            "figures are pessimistic (run again on an idle machine, or --repeat)"
        )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve:
        return serve_main(args.serve)
    phases = parse_phases(args)
    counts = [int(c) for c in args.sweep.split(",")] if args.sweep else [args.platforms]
    if args.repeat is None:  # single runs vary by about 15%: flatness needs medians
        args.repeat = 3 if len(counts) > 1 else 1
    if any(c < 1 for c in counts) or args.clients < 1 or args.duration <= 0 or args.repeat < 1:
        raise SystemExit("bench: platforms, clients, duration and repeat must be positive")
    fixtures = args.fixtures.resolve()
    if not (fixtures / "pcs").is_dir():
        raise SystemExit(f"bench: no fixtures at {fixtures} (give --fixtures PATH)")
    scenarios = use_fixtures(fixtures)
    remote = Remote(args.compare_url, args.compare_pid) if args.compare_url else None

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dcapd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    roots = write_trusted_roots(workdir / "trusted_roots.pem")
    try:
        if args.cache_url:
            return compare_backends(args, workdir, roots, scenarios, counts[-1])
        bench = Bench(args, workdir, roots, phases, counts)
        print(
            f"dcapd bench: phases {', '.join(phases)}; {args.clients} clients "
            + (
                f"({min(args.client_procs, args.clients)} processes"
                if args.client_procs
                else "(threads of this process"
            )
            + f"{', pinned to CPUs ' + str(bench.client_cpus) if args.pin else ', unpinned'}); "
            f"{args.duration:g} s per run (+{args.warmup:g} s warm-up); dcapd: python -m dcapd"
            f" with its defaults{' + ' + str(bench.extra) if bench.extra else ''}; "
            f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}",
            flush=True,
        )
        for count in counts:
            cache_dir = workdir / f"cache-{count}"
            spec = warm_cache(cache_dir, roots, scenarios, count, args.tcbs_per_platform)
            size = sum(f.stat().st_size for f in cache_dir.iterdir() if f.is_file())
            print(
                f"warm cache: {count} platforms, {spec['entries']} entries, "
                f"{size / 2**20:.0f} MiB on disk, {spec['warm_s']:.1f} s; sqlite per "
                f"connection: {sqlite_settings(cache_dir, args)}",
                flush=True,
            )
            bench.specs[count] = (cache_dir, spec)

        worker_runs: list = [("dcapd", None)]
        if args.workers > 1:
            worker_runs.append((f"dcapd w{args.workers}", args.workers))
        compare = None
        if remote is not None:
            bodies, compare_spec = compare_uploads(counts[-1])
            took = apply_uploads(bench.specs[counts[-1]][0], roots, bodies)
            print(
                f"compare: the {counts[-1]}-platform cache also holds the comparison's upload "
                f"({len(bodies)} bodies, {took:.1f} s)",
                flush=True,
            )
            if args.compare_admin_token:
                put_collateral(
                    remote.host,
                    remote.port,
                    remote.tls,
                    args.compare_admin_token,
                    bodies,
                    verify=not args.compare_insecure,
                )
                print(f"compare: uploaded to {remote.url} (PUT /platformcollateral)", flush=True)
            compare = compare_with(bench, remote, compare_spec)
        print(f"\n{HEADER}", flush=True)
        for _ in range(args.repeat):
            for label, workers in worker_runs:
                bench.dcapd_phases(label, workers, compare if workers is None else None)
            bench.ceilings()

        if args.profile_server:
            cache_dir, spec = bench.specs[counts[-1]]
            out = workdir / "server.pstats"
            server = ServeProcess(
                "dcapd",
                workdir,
                spec,
                Path(__file__).resolve(),
                tls=True,
                cache_dir=str(cache_dir),
                roots=str(roots),
                threads=args.threads,
                cpus=pinning(args)[0],
                profile_out=str(out),
            )
            try:
                bench.measure(server, "dcapd's Server, profiled", "mix", counts[-1], spec)
            finally:
                server.stop()
            for line in profile_summary(out, args.top):
                print(line, flush=True)

        burst = []
        if args.burst > 0:
            burst = cold_burst(
                workdir, roots, scenarios, "http" not in phases[:1], args.burst, args.burst_delay
            )
            for what, calls, ok, note in burst:
                print(
                    f"cold burst: {args.burst} concurrent identical {what} misses "
                    f"(LAZY, fake PCS answering in {args.burst_delay:g} s) -> {calls} "
                    f"upstream call{'s' if calls != 1 else ''}, {ok}/{args.burst} answered "
                    f"200 {note}".rstrip(),
                    flush=True,
                )
        if args.app_hits > 0:
            cache_dir, spec = bench.specs[counts[-1]]
            for line in app_cost(
                cache_dir, roots, spec, args.profile, args.top, not args.no_metrics, n=args.app_hits
            ):
                print(line, flush=True)
        report(bench, remote, burst)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
