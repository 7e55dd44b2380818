"""dcapd's asyncio TLS front: accepts TLS clients and relays each to waitress on loopback.

Design (design.md §5, stack.md §1.3-1.4): an asyncio loop in its own thread accepts TLS on
the public address (``ssl_handshake_timeout`` bounds the handshake, so a client that never
finishes one costs nothing in waitress and delays nobody). Every accepted connection gets one
loopback TCP connection to waitress and bytes are relayed both ways. A map from the loopback
connection's local address to the real peer lets :class:`PeerRestoringMiddleware` restore
``REMOTE_ADDR``/``REMOTE_PORT`` (and ``wsgi.url_scheme = https``) for the app.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable

__all__ = ["TlsFront", "PeerRestoringMiddleware"]

log = logging.getLogger("dcapd.server")

Peers = dict[tuple[str, str], tuple[str, int]]

_PIPE_CHUNK = 256 * 1024
_BACKEND_CONNECT_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


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


class TlsFront:
    """The TLS listener(s) and the relay to waitress, on an asyncio loop in its own thread.

    ``start(ctx, socks)`` serves the already-listening *socks*; ``stop()`` closes every
    connection at once.  *peers* is filled for :class:`PeerRestoringMiddleware`.
    """

    def __init__(
        self,
        backend_port: int,
        peers: Peers,
        handshake_timeout: float,
        channel_timeout: float,
    ):
        self.backend_port = backend_port
        self.peers = peers
        self.handshake_timeout = handshake_timeout
        self.channel_timeout = channel_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[Any] = []
        # asyncio holds tasks only weakly (and open_connection's protocol holds
        # its reader weakly): once a client's TLS transport is closed nothing
        # else refers to its handler, which the GC could then destroy while it
        # still waits for waitress. Strong references, dropped when done.
        self._conn_tasks: set = set()
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------

    def start(self, ctx: ssl.SSLContext, socks: list[socket.socket]) -> None:
        self._stopping = False
        loop = asyncio.new_event_loop()
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

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None:
            return
        if thread is not None and thread.is_alive() and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(_STOP_TIMEOUT + 5)
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

    async def _open(self, ctx: ssl.SSLContext, socks: list[socket.socket]) -> None:
        for sock in socks:
            srv = await asyncio.start_server(
                self._handle_client,
                sock=sock,
                ssl=ctx,
                ssl_handshake_timeout=self.handshake_timeout,
                limit=_PIPE_CHUNK,
            )
            self._servers.append(srv)

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

    async def _close(self) -> None:
        self._stopping = True
        # Let connections accepted just now reach their handshake first: on
        # Python 3.11 a connection whose transport is created after
        # Server.close() fails an assertion and leaks its socket, and a task
        # cancelled before its first step would never close its socket either.
        for _ in range(3):
            await asyncio.sleep(0)
        for srv in self._servers:
            srv.close()
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
            self.peers[key] = value
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
            if key is not None and self.peers.get(key) == (peer[0], peer[1]):
                del self.peers[key]
            # On stop() abort at once; otherwise close gracefully (bounded).
            await self._close_writer(backend_writer, 0 if self._stopping else 2.0)
            await self._close_writer(writer, 0 if self._stopping else 5.0)

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
