"""dcapd's asyncio front: accepts clients, reads each request head, answers or relays it.

Design (design.md §5, stack.md §1.3-1.4): an asyncio loop in its own thread accepts TLS on
the public address (plain HTTP with ``tls = off``: the same cycle without TLS), on
connections of its own (:mod:`dcapd.transport`: OpenSSL reads and writes the socket). The front
reads every request head itself. A request without a body is answered in the front
(:mod:`dcapd.direct`: waitress's parser and task, in a thread pool, no loopback hop); one
with a body is relayed to waitress, so that waitress only ever sees whole requests from
clients that are in time, and only holds a connection for a client with such a request in
flight or just answered:

* **Deadlines** (Intel's Node PCCS: headers 10 s, whole request 15 s). The first request
  head must be whole within ``head_timeout`` of accept (TLS handshake included: a client
  that connects, or finishes its handshake, and sends nothing is dropped then), and the
  whole request, body included, within ``request_timeout`` of accept. On a kept-alive
  connection the next request's first byte must come within ``idle_timeout`` of the last
  answer, and the same two deadlines count from that byte. A body that a valid admin token
  allows to be large gets one more second per MiB. An answer must be read within
  ``channel_timeout`` per write.
* **Bodies, by role, before reading** (:mod:`dcapd.gate`): from the head, a body that is not
  welcome is answered ``401``/``413`` with ``Connection: close`` at once, unread. A small
  body (no admin token) is held by the front until whole, then passed on with its head; a
  large admin body streams.
* **Connections to waitress**: opened when a request is whole (lazily, one per client,
  reused while the client keeps its connection alive), at most ``connection_limit`` at
  once. When they are all taken, the one that has been without a request in flight the
  longest is taken over (its client, when idle, is closed; when still sending its next
  request, it gets a new one once that request is whole); otherwise the request waits.

Requests on one connection are served one at a time (a pipelined request waits in the
buffer until the previous answer has been relayed). A map from each loopback connection's
local address to the real peer lets :class:`PeerRestoringMiddleware` restore
``REMOTE_ADDR``/``REMOTE_PORT`` (and ``wsgi.url_scheme = https``) for the app.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import threading
from typing import Any, Callable

from .config import Config
from .direct import DirectAnswers
from .eventloop import has_readiness_callbacks, new_front_loop
from .frontrules import CLOSE_GRACE, forget_traceback, log_dropped
from .gate import BodyGate
from .middleware import clear_untrusted_proxy_headers
from .quickconn import QuickConnection
from .relay import PIPE_CHUNK, Connection, Drop
from .sockets import BACKLOG
from .transport import Listener

__all__ = ["TlsFront", "PeerRestoringMiddleware", "BACKLOG"]

log = logging.getLogger("dcapd.server")

Peers = dict[tuple[str, str], tuple[str, int]]


_STOP_TIMEOUT = 10.0


class PeerRestoringMiddleware:
    """Give the app the TLS client's address instead of the loopback one, and proxy headers
    (X-Forwarded-For and the like) only from *trusted_proxies* (``[server] trusted_proxies``).

    *peers* maps ``(backend_local_ip, str(backend_local_port))`` of each front ->
    waitress connection to the real ``(client_ip, client_port)``.
    """

    def __init__(
        self,
        app: Callable,
        peers: dict[tuple[str, str], tuple[str, int]],
        public_port: Callable[[], int],
        https: bool = True,
        trusted_proxies: tuple[Any, ...] = (),
    ):
        self.app = app
        self.peers = peers
        self.public_port = public_port
        self.https = https
        self.trusted_proxies = trusted_proxies

    def __call__(self, environ, start_response):
        peer = self.peers.get((environ.get("REMOTE_ADDR"), str(environ.get("REMOTE_PORT"))))
        if peer is not None:
            environ["REMOTE_ADDR"] = peer[0]
            environ["REMOTE_PORT"] = str(peer[1])
            if self.https:
                environ["wsgi.url_scheme"] = "https"
                environ["HTTPS"] = "on"
            environ["SERVER_PORT"] = str(self.public_port())
        clear_untrusted_proxy_headers(environ, self.trusted_proxies)
        return self.app(environ, start_response)


#: The plaintext read buffer of each TLS connection: a TLS record holds at most 16 KiB.
TLS_READ_BUFFER = 32 * 1024


def _small_tls_read_buffers() -> None:
    """For Windows' proactor loop, where asyncio's TLS transport serves (dcapd.transport needs
    readiness callbacks). asyncio (Python 3.11+) gives every TLS connection a 256 KiB read
    buffer, zeroed when the connection is made: 0.25 MiB of memory per open connection, and
    page faults and zeroing on every new one (a client that connects per request, as QCNL
    does). The buffer only ever holds one read of decrypted bytes, so 32 KiB (two full TLS
    records) loses nothing.
    ``SSLProtocol.max_size`` is the class attribute asyncio sizes it from (set for the
    process: the front is its only asyncio TLS user)."""
    protocol = getattr(getattr(asyncio, "sslproto", None), "SSLProtocol", None)
    if protocol is not None and getattr(protocol, "max_size", 0) > TLS_READ_BUFFER:
        protocol.max_size = TLS_READ_BUFFER


class TlsFront:
    """The TLS listener(s) and the relay to waitress, on an asyncio loop in its own thread.

    ``start(ctx, socks)`` serves the already-listening *socks*; ``stop()`` closes every
    connection at once.  *peers* is filled for :class:`PeerRestoringMiddleware`.  *gate*
    decides bodies from request heads (None: any body up to ``max_body_bytes``, streamed).
    """

    def __init__(
        self,
        backend_port: int,
        peers: Peers,
        config: Config,
        gate: BodyGate | None,
        direct: DirectAnswers | None = None,
    ):
        self.backend_port = backend_port
        self.direct = direct
        self.peers = peers
        self.gate = gate
        self.max_body = config.max_body_bytes
        self.handshake_timeout = config.tls_handshake_timeout
        self.read_timeout = float(config.channel_timeout)  # a client reading its answer
        # No deadline is ever longer than a shorter one that also applies.
        self.request_timeout = config.request_timeout
        self.head_timeout = min(config.head_timeout, config.request_timeout, self.read_timeout)
        self.idle_timeout = min(config.idle_timeout, self.read_timeout)
        self.limit = config.connection_limit  # loopback connections to waitress at once
        self.event_loop = config.event_loop
        self.loop_name = ""
        self._backends = 0
        # Clients holding a link to waitress with no request in flight, oldest first.
        self.idle: dict[Connection, None] = {}
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[Any] = []
        # asyncio holds tasks only weakly (and open_connection's protocol holds
        # its reader weakly): once a client's TLS transport is closed nothing
        # else refers to its handler, which the GC could then destroy while it
        # still waits for waitress. Strong references, dropped when done.
        self._conn_tasks: set = set()
        self._stopping = False
        self.draining = False  # a stop began: no new request is started
        self._conns: dict[asyncio.Task, Connection] = {}
        self.quick: dict[QuickConnection, None] = {}  # served on callbacks (dcapd.quickconn)

    # -- lifecycle ------------------------------------------------------------

    def start(self, ctx: ssl.SSLContext | None, socks: list[socket.socket]) -> None:
        self._stopping = self.draining = False
        _small_tls_read_buffers()
        loop = new_front_loop(self.event_loop)
        self.loop_name = type(loop).__module__.split(".")[0]  # uvloop or asyncio
        loop.set_exception_handler(self._loop_exception)
        self._loop = loop
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run_loop, args=(loop, ready), name="dcapd-tls", daemon=True
        )
        self._thread.start()
        ready.wait()
        fut = asyncio.run_coroutine_threadsafe(self._open(ctx, socks), loop)
        fut.result(_STOP_TIMEOUT)

    def stop(self, grace: float = 0.0) -> None:
        """Stop accepting, let requests in flight finish for up to *grace* seconds (idle
        clients are closed at once), then close every connection."""
        loop, thread = self._loop, self._thread
        if loop is None:
            return
        if thread is not None and thread.is_alive() and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self._close(grace), loop).result(
                    grace + _STOP_TIMEOUT + 5
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
        self._loop = self._thread = None
        self._conn_tasks.clear()
        self.quick.clear()

    async def _open(self, ctx: ssl.SSLContext | None, socks: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()

        def accepted() -> asyncio.StreamReaderProtocol:
            # Called at accept, before the handshake: the head deadline counts from here.
            return self._relayed(loop.time(), None)

        def accepted_quick() -> QuickConnection:
            return QuickConnection(self, loop, loop.time())

        handshake = min(self.handshake_timeout, self.head_timeout)
        for sock in socks:
            if has_readiness_callbacks(loop):
                # OpenSSL reads and writes the socket itself (dcapd.transport): 0.1 - 0.2 ms
                # less CPU per new TLS connection than on asyncio's TLS transport; each
                # connection starts on callbacks (dcapd.quickconn), a task only if it needs one.
                listener = Listener(loop, sock, ctx, accepted_quick, handshake, BACKLOG)
                listener.start()
                self._servers.append(listener)
                continue
            tls: dict[str, Any] = {}  # Windows' proactor loop: asyncio's own transports
            if ctx is not None:  # None: plain HTTP (tls = off), the same cycle without TLS
                tls = {"ssl": ctx, "ssl_handshake_timeout": handshake}
            srv = await loop.create_server(accepted, sock=sock, backlog=BACKLOG, **tls)
            self._servers.append(srv)

    def _relayed(
        self, start: float, answer: tuple[bytes, bool] | None
    ) -> asyncio.StreamReaderProtocol:
        """A protocol whose connection dcapd.relay serves (a task on asyncio's streams)."""
        loop = self._loop
        reader = asyncio.StreamReader(limit=PIPE_CHUNK, loop=loop)
        return asyncio.StreamReaderProtocol(
            reader, lambda r, w: self._handle_client(r, w, start, answer), loop=loop
        )

    def hand_over(
        self, transport: Any, buffered: bytes, start: float, answer: tuple[bytes, bool] | None
    ) -> None:
        """A QuickConnection's client, from now on served by dcapd.relay."""
        protocol = self._relayed(start, answer)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if buffered:
            protocol.data_received(buffered)

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

    async def _close(self, grace: float = 0.0) -> None:
        self.draining = True
        # Let connections accepted just now reach their handshake first: on
        # Python 3.11 a connection whose transport is created after
        # Server.close() fails an assertion and leaks its socket, and a task
        # cancelled before its first step would never close its socket either.
        for _ in range(3):
            await asyncio.sleep(0)
        for srv in self._servers:
            srv.close()
        await self._drain(grace)
        self._stopping = True
        for srv in self._servers:
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
        for srv in self._servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 2)
            except (asyncio.TimeoutError, OSError):  # pragma: no cover
                pass
        self._servers = []

    async def _drain(self, grace: float) -> None:
        """Until no request is in flight (or *grace* has passed), close clients with none."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        for quick in list(self.quick):  # between requests: idle, closed at once
            quick.close()
        while True:
            busy = 0
            for task, conn in list(self._conns.items()):
                if conn.busy:
                    busy += 1
                elif not task.done():
                    task.cancel()
            if not busy:
                return
            if loop.time() >= deadline:
                log.warning(
                    "stop: %d request(s) still running after the %g s grace period are cut",
                    busy,
                    grace,
                )
                return
            await asyncio.sleep(0.05)

    # -- connections to waitress ----------------------------------------------

    async def acquire(self) -> None:
        """Wait for room for one more connection to waitress, closing idle clients first."""
        while self._backends >= self.limit:
            if self.idle:
                victim = next(iter(self.idle))
                victim.evict()
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
        self._backends += 1

    def release(self) -> None:
        self._backends -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def _handle_client(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        accepted: float,
        answer: tuple[bytes, bool] | None = None,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)
        conn = Connection(self, reader, writer, accepted)
        self._conns[task] = conn
        try:
            await conn.serve(answer)
        except Drop as why:
            log_dropped(conn.peer, str(why))
        except asyncio.TimeoutError:
            log_dropped(conn.peer, conn.waiting_for)
        except (OSError, ssl.SSLError, EOFError, asyncio.IncompleteReadError) as exc:
            log.debug("TLS front: connection ended: %r", exc)
            forget_traceback(exc)
        except asyncio.CancelledError:  # evicted, a deadline passed (not in a read), or stop()
            if conn.evicted:
                log.info("TLS front: closed an idle connection of %s for a new one", conn.peer[0])
            elif conn.expired:
                log_dropped(conn.peer, conn.waiting_for)
        finally:
            self._conns.pop(task, None)
            await conn.close(0 if self._stopping else CLOSE_GRACE)
