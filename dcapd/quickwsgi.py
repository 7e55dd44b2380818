"""waitress's WSGI call for a plain bodiless request, without building waitress's objects.

:mod:`dcapd.direct` answers bodiless requests with waitress's own parser and task, so that
the bytes are exactly waitress's. Those two objects cost about a quarter of a cache hit's
CPU (a general parser, per-request objects, headers capitalised and sorted twice). For the
requests every client sends (a request line with an origin-form target and no fragment,
header lines waitress accepts) this module does the same steps directly: the same environ
(:meth:`QuickWsgi.environ`, waitress's ``get_environment``), the same checks of what the app
gives to ``start_response``, and the same response head (``build_response_header``: header
names capitalised, sorted, ``Content-Length`` or chunked, ``Connection``, ``Server``,
``Date``). Anything else returns None and goes to waitress's classes. ``tests/
test_quickwsgi.py`` compares both on many requests and answers, byte for byte.
"""

from __future__ import annotations

import re
import sys
import time
from io import BytesIO
from typing import Any, Callable, cast
from urllib.parse import unquote_to_bytes

from waitress.buffers import ReadOnlyFileBasedBuffer
from waitress.rfc7230 import HEADER_FIELD_RE  # the header lines waitress accepts
from waitress.task import hop_by_hop
from waitress.utilities import build_http_date

__all__ = ["QuickWsgi", "Answer"]

#: An answer: the bytes to send, and whether to close the connection afterwards.
Answer = tuple[list[bytes], bool]

_NO_BODY_STATUS = ("1", "204", "304")
# A bytes pattern (waitress's type stubs say str).
_HEADER_LINE = cast("re.Pattern[bytes]", HEADER_FIELD_RE)
_MEMO_NAMES = 512  # header names remembered capitalised (an app uses a handful)
_RENAMED = {"CONTENT_LENGTH": "CONTENT_LENGTH", "CONTENT_TYPE": "CONTENT_TYPE"}


class _Failed(Exception):
    """The app broke a WSGI rule waitress enforces: waitress's 500 answers it."""


class QuickWsgi:
    """Calls *application* (waitress's, proxy-header cleaning included) as waitress would.

    *adj*: waitress's settings (ident, server name, URL scheme and prefix); *public_port*:
    ``SERVER_PORT``; *https*: the clients speak TLS (``wsgi.url_scheme`` and ``HTTPS``)."""

    def __init__(self, application: Callable, adj: Any, public_port: int, https: bool):
        self.application = application
        self.ident: str = adj.ident
        self.fixed = {
            "SERVER_PORT": str(public_port),
            "SERVER_NAME": adj.server_name,
            "SERVER_SOFTWARE": adj.ident,
            "SCRIPT_NAME": adj.url_prefix,
            "wsgi.url_scheme": "https" if https else adj.url_scheme,
            "wsgi.version": (1, 0),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": ReadOnlyFileBasedBuffer,
            "wsgi.input_terminated": True,
            "waitress.client_disconnected": _connected,
        }
        if https:
            self.fixed["HTTPS"] = "on"
        self.simple = not adj.url_prefix  # a prefix to strip: leave it to waitress
        self._capitalized: dict[str, str] = {}  # header names as the app gives them
        self._keys: dict[bytes, str] = {}  # request header names: their environ keys
        self._date_second = -1
        self._date = ""

    def environ(self, head: bytes, peer: tuple[str, int]) -> dict[str, Any] | None:
        """waitress's environ for *head* (whole, with its blank line), or None when the head
        is not one of the plain ones this module takes (waitress's parser decides those)."""
        if not self.simple:
            return None
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            return None
        method, target, version = parts
        # (The front has refused bare CR and LF already: dcapd.httpframe.)
        if (
            version not in (b"HTTP/1.1", b"HTTP/1.0")
            or method not in (b"GET", b"HEAD")
            or target[:1] != b"/"
            or target[:2] == b"//"  # waitress: not a network-path reference
            or b"#" in target
            or b"\t" in target  # urlsplit drops tabs
            or not target.isascii()  # urlsplit refuses: waitress answers 400
        ):
            return None
        path, _, query = target.partition(b"?")
        env = dict(self.fixed)
        keys = self._keys
        for line in lines[1:]:
            if not line or line[:1] in b" \t":
                return None  # an empty or folded line: waitress's own handling
            match = _HEADER_LINE.match(line)
            if match is None:
                return None  # waitress answers 400
            name, value = match.group("name", "value")
            key = keys.get(name)
            if key is None:
                key = _environ_key(name)
                if len(keys) < _MEMO_NAMES:
                    keys[name] = key
            if not key:
                continue  # waitress drops these (a dash and an underscore must not clash)
            text = value.strip(b" \t").decode("latin-1")
            if key in env:  # repeated: joined, as waitress does
                env[key] += ", " + text
            else:
                env[key] = text
        if "HTTP_TRANSFER_ENCODING" in env:
            return None  # waitress pops it on HTTP/1.1 (no body here anyway)
        address, port = peer[0], peer[1]
        env["REMOTE_ADDR"] = env["REMOTE_HOST"] = address
        env["REMOTE_PORT"] = str(port)
        env["REQUEST_METHOD"] = method.decode("latin-1")
        env["SERVER_PROTOCOL"] = version.decode("latin-1")
        decoded = unquote_to_bytes(path) if b"%" in path else path
        env["PATH_INFO"] = "/" + decoded.decode("latin-1").lstrip("/")
        env["REQUEST_URI"] = target.decode("latin-1")
        env["QUERY_STRING"] = query.decode("latin-1")
        env["wsgi.input"] = BytesIO()
        return env

    def call(self, env: dict[str, Any]) -> Answer:
        """The app's answer to *env* as waitress's task writes it. An exception from the app
        (or a broken WSGI rule) propagates: the caller answers 500 as waitress does."""
        state: dict[str, Any] = {}

        def start_response(status, headers, exc_info=None):
            # With exc_info the app replaces its headers (no head has gone out before the app
            # returns); without, a second call is an error, as in waitress.
            if not exc_info and "status" in state:
                raise AssertionError("start_response called a second time")
            if not isinstance(status, str) or "\n" in status or "\r" in status:
                raise _Failed("bad status")
            length = None
            for name, value in headers:
                if not isinstance(name, str) or not isinstance(value, str):
                    raise _Failed("header not a string")
                if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                    raise _Failed("CR or LF in a header")
                lowered = name.lower()
                if lowered == "content-length":
                    length = int(value)
                elif lowered in hop_by_hop:
                    raise _Failed("hop-by-hop header")
            state["status"], state["headers"], state["length"] = status, list(headers), length
            return _no_write

        started = time.time()
        result = self.application(env, start_response)
        chunks: list[bytes] = []
        try:
            first = True
            for chunk in result:
                if first:
                    first = False
                    if state.get("length") is None and hasattr(result, "__len__"):
                        if len(result) == 1:
                            state["length"] = len(chunk)
                if chunk:
                    chunks.append(chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if "status" not in state:
            raise _Failed("start_response was not called")
        return self._answer(env, state, chunks, started)

    def _answer(
        self, env: dict[str, Any], state: dict[str, Any], chunks: list[bytes], started: float
    ) -> Answer:
        status: str = state["status"]
        length: int | None = state["length"]
        has_body = not status.startswith(_NO_BODY_STATUS)
        version = env["SERVER_PROTOCOL"][5:]
        connection = env.get("HTTP_CONNECTION", "").lower()
        headers: list[tuple[str, str]] = []
        length_header = date_header = server_header = None
        close = False
        capitalized = self._capitalized
        for name, value in state["headers"]:
            try:
                name = capitalized[name]
            except KeyError:  # as waitress writes it: each part capitalised (kept: few names)
                spelled = "-".join([part.capitalize() for part in name.split("-")])
                if len(capitalized) < _MEMO_NAMES:
                    capitalized[name] = spelled
                name = spelled
            if name == "Content-Length":
                if not has_body:
                    continue  # pragma: no cover - as waitress
                length_header = value
            elif name == "Date":
                date_header = value
            elif name == "Server":
                server_header = value
            headers.append((name, value))
        if length_header is None and length is not None and has_body:
            length_header = str(length)
            headers.append(("Content-Length", length_header))
        # The body as waitress writes it: cut at Content-Length; counted, not sent, for a
        # status without a body. Its head goes out with the first non-empty chunk.
        body: list[bytes] = []
        written = 0
        for chunk in chunks:
            if has_body and length is not None:
                chunk = chunk[: length - written]
            written += len(chunk)
            if chunk and has_body:
                body.append(chunk)
        head_first = any(chunks)
        short = length is not None and written != length and env["REQUEST_METHOD"] != "HEAD"
        close = False

        def set_close() -> None:  # waitress's set_close_on_finish, before its head is built
            nonlocal close
            close = True
            if not any(name == "Connection" for name, _ in headers):
                headers.append(("Connection", "close"))

        if short and not head_first:
            set_close()  # found before the head was built: the head says so
        chunked = False
        if version == "1.0":
            if connection == "keep-alive" and length_header:
                headers.append(("Connection", "Keep-Alive"))
            else:
                set_close()
        else:
            if connection == "close":
                set_close()
            if not length_header:
                if has_body:
                    headers.append(("Transfer-Encoding", "chunked"))
                    chunked = True
                if not close:
                    set_close()
        if not server_header:
            if self.ident:
                headers.append(("Server", self.ident))
        else:
            headers.append(("Via", self.ident or "waitress"))
        if not date_header:
            headers.append(("Date", self._http_date(started)))
        lines = [f"HTTP/{version} {status}"]
        lines.extend(f"{name}: {value}" for name, value in sorted(headers, key=_name))
        out = [("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")]
        if chunked:
            out.extend(b"%X\r\n%s\r\n" % (len(chunk), chunk) for chunk in body)
            out.append(b"0\r\n\r\n")
        else:
            out.extend(body)
        return out, close or short

    def _http_date(self, when: float) -> str:
        second = int(when)
        if second != self._date_second:
            self._date, self._date_second = build_http_date(second), second
        return self._date


def _environ_key(name: bytes) -> str:
    """The environ key waitress gives a request header ("" for one it drops: a name with an
    underscore, so that a dash and an underscore never clash)."""
    if b"_" in name:
        return ""
    key = name.upper().replace(b"-", b"_").decode("latin-1")
    return _RENAMED.get(key) or "HTTP_" + key


def _name(header: tuple[str, str]) -> str:
    return header[0]


def _no_write(data: bytes) -> None:  # pragma: no cover - falcon returns its body
    raise _Failed("the write() callable is not supported here")


def _connected() -> bool:
    return False
