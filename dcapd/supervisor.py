"""Several dcapd processes on one port and one cache (``[server] workers``, Linux).

Why processes: CPython runs one thread at a time per process, so one dcapd process uses about
one CPU however many it is given (and runs fastest pinned to one: ``cpu_affinity``). With
``workers = N`` the ``dcapd`` process becomes a supervisor that serves nothing itself: it
starts N worker processes, each the same ``python -m dcapd`` command line (started with
:mod:`subprocess`, never ``fork()``: a forked copy of a threaded process is not safe), told
its number and the port in ``DCAPD_WORKER_INDEX`` / ``DCAPD_WORKER_PORT``. Each worker binds
the public address itself with ``SO_REUSEPORT`` and the kernel spreads new connections over
them; each runs on its own CPU (worker *i* on the *i*-th CPU allowed, or listed in
``cpu_affinity``, modulo their count; ``cpu_affinity = all``: no pinning).

Before any worker starts, the supervisor does what must happen once: it checks the
configuration and opens the cache (a schema migration runs once, not raced by N), makes the
generated TLS certificate (kept in ``<cache_dir>/tls``; on a PostgreSQL cache, in an
anonymous memory file the workers inherit, never on disk) so every worker presents the same
one, and reserves the port: a first plain bind proves no other program (another dcapd
included) listens on it, then a ``SO_REUSEPORT`` socket bound without ``listen()`` keeps it
(with ``port = 0``, the port chosen) while the workers run; it gets no connections.

The refresh schedule runs in worker 0 only. The cross-process refresh lock and its "unless
done since it was due" rule make N schedules firing at one cron time refresh once, but the
early refresh (an entry's nextUpdate within the margin) is decided from each process's own
clock and memory: N workers checking at different moments would each refresh when upstream has
nothing newer yet. One scheduler gives one refresh per tick by construction; the lock still
keeps an admin's ``/refresh`` (served by any worker) and the schedule from running together.
Worker 0 restarted resumes the schedule within seconds (its check at start).

A worker that exits while not asked to is restarted with a backoff (0.5 s doubling to 30 s
while it keeps dying within 10 s of its start) and the exit logged in one line. SIGTERM or
Ctrl-C to the supervisor forwards SIGTERM to every worker (each stops gracefully, as a single
dcapd does), waits ``grace_period`` plus a margin, kills those still running, and exits 0.
Workers ignore a second stop signal (systemd sends SIGTERM to every process of the service
as well as to the supervisor), and get SIGTERM if the supervisor itself dies.

Elsewhere (Windows; BSD and macOS, whose ``SO_REUSEPORT`` does not spread connections) dcapd
keeps one process and says so in one line. Prometheus metrics are per worker: ``/metrics``
shows the counters of the worker that answered.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, Optional

from . import tls as _tls
from .config import Config
from .sockets import bind_sockets

log = logging.getLogger("dcapd.supervisor")

INDEX_VARIABLE = "DCAPD_WORKER_INDEX"
PORT_VARIABLE = "DCAPD_WORKER_PORT"
TLS_VARIABLE = "DCAPD_WORKER_TLS_FILE"

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
STABLE_AFTER = 10.0  # a worker that ran this long and died is restarted at once (first backoff)
STOP_MARGIN = 5.0  # beyond the grace period, for a worker to close its cache and exit
POLL_INTERVAL = 0.25
_PR_SET_PDEATHSIG = 1
_Handler = Callable[[int, Optional[FrameType]], Any] | int | signal.Handlers | None


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """What the supervisor told this worker process."""

    index: int
    port: int
    tls_file: str = ""  # the shared generated certificate and key (PostgreSQL cache)


def worker_role(environ: Mapping[str, str] | None = None) -> WorkerRole | None:
    """This process's role when a supervisor started it, else None."""
    environ = os.environ if environ is None else environ
    if INDEX_VARIABLE not in environ or PORT_VARIABLE not in environ:
        return None
    return WorkerRole(
        int(environ[INDEX_VARIABLE]), int(environ[PORT_VARIABLE]), environ.get(TLS_VARIABLE, "")
    )


def unsupported_reason() -> str | None:
    """Why this platform cannot run worker processes on one port, or None when it can."""
    if os.name == "nt":
        return "Windows has no SO_REUSEPORT"
    if not sys.platform.startswith("linux"):
        return f"SO_REUSEPORT on {sys.platform} does not spread connections over processes"
    if not hasattr(socket, "SO_REUSEPORT"):  # pragma: no cover - very old Linux
        return "this system has no SO_REUSEPORT"
    return None


def as_worker(config: Config, role: WorkerRole) -> Config:
    """The worker's configuration: the supervisor's port (chosen when the setting says 0) and
    the shared generated certificate, when there is one."""
    config = dataclasses.replace(config, listen=(config.listen_host, role.port), workers=1)
    if role.tls_file:
        config = dataclasses.replace(config, cert_file=role.tls_file, key_file=role.tls_file)
    return config


def worker_cpu(cpu_list: str, index: int) -> int | None:
    """The CPU worker *index* runs on: the index-th of those listed (``auto``: allowed),
    modulo their count; None when not pinned (``all``, or no affinity on this system)."""
    if not cpu_list or not hasattr(os, "sched_getaffinity"):
        return None
    if cpu_list == "auto":
        cpus = sorted(os.sched_getaffinity(0))
    else:
        cpus = [int(cpu) for cpu in cpu_list.split(",")]
    return cpus[index % len(cpus)]


def die_with_parent(role: WorkerRole) -> None:
    """Linux: SIGTERM (a graceful stop) to this worker when its supervisor dies, even by
    SIGKILL, so no orphan keeps serving the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
        log.debug("worker %d: no parent-death signal on this system", role.index)
        return
    if os.getppid() == 1:  # the supervisor died before prctl: stop now
        signal.raise_signal(signal.SIGTERM)


def ignore_second_stop_signal() -> None:
    """A worker's stop is the supervisor's job: once it is serving (``serve_forever`` installs
    its own handlers and puts these back when a stop begins), a second SIGTERM or SIGINT
    while it drains is ignored instead of cutting the requests in flight."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Sockets that hold *host*:*port* (port 0: one chosen) for the workers: bound with
    ``SO_REUSEPORT``, not listening. A plain bind first, so a port that another program
    serves on is refused (``EADDRINUSE``) instead of shared with it."""
    for attempt in range(5):
        probe = bind_sockets(host, port)
        chosen = probe[0].getsockname()[1]
        for sock in probe:
            sock.close()
        try:
            return bind_sockets(host, chosen, reuse_port=True, listen=False)
        except OSError as exc:
            if port == 0 and exc.errno == errno.EADDRINUSE and attempt < 4:
                continue  # taken between the two binds: choose again
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def shared_certificate(config: Config) -> tuple[str, int | None]:
    """Make the generated TLS certificate once, before the workers start: ``("", None)``
    when it is kept in the cache directory (each worker then loads that one) or not needed;
    on a PostgreSQL cache ``(path, fd)`` of an anonymous memory file holding the certificate
    and its key, which the workers inherit (the key never touches the disk)."""
    if config.tls == "off" or config.cert_file:
        return "", None
    if not config.cache_url:
        _tls.kept_certificate(os.path.join(config.cache_dir, "tls"), [config.listen_host])
        return "", None
    cert_pem, key_pem = _tls.generate_self_signed([config.listen_host])
    fd = os.memfd_create("dcapd-tls", os.MFD_CLOEXEC)
    view = memoryview(cert_pem + b"\n" + key_pem)
    while view:
        view = view[os.write(fd, view) :]
    return f"/proc/self/fd/{fd}", fd


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:  # pragma: no cover
            return f"signal {-code}"
    return f"exit code {code}"


class _Slot:
    """One worker number: its current process and its restart state."""

    def __init__(self, index: int):
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.restart_at = 0.0
        self.quick_deaths = 0


class Supervisor:
    """Runs ``count`` workers of the ``dcapd`` command line *argv* until SIGTERM/SIGINT."""

    def __init__(self, config: Config, argv: Sequence[str], count: int):
        self.config = config
        self.argv = list(argv)
        self.count = count
        self.port = 0
        self.tls_file = ""
        self.pass_fds: tuple[int, ...] = ()
        self.slots = [_Slot(i) for i in range(count)]
        self._stop = threading.Event()
        self._signal_name = ""

    def run(self) -> int:
        """Serve until a stop signal; 0 then. OSError when the address cannot be reserved."""
        restore = self._install_signal_handlers()
        reserved: list[socket.socket] = []
        try:
            reserved = reserve_port(self.config.listen_host, self.config.listen_port)
            self.port = reserved[0].getsockname()[1]
            self.tls_file, fd = shared_certificate(self.config)
            self.pass_fds = () if fd is None else (fd,)
            for slot in self.slots:
                self._spawn(slot)
            log.info(
                "supervisor: %d workers on %s port %d, pids %s",
                self.count,
                self.config.listen_host,
                self.port,
                ", ".join(str(s.process.pid) for s in self.slots if s.process is not None),
            )
            while not self._stop.wait(POLL_INTERVAL):
                self._check_workers()
            self._stop_workers()
            return 0
        finally:
            for sock in reserved:
                sock.close()
            for fd in self.pass_fds:
                os.close(fd)
            for signum, previous in restore:
                signal.signal(signum, previous)

    def _install_signal_handlers(self) -> list[tuple[signal.Signals, _Handler]]:
        restore: list[tuple[signal.Signals, _Handler]] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            restore.append((signum, signal.signal(signum, self._on_signal)))
        return restore

    def _on_signal(self, signum, frame) -> None:
        self._signal_name = signal.Signals(signum).name
        self._stop.set()

    def _spawn(self, slot: _Slot) -> None:
        env = dict(os.environ)
        env[INDEX_VARIABLE] = str(slot.index)
        env[PORT_VARIABLE] = str(self.port)
        if self.tls_file:
            env[TLS_VARIABLE] = self.tls_file
        slot.started = time.monotonic()
        try:
            slot.process = subprocess.Popen(
                [sys.executable, "-m", "dcapd", *self.argv],
                env=env,
                stdin=subprocess.DEVNULL,
                pass_fds=self.pass_fds,
            )
        except OSError as exc:  # e.g. out of processes: try again later
            slot.process = None
            self._schedule_restart(slot, f"could not start ({exc})")

    def _schedule_restart(self, slot: _Slot, what: str) -> None:
        now = time.monotonic()
        ran = now - slot.started
        slot.quick_deaths = slot.quick_deaths + 1 if ran < STABLE_AFTER else 1
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (slot.quick_deaths - 1))
        slot.restart_at = now + delay
        log.warning(
            "worker %d %s after %.1f s; restarting it in %.1f s", slot.index, what, ran, delay
        )

    def _check_workers(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is not None:
                code = slot.process.poll()
                if code is None:
                    continue
                what = f"(pid {slot.process.pid}) exited with {_describe_exit(code)}"
                slot.process = None
                self._schedule_restart(slot, what)
            elif now >= slot.restart_at:
                self._spawn(slot)
                if slot.process is not None:
                    log.info("worker %d restarted (pid %d)", slot.index, slot.process.pid)

    def _stop_workers(self) -> None:
        running = [(s.index, s.process) for s in self.slots if s.process is not None]
        log.info(
            "%s received: stopping %d worker(s) (grace period %g s)",
            self._signal_name,
            len(running),
            self.config.grace_period,
        )
        for _, process in running:
            try:
                process.send_signal(signal.SIGTERM)
            except OSError:  # pragma: no cover - already gone
                pass
        deadline = time.monotonic() + self.config.grace_period + STOP_MARGIN
        for index, process in running:
            try:
                code = process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "worker %d (pid %d) still running %g s after SIGTERM: killed",
                    index,
                    process.pid,
                    self.config.grace_period + STOP_MARGIN,
                )
                process.kill()
                code = process.wait()
            if code != 0:  # e.g. stopped while still starting
                log.info(
                    "worker %d (pid %d) exited with %s",
                    index,
                    process.pid,
                    _describe_exit(code),
                )
        log.info("all workers stopped")
