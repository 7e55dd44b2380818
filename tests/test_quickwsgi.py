"""dcapd.quickwsgi answers a plain bodiless request exactly as waitress's own parser and task
do (dcapd.direct uses both): the same environ for the app and the same bytes on the wire,
for every kind of answer an app can give, and waitress still decides every other request."""

from __future__ import annotations

import pytest
from waitress.adjustments import Adjustments
from waitress.proxy_headers import proxy_headers_middleware

from dcapd.direct import DirectAnswers

PEER = ("192.0.2.7", 50123)
NOT_COMPARED = ("wsgi.input", "wsgi.errors", "wsgi.file_wrapper", "waitress.client_disconnected")

HEADS = [
    b"GET /sgx/certification/v4/tcb?fmspc=00906ED50000 HTTP/1.1\r\nHost: pccs:8081\r\n"
    b"Accept: */*\r\nRequest-ID: abc\r\n\r\n",
    b"HEAD /sgx/certification/v4/tcb?fmspc=00906ED50000 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET /a%20b/%2Fc?x=%41&y=1&y=2 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /%2F%2Fdouble HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /dup HTTP/1.1\r\nAccept: a\r\naccept: b\r\nX-Y:  spaced \t \r\nEmpty:\r\n\r\n",
    b"GET /under HTTP/1.1\r\nX_Forwarded_For: 6.6.6.6\r\nuser_token: t\r\n\r\n",
    b"GET /fwd HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: http\r\n"
    b"Forwarded: for=1.2.3.4\r\n\r\n",
    b"GET /len HTTP/1.1\r\nContent-Length: 0\r\nContent-Type: text/plain\r\n\r\n",
    b"GET /obs HTTP/1.1\r\nX-Obs: caf\xe9\r\n\r\n",
    # Not plain: waitress's classes decide (both sides must still agree).
    b"GET //double HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /frag#part HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://example.com/abs?q=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /tab\tx HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /bad HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"GET /bad HTTP/1.1\r\nX: \x01\r\n\r\n",
    b"get /lower HTTP/1.1\r\nHost: x\r\n\r\n",
]


def answer(kind: str):
    """A WSGI app giving one kind of answer."""

    def app(environ, start_response):
        seen.append({k: v for k, v in environ.items() if k not in NOT_COMPARED})
        if kind == "length":
            start_response(
                "200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")]
            )
            return [b"{}"]
        if kind == "one chunk":
            start_response("200 OK", [("content-type", "text/plain"), ("x-custom-HEADER", "v")])
            return [b"hello"]
        if kind == "chunks":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return iter([b"one", b"", b"three"])
        if kind == "204":
            start_response("204 No Content", [("Content-Length", "0")])
            return []
        if kind == "304 body":
            start_response("304 Not Modified", [("Content-Length", "4")])
            return [b"body"]
        if kind == "short":
            start_response("200 OK", [("Content-Length", "10")])
            return [b"abc"]
        if kind == "short, empty":
            start_response("200 OK", [("Content-Length", "5")])
            return []
        if kind == "long":
            start_response("200 OK", [("Content-Length", "2")])
            return [b"abcdef"]
        if kind == "raises":
            raise RuntimeError("boom")
        if kind == "CR in header":
            start_response("200 OK", [("X-Bad", "a\r\nb")])
            return [b""]
        if kind == "hop-by-hop":
            start_response("200 OK", [("Connection", "close")])
            return [b""]
        if kind == "own server and date":
            start_response("200 OK", [("Server", "app"), ("Date", "Thu, 01 Jan 1970"), ("A", "1")])
            return [b"x"]
        if kind == "lazy":

            def body():
                start_response("200 OK", [("Content-Length", "3")])
                yield b"abc"

            return body()
        raise AssertionError(kind)

    seen: list[dict] = []
    app.seen = seen  # type: ignore[attr-defined]
    return app


KINDS = [
    "length", "one chunk", "chunks", "204", "304 body", "short", "short, empty", "long",
    "raises", "CR in header", "hop-by-hop", "own server and date", "lazy",
]  # fmt: skip


class _Waitress:
    """What dcapd.direct reads of waitress's server."""

    def __init__(self, app):
        self.adj = Adjustments(ident="dcapd", clear_untrusted_proxy_headers=True)
        self.server_name = self.adj.server_name
        self.application = proxy_headers_middleware(app, log_untrusted=False, clear_untrusted=True)


@pytest.mark.parametrize("https", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_quick_answers_are_waitress_answers_byte_for_byte(monkeypatch, kind, https):
    monkeypatch.setattr("time.time", lambda: 1764857000.25)  # one Date for both
    app = answer(kind)
    answers = DirectAnswers(_Waitress(app), 8081, 1, https, inline=False)
    try:
        for head in HEADS:
            app.seen.clear()
            quick = answers.answer(head, PEER)
            quick_env = list(app.seen)
            answers._quick.simple = False  # waitress's own parser and task
            try:
                slow = answers.answer(head, PEER)
            finally:
                answers._quick.simple = True
            assert app.seen[len(quick_env) :] == quick_env, head
            assert (b"".join(quick[0]), quick[1]) == (b"".join(slow[0]), slow[1]), head
    finally:
        answers.close()


def test_plain_requests_take_the_quick_way_and_others_do_not():
    app = answer("length")
    answers = DirectAnswers(_Waitress(app), 8081, 1, True, inline=False)
    try:
        taken = [answers._quick.environ(head, PEER) is not None for head in HEADS]
        assert all(taken[:12]) and not any(taken[12:]), taken
        env = answers._quick.environ(HEADS[5], PEER)
        assert env is not None
        assert (env["PATH_INFO"], env["QUERY_STRING"]) == ("/a b//c", "x=%41&y=1&y=2")
        assert env["wsgi.url_scheme"] == "https" and env["HTTPS"] == "on"
    finally:
        answers.close()
