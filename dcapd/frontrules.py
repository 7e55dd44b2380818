"""What every connection of dcapd's front follows, whether a task serves it
(:mod:`dcapd.relay`) or the transport's callbacks do (:mod:`dcapd.quickconn`)."""

from __future__ import annotations

import logging

from .httpframe import RequestHead

__all__ = [
    "CLOSE_GRACE",
    "WAITING_HEAD",
    "WAITING_IDLE",
    "WRITE_BUFFER",
    "answered_in_front",
    "forget_traceback",
    "log_dropped",
]

log = logging.getLogger("dcapd.server")

#: Answered in the front (dcapd.direct) when they carry no body: every PCCS collateral request.
_DIRECT_METHODS = frozenset(("GET", "HEAD"))
WRITE_BUFFER = 64 * 1024  # wait for the client to read beyond this much
CLOSE_GRACE = 2.0  # for the last bytes to go before a connection is cut

#: What a connection is waiting for when a deadline drops it (logged).
WAITING_HEAD = "a request head within head_timeout"
WAITING_IDLE = "no next request within idle_timeout"


def answered_in_front(request: RequestHead) -> bool:
    """A bodiless GET or HEAD: the front answers it (dcapd.direct), waitress never sees it."""
    return request.length == 0 and request.method in _DIRECT_METHODS


def log_dropped(peer: tuple[str, int], why: str) -> None:
    """The one line a client dropped by the front gets, *why* saying for what (a deadline,
    a broken body): info, as such clients are routine on the internet."""
    log.info("TLS front: dropped %s: %s", peer[0], why)


def forget_traceback(exc: BaseException | None) -> None:
    """Drop what a connection's ended exception keeps alive.

    asyncio keeps the exception that ended a connection (a client resetting it, say) in the
    connection's futures, and its traceback keeps the frames that refer back to them: a cycle
    that only Python's full garbage collection frees, holding each connection's objects until
    then (with asyncio's TLS transport, a 256 KiB read buffer each: with clients that reset
    after their answer, 0.25 MiB per request for seconds, peak RSS 270 MiB at 350 new
    connections a second); without the traceback, reference counting frees the connection
    when it ends."""
    while exc is not None:
        exc.__traceback__ = None
        exc = exc.__context__
