"""``talkstream enroll``: make a user's photo speak with a model fine-tuned for that face.

Enrolment is a short training run (see :mod:`talkstream.training.trainer`) with its own run
folder, so it shows progress and resumes after a kill like any other:

1. a synthetic corpus of the photo (:func:`talkstream.training.synthetic.build_corpus`): the
   photo's crop warped onto espeak-driven lip and jaw motion, with a drawn mouth interior;
2. the few-step student of the default checkpoint, fine-tuned on that corpus at the step counts
   the engine runs (``distill`` with ``teacher_weight = 0``: ground-truth regression, no
   teacher needed, because the corpus pairs every landmark set with its true frame);
3. a short end-to-end pass (motion + student), so the motion model adapts to the new face's
   neutral landmarks too.

The result is ``OUT/final`` (a normal checkpoint): ``talkstream render --checkpoint OUT/final
--image me.jpg``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from talkstream.errors import TalkstreamError
from talkstream.training.config import (
    CorpusBuildConfig,
    DataConfig,
    DistillStageConfig,
    E2EStageConfig,
    TrainConfig,
)

__all__ = ["EnrollConfig", "enroll_train_config"]


@dataclass(frozen=True)
class EnrollConfig:
    """The knobs of ``talkstream enroll``."""

    image: Path
    out: Path
    landmarks: Path | None = None
    minutes: float = 2.0  # minutes of synthetic speech for the photo
    init: Path | None = None  # default: the shipped checkpoint of the preset
    steps: int = 500  # student fine-tuning steps; the end-to-end pass runs half as many
    batch: int = 16
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True


def enroll_train_config(cfg: EnrollConfig, default_init: Path | None) -> TrainConfig:
    """The :class:`TrainConfig` of an enrolment run.

    Raises:
        TalkstreamError: no init checkpoint (none given and none shipped).
    """
    init = cfg.init or default_init
    if init is None:
        raise TalkstreamError(
            "enrolment fine-tunes a trained model, and no default checkpoint is installed: "
            "train one (talkstream train --config configs/default_tiny.json) or pass --init"
        )
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    e2e_steps = max(cfg.steps // 2, 1)
    return TrainConfig(
        out=str(cfg.out),
        init=str(init),
        seed=cfg.seed,
        stages=("distill", "e2e"),
        device=cfg.device,
        threads=cfg.threads,
        progress=cfg.progress,
        data=DataConfig(
            corpus=None,
            build=CorpusBuildConfig(
                image=str(cfg.image),
                landmarks=str(cfg.landmarks) if cfg.landmarks is not None else None,
                minutes=cfg.minutes,
                seed=cfg.seed,
            ),
        ),
        distill=DistillStageConfig(
            steps=cfg.steps,
            batch=cfg.batch,
            lr=1e-4,
            warmup=min(20, cfg.steps),
            ema_decay=0.99,
            teacher_weight=0.0,
            student_init="init",
            student_steps=(1, 2),
            ckpt_every=50,
        ),
        e2e=E2EStageConfig(
            steps=e2e_steps,
            batch=cfg.batch,
            warmup=min(10, e2e_steps),
            ckpt_every=50,
        ),
    )


def with_run_settings(cfg: TrainConfig, enroll: EnrollConfig) -> TrainConfig:
    """A user's enrolment config file, with the photo, output and init of the command line."""
    data = replace(
        cfg.data,
        corpus=None,
        build=CorpusBuildConfig(
            image=str(enroll.image),
            landmarks=str(enroll.landmarks) if enroll.landmarks is not None else None,
            minutes=enroll.minutes,
            seed=enroll.seed,
        ),
    )
    return replace(cfg, out=str(enroll.out), data=data)
