"""The presenter push API of a published stream (``talkstream publish`` and cluster workers).

``POST /speech``: audio/wav, or raw PCM as application/octet-stream with ``?rate=&channels=
&format=s16le|f32le`` (the same bodies as ``talkstream serve``'s presenters take), queued on the
stream; ``POST /interrupt`` drops what is queued; ``GET /stats`` is the stream's snapshot.
Errors are JSON ``{"error": "..."}`` with 400, 413, 415 or 429. When the stream goes to a Janus
VideoRoom, ``GET /watch`` is a viewer page that watches it through Janus
(:mod:`talkstream.publish.viewer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from talkstream.errors import TalkstreamError
from talkstream.streaming.media import SpeechFormatError, UnsupportedMediaTypeError, decode_speech
from talkstream.streaming.tracks import AvatarStream, QueueFullError

MAX_PUSH_BYTES = 8 * 1024 * 1024


def push_app(
    stream: AvatarStream,
    extra: Mapping[str, Any] | None = None,
    *,
    watch: tuple[str, int, int] | None = None,
) -> web.Application:
    """The push API of ``stream``; ``extra`` is added to ``GET /stats``; ``watch`` (Janus URL,
    room, feed) adds the viewer page at ``GET /watch``."""

    def err(status: int, reason: str) -> web.Response:
        return web.json_response({"error": reason}, status=status)

    async def speech(request: web.Request) -> web.Response:
        try:
            data = await request.read()  # over client_max_size: 413 from aiohttp
        except web.HTTPRequestEntityTooLarge:
            return err(413, f"body is over the limit of {MAX_PUSH_BYTES} bytes")
        try:
            pcm, rate = decode_speech(request.content_type, data, request.query)
            queued = stream.push_speech(pcm, rate)
        except UnsupportedMediaTypeError as e:
            return err(415, str(e))
        except QueueFullError as e:
            return err(429, str(e))
        except (SpeechFormatError, ValueError, TypeError) as e:
            return err(400, str(e))
        return web.json_response({"pushed_s": round(pcm.shape[0] / rate, 3), "queued_s": queued})

    async def interrupt(request: web.Request) -> web.Response:
        return web.json_response({"dropped_s": round(stream.interrupt(), 3)})

    async def stats(request: web.Request) -> web.Response:
        # frames_sent: video frames handed to encoders so far (one per frame per outgoing
        # track: with an SFU, one track however large the audience).
        return web.json_response(
            {**(extra or {}), **stream.snapshot(), "frames_sent": stream.stats.frames_displayed}
        )

    app = web.Application(client_max_size=MAX_PUSH_BYTES)
    app.router.add_post("/speech", speech)
    app.router.add_post("/interrupt", interrupt)
    app.router.add_get("/stats", stats)
    if watch is not None:
        from talkstream.publish.viewer import watch_handler

        app.router.add_get("/watch", watch_handler(*watch))
    return app


async def serve_push_api(
    stream: AvatarStream,
    host: str,
    port: int,
    *,
    extra: Mapping[str, Any] | None = None,
    watch: tuple[str, int, int] | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve :func:`push_app` on ``host:port`` (0: a free port); returns (runner, bound port).

    Raises:
        TalkstreamError: the address cannot be bound.
    """
    runner = web.AppRunner(
        push_app(stream, extra, watch=watch), handle_signals=False, access_log=None
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise TalkstreamError(
            f"cannot listen on {host}:{port} ({e.strerror}); pick another address"
        ) from None
    bound = int(runner.addresses[0][1]) if runner.addresses else port
    return runner, bound


__all__ = ["MAX_PUSH_BYTES", "push_app", "serve_push_api"]
