"""The training config tree: one JSON (or TOML) file, loaded once by the CLI, passed down.

A config file holds a (possibly partial) :class:`TrainConfig` as nested objects; every key it
leaves out keeps its default, an unknown key is an error (a typo must not silently train the
wrong thing). ``--set section.key=value`` overrides single values from the command line, the
value parsed as JSON (``--set teacher.steps=50``, ``--set data.corpus='"corpora/me"'``).

Relative paths in a config are taken relative to the current working directory: the shipped
configs are meant to be run from the repository root.

Stages run in the order of :data:`STAGES`; ``TrainConfig.stages`` picks a subset:

* ``motion``: AudioToMotion on (mel window, speech landmarks), L1 + velocity.
* ``teacher``: the denoiser as an x0-predicting diffusion model at all timesteps.
* ``distill``: a 1-2 step student regressed onto the teacher's many-step DDIM output
  (and the ground-truth frame); see ``docs/decisions.md``.
* ``e2e``: motion and student together; the image loss reaches the motion model through the
  differentiable landmark tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from talkstream._config_io import apply_overrides as _apply_overrides
from talkstream._config_io import from_dict, read_config_file, to_dict
from talkstream.training.augment import AugmentConfig

__all__ = [
    "STAGES",
    "CorpusBuildConfig",
    "DataConfig",
    "DistillStageConfig",
    "E2EStageConfig",
    "MotionStageConfig",
    "TeacherStageConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_train_config",
]

STAGES: tuple[str, ...] = ("motion", "teacher", "distill", "e2e")


@dataclass(frozen=True)
class CorpusBuildConfig:
    """A synthetic corpus to build (``talkstream.training.synthetic.build_corpus``)."""

    image: str | None = None  # face photo; None: the bundled astronaut
    landmarks: str | None = None  # its 68 landmarks as JSON; None: bundled (default) or detect
    minutes: float = 8.0  # minutes of speech
    seed: int = 0
    # Minutes of speech for the motion stage alone: audio and landmarks, no frames rendered
    # (about 40x faster to make), built into RUN/motion_corpus with the same seed, so its
    # held-out sentences and voices are the same. None: the motion stage uses the corpus above.
    # AudioToMotion overfits 8 minutes; it needs the voice variety far more than frames do.
    motion_minutes: float | None = None


@dataclass(frozen=True)
class DataConfig:
    """Where the training clips come from: a synthetic corpus, real videos, or both."""

    corpus: str | None = None  # an existing corpus folder; None: build one into RUN/corpus
    build: CorpusBuildConfig | None = field(default_factory=CorpusBuildConfig)
    # An existing corpus for the motion stage alone (frames not needed); None: the one that
    # build.motion_minutes makes, else the main training data.
    motion_corpus: str | None = None
    videos: str | None = None  # a folder of talking-head mp4 files (with audio)
    video_cache: str | None = None  # their preprocessed cache; None: RUN/video_cache
    # Random level change of the audio per sample (+-dB, uniform): microphones differ.
    gain_jitter_db: float = 6.0
    # A folder of portrait photos (one person per file or per sub-folder): the renderer then
    # trains on every usable face in it (talking frames rendered on the fly from the corpus'
    # mouth motion), and the motion model on every face shape. None: the corpus' one face.
    faces: str | None = None
    faces_cache: str | None = None  # the aligned face set; None: RUN/faces
    faces_heldout: float = 0.05  # fraction of identities never trained on
    faces_max: int | None = None  # use only the first N photos (quick runs, tests)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class StageConfig:
    """Optimisation settings every stage has."""

    steps: int = 100
    batch: int = 16  # global batch (split over the processes of a multi-GPU run)
    lr: float = 1e-4
    warmup: int = 50  # linear warm-up steps, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    ema_decay: float = 0.0  # exponential moving average of the weights; 0 disables
    ckpt_every: int = 100  # steps between resumable checkpoints
    log_every: int = 10  # steps between loss-log lines


@dataclass(frozen=True)
class MotionStageConfig(StageConfig):
    steps: int = 1200
    batch: int = 48  # sequences; each holds seq_len consecutive frames
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seq_len: int = 4  # consecutive frames per sequence, for the velocity term
    velocity_weight: float = 1.0
    # Share of batches at the full trained lookahead; the rest draw one uniformly from
    # 0..lookahead_frames - 1, so a smaller lookahead at inference still works.
    full_lookahead_prob: float = 0.5


@dataclass(frozen=True)
class TeacherStageConfig(StageConfig):
    steps: int = 3400
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 150
    ema_decay: float = 0.998
    ckpt_every: int = 200
    mouth_weight: float = 4.0  # loss weight at the mouth relative to the rest of the crop


@dataclass(frozen=True)
class DistillStageConfig(StageConfig):
    steps: int = 500
    batch: int = 16
    lr: float = 2e-4
    warmup: int = 50
    ema_decay: float = 0.995
    teacher_steps: int = 25  # DDIM steps of the teacher's targets
    pool_size: int = 384  # (noise, landmarks) -> teacher output pairs, computed once
    student_steps: tuple[int, ...] = (1, 2)  # step counts the student is trained for
    teacher_weight: float = 1.0  # 0: no teacher (pure ground-truth regression, e.g. enrolment)
    gt_weight: float = 1.0
    l1_weight: float = 0.5  # L1 next to the MSE: sharper edges for a regression target
    mouth_weight: float = 4.0
    student_init: str = "teacher"  # "teacher" or "init" (the denoiser of TrainConfig.init)


@dataclass(frozen=True)
class E2EStageConfig(StageConfig):
    steps: int = 300
    batch: int = 16
    lr: float = 5e-5  # denoiser
    motion_lr: float = 1e-4
    warmup: int = 30
    ema_decay: float = 0.99
    motion_weight: float = 1.0  # landmark L1 (px) next to the image loss
    image_weight: float = 1.0
    l1_weight: float = 0.5
    mouth_weight: float = 4.0
    student_steps: tuple[int, ...] = (1,)
    full_lookahead_prob: float = 0.5


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``talkstream train`` needs."""

    preset: str = "tiny"  # architecture of both networks (engine presets)
    # Field overrides of the preset's MotionConfig / DenoiserConfig (tests, custom sizes).
    motion_arch: dict[str, Any] = field(default_factory=dict)
    denoiser_arch: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    out: str = "runs/default_tiny"  # run folder: state, stage checkpoints, loss log
    export: str | None = None  # also write the final checkpoint here
    init: str | None = None  # start from this checkpoint (its 'teacher/' too, if present)
    stages: tuple[str, ...] = STAGES
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    motion: MotionStageConfig = field(default_factory=MotionStageConfig)
    teacher: TeacherStageConfig = field(default_factory=TeacherStageConfig)
    distill: DistillStageConfig = field(default_factory=DistillStageConfig)
    e2e: E2EStageConfig = field(default_factory=E2EStageConfig)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; expected a subset of {list(STAGES)}")
        for name in STAGES:
            st = getattr(self, name)
            if st.steps < 0 or st.batch < 1 or st.ckpt_every < 1 or st.log_every < 1:
                raise ValueError(
                    f"{name}: steps must be >= 0, batch, ckpt_every and log_every >= 1 "
                    f"(got steps={st.steps}, batch={st.batch}, ckpt_every={st.ckpt_every}, "
                    f"log_every={st.log_every})"
                )
        for name in ("distill", "e2e"):
            steps = getattr(self, name).student_steps
            if not steps or any(not 1 <= k <= 4 for k in steps):
                raise ValueError(f"{name}.student_steps must be 1-4 each, got {steps}")
        if self.distill.student_init not in ("teacher", "init"):
            raise ValueError(
                f"distill.student_init must be 'teacher' or 'init', got "
                f"{self.distill.student_init!r}"
            )
        if self.distill.teacher_steps < 1:
            raise ValueError(
                f"distill.teacher_steps must be >= 1, got {self.distill.teacher_steps}"
            )
        b = self.data.build
        if b is not None and b.motion_minutes is not None and not b.motion_minutes > 0:
            raise ValueError(f"data.build.motion_minutes must be > 0, got {b.motion_minutes}")

    def stage(self, name: str) -> StageConfig:
        """The settings of stage ``name``."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; expected one of {list(STAGES)}")
        st: StageConfig = getattr(self, name)
        return st


# ----------------------------------------------------------------------------- (de)serialising
# The generic loader (talkstream._config_io) does the work; these keep the training names.


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from nested dicts; missing keys keep their defaults.

    Raises:
        ValueError: unknown keys, values of the wrong type, or invalid settings.
    """
    return from_dict(TrainConfig, data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready nested dict of a config dataclass (tuples become lists)."""
    return to_dict(cfg)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``section.key=value`` strings (value parsed as JSON, else taken as a string)."""
    return _apply_overrides(cfg, overrides)


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training config from a ``.json`` or ``.toml`` file.

    Raises:
        ValueError: unreadable file, bad syntax, unknown keys or bad values; names the file.
    """
    p = Path(path)
    data = read_config_file(p, "training config")
    try:
        cfg = config_from_dict(data)
        return apply_overrides(cfg, overrides) if overrides else cfg
    except ValueError as e:
        raise ValueError(f"training config {p}: {e}") from None
