"""Serving dcapd's WSGI app: dcapd's asyncio front before waitress.

Design (design.md §5, stack.md §1.3-1.4), the same for ``tls = auto`` and ``tls = off``:
the asyncio front (:mod:`dcapd.tlsfront`) accepts clients on the public address (TLS, or
plain HTTP with ``tls = off``, behind nginx/IIS/Caddy), reads every request head itself and
applies the deadlines and body rules; a request without a body (every PCCS collateral
``GET``) is answered in the front by waitress's own parser and task in a thread pool
(:mod:`dcapd.direct`), and a request with a body is relayed to waitress, listening on an
ephemeral ``127.0.0.1`` port.

  Note: the loopback backend port speaks plain HTTP and any local process can
  reach it; requests arriving there directly are seen with their own
  127.0.0.1 address and ``http`` scheme.  Authentication happens in the app.

This module binds the sockets, builds waitress's arguments from the configuration (in one
place), and starts and stops everything. Only public waitress API is used
(``create_server(app, map=..., sockets=[...])``, its ``wasyncore`` loop, ``task_dispatcher``
and ``pull_trigger``), no fork and no POSIX-only signals, so this runs on Windows too.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import ssl
import threading
import time
from typing import Any, Callable

from waitress import wasyncore
from waitress.server import BaseWSGIServer, MultiSocketServer, create_server
from waitress.trigger import trigger

from . import tls as _tls
from .config import Config
from .direct import DirectAnswers
from .gate import BodyGate, BodyGateMiddleware
from .lifecycle import Lifecycle
from .sockets import bind_sockets, raise_fd_limit, strip_brackets
from .tlsfront import PeerRestoringMiddleware, TlsFront

__all__ = ["Server", "waitress_options", "bind_sockets", "PeerRestoringMiddleware"]


log = logging.getLogger("dcapd.server")

_STOP_TIMEOUT = 10.0
_BACKEND_HEADROOM = 8

# waitress logs to "waitress" (and "waitress.queue"); with no handler configured
# anywhere Python's last-resort handler would print its warnings to stderr.
# A NullHandler keeps that quiet while still propagating to any configured root.
logging.getLogger("waitress").addHandler(logging.NullHandler())


def waitress_options(
    config: Config, *, sockets: list[socket.socket] | None = None
) -> dict[str, Any]:
    """All waitress arguments, built in one place from *config*.

    ``threads``, ``connection_limit``, ``channel_timeout`` and ``max_body_bytes``
    (waitress's ``max_request_body_size``) come from the configuration (their defaults live in
    ``dcapd.config.SETTINGS`` only); *sockets*, when given, are pre-bound listening sockets
    for ``waitress.create_server``.

    waitress only ever serves dcapd's front (TLS or plain), which enforces the deadlines itself
    and holds at most ``connection_limit`` connections to waitress; waitress gets room for those
    plus its own listening socket and wake-up pipe and a few local clients.
    """
    connection_limit = config.connection_limit + _BACKEND_HEADROOM
    channel_timeout = config.channel_timeout
    opts: dict[str, Any] = {
        "threads": config.threads,
        "connection_limit": connection_limit,
        "channel_timeout": channel_timeout,
        # Idle channels are only reaped at each cleanup pass (default every 30 s).
        "cleanup_interval": max(1, min(30, channel_timeout // 2)),
        "ident": "dcapd",
        # dcapd clears them itself (PeerRestoringMiddleware) but from [server] trusted_proxies:
        # waitress's own rule trusts no proxy here and would drop X-Forwarded-For before the
        # access log could name the client behind a trusted proxy.
        "clear_untrusted_proxy_headers": False,
        "log_untrusted_proxy_headers": False,
        "expose_tracebacks": False,
        # waitress refuses a body of max_request_body_size bytes or more; dcapd's limit is the
        # largest body it accepts, so one more.
        "max_request_body_size": config.max_body_bytes + 1,
        # select() cannot watch fds >= FD_SETSIZE (1024 on Linux); with the TLS
        # front holding two sockets per client the backend's fds get high fast.
        # Windows has no poll() in waitress's loop, and its select() limit is on
        # the count of sockets (512 in CPython), not their values.
        "asyncore_use_poll": os.name != "nt",
        "asyncore_loop_timeout": 1,
        "log_socket_errors": False,
    }
    if sockets is not None:
        opts["sockets"] = list(sockets)
    return opts


class Server:
    """dcapd's HTTP(S) server: the asyncio front (TLS when ``tls == 'auto'``) and waitress.

    ``Server(app, config).start()`` returns once listening; ``.port`` and
    ``.url`` then give the bound address; ``.fingerprint`` is the
    certificate's SHA-256 fingerprint (HTTPS only).  ``stop()`` is idempotent.
    """

    def __init__(
        self,
        app: Callable,
        config: Config,
        gate: BodyGate | None | bool = True,
        lifecycle: Lifecycle | None = None,
        reuse_port: bool = False,
    ):
        """*gate*: the body rules (:mod:`dcapd.gate`), applied by the TLS front from each
        request head and in front of *app*; ``True`` (default): dcapd's, built from *config*;
        ``None``: any body up to ``max_body_bytes`` on any path (for other WSGI apps).
        *lifecycle*: set draining when a stop begins (the app's ``/readyz`` reads it).
        *reuse_port*: the public address is bound with ``SO_REUSEPORT`` (one of several
        worker processes on one port, Linux)."""
        self.app = app
        self.lifecycle = lifecycle if lifecycle is not None else Lifecycle()
        self.grace_period = float(getattr(config, "grace_period", 10.0))
        self.config = config
        self.gate: BodyGate | None = BodyGate(config) if gate is True else gate or None
        self.listen_host: str = config.listen_host
        self.listen_port: int = config.listen_port
        if config.tls not in ("auto", "off"):
            raise ValueError(f"tls must be 'auto' or 'off', not {config.tls!r}")
        self.tls = config.tls
        self.reuse_port = reuse_port
        if not config.tls_handshake_timeout > 0:
            raise ValueError("tls_handshake_timeout must be > 0")
        self.port: int | None = None
        self.url: str | None = None
        self.fingerprint: str | None = None
        self.backend_port: int | None = None
        self.addresses: list[tuple[str, int]] = []

        self._lock = threading.RLock()
        self._started = False
        self._running = False
        self._stopped = threading.Event()
        self._public_socks: list[socket.socket] = []
        # waitress
        self._wmap: dict[int, Any] = {}
        self._wserver: MultiSocketServer | BaseWSGIServer | None = None
        self._wthread: threading.Thread | None = None
        self._wstop = threading.Event()
        # TLS front
        self._peers: dict[tuple[str, str], tuple[str, int]] = {}
        self._front: TlsFront | None = None
        self._direct: DirectAnswers | None = None

    # -- public API ---------------------------------------------------------

    def start(self) -> Server:
        with self._lock:
            if self._started:
                raise RuntimeError("server already started")
            self._started = True
            self._stopped.clear()
            try:
                self._start()
            except BaseException:
                self._shutdown()
                self._started = False
                raise
            self._running = True
        return self

    def stop(self) -> None:
        with self._lock:
            if not self._started:
                self._stopped.set()
                return
            self._started = False
            self._running = False
            try:
                self._shutdown()
            finally:
                self._stopped.set()

    def serve_forever(self) -> None:
        """start(), then block until stop(), Ctrl-C or SIGTERM; always stop() at the end."""
        if not self._started:
            self.start()
        restore = []
        if threading.current_thread() is threading.main_thread():
            # One path for all: SIGTERM, Ctrl-C (SIGINT), and on Windows Ctrl-Break and a
            # service stop (console control events Python delivers as SIGBREAK).
            for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
                signum = getattr(signal, name, None)
                if signum is None:
                    continue
                try:
                    restore.append((signum, signal.signal(signum, self._on_signal)))
                except (OSError, ValueError, RuntimeError):  # pragma: no cover
                    pass
        try:
            # A timed wait keeps Ctrl-C responsive on Windows.
            while not self._stopped.wait(0.5):
                pass
        except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled above
            log.info("interrupted, shutting down")
            self.lifecycle.drain()
        finally:
            for signum, previous in restore:
                try:
                    signal.signal(signum, previous)
                except (OSError, ValueError, RuntimeError):  # pragma: no cover
                    pass
            self.stop()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True from the end of start() until stop() (or a stop signal)."""
        return self._running and not self._stopped.is_set()

    # -- start / stop -------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:  # pragma: no cover - exercised manually
        try:
            name = signal.Signals(signum).name
        except ValueError:  # pragma: no cover
            name = str(signum)
        log.info("%s received: shutting down (grace period %g s)", name, self.grace_period)
        self.lifecycle.drain()
        self._stopped.set()

    def _start(self) -> None:
        raise_fd_limit()
        self._public_socks = bind_sockets(
            self.listen_host, self.listen_port, reuse_port=self.reuse_port
        )
        self.addresses = [tuple(s.getsockname()[:2]) for s in self._public_socks]
        self.port = self.addresses[0][1]
        scheme = "http" if self.tls == "off" else "https"
        self.url = f"{scheme}://{self._url_host()}:{self.port}"

        app = self.app if self.gate is None else BodyGateMiddleware(self.app, self.gate)
        ctx: ssl.SSLContext | None = None
        if self.tls == "auto":
            # The generated certificate is kept in the cache directory (none on PostgreSQL).
            keep_in = "" if self.config.cache_url else os.path.join(self.config.cache_dir, "tls")
            ctx, self.fingerprint = _tls.server_ssl_context(
                self.config.cert_file, self.config.key_file, [self.listen_host], keep_in
            )
        # The front (TLS or, with tls = off, plain) reads every request head and answers
        # bodiless requests itself; requests with a body go on to waitress on loopback.
        backend = bind_sockets("127.0.0.1", 0)
        self.backend_port = backend[0].getsockname()[1]
        public_port = self.port
        https = ctx is not None
        app = PeerRestoringMiddleware(
            app, self._peers, lambda: public_port, https, self.config.trusted_proxies
        )
        self._start_waitress(app, backend)
        # Answers are tried in the front's thread first when the app says it can (dcapd's,
        # on a cache directory: dcapd.inline), never for another WSGI app.
        inline = bool(getattr(self.app, "answers_inline", False))
        self._direct = DirectAnswers(self._wserver, public_port, self.config.threads, https, inline)
        self._front = TlsFront(self.backend_port, self._peers, self.config, self.gate, self._direct)
        self._front.start(ctx, self._public_socks)
        log.info(
            "dcapd listening on %s (event loop: %s)",
            ", ".join(self._fmt_addr(a) for a in self.addresses),
            self._front.loop_name,
        )

    def _shutdown(self) -> None:
        """Stop accepting, let requests in flight finish within the grace period, close."""
        self.lifecycle.drain()
        deadline = time.monotonic() + self.grace_period
        self._close_listeners()
        if self._front is not None:
            self._front.stop(self.grace_period)
            self._front = None
        if self._direct is not None:
            self._direct.close(max(0.0, deadline - time.monotonic()))
            self._direct = None
        self._stop_waitress(max(0.0, deadline - time.monotonic()))
        for sock in self._public_socks:
            try:
                sock.close()
            except OSError:  # pragma: no cover
                pass
        self._public_socks = []
        self._peers.clear()

    def _url_host(self) -> str:
        host = strip_brackets(self.listen_host)
        if host in ("", "*", "0.0.0.0"):
            return "127.0.0.1"
        if host == "::":
            return "[::1]"
        try:
            if ipaddress.ip_address(host.split("%", 1)[0]).version == 6:
                return f"[{host}]"
        except ValueError:
            pass
        return host

    @staticmethod
    def _fmt_addr(addr) -> str:
        host, port = addr[0], addr[1]
        return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)

    # -- waitress -----------------------------------------------------------

    def _start_waitress(self, app: Callable, socks: list[socket.socket]) -> None:
        self._wmap = {}
        self._wstop.clear()
        # create_server registers every listening socket in our own map; the
        # loop below runs waitress's wasyncore loop on it until told to stop.
        self._wserver = create_server(
            app,
            map=self._wmap,
            **waitress_options(self.config, sockets=socks),
        )
        self._wthread = threading.Thread(
            target=self._run_waitress, name="dcapd-waitress", daemon=True
        )
        self._wthread.start()

    def _run_waitress(self) -> None:
        assert self._wserver is not None, "started by _start_waitress"
        adj = self._wserver.adj
        try:
            while not self._wstop.is_set() and self._wmap:
                wasyncore.loop(
                    timeout=adj.asyncore_loop_timeout,
                    map=self._wmap,
                    use_poll=adj.asyncore_use_poll,
                    count=1,
                )
        except BaseException:  # pragma: no cover - a waitress bug; make serve_forever() return
            log.exception("waitress loop failed")
            self._stopped.set()

    def _close_listeners(self) -> None:
        """waitress stops accepting: its listening sockets are closed in its loop thread."""

        def close() -> None:
            for disp in list(self._wmap.values()):
                if isinstance(disp, BaseWSGIServer):
                    disp.close()

        if self._wthread is not None and self._wthread.is_alive():
            self._wake_waitress(close)

    def _wake_waitress(self, thunk: Callable[[], None] | None = None) -> None:
        """Wake waitress's loop (running *thunk* in its thread first, when given)."""
        for disp in list(self._wmap.values()):
            if isinstance(disp, trigger):
                try:
                    disp.pull_trigger(thunk)  # type: ignore[arg-type]  # called as thunk()
                except OSError:  # pragma: no cover
                    pass
                return

    def _stop_waitress(self, grace: float = 0.0) -> None:
        server, thread = self._wserver, self._wthread
        if server is None:
            return
        # Let running requests finish (within the grace period) while the loop still sends
        # responses; those still running after it are cut (their threads are daemons).
        try:
            dispatcher = server.task_dispatcher
            dispatcher.shutdown(cancel_pending=True, timeout=grace)  # type: ignore[arg-type]
            if dispatcher.threads:
                log.warning(
                    "stop: %d request(s) still running after the %g s grace period are cut",
                    len(dispatcher.threads),
                    self.grace_period,
                )
        except Exception:  # pragma: no cover
            log.exception("stopping waitress worker threads")
        self._wstop.set()
        self._wake_waitress()
        if thread is not None:
            thread.join(_STOP_TIMEOUT)
            if thread.is_alive():  # pragma: no cover
                log.warning("waitress loop thread did not stop")
        # The loop thread has exited: the map is ours alone now.
        wasyncore.close_all(self._wmap)
        self._wserver = self._wthread = None
