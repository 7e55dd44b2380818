"""dcapd's front connections: an asyncio transport over a non-blocking socket, TLS or plain.

asyncio's own TLS transport (``asyncio.sslproto``) runs OpenSSL on memory buffers and moves
every TLS record through Python code: the handshake's flights, each read, each write, the
closing alert. On a 2-vCPU VM a resumed TLS 1.3 connection answering one request cost
1.13 ms of server CPU that way, and 0.77 ms when the same answer went out through an
``ssl.SSLSocket`` that OpenSSL reads and writes itself, driven from the loop's readiness
callbacks (Python 3.11, OpenSSL 3.0; a fixed answer, the same client). QCNL opens a new
connection for every request, so this is most of what a PCCS spends per request.

:class:`Listener` accepts on a listening socket (TLS: wraps each connection in the
context, handshake not yet done) and gives each connection a :class:`SocketTransport`, which
does the handshake (within its deadline), then calls its protocol as any asyncio transport
does (``connection_made``, ``data_received``, ``eof_received``, ``connection_lost``,
``pause_writing``/``resume_writing``), so that asyncio's streams run on it unchanged.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from typing import Any, Callable

__all__ = ["Listener", "SocketTransport", "READ_CHUNK"]

log = logging.getLogger("dcapd.server")

#: The most read from a connection at once (a TLS record holds at most 16 KiB).
READ_CHUNK = 64 * 1024
_HIGH_WATER, _LOW_WATER = 64 * 1024, 16 * 1024  # asyncio's own write-buffer limits
_ACCEPT_RETRY = 1.0  # out of file descriptors: stop accepting for a second (as asyncio)
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)  # Linux
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class SocketTransport(asyncio.Transport):
    """One accepted connection. *sock* is non-blocking; an ``ssl.SSLSocket`` has its
    handshake done here first, within *handshake_timeout* seconds (else it is closed, as
    a failed handshake is, without the protocol ever hearing of it). *read_buffer* is the
    listener's, shared: what is read is copied out of it at once (one loop thread). *tcp*: a
    TCP socket, not a Unix one (:meth:`write_last` corks it)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        peer: Any,
        protocol: asyncio.BaseProtocol,
        read_buffer: bytearray,
        on_done: Callable[[SocketTransport], None],
        tcp: bool,
    ):
        super().__init__()
        self._info: dict[str, Any] = {"peername": peer}
        self._loop: Any = loop
        self._sock: Any = sock
        self._fd = sock.fileno()
        self._protocol: Any = protocol
        self._buffer = read_buffer
        self._view = memoryview(read_buffer)
        self._on_done = on_done
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._tcp = tcp
        self.connected = False  # handshake done, the protocol told
        self._reading = False  # a reader is registered
        self._paused = False  # the protocol asked for no more data
        self._writing = False  # a writer is registered
        self._sending: bytes | None = None  # handed to the socket (TLS: retried as it is)
        self._out = bytearray()  # written after _sending
        self._closing = False
        self._closed = False
        self._writes_paused = False
        self._high, self._low = _HIGH_WATER, _LOW_WATER
        self._timer: asyncio.TimerHandle | None = None

    # -- the start: TLS handshake ---------------------------------------------

    def start(self, handshake_timeout: float) -> None:
        if not self._tls:
            self._connect()
            return
        self._timer = self._loop.call_later(handshake_timeout, self._handshake_expired)
        self._add_reader(self._handshake)
        self._handshake()

    def _handshake(self) -> None:
        try:
            self._sock.do_handshake()
        except ssl.SSLWantReadError:
            self._remove_writer()
            return
        except ssl.SSLWantWriteError:
            self._add_writer(self._handshake)
            return
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: broken or hostile
            log.debug("TLS front: handshake failed: %r", exc)
            self._close_now(None)
            return
        self._remove_writer()
        self._connect()

    def _handshake_expired(self) -> None:
        self._timer = None
        if not self.connected and not self._closed:
            log.debug("TLS front: handshake not done within its deadline")
            self._close_now(None)

    def _connect(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.connected = True
        self._protocol.connection_made(self)
        if not self._closing and not self._paused:
            self._add_reader(self._read_ready)
            self._read_ready()  # bytes that came with the handshake's last flight

    # -- reading --------------------------------------------------------------

    def _read_ready(self) -> None:
        sock, view = self._sock, self._view
        while not self._paused and not self._closing:
            try:
                count = sock.recv_into(self._buffer)
            except _WOULD_BLOCK:
                return
            except (OSError, ValueError) as exc:  # a reset, a broken TLS record
                self._fatal(exc)
                return
            if not count:
                self._eof()
                return
            self._protocol.data_received(bytes(view[:count]))
            # OpenSSL may hold decrypted bytes the socket no longer signals: read on.
            if not self._tls or not sock.pending():
                return

    def _eof(self) -> None:
        self._remove_reader()
        keep_open = self._protocol.eof_received()
        if not keep_open:
            self.close()

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            self._remove_reader()

    def resume_reading(self) -> None:
        if self._paused and not self._closing:
            self._paused = False
            if self.connected:
                self._add_reader(self._read_ready)
                if self._tls and self._sock.pending():
                    self._loop.call_soon(self._read_ready)

    # -- writing --------------------------------------------------------------

    def write(self, data: Any) -> None:
        if not data or self._closing:
            return
        if self._sending is None and not self._out:
            self._sending = bytes(data)
            if self._flush():
                return
        else:
            self._out += data
        if not self._writing and not self._closed:
            self._add_writer(self._write_ready)
        self._check_high_water()

    def write_last(self, data: bytes) -> None:
        """``write(data)``, then ``close()``: on Linux the answer, TLS's close_notify and the
        FIN leave in one TCP segment (corked until the socket closes), not in three, which
        the server pays for on loopback and the client gets three wake-ups for."""
        if _TCP_CORK is not None and self._tcp and self._sending is None and not self._out:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1)
            except OSError:  # pragma: no cover - a reset connection: write() reports it
                pass
        self.write(data)
        self.close()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _flush(self) -> bool:
        """Hand what is buffered to the socket; True when all of it went (or it failed)."""
        sock = self._sock
        while True:
            data = self._sending
            if data is None:
                if not self._out:
                    return True
                data = self._sending = bytes(self._out)
                self._out.clear()
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                return False  # OpenSSL: the same bytes are offered again when writable
            except (OSError, ValueError) as exc:  # ssl.SSLWantReadError included: no
                self._fatal(exc)  # renegotiation is allowed, so it means a broken peer
                return True
            # TLS writes all or nothing; a plain socket may take part of it.
            self._sending = None if sent >= len(data) else data[sent:]

    def _write_ready(self) -> None:
        if not self._flush():
            return
        self._remove_writer()
        if self._closed:
            return
        if self._writes_paused and self.get_write_buffer_size() <= self._low:
            self._writes_paused = False
            self._protocol.resume_writing()
        if self._closing:
            self._close_now(None, graceful=True)

    def _check_high_water(self) -> None:
        if not self._writes_paused and self.get_write_buffer_size() > self._high:
            self._writes_paused = True
            self._protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return len(self._sending or b"") + len(self._out)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = _HIGH_WATER if high is None else high
        self._low = min(self._high, self._high // 4 if low is None else low)
        self._check_high_water()

    def can_write_eof(self) -> bool:
        return False

    # -- the end --------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._closed

    @property
    def closed(self) -> bool:
        """The socket is closed (``close`` closes it at once when nothing waits to be sent)."""
        return self._closed

    def close(self) -> None:
        """Stop reading; once what was written has gone, close (TLS: with its alert)."""
        if self._closing or self._closed:
            return
        self._closing = True
        self._remove_reader()
        if self._sending is None and not self._out:
            self._close_now(None, graceful=True)

    def abort(self) -> None:
        """Close at once: what was not sent is dropped, and no close_notify says otherwise."""
        self._close_now(None)

    def _fatal(self, exc: BaseException) -> None:
        log.debug("TLS front: connection ended: %r", exc)
        self._close_now(exc)

    def _close_now(self, exc: BaseException | None, graceful: bool = False) -> None:
        """Close the socket; *graceful* (everything written has gone): TLS's close_notify
        first, so that the client can tell the end from a cut."""
        if self._closed:
            return
        self._closing = self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._remove_reader()
        self._remove_writer()
        sock = self._sock
        if graceful and self._tls and self.connected:
            try:
                sock.unwrap()  # the close_notify alert; the peer's is not waited for
            except (OSError, ValueError):
                pass
        try:
            sock.close()
        except OSError:  # pragma: no cover
            pass
        self._sending = None
        self._out.clear()
        self._on_done(self)
        if self.connected:
            self._loop.call_soon(self._lost, exc)
        else:
            self._protocol = None

    def _lost(self, exc: BaseException | None) -> None:
        protocol, self._protocol = self._protocol, None
        try:
            protocol.connection_lost(exc)
        finally:
            self._sock = None  # asyncio's transports break the same cycles

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._info:
            return self._info[name]
        sock = self._sock
        if sock is None:
            return default
        if name == "socket":
            return sock
        if name == "sockname":
            try:
                return sock.getsockname()
            except OSError:
                return default
        if self._tls:
            if name == "sslcontext":
                return sock.context
            if name == "ssl_object":
                return sock
            if name == "peercert" and self.connected:
                return sock.getpeercert()
            if name in ("cipher", "compression"):
                return getattr(sock, name)()
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> Any:
        return self._protocol

    # -- the loop -------------------------------------------------------------

    def _add_reader(self, callback: Callable[[], None]) -> None:
        self._loop.add_reader(self._fd, callback)
        self._reading = True

    def _remove_reader(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _add_writer(self, callback: Callable[[], None]) -> None:
        self._loop.add_writer(self._fd, callback)
        self._writing = True

    def _remove_writer(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)


class Listener:
    """Accepts connections on a listening socket and starts a :class:`SocketTransport` for
    each with a protocol from *protocol_factory* (called at accept: deadlines count from
    there). *ctx*: TLS (None: plain HTTP)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        ctx: ssl.SSLContext | None,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        handshake_timeout: float,
        backlog: int,
    ):
        self._loop: Any = loop
        self._sock = sock
        self._ctx = ctx
        self._factory = protocol_factory
        self._handshake_timeout = handshake_timeout
        self._backlog = backlog
        self._read_buffer = bytearray(READ_CHUNK)
        self._tcp = sock.family in (socket.AF_INET, socket.AF_INET6)  # not a Unix socket
        self.transports: dict[SocketTransport, None] = {}  # open, in handshake or after
        self._retry: asyncio.TimerHandle | None = None
        self._open = False

    def start(self) -> None:
        self._sock.setblocking(False)
        self._open = True
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(self._backlog):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    log.error("front: cannot accept connections for now: %s", exc)
                    self._loop.remove_reader(self._sock.fileno())
                    self._retry = self._loop.call_later(_ACCEPT_RETRY, self._resume)
                    return
                log.debug("front: accept failed: %r", exc)
                return
            self._start(conn, peer)

    def _resume(self) -> None:
        self._retry = None
        if self._open:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _start(self, conn: socket.socket, peer: Any) -> None:
        try:
            conn.setblocking(False)
            if self._tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ctx is not None:
                conn = self._ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:  # reset already
            log.debug("front: connection ended at accept: %r", exc)
            conn.close()
            return
        transport = SocketTransport(
            self._loop, conn, peer, self._factory(), self._read_buffer, self._done, self._tcp
        )
        self.transports[transport] = None
        transport.start(self._handshake_timeout)

    def _done(self, transport: SocketTransport) -> None:
        self.transports.pop(transport, None)

    def close(self) -> None:
        """Stop accepting (the listening socket is closed) and close the connections still
        in their TLS handshake; the others are their protocols' to close."""
        if not self._open:
            return
        self._open = False
        if self._retry is not None:
            self._retry.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for transport in list(self.transports):
            if not transport.connected:
                transport.abort()

    def abort_clients(self) -> None:
        """Close every connection at once (asyncio's ``Server.abort_clients``)."""
        for transport in list(self.transports):
            transport.abort()

    async def wait_closed(self) -> None:
        """Closed by :meth:`close` already (asyncio's ``Server.wait_closed``)."""
