"""Answering a request without a body in the front, without the loopback hop to waitress.

Relaying every request to waitress over a loopback connection cost each cache hit two more
socket reads and writes, waitress's own event-loop pass and two thread hand-offs (about
0.4 ms of CPU a request on a 2-vCPU VM). A request the front has read whole from its head
(``GET`` or ``HEAD``, no body) is answered here instead: first in the front's own thread
(:meth:`DirectAnswers.answer_inline`, for an app that says it may be: :mod:`dcapd.inline`),
else in a small pool of daemon threads (:meth:`DirectAnswers.submit`). The bytes are
waitress's: a plain request goes through :mod:`dcapd.quickwsgi` (waitress's steps without its
objects), any other through waitress's own request parser and WSGI task with a stand-in for
its channel that collects the answer. Either way: the same request checks (a request
waitress refuses gets waitress's 4xx), the same environ (the same WSGI application,
proxy-header cleaning included), the same response head and the same 500 when the app fails.
Requests with a body still go to waitress, which streams them.

Uses ``waitress.parser.HTTPRequestParser`` and ``waitress.task.WSGITask``/``ErrorTask``
(waitress 3), the classes waitress itself serves every request with.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any

from waitress.parser import HTTPRequestParser
from waitress.task import ErrorTask, WSGITask
from waitress.utilities import InternalServerError

from .inline import MustWait, inline
from .quickwsgi import Answer, QuickWsgi

__all__ = ["DirectAnswers", "Answer"]

log = logging.getLogger("waitress")  # where waitress logs a failing app: one place to look

_UNEXPECTED = "The server encountered an unexpected internal server error"


class _Server:
    """What waitress's task reads of its server: the app, the settings, the public port."""

    def __init__(self, waitress_server: Any, public_port: int):
        self.application = waitress_server.application
        self.adj = waitress_server.adj
        self.server_name = waitress_server.server_name
        self.effective_port = public_port


class _Channel:
    """Stands in for waitress's channel: collects what the task writes."""

    def __init__(self, server: _Server, peer: tuple[str, int]):
        self.server = server
        self.adj = server.adj
        self.addr = peer
        self.out: list[bytes] = []

    def write_soon(self, data: Any) -> int:
        if isinstance(data, (bytes, bytearray)):
            if data:
                self.out.append(bytes(data))
            return len(data)
        size = 0  # a wsgi.file_wrapper buffer: read it all here, in the app's thread
        try:
            for chunk in data:
                self.out.append(chunk)
                size += len(chunk)
        finally:
            close = getattr(data, "close", None)
            if close is not None:
                close()
        return size

    @staticmethod
    def check_client_disconnected() -> None:
        """The answer is sent after the app returns: no disconnect is seen before."""


class DirectAnswers:
    """Answers bodiless requests with waitress's parser and task in a pool of threads.

    *waitress_server*: the waitress server (``create_server``'s result) whose application,
    settings and server name are used; *public_port*: the public port, for ``SERVER_PORT``;
    *threads*: the pool's size (the ``threads`` setting); *https*: the clients speak TLS;
    *inline*: try each request in the front's thread first (:meth:`answer_inline`; only
    where a cache read cannot wait: the cache directory, not PostgreSQL).
    The threads are daemons, as waitress's are: a call still running when the grace period
    ends does not hold the exit.
    """

    def __init__(
        self, waitress_server: Any, public_port: int, threads: int, https: bool, inline: bool
    ):
        self._server = _Server(waitress_server, public_port)
        self._quick = QuickWsgi(
            waitress_server.application, waitress_server.adj, public_port, https
        )
        self._https = https
        self.inline = inline
        self._calls: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"dcapd-app-{n}", daemon=True)
            for n in range(max(1, threads))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, head: bytes, peer: tuple[str, int]) -> asyncio.Future[Answer]:
        """The answer to *head* from *peer*, computed in a pool thread (call from the loop)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Answer] = loop.create_future()
        self._calls.put((loop, future, head, peer))
        return future

    def _work(self) -> None:
        calls = self._calls
        while True:
            call = calls.get()
            if call is None:
                return
            loop, future, head, peer = call
            try:
                outcome: Any = self.answer(head, peer)
                failed = False
            except BaseException as exc:  # pragma: no cover - answer() answers 500 itself
                outcome, failed = exc, True
            try:
                loop.call_soon_threadsafe(_settle, future, outcome, failed)
            except RuntimeError:  # pragma: no cover - the loop closed meanwhile (stop)
                pass

    def answer_inline(self, head: bytes, peer: tuple[str, int]) -> Answer | None:
        """The answer computed in this (the front's) thread, or None when the app had to
        wait for something (:mod:`dcapd.inline`): then ask :meth:`submit`."""
        if not self.inline:
            return None
        try:
            with inline():
                return self.answer(head, peer)
        except MustWait:
            return None

    def answer(self, head: bytes, peer: tuple[str, int]) -> Answer:
        """The whole answer to the request whose head (no body) is *head*, from *peer*."""
        environ = self._quick.environ(head, peer)
        if environ is not None:  # a plain request: waitress's steps without its objects
            try:
                return self._quick.call(environ)
            except Exception:
                log.exception("Exception while serving %s", environ["PATH_INFO"])
                version = environ["SERVER_PROTOCOL"][5:]
                return self._internal_error(version, environ.get("HTTP_CONNECTION"))
        server = self._server
        # Any: waitress's type stubs expect its own channel and parser classes here.
        channel: Any = _Channel(server, peer)
        request: Any = HTTPRequestParser(server.adj)
        request.received(head)
        if request.error is not None or not request.completed:
            if request.error is None:  # pragma: no cover - the front passes whole heads only
                request.error = InternalServerError("incomplete request head")
            task: WSGITask | ErrorTask = ErrorTask(channel, request)
        else:
            task = WSGITask(channel, request)
            if self._https:
                environ = task.get_environment()  # kept by the task for execute()
                environ["wsgi.url_scheme"] = "https"
                environ["HTTPS"] = "on"
        try:
            task.service()
        except Exception:
            # As waitress's channel does: log, and answer 500 unless the head went out.
            log.exception("Exception while serving %s", request.path)
            if task.wrote_header:
                return channel.out, True
            return self._internal_error(request.version, request.headers.get("CONNECTION"))
        finally:
            request.close()
        return channel.out, task.close_on_finish

    def _internal_error(self, version: str, connection: str | None) -> Answer:
        """waitress's 500 for an app that failed before its answer's head went out."""
        channel: Any = _Channel(self._server, ("", 0))
        error: Any = HTTPRequestParser(self._server.adj)
        error.error = InternalServerError(_UNEXPECTED)
        error.version = version
        if connection is not None:
            error.headers["CONNECTION"] = connection
        task = ErrorTask(channel, error)
        task.service()
        return channel.out, task.close_on_finish

    def close(self, timeout: float = 1.0) -> None:
        """No new calls; wait up to *timeout* seconds for the threads to end (a call still
        running goes on in its daemon thread)."""
        for _ in self._threads:
            self._calls.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _settle(future: asyncio.Future, outcome: Any, failed: bool) -> None:
    if future.done():  # cancelled: the connection ended (stop, or a client gone)
        return
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
