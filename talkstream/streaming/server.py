"""``talkstream serve``: the aiohttp + aiortc server.

Endpoints (every error is JSON ``{"error": reason}`` with a 4xx/5xx status):

=========================================  ==================================================
``GET /``                                  the web client (``static/``); ``/?presenter=N``
                                           redirects to ``/watch``
``GET /watch?presenter={name}``            the watch-only page (no microphone)
``GET /preview.jpg``                       the avatar's still photo (shown before Start)
``POST /offer``                            ``{"sdp", "type": "offer"}`` -> the answer plus
                                           ``session_id``: a live session (your microphone
                                           drives the avatar you watch)
``GET /sessions/{id}/stats``               fps, drops, latency budget of a live session
``GET /sessions/{id}/trace``               per-frame landmark motion and input level
                                           (media time), for benchmarks and diagnosis
``DELETE /sessions/{id}``                  hang up
``GET /presenters``                        presenters and their viewer counts
``POST /presenters/{name}``                create a presenter (pushes create one too)
``DELETE /presenters/{name}``              close it and its viewers
``POST /presenters/{name}/speech``         push speech: ``audio/wav``, or raw PCM as
                                           ``application/octet-stream`` with ``?rate=&channels=
                                           &format=s16le|f32le``
``POST /presenters/{name}/interrupt``      drop the queued speech
``GET /presenters/{name}/ws``              WebSocket push: binary PCM messages (format from
                                           the query, as above), text ``{"type": "interrupt"}``
``POST /presenters/{name}/offer``          watch a presenter (receive-only offer)
``GET /presenters/{name}/stats``           as for sessions
``GET /health``                            liveness and capacity
``GET /metrics``                           Prometheus text format
=========================================  ==================================================

Access (:mod:`talkstream.streaming.security`): with tokens configured, the page, offers, stats and
the presenter list need the viewer token (or the control token); presenter control, pushes, the
WebSocket and /metrics the control token; /health and /static are public. The Host header must
name this server, and pages of other origins may not POST, DELETE or open WebSockets unless
allowed (``--allow-origin``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import time
from importlib import resources
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from talkstream.config import AvatarConfig, Config
from talkstream.engine.avatar import (
    Avatar,
    AvatarSource,
    load_avatar_source,
    prepare_avatar_source,
)
from talkstream.engine.pipeline import Engine
from talkstream.runtime import load_engine
from talkstream.streaming.bind import bind_error
from talkstream.streaming.config import ServeConfig
from talkstream.streaming.decode import (
    DecodeBusyError,
    DecodeLimits,
    PushDecoder,
    clip_float,
)
from talkstream.streaming.media import (
    RawFormat,
    SpeechFormatError,
    UnsupportedMediaTypeError,
    decode_raw,
    raw_format,
)
from talkstream.streaming.metrics import Registry
from talkstream.streaming.sdp import OfferError, check_offer
from talkstream.streaming.security import (
    AccessPolicy,
    JsonInputError,
    Scope,
    parse_json,
    quiet_client_protocol_errors,
    scope_table,
    security_middleware,
)
from talkstream.streaming.sessions import (
    CapacityError,
    NotFoundError,
    Presenter,
    SessionManager,
)
from talkstream.streaming.tracks import AvatarStream, QueueFullError

log = logging.getLogger(__name__)

STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
READ_CHUNK_BYTES = 64 * 1024
MANAGER_KEY: web.AppKey[SessionManager] = web.AppKey("manager", SessionManager)
CONFIG_KEY: web.AppKey[ServeConfig] = web.AppKey("config", ServeConfig)
STARTED_KEY: web.AppKey[float] = web.AppKey("started", float)
REGISTRY_KEY: web.AppKey[Registry] = web.AppKey("registry", Registry)
DECODER_KEY: web.AppKey[PushDecoder] = web.AppKey("decoder", PushDecoder)
PREVIEW_KEY: web.AppKey[list[bytes]] = web.AppKey("preview", list)
# No other site may frame the page (a click-jacked Start would share the microphone), and the
# token in its address is not sent on as a Referer.
PAGE_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
# WebSocket text messages are control messages ({"type": "interrupt"}): small.
MAX_WS_TEXT_BYTES = 4096
# A presenter's WebSocket closes with this code when the presenter is closed under it.
WS_PRESENTER_CLOSED = 4410


# ----------------------------------------------------------------------------- helpers


def error(status: int, reason: str) -> web.Response:
    """A JSON error response."""
    return web.json_response({"error": reason}, status=status)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused (413) beyond ``limit`` bytes without reading it all."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(
            max_size=limit,
            actual_size=request.content_length,
            text=json.dumps(
                {
                    "error": f"body of {request.content_length} bytes is over the "
                    f"limit of {limit} bytes"
                }
            ),
            content_type="application/json",
        )
    chunks: list[bytes] = []
    size = 0
    timeout = request.app[CONFIG_KEY].body_timeout_s if CONFIG_KEY in request.app else None
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_chunked(READ_CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    raise web.HTTPRequestEntityTooLarge(
                        max_size=limit,
                        actual_size=size,
                        text=json.dumps({"error": f"body is over the limit of {limit} bytes"}),
                        content_type="application/json",
                    )
                chunks.append(chunk)
    except TimeoutError:
        # A body trickled in slowly (slowloris): the connection is not kept.
        raise web.HTTPRequestTimeout(
            text=json.dumps({"error": f"the body did not arrive within {timeout:g} s"}),
            content_type="application/json",
            headers={"Connection": "close"},
        ) from None
    return b"".join(chunks)


async def read_offer(request: web.Request, cfg: ServeConfig) -> str:
    """The SDP of a JSON ``{"sdp", "type": "offer"}`` body; :class:`OfferError` if bad."""
    if request.content_type != "application/json":
        raise UnsupportedMediaTypeError(
            f"Content-Type must be application/json, got {request.content_type!r}"
        )
    body = await read_body(request, cfg.max_offer_bytes)
    try:
        data = parse_json(body, max_bytes=cfg.max_offer_bytes)
    except JsonInputError as e:
        raise OfferError(str(e)) from None
    if not isinstance(data, dict):
        raise OfferError('the body must be a JSON object {"sdp": ..., "type": "offer"}')
    sdp, kind = data.get("sdp"), data.get("type")
    if kind != "offer":
        raise OfferError(f'type must be "offer", got {kind!r}')
    if not isinstance(sdp, str) or not sdp:
        raise OfferError("sdp must be a non-empty string")
    return sdp


def load_source(cfg: ServeConfig, avatar: AvatarConfig) -> AvatarSource:
    """The photo the config names (the bundled astronaut by default), its face found and
    judged by the engine section's ``avatar`` settings: an unusable photo fails here, before
    any model loads."""
    return load_avatar_source(cfg.image, cfg.landmarks, avatar)


def load_avatar(cfg: ServeConfig, engine: Engine, source: AvatarSource | None = None) -> Avatar:
    """The avatar the config names, prepared for ``engine`` (its crop size) and framed by the
    engine's ``cfg.avatar.framing``."""
    acfg = dataclasses.replace(engine.cfg.avatar, crop_size=engine.crop_size)
    return prepare_avatar_source(
        source if source is not None else load_source(cfg, engine.cfg.avatar), acfg
    )


# ----------------------------------------------------------------------------- handlers


async def index(request: web.Request) -> web.StreamResponse:
    if "presenter" in request.query:
        # Viewers of a presenter get the watch-only page, which never asks for a microphone.
        raise web.HTTPFound(f"/watch?{request.query_string}")
    return await static(request, "index.html")


async def watch(request: web.Request) -> web.StreamResponse:
    return await static(request, "index.html")


async def preview(request: web.Request) -> web.Response:
    """The avatar's still photo as JPEG: the page shows it before Start."""
    cache = request.app[PREVIEW_KEY]
    if not cache:
        avatar = request.app[MANAGER_KEY].avatar
        cache.append(await asyncio.to_thread(encode_jpeg, avatar.image))
    return web.Response(
        body=cache[0], content_type="image/jpeg", headers={"Cache-Control": "no-cache"}
    )


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


async def favicon(request: web.Request) -> web.Response:
    return web.Response(status=204)


async def static_file(request: web.Request) -> web.StreamResponse:
    return await static(request, request.match_info["name"])


async def static(request: web.Request, name: str) -> web.StreamResponse:
    if name not in STATIC_FILES:
        return error(404, f"no static file {name!r}")
    data = resources.files("talkstream.streaming").joinpath("static", name).read_bytes()
    return web.Response(
        body=data,
        content_type=STATIC_FILES[name],
        headers={"Cache-Control": "no-cache", **PAGE_HEADERS},
    )


async def offer(request: web.Request) -> web.Response:
    cfg, mgr = request.app[CONFIG_KEY], request.app[MANAGER_KEY]
    try:
        sdp = await read_offer(request, cfg)
        check_offer(sdp, need_mic=True, max_bytes=cfg.max_offer_bytes)
        peer, answer = await mgr.create_live(sdp)
    except UnsupportedMediaTypeError as e:
        return error(415, str(e))
    except OfferError as e:
        return error(400, str(e))
    except CapacityError as e:
        return error(503, str(e))
    return web.json_response(
        {
            "sdp": answer.sdp,
            "type": answer.type,
            "session_id": peer.id,
            "latency_budget_ms": peer.stream.budget_ms(),
            "mouth_box": mouth_box(peer.stream),
        }
    )


def mouth_box(stream: AvatarStream) -> list[int]:
    """The mouth region [x0, y0, x1, y1] in frame pixels (for probes and tests)."""
    av = stream.avatar
    inv = np.linalg.inv(np.vstack([av.frame_to_crop, [0.0, 0.0, 1.0]]))[:2]  # crop -> frame
    pts = av.neutral[48:68] @ inv[:, :2].T + inv[:, 2]  # (20, 2) lips in frame pixels
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    pad = 0.25 * (x1 - x0)
    h, w = av.image.shape[:2]
    return [
        max(int(x0 - pad), 0),
        max(int(y0 - pad), 0),
        min(int(np.ceil(x1 + pad)), w),
        min(int(np.ceil(y1 + 2 * pad)), h),  # the jaw drops: more room below
    ]


async def session_stats(request: web.Request) -> web.Response:
    try:
        peer = request.app[MANAGER_KEY].get_peer(request.match_info["id"])
    except NotFoundError as e:
        return error(404, str(e))
    return web.json_response({"session_id": peer.id, **peer.stream.snapshot()})


async def session_trace(request: web.Request) -> web.Response:
    try:
        peer = request.app[MANAGER_KEY].get_peer(request.match_info["id"])
    except NotFoundError as e:
        return error(404, str(e))
    return web.json_response(peer.stream.trace())


async def session_delete(request: web.Request) -> web.Response:
    mgr = request.app[MANAGER_KEY]
    try:
        peer = mgr.get_peer(request.match_info["id"])
    except NotFoundError as e:
        return error(404, str(e))
    await mgr.close_peer(peer, "hung up")
    return web.json_response({"closed": peer.id})


def _presenter_error(e: Exception) -> web.Response:
    if isinstance(e, NotFoundError):
        return error(404, str(e))
    if isinstance(e, CapacityError):
        return error(503, str(e))
    return error(400, str(e))


async def presenters_list(request: web.Request) -> web.Response:
    mgr = request.app[MANAGER_KEY]
    return web.json_response(
        {
            "presenters": [
                {"name": p.name, "viewers": len(p.viewers), **p.stream.snapshot()}
                for p in mgr.presenters.values()
            ]
        }
    )


async def presenter_create(request: web.Request) -> web.Response:
    mgr = request.app[MANAGER_KEY]
    name = request.match_info["name"]
    try:
        existed = name in mgr.presenters
        pres = mgr.presenter(name)
    except (ValueError, CapacityError) as e:
        return _presenter_error(e)
    return web.json_response(
        {"name": pres.name, "created": not existed}, status=200 if existed else 201
    )


async def presenter_delete(request: web.Request) -> web.Response:
    mgr = request.app[MANAGER_KEY]
    try:
        pres = mgr.get_presenter(request.match_info["name"])
    except (ValueError, NotFoundError) as e:
        return _presenter_error(e)
    await mgr.close_presenter(pres.name)
    return web.json_response({"closed": pres.name})


async def presenter_speech(request: web.Request) -> web.Response:
    cfg, mgr = request.app[CONFIG_KEY], request.app[MANAGER_KEY]
    name = request.match_info["name"]
    try:
        mgr.check_name(name)
        # Decode before creating anything: a bad push leaves no presenter behind.
        data = await read_body(request, cfg.max_push_bytes)
        pcm, rate = await request.app[DECODER_KEY].decode(request.content_type, data, request.query)
        pres = mgr.presenter(name)
        queued = pres.stream.push_speech(pcm, rate)
    except UnsupportedMediaTypeError as e:
        return error(415, str(e))
    except (QueueFullError, DecodeBusyError) as e:
        return error(429, str(e))
    except (SpeechFormatError, ValueError, TypeError, CapacityError) as e:
        return _presenter_error(e)
    return web.json_response(
        {"presenter": name, "pushed_s": round(pcm.shape[0] / rate, 3), "queued_s": queued}
    )


async def presenter_interrupt(request: web.Request) -> web.Response:
    mgr = request.app[MANAGER_KEY]
    try:
        pres = mgr.get_presenter(request.match_info["name"])
    except (ValueError, NotFoundError) as e:
        return _presenter_error(e)
    dropped = pres.stream.interrupt()
    return web.json_response({"presenter": pres.name, "dropped_s": round(dropped, 3)})


async def presenter_stats(request: web.Request) -> web.Response:
    mgr = request.app[MANAGER_KEY]
    try:
        pres = mgr.get_presenter(request.match_info["name"])
    except (ValueError, NotFoundError) as e:
        return _presenter_error(e)
    return web.json_response({"viewers": len(pres.viewers), **pres.stream.snapshot()})


async def presenter_offer(request: web.Request) -> web.Response:
    cfg, mgr = request.app[CONFIG_KEY], request.app[MANAGER_KEY]
    name = request.match_info["name"]
    try:
        sdp = await read_offer(request, cfg)
        check_offer(sdp, need_mic=False, max_bytes=cfg.max_offer_bytes)
        peer, answer = await mgr.create_viewer(name, sdp)
    except UnsupportedMediaTypeError as e:
        return error(415, str(e))
    except OfferError as e:
        return error(400, str(e))
    except (NotFoundError, CapacityError, ValueError) as e:
        return _presenter_error(e)
    return web.json_response(
        {
            "sdp": answer.sdp,
            "type": answer.type,
            "session_id": peer.id,
            "presenter": name,
            "latency_budget_ms": peer.stream.budget_ms(),
            "mouth_box": mouth_box(peer.stream),
        }
    )


async def presenter_ws(request: web.Request) -> web.StreamResponse:
    cfg, mgr = request.app[CONFIG_KEY], request.app[MANAGER_KEY]
    name = request.match_info["name"]
    try:
        mgr.check_name(name)
        fmt = raw_format(request.query)
        pres = mgr.presenter(name)
    except (SpeechFormatError, ValueError, CapacityError) as e:
        return _presenter_error(e)
    limits = request.app[DECODER_KEY].limits
    # aiohttp closes the socket with 1009 (message too big) past max_msg_size; its pings
    # (heartbeat) close a pusher that stopped answering.
    ws = web.WebSocketResponse(max_msg_size=cfg.max_push_bytes, heartbeat=cfg.ws_heartbeat_s)
    await ws.prepare(request)
    pres.pushers += 1

    async def on_presenter_closed() -> None:
        # Closed by DELETE or shutdown: say so and close, rather than acknowledging pushes
        # into a stream nobody renders.
        await pres.stream.closed_event.wait()
        if not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_json({"type": "error", "error": f"presenter {name!r} was closed"})
            await ws.close(code=WS_PRESENTER_CLOSED, message=b"presenter closed")

    watcher = asyncio.create_task(on_presenter_closed(), name=f"talkstream-ws-{name}")
    try:
        await _serve_pusher(ws, mgr, pres, fmt, limits)
    except ConnectionError:
        pass  # the pusher went away while we answered
    finally:
        pres.pushers -= 1
        # The presenter's idle time starts when its last pusher leaves.
        pres.stream.last_input_at = max(pres.stream.last_input_at, mgr.now())
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if not ws.closed:
            await ws.close(code=WS_PRESENTER_CLOSED, message=b"presenter closed")
    return ws


async def _serve_pusher(
    ws: web.WebSocketResponse,
    mgr: SessionManager,
    pres: Presenter,
    fmt: RawFormat,
    limits: DecodeLimits,
) -> None:
    """Answer a pusher's messages until it closes or its presenter does."""
    name = pres.name
    async for msg in ws:
        if pres.stream.closed or mgr.presenters.get(name) is not pres:
            await ws.send_json({"type": "error", "error": f"presenter {name!r} was closed"})
            break
        if msg.type == WSMsgType.BINARY:
            try:
                limits.check(len(msg.data) // fmt.frame_bytes, fmt.channels, fmt.rate_hz)
                pcm = clip_float(decode_raw(msg.data, fmt))
                queued = pres.stream.push_speech(pcm, fmt.rate_hz)
            except (SpeechFormatError, QueueFullError) as e:
                await ws.send_json({"type": "error", "error": str(e)})
                continue
            await ws.send_json({"type": "ack", "queued_s": round(queued, 3)})
        elif msg.type == WSMsgType.TEXT:
            try:
                ctrl = parse_json(msg.data, max_bytes=MAX_WS_TEXT_BYTES)
            except JsonInputError:
                ctrl = None
            if isinstance(ctrl, dict) and ctrl.get("type") == "interrupt":
                dropped = pres.stream.interrupt()
                await ws.send_json({"type": "interrupted", "dropped_s": round(dropped, 3)})
            else:
                await ws.send_json(
                    {"type": "error", "error": 'text messages must be {"type": "interrupt"}'}
                )
        elif msg.type == WSMsgType.ERROR:
            log.info("presenter %s: websocket error: %s", name, ws.exception())


async def health(request: web.Request) -> web.Response:
    cfg, mgr = request.app[CONFIG_KEY], request.app[MANAGER_KEY]
    return web.json_response(
        {
            "status": "ok",
            "uptime_s": round(time.monotonic() - request.app[STARTED_KEY], 1),
            "sessions": mgr.live_count,
            "presenters": len(mgr.presenters),
            "viewers": mgr.viewer_count,
            "max_sessions": mgr.max_sessions,
            "max_viewers": cfg.max_viewers,
            "accepting": mgr.stream_count < mgr.max_sessions,
            "preset": mgr.engine.models.preset,
            "random_weights": mgr.engine.random_init,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    text = request.app[REGISTRY_KEY].render()
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


# ----------------------------------------------------------------------------- the app


# (method, path, scope): who may call what. Routes not listed need the control token.
ROUTES: tuple[tuple[str, str, Scope], ...] = (
    ("GET", "/", "viewer"),
    ("GET", "/watch", "viewer"),
    ("GET", "/preview.jpg", "viewer"),
    ("GET", "/static/{name}", "public"),
    ("GET", "/favicon.ico", "public"),
    ("POST", "/offer", "viewer"),
    ("GET", "/sessions/{id}/stats", "viewer"),
    ("GET", "/sessions/{id}/trace", "viewer"),
    ("DELETE", "/sessions/{id}", "viewer"),
    ("GET", "/presenters", "viewer"),
    ("POST", "/presenters/{name}", "control"),
    ("DELETE", "/presenters/{name}", "control"),
    ("POST", "/presenters/{name}/speech", "control"),
    ("POST", "/presenters/{name}/interrupt", "control"),
    ("GET", "/presenters/{name}/ws", "control"),
    ("POST", "/presenters/{name}/offer", "viewer"),
    ("GET", "/presenters/{name}/stats", "viewer"),
    ("GET", "/health", "public"),
    ("GET", "/metrics", "control"),
)


def access_policy(cfg: ServeConfig) -> AccessPolicy:
    return AccessPolicy(
        bind_host=cfg.host,
        viewer_token=None if cfg.no_auth else cfg.viewer_token,
        control_token=None if cfg.no_auth else cfg.control_token,
        allowed_origins=frozenset(cfg.allowed_origins),
        allowed_hosts=frozenset(cfg.allowed_hosts),
    )


def create_app(cfg: ServeConfig, engine: Engine, avatar: Avatar) -> web.Application:
    """The aiohttp application. The engine and avatar belong to the caller.

    Run it with :func:`make_runner`, which adds the header-read timeout.
    """
    registry = Registry()
    app = web.Application(
        client_max_size=max(cfg.max_offer_bytes, cfg.max_push_bytes),
        middlewares=[security_middleware(access_policy(cfg), scope_table(ROUTES), error)],
    )
    manager = SessionManager(cfg, engine, avatar, registry)
    decoder = PushDecoder(
        DecodeLimits(max_seconds=cfg.max_push_s, max_samples=cfg.max_push_samples)
    )
    app[CONFIG_KEY] = cfg
    app[MANAGER_KEY] = manager
    app[STARTED_KEY] = time.monotonic()
    app[REGISTRY_KEY] = registry
    app[DECODER_KEY] = decoder
    app[PREVIEW_KEY] = []
    handlers = {
        "/": index,
        "/watch": watch,
        "/preview.jpg": preview,
        "/static/{name}": static_file,
        "/favicon.ico": favicon,
        "/offer": offer,
        "/sessions/{id}/stats": session_stats,
        "/sessions/{id}/trace": session_trace,
        ("DELETE", "/sessions/{id}"): session_delete,
        "/presenters": presenters_list,
        ("POST", "/presenters/{name}"): presenter_create,
        ("DELETE", "/presenters/{name}"): presenter_delete,
        "/presenters/{name}/speech": presenter_speech,
        "/presenters/{name}/interrupt": presenter_interrupt,
        "/presenters/{name}/ws": presenter_ws,
        "/presenters/{name}/offer": presenter_offer,
        "/presenters/{name}/stats": presenter_stats,
        "/health": health,
        "/metrics": metrics,
    }
    for method, path, _ in ROUTES:
        handler = handlers.get((method, path)) or handlers[path]
        app.router.add_route(method, path, handler)

    async def on_startup(app: web.Application) -> None:
        manager.start()

    async def on_shutdown(app: web.Application) -> None:
        await manager.close()

    async def on_cleanup(app: web.Application) -> None:
        decoder.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def make_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """An AppRunner for :func:`create_app`'s app with the header-read timeout.

    aiohttp's keep-alive timer also runs from the moment a connection opens until its request
    headers are complete, so a client trickling its headers (slowloris), or holding an idle
    connection, is cut off after ``header_timeout_s``.
    """
    cfg = app[CONFIG_KEY]
    kwargs.setdefault("handle_signals", False)
    kwargs.setdefault("keepalive_timeout", cfg.header_timeout_s)
    return web.AppRunner(app, **kwargs)


async def serve(cfg: ServeConfig, engine: Engine, avatar: Avatar) -> None:
    """Run the server until cancelled or interrupted (SIGINT/SIGTERM)."""
    quiet_client_protocol_errors()
    app = create_app(cfg, engine, avatar)
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise bind_error(e, cfg.host, cfg.port) from None
    port = cfg.port
    if port == 0 and runner.addresses:
        port = int(runner.addresses[0][1])
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    host = f"[{host}]" if ":" in host else host
    query = f"?token={cfg.viewer_token}" if cfg.viewer_token and not cfg.no_auth else ""
    print(
        f"talkstream: open http://{host}:{port}/{query} in a browser and allow the microphone",
        flush=True,
    )
    if cfg.no_auth and not cfg.loopback:
        print(
            f"talkstream: --no-auth: anyone who can reach {cfg.host}:{port} can use this server",
            flush=True,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        print("talkstream: shutting down", flush=True)
        await runner.cleanup()


def run(cfg: Config) -> int:
    """Load the engine and the avatar, warm up, and serve (the ``serve`` command): the root
    config's ``serve`` and ``engine`` sections."""
    from talkstream.streaming.bind import check_bind
    from talkstream.streaming.sdp import use_loopback_ice

    serve_cfg = cfg.serve
    if serve_cfg is None:
        raise ValueError("run needs a config with a serve section")
    check_bind(serve_cfg.host, serve_cfg.port)  # a port in use fails now, not after warm-up
    if serve_cfg.ice_loopback_only:
        use_loopback_ice()
    source = load_source(serve_cfg, cfg.engine.avatar)
    engine = load_engine(cfg.engine)
    try:
        avatar = load_avatar(serve_cfg, engine, source)
        engine.encode_avatar(avatar)
        took = engine.warmup(avatar)
        log.info("warm-up took %.1f s", took)
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed: using asyncio's event loop")
            asyncio.run(serve(serve_cfg, engine, avatar))
        else:
            uvloop.run(serve(serve_cfg, engine, avatar))
    finally:
        engine.close()
    return 0


__all__ = [
    "ROUTES",
    "access_policy",
    "create_app",
    "encode_jpeg",
    "load_avatar",
    "load_source",
    "make_runner",
    "mouth_box",
    "read_body",
    "run",
    "serve",
]
