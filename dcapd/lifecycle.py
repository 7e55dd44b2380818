"""The one piece of state the server shares with the app about its own life: draining.

The server sets it when a stop begins (SIGTERM, Ctrl-C, a Windows service stop), so
``/readyz`` answers 503 "shutting down" while requests in flight finish.
"""

from __future__ import annotations

import threading


class Lifecycle:
    """``draining`` is False until :meth:`drain` (never reset: a stopping process stays so)."""

    def __init__(self) -> None:
        self._draining = threading.Event()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def drain(self) -> None:
        self._draining.set()
