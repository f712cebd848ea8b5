"""Training subcommands of ``talkstream``: ``train``, ``enroll``, ``eval``, ``corpus``,
``prepare-videos``.

Registered through :func:`add_parser` (``talkstream.cli.SUBCOMMAND_MODULES``). Building the
parsers imports nothing heavy: torch, the corpus generator and dlib load only when a command
runs, so ``talkstream --help`` stays instant. ``corpus`` is defined by
:func:`talkstream.training.synthetic.add_corpus_parser`; it is registered here as a thin
forwarder that builds that parser when the command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from talkstream.config import Config
from talkstream.errors import TalkstreamError

log = logging.getLogger(__name__)

_STAGE_CHOICES = ("motion", "teacher", "distill", "e2e", "all")

TRAIN_EPILOG = """\
examples:
  talkstream train --config configs/default_tiny.json            all stages, resumable
  talkstream train --config configs/default_tiny.json --stage teacher
  talkstream train --config my.json --set teacher.steps=200 --set data.corpus=corpora/me
  torchrun --nproc-per-node 4 -m talkstream.cli train --config my.json --device cuda
                                              one process per GPU; batch = global batch
"""


EVAL_EPILOG = """\
examples:
  talkstream eval --corpus runs/default_tiny/corpus                the corpus's held-out clips
  talkstream eval --faces ../shared/data/faces/bioguide --cache runs/default_tiny/faces
                                              24 held-out people + darker/painting/drawing
                                              copies + the astronaut; eval_faces.json and
                                              eval_faces_sheets/*.png
  talkstream eval --faces my_photos --split all --max-faces 8 --seconds 2
"""


def add_parser(
    sub: Any,
    add_engine_args: Callable[[argparse.ArgumentParser], None],
    engine_config: Callable[[argparse.Namespace], Any],
) -> None:
    """Register the training subcommands on the ``talkstream`` subparsers ``sub``."""
    del add_engine_args, engine_config  # training commands have their own model flags

    t = sub.add_parser(
        "train",
        help="train the models (motion, teacher, distilled student, end-to-end) from a config",
        description="Run the training stages of a JSON/TOML config: AudioToMotion, the "
        "denoiser teacher, its few-step student (distillation) and an end-to-end pass. "
        "Checkpoints every N steps; rerunning the same command resumes after a kill. "
        "Under torchrun each process trains on its share of every batch (DDP).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TRAIN_EPILOG,
    )
    t.add_argument("--config", type=Path, required=True, help="training config (.json or .toml)")
    t.add_argument(
        "--stage",
        nargs="+",
        choices=_STAGE_CHOICES,
        default=None,
        help="stages to run (default: those of the config; 'all' = every stage)",
    )
    t.add_argument("--out", type=Path, default=None, help="run folder (overrides 'out')")
    t.add_argument(
        "--faces",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of portrait photos (one person per file or sub-folder): train the renderer "
        "on every usable face (overrides 'data.faces'; e.g. shared/data/faces/bioguide)",
    )
    t.add_argument("--export", type=Path, default=None, help="also write the final checkpoint here")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. teacher.steps=200 (value parsed as JSON)",
    )
    t.add_argument("--device", default=None, help="torch device (overrides 'device')")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser(
        "enroll",
        help="fine-tune the default model for your own photo",
        description="Build a synthetic talking corpus for the photo and fine-tune the default "
        "checkpoint on it. Resumable: rerun the same command after an interruption. The "
        "result is OUT/final; render with: talkstream render --checkpoint OUT/final --image "
        "PHOTO.",
    )
    e.add_argument("--image", type=Path, required=True, help="face photo (jpg/png)")
    e.add_argument(
        "--landmarks", type=Path, default=None, help="JSON with the photo's 68 landmarks"
    )
    e.add_argument("--minutes", type=float, default=2.0, help="minutes of speech (2.0)")
    e.add_argument("--out", type=Path, default=Path("enrolled"), help="run folder (enrolled)")
    e.add_argument(
        "--init", type=Path, default=None, help="checkpoint to start from (default: shipped)"
    )
    e.add_argument("--preset", default="tiny", help="preset of the shipped checkpoint (tiny)")
    e.add_argument("--steps", type=int, default=500, help="fine-tuning steps (500)")
    e.add_argument("--batch", type=int, default=16, help="batch size (16)")
    e.add_argument("--seed", type=int, default=0, help="random seed (0)")
    e.add_argument("--config", type=Path, default=None, help="a full training config instead")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    e.add_argument("--device", default="cpu", help="torch device (cpu)")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=_cmd_enroll)

    v = sub.add_parser(
        "eval",
        help="measure a checkpoint on a corpus's held-out split, or on held-out faces",
        description="--corpus: LMD of AudioToMotion, PSNR/SSIM of the student and the teacher, "
        "lip sync measured by dlib on rendered frames against the phoneme-derived mouth "
        "opening, detector hit rate and flicker on silence vs speech. --faces: the engine "
        "animates held-out people of a photo folder (plus recoloured, painted and drawn "
        "copies and the astronaut); per face and per group: dlib identity distance to the "
        "photo, lip sync r, detection rate, PSNR outside the mouth, flicker; one contact "
        "sheet per face. Prints a table, writes JSON.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EVAL_EPILOG,
    )
    what = v.add_mutually_exclusive_group(required=True)
    what.add_argument("--corpus", type=Path, help="corpus folder (talkstream corpus)")
    what.add_argument(
        "--faces",
        type=Path,
        metavar="DIR",
        help="folder of portrait photos (as for train --faces): evaluate held-out identities",
    )
    v.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint (default: the shipped one)"
    )
    v.add_argument("--preset", default="tiny", help="preset of the shipped checkpoint (tiny)")
    v.add_argument(
        "--teacher", type=Path, default=None, help="teacher checkpoint (default CHECKPOINT/teacher)"
    )
    v.add_argument(
        "--split",
        default="heldout",
        help="corpus split, or face-set split for --faces: heldout, train or all (heldout)",
    )
    v.add_argument(
        "--student-steps", type=int, nargs="+", default=[1, 2], help="student steps (1 2)"
    )
    v.add_argument("--teacher-steps", type=int, default=25, help="teacher DDIM steps (25)")
    v.add_argument("--max-clips", type=int, default=None, help="use at most this many clips")
    v.add_argument(
        "--max-frames", type=int, default=None, help="render at most this many frames per model"
    )
    v.add_argument("--seed", type=int, default=0, help="session noise seed (0)")
    v.add_argument("--batch", type=int, default=16, help="frames per denoiser call (16)")
    v.add_argument("--device", default="cpu", help="torch device (cpu)")
    v.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (--faces: 1 unless given)"
    )
    v.add_argument("--no-lip-sync", action="store_true", help="skip the dlib measurements")
    v.add_argument(
        "--out", type=Path, default=None, help="JSON output (eval.json; eval_faces.json)"
    )
    f = v.add_argument_group("--faces options")
    f.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="the face set's cache (e.g. runs/default_tiny/faces; built there if absent); "
        "default: detect only the held-out photos picked",
    )
    f.add_argument("--max-faces", type=int, default=24, help="held-out faces to animate (24)")
    f.add_argument("--seconds", type=float, default=3.0, help="seconds of speech per sentence (3)")
    f.add_argument("--sentences", type=int, default=2, help="held-out sentences per face (2)")
    f.add_argument(
        "--styled",
        type=int,
        default=None,
        help="faces per darker/painting/drawing group (default: max-faces / 4, 1 to 3)",
    )
    f.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="contact sheets and generated inputs (default: next to --out, *_sheets)",
    )
    f.add_argument(
        "--meta", type=Path, default=None, help="CSV file,name,born (default: DIR.csv if present)"
    )
    f.add_argument(
        "--identity-frames", type=int, default=12, help="frames per face for identity (12)"
    )
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=_cmd_eval)

    # `corpus` belongs to the corpus generator; forward to its own parser when it runs, so
    # importing the generator (and torch) is not paid by every `talkstream --help`.
    c = sub.add_parser(
        "corpus",
        help="build a synthetic talking corpus (espeak-ng speech + rendered face) for training",
        add_help=False,
        prefix_chars="\0",  # every argument goes to the forwarded parser, --help included
    )
    c.add_argument("corpus_args", nargs=argparse.REMAINDER)
    c.set_defaults(func=_cmd_corpus)

    pv = sub.add_parser(
        "prepare-videos",
        help="preprocess a folder of talking-head videos into a training cache",
        description="Extract 16 kHz audio, 25 fps aligned face crops and 68 landmarks (dlib) "
        "from every video with audio under VIDEOS; resumable. Train on the result with "
        "data.corpus=CACHE (or data.videos=VIDEOS, which runs this step itself).",
    )
    pv.add_argument("--videos", type=Path, required=True, help="folder of mp4/mov/mkv/webm")
    pv.add_argument("--cache", type=Path, required=True, help="output folder")
    pv.add_argument("--crop-size", type=int, default=128, help="crop side in pixels (128)")
    pv.add_argument("--heldout", type=float, default=0.1, help="share of videos held out (0.1)")
    pv.add_argument("--no-progress", action="store_true", help="no progress bar")
    pv.set_defaults(func=_cmd_prepare_videos)


# ----------------------------------------------------------------------------- handlers


def _config_error(e: ValueError) -> TalkstreamError:
    return e if isinstance(e, TalkstreamError) else TalkstreamError(str(e))


def _cmd_train(a: argparse.Namespace) -> int:
    from talkstream.training.config import load_train_config
    from talkstream.training.loop import DistInfo
    from talkstream.training.trainer import train

    overrides = list(a.set)
    if a.stage:
        stages = ["motion", "teacher", "distill", "e2e"] if "all" in a.stage else a.stage
        overrides.append(f"stages={json.dumps(stages)}")
    if a.out is not None:
        overrides.append(f"out={json.dumps(str(a.out))}")
    if a.faces is not None:
        if not a.faces.is_dir():
            print(f"error: --faces {a.faces}: no such folder", file=sys.stderr)
            return 2
        overrides.append(f"data.faces={json.dumps(str(a.faces))}")
    if a.export is not None:
        overrides.append(f"export={json.dumps(str(a.export))}")
    if a.device is not None:
        overrides.append(f"device={json.dumps(a.device)}")
    if a.threads is not None:
        overrides.append(f"threads={a.threads}")
    if a.no_progress:
        overrides.append("progress=false")
    try:
        # The config tree, built once: this command fills only its train section (which holds
        # its own preset and device: what is trained, and where).
        root = Config(train=load_train_config(a.config, overrides))
    except ValueError as e:
        raise _config_error(e) from None
    assert root.train is not None
    # torchrun's variables are read here, at the entry point, and passed down.
    dist = DistInfo.from_env(os.environ)
    res = train(root.train, dist)
    if dist.is_main:
        for stage, s in res.stages.items():
            losses = ", ".join(f"{k} {v:.4g}" for k, v in s["losses"].items())
            print(f"{stage}: {s['steps']} steps in {s['wall_s']:.0f} s ({losses})")
        where = res.exported or res.final
        print(f"done in {res.wall_s:.0f} s; checkpoint: {where}; loss log: {res.run_dir}/log.jsonl")
    return 0


def _cmd_enroll(a: argparse.Namespace) -> int:
    import time

    from talkstream.engine.pipeline import default_checkpoint
    from talkstream.training.config import apply_overrides, load_train_config
    from talkstream.training.enroll import EnrollConfig, enroll_train_config, with_run_settings
    from talkstream.training.loop import DistInfo
    from talkstream.training.trainer import train

    t0 = time.perf_counter()
    ecfg = EnrollConfig(
        image=a.image,
        out=a.out,
        landmarks=a.landmarks,
        minutes=a.minutes,
        init=a.init,
        steps=a.steps,
        batch=a.batch,
        seed=a.seed,
        device=a.device,
        threads=a.threads,
        progress=not a.no_progress,
    )
    if not a.image.is_file():
        raise TalkstreamError(f"image file not found: {a.image}")
    try:
        if a.config is not None:
            cfg = with_run_settings(load_train_config(a.config), ecfg)
        else:
            cfg = enroll_train_config(ecfg, default_checkpoint(a.preset))
        if a.set:
            cfg = apply_overrides(cfg, a.set)
        root = Config(train=cfg)  # the config tree, built once: its train section
    except ValueError as e:
        raise _config_error(e) from None
    assert root.train is not None
    res = train(root.train, DistInfo.from_env(os.environ))
    print(
        f"enrolled {a.image} in {time.perf_counter() - t0:.0f} s; checkpoint: {res.final}\n"
        f"render: talkstream render --checkpoint {res.final} --image {a.image}"
        + (f" --landmarks {a.landmarks}" if a.landmarks else "")
    )
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    import torch

    from talkstream.engine.pipeline import default_checkpoint
    from talkstream.training.evaluate import EvalConfig, evaluate, format_table

    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if a.faces is not None:
        return _cmd_eval_faces(a)
    if a.out is None:
        a.out = Path("eval.json")
    ckpt = a.checkpoint or default_checkpoint(a.preset)
    if ckpt is None:
        raise TalkstreamError(
            f"no checkpoint given and none shipped for preset {a.preset!r}: pass --checkpoint"
        )
    cfg = EvalConfig(
        checkpoint=ckpt,
        corpus=a.corpus,
        teacher=a.teacher,
        split=a.split,
        student_steps=tuple(a.student_steps),
        teacher_steps=a.teacher_steps,
        max_clips=a.max_clips,
        max_frames=a.max_frames,
        seed=a.seed,
        batch=a.batch,
        device=a.device,
        lip_sync=not a.no_lip_sync,
    )
    res = evaluate(cfg)
    print(format_table(res))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(res.to_json() + "\n")
    print(f"wrote {a.out}")
    return 0


def _cmd_eval_faces(a: argparse.Namespace) -> int:
    from talkstream.training.face_eval import FaceEvalConfig, evaluate_faces, format_faces_table

    if a.max_faces < 0:
        raise TalkstreamError(f"--max-faces must be >= 0, got {a.max_faces}")
    if a.sentences < 1:
        raise TalkstreamError(f"--sentences must be >= 1, got {a.sentences}")
    if not a.faces.is_dir():
        raise TalkstreamError(f"--faces {a.faces}: no such folder")
    if a.cache is not None and a.cache.exists() and not a.cache.is_dir():
        raise TalkstreamError(f"--cache {a.cache} is a file, not a folder")
    if a.meta is not None and not a.meta.is_file():
        raise TalkstreamError(f"--meta {a.meta}: no such file")
    out = a.out if a.out is not None else Path("eval_faces.json")
    out_dir = a.out_dir if a.out_dir is not None else out.with_name(out.stem + "_sheets")
    cfg = FaceEvalConfig(
        faces=a.faces,
        cache=a.cache,
        checkpoint=a.checkpoint,
        preset=a.preset,
        split=a.split,
        max_faces=a.max_faces,
        styled=a.styled,
        seconds=a.seconds,
        sentences=a.sentences,
        meta=a.meta,
        out_dir=out_dir,
        identity_frames=a.identity_frames,
        seed=a.seed,
        device=a.device,
        threads=a.threads if a.threads is not None else 1,
        progress=not a.no_progress,
    )
    res = evaluate_faces(cfg)
    print(format_faces_table(res))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(res.to_json() + "\n")
    sheets = sum(1 for r in res.faces if r.get("sheet"))
    print(f"wrote {out}; {sheets} contact sheets in {out_dir}")
    return 0


def _cmd_corpus(a: argparse.Namespace) -> int:
    from talkstream.training import synthetic

    add = getattr(synthetic, "add_corpus_parser", None)
    if add is None:
        raise TalkstreamError("this talkstream has no corpus generator")
    parser = argparse.ArgumentParser(prog="talkstream")
    add(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["corpus", *a.corpus_args])
    return int(ns.func(ns))


def _cmd_prepare_videos(a: argparse.Namespace) -> int:
    from talkstream.config import AvatarConfig
    from talkstream.training.video import VideoPrepConfig, preprocess_videos

    cfg = VideoPrepConfig(avatar=AvatarConfig(crop_size=a.crop_size), heldout_fraction=a.heldout)
    res = preprocess_videos(a.videos, a.cache, cfg, progress=not a.no_progress)
    print(
        f"{res.clips} clips in {res.cache_dir} ({res.reused} reused, {len(res.skipped)} skipped) "
        f"in {res.wall_s:.0f} s"
    )
    for name, why in res.skipped:
        print(f"  skipped {name}: {why}")
    return 0
