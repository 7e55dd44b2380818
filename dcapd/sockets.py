"""Listening sockets for dcapd's server: every address a host name resolves to, on one port.

Kept apart from :mod:`dcapd.server` (which starts and stops the serving parts) so that the
supervisor of worker processes can hold a port without importing the server.
"""

from __future__ import annotations

import errno
import logging
import os
import socket

from waitress.adjustments import Adjustments

__all__ = ["bind_sockets", "strip_brackets", "raise_fd_limit", "BACKLOG"]

log = logging.getLogger("dcapd.server")

#: The listen backlog: waitress's (1024), for the TLS listener too.
BACKLOG: int = Adjustments.backlog


def strip_brackets(host: str) -> str:
    host = (host or "").strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def bind_sockets(
    host: str,
    port: int,
    backlog: int = BACKLOG,
    *,
    reuse_port: bool = False,
    listen: bool = True,
) -> list[socket.socket]:
    """Bind and listen on every address *host* resolves to, all on the same port.

    ``''`` or ``'*'`` means every interface.  With ``port == 0`` the first
    address picks an ephemeral port and the others reuse it.  IPv6 sockets are
    v6-only so ``localhost`` can be bound as both ``127.0.0.1`` and ``::1``.
    Addresses the host cannot bind at all (e.g. ``::1`` with IPv6 disabled)
    are skipped when another one worked.

    *reuse_port* (Linux worker processes, :mod:`dcapd.supervisor`): ``SO_REUSEPORT``, so
    several processes listen on the one port and the kernel spreads connections over them.
    *listen* false: bound only, to reserve the port (such a socket gets no connections).
    """
    name: str | None = strip_brackets(host)
    if name in ("", "*"):
        name = None
    for attempt in range(5):
        try:
            return _bind_once(name, int(port), backlog, reuse_port, listen)
        except OSError as exc:
            if port == 0 and exc.errno == errno.EADDRINUSE and attempt < 4:
                continue  # the ephemeral port was free on one family only: try another
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def _bind_once(
    name: str | None, port: int, backlog: int, reuse_port: bool = False, listen: bool = True
) -> list[socket.socket]:
    infos = socket.getaddrinfo(
        name, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    socks: list[socket.socket] = []
    seen = set()
    last_error: OSError | None = None
    try:
        for family, socktype, proto, _canon, addr in infos:
            if family not in (socket.AF_INET, getattr(socket, "AF_INET6", None)):
                continue
            host = str(addr[0])
            key = (family, host.split("%", 1)[0])
            if key in seen:
                continue
            seen.add(key)
            if port == 0 and socks:
                addr = (host, socks[0].getsockname()[1], *addr[2:])
            sock = socket.socket(family, socktype, proto)
            try:
                if os.name == "nt" and hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
                else:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == getattr(socket, "AF_INET6", None) and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                if listen:
                    sock.listen(backlog)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    raise
                last_error = exc
                log.warning("cannot listen on %s port %s: %s", addr[0], addr[1], exc)
                continue
            socks.append(sock)
    except BaseException:
        for s in socks:
            s.close()
        raise
    if not socks:
        raise last_error or OSError(f"no address to listen on for {name!r}")
    return socks


def raise_fd_limit() -> None:
    """Every client costs the TLS front a file descriptor (two with a request in flight): let
    the process use as many as its hard limit allows (POSIX; a no-op elsewhere)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, 65536)
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("open files limit raised from %s to %s", soft, hard)
    except (OSError, ValueError):  # pragma: no cover - not allowed: keep the limit
        pass
