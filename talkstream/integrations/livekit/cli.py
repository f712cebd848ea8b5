"""``python -m talkstream.integrations.livekit``: one avatar worker for one LiveKit agent.

Joins the room, waits for the agent, takes its speech, and publishes the avatar's face and
voice for it until the agent leaves (or Ctrl-C / SIGTERM). Light at import: the LiveKit SDK,
torch and the engine load only when the command runs, so ``--help`` works without them and
running without the ``livekit`` extra says what to install.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence

from talkstream.errors import TalkstreamError
from talkstream.integrations.livekit import DEFAULT_AVATAR_IDENTITY as DEFAULT_IDENTITY

log = logging.getLogger("talkstream.integrations.livekit")

DEV_HINT = "livekit-server --dev listens on ws://localhost:7880 with key devkey, secret secret"


def build_parser() -> argparse.ArgumentParser:
    from talkstream.cli import _add_engine_args, add_photo_args

    p = argparse.ArgumentParser(
        prog="python -m talkstream.integrations.livekit",
        description="Avatar worker for LiveKit Agents: joins a room, takes an agent's speech "
        "(the avatar data-stream protocol: byte streams on lk.audio_stream, lk.clear_buffer, "
        "lk.playback_finished) and publishes a talking face with that voice, in sync, on the "
        "agent's behalf. Agents usually start it through "
        "talkstream.integrations.livekit.AvatarSession; run it by hand to test a room. "
        f"({DEV_HINT}.)",
    )
    room = p.add_argument_group("room")
    room.add_argument(
        "--url",
        default=None,
        help="LiveKit server, ws://HOST:7880 or wss://... (default: $LIVEKIT_URL)",
    )
    room.add_argument(
        "--token",
        default=None,
        help="access token for the worker (default: $LIVEKIT_TOKEN); without one, a token is "
        "made from --room, --identity and the API key and secret",
    )
    room.add_argument("--room", default=None, help="room to join (needed to make a token)")
    room.add_argument(
        "--identity",
        default=DEFAULT_IDENTITY,
        help=f"the worker's participant identity, for a made token ({DEFAULT_IDENTITY})",
    )
    room.add_argument(
        "--api-key", default=None, help="API key to make a token (default: $LIVEKIT_API_KEY)"
    )
    room.add_argument(
        "--api-secret",
        default=None,
        help="API secret to make a token (default: $LIVEKIT_API_SECRET)",
    )
    room.add_argument(
        "--agent-identity",
        default=None,
        help="the agent whose speech to take (default: the first agent participant); a made "
        "token lets the worker publish on its behalf",
    )
    room.add_argument(
        "--connect-timeout", type=float, default=10.0, help="seconds to join the room (10)"
    )
    face = p.add_argument_group("avatar")
    face.add_argument("--image", default=None, help="avatar photo (default: the bundled face)")
    face.add_argument(
        "--landmarks", default=None, help="JSON with the photo's 68 landmarks, instead of detecting"
    )
    add_photo_args(p)
    p.add_argument(
        "--compute-budget-ms",
        type=float,
        default=40.0,
        help="time a frame may take to render, part of the voice's delay (40)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_engine_args(p)
    p.set_defaults(engine_backend="auto")
    return p


def _token(a: argparse.Namespace) -> str:
    token = a.token or os.environ.get("LIVEKIT_TOKEN")
    if token:
        return str(token)
    if not a.room:
        raise TalkstreamError(
            "no access token: pass --token (or set LIVEKIT_TOKEN), or --room to make one "
            f"from the API key and secret ({DEV_HINT})"
        )
    from talkstream.integrations.livekit.session import worker_token

    return worker_token(
        room=a.room,
        identity=a.identity,
        agent_identity=a.agent_identity,
        api_key=a.api_key,
        api_secret=a.api_secret,
    )


def _check_room(token: str, room: str | None) -> None:
    """A given token must be for the given room (one line, before any connection)."""
    if room is None:
        return
    import jwt  # PyJWT: a dependency of livekit-api

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as e:
        raise TalkstreamError(f"--token is not a LiveKit access token (a JWT): {e}") from None
    granted = (claims.get("video") or {}).get("room")
    if granted and granted != room:
        raise TalkstreamError(f"--token is for room {granted!r}, not --room {room!r}")


async def _serve(a: argparse.Namespace, url: str, token: str) -> int:
    from livekit import rtc

    from talkstream.cli import _engine_config
    from talkstream.config import Config
    from talkstream.engine.avatar import load_avatar_source, prepare_avatar_source
    from talkstream.integrations.livekit.generator import GeneratorConfig
    from talkstream.integrations.livekit.worker import WorkerConfig, run_worker
    from talkstream.runtime import load_engine

    try:
        # The config tree, built once: the engine section and the worker's livekit section.
        root = Config(
            engine=_engine_config(a),
            livekit=WorkerConfig(
                agent_identity=a.agent_identity,
                generator=GeneratorConfig(compute_budget_ms=a.compute_budget_ms),
            ),
        )
    except ValueError as e:
        raise TalkstreamError(str(e)) from None
    cfg, ecfg = root.livekit, root.engine
    assert cfg is not None
    # The photo first: one that cannot work fails in a second, before the model loads.
    source = await asyncio.to_thread(load_avatar_source, a.image, a.landmarks, ecfg.avatar)

    room = rtc.Room()
    sdk_log = logging.getLogger("livekit")
    quiet = not a.verbose
    if quiet:  # the SDK logs every retry; the error below says it once
        sdk_log.setLevel(logging.CRITICAL)
    try:
        await room.connect(url, token, rtc.RoomOptions(connect_timeout=a.connect_timeout))
    except rtc.ConnectError as e:
        # (The SDK stays quiet: its log of the attempts arrives after this, from its thread.)
        raise TalkstreamError(
            f"cannot join a room at {url}: {e.message}; is the server running and the token "
            f"valid for it? ({DEV_HINT})"
        ) from None
    if quiet:
        sdk_log.setLevel(logging.WARNING)
    log.info("joined room %s as %s", room.name, room.local_participant.identity)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(sig, stop.set)
    try:
        engine = await asyncio.to_thread(load_engine, ecfg)
        acfg = dataclasses.replace(ecfg.avatar, crop_size=engine.crop_size)
        avatar = await asyncio.to_thread(prepare_avatar_source, source, acfg)
        log.info("avatar ready; waiting for the agent")
        await run_worker(room, engine, avatar, cfg, stop=stop)
    finally:
        if room.isconnected():
            await room.disconnect()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        from talkstream.integrations.livekit import check_dependencies

        check_dependencies()
        url = a.url or os.environ.get("LIVEKIT_URL")
        if not url:
            raise TalkstreamError(f"no server: pass --url or set LIVEKIT_URL ({DEV_HINT})")
        token = _token(a)
        _check_room(token, a.room)
        return asyncio.run(_serve(a, url, token))
    except TalkstreamError as e:
        print(f"talkstream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("talkstream: interrupted", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]
