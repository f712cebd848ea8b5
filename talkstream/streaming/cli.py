"""The ``talkstream serve`` subcommand (registered by :mod:`talkstream.cli`).

Light at import: aiohttp and aiortc are imported only when the command runs, so ``talkstream
--help`` works without the ``serve`` extra, and running ``serve`` without it says what to install.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from talkstream.config import EngineConfig
from talkstream.errors import MissingDependencyError, TalkstreamError

if TYPE_CHECKING:
    from talkstream.streaming.config import ServeConfig, StreamConfig

# (module, what it is) the server needs; all come with ``pip install 'talkstream[serve]'``.
_SERVE_MODULES = (("aiohttp", "the web server"), ("aiortc", "WebRTC"))


def add_parser(
    sub: argparse._SubParsersAction,
    add_engine_args: Callable[[argparse.ArgumentParser], None],
    engine_config: Callable[[argparse.Namespace], EngineConfig],
) -> None:
    """Register ``serve`` on the ``talkstream`` command's subparsers."""
    from talkstream.cli import add_photo_args
    from talkstream.streaming.config import StreamConfig  # no aiortc: safe for --help

    p = sub.add_parser(
        "serve",
        help="serve the live avatar over WebRTC (open the printed address in a browser)",
        description="Serve the live avatar: a web page where your microphone drives the "
        "avatar, presenters that programs push speech to, /health and /metrics.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (8080; 0 picks a free one)")
    p.add_argument(
        "--max-sessions",
        type=int,
        default=None,
        help="avatar streams rendering at once: live sessions + presenters (default: one per "
        "CPU core on a CPU, 8 on a GPU)",
    )
    p.add_argument(
        "--max-viewers", type=int, default=16, help="presenter viewers, over all presenters (16)"
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="close sessions without input audio for this many seconds (60)",
    )
    p.add_argument(
        "--image", type=Path, default=None, help="avatar photo; default: the bundled face"
    )
    p.add_argument(
        "--landmarks",
        type=Path,
        default=None,
        help="JSON with the photo's 68 iBUG landmarks, instead of detecting them",
    )
    add_photo_args(p)
    p.add_argument(
        "--compute-budget-ms",
        type=float,
        default=StreamConfig.compute_budget_ms,
        help="time a frame may take to render, part of the output delay "
        f"({StreamConfig.compute_budget_ms:g})",
    )
    p.add_argument(
        "--jitter-budget-ms",
        type=float,
        default=StreamConfig.jitter_budget_ms,
        help="how late microphone audio may arrive, part of the output delay "
        f"({StreamConfig.jitter_budget_ms:g})",
    )
    p.add_argument(
        "--audio-lead-ms",
        type=float,
        default=StreamConfig.audio_lead_ms,
        help="send the voice this much ahead of its frames, to make up for a receiver whose "
        f"audio path is longer than its video path ({StreamConfig.audio_lead_ms:g})",
    )
    access = p.add_argument_group(
        "access",
        "On 127.0.0.1 tokens are optional; any other --host needs both tokens (or --no-auth). "
        "Clients send a token as 'Authorization: Bearer TOKEN' or ?token=TOKEN in the address.",
    )
    access.add_argument(
        "--viewer-token",
        default=None,
        metavar="TOKEN",
        help="token for the page, offers and stats (default: $TALKSTREAM_VIEWER_TOKEN)",
    )
    access.add_argument(
        "--control-token",
        default=None,
        metavar="TOKEN",
        help="token for presenters: create, delete, push speech, interrupt, WebSocket, /metrics "
        "(default: $TALKSTREAM_CONTROL_TOKEN)",
    )
    access.add_argument(
        "--generate-tokens",
        action="store_true",
        help="make up random tokens for those not given, and print them",
    )
    access.add_argument(
        "--no-auth",
        action="store_true",
        help="no tokens even off loopback: anyone who reaches the port may use the server",
    )
    access.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (https://app.example.com) whose pages may call this server "
        "(CORS and WebSockets); repeatable; '*' allows any",
    )
    access.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name clients use to reach this server (checked against DNS rebinding); "
        "repeatable; '*' turns the check off",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=12.0,
        help="close a peer whose WebRTC connection is not up this many seconds after its "
        "offer, freeing its slot (12)",
    )
    p.add_argument(
        "--ice-loopback-only",
        action="store_true",
        help="use only 127.0.0.1 for WebRTC (browser on this machine, started with "
        "--allow-loopback-in-peer-connection)",
    )
    add_engine_args(p)
    # Live streams share the cores with encoders and aiortc: there onnxruntime's backend kept a
    # frame at 13 ms where torch's thread pool took 37 ms (2 sessions: 0% vs 48% dropped), so
    # serve picks the fastest available backend unless told otherwise.
    p.set_defaults(func=lambda a: _run(a, engine_config), engine_backend="auto")


def _check_dependencies() -> None:
    for module, what in _SERVE_MODULES:
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"talkstream serve ({what})", module, "serve")


def _run(a: argparse.Namespace, engine_config: Callable[[argparse.Namespace], EngineConfig]) -> int:
    _check_dependencies()
    from talkstream.config import Config
    from talkstream.streaming.config import ServeConfig, StreamConfig
    from talkstream.streaming.server import run

    try:
        # The config tree, built once: the engine section and this command's serve section.
        cfg = Config(engine=engine_config(a), serve=_serve_config(a, ServeConfig, StreamConfig))
    except ValueError as e:  # an out-of-range flag: a user error, not a bug
        raise TalkstreamError(str(e)) from None
    cfg = cfg.with_command_overrides(a.set, "serve")
    serve_cfg = cfg.serve
    assert serve_cfg is not None
    if a.generate_tokens and not serve_cfg.no_auth:
        print(f"talkstream: viewer token: {serve_cfg.viewer_token}", flush=True)
        print(f"talkstream: control token: {serve_cfg.control_token}", flush=True)
    return run(cfg)


def _tokens(a: argparse.Namespace) -> tuple[str | None, str | None]:
    """The viewer and control tokens: flags, else the environment, else (with
    ``--generate-tokens``) random ones. The entry point is the one place that reads the
    environment."""
    import os
    import secrets

    viewer = a.viewer_token or os.environ.get("TALKSTREAM_VIEWER_TOKEN") or None
    control = a.control_token or os.environ.get("TALKSTREAM_CONTROL_TOKEN") or None
    if a.generate_tokens:
        viewer = viewer or secrets.token_urlsafe(18)
        control = control or secrets.token_urlsafe(18)
    return viewer, control


def _session_limit(value: int | None) -> int:
    """``--max-sessions``: None is the device's default (``ServeConfig``'s 0), else >= 1."""
    if value is None:
        return 0
    if value < 1:
        raise ValueError(f"max_sessions must be >= 1, got {value}")
    return value


def _serve_config(
    a: argparse.Namespace,
    serve_cls: type[ServeConfig],
    stream_cls: type[StreamConfig],
) -> ServeConfig:
    """The ``serve`` section of the config tree from the flags."""
    viewer_token, control_token = _tokens(a)
    return serve_cls(
        host=a.host,
        viewer_token=viewer_token,
        control_token=control_token,
        no_auth=a.no_auth,
        allowed_origins=tuple(a.allow_origin),
        allowed_hosts=tuple(a.allow_host),
        connect_timeout_s=a.connect_timeout,
        port=a.port,
        max_sessions=_session_limit(a.max_sessions),
        max_viewers=a.max_viewers,
        idle_timeout_s=a.idle_timeout,
        image=a.image,
        landmarks=a.landmarks,
        ice_loopback_only=a.ice_loopback_only,
        stream=stream_cls(
            compute_budget_ms=a.compute_budget_ms,
            jitter_budget_ms=a.jitter_budget_ms,
            audio_lead_ms=a.audio_lead_ms,
        ),
    )


__all__ = ["add_parser"]
