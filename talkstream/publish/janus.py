"""A client of the Janus HTTP API (``/janus``) and its VideoRoom plugin.

The HTTP API, as documented for Janus 1.x (https://janus.conf.meetecho.com/docs/rest.html):

- ``POST /janus {"janus": "create"}`` opens a session; ``POST /janus/{session}
  {"janus": "attach", "plugin": ...}`` attaches a handle; ``POST /janus/{session}/{handle}
  {"janus": "message", "body": ..., "jsep": ...}`` talks to the plugin;
- a plugin answers synchronously (``success`` with ``plugindata``) or acknowledges (``ack``) and
  answers later as an ``event`` with the same ``transaction``, delivered by the long poll
  ``GET /janus/{session}?maxev=N``, which also brings ``webrtcup``, ``media``, ``hangup`` ...;
- a session with no request for ``session_timeout`` (60 s) is destroyed: :class:`JanusSession`
  sends a ``keepalive`` every 25 s.

VideoRoom requests (https://janus.conf.meetecho.com/docs/videoroom.html) used here: ``exists``,
``create``, ``destroy``, ``listparticipants``; a publisher ``join`` then ``publish`` (with the
offer, answered by the plugin's answer); a subscriber ``join`` (the plugin sends the offer),
``start`` (with our answer). Every error is a :class:`JanusError` with a one-line message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from talkstream.errors import TalkstreamError

log = logging.getLogger(__name__)

VIDEOROOM = "janus.plugin.videoroom"
KEEPALIVE_S = 25.0  # Janus's default session_timeout is 60 s
REQUEST_TIMEOUT_S = 10.0  # one HTTP request
EVENT_TIMEOUT_S = 20.0  # an asynchronous plugin answer (a publish waits for ICE gathering)
POLL_MAXEV = 10
# VideoRoom error codes that are not failures for ensure_room.
ROOM_EXISTS = 427


class JanusError(TalkstreamError):
    """Janus refused a request or could not be reached; the message says which and why."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def _txn() -> str:
    return secrets.token_hex(8)


@dataclass
class JanusEvent:
    """One event for a handle: the Janus message type, the plugin's data, and any JSEP."""

    janus: str
    data: dict[str, Any] = field(default_factory=dict)
    jsep: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


async def server_info(url: str, *, http: aiohttp.ClientSession | None = None) -> dict[str, Any]:
    """``GET {url}/info``: the server's name, version and plugins.

    Raises:
        JanusError: nothing answers there, or what answers is not Janus.
    """
    own = http is None
    http = http or aiohttp.ClientSession()
    try:
        async with http.get(
            url.rstrip("/") + "/info", timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        ) as r:
            info = await r.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        raise JanusError(
            f"cannot reach Janus at {url} ({type(e).__name__}: {e}); is it running and is its "
            "HTTP transport enabled?"
        ) from None
    except ValueError:
        info = None
    finally:
        if own:
            await http.close()
    if not isinstance(info, dict) or info.get("janus") != "server_info":
        raise JanusError(f"{url} is not a Janus HTTP API (no server_info at {url}/info)")
    return info


class JanusSession:
    """One Janus session over HTTP, with its keepalive and long-poll tasks.

    Use :meth:`open` (or ``async with await JanusSession.open(url)``) and :meth:`attach`.
    ``closed`` is set when the session ends (destroyed, timed out, Janus gone).
    """

    def __init__(
        self,
        url: str,
        http: aiohttp.ClientSession,
        *,
        own_http: bool,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self.url = url.rstrip("/")
        self.keepalive_s = keepalive_s
        self.http = http
        self._own_http = own_http
        self.id: int | None = None
        self.handles: dict[int, JanusHandle] = {}
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = asyncio.Event()
        self.close_reason = ""

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        http: aiohttp.ClientSession | None = None,
        keepalive_s: float = KEEPALIVE_S,
    ) -> JanusSession:
        """Create a session on the Janus at ``url`` (``http://host:8088/janus``); a keepalive
        goes every ``keepalive_s`` (under Janus's ``session_timeout``)."""
        own = http is None
        s = cls(url, http or aiohttp.ClientSession(), own_http=own, keepalive_s=keepalive_s)
        try:
            reply = await s._post(s.url, {"janus": "create"})
            s.id = int(reply["data"]["id"])
        except BaseException:
            if own:
                await s.http.close()
            raise
        s._tasks = [
            asyncio.create_task(s._poll_loop(), name=f"janus-poll-{s.id}"),
            asyncio.create_task(s._keepalive_loop(), name=f"janus-keepalive-{s.id}"),
        ]
        return s

    # -- transport ----------------------------------------------------------------------------

    async def _post(self, url: str, payload: dict[str, Any]) -> dict[str, Any]:
        payload = {**payload, "transaction": payload.get("transaction") or _txn()}
        try:
            async with self.http.post(
                url, json=payload, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
            ) as r:
                if r.status != 200:
                    text = (await r.text())[:200].strip()
                    raise JanusError(f"Janus at {self.url} answered HTTP {r.status}: {text}")
                reply: dict[str, Any] = await r.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise JanusError(
                f"cannot reach Janus at {self.url} ({type(e).__name__}: {e}); is it running "
                "and is its HTTP transport enabled?"
            ) from None
        if reply.get("janus") == "error":
            err = reply.get("error") or {}
            raise JanusError(
                f"Janus refused {payload.get('janus')!r}: {err.get('reason', reply)}",
                err.get("code"),
            )
        return reply

    @property
    def session_url(self) -> str:
        return f"{self.url}/{self.id}"

    async def _poll_loop(self) -> None:
        """Long-poll the session's events and route them to waiters and handles."""
        failures = 0
        while not self.closed.is_set():
            try:
                async with self.http.get(
                    self.session_url,
                    params={"maxev": str(POLL_MAXEV), "rid": _txn()},
                    timeout=aiohttp.ClientTimeout(total=45.0),  # Janus answers within 30 s
                ) as r:
                    body = await r.json(content_type=None)
                failures = 0
            except asyncio.CancelledError:
                raise
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
                failures += 1
                if failures >= 3:
                    self._end(f"lost Janus at {self.url}: {type(e).__name__}: {e}")
                    return
                await asyncio.sleep(0.5)
                continue
            for msg in body if isinstance(body, list) else [body]:
                self._dispatch(msg)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg.get("janus")
        if kind == "keepalive":
            return
        if kind == "timeout" or (kind == "error" and not msg.get("transaction")):
            self._end(f"Janus ended session {self.id}: {kind} {msg.get('error', '')}".strip())
            return
        txn = msg.get("transaction")
        fut = self._pending.get(txn) if txn else None
        if fut is not None and kind != "ack" and not fut.done():
            fut.set_result(msg)
            return
        handle = self.handles.get(int(msg.get("sender") or 0))
        if handle is not None:
            handle._deliver(msg)

    async def _keepalive_loop(self) -> None:
        while not self.closed.is_set():
            await asyncio.sleep(self.keepalive_s)
            try:
                await self._post(self.session_url, {"janus": "keepalive"})
            except JanusError as e:
                self._end(str(e))
                return

    def _end(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        log.info("janus session %s ended: %s", self.id, reason)
        self.closed.set()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(JanusError(reason))
        for h in self.handles.values():
            h.closed.set()

    # -- requests -----------------------------------------------------------------------------

    async def attach(self, plugin: str = VIDEOROOM) -> JanusHandle:
        reply = await self._post(self.session_url, {"janus": "attach", "plugin": plugin})
        handle = JanusHandle(self, int(reply["data"]["id"]), plugin)
        self.handles[handle.id] = handle
        return handle

    async def call(
        self, url: str, payload: dict[str, Any], timeout: float = EVENT_TIMEOUT_S
    ) -> dict[str, Any]:
        """POST ``payload``; if Janus acknowledges, wait for the event with its transaction."""
        txn = _txn()
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[txn] = fut  # before the POST: the event may overtake the ack
        try:
            reply = await self._post(url, {**payload, "transaction": txn})
            if reply.get("janus") != "ack":
                return reply
            try:
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise JanusError(
                    f"Janus did not answer {payload.get('body', payload)!r} within {timeout:.0f} s"
                ) from None
        finally:
            self._pending.pop(txn, None)

    async def close(self) -> None:
        """Destroy the session (its handles and peer connections go with it). Idempotent."""
        alive = self.id is not None and not self.closed.is_set()
        for t in self._tasks:  # first: a poll would outlive the session and be refused
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        if alive:
            with contextlib.suppress(JanusError):
                await self._post(self.session_url, {"janus": "destroy"})
        self._end("closed")
        if self._own_http and not self.http.closed:
            await self.http.close()

    async def __aenter__(self) -> JanusSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class JanusHandle:
    """A plugin handle: requests to the plugin, and its asynchronous events."""

    def __init__(self, session: JanusSession, handle_id: int, plugin: str) -> None:
        self.session = session
        self.id = handle_id
        self.plugin = plugin
        self.events: asyncio.Queue[JanusEvent] = asyncio.Queue()
        self.webrtc_up = asyncio.Event()
        self.closed = asyncio.Event()  # hangup, detached, or the session ended
        self.hangup_reason = ""

    @property
    def url(self) -> str:
        return f"{self.session.session_url}/{self.id}"

    def _deliver(self, msg: dict[str, Any]) -> None:
        kind = str(msg.get("janus"))
        if kind == "webrtcup":
            self.webrtc_up.set()
        elif kind in ("hangup", "detached"):
            self.hangup_reason = str(msg.get("reason") or kind)
            self.closed.set()
        data = (msg.get("plugindata") or {}).get("data") or {}
        self.events.put_nowait(JanusEvent(kind, data, msg.get("jsep"), msg))

    async def request(self, body: dict[str, Any], jsep: dict[str, Any] | None = None) -> JanusEvent:
        """A plugin request: its answer (synchronous or the event that followed the ack).

        Raises:
            JanusError: Janus or the plugin refused it (the plugin's error code kept).
        """
        payload: dict[str, Any] = {"janus": "message", "body": body}
        if jsep is not None:
            payload["jsep"] = jsep
        reply = await self.session.call(self.url, payload)
        data = (reply.get("plugindata") or {}).get("data") or {}
        if "error" in data or "error_code" in data:
            raise JanusError(
                f"{self.plugin} refused {body.get('request')!r}: {data.get('error', data)}",
                data.get("error_code"),
            )
        return JanusEvent(str(reply.get("janus")), data, reply.get("jsep"), reply)

    async def trickle_done(self) -> None:
        """Tell Janus no more candidates come (aiortc puts all of them in its SDP)."""
        await self.session._post(self.url, {"janus": "trickle", "candidate": {"completed": True}})

    async def detach(self) -> None:
        if self.session.closed.is_set():
            return
        with contextlib.suppress(JanusError):
            await self.session._post(self.url, {"janus": "detach"})
        self.session.handles.pop(self.id, None)
        self.closed.set()


# -- VideoRoom --------------------------------------------------------------------------------


async def room_exists(handle: JanusHandle, room: int) -> bool:
    ev = await handle.request({"request": "exists", "room": room})
    return bool(ev.data.get("exists"))


async def ensure_room(
    handle: JanusHandle,
    room: int,
    *,
    description: str = "talkstream",
    publishers: int = 16,
    bitrate: int = 0,
    secret: str | None = None,
) -> bool:
    """Create VideoRoom ``room`` (VP8 + Opus) unless it exists; returns whether it was created.

    ``bitrate`` caps publishers (bit/s, 0 = no cap); ``fir_freq`` asks publishers for a
    keyframe every 10 s, so a late subscriber never waits long for its first picture.
    """
    if await room_exists(handle, room):
        return False
    body: dict[str, Any] = {
        "request": "create",
        "room": room,
        "description": description,
        "publishers": publishers,
        "bitrate": bitrate,
        "fir_freq": 10,
        "videocodec": "vp8",
        "audiocodec": "opus",
        "permanent": False,
    }
    if secret:
        body["secret"] = secret
    try:
        await handle.request(body)
    except JanusError as e:
        if e.code == ROOM_EXISTS:  # created by someone else meanwhile
            return False
        raise
    return True


async def destroy_room(handle: JanusHandle, room: int, secret: str | None = None) -> None:
    body: dict[str, Any] = {"request": "destroy", "room": room}
    if secret:
        body["secret"] = secret
    await handle.request(body)


async def list_publishers(handle: JanusHandle, room: int) -> list[dict[str, Any]]:
    """The room's active publishers: ``[{"id": ..., "display": ...}, ...]``."""
    ev = await handle.request({"request": "listparticipants", "room": room})
    return [p for p in ev.data.get("participants", []) if p.get("publisher")]


async def publish(
    handle: JanusHandle, room: int, offer_sdp: str, *, display: str = "talkstream"
) -> tuple[int, str]:
    """Join ``room`` as a publisher and publish ``offer_sdp``; returns (feed id, answer SDP)."""
    joined = await handle.request(
        {"request": "join", "ptype": "publisher", "room": room, "display": display}
    )
    feed = int(joined.data["id"])
    ev = await handle.request(
        {"request": "publish", "audiocodec": "opus", "videocodec": "vp8"},
        jsep={"type": "offer", "sdp": offer_sdp},
    )
    if not ev.jsep or ev.jsep.get("type") != "answer":
        raise JanusError(f"the VideoRoom accepted the publisher but sent no answer: {ev.data}")
    return feed, str(ev.jsep["sdp"])


async def subscribe(handle: JanusHandle, room: int, feed: int) -> str:
    """Join ``room`` as a subscriber of ``feed``; returns the plugin's offer SDP."""
    ev = await handle.request(
        {"request": "join", "ptype": "subscriber", "room": room, "streams": [{"feed": feed}]}
    )
    if not ev.jsep or ev.jsep.get("type") != "offer":
        raise JanusError(f"the VideoRoom sent no offer for feed {feed}: {ev.data}")
    return str(ev.jsep["sdp"])


async def start_subscription(handle: JanusHandle, answer_sdp: str) -> None:
    await handle.request({"request": "start"}, jsep={"type": "answer", "sdp": answer_sdp})


__all__ = [
    "VIDEOROOM",
    "JanusError",
    "JanusEvent",
    "JanusHandle",
    "JanusSession",
    "destroy_room",
    "ensure_room",
    "list_publishers",
    "publish",
    "room_exists",
    "server_info",
    "start_subscription",
    "subscribe",
]
