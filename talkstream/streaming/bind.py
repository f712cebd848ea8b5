"""Whether ``talkstream serve`` can listen where it was asked to, as one line for the user.

``check_bind`` binds (and closes) a socket on every address the host name resolves to, before
the engine loads: a port in use or an address that is not this machine's fails in
milliseconds with the cause and the fix, not after the warm-up with a traceback.
``bind_error`` words an ``OSError`` the same way, for the rare case where the port is taken
between the check and the server's own bind.
"""

from __future__ import annotations

import errno
import socket

from talkstream.errors import TalkstreamError


def _shown(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def bind_error(e: OSError, host: str, port: int) -> TalkstreamError:
    """The user's view of a failed bind of ``host:port``: cause and fix, one line."""
    where = f"{_shown(host or '0.0.0.0')}:{port}"
    if e.errno == errno.EADDRINUSE:
        return TalkstreamError(
            f"cannot listen on {where}: port {port} is already in use (another talkstream "
            "serve?); stop that program or choose another port with --port (0 picks a free one)"
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return TalkstreamError(
            f"cannot listen on {where}: {host} is not an address of this machine; use "
            "--host 127.0.0.1 (this machine only), --host 0.0.0.0 (every interface) or one of "
            "the addresses `ip addr` lists"
        )
    if e.errno == errno.EACCES:
        return TalkstreamError(
            f"cannot listen on {where}: ports below 1024 need administrator rights; choose "
            "a port from 1024 up with --port (e.g. --port 8080)"
        )
    return TalkstreamError(f"cannot listen on {where}: {e.strerror or e}")


def check_bind(host: str, port: int) -> None:
    """Raise ``TalkstreamError`` unless a server can listen on ``host:port``.

    ``host`` is what ``aiohttp.web.TCPSite`` takes: a name, an IPv4/IPv6 address, or "" / None
    for every interface.
    """
    if not 0 <= port <= 65535:
        raise TalkstreamError(f"--port {port} is not a TCP port: use 1024-65535, or 0 for any")
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        raise TalkstreamError(
            f"cannot listen on {host}: not an address or a known name of this machine "
            f"({e.strerror}); use --host 127.0.0.1 (this machine only) or --host 0.0.0.0 "
            "(every interface)"
        ) from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            if hasattr(socket, "AF_UNIX"):
                # What asyncio's create_server sets on Unix: a port in TIME_WAIT is free to
                # take, a listening one is not.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                # As asyncio does: an IPv6 socket must not also claim the IPv4 port.
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as e:
                raise bind_error(e, host, port) from None


__all__ = ["bind_error", "check_bind"]
