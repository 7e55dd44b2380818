"""dcapd.quickconn on its own: which requests it answers from callbacks, and when it hands
the connection to dcapd.relay (with exactly the bytes read so far, or the answer made).

The front's tests (TLS, slow clients, hostile connections, body rules, graceful stop) run it
through the real server; these pin down its rules with a recording transport and front.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from dcapd.frontrules import WAITING_HEAD, WAITING_IDLE, WRITE_BUFFER
from dcapd.httpframe import MAX_HEAD_BYTES
from dcapd.quickconn import QuickConnection

GET = b"GET /sgx/certification/v4/tcb?fmspc=00606A000000 HTTP/1.1\r\nHost: pccs\r\n\r\n"
GET_CLOSE = GET[:-2] + b"Connection: close\r\n\r\n"


class Transport:
    """What QuickConnection uses of dcapd.transport.SocketTransport, recorded."""

    def __init__(self, unsent_after_write: int = 0):
        self.written: list[bytes] = []
        self.closed = False
        self.closing = False
        self.aborted = False
        self.unsent_after_write = unsent_after_write
        self.unsent = 0
        self.last: bytes | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 4242) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.unsent = self.unsent_after_write

    def write_last(self, data: bytes) -> None:  # write, then close: one segment on Linux
        self.write(data)
        self.last = data
        self.close()

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def close(self) -> None:
        self.closing = True
        self.closed = self.unsent == 0

    def abort(self) -> None:
        self.aborted = self.closed = True


class Direct:
    """answer_inline: the next of *answers* (None: it must wait), noting each head asked."""

    def __init__(self, *answers: tuple[list[bytes], bool] | None):
        self.answers = list(answers)
        self.asked: list[bytes] = []

    def answer_inline(self, head: bytes, peer: tuple[str, int]) -> Any:
        assert peer == ("192.0.2.7", 4242)
        self.asked.append(head)
        return self.answers.pop(0)


class Front:
    def __init__(self, direct: Direct | None, head_timeout: float = 5.0, idle_timeout: float = 5.0):
        self.direct = direct
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.draining = False
        self.quick: dict[QuickConnection, None] = {}
        self.handed: list[tuple[Any, bytes, float, Any]] = []

    def hand_over(self, transport, buffered, start, answer) -> None:
        self.handed.append((transport, buffered, start, answer))


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def connect(loop, front: Front, transport: Transport, accepted: float = 0.0) -> QuickConnection:
    conn = QuickConnection(front, loop, accepted or loop.time())
    conn.connection_made(transport)
    return conn


def test_a_bodiless_get_is_answered_and_kept_alive_then_closed_on_request(loop):
    direct = Direct(([b"HTTP/1.1 200 OK\r\n", b"\r\nA"], False), ([b"B"], True))
    front, transport = Front(direct), Transport()
    conn = connect(loop, front, transport)
    conn.data_received(GET[:20])
    assert transport.written == [] and direct.asked == []  # the head is not whole yet
    conn.data_received(GET[20:])
    assert direct.asked == [GET]
    assert transport.written == [b"HTTP/1.1 200 OK\r\n\r\nA"] and not transport.closing
    assert conn.idle and front.quick == {conn: None}
    conn.data_received(GET_CLOSE)
    assert transport.last == b"B" and transport.closed and not transport.aborted
    assert front.quick == {} and front.handed == []


def test_pipelined_requests_are_answered_in_order(loop):
    direct = Direct(([b"one"], False), ([b"two"], False))
    front, transport = Front(direct), Transport()
    connect(loop, front, transport).data_received(GET + GET)
    assert transport.written == [b"one", b"two"] and len(direct.asked) == 2


@pytest.mark.parametrize(
    "received",
    [
        b"POST /sgx/certification/v4/platforms HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"\r\n" + GET,  # leading blank line: the relay drops it as waitress does
        b"GET / HTTP/1.1\r\nBad header\r\n\r\n",  # a framing error: the relay refuses it
        b"PUT / HTTP/1.1\r\n\r\n",
        b"G" * MAX_HEAD_BYTES,  # no head end within waitress's limit
    ],
)
def test_anything_but_a_plain_bodiless_request_goes_to_the_relay_unread(loop, received):
    direct = Direct()
    front, transport = Front(direct), Transport()
    conn = connect(loop, front, transport, accepted=123.0)
    conn.data_received(received)
    assert front.handed == [(transport, received, 123.0, None)]
    assert direct.asked == [] and transport.written == [] and front.quick == {}


def test_an_answer_that_must_wait_goes_to_the_relay_with_its_head(loop):
    direct = Direct(None)
    front, transport = Front(direct), Transport()
    connect(loop, front, transport, accepted=7.0).data_received(GET + b"GET /next")
    assert front.handed == [(transport, GET + b"GET /next", 7.0, None)]
    assert transport.written == []


def test_a_large_answer_goes_to_the_relay_which_waits_for_the_reader(loop):
    big = b"x" * (WRITE_BUFFER + 1)
    direct = Direct(([big[:10], big[10:]], False))
    front, transport = Front(direct), Transport()
    connect(loop, front, transport).data_received(GET + b"GET")
    assert len(front.handed) == 1
    _, buffered, _, answer = front.handed[0]
    assert answer == (big, False) and buffered == b"GET" and transport.written == []


def test_the_next_request_of_a_client_that_has_not_read_its_answer_goes_to_the_relay(loop):
    direct = Direct(([b"one"], False))
    front, transport = Front(direct), Transport(unsent_after_write=3)
    conn = connect(loop, front, transport)
    conn.data_received(GET)
    conn.data_received(GET)
    assert transport.written == [b"one"] and len(direct.asked) == 1
    assert [h[1] for h in front.handed] == [GET]


def test_without_direct_answers_every_request_goes_to_the_relay(loop):
    front, transport = Front(None), Transport()
    connect(loop, front, transport).data_received(GET)
    assert [h[1] for h in front.handed] == [GET]


def test_while_stopping_the_answer_closes_the_connection(loop):
    front, transport = Front(Direct(([b"one"], False))), Transport()
    front.draining = True
    connect(loop, front, transport).data_received(GET)
    assert transport.written == [b"one"] and transport.closed


@pytest.mark.parametrize("state", ["head", "idle"])
def test_a_deadline_drops_the_client_with_one_line(loop, caplog, state):
    direct = Direct(([b"one"], False))
    front, transport = Front(direct, head_timeout=0.05, idle_timeout=0.05), Transport()
    conn = connect(loop, front, transport)
    if state == "head":
        conn.data_received(GET[:10])
    else:
        conn.data_received(GET)
    with caplog.at_level(logging.INFO, logger="dcapd.server"):
        loop.run_until_complete(asyncio.sleep(0.2))
    why = WAITING_HEAD if state == "head" else WAITING_IDLE
    assert [r.getMessage() for r in caplog.records] == [f"TLS front: dropped 192.0.2.7: {why}"]
    assert transport.closed and front.quick == {}


def test_a_head_deadline_counts_from_accept_and_from_the_next_request_s_first_byte(loop):
    direct = Direct(([b"one"], False))
    front, transport = Front(direct, head_timeout=0.2, idle_timeout=10), Transport()
    conn = connect(loop, front, transport, accepted=loop.time() - 0.15)
    loop.run_until_complete(asyncio.sleep(0.1))
    assert transport.closed, "accepted 0.25 s ago: past head_timeout"
    transport = Transport()
    conn = connect(loop, front, transport)
    conn.data_received(GET)
    loop.run_until_complete(asyncio.sleep(0.15))
    conn.data_received(b"GET /")  # first byte of the next request: 0.2 s from here
    loop.run_until_complete(asyncio.sleep(0.1))
    assert not transport.closing
    loop.run_until_complete(asyncio.sleep(0.2))
    assert transport.closed


def test_eof_and_a_client_that_does_not_read_before_close(loop, monkeypatch):
    monkeypatch.setattr("dcapd.quickconn.CLOSE_GRACE", 0.1)
    front, transport = Front(Direct(([b"one"], True))), Transport(unsent_after_write=3)
    conn = connect(loop, front, transport)
    conn.data_received(GET)
    assert transport.closing and not transport.closed  # what was written goes first...
    loop.run_until_complete(asyncio.sleep(0.05))
    assert not transport.aborted
    loop.run_until_complete(asyncio.sleep(0.2))
    assert transport.aborted  # ...within CLOSE_GRACE
    front, transport = Front(Direct()), Transport()
    conn = connect(loop, front, transport)
    conn.data_received(GET[:10])
    assert conn.eof_received() is True and transport.closed and front.quick == {}
