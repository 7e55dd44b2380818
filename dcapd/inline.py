"""Answers computed in the front's own thread, as long as nothing has to wait.

Handing each request to a pool thread and its answer back to the event loop costs about as
much CPU as a cache hit itself (a queue, a wake-up pipe, two thread switches: 0.04-0.08 ms).
A cache hit on the disk cache needs no waiting: a few SQLite page reads and a log line. So the
front first runs the app in its own thread with :func:`inline` set, and every place that can
wait or take long (a call to PCS, any cache write or lock, a scan of the whole cache) calls
:func:`may_wait` first, which then raises :class:`MustWait`. Nothing has been written or
counted at that point (falcon's process_response, where requests are logged and counted, does
not run for an exception that is not an ``Exception``); the front then runs the request again
in a pool thread, where the same calls go ahead.
"""

from __future__ import annotations

import threading

__all__ = ["MustWait", "inline", "may_wait"]


class MustWait(BaseException):
    """Raised in an inline answer where it would wait; ``str()`` says for what. A
    BaseException, so that no ``except Exception`` on the way turns it into an answer."""


class _Flag(threading.local):
    on = False


_inline = _Flag()  # per thread: only the front's thread ever sets it


class inline:
    """``with inline():`` in this block, on this thread, :func:`may_wait` raises
    :class:`MustWait`. (A class, not a generator: it is entered for every hit.)"""

    __slots__ = ()

    def __enter__(self) -> None:
        _inline.on = True

    def __exit__(self, *exc_info: object) -> None:
        _inline.on = False


def may_wait(what: str) -> None:
    """Call before anything that can wait or take long (*what* says what, for debugging)."""
    if _inline.on:
        raise MustWait(what)
