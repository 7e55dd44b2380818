"""The event loop the front runs on: uvloop where it is installed, else asyncio's own.

A QCNL client opens a new TLS connection for every request, and for each one the front runs
a few loop iterations, a task, its futures and timers. On uvloop (libuv, in compiled code)
that costs about 0.1 ms less CPU per connection than on asyncio's selector loop: 0.98-1.11
against 0.99-1.38 ms a new connection, lower in each of five alternating pairs of runs
(scripts/bench.py, 2-vCPU VM). The front's own transport (:mod:`dcapd.transport`) needs only
the loop's readiness callbacks (``add_reader``/``add_writer``), which both loops have;
Windows' proactor loop has none, and keeps asyncio's transports.
"""

from __future__ import annotations

import asyncio
from typing import Any

try:  # a dependency where it has wheels (not Windows): setup.cfg
    import uvloop
except ImportError:  # pragma: no cover - Windows, or a build without it
    uvloop = None  # type: ignore[assignment]

__all__ = ["unavailable", "new_front_loop", "has_readiness_callbacks"]


def unavailable(choice: str) -> str | None:
    """Why ``[server] event_loop = choice`` cannot run here (None: it can)."""
    return "uvloop is not installed" if choice == "uvloop" and uvloop is None else None


def new_front_loop(choice: str) -> asyncio.AbstractEventLoop:
    """A new loop as ``[server] event_loop`` says: auto = uvloop if installed, else asyncio's
    default (the selector loop; Windows: the proactor loop). The CLI refuses a choice that
    is :func:`unavailable` before this runs."""
    reason = unavailable(choice)
    if reason:
        raise RuntimeError(f"event_loop = {choice}: {reason}")
    if choice != "asyncio" and uvloop is not None:
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def has_readiness_callbacks(loop: Any) -> bool:
    """The loop calls back when a socket is readable or writable (what dcapd.transport runs
    on): asyncio's selector loops and uvloop; not Windows' proactor loop."""
    if uvloop is not None and isinstance(loop, uvloop.Loop):
        return True
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)
