"""A front connection served from its transport's callbacks while every answer is at hand.

Most clients of a PCCS send one bodiless GET per connection (QCNL opens a new connection for
each request) and the front answers it in its own thread (:mod:`dcapd.direct`). Serving such
a connection as :class:`dcapd.relay.Connection` does (a task reading asyncio streams) cost
0.06 - 0.09 ms of CPU per connection more than answering from the protocol's callbacks
(a minimal server on dcapd's transport, one fixed answer: 0.87 against 0.78 - 0.81 ms a
connection; CPython 3.11, uvloop). :class:`QuickConnection` is that protocol: it reads each
request head, has it answered inline and writes the answer, under the same deadlines
(``head_timeout`` from accept or from a kept-alive request's first byte, ``idle_timeout``
between requests; either drops the client with the line :mod:`dcapd.relay` logs).

Anything else hands the connection over to :class:`dcapd.relay.Connection` before a byte of
it is acted on, with what was read so far: a head that is not a plain bodiless GET or HEAD
(a body, a framing error, leading blank lines, one too large), an answer that must wait for
a pool thread, an answer larger than the write buffer allows or a client that has not read
the previous one yet (the relay waits for such a reader within ``channel_timeout``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from .direct import Answer, DirectAnswers
from .frontrules import (
    CLOSE_GRACE,
    WAITING_HEAD,
    WAITING_IDLE,
    WRITE_BUFFER,
    answered_in_front,
    log_dropped,
)
from .httpframe import MAX_HEAD_BYTES, FramingError, parse_request_head

__all__ = ["QuickConnection", "QuickFront"]


class QuickFront(Protocol):
    """What a :class:`QuickConnection` needs of the front that accepted it."""

    direct: DirectAnswers | None
    head_timeout: float
    idle_timeout: float
    draining: bool
    quick: dict[QuickConnection, None]  # open quick connections (a stop closes them)

    def hand_over(
        self, transport: Any, buffered: bytes, start: float, answer: tuple[bytes, bool] | None
    ) -> None: ...


class QuickConnection(asyncio.Protocol):
    """One client, from accept (*accepted*: the loop's time then) until it closes or needs
    :class:`dcapd.relay.Connection`."""

    def __init__(self, front: QuickFront, loop: asyncio.AbstractEventLoop, accepted: float):
        self.front = front
        self.loop = loop
        self.start = accepted  # of the current request head: its deadline counts from here
        self.buf = bytearray()  # bytes from the client not acted on yet
        self.transport: Any = None
        self.peer: tuple[str, int] = ("", 0)
        self.idle = False  # an answer went out; waiting for the next request's first byte
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername") or ("", 0)
        self.front.quick[self] = None
        self._expect(self.start + self.front.head_timeout, WAITING_HEAD)

    def data_received(self, data: bytes) -> None:
        if self.idle:  # the next request's first byte: its head deadline counts from now
            self.idle = False
            self.start = self.loop.time()
            self._expect(self.start + self.front.head_timeout, WAITING_HEAD)
        self.buf += data
        self._answer_heads()

    def eof_received(self) -> bool:
        self.close()  # a partial head is dropped, as the relay drops it
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self._forget()
        self.transport = None

    def close(self, last: bytes = b"") -> None:
        """Close gracefully after *last* (written with its close: one segment) and what was
        written before; abort if the client has not read it all within CLOSE_GRACE."""
        transport = self.transport
        self._forget()
        if transport is None:
            return
        if last:
            transport.write_last(last)
        else:
            transport.close()
        if not getattr(transport, "closed", False):
            self.loop.call_later(CLOSE_GRACE, transport.abort)

    # -- requests -------------------------------------------------------------

    def _answer_heads(self) -> None:
        front, buf = self.front, self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) >= MAX_HEAD_BYTES:
                    self._hand_over(None)  # the relay refuses it
                return
            direct = front.direct
            if direct is None or buf[:1].isspace() or self.transport.get_write_buffer_size():
                self._hand_over(None)
                return
            try:
                request = parse_request_head(bytes(buf[: end + 4]))
            except FramingError:
                self._hand_over(None)  # the relay refuses it
                return
            if not answered_in_front(request):
                self._hand_over(None)
                return
            answer: Answer | None = direct.answer_inline(request.raw, self.peer)
            if answer is None:  # it must wait: a pool thread answers it (the relay asks)
                self._hand_over(None)
                return
            del buf[: end + 4]
            chunks, close = answer
            data = b"".join(chunks)
            close = close or front.draining  # stopping: no next request on this connection
            if len(data) > WRITE_BUFFER:
                self._hand_over((data, close))  # the relay waits for the client to read it
                return
            if close:
                self.close(data)
                return
            self.transport.write(data)
            if not buf:
                self.idle = True
                self._expect(self.loop.time() + front.idle_timeout, WAITING_IDLE)
                return
            self.start = self.loop.time()  # a pipelined request, here already
            self._expect(self.start + front.head_timeout, WAITING_HEAD)

    def _hand_over(self, answer: tuple[bytes, bool] | None) -> None:
        transport, buffered = self.transport, bytes(self.buf)
        self._forget()
        self.transport = None
        self.buf = bytearray()
        self.front.hand_over(transport, buffered, self.start, answer)

    # -- deadlines ------------------------------------------------------------

    def _expect(self, deadline: float, waiting_for: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(deadline, self._expired, waiting_for)

    def _expired(self, waiting_for: str) -> None:
        self._timer = None
        log_dropped(self.peer, waiting_for)
        self.close()

    def _forget(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.front.quick.pop(self, None)
