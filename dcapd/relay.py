"""One TLS client of dcapd's front: its requests, one at a time, relayed to waitress.

The request cycle (the deadlines and rules are described in :mod:`dcapd.tlsfront`): read a
request head (``head_timeout`` from accept, or from a keep-alive request's first byte), parse
it strictly (:mod:`dcapd.httpframe`), ask the body rules (:mod:`dcapd.gate`) and refuse at
once when the body is not welcome; otherwise hold a small body until whole (or stream a
large admin one) within ``request_timeout``, pass the request on to this client's loopback
connection to waitress (opened when first needed), relay the answer, and wait
``idle_timeout`` for the next request.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, Callable, Protocol

from .direct import DirectAnswers
from .frontrules import (
    WAITING_HEAD,
    WAITING_IDLE,
    WRITE_BUFFER,
    answered_in_front,
    forget_traceback,
)
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


class Front(Protocol):
    """What a connection needs of the TLS front that accepted it (dcapd.tlsfront.TlsFront):
    the body rules, the deadlines, waitress's port and connection slots, the peer table, and
    what answers bodiless requests in the front (None: everything goes to waitress)."""

    gate: BodyGate | None
    direct: DirectAnswers | None
    max_body: int
    head_timeout: float
    request_timeout: float
    idle_timeout: float
    read_timeout: float
    backend_port: int
    peers: dict[tuple[str, str], tuple[str, int]]
    idle: dict[Connection, None]  # kept-alive clients whose waitress link may be taken
    draining: bool  # a stop began: a connection takes no next request

    async def acquire(self) -> None: ...

    def release(self) -> None: ...


__all__ = ["Connection", "Drop", "close_writer", "PIPE_CHUNK"]

log = logging.getLogger("dcapd.server")

PIPE_CHUNK = 256 * 1024
_BACKEND_CONNECT_TIMEOUT = 10.0
_ADMIN_BYTES_PER_SECOND = 1024 * 1024  # a large admin body gets 1 s more per MiB
_LINGER_SECONDS, _LINGER_BYTES = 1.0, 1024 * 1024  # after a refusal, before closing
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Drop(Exception):
    """End this client's connection; ``str()`` says why (logged at info)."""


async def close_writer(writer: asyncio.StreamWriter | None, timeout: float) -> None:
    """Close gracefully (TLS close_notify, flush); abort if that takes too long or on stop()."""
    if writer is None:
        return
    try:
        if timeout <= 0:
            raise asyncio.TimeoutError
        writer.close()
        if getattr(writer.transport, "closed", False):
            return  # dcapd.transport, nothing left to send: its socket is closed already
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except (Exception, asyncio.CancelledError) as exc:
        forget_traceback(exc)
        try:
            writer.transport.abort()
        except Exception:  # pragma: no cover
            pass


class Connection:
    """One TLS client: its requests, one at a time, relayed to its connection to waitress."""

    def __init__(
        self,
        front: Front,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        accepted: float,
    ):
        self.front = front
        self.reader = reader
        self.writer = writer
        self.peer = writer.get_extra_info("peername") or ("", 0)
        task = asyncio.current_task()
        assert task is not None  # built inside the client's handler task
        self.task: asyncio.Task = task
        self.loop = asyncio.get_running_loop()
        self.start = accepted  # of the current request (accept for the first one)
        self.buf = bytearray()  # bytes from the client not passed on yet
        self.backend_reader: asyncio.StreamReader | None = None
        self.backend_writer: asyncio.StreamWriter | None = None
        self.key: tuple[str, str] | None = None
        self.evicted = False
        self.idle = False  # waiting for the next request's first byte
        self.busy = False  # a request passed on to waitress, its answer not relayed yet
        self.waiting_for = WAITING_HEAD
        # One timer per deadline (cheaper than asyncio.wait_for on every read): it cancels
        # this task, and _fill turns that cancellation into a TimeoutError.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.expired = False
        self.backend_buf = bytearray()  # bytes from waitress not passed on yet

    # -- the request cycle --------------------------------------------------

    async def serve(self, answer: tuple[bytes, bool] | None = None) -> None:
        """The requests, one at a time. *answer*: (the bytes, close after them) of a request
        :mod:`dcapd.quickconn` read and had answered already: sent first."""
        front = self.front
        if answer is not None:
            self.busy = True
            try:
                await self._send(*answer)
            finally:
                self.busy = False
            if answer[1] or front.draining or not await self._next_request():
                return
        while True:
            head = await self._read_head()
            self._disarm()
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
            self.busy = True
            try:
                if front.direct is not None and answered_in_front(request):
                    if not await self._answer_here(front.direct, request):
                        return
                else:
                    passed = await self._pass_on(request, verdict)
                    self._disarm()
                    if not passed:
                        return
                    if not await self._relay_answer(request.method) or request.close:
                        return
            finally:
                self.busy = False
            if front.draining:  # stopping: no next request on this connection
                return
            if self.backend_writer is not None:
                # Nothing in flight: until its next request is whole, this connection's link
                # to waitress may go to a client that needs one (front.acquire).
                front.idle[self] = None
            if not await self._next_request():
                return

    async def _next_request(self) -> bool:
        """Keep-alive: the next request's first byte within idle_timeout; False on EOF."""
        if not self.buf:
            self.waiting_for = WAITING_IDLE
            self.idle = True
            try:
                if not await self._fill(self.loop.time() + self.front.idle_timeout):
                    return False
            finally:
                self.idle = False
                self._disarm()
        self.start = self.loop.time()
        self.waiting_for = WAITING_HEAD
        return True

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
        if self._timer is None or self._timer_at != deadline:
            self._disarm()
            self._timer = self.loop.call_at(deadline, self._expire)
            self._timer_at = deadline
        try:
            data = await self.reader.read(PIPE_CHUNK)
        except asyncio.CancelledError:
            if not self.expired:
                raise
            self.expired = False
            uncancel = getattr(self.task, "uncancel", None)  # Python >= 3.11
            if uncancel is not None:
                uncancel()
            raise asyncio.TimeoutError from None
        if not data:
            return False
        self.buf += data
        return True

    def _expire(self) -> None:
        self._timer = None
        self.expired = True
        self.task.cancel()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

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
            self._disarm()  # the request is whole: waiting for waitress is not its fault
            if outcome:
                await self._to_backend(held)
            return outcome
        backend = await self._to_backend(request.raw)
        return await self._read_body(request, verdict, backend.write)

    async def _read_body(
        self, request: RequestHead, verdict: Verdict, out: Callable[[bytes], Any]
    ) -> bool:
        """Pass the body to *out* as it arrives; False when the connection must end."""
        base = self.start + self.front.request_timeout
        per_byte = 1 / _ADMIN_BYTES_PER_SECOND if verdict.large else 0.0
        received = 0
        remaining = request.length or 0
        chunked = Chunked() if request.length is None else None
        while True:
            if self.buf:
                if chunked is None:
                    take = min(remaining, len(self.buf))
                    remaining -= take
                else:
                    try:
                        take = chunked.scan(self.buf)
                    except FramingError as exc:
                        if verdict.large:  # part of it is with waitress already
                            raise Drop(f"malformed chunked body: {exc}") from None
                        await self._refuse(
                            request.method,
                            request.path,
                            Verdict(400, f"malformed chunked body: {exc}", verdict.limit),
                            request.headers.get("request-id"),
                        )
                        return False
                    if chunked.size > verdict.limit:
                        if verdict.large:
                            raise Drop(f"chunked body over {verdict.limit} bytes")
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
                    if verdict.large and self.backend_writer is not None:
                        await self._drain(self.backend_writer, base + received * per_byte)
            if (remaining == 0) if chunked is None else chunked.done:
                return True
            if not await self._fill(base + received * per_byte):
                return False

    async def _answer_here(self, direct: DirectAnswers, request: RequestHead) -> bool:
        """Answer a bodiless request in the front (dcapd.direct); True when the connection
        may be kept (waitress's own rule: HTTP version, ``Connection``, the answer's framing)."""
        answer = direct.answer_inline(request.raw, self.peer)  # a hit: no thread hand-off
        if answer is None:
            self.waiting_for = "the app's answer"
            answer = await direct.submit(request.raw, self.peer)
        chunks, close = answer
        return await self._send(b"".join(chunks), close)

    async def _send(self, data: bytes, close: bool) -> bool:
        self.waiting_for = "the client to read its answer within channel_timeout"
        await self._to_client(data)
        return not close

    # -- waitress -------------------------------------------------------------

    async def _to_backend(self, data: bytes | bytearray) -> asyncio.StreamWriter:
        """Write to this client's connection to waitress (opened first when need be)."""
        self.front.idle.pop(self, None)  # a request in flight: its link stays
        reader, writer = self.backend_reader, self.backend_writer
        if reader is None or writer is None or writer.transport.is_closing() or reader.at_eof():
            reader, writer = await self._open_backend()
        writer.write(data)
        return writer

    async def _open_backend(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self._drop_backend()
        front = self.front
        await front.acquire()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", front.backend_port, limit=PIPE_CHUNK),
                _BACKEND_CONNECT_TIMEOUT,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            front.release()
            log.warning(
                "TLS front: cannot reach waitress on 127.0.0.1:%s: %r", front.backend_port, exc
            )
            raise Drop("waitress unreachable") from None
        except BaseException:
            front.release()
            raise
        self.backend_reader, self.backend_writer = reader, writer
        self.backend_buf.clear()
        local = writer.get_extra_info("sockname")
        self.key = (local[0], str(local[1]))
        front.peers[self.key] = (self.peer[0], self.peer[1])
        return reader, writer

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
        """Called by a client that needs a link to waitress: this one has nothing in flight.
        An idle keep-alive client is closed; one still sending its next request keeps its
        connection and gets a new link once that request is whole."""
        self.front.idle.pop(self, None)
        self._drop_backend()
        if self.idle:
            self.evicted = True
            self.task.cancel()

    async def _relay_answer(self, method: str) -> bool:
        """Pass waitress's answer to the client; True when the connection may be kept.

        The head and whatever body has arrived with it go to the client in one write."""
        reader, buf, out = self.backend_reader, self.backend_buf, bytearray()
        if reader is None:  # pragma: no cover - a request was passed on just before
            return False
        self.waiting_for = "the client to read its answer within channel_timeout"
        searched = 0
        while True:  # the head, after any interim (1xx) answers
            end = buf.find(b"\r\n\r\n", max(0, searched - 3))
            if end < 0:
                if len(buf) > PIPE_CHUNK:  # pragma: no cover - waitress's own output
                    return False
                searched = len(buf)
                data = await reader.read(PIPE_CHUNK)
                if not data:
                    return False  # waitress closed (it answers every request it can parse)
                buf += data
                continue
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            searched = 0
            try:
                answer = parse_response_head(head, method)
            except FramingError:  # pragma: no cover - waitress's own output
                return False
            out += head
            if not 100 <= answer.status < 200:
                break
        chunked = Chunked() if answer.chunked else None
        remaining = answer.length or 0
        while True:
            if buf:
                if chunked is not None:
                    try:
                        take = chunked.scan(buf)
                    except FramingError:  # pragma: no cover - waitress's own output
                        return False
                elif answer.until_close:
                    take = len(buf)
                else:
                    take = min(remaining, len(buf))
                    remaining -= take
                out += buf[:take]
                del buf[:take]
            if out:
                await self._to_client(bytes(out))
                out.clear()
            if chunked.done if chunked is not None else not answer.until_close and not remaining:
                # Requests go one at a time: nothing may follow the answer.
                return not buf and not answer.close
            data = await reader.read(PIPE_CHUNK)
            if not data:
                return False
            buf += data

    # -- the client -----------------------------------------------------------

    async def _to_client(self, data: bytes) -> None:
        self.writer.write(data)
        await self._drain(self.writer, self.loop.time() + self.front.read_timeout)

    async def _drain(self, writer: asyncio.StreamWriter, deadline: float) -> None:
        transport = writer.transport
        if transport.is_closing():
            raise ConnectionResetError("connection closed")
        if transport.get_write_buffer_size() > WRITE_BUFFER:
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
        finally:
            self._disarm()

    async def close(self, timeout: float) -> None:
        self._disarm()
        self.front.idle.pop(self, None)
        self._drop_backend()
        await close_writer(self.writer, timeout)
        forget_traceback(self.reader.exception())
