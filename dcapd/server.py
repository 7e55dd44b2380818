"""Serving dcapd's WSGI app with waitress, with or without dcapd's own TLS front.

Design (design.md §5, stack.md §1.3-1.4):

* ``tls = off``: waitress serves the app directly on the configured address
  (behind nginx/IIS/Caddy, the documented choice for big sites).
* ``tls = auto``: waitress listens on an ephemeral ``127.0.0.1`` port, and an
  asyncio thread accepts TLS on the public address
  (``asyncio.start_server(ssl=..., ssl_handshake_timeout=...)``).  Every
  accepted TLS connection gets one loopback TCP connection to waitress and
  bytes are piped both ways.  Handshakes happen in the asyncio loop, so a
  client that never completes one costs nothing in waitress and delays nobody;
  it is dropped after ``tls_handshake_timeout``.  A map from the loopback
  connection's local address to the real peer lets a small WSGI middleware
  restore ``REMOTE_ADDR``/``REMOTE_PORT`` (and set ``wsgi.url_scheme`` to
  ``https``) for the app.

  Note: the loopback backend port speaks plain HTTP and any local process can
  reach it; requests arriving there directly are seen with their own
  127.0.0.1 address and ``http`` scheme.  Authentication happens in the app.

Only public waitress API is used (``create_server(app, map=..., sockets=[...])``,
its ``wasyncore`` loop, ``task_dispatcher`` and ``pull_trigger``), no fork and
no POSIX-only signals, so this runs on Windows too.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import signal
import socket
import ssl
import threading
import time
from typing import Any, Callable

import waitress
from waitress import wasyncore

from . import tls as _tls

__all__ = ["Server", "waitress_options", "bind_sockets", "PeerRestoringMiddleware"]

log = logging.getLogger("dcapd.server")

DEFAULT_THREADS = 8
DEFAULT_CONNECTION_LIMIT = 200
DEFAULT_CHANNEL_TIMEOUT = 30
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0
#: Same default as ``dcapd.config`` ``max_body_bytes`` (the app enforces that
#: limit itself; waitress gets the same one so it never refuses earlier).
DEFAULT_MAX_BODY_BYTES = 512 * 1024 * 1024

_PIPE_CHUNK = 256 * 1024
_BACKEND_CONNECT_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0

# waitress logs to "waitress" (and "waitress.queue"); with no handler configured
# anywhere Python's last-resort handler would print its warnings to stderr.
# A NullHandler keeps that quiet while still propagating to any configured root.
logging.getLogger("waitress").addHandler(logging.NullHandler())


def _num(config: Any, name: str, default, cast):
    value = getattr(config, name, None)
    if value is None or value == "":
        return default
    return cast(value)


def waitress_options(config: Any, *, sockets: list[socket.socket] | None = None) -> dict[str, Any]:
    """All waitress arguments, built in one place from *config*.

    ``threads``, ``connection_limit``, ``channel_timeout`` and ``max_body_bytes``
    (waitress's ``max_request_body_size``) come from the configuration, with
    defaults for any that are missing; *sockets*, when
    given, are pre-bound listening sockets for ``waitress.create_server``.
    """
    threads = max(1, _num(config, "threads", DEFAULT_THREADS, int))
    connection_limit = max(1, _num(config, "connection_limit", DEFAULT_CONNECTION_LIMIT, int))
    channel_timeout = max(1, _num(config, "channel_timeout", DEFAULT_CHANNEL_TIMEOUT, int))
    opts: dict[str, Any] = {
        "threads": threads,
        "connection_limit": connection_limit,
        "channel_timeout": channel_timeout,
        # Idle channels are only reaped at each cleanup pass (default every 30 s).
        "cleanup_interval": max(1, min(30, channel_timeout // 2)),
        "ident": "dcapd",
        "clear_untrusted_proxy_headers": True,
        "log_untrusted_proxy_headers": False,
        "expose_tracebacks": False,
        # waitress refuses a body of max_request_body_size bytes or more; dcapd's limit is the
        # largest body it accepts, so one more.
        "max_request_body_size": max(1, _num(config, "max_body_bytes", DEFAULT_MAX_BODY_BYTES, int))
        + 1,
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


def _strip_brackets(host: str) -> str:
    host = (host or "").strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def bind_sockets(host: str, port: int, backlog: int = 1024) -> list[socket.socket]:
    """Bind and listen on every address *host* resolves to, all on the same port.

    ``''`` or ``'*'`` means every interface.  With ``port == 0`` the first
    address picks an ephemeral port and the others reuse it.  IPv6 sockets are
    v6-only so ``localhost`` can be bound as both ``127.0.0.1`` and ``::1``.
    Addresses the host cannot bind at all (e.g. ``::1`` with IPv6 disabled)
    are skipped when another one worked.
    """
    name = _strip_brackets(host)
    if name in ("", "*"):
        name = None
    for attempt in range(5):
        try:
            return _bind_once(name, int(port), backlog)
        except OSError as exc:
            if port == 0 and exc.errno == errno.EADDRINUSE and attempt < 4:
                continue  # the ephemeral port was free on one family only: try another
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def _bind_once(name: str | None, port: int, backlog: int) -> list[socket.socket]:
    infos = socket.getaddrinfo(
        name, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    socks: list[socket.socket] = []
    seen = set()
    last_error: OSError | None = None
    try:
        for family, socktype, proto, _canon, addr in infos:
            if family not in (socket.AF_INET, getattr(socket, "AF_INET6", None)):
                continue
            key = (family, addr[0].split("%", 1)[0])
            if key in seen:
                continue
            seen.add(key)
            if port == 0 and socks:
                addr = (addr[0], socks[0].getsockname()[1]) + tuple(addr[2:])
            sock = socket.socket(family, socktype, proto)
            try:
                if os.name == "nt" and hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
                else:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == getattr(socket, "AF_INET6", None) and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(backlog)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    raise
                last_error = exc
                log.warning("cannot listen on %s port %s: %s", addr[0], addr[1], exc)
                continue
            socks.append(sock)
    except BaseException:
        for s in socks:
            s.close()
        raise
    if not socks:
        raise last_error or OSError(f"no address to listen on for {name!r}")
    return socks


class PeerRestoringMiddleware:
    """Give the app the TLS client's address instead of the loopback one.

    *peers* maps ``(backend_local_ip, str(backend_local_port))`` of each front ->
    waitress connection to the real ``(client_ip, client_port)``.
    """

    def __init__(
        self,
        app: Callable,
        peers: dict[tuple[str, str], tuple[str, int]],
        public_port: Callable[[], int],
    ):
        self.app = app
        self.peers = peers
        self.public_port = public_port

    def __call__(self, environ, start_response):
        peer = self.peers.get((environ.get("REMOTE_ADDR"), str(environ.get("REMOTE_PORT"))))
        if peer is not None:
            environ["REMOTE_ADDR"] = peer[0]
            environ["REMOTE_PORT"] = str(peer[1])
            environ["wsgi.url_scheme"] = "https"
            environ["HTTPS"] = "on"
            environ["SERVER_PORT"] = str(self.public_port())
        return self.app(environ, start_response)


class _RequestHeads:
    """Watches a client's bytes for the end of each request head (a blank line): from the
    first byte of a head, the whole head must arrive within ``timeout`` seconds. Once the
    answer starts, the next bytes begin a new head."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.awaiting = True
        self.started: float | None = None
        self.tail = b""

    def time_left(self) -> float | None:
        if not self.awaiting or self.started is None:
            return None  # idle between requests: waitress's channel_timeout applies
        return max(0.0, self.started + self.timeout - time.monotonic())

    def received(self, data: bytes) -> None:
        if not self.awaiting:
            return
        if self.started is None:
            self.started = time.monotonic()
        window = self.tail + data
        if b"\r\n\r\n" in window:
            self.awaiting = False
        else:
            self.tail = window[-3:]

    def answered(self) -> None:
        self.awaiting, self.started, self.tail = True, None, b""


class Server:
    """dcapd's HTTP(S) server: waitress, plus the asyncio TLS front when ``tls == 'auto'``.

    ``Server(app, config).start()`` returns once listening; ``.port`` and
    ``.url`` then give the bound address; ``.fingerprint`` is the
    certificate's SHA-256 fingerprint (HTTPS only).  ``stop()`` is idempotent.
    """

    def __init__(self, app: Callable, config: Any):
        self.app = app
        self.config = config
        self.listen_host: str = getattr(config, "listen_host", "localhost")
        self.listen_port: int = int(getattr(config, "listen_port", 8081))
        mode = str(getattr(config, "tls", "auto") or "auto").lower()
        if mode not in ("auto", "off"):
            raise ValueError(f"tls must be 'auto' or 'off', not {mode!r}")
        self.tls = mode
        self.handshake_timeout = float(
            _num(config, "tls_handshake_timeout", DEFAULT_TLS_HANDSHAKE_TIMEOUT, float)
        )
        if not self.handshake_timeout > 0:
            raise ValueError("tls_handshake_timeout must be > 0")
        self.channel_timeout = float(waitress_options(config)["channel_timeout"])
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
        self._wserver = None
        self._wthread: threading.Thread | None = None
        self._wstop = threading.Event()
        # TLS front
        self._peers: dict[tuple[str, str], tuple[str, int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._athread: threading.Thread | None = None
        self._front_servers: list = []
        # asyncio holds tasks only weakly (and open_connection's protocol holds
        # its reader weakly): once a client's TLS transport is closed nothing
        # else refers to its handler, which the GC could then destroy while it
        # still waits for waitress. Strong references, dropped when done.
        self._conn_tasks: set = set()
        self._front_stopping = False

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
            for name in ("SIGTERM", "SIGBREAK"):  # SIGBREAK: Ctrl-Break on Windows
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
        except KeyboardInterrupt:
            log.info("interrupted, shutting down")
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
        log.info("signal %s received, shutting down", signum)
        self._stopped.set()

    def _start(self) -> None:
        self._public_socks = bind_sockets(self.listen_host, self.listen_port)
        self.addresses = [tuple(s.getsockname()[:2]) for s in self._public_socks]
        self.port = self.addresses[0][1]
        scheme = "http" if self.tls == "off" else "https"
        self.url = f"{scheme}://{self._url_host()}:{self.port}"

        if self.tls == "off":
            self._start_waitress(self.app, self._public_socks)
        else:
            ctx, self.fingerprint = _tls.server_ssl_context(
                getattr(self.config, "cert_file", "") or "",
                getattr(self.config, "key_file", "") or "",
                hosts=[self.listen_host],
            )
            backend = bind_sockets("127.0.0.1", 0)
            self.backend_port = backend[0].getsockname()[1]
            app = PeerRestoringMiddleware(self.app, self._peers, lambda: self.port)
            self._start_waitress(app, backend)
            self._start_front(ctx)
        log.info("dcapd listening on %s", ", ".join(self._fmt_addr(a) for a in self.addresses))

    def _shutdown(self) -> None:
        self._stop_front()
        self._stop_waitress()
        for sock in self._public_socks:
            try:
                sock.close()
            except OSError:  # pragma: no cover
                pass
        self._public_socks = []
        self._peers.clear()

    def _url_host(self) -> str:
        host = _strip_brackets(self.listen_host)
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
        self._wserver = waitress.create_server(
            app, map=self._wmap, **waitress_options(self.config, sockets=socks)
        )
        self._wthread = threading.Thread(
            target=self._run_waitress, name="dcapd-waitress", daemon=True
        )
        self._wthread.start()

    def _run_waitress(self) -> None:
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

    def _wake_waitress(self) -> None:
        for disp in list(self._wmap.values()):
            pull = getattr(disp, "pull_trigger", None)
            if pull is not None:
                try:
                    pull()
                except OSError:  # pragma: no cover
                    pass
                return

    def _stop_waitress(self) -> None:
        server, thread = self._wserver, self._wthread
        if server is None:
            return
        # Let running requests finish (up to 5 s) while the loop still sends responses.
        try:
            server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
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

    # -- asyncio TLS front ----------------------------------------------------

    def _start_front(self, ctx: ssl.SSLContext) -> None:
        self._front_stopping = False
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._loop_exception)
        self._loop = loop
        ready = threading.Event()
        self._athread = threading.Thread(
            target=self._run_loop, args=(loop, ready), name="dcapd-tls", daemon=True
        )
        self._athread.start()
        ready.wait()
        fut = asyncio.run_coroutine_threadsafe(self._open_front(ctx), loop)
        fut.result(_STOP_TIMEOUT)

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _open_front(self, ctx: ssl.SSLContext) -> None:
        for sock in self._public_socks:
            srv = await asyncio.start_server(
                self._handle_client,
                sock=sock,
                ssl=ctx,
                ssl_handshake_timeout=self.handshake_timeout,
                limit=_PIPE_CHUNK,
            )
            self._front_servers.append(srv)

    def _loop_exception(self, loop, context) -> None:
        exc = context.get("exception")
        # Handshake failures/timeouts of hostile or broken clients, and handshakes
        # cancelled by stop(), are routine: keep them out of the error log.
        if isinstance(
            exc, (OSError, ssl.SSLError, asyncio.TimeoutError, EOFError, asyncio.CancelledError)
        ):
            log.debug("TLS front: %s: %r", context.get("message"), exc)
        else:
            loop.default_exception_handler(context)

    async def _close_front(self) -> None:
        self._front_stopping = True
        # Let connections accepted just now reach their handshake first: on
        # Python 3.11 a connection whose transport is created after
        # Server.close() fails an assertion and leaks its socket, and a task
        # cancelled before its first step would never close its socket either.
        for _ in range(3):
            await asyncio.sleep(0)
        for srv in self._front_servers:
            srv.close()
        for srv in self._front_servers:
            abort = getattr(srv, "abort_clients", None)  # Python >= 3.13: also pending handshakes
            if abort is not None:
                abort()
        # Connection handlers, and the loop's own tasks for handshakes still in
        # progress (cancelling those closes their transports).
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_STOP_TIMEOUT)
        for srv in self._front_servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 2)
            except (asyncio.TimeoutError, OSError):  # pragma: no cover
                pass
        self._front_servers = []

    def _stop_front(self) -> None:
        loop, thread = self._loop, self._athread
        if loop is None:
            return
        if thread is not None and thread.is_alive() and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self._close_front(), loop).result(
                    _STOP_TIMEOUT + 5
                )
            except Exception:  # pragma: no cover
                log.exception("stopping the TLS front")
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:  # pragma: no cover - loop already closed
                pass
            thread.join(_STOP_TIMEOUT)
            if thread.is_alive():  # pragma: no cover
                log.warning("TLS front thread did not stop")
        self._loop = self._athread = None
        self._conn_tasks.clear()

    async def _handle_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)
        peer = writer.get_extra_info("peername") or ("", 0)
        backend_writer = None
        key = None
        try:
            try:
                backend_reader, backend_writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.backend_port, limit=_PIPE_CHUNK),
                    _BACKEND_CONNECT_TIMEOUT,
                )
            except (OSError, asyncio.TimeoutError) as exc:
                log.warning(
                    "TLS front: cannot reach waitress on 127.0.0.1:%s: %r", self.backend_port, exc
                )
                return
            local = backend_writer.get_extra_info("sockname")
            key = (local[0], str(local[1]))
            value = (peer[0], peer[1])
            self._peers[key] = value
            # A request head must arrive whole within channel_timeout (waitress restarts its
            # timer on every byte, so a one-byte-a-second client would hold a slot for ever),
            # and a client must read its answer within channel_timeout too.
            heads = _RequestHeads(self.channel_timeout)
            upstream = asyncio.ensure_future(
                self._pipe(reader, backend_writer, half_close=True, heads=heads)
            )
            downstream = asyncio.ensure_future(
                self._pipe(
                    backend_reader,
                    writer,
                    half_close=False,
                    drain_timeout=self.channel_timeout,
                    on_data=heads.answered,
                )
            )
            try:
                done, _ = await asyncio.wait(
                    {upstream, downstream}, return_when=asyncio.FIRST_COMPLETED
                )
                if upstream in done and upstream.result() and not downstream.done():
                    # Client sent EOF (half-close, passed on to waitress): the
                    # response may still be on its way; waitress closes when done.
                    await downstream
            finally:
                for t in (upstream, downstream):
                    if not t.done():
                        t.cancel()
                await asyncio.gather(upstream, downstream, return_exceptions=True)
        except asyncio.CancelledError:
            pass
        finally:
            if key is not None and self._peers.get(key) == (peer[0], peer[1]):
                del self._peers[key]
            # On stop() abort at once; otherwise close gracefully (bounded).
            await self._close_writer(backend_writer, 0 if self._front_stopping else 2.0)
            await self._close_writer(writer, 0 if self._front_stopping else 5.0)

    @staticmethod
    async def _close_writer(writer: asyncio.StreamWriter | None, timeout: float) -> None:
        """Close gracefully (TLS close_notify, flush); abort if that takes too long or on stop()."""
        if writer is None:
            return
        try:
            if timeout <= 0:
                raise asyncio.TimeoutError
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), timeout)
        except (Exception, asyncio.CancelledError):
            try:
                writer.transport.abort()
            except Exception:  # pragma: no cover
                pass

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        half_close: bool,
        heads: _RequestHeads | None = None,
        drain_timeout: float | None = None,
        on_data: Callable[[], None] | None = None,
    ) -> bool:
        """Copy until EOF.  True on a clean EOF (passed on as a half-close when possible)."""
        try:
            while True:
                wait = heads.time_left() if heads is not None else None
                data = await asyncio.wait_for(reader.read(_PIPE_CHUNK), wait)
                if not data:
                    break
                if heads is not None:
                    heads.received(data)
                if on_data is not None:
                    on_data()
                writer.write(data)
                await asyncio.wait_for(writer.drain(), drain_timeout)
            if half_close and writer.can_write_eof():
                writer.write_eof()
            return True
        except asyncio.TimeoutError:
            log.info("TLS front: dropped a client that was too slow to send or to read")
            return False
        except (OSError, ssl.SSLError, EOFError, asyncio.IncompleteReadError) as exc:
            log.debug("TLS front: connection ended: %r", exc)
            return False
