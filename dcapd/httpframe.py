"""HTTP/1.1 framing for dcapd's TLS front: where each request and answer begins and ends.

The front reads every request head itself (to apply deadlines and the body rules before a
body is read) and must find each message's end exactly where waitress does, so anything
ambiguous is refused rather than guessed: a bare CR or LF, folded header lines, both
``Content-Length`` and ``Transfer-Encoding``, a ``Content-Length`` that is not digits (a
repeated one is joined with ", " as waitress does, so it is not), a transfer coding other
than ``chunked``, ``Transfer-Encoding`` on HTTP/1.0.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from waitress.adjustments import Adjustments

from .auth import ADMIN_TOKEN_HEADER, USER_TOKEN_HEADER

__all__ = ["FramingError", "RequestHead", "ResponseHead", "Chunked", "parse_request_head"]

#: waitress's own limit on a request head (it answers 431 beyond it).
MAX_HEAD_BYTES: int = Adjustments.max_request_header_size

_DIGITS = re.compile(rb"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})(;[^\r\n]*)?")
_MAX_CHUNK_LINE = 4096


class FramingError(ValueError):
    """The bytes are not an HTTP message whose end can be found unambiguously."""


class RequestHead(NamedTuple):
    method: str
    path: str  # decoded, without the query
    headers: dict[str, str]  # WANTED_HEADERS, lower-case; a repeated one joined with ", "
    length: int | None  # body bytes announced; None: chunked
    expect_continue: bool
    close: bool  # the client asks to close after the answer
    raw: bytes  # the head to pass on (without Expect: the front answers 100 itself)


#: The request headers the front reads (framing, and what dcapd.gate asks for); the others
#: are checked for form only and passed on as they are.
WANTED_HEADERS = frozenset(
    name.encode("latin-1")
    for name in ("content-length", "transfer-encoding", "expect", "connection", "request-id")
    + (USER_TOKEN_HEADER, ADMIN_TOKEN_HEADER)
)


def _header_lines(lines: list[bytes], wanted: frozenset[bytes]) -> tuple[dict[str, str], list[int]]:
    headers: dict[str, str] = {}
    expect_at: list[int] = []
    for index, line in enumerate(lines):
        name, sep, value = line.partition(b":")
        if not sep or not name or name[:1] in b" \t" or name[-1:] in b" \t":
            raise FramingError("malformed header line")
        lowered = name.lower()
        if lowered not in wanted:
            continue  # not needed here
        key = lowered.decode("latin-1")
        text = value.strip(b" \t").decode("latin-1")
        if key == "expect":
            expect_at.append(index)
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers, expect_at


def parse_request_head(head: bytes) -> RequestHead:
    """*head*: the bytes up to and including the blank line (leading blank lines removed)."""
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        raise FramingError("bare CR or LF")
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[0].isalpha():
        raise FramingError("malformed request line")
    method, target, version = parts[0].decode("latin-1"), parts[1].decode("latin-1"), parts[2]
    headers, expect_at = _header_lines(lines[1:], WANTED_HEADERS)
    if "://" in target.split("?", 1)[0]:
        target = urlsplit(target).path or "/"
    path = unquote(target.split("?", 1)[0], encoding="latin-1")

    length: int | None = 0
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if version != b"HTTP/1.1" or coding.strip(" \t").lower() != "chunked":
            raise FramingError("Transfer-Encoding other than chunked on HTTP/1.1")
        if "content-length" in headers:
            raise FramingError("both Content-Length and Transfer-Encoding")
        length = None
    elif "content-length" in headers:
        if not _DIGITS.fullmatch(headers["content-length"].encode("latin-1")):
            raise FramingError("Content-Length is not a number")
        length = int(headers["content-length"])

    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    close = "close" in tokens if version == b"HTTP/1.1" else "keep-alive" not in tokens
    expect = headers.get("expect", "").lower() == "100-continue"
    raw = head
    if expect_at:
        kept = [line for i, line in enumerate(lines[1:]) if i not in expect_at]
        raw = b"\r\n".join([lines[0], *kept]) + b"\r\n\r\n"
    return RequestHead(method, path, headers, length, expect, close, raw)


class ResponseHead(NamedTuple):
    status: int
    length: int | None  # None: chunked, or until the connection closes (see until_close)
    chunked: bool
    until_close: bool
    close: bool


def _response_header(lower_head: bytes, name: bytes) -> str | None:
    start = lower_head.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    return lower_head[start : lower_head.find(b"\r\n", start)].strip(b" \t").decode("latin-1")


def parse_response_head(head: bytes, method: str) -> ResponseHead:
    """An answer's head from waitress (well-formed, one of each header): how its body is
    framed. Only the three headers that say so are looked at."""
    status_line = head[: head.find(b"\r\n")]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise FramingError("malformed status line")
    status = int(parts[1])
    lower = head.lower()
    connection = _response_header(lower, b"connection") or ""
    tokens = {t.strip() for t in connection.split(",")}
    close = "close" in tokens or (parts[0] == b"HTTP/1.0" and "keep-alive" not in tokens)
    if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return ResponseHead(status, 0, False, False, close)
    if _response_header(lower, b"transfer-encoding") == "chunked":
        return ResponseHead(status, None, True, False, close)
    length = _response_header(lower, b"content-length")
    if length is not None:
        if not _DIGITS.fullmatch(length.encode("latin-1")):
            raise FramingError("Content-Length is not a number")
        return ResponseHead(status, int(length), False, False, close)
    return ResponseHead(status, None, False, True, True)


class Chunked:
    """Finds the end of a chunked body as its bytes arrive; ``size`` counts the data bytes."""

    def __init__(self) -> None:
        self.size = 0
        self.done = False
        self._data_left = 0  # data bytes of the current chunk still to come
        self._crlf_left = 0  # the CRLF after a chunk's data
        self._trailer = False

    def scan(self, buf: bytes | bytearray) -> int:
        """How many leading bytes of *buf* belong to the body (all of them are consumed)."""
        pos, end = 0, len(buf)
        while pos < end and not self.done:
            if self._data_left:
                take = min(self._data_left, end - pos)
                self._data_left -= take
                pos += take
                if not self._data_left:
                    self._crlf_left = 2
                continue
            if self._crlf_left:
                want = b"\r\n"[2 - self._crlf_left :]
                got = bytes(buf[pos : pos + min(len(want), end - pos)])
                if got != want[: len(got)]:
                    raise FramingError("chunk data not followed by CRLF")
                pos += len(got)
                self._crlf_left -= len(got)
                continue
            eol = buf.find(b"\r\n", pos, pos + _MAX_CHUNK_LINE)
            if eol < 0:
                if end - pos >= _MAX_CHUNK_LINE:
                    raise FramingError("chunk line too long")
                break  # the line is not whole yet
            line = bytes(buf[pos:eol])
            pos = eol + 2
            if self._trailer:
                if not line:
                    self.done = True
                elif b"\n" in line or b"\r" in line or b":" not in line:
                    raise FramingError("malformed trailer")
                continue
            match = _CHUNK_SIZE.fullmatch(line)
            if not match:
                raise FramingError("malformed chunk size")
            size = int(match.group(1), 16)
            if size:
                self.size += size
                self._data_left = size
            else:
                self._trailer = True
        return pos
