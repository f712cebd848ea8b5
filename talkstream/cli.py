"""The ``talkstream`` command.

The config tree is built here, once, from argv and the environment, and passed down; no module
below reads either. User errors (``TalkstreamError``) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from talkstream import __version__
from talkstream.config import (
    FRAMINGS,
    AvatarConfig,
    EngineConfig,
    IdleConfig,
    RenderConfig,
    SamplerConfig,
)
from talkstream.errors import TalkstreamError

log = logging.getLogger("talkstream")

EPILOG = """\
examples:
  talkstream render                                 the default face says the bundled sentence
  talkstream render --image me.jpg --audio hi.wav --out hi.mp4
  talkstream render --landmarks me.json --image me.jpg ...   skip detection (68 iBUG points)
  talkstream render --image me.jpg --framing portrait         480x640 around the face
"""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "talkstream"


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--preset",
        default="tiny",
        choices=["tiny", "base"],
        help="model size: tiny (CPU real time, 128px face) or base (GPU, 256px)",
    )
    g.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint directory (config.json + model.safetensors); "
        "default: the trained model shipped for the preset",
    )
    g.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    g.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="denoiser precision (default float32)",
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    try:  # noqa: SIM105 - the comment in the except says why it passes
        g.add_argument(
            "--backend",
            dest="engine_backend",
            default="torch",
            # talkstream.export.backends.backend_names(), spelled out so that parsing argv does
            # not import torch (a test keeps the two lists equal).
            choices=["torch", "compiled", "onnxruntime", "tensorrt", "auto"],
            help="what runs motion + denoiser (default torch; serve: auto); auto: the fastest "
            "available here, see `talkstream doctor`",
        )
    except argparse.ArgumentError:
        # The subcommand defines its own --backend (bench compares several) and reads it
        # itself; its engine config keeps the default.
        pass
    g.add_argument(
        "--steps",
        type=int,
        default=1,
        choices=[1, 2, 3, 4],
        help="denoiser sampling steps (default 1)",
    )
    g.add_argument("--seed", type=int, default=0, help="noise seed (fixed per session)")
    g.add_argument(
        "--lookahead",
        type=int,
        default=None,
        help="audio lookahead in video frames (40 ms each); default: the model's",
    )
    g.add_argument("--no-idle", action="store_true", help="no blinks or head sway")
    g.add_argument(
        "--cache-dir", type=Path, default=None, help=f"avatar cache (default {default_cache_dir()})"
    )
    g.add_argument("--no-cache", action="store_true", help="do not cache prepared avatars")


def _framing_help() -> str:
    default = AvatarConfig.framing
    sizes = ", ".join(
        f"{k} {v[0]}x{v[1]}" + (" (default)" if k == default else "")
        for k, v in FRAMINGS.items()
        if v is not None
    )
    return (
        f"output frame cut around the face, the face ~40%% of its height: {sizes}; full: the "
        "whole photo at its own size (a phone photo is too large to encode at 25 fps)"
    )


def add_photo_args(p: argparse.ArgumentParser) -> None:
    """``--framing`` and ``--force``: how a photo becomes the output frame (render, serve, live).

    Read by :func:`_engine_config` into ``AvatarConfig``.
    """
    p.add_argument(
        "--framing",
        choices=list(FRAMINGS),
        default=AvatarConfig.framing,
        help=_framing_help(),
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="animate a face the photo check refuses (turned to the side, tilted, tiny, mouth "
        "covered) instead of stopping; expect a distorted face",
    )


def _engine_config(a: argparse.Namespace) -> EngineConfig:
    cache = None if a.no_cache else (a.cache_dir or default_cache_dir())
    avatar = AvatarConfig(
        cache_dir=cache,
        framing=getattr(a, "framing", AvatarConfig.framing),
        check_quality=not getattr(a, "force", False),
    )
    return EngineConfig(
        preset=a.preset,
        checkpoint=a.checkpoint,
        device=a.device,
        dtype=a.dtype,
        threads=a.threads,
        avatar=avatar,
        idle=IdleConfig(enabled=not a.no_idle),
        sampler=SamplerConfig(steps=a.steps, seed=a.seed),
        lookahead_frames=a.lookahead,
        backend=getattr(a, "engine_backend", "torch"),
    )


def _cmd_render(a: argparse.Namespace) -> int:
    from talkstream.engine.render import render_to_file

    cfg = RenderConfig(
        out=a.out,
        image=a.image,
        audio=a.audio,
        landmarks=a.landmarks,
        crf=a.crf,
        progress=not a.no_progress,
        engine=_engine_config(a),
    )
    res = render_to_file(cfg)
    note = " (random weights: no trained checkpoint)" if res.random_init else ""
    print(
        f"wrote {res.out}: {res.frames} frames, {res.audio_duration_s:.2f} s of audio, "
        f"rendered in {res.wall_s:.1f} s ({res.fps:.1f} fps){note}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="talkstream",
        description="Real-time talking-avatar engine: speech in, a lip-synced face out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--version", action="version", version=f"talkstream {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser(
        "render",
        help="render a talking-face video from an image and a speech file",
        description="Render an H.264 mp4 at 25 fps of a face speaking an audio file; the audio "
        "is muxed in. With no arguments the bundled face says the bundled sentence.",
    )
    r.add_argument(
        "--image",
        type=Path,
        default=None,
        help="face photo (jpg/png...); default: scikit-image's astronaut",
    )
    r.add_argument(
        "--landmarks",
        type=Path,
        default=None,
        help="JSON with the photo's 68 iBUG landmarks, instead of detecting them",
    )
    r.add_argument(
        "--audio",
        type=Path,
        default=None,
        help="speech file (wav/flac/ogg, any rate); default: the bundled sentence",
    )
    add_photo_args(r)
    r.add_argument("--out", type=Path, default=Path("out.mp4"), help="output video (out.mp4)")
    r.add_argument("--crf", type=int, default=20, help="H.264 quality, lower is better (20)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_engine_args(r)
    r.set_defaults(func=_cmd_render)

    # Other commands live beside their code; each module has a light ``add_parser(sub,
    # add_engine_args, engine_config)`` that imports its heavy dependencies only when run.
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_parser(sub, _add_engine_args, _engine_config)
    return p


# Modules that register a subcommand (see build_parser).
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "talkstream.streaming.live",
    "talkstream.streaming.cli",
    "talkstream.benchmarking.cli",
    "talkstream.training.cli",
    "talkstream.export.cli",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command in ("train", "enroll") and "torch" not in sys.modules:
        # Training shares the CPU with its own data process (and whatever else runs): OpenMP's
        # default of spinning at every barrier made a 2-thread step 1.7x slower beside one busy
        # process (0.99 s vs 0.57 s, docs/decisions.md). Set before torch loads OpenMP.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return int(args.func(args))
    except TalkstreamError as e:
        print(f"talkstream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("talkstream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
