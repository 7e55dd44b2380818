"""Where the process is in its life: serving, or draining after a stop signal.

One small object the server sets and the readiness probe reads, passed to both by the wiring
(no module global): while it drains, ``/readyz`` answers 503 so a load balancer stops sending
new clients, and the requests already in flight get the grace period to finish."""

from __future__ import annotations

import threading


class Lifecycle:
    def __init__(self) -> None:
        self.draining = threading.Event()
