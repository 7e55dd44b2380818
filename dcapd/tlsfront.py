"""dcapd's asyncio TLS front: accepts TLS clients, reads each request head, relays to waitress.

Design (design.md §5, stack.md §1.3-1.4): an asyncio loop in its own thread accepts TLS on
the public address. The front reads every request head itself, so that waitress only ever
sees whole requests from clients that are in time, and only holds a connection for a client
with a request in flight or just answered:

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
  once; when they are all taken, the client idle the longest is closed to make room, and
  otherwise the request waits for one to free.

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

from waitress.adjustments import Adjustments

from .config import Config
from .gate import BodyGate, Verdict, log_refusal, refusal_bytes
from .httpframe import (
    MAX_HEAD_BYTES,
    Chunked,
    FramingError,
    RequestHead,
    parse_request_head,
    parse_response_head,
)
from .middleware import request_id_for

__all__ = ["TlsFront", "PeerRestoringMiddleware", "BACKLOG"]

log = logging.getLogger("dcapd.server")

Peers = dict[tuple[str, str], tuple[str, int]]

#: The listen backlog: waitress's (1024), for the TLS listener too.
BACKLOG: int = Adjustments.backlog

_PIPE_CHUNK = 256 * 1024
_BACKEND_CONNECT_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_ADMIN_BYTES_PER_SECOND = 1024 * 1024  # a large admin body gets 1 s more per MiB
_WRITE_BUFFER = 64 * 1024  # wait for the client to read beyond this much
_LINGER_SECONDS, _LINGER_BYTES = 1.0, 1024 * 1024  # after a refusal, before closing
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Drop(Exception):
    """End this client's connection; ``str()`` says why (logged at info)."""


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


class TlsFront:
    """The TLS listener(s) and the relay to waitress, on an asyncio loop in its own thread.

    ``start(ctx, socks)`` serves the already-listening *socks*; ``stop()`` closes every
    connection at once.  *peers* is filled for :class:`PeerRestoringMiddleware`.  *gate*
    decides bodies from request heads (None: any body up to ``max_body_bytes``, streamed).
    """

    def __init__(self, backend_port: int, peers: Peers, config: Config, gate: BodyGate | None):
        self.backend_port = backend_port
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
        self._backends = 0
        self._idle: dict[_Connection, None] = {}  # keep-alive clients holding one, oldest first
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

    async def _open(self, ctx: ssl.SSLContext, socks: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()

        def accepted() -> asyncio.StreamReaderProtocol:
            # Called at accept, before the handshake: the head deadline counts from here.
            reader = asyncio.StreamReader(limit=_PIPE_CHUNK, loop=loop)
            at = loop.time()
            return asyncio.StreamReaderProtocol(
                reader, lambda r, w: self._handle_client(r, w, at), loop=loop
            )

        for sock in socks:
            srv = await loop.create_server(
                accepted,
                sock=sock,
                ssl=ctx,
                ssl_handshake_timeout=min(self.handshake_timeout, self.head_timeout),
                backlog=BACKLOG,
            )
            self._servers.append(srv)

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

    # -- connections to waitress ----------------------------------------------

    async def acquire(self) -> None:
        """Wait for room for one more connection to waitress, closing idle clients first."""
        while self._backends >= self.limit:
            if self._idle:
                victim = next(iter(self._idle))
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
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, accepted: float
    ) -> None:
        task = asyncio.current_task()
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)
        conn = _Connection(self, reader, writer, accepted)
        try:
            await conn.serve()
        except _Drop as why:
            log.info("TLS front: dropped %s: %s", conn.peer[0], why)
        except asyncio.TimeoutError:
            log.info("TLS front: dropped %s: %s", conn.peer[0], conn.waiting_for)
        except (OSError, ssl.SSLError, EOFError, asyncio.IncompleteReadError) as exc:
            log.debug("TLS front: connection ended: %r", exc)
        except asyncio.CancelledError:
            if conn.evicted:
                log.info("TLS front: closed an idle connection of %s for a new one", conn.peer[0])
        finally:
            await conn.close(0 if self._stopping else 2.0)

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


class _Connection:
    """One TLS client: its requests, one at a time, relayed to its connection to waitress."""

    def __init__(
        self,
        front: TlsFront,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        accepted: float,
    ):
        self.front = front
        self.reader = reader
        self.writer = writer
        self.peer = writer.get_extra_info("peername") or ("", 0)
        self.task = asyncio.current_task()
        self.loop = asyncio.get_running_loop()
        self.start = accepted  # of the current request (accept for the first one)
        self.buf = bytearray()  # bytes from the client not passed on yet
        self.backend_reader: asyncio.StreamReader | None = None
        self.backend_writer: asyncio.StreamWriter | None = None
        self.key: tuple[str, str] | None = None
        self.evicted = False
        self.waiting_for = "a request head within head_timeout"

    # -- the request cycle --------------------------------------------------

    async def serve(self) -> None:
        front = self.front
        while True:
            head = await self._read_head()
            if head is None:
                return
            try:
                request = parse_request_head(head)
            except FramingError as exc:
                await self._refuse("-", "-", Verdict(400, str(exc), 0), None)
                return
            verdict = self._verdict(request)
            if verdict.status:
                await self._refuse(
                    request.method, request.path, verdict, request.headers.get("request-id")
                )
                return
            if not await self._pass_on(request, verdict):
                return
            if not await self._relay_answer(request.method) or request.close:
                return
            # Keep-alive: the next request's first byte within idle_timeout.
            if not self.buf:
                self.waiting_for = "no next request within idle_timeout"
                front._idle[self] = None
                try:
                    if not await self._fill(self.loop.time() + front.idle_timeout):
                        return
                finally:
                    front._idle.pop(self, None)
            self.start = self.loop.time()
            self.waiting_for = "a request head within head_timeout"

    def _verdict(self, request: RequestHead) -> Verdict:
        gate = self.front.gate
        if gate is None or request.length == 0:
            return Verdict(0, "", self.front.max_body, True)
        return gate.check(request.method, request.path, request.length, request.headers.get)

    async def _read_head(self) -> bytes | None:
        """The next request head (leading blank lines dropped, as waitress does); None on EOF."""
        deadline = self.start + self.front.head_timeout
        searched = 0
        while True:
            if self.buf[:1].isspace():
                kept = self.buf.lstrip()
                del self.buf[: len(self.buf) - len(kept)]
                searched = 0
            end = self.buf.find(b"\r\n\r\n", max(0, searched - 3))
            if end >= 0:
                head = bytes(self.buf[: end + 4])
                del self.buf[: end + 4]
                return head
            if len(self.buf) >= MAX_HEAD_BYTES:
                await self._refuse("-", "-", Verdict(400, "request head too large", 0), None)
                return None
            searched = len(self.buf)
            if not await self._fill(deadline):
                return None

    async def _fill(self, deadline: float) -> bool:
        """More bytes from the client into ``buf``; False on EOF, TimeoutError at *deadline*."""
        data = await asyncio.wait_for(
            self.reader.read(_PIPE_CHUNK), max(0.0, deadline - self.loop.time())
        )
        if not data:
            return False
        self.buf += data
        return True

    async def _pass_on(self, request: RequestHead, verdict: Verdict) -> bool:
        """Send the request to waitress: a small body once whole, a large one as it comes."""
        self.waiting_for = "a whole request within request_timeout"
        if request.length == 0:
            await self._to_backend(request.raw)
            return True
        if request.expect_continue:
            self.writer.write(_CONTINUE)
        if not verdict.large:
            held = bytearray(request.raw)
            outcome = await self._read_body(request, verdict, held.extend)
            if outcome:
                await self._to_backend(held)
            return outcome
        await self._to_backend(request.raw)
        return await self._read_body(request, verdict, self.backend_writer.write)

    async def _read_body(
        self, request: RequestHead, verdict: Verdict, out: Callable[[bytes], Any]
    ) -> bool:
        """Pass the body to *out* as it arrives; False when the connection must end."""
        base = self.start + self.front.request_timeout
        per_byte = 1 / _ADMIN_BYTES_PER_SECOND if verdict.large else 0.0
        received = 0
        remaining = request.length
        chunked = Chunked() if remaining is None else None
        while True:
            if self.buf:
                if chunked is None:
                    take = min(remaining, len(self.buf))
                    remaining -= take
                else:
                    take = chunked.scan(self.buf)  # FramingError: the connection ends
                    if chunked.size > verdict.limit:
                        if verdict.large:
                            raise _Drop(f"chunked body over {verdict.limit} bytes")
                        reason = f"chunked body over max_small_body_bytes ({verdict.limit})"
                        await self._refuse(
                            request.method,
                            request.path,
                            Verdict(413, reason, verdict.limit),
                            request.headers.get("request-id"),
                        )
                        return False
                if take:
                    out(bytes(self.buf[:take]))
                    del self.buf[:take]
                    received += take
                    if verdict.large:
                        await self._drain(self.backend_writer, base + received * per_byte)
            if (remaining == 0) if chunked is None else chunked.done:
                return True
            if not await self._fill(base + received * per_byte):
                return False

    # -- waitress -------------------------------------------------------------

    async def _to_backend(self, data: bytes | bytearray) -> None:
        writer = self.backend_writer
        if writer is None or writer.transport.is_closing() or self.backend_reader.at_eof():
            await self._open_backend()
            writer = self.backend_writer
        writer.write(data)

    async def _open_backend(self) -> None:
        self._drop_backend()
        front = self.front
        await front.acquire()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", front.backend_port, limit=_PIPE_CHUNK),
                _BACKEND_CONNECT_TIMEOUT,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            front.release()
            log.warning(
                "TLS front: cannot reach waitress on 127.0.0.1:%s: %r", front.backend_port, exc
            )
            raise _Drop("waitress unreachable") from None
        except BaseException:
            front.release()
            raise
        self.backend_reader, self.backend_writer = reader, writer
        local = writer.get_extra_info("sockname")
        self.key = (local[0], str(local[1]))
        front.peers[self.key] = (self.peer[0], self.peer[1])

    def _drop_backend(self) -> None:
        """Close the connection to waitress at once (between requests, or on the way out)."""
        writer = self.backend_writer
        if writer is None:
            return
        self.backend_reader = self.backend_writer = None
        if self.key is not None and self.front.peers.get(self.key) == (self.peer[0], self.peer[1]):
            del self.front.peers[self.key]
        self.key = None
        try:
            writer.transport.abort()
        except Exception:  # pragma: no cover
            pass
        self.front.release()

    def evict(self) -> None:
        """Called by another client that needs room: this one is idle, close it."""
        self.front._idle.pop(self, None)
        self.evicted = True
        self._drop_backend()
        if self.task is not None:
            self.task.cancel()

    async def _relay_answer(self, method: str) -> bool:
        """Pass waitress's answer to the client; True when the connection may be kept."""
        reader = self.backend_reader
        self.waiting_for = "the client to read its answer within channel_timeout"
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return False  # waitress closed (it answers every request it can parse)
            try:
                answer = parse_response_head(head, method)
            except FramingError:  # pragma: no cover - waitress's own output
                return False
            await self._to_client(head)
            if not 100 <= answer.status < 200:
                break
        if answer.chunked:
            chunked, pending = Chunked(), bytearray()
            while not chunked.done:
                data = await reader.read(_PIPE_CHUNK)
                if not data:
                    return False
                pending += data
                take = chunked.scan(pending)
                await self._to_client(bytes(pending[:take]))
                del pending[:take]
            return not pending and not answer.close
        remaining = answer.length
        while answer.until_close or remaining:
            data = await reader.read(
                _PIPE_CHUNK if answer.until_close else min(remaining, _PIPE_CHUNK)
            )
            if not data:
                return False
            if not answer.until_close:
                remaining -= len(data)
            await self._to_client(data)
        return not answer.close

    # -- the client -----------------------------------------------------------

    async def _to_client(self, data: bytes) -> None:
        self.writer.write(data)
        await self._drain(self.writer, self.loop.time() + self.front.read_timeout)

    async def _drain(self, writer: asyncio.StreamWriter, deadline: float) -> None:
        transport = writer.transport
        if transport.is_closing():
            raise ConnectionResetError("connection closed")
        if transport.get_write_buffer_size() > _WRITE_BUFFER:
            await asyncio.wait_for(writer.drain(), max(0.0, deadline - self.loop.time()))

    async def _refuse(
        self, method: str, path: str, verdict: Verdict, client_request_id: str | None
    ) -> None:
        """Answer from the head alone, log one line, and close (after a short linger)."""
        request_id = request_id_for(client_request_id)
        log_refusal(method, path, verdict, "by the TLS front, body not read", request_id)
        self.writer.write(refusal_bytes(verdict.status, request_id))
        self.waiting_for = "the client to read a refusal"
        await self._drain(self.writer, self.loop.time() + self.front.read_timeout)
        # Closing with unread bytes from the client could reset the connection before the
        # client reads the answer: read (and drop) what comes for a moment first.
        deadline, dropped = self.loop.time() + _LINGER_SECONDS, 0
        self.buf.clear()
        try:
            while dropped < _LINGER_BYTES and await self._fill(deadline):
                dropped += len(self.buf)
                self.buf.clear()
        except (asyncio.TimeoutError, OSError, ssl.SSLError):
            pass

    async def close(self, timeout: float) -> None:
        self.front._idle.pop(self, None)
        self._drop_backend()
        await TlsFront._close_writer(self.writer, timeout)
