"""A WHIP client (WebRTC-HTTP Ingestion Protocol, RFC 9725).

- ``POST`` the SDP offer (``Content-Type: application/sdp``) to the endpoint; a ``201 Created``
  carries the SDP answer and, in ``Location``, the session's resource URL (relative URLs are
  resolved against the endpoint);
- ``DELETE`` the resource to stop;
- ``Authorization: Bearer <token>`` on every request when a token is given;
- ICE servers come as ``Link: <turn:...>; rel="ice-server"; username=...; credential=...``
  headers, on the 201 (RFC 9725 section 4.6) and, with servers that answer it, on an
  ``OPTIONS`` request before the offer (earlier drafts; simple-whip-server does).

Every failure is a :class:`WhipError` whose message is one line: the status and the server's
reason for a 4xx/5xx, the cause for an unreachable endpoint, and what to check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlparse

import aiohttp

from talkstream.errors import TalkstreamError

REQUEST_TIMEOUT_S = 15.0

_HINTS = {
    401: "check --token",
    403: "check --token (the endpoint refused it)",
    404: "check the endpoint URL",
    405: "this URL is not a WHIP endpoint",
    406: "the endpoint did not take application/sdp",
    409: "the endpoint is already publishing",
    415: "the endpoint did not take application/sdp",
    429: "the endpoint is busy, try again later",
    503: "the endpoint or its media server is unavailable",
}


class WhipError(TalkstreamError):
    """A WHIP request failed; ``status`` is the HTTP status, or None if nothing answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class IceServer:
    """One STUN/TURN server (the fields of ``RTCIceServer``)."""

    urls: str
    username: str | None = None
    credential: str | None = None


def _split_links(value: str) -> list[str]:
    """Split a Link header value at commas outside ``<...>`` and quotes."""
    parts: list[str] = []
    buf: list[str] = []
    in_uri = in_quote = False
    for ch in value:
        if ch == "<" and not in_quote:
            in_uri = True
        elif ch == ">" and not in_quote:
            in_uri = False
        elif ch == '"' and not in_uri:
            in_quote = not in_quote
        if ch == "," and not in_uri and not in_quote:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return [p.strip() for p in parts if p.strip()]


_PARAM = re.compile(r';\s*([A-Za-z0-9_\-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;,\s]+))')


def parse_ice_links(headers: list[str]) -> list[IceServer]:
    """ICE servers from ``Link`` header values (one or several per header line).

    Only links with ``rel="ice-server"`` and a ``stun:``, ``turn:`` or ``turns:`` URI count.
    """
    servers: list[IceServer] = []
    for value in headers:
        for link in _split_links(value):
            m = re.match(r"<([^>]*)>(.*)$", link, re.S)
            if not m:
                continue
            uri, rest = m.group(1).strip(), m.group(2)
            params = {
                k.lower(): (q if q is not None and q != "" else v) or ""
                for k, q, v in _PARAM.findall(rest)
            }
            if "ice-server" not in params.get("rel", "").lower().split():
                continue
            if uri.split(":", 1)[0].lower() not in ("stun", "turn", "turns"):
                continue
            servers.append(
                IceServer(uri, params.get("username") or None, params.get("credential") or None)
            )
    return servers


class WhipClient:
    """One WHIP session: :meth:`publish` an offer, :meth:`delete` the resource.

    Args:
        endpoint: the WHIP endpoint URL.
        token: a Bearer token, sent on every request.
        http: an aiohttp session to use (default: one of its own, closed by :meth:`close`).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        token: str | None = None,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        u = urlparse(endpoint)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise WhipError(f"not an http(s) URL: {endpoint!r} (give the WHIP endpoint's URL)")
        self.endpoint = endpoint
        self.token = token
        self._http = http
        self._own_http = http is None
        self.resource: str | None = None
        self.etag: str | None = None
        self.ice_servers: list[IceServer] = []

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = dict(extra or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    async def _request(
        self,
        method: str,
        url: str,
        *,
        data: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, list[str]], str]:
        try:
            async with self.http.request(
                method,
                url,
                data=data.encode() if data is not None else None,
                headers=self._headers(headers),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                allow_redirects=True,
            ) as r:
                body = await r.text(errors="replace")
                hdrs: dict[str, list[str]] = {}
                for k, v in r.headers.items():
                    hdrs.setdefault(k.lower(), []).append(v)
                return r.status, hdrs, body
        except TimeoutError:
            raise WhipError(
                f"WHIP endpoint {url} did not answer {method} within {REQUEST_TIMEOUT_S:.0f} s"
            ) from None
        except (aiohttp.ClientError, OSError) as e:
            reason = str(e) or type(e).__name__
            raise WhipError(
                f"cannot reach WHIP endpoint {url}: {reason}; is the server running and the URL "
                "right?"
            ) from None

    @staticmethod
    def _refused(what: str, url: str, status: int, body: str) -> WhipError:
        reason = " ".join(body.split())[:160] or "(no reason given)"
        hint = _HINTS.get(status, "")
        return WhipError(
            f"WHIP endpoint {url} refused {what}: HTTP {status} {reason}"
            + (f"; {hint}" if hint else ""),
            status,
        )

    async def discover(self, *, strict: bool = False) -> list[IceServer]:
        """ICE servers the endpoint names in reply to ``OPTIONS`` (none if it names none).

        With ``strict``, an endpoint that cannot be reached raises :class:`WhipError` (a check
        before anything expensive starts); an HTTP error status never does, since servers need
        not implement OPTIONS.
        """
        try:
            status, headers, _ = await self._request("OPTIONS", self.endpoint)
        except WhipError:
            if strict:
                raise
            return []
        if status >= 300:
            return []
        servers = parse_ice_links(headers.get("link", []))
        if servers:
            self.ice_servers = servers
        return servers

    async def publish(self, offer_sdp: str) -> str:
        """POST the offer; returns the SDP answer. Sets ``resource``, ``etag``, ``ice_servers``.

        Raises:
            WhipError: refused (4xx/5xx), unreachable, or not a WHIP answer.
        """
        status, headers, body = await self._request(
            "POST", self.endpoint, data=offer_sdp, headers={"Content-Type": "application/sdp"}
        )
        if status != 201:
            if status < 300:
                raise WhipError(
                    f"WHIP endpoint {self.endpoint} answered HTTP {status}, not 201 Created: "
                    "is this a WHIP endpoint?",
                    status,
                )
            raise self._refused("the offer", self.endpoint, status, body)
        ctype = (headers.get("content-type") or [""])[0].split(";")[0].strip().lower()
        if ctype != "application/sdp" or "v=0" not in body:
            raise WhipError(
                f"WHIP endpoint {self.endpoint} answered 201 without an SDP answer "
                f"(Content-Type {ctype or 'none'})",
                status,
            )
        location = (headers.get("location") or [""])[0].strip()
        if not location:
            raise WhipError(
                f"WHIP endpoint {self.endpoint} answered 201 without a Location: it cannot be "
                "stopped",
                status,
            )
        self.resource = urljoin(self.endpoint, location)
        self.etag = headers["etag"][0] if headers.get("etag") else None
        servers = parse_ice_links(headers.get("link", []))
        if servers:
            self.ice_servers = servers
        return body

    async def delete(self) -> bool:
        """DELETE the resource (stop publishing). Returns whether there was one to delete.

        A resource the server no longer knows (404) counts as deleted.
        """
        url, self.resource = self.resource, None
        if not url:
            return False
        status, _, body = await self._request("DELETE", url)
        if status in (200, 202, 204, 404):
            return status != 404
        raise self._refused("DELETE", url, status, body)

    async def close(self) -> None:
        if self._own_http and self._http is not None and not self._http.closed:
            await self._http.close()


__all__ = ["IceServer", "WhipClient", "WhipError", "parse_ice_links"]
