"""The ``talkstream publish`` subcommand (registered by :mod:`talkstream.cli`).

It renders one presenter and publishes it, encoded once, to a WHIP endpoint (``--whip``) or a
Janus VideoRoom (``--janus``). Speech comes from ``--audio FILE`` (spoken once, then the avatar
idles until stopped) or from the presenter push API this command serves on ``--listen``:
``POST /speech`` (audio/wav, or raw PCM as application/octet-stream with ``?rate=&channels=
&format=s16le|f32le``), ``POST /interrupt``, ``GET /stats``. Ctrl-C or SIGTERM stops it and
releases the SFU's resource (WHIP: ``DELETE``; Janus: the session is destroyed).

Light at import: aiohttp, aiortc and torch load only when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from talkstream.config import Config, EngineConfig
from talkstream.errors import MissingDependencyError, TalkstreamError

if TYPE_CHECKING:
    from talkstream.engine.avatar import Avatar
    from talkstream.engine.pipeline import Engine
    from talkstream.publish.publisher import Publication
    from talkstream.streaming.tracks import AvatarStream

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  talkstream publish --whip https://ingest.example/whip/abc --token T --audio talk.wav
  talkstream publish --janus http://127.0.0.1:8088/janus --room 1234 --image me.jpg
      then: curl -H 'Content-Type: audio/wav' --data-binary @hi.wav http://127.0.0.1:8090/speech
"""
PUSH_CHUNK_S = 10.0  # --audio is queued this much at a time (the queue holds at most 120 s)


@dataclass(frozen=True)
class PublishConfig:
    whip: str | None = None
    token: str | None = None
    janus: str | None = None
    room: int = 1234
    display: str = "talkstream"
    audio: Path | None = None
    listen: tuple[str, int] | None = ("127.0.0.1", 8090)
    image: Path | None = None
    landmarks: Path | None = None
    loopback_ice: bool = False


def _listen_arg(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:8090), got {value!r}")
    return (host or "127.0.0.1").strip("[]"), int(port)


def add_parser(
    sub: argparse._SubParsersAction,
    add_engine_args: Callable[[argparse.ArgumentParser], None],
    engine_config: Callable[[argparse.Namespace], EngineConfig],
) -> None:
    """Register ``publish`` on the ``talkstream`` command's subparsers."""
    from talkstream.cli import add_photo_args

    p = sub.add_parser(
        "publish",
        help="render one presenter and publish it into an SFU (WHIP or Janus), encoded once",
        description="Render one presenter and publish it, encoded once, to a WHIP endpoint "
        "(LiveKit Ingress, Cloudflare, MediaMTX, Janus behind simple-whip-server ...) or a "
        "Janus VideoRoom; the SFU serves the audience. With --audio the avatar speaks the file "
        "and then idles until stopped; without it, programs push speech to --listen.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    dest = p.add_argument_group("destination (one of)")
    target = dest.add_mutually_exclusive_group(required=True)
    target.add_argument("--whip", metavar="URL", help="WHIP endpoint URL (RFC 9725)")
    target.add_argument(
        "--janus", metavar="URL", help="Janus HTTP API URL, e.g. http://127.0.0.1:8088/janus"
    )
    dest.add_argument("--token", help="WHIP Bearer token")
    dest.add_argument(
        "--room", type=int, default=1234, help="Janus VideoRoom room (created if missing; 1234)"
    )
    dest.add_argument(
        "--display", default="talkstream", help="publisher name shown in the room (talkstream)"
    )
    speech = p.add_argument_group("speech (one of)")
    src = speech.add_mutually_exclusive_group()
    src.add_argument(
        "--audio", type=Path, help="speak this file (wav/flac/ogg, any rate), then idle"
    )
    src.add_argument(
        "--listen",
        type=_listen_arg,
        default=("127.0.0.1", 8090),
        metavar="HOST:PORT",
        help="serve the push API here: POST /speech, POST /interrupt, GET /stats "
        "(127.0.0.1:8090; port 0 picks a free one)",
    )
    p.add_argument("--image", type=Path, default=None, help="avatar photo; default: bundled face")
    p.add_argument(
        "--landmarks", type=Path, default=None, help="JSON with the photo's 68 iBUG landmarks"
    )
    add_photo_args(p)
    p.add_argument(
        "--ice-local-only",
        action="store_true",
        help="gather ICE candidates on this machine's first IPv4 address only (an SFU on this "
        "machine, as in the tests)",
    )
    add_engine_args(p)
    p.set_defaults(func=lambda a: _run(a, engine_config), engine_backend="auto")


def _check_dependencies() -> None:
    for module, what in (("aiohttp", "HTTP"), ("aiortc", "WebRTC")):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"talkstream publish ({what})", module, "serve")


def _run(a: argparse.Namespace, engine_config: Callable[[argparse.Namespace], EngineConfig]) -> int:
    _check_dependencies()
    if a.token and not a.whip:
        raise TalkstreamError("--token is for --whip; Janus's HTTP API takes none here")
    # The config tree, built once: the engine section and this command's publish section.
    cfg = Config(
        engine=engine_config(a),
        publish=PublishConfig(
            whip=a.whip,
            token=a.token,
            janus=a.janus,
            room=a.room,
            display=a.display,
            audio=a.audio,
            listen=None if a.audio else a.listen,
            image=a.image,
            landmarks=a.landmarks,
            loopback_ice=a.ice_local_only,
        ),
    )
    return run(cfg.with_command_overrides(a.set, "publish"))


def load_presenter(cfg: PublishConfig, engine_cfg: EngineConfig) -> tuple[Engine, Avatar]:
    """The engine (of the tree's engine section) and the avatar, warmed up (photo problems fail
    before models load)."""
    import dataclasses

    from talkstream.engine.avatar import load_avatar_source, prepare_avatar_source
    from talkstream.runtime import load_engine

    source = load_avatar_source(cfg.image, cfg.landmarks, engine_cfg.avatar)
    engine = load_engine(engine_cfg)
    try:
        acfg = dataclasses.replace(engine_cfg.avatar, crop_size=engine.crop_size)
        avatar = prepare_avatar_source(source, acfg)
        engine.encode_avatar(avatar)
        engine.warmup(avatar)
    except BaseException:
        engine.close()
        raise
    return engine, avatar


async def check_destination(cfg: PublishConfig) -> None:
    """Fail fast, before the models load, when the destination does not answer at all."""
    if cfg.whip:
        from talkstream.publish.whip import WhipClient

        client = WhipClient(cfg.whip, token=cfg.token)
        try:
            await client.discover(strict=True)
        finally:
            await client.close()
    elif cfg.janus:
        from talkstream.publish.janus import VIDEOROOM, JanusError, server_info

        info = await server_info(cfg.janus)
        if VIDEOROOM not in (info.get("plugins") or {}):
            raise JanusError(f"the Janus at {cfg.janus} has no VideoRoom plugin enabled")


def run(root: Config) -> int:
    """Load, publish, speak or serve pushes, until stopped (the ``publish`` command): the root
    config's ``publish`` and ``engine`` sections."""
    cfg = root.publish
    if cfg is None:
        raise ValueError("run needs a config with a publish section")
    asyncio.run(check_destination(cfg))
    if cfg.audio is not None:
        from talkstream.engine.audio import load_audio

        speech = load_audio(cfg.audio)  # a bad file fails before the models load
    else:
        speech = None
    engine, avatar = load_presenter(cfg, root.engine)
    try:
        return asyncio.run(publish_until_stopped(cfg, engine, avatar, speech))
    finally:
        engine.close()


async def _speak(stream: AvatarStream, pcm: Any, rate: int) -> None:
    """Queue a whole file, a chunk at a time as the queue drains (it holds 120 s at most)."""
    from talkstream.streaming.tracks import QueueFullError

    step = int(PUSH_CHUNK_S * rate)
    for i in range(0, pcm.shape[0], step):
        while True:
            try:
                stream.push_speech(pcm[i : i + step], rate)
                break
            except QueueFullError:
                await asyncio.sleep(1.0)


async def publish_until_stopped(
    cfg: PublishConfig,
    engine: Engine,
    avatar: Avatar,
    speech: tuple[Any, int] | None,
    *,
    stop: asyncio.Event | None = None,
    ready: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Publish one presenter until ``stop`` is set (default: SIGINT/SIGTERM)."""
    from talkstream.publish import local
    from talkstream.publish.publisher import publish_to_janus, publish_to_whip
    from talkstream.publish.push import serve_push_api
    from talkstream.streaming.config import StreamConfig
    from talkstream.streaming.tracks import AvatarStream

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    ice: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if cfg.loopback_ice:
        address = local.local_ice_address()
        if address is None:
            raise TalkstreamError("--ice-local-only: this machine has no IPv4 address but loopback")
        ice = local.use_local_ice(address)
    stream = AvatarStream(engine, avatar, StreamConfig(), mode="presenter", name=cfg.display)
    stream.start()
    pub: Publication | None = None
    runner = None
    try:
        info: dict[str, Any] = {}
        with ice:
            if cfg.whip:
                wpub = await publish_to_whip(stream, cfg.whip, token=cfg.token)
                info["resource"] = wpub.client.resource if wpub.client else None
                pub = wpub
            else:
                assert cfg.janus
                jpub = await publish_to_janus(stream, cfg.janus, cfg.room, display=cfg.display)
                info["room"], info["feed"] = cfg.room, jpub.feed
                pub = jpub
        info["target"] = pub.target
        print(f"talkstream: publishing to {pub.target}", flush=True)
        if speech is not None:
            pcm, rate = speech
            print(
                f"talkstream: speaking {cfg.audio} ({pcm.shape[0] / rate:.1f} s), then idling; "
                "Ctrl-C stops",
                flush=True,
            )
            await _speak(stream, pcm, rate)
        elif cfg.listen is not None:
            from talkstream.streaming.server import mouth_box

            extra = {"target": pub.target, "mouth_box": mouth_box(stream)}
            watch = (cfg.janus, cfg.room, info["feed"]) if cfg.janus else None
            runner, port = await serve_push_api(stream, *cfg.listen, extra=extra, watch=watch)
            info["push_url"] = f"http://{cfg.listen[0]}:{port}"
            print(
                f"talkstream: push speech to http://{cfg.listen[0]}:{port}/speech "
                "(audio/wav); Ctrl-C stops",
                flush=True,
            )
            if watch:
                print(
                    f"talkstream: watch it through Janus at http://{cfg.listen[0]}:{port}/watch",
                    flush=True,
                )
        if ready is not None:
            ready(info)
        stopped = asyncio.ensure_future(stop.wait())
        ended = asyncio.ensure_future(pub.ended.wait())
        await asyncio.wait({stopped, ended}, return_when=asyncio.FIRST_COMPLETED)
        for f in (stopped, ended):
            f.cancel()
        if pub.ended.is_set() and not stop.is_set():
            raise TalkstreamError(f"the SFU ended the stream ({pub.end_reason}); not retrying")
        print("talkstream: stopping", flush=True)
        return 0
    finally:
        if runner is not None:
            await runner.cleanup()
        if pub is not None:
            with contextlib.suppress(TalkstreamError):
                await pub.close()
        await stream.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


__all__ = [
    "PublishConfig",
    "add_parser",
    "check_destination",
    "load_presenter",
    "publish_until_stopped",
    "run",
]
