"""Who may use the server, and input that must not cost it anything.

* :class:`AccessPolicy`: bearer tokens (a *viewer* token for the page and offers, a *control*
  token for presenters: create, delete, push, interrupt, WebSocket, metrics), the Host header
  checked against the names the server answers to (DNS rebinding), the Origin of WebSockets and
  state-changing requests checked against the server's own origin and ``allowed_origins``, and
  CORS closed unless origins are allowed.
* :func:`parse_json`: JSON with a size and nesting limit, so a 1,000-deep array is a 400, not a
  ``RecursionError``.

Tokens come from the config (the CLI reads flags and the environment); this module reads
neither argv nor the environment.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

Scope = Literal["public", "viewer", "control"]

# JSON a client sends us is a flat object (an offer, a control message): 32 levels is plenty.
MAX_JSON_DEPTH = 32
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_OPEN = np.frombuffer(b"[{", np.uint8)
_CLOSE = np.frombuffer(b"]}", np.uint8)


class JsonInputError(ValueError):
    """A request's JSON that is malformed, too large or too deep; the message says which."""


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in ``data`` (brackets inside strings ignored).

    Linear time and no recursion, so it is safe on any input; malformed input still yields a
    number (the parser rejects it afterwards).
    """
    body = _JSON_STRING.sub(b'""', data)
    arr = np.frombuffer(body, np.uint8)
    if not arr.size:
        return 0
    step = np.isin(arr, _OPEN).astype(np.int32) - np.isin(arr, _CLOSE).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


def parse_json(data: bytes | str, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse untrusted JSON; :class:`JsonInputError` when too large, too deep or malformed."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise JsonInputError(f"the JSON is {len(raw)} bytes, over the limit of {max_bytes}")
    depth = json_depth(raw)
    if depth > max_depth:
        raise JsonInputError(f"the JSON nests {depth} levels deep; at most {max_depth} allowed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonInputError("the JSON is not valid UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JsonInputError(f"the body is not valid JSON ({e.msg} at character {e.pos})") from None
    except (RecursionError, ValueError):
        raise JsonInputError("the body is not valid JSON") from None


# ----------------------------------------------------------------------------- access


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an address or name) is this machine's loopback."""
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_wildcard_host(host: str) -> bool:
    return host.strip("[]") in ("", "0.0.0.0", "::")


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _split_host(value: str) -> str:
    """The host name of a Host header value (``name:port``, ``[v6]:port``), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        return value.rsplit(":", 1)[0]
    return value


@dataclass(frozen=True)
class AccessPolicy:
    """The server's access rules; see the module docstring.

    Args:
        bind_host: the address the server listens on.
        viewer_token: needed for ``viewer`` routes (None: open to anyone who reaches it).
        control_token: needed for ``control`` routes; None falls back to ``viewer_token``.
            The control token also opens every viewer route.
        allowed_origins: web origins (``https://app.example.com``) other than the server's own
            that may send requests and open WebSockets; ``*`` allows any.
        allowed_hosts: Host names to answer to beyond the bound address, loopback names and IP
            literals; ``*`` turns the Host check off.
    """

    bind_host: str = "127.0.0.1"
    viewer_token: str | None = None
    control_token: str | None = None
    allowed_origins: frozenset[str] = frozenset()
    allowed_hosts: frozenset[str] = frozenset()
    _own_names: frozenset[str] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        names = {n.lower() for n in self.allowed_hosts} | set(LOOPBACK_NAMES)
        names.add(self.bind_host.strip("[]").lower())
        if is_wildcard_host(self.bind_host):
            # Listening everywhere: the machine's own names are names it answers to.
            for n in (socket.gethostname(), socket.getfqdn()):
                if n:
                    names.add(n.lower())
        object.__setattr__(self, "_own_names", frozenset(names))

    # -- Host ---------------------------------------------------------------------------------

    def host_ok(self, host_header: str | None) -> bool:
        """Whether a request's Host names this server (so no rebinding domain reaches it)."""
        if "*" in self.allowed_hosts:
            return True
        if not host_header:
            return False
        name = _split_host(host_header)
        if name in self._own_names:
            return True
        # A rebinding page can only send its own domain name; an address typed by a user is
        # an IP literal. Bound to one non-wildcard address, only that literal is ours.
        return _is_ip_literal(name) and is_wildcard_host(self.bind_host)

    # -- Origin -------------------------------------------------------------------------------

    def origin_allowed(self, origin: str) -> bool:
        """Whether a cross-origin page may call us (``--allow-origin``)."""
        return "*" in self.allowed_origins or origin.rstrip("/").lower() in {
            o.rstrip("/").lower() for o in self.allowed_origins
        }

    @staticmethod
    def same_origin(origin: str, host_header: str | None) -> bool:
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme not in ("http", "https") or not host_header:
            return False
        netloc = parts.netloc.lower()
        host = host_header.strip().lower()
        default = ":443" if parts.scheme == "https" else ":80"
        return netloc == host or netloc + default == host or netloc == host + default

    def origin_ok(self, origin: str | None, host_header: str | None) -> bool:
        """A request without Origin is not from a browser page (curl, a program): allowed.
        A page may call only its own origin or an allowed one."""
        if origin is None:
            return True
        return self.same_origin(origin, host_header) or self.origin_allowed(origin)

    # -- tokens -------------------------------------------------------------------------------

    def needed(self, scope: Scope) -> tuple[str, ...]:
        """The tokens any one of which opens ``scope`` (empty: open)."""
        if scope == "public":
            return ()
        if scope == "viewer":
            if self.viewer_token is None:
                return ()
            return tuple(t for t in (self.viewer_token, self.control_token) if t)
        token = self.control_token or self.viewer_token
        return (token,) if token else ()

    def token_ok(self, scope: Scope, presented: str | None) -> bool:
        tokens = self.needed(scope)
        if not tokens:
            return True
        if not presented:
            return False
        given = presented.encode("utf-8", "surrogatepass")
        # Compare with every token (no early exit), in constant time.
        ok = False
        for t in tokens:
            ok |= hmac.compare_digest(given, t.encode("utf-8"))
        return ok


class _ClientProtocolErrors(logging.Filter):
    """Keeps aiohttp from logging a traceback at ERROR for every malformed request (a header
    too long, garbage instead of HTTP): the client got its 400; a flood of them must not
    flood the log. They are logged at DEBUG instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log.debug("malformed request refused: %s", str(exc).splitlines()[0][:200])
            return False
        return True


def quiet_client_protocol_errors() -> None:
    """Install :class:`_ClientProtocolErrors` on aiohttp's server logger (idempotent)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientProtocolErrors) for f in logger.filters):
        logger.addFilter(_ClientProtocolErrors())


def presented_token(headers: Any, query: Any) -> str | None:
    """``Authorization: Bearer TOKEN``, else ``?token=TOKEN`` (pages and WebSockets)."""
    auth = headers.get("Authorization")
    if auth:
        kind, _, value = auth.partition(" ")
        if kind.lower() == "bearer" and value.strip():
            return str(value.strip())
    token = query.get("token")
    return str(token) if token else None


def scope_table(
    routes: Iterable[tuple[str, str, Scope]],
) -> dict[tuple[str, str], Scope]:
    """``{(METHOD, path template): scope}`` from ``(method, path, scope)`` rows."""
    return {(m.upper(), p): s for m, p, s in routes}


def security_middleware(
    policy: AccessPolicy,
    scopes: dict[tuple[str, str], Scope],
    error: Callable[[int, str], Any],
) -> Callable[..., Awaitable[Any]]:
    """An aiohttp middleware enforcing ``policy``; routes not in ``scopes`` need ``control``.

    ``error(status, reason)`` builds the JSON error response.
    """
    from aiohttp import web

    cors_headers = "Authorization, Content-Type"
    cors_methods = "GET, POST, DELETE, OPTIONS"

    def route_scope(request: web.Request) -> Scope | None:
        info = request.match_info
        if info.http_exception is not None:  # no such route (404) or method (405)
            return None
        route = info.route
        resource = route.resource
        if resource is None:
            return None
        return scopes.get((route.method.upper(), resource.canonical), "control")

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not policy.host_ok(host):
            return error(
                421,
                f"this server does not answer to the host name {_split_host(host or '')!r}; "
                "reach it by its address, or start it with --allow-host NAME",
            )
        origin = request.headers.get("Origin")
        cross = origin is not None and not policy.same_origin(origin, host)
        if request.method == "OPTIONS":
            # A CORS preflight: answered only for allowed origins.
            if origin is not None and cross and policy.origin_allowed(origin):
                return web.Response(
                    status=204,
                    headers={
                        "Access-Control-Allow-Origin": origin,
                        "Access-Control-Allow-Methods": cors_methods,
                        "Access-Control-Allow-Headers": cors_headers,
                        "Access-Control-Max-Age": "600",
                        "Vary": "Origin",
                    },
                )
            return error(403, "cross-origin requests are not allowed (see --allow-origin)")
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        changes = request.method not in ("GET", "HEAD")
        if (changes or upgrade) and not policy.origin_ok(origin, host):
            return error(
                403,
                f"requests from the web origin {origin!r} are not allowed; start the server "
                "with --allow-origin ORIGIN to let that page use it",
            )
        scope = route_scope(request)
        if scope is not None and not policy.token_ok(
            scope, presented_token(request.headers, request.query)
        ):
            which = "control" if scope == "control" else "viewer"
            resp = error(
                401,
                f"this needs the server's {which} token: send 'Authorization: Bearer TOKEN' "
                "or add ?token=TOKEN to the address",
            )
            resp.headers["WWW-Authenticate"] = 'Bearer realm="talkstream"'
            return resp
        try:
            resp = await handler(request)
        except web.HTTPException:
            raise
        except Exception:
            # A bug, not the client's fault: logged with its traceback, and the client is told
            # nothing about the internals.
            log.exception("%s %s failed", request.method, request.path)
            return error(500, "internal error; the server logged the details")
        if cross and origin is not None and policy.origin_allowed(origin) and not resp.prepared:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Vary"] = "Origin"
        return resp

    return middleware


__all__ = [
    "MAX_JSON_DEPTH",
    "AccessPolicy",
    "JsonInputError",
    "is_loopback_host",
    "is_wildcard_host",
    "json_depth",
    "parse_json",
    "presented_token",
    "quiet_client_protocol_errors",
    "scope_table",
    "security_middleware",
]
