"""The servers ``scripts/bench.py`` measures, and how it measures their CPU and memory.

* :class:`DcapdCommand`: dcapd as a user runs it, ``python -m dcapd --config FILE`` (the
  benchmark's settings in an ini file, dcapd's defaults for everything else, ``DCAPD_WORKERS``
  when asked).
* :class:`ServeProcess`: this script's own ``--serve`` child: a bare waitress serving the same
  bytes (the plain HTTP ceiling), the same bytes behind dcapd's TLS front (the HTTPS ceiling),
  or dcapd's app under cProfile (``--profile-server``).
* :class:`Remote`: another PCCS already running (``--compare-url``), loaded over its admin
  route with the same upload.

Server CPU and peak RSS are read from outside, from ``/proc/<pid>`` of the server process and
of every process under it (worker processes), so the clients' work is never in them.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from bench_data import REPO, bench_config, ceiling_app

READY_TIMEOUT = 60.0
# The benchmark's own settings; dcapd's defaults for everything else. OFFLINE as in issue 15's
# measurements: a miss (a bug here) is a 404 counted as an error, nothing leaves the machine.
DCAPD_SETTINGS = {
    "cache": {"mode": "OFFLINE"},
    "upstream": {
        "pcs_url": "http://127.0.0.1:9/sgx/certification/v4/",
        "rootca_crl_url": "http://127.0.0.1:9/IntelSGXRootCA.der",
        "retries": "0",
        "timeout": "5",
    },
    # Not a speed setting: stops between runs do not wait 10 s for idle keep-alive clients.
    "server": {"grace_period": "2"},
}


# ------------------------------------------------------------------------------------------
# CPU and memory of a process tree, from outside
# ------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, utime + stime ticks) of ``pid`` from /proc, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12])


def tree_pids(root: int) -> list[int]:
    """``root`` and every process under it (dcapd's worker processes), from /proc."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _proc_stat(int(name))
            if stat:
                parents.setdefault(stat[0], []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, ()))
    return out


def _status(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name in ("VmHWM", "VmRSS", "Threads"):
                    values[name] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return values


def tree_stats(root: int | None) -> dict:
    """CPU seconds (all processes of the tree, all threads), the largest peak RSS of one of
    them (VmHWM), thread and process counts. Linux: /proc; elsewhere psutil if installed
    (peak RSS is then the current RSS); else NaN."""
    nan = float("nan")
    stats = {"cpu_s": nan, "hwm_kib": nan, "rss_kib": nan, "threads": 0, "procs": 0}
    if root is None:
        return stats
    if os.path.isdir("/proc/self"):
        pids = tree_pids(root)
        ticks = [_proc_stat(pid) for pid in pids]
        status = [_status(pid) for pid in pids]
        stats["cpu_s"] = sum(t[1] for t in ticks if t) / os.sysconf("SC_CLK_TCK")
        stats["hwm_kib"] = max((s.get("VmHWM", 0) for s in status), default=0)
        stats["rss_kib"] = max((s.get("VmRSS", 0) for s in status), default=0)
        stats["threads"] = sum(s.get("Threads", 0) for s in status)
        stats["procs"] = sum(1 for t in ticks if t)
        return stats
    try:
        import psutil  # type: ignore[import-not-found]
    except ImportError:
        return stats
    try:
        procs = [psutil.Process(root)]
        procs += procs[0].children(recursive=True)
        times = [p.cpu_times() for p in procs]
        stats["cpu_s"] = sum(t.user + t.system for t in times)
        stats["hwm_kib"] = stats["rss_kib"] = max(p.memory_info().rss for p in procs) / 1024
        stats["threads"] = sum(p.num_threads() for p in procs)
        stats["procs"] = len(procs)
    except psutil.Error:
        pass
    return stats


# ------------------------------------------------------------------------------------------
# Talking to a server: readiness and uploads (http.client; the load uses bench_load)
# ------------------------------------------------------------------------------------------


def unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a self-signed certificate on loopback
    return ctx


def request(
    host: str,
    port: int,
    tls: bool,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
    verify: bool = False,
    timeout: float = 120.0,
) -> tuple[int, bytes]:
    """One request on a new connection: (status, body)."""
    conn: http.client.HTTPConnection
    if tls:
        ctx = ssl.create_default_context() if verify else unverified_context()
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(host: str, port: int, tls: bool, proc: subprocess.Popen, log) -> None:
    """Until GET /readyz answers 200 (dcapd) or anything answers (the others)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"bench: the server exited ({proc.returncode}):\n{log()}")
        try:
            status, _ = request(host, port, tls, "GET", "/readyz", timeout=5)
            if status in (200, 404):  # 404: not dcapd (the ceilings)
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: the server is not ready after {READY_TIMEOUT:g} s:\n{log()}")
        time.sleep(0.1)


def put_collateral(
    host: str, port: int, tls: bool, token: str, bodies: list[dict], verify: bool
) -> None:
    """PUT /sgx/certification/v4/platformcollateral each body, as Intel's PccsAdminTool does."""
    for body in bodies:
        status, answer = request(
            host,
            port,
            tls,
            "PUT",
            "/sgx/certification/v4/platformcollateral",
            json.dumps(body).encode(),
            {
                "Content-Type": "application/json",
                "admin-token": token,
                "User-Agent": "pccsadmin/0.1",
            },
            verify=verify,
            timeout=600,
        )
        if status != 200:
            raise SystemExit(
                f"bench: PUT /platformcollateral on {host}:{port} answered {status}: "
                f"{answer[:300]!r}"
            )


def free_port() -> int:
    """A free loopback port (dcapd gets a fixed port: its workers share it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Logged:
    """A server child whose output goes to a log file."""

    log_path: Path
    proc: subprocess.Popen

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    @property
    def pid(self) -> int:
        return self.proc.pid


# ------------------------------------------------------------------------------------------
# dcapd as shipped: the dcapd command
# ------------------------------------------------------------------------------------------


class DcapdCommand(_Logged):
    """``python -m dcapd --config FILE`` on a free port, from this checkout, with dcapd's
    defaults but for the benchmark's settings (:data:`DCAPD_SETTINGS`, the cache, the
    trusted roots) and ``extra`` (``[section]
    key``: value). The environment's own ``DCAPD_*`` variables are not passed on (they would
    override the file); ``workers`` sets ``DCAPD_WORKERS``."""

    host = "127.0.0.1"

    def __init__(
        self,
        name: str,
        workdir: Path,
        cache_dir: Path,
        roots: Path,
        tls: bool,
        workers: int | None = None,
        extra: dict | None = None,
    ):
        self.name, self.tls = name, tls
        self.port = free_port()
        sections: dict[str, dict[str, str]] = {
            section: dict(values) for section, values in DCAPD_SETTINGS.items()
        }
        sections["server"].update(listen=f"127.0.0.1:{self.port}", tls="auto" if tls else "off")
        sections["cache"]["dir"] = str(cache_dir)
        sections["upstream"]["trusted_roots"] = str(roots)
        for (section, key), value in (extra or {}).items():
            sections.setdefault(section, {})[key] = value
        ini = workdir / f"dcapd-{name}.ini"
        ini.write_text(
            "".join(
                f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
                for section, values in sections.items()
            )
        )
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("DCAPD_") and k not in ("INTEL_API_KEY", "CACHE_DIRECTORY")
        }
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        self.workers = workers
        if workers is not None:
            env["DCAPD_WORKERS"] = str(workers)
        self.log_path = workdir / f"dcapd-{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dcapd", "--config", str(ini)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=str(REPO),
                env=env,
                creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0),
            )
        try:
            wait_ready(self.host, self.port, tls, self.proc, self.log_tail)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Gracefully, as a service manager does (SIGTERM; Windows: Ctrl-Break)."""
        if self.proc.poll() is None:
            try:
                if os.name == "nt":
                    self.proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
                else:
                    self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ------------------------------------------------------------------------------------------
# This script's own server child (--serve): the ceilings, and dcapd under cProfile
# ------------------------------------------------------------------------------------------


class ServeProcess(_Logged):
    """``bench.py --serve SPEC``: ``kind`` ``waitress`` (bare waitress, the same bytes),
    ``ceiling`` (the same bytes through dcapd's ``Server``: its TLS front) or ``dcapd``
    (dcapd's app in dcapd's ``Server``, for ``--profile-server``). Stops when stdin closes."""

    host = "127.0.0.1"

    def __init__(self, kind: str, workdir: Path, spec: dict, bench_script: Path, **settings):
        self.name, self.tls = kind, settings.get("tls", False)
        spec_file = workdir / f"serve-{kind}.json"
        spec_file.write_text(json.dumps(dict(spec, kind=kind, **settings)))
        self.log_path = workdir / f"serve-{kind}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(bench_script), "--serve", str(spec_file)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=str(REPO),
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.stop()
            raise SystemExit(f"bench: the {kind} server did not start:\n{self.log_tail()}")
        self.port = json.loads(line)["port"]
        wait_ready(self.host, self.port, self.tls, self.proc, self.log_tail)

    def stop(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def pin_like_dcapd(cpus: list) -> str:
    """The CPU(s) a ceiling runs on: those given (--pin), else the one dcapd's default
    ``cpu_affinity = auto`` picks (the first allowed), so a ceiling is not slowed by what dcapd
    avoids. Returns a description."""
    if not hasattr(os, "sched_setaffinity"):
        return "any CPU"
    chosen = set(cpus) if cpus else set(sorted(os.sched_getaffinity(0))[:1])
    os.sched_setaffinity(0, chosen)
    return "CPU " + ",".join(map(str, sorted(chosen)))


def serve_main(spec_file: str) -> int:
    """The ``--serve`` child: serve until stdin closes."""
    spec = json.loads(Path(spec_file).read_text())
    kind = spec["kind"]
    profiles: list = []
    if kind == "waitress":
        pin_like_dcapd(spec.get("cpus") or [])
        from waitress.server import create_server

        wsgi = create_server(
            ceiling_app(spec), host="127.0.0.1", port=0, threads=spec["threads"] or 4
        )
        print(json.dumps({"port": wsgi.effective_port}), flush=True)
        threading.Thread(target=wsgi.run, daemon=True).start()
        for _ in sys.stdin:
            pass
        wsgi.close()
        return 0

    from dcapd.cli import pin_to_cpus
    from dcapd.server import Server

    overrides = dict(tls="auto" if spec["tls"] else "off")
    if spec.get("threads"):
        overrides["threads"] = spec["threads"]
    if spec.get("cpus"):
        overrides["cpu_affinity"] = ",".join(map(str, spec["cpus"]))
    config = bench_config(Path(spec["cache_dir"]), Path(spec["roots"]), **overrides)
    pin_to_cpus(config.cpu_affinity)
    if spec.get("profile_out"):
        import cProfile

        def profile_this_thread(frame, event, arg):  # first event in each new thread
            sys.setprofile(None)
            profile = cProfile.Profile(time.thread_time)  # CPU time, not time spent waiting
            profiles.append(profile)
            profile.enable()

        threading.setprofile(profile_this_thread)
    if kind == "dcapd":
        from dcapd.app import create_app
        from dcapd.logs import configure_from

        configure_from(config)  # as the dcapd command: at "info", one line per request
        app = create_app(config)
    else:
        app = ceiling_app(spec)
    server = Server(app, config).start()
    print(json.dumps({"port": server.port}), flush=True)
    try:
        for _ in sys.stdin:
            pass
    finally:
        server.stop()
        if kind == "dcapd":
            app.services.store.close()
            app.services.upstream.close()
        if profiles:
            import pstats

            stats = pstats.Stats(profiles[0])
            for profile in profiles[1:]:
                stats.add(profile)
            stats.dump_stats(spec["profile_out"])
    return 0


# ------------------------------------------------------------------------------------------
# Another PCCS, already running (--compare-url)
# ------------------------------------------------------------------------------------------


class Remote:
    """A PCCS the benchmark did not start: its URL, and its server process if given (CPU and
    peak RSS need ``--compare-pid``)."""

    def __init__(self, url: str, pid: int | None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SystemExit(f"bench: --compare-url {url!r}: expected http(s)://host:port")
        if parts.path not in ("", "/"):
            raise SystemExit("bench: --compare-url: give the server's root (PCCS routes are fixed)")
        self.name, self.url = "other", url
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.pid = pid

    def log_tail(self, lines: int = 20) -> str:
        return f"(see the log of the PCCS at {self.url})"

    def stop(self) -> None:
        pass
