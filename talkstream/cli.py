"""The ``talkstream`` command.

The config tree is built here, once, from argv and the environment, and passed down; no module
below reads either. User errors (``TalkstreamError``) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from talkstream import __version__
from talkstream.config import (
    CRF_RANGE,
    FRAMINGS,
    AvatarConfig,
    Config,
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
  talkstream landmarks me.jpg --out me.json                   save the face's 68 landmarks
  talkstream render --landmarks me.json --image me.jpg ...   skip detection (68 iBUG points)
  talkstream render --image me.jpg --framing portrait         480x640 around the face
"""


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (cause, and where the options are listed)
    instead of the whole usage block; subcommands' parsers are made of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--threads 0`` is refused by argparse, not by torch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


# libx264's CRF scale for 8-bit video: 0 is lossless, 51 the worst.


def crf_value(text: str) -> int:
    """argparse type: an H.264 CRF in ``CRF_RANGE``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    lo, hi = CRF_RANGE
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(
            f"{value} is outside H.264's range {lo}-{hi} (lower is better; 18-28 is usual)"
        )
    return value


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
    g.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: 1 on a 2-core machine, else torch's, one per "
        "physical core); idle threads sleep rather than spin (OMP_WAIT_POLICY=PASSIVE), so "
        "other busy programs slow a render down instead of stalling it",
    )
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
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="set any value of the config tree, after the other flags (repeatable; the value "
        "is parsed as JSON), e.g. engine.sampler.steps=2, serve.stream.compute_budget_ms=60, "
        "render.crf=18; an unknown key is answered with the keys its section has",
    )


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


def check_device(device: str) -> None:
    """Raise ``TalkstreamError`` unless ``--device`` names a device this machine has."""
    if device == "cpu":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise TalkstreamError(
            f"--device {device!r} is not a device name; use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch is a CPU-only build"
                if torch.version.cuda is None
                else "no CUDA GPU (or no working NVIDIA driver) is visible"
            )
            raise TalkstreamError(
                f"--device {device}: {why}; use --device cpu (the default), or see "
                "`talkstream doctor` for what this machine has"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise TalkstreamError(
                f"--device {device}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}"
            )
    elif dev.type != "cpu":
        raise TalkstreamError(f"--device {device}: talkstream runs on cpu or cuda")


def check_backend(name: str, device: str, dtype: str) -> None:
    """Raise ``TalkstreamError`` unless ``--backend name`` can run on ``device`` here."""
    if name == "auto":
        return
    from talkstream.export.backends import get_backend

    ok, why = get_backend(name).available(device, dtype)
    if not ok:
        raise TalkstreamError(
            f"--backend {name} cannot run here: {why}. Use --backend auto (the fastest one "
            "that can) or torch; `talkstream doctor` lists what runs on this machine"
        )


# On 2 cores one thread renders fastest idle (49.6 fps against 30.5 with two passive threads;
# the second core encodes and pastes meanwhile) and beside two busy processes (27.2 vs 19.0
# fps), with no barrier to stall at (benchmarks/busy_machine.py, docs/decisions.md). Larger
# machines keep torch's count; their idle threads sleep (OMP_WAIT_POLICY=PASSIVE, see main).
def default_threads(device: str) -> int | None:
    """The ``--threads`` default of the commands in ``BUSY_AWARE_COMMANDS``."""
    if device != "cpu":
        return None
    return 1 if (os.cpu_count() or 1) <= 2 else None


def _engine_config(a: argparse.Namespace) -> EngineConfig:
    command = getattr(a, "command", None)
    if command != "doctor":  # doctor reports on any device, usable or not
        check_device(a.device)
        check_backend(getattr(a, "engine_backend", "torch"), a.device, a.dtype)
    threads = a.threads
    if threads is None and command in BUSY_AWARE_COMMANDS:
        threads = default_threads(a.device)
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
        threads=threads,
        avatar=avatar,
        idle=IdleConfig(enabled=not a.no_idle),
        sampler=SamplerConfig(steps=a.steps, seed=a.seed),
        lookahead_frames=a.lookahead,
        backend=getattr(a, "engine_backend", "torch"),
    )


def _cmd_render(a: argparse.Namespace) -> int:
    from talkstream.engine.render import render_to_file
    from talkstream.runtime import load_engine

    # The config tree, built once: the engine section and this command's render section.
    cfg = Config(
        engine=_engine_config(a),
        render=RenderConfig(
            out=a.out,
            image=a.image,
            audio=a.audio,
            landmarks=a.landmarks,
            crf=a.crf,
            progress=not a.no_progress,
        ),
    )
    res = render_to_file(cfg.with_command_overrides(a.set, "render"), load_engine)
    note = " (random weights: no trained checkpoint)" if res.random_init else ""
    print(
        f"wrote {res.out}: {res.frames} frames, {res.audio_duration_s:.2f} s of audio, "
        f"rendered in {res.wall_s:.1f} s ({res.fps:.1f} fps){note}"
    )
    return 0


def _cmd_landmarks(a: argparse.Namespace) -> int:
    from talkstream.engine.avatar import load_photo, locate_face, scale_points_from_reduced
    from talkstream.engine.landmarks import save_landmarks_json
    from talkstream.engine.render import output_mode

    out: Path = a.out if a.out is not None else a.image.with_suffix(".landmarks.json")
    if out.is_dir():
        raise TalkstreamError(f"--out {out} is a directory; give a file name such as face.json")
    # The photo as render and serve will read it (reduced when very large); detection on a
    # copy of at most detect_max_side pixels, as there.
    cfg = AvatarConfig()
    image, k = load_photo(a.image, cfg)
    # The verdict is reported, not enforced: the file is what --landmarks takes, also for a
    # photo that needs --force.
    face = locate_face(image, cfg, source_name=str(a.image), enforce=False)
    points = scale_points_from_reduced(face.points, k)  # (68, 2) in the photo's own pixels
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_landmarks_json(tmp, points)
        os.chmod(tmp, output_mode(out))
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TalkstreamError(
            f"cannot write {out}: {e.strerror or e}; choose --out in a folder you can write to"
        ) from None
    score = f", detector score {face.score:.2f}" if face.score is not None else ""
    print(f"wrote {out}: the 68 landmarks of the face in {a.image} ({face.detector}{score})")
    if not face.check.ok:
        print(
            f"note: {face.check.message}; {face.check.advice} (render and serve refuse this "
            "face unless given --force)"
        )
    print(f"use it with: talkstream render --image {a.image} --landmarks {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
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
    r.add_argument(
        "--crf",
        type=crf_value,
        default=20,
        help="H.264 quality, 0-51, lower is better (20)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_engine_args(r)
    r.set_defaults(func=_cmd_render)

    lm = sub.add_parser(
        "landmarks",
        help="detect the face in a photo and save its 68 landmarks (for --landmarks)",
        description="Detect the face in a photo (dlib, the [detect] extra) and save its 68 "
        "iBUG landmarks as JSON, in the photo's own pixels: the file render, serve and live "
        "take with --landmarks, to skip detection or to correct it by hand.",
    )
    lm.add_argument("image", type=Path, help="face photo (jpg/png...)")
    lm.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file to write (default: beside the photo, PHOTO.landmarks.json)",
    )
    lm.set_defaults(func=_cmd_landmarks)

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
    "talkstream.publish.cli",  # issue 13: publish into an SFU (WHIP / Janus)
)


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so that ``finally`` blocks remove temp files."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While inside, SIGTERM raises ``Terminated`` in the main thread instead of killing the
    process outright (which would leave a render's ``tmpXXXX.mp4`` behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        # A second SIGTERM during the clean-up must not cut the clean-up short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Commands that may run beside other programs on a user's machine: OpenMP's idle threads sleep
# (OMP_WAIT_POLICY=PASSIVE, see main) and the thread count is default_threads. bench, export and
# doctor keep torch's and OpenMP's defaults, so that their figures stay comparable with earlier
# runs.
BUSY_AWARE_COMMANDS = ("render", "serve", "live", "landmarks", "train", "enroll")
# Commands whose SIGTERM unwinds (they write files through a temporary name).
_SIGTERM_COMMANDS = ("render", "landmarks")


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
    if args.command in BUSY_AWARE_COMMANDS and "torch" not in sys.modules:
        # OpenMP's default waits by spinning at every barrier: beside other busy processes a
        # spinning thread holds a core while the one it waits for is not scheduled. With two
        # busy loops on 2 cores a 2-thread render fell to 3-10 fps that way, and kept 18-19
        # with passive waiting (benchmarks/busy_machine.py; a training step: 0.99 s vs 0.57 s,
        # docs/decisions.md). Set before torch loads OpenMP, unless the environment says
        # otherwise.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        if args.command in _SIGTERM_COMMANDS:
            with _sigterm_unwinds():
                return int(args.func(args))
        return int(args.func(args))
    except TalkstreamError as e:
        print(f"talkstream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("talkstream: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("talkstream: terminated (SIGTERM); no partial output was left", file=sys.stderr)
        return 128 + signal.SIGTERM
    except OSError as e:
        if args.command == "serve" and e.errno in _BIND_ERRNOS:
            # The port was taken between serve's own check and the server's bind.
            from talkstream.streaming.bind import bind_error

            print(f"talkstream: error: {bind_error(e, args.host, args.port)}", file=sys.stderr)
            return 2
        raise


# Only these: any other OSError of serve (a cache folder, a file) is not about the address.
_BIND_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL)


if __name__ == "__main__":
    sys.exit(main())
