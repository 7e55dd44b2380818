"""dcapd.transport on its own: the front's connections, TLS or plain, over real sockets.

The front's tests (slow clients, hostile connections, body rules) run everything through it;
these pin down the transport contract they rely on: a large answer to a client that reads
slowly is held back (pause_writing), resumed, delivered whole and in order, then closed with
TLS's close_notify; and a listener that runs out of file descriptors stops accepting for a
moment and takes the waiting connection when it can.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import pytest

from dcapd import tls as dcapd_tls
from dcapd.transport import Listener
from tests.test_slow_clients import client_context

ANSWER = bytes(range(256)) * (16 * 1024)  # 4 MiB, every byte position telling


class Recorder(asyncio.Protocol):
    """Writes *answer* when the connection is made (after the first byte read, with
    *after_request*), closes (or, with *abort*, aborts), and notes what the transport told
    it."""

    def __init__(
        self,
        answer: bytes,
        events: list[str],
        after_request: bool = False,
        abort: bool = False,
        last: bool = False,
    ):
        self.answer = answer
        self.events = events
        self.after_request = after_request
        self.abort = abort
        self.last = last  # write_last(), noting whether the socket is corked then

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append("made")
        if not self.after_request:
            self.respond()

    def data_received(self, data: bytes) -> None:
        if self.after_request:
            self.respond()

    def respond(self) -> None:
        if self.last:
            self.transport.write_last(self.answer)
            sock = self.transport.get_extra_info("socket")  # None once closed
            cork = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) if sock else "closed"
            self.events.append(f"corked {cork}")
            return
        self.transport.write(self.answer)
        if self.abort:
            self.transport.abort()
        else:
            self.transport.close()

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append(f"lost {exc!r}")


@contextmanager
def listening(
    ctx: ssl.SSLContext | None, factory: Callable[[], asyncio.BaseProtocol]
) -> Iterator[tuple[int, Listener]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sock = socket.create_server(("127.0.0.1", 0))
    listener = Listener(loop, sock, ctx, factory, handshake_timeout=5.0, backlog=16)
    loop.call_soon_threadsafe(listener.start)
    try:
        yield sock.getsockname()[1], listener
    finally:
        loop.call_soon_threadsafe(listener.abort_clients)
        loop.call_soon_threadsafe(listener.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_a_large_answer_to_a_slow_reader_is_held_back_then_delivered_whole_and_closed(tmp_path):
    ctx, _ = dcapd_tls.server_ssl_context("", "", ["127.0.0.1"], str(tmp_path))
    events: list[str] = []
    with listening(ctx, lambda: Recorder(ANSWER, events)) as (port, _):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        with client_context().wrap_socket(raw, suppress_ragged_eofs=False) as client:
            # Not reading: the socket's buffers fill and the rest waits in the transport.
            deadline = time.monotonic() + 5
            while "pause" not in events and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # nothing else happens while the client does not read
            assert events == ["made", "pause"], events
            received = bytearray()
            while chunk := client.recv(65536):  # b"" only after the server's close_notify
                received += chunk
        assert bytes(received) == ANSWER
        deadline = time.monotonic() + 5
        while len(events) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events == ["made", "pause", "resume", "lost None"], events


@pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="Linux's TCP_CORK")
@pytest.mark.parametrize("tls", [True, False])
def test_a_last_answer_is_corked_with_its_close_and_delivered_whole(tmp_path, tls):
    """write_last(): the answer, TLS's close_notify and the FIN leave together (TCP_CORK
    until the socket closes; here it cannot close yet, the client not reading)."""
    ctx = dcapd_tls.server_ssl_context("", "", ["127.0.0.1"], str(tmp_path))[0] if tls else None
    events: list[str] = []
    with listening(ctx, lambda: Recorder(ANSWER, events, after_request=True, last=True)) as (
        port,
        _,
    ):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client = client_context().wrap_socket(raw, suppress_ragged_eofs=False) if tls else raw
        with client:
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            deadline = time.monotonic() + 5
            while len(events) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert events == ["made", "pause", "corked 1"], events  # 4 MiB: not all sent
            received = bytearray()
            while chunk := client.recv(65536):  # TLS: b"" only after the close_notify
                received += chunk
        assert bytes(received) == ANSWER


def test_an_aborted_connection_ends_without_close_notify(tmp_path):
    """abort() closes without TLS's close_notify, even when everything written has gone:
    the client sees a cut, not an end (close() sends it: the test above)."""
    ctx, _ = dcapd_tls.server_ssl_context("", "", ["127.0.0.1"], str(tmp_path))
    events: list[str] = []
    with listening(ctx, lambda: Recorder(b"partial", events, abort=True)) as (port, _):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with client_context().wrap_socket(raw, suppress_ragged_eofs=False) as client:
            received = bytearray()
            with pytest.raises((ssl.SSLEOFError, ConnectionResetError)):
                while chunk := client.recv(65536):
                    received += chunk
        assert bytes(received) == b"partial"


def test_out_of_file_descriptors_the_listener_waits_and_then_accepts():
    events: list[str] = []
    said: list[str] = []
    noted = logging.Handler()
    noted.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("dcapd.server")
    logger.addHandler(noted)
    with listening(None, lambda: Recorder(b"ok", events, after_request=True)) as (port, _):
        client = socket.socket()
        client.settimeout(10)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no fd left
        try:
            client.connect(("127.0.0.1", port))  # queued: accept() fails with EMFILE
            deadline = time.monotonic() + 5
            while not said and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            logger.removeHandler(noted)
        assert said and said[0].startswith("front: cannot accept connections for now"), said
        assert events == [], "nothing accepted while out of descriptors"
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert client.recv(16) == b"ok"  # accepted once the retry came (1 s; else a timeout)
        client.close()
