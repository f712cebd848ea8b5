"""``talkstream train``: the four training stages and the checkpoint they produce.

:func:`train` runs the stages of a :class:`~talkstream.training.config.TrainConfig` in order
(motion, teacher, distill, e2e), each resumable (see :mod:`talkstream.training.loop`). A
finished stage leaves an engine checkpoint in ``RUN/stages/<stage>/``; later stages start from
those, so a stage can also be run on its own (``--stage teacher``). At the end the run writes
``RUN/final/`` (AudioToMotion + the few-step student, what the engine loads), with the teacher
beside it in ``RUN/final/teacher/`` (for evaluation), and copies both to ``TrainConfig.export``.

Run folder::

    RUN/config.json          the resolved config of the first run (data and seed must match
                             on resume)
    RUN/log.jsonl            one line per logged step: stage, step, lr, losses, samples/s
    RUN/corpus/              the synthetic corpus, when the config builds one
    RUN/state/<stage>/       resumable state (weights, optimizer, step)
    RUN/stages/<stage>/      the stage's checkpoint, once it finished
    RUN/final/               the result
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from talkstream import __version__
from talkstream.config import AudioConfig, AvatarConfig, SamplerConfig
from talkstream.engine.checkpoint import Models, load_checkpoint, save_checkpoint
from talkstream.engine.denoiser import DenoiserConfig, TalkFormerDenoiser
from talkstream.engine.motion import AudioToMotion, MotionConfig
from talkstream.engine.sampler import FewStepSampler, NoiseSchedule
from talkstream.errors import TalkstreamError
from talkstream.training.config import (
    STAGES,
    E2EStageConfig,
    MotionStageConfig,
    TeacherStageConfig,
    TrainConfig,
    config_to_dict,
)
from talkstream.training.dataset import FrameBatch, TrainData, concat_datasets, load_dataset
from talkstream.training.distill import (
    StudentTask,
    build_pool,
    distill_inputs,
    select_reference,
)
from talkstream.training.faces import FaceSet, FaceSetConfig, build_face_set
from talkstream.training.loop import DistInfo, StageContext, StepRandom, run_stage
from talkstream.training.losses import image_loss, motion_loss, mouth_weight_map
from talkstream.training.talking import AnyFaceMotion, Prefetcher, TalkingFaces

log = logging.getLogger(__name__)

__all__ = [
    "DiffusionTask",
    "EndToEndTask",
    "MotionTask",
    "Nets",
    "TrainResult",
    "motion_corpus_dir",
    "pick_lookahead",
    "prepare_data",
    "prepare_motion_data",
    "train",
]

TEACHER_DIR = "teacher"  # sub-folder of an exported checkpoint holding the teacher


# ----------------------------------------------------------------------------- tasks


def pick_lookahead(rng: np.random.Generator, max_lookahead: int, full_prob: float) -> int:
    """The lookahead of one batch: the maximum with ``full_prob``, else uniform below it."""
    if max_lookahead == 0 or rng.random() < full_prob:
        return max_lookahead
    return int(rng.integers(0, max_lookahead))


class MotionTask(nn.Module):
    """AudioToMotion: L1 + velocity on the jaw and lip displacements."""

    def __init__(self, motion: AudioToMotion, cfg: MotionStageConfig, crop_size: int) -> None:
        super().__init__()
        self.motion = motion
        self.cfg = cfg
        self.crop_size = crop_size

    def forward(
        self,
        windows: Tensor,  # (n * L, W, R, n_mels)
        neutral: Tensor,  # (n * L, 68, 2)
        target: Tensor,  # (n * L, 37, 2)
        lookahead: int,
        seq_len: int,
    ) -> dict[str, Tensor]:
        pred = self.motion(windows, neutral, lookahead)  # (n * L, 37, 2)
        return motion_loss(pred, target, seq_len, self.crop_size, self.cfg.velocity_weight)


class DiffusionTask(nn.Module):
    """The teacher: x0-prediction loss at uniformly drawn timesteps."""

    def __init__(
        self, denoiser: TalkFormerDenoiser, schedule: NoiseSchedule, cfg: TeacherStageConfig
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.schedule = schedule
        self.cfg = cfg

    def forward(
        self,
        x0: Tensor,  # (B, 3, S, S) in [-1, 1]
        landmarks: Tensor,  # (B, 68, 2)
        refs: Tensor,  # (R, 3, S, S)
        ref_index: Tensor | None,  # (B,) or None
        t: Tensor,  # (B,)
        noise: Tensor,  # (B, 3, S, S)
    ) -> dict[str, Tensor]:
        ref = select_reference(self.denoiser.encode_reference(refs), ref_index)
        x_t = self.schedule.add_noise(x0, noise, t)
        pred = self.denoiser(x_t, t, landmarks, ref)  # (B, 3, S, S) x0 prediction
        w = mouth_weight_map(landmarks, x0.shape[-1], self.cfg.mouth_weight)
        return image_loss(pred, x0, w)


class EndToEndTask(nn.Module):
    """Motion + student together: predicted landmarks drive the denoiser.

    The target landmarks are built exactly as the engine builds them: the neutral landmarks
    displaced by the motion model's output, plus the idle motion (here: what the corpus frame
    shows beyond speech). The image loss therefore reaches AudioToMotion through the landmark
    tokens' Fourier features.
    """

    def __init__(
        self,
        motion: AudioToMotion,
        student: TalkFormerDenoiser,
        schedule: NoiseSchedule,
        cfg: E2EStageConfig,
    ) -> None:
        super().__init__()
        self.motion = motion
        self.student = student
        self.cfg = cfg
        self.samplers = {k: FewStepSampler(schedule, k) for k in set(cfg.student_steps)}

    def forward(
        self,
        windows: Tensor,  # (B, W, R, n_mels)
        neutral: Tensor,  # (B, 68, 2)
        speech_target: Tensor,  # (B, 37, 2)
        idle: Tensor,  # (B, 68, 2)
        gt_landmarks: Tensor,  # (B, 68, 2): what the target frame shows
        x_gt: Tensor,  # (B, 3, S, S)
        refs: Tensor,
        ref_index: Tensor | None,
        noise: Tensor,  # (B, 3, S, S)
        lookahead: int,
        steps: int,
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        size = x_gt.shape[-1]
        disp = self.motion(windows, neutral, lookahead)  # (B, 37, 2)
        landmarks = self.motion.apply_displacement(neutral, disp) + idle  # (B, 68, 2)
        ref = select_reference(self.student.encode_reference(refs), ref_index)
        out = self.samplers[steps].sample(self.student, noise, landmarks=landmarks, ref=ref)
        w = mouth_weight_map(gt_landmarks, size, cfg.mouth_weight)
        img = image_loss(out, x_gt, w, cfg.l1_weight)
        lm_px = (disp - speech_target).abs().mean() * (size / 2.0)
        return {
            "loss": cfg.image_weight * img["loss"] + cfg.motion_weight * lm_px,
            "mse": img["mse"],
            "l1_px": lm_px,
        }


# ----------------------------------------------------------------------------- networks


@dataclass
class Nets:
    """The networks as the stages hand them on."""

    motion: AudioToMotion
    teacher: TalkFormerDenoiser
    student: TalkFormerDenoiser | None
    audio: AudioConfig
    sampler: SamplerConfig
    preset: str
    teacher_trained: bool = False
    trained: list[str] = field(default_factory=list)  # stages whose result these are


def _arch(cfg: TrainConfig) -> tuple[MotionConfig, DenoiserConfig]:
    m = MotionConfig.from_dict({**MotionConfig.from_name(cfg.preset).to_dict(), **cfg.motion_arch})
    d = DenoiserConfig.from_dict(
        {**DenoiserConfig.from_name(cfg.preset).to_dict(), **cfg.denoiser_arch}
    )
    return m, d


def initial_nets(cfg: TrainConfig) -> Nets:
    """Networks of ``cfg.init`` (with its teacher, if it has one) or freshly initialised."""
    if cfg.init is not None:
        init = Path(cfg.init)
        models = load_checkpoint(init)
        if cfg.motion_arch or cfg.denoiser_arch:
            log.warning("motion_arch/denoiser_arch are ignored: the init checkpoint fixes them")
        teacher_dir = init / TEACHER_DIR
        has_teacher = (teacher_dir / "config.json").is_file()
        teacher = (
            load_checkpoint(teacher_dir).denoiser if has_teacher else copy.deepcopy(models.denoiser)
        )
        return Nets(
            motion=models.motion,
            teacher=teacher,
            student=models.denoiser,
            audio=models.audio,
            sampler=models.sampler,
            preset=models.preset,
            teacher_trained=has_teacher,
        )
    mcfg, dcfg = _arch(cfg)
    torch.manual_seed(cfg.seed)
    return Nets(
        motion=AudioToMotion(mcfg),
        teacher=TalkFormerDenoiser(dcfg),
        student=None,
        audio=AudioConfig(),
        sampler=SamplerConfig(),
        preset=cfg.preset,
    )


def _models(nets: Nets, denoiser: TalkFormerDenoiser, meta: dict[str, Any]) -> Models:
    return Models(
        motion=nets.motion,
        denoiser=denoiser,
        audio=nets.audio,
        sampler=nets.sampler,
        preset=nets.preset,
        meta=meta,
    )


# ----------------------------------------------------------------------------- data


def _resolve_image(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray | None]:
    from talkstream.engine.avatar import default_image, default_landmarks, load_image
    from talkstream.engine.landmarks import load_landmarks_json

    b = cfg.data.build
    assert b is not None
    if b.image is None:
        return default_image(), default_landmarks()
    from talkstream.config import AvatarConfig

    image = load_image(b.image, AvatarConfig())
    points = load_landmarks_json(b.landmarks) if b.landmarks is not None else None
    return image, points


def corpus_dir(cfg: TrainConfig) -> Path | None:
    """The corpus folder a config trains on (built into the run folder if not given)."""
    if cfg.data.corpus is not None:
        return Path(cfg.data.corpus)
    if cfg.data.build is not None:
        return Path(cfg.out) / "corpus"
    return None


def motion_corpus_dir(cfg: TrainConfig) -> Path | None:
    """The corpus the motion stage trains on, if it has its own (else the main data)."""
    if cfg.data.motion_corpus is not None:
        return Path(cfg.data.motion_corpus)
    b = cfg.data.build
    if cfg.data.corpus is None and b is not None and b.motion_minutes is not None:
        return Path(cfg.out) / "motion_corpus"
    return None


def _build_corpus(cfg: TrainConfig, out: Path, minutes: float, frames: bool) -> None:
    from talkstream.training.synthetic import CorpusConfig, build_corpus

    b = cfg.data.build
    assert b is not None
    image, points = _resolve_image(cfg)
    # Crops at the size the denoiser renders.
    avatar = AvatarConfig(crop_size=_arch(cfg)[1].image_size)
    ccfg = CorpusConfig(render_frames=frames, avatar=avatar)
    res = build_corpus(image, points, out, minutes, b.seed, cfg.progress, ccfg)
    log.info("corpus: %d clips, %.1f min in %s", res.clips, res.duration_s / 60, out)


def faces_dir(cfg: TrainConfig) -> Path | None:
    """Where the aligned face set of ``data.faces`` is cached."""
    if cfg.data.faces is None:
        return None
    return Path(cfg.data.faces_cache or Path(cfg.out) / "faces")


def prepare_faces(cfg: TrainConfig, dist: DistInfo) -> FaceSet | None:
    """The training identities of ``data.faces`` (built on rank 0, cached), or None."""
    out = faces_dir(cfg)
    if out is None:
        return None
    assert cfg.data.faces is not None
    fcfg = FaceSetConfig(
        crop_size=_arch(cfg)[1].image_size,
        heldout_fraction=cfg.data.faces_heldout,
        max_photos=cfg.data.faces_max,
        workers=max(1, cfg.threads or 2),
    )
    fs = build_face_set(cfg.data.faces, out, fcfg, progress=cfg.progress) if dist.is_main else None
    dist.barrier()
    if fs is None:  # the other ranks load what rank 0 built
        fs = build_face_set(cfg.data.faces, out, fcfg, progress=False)
    train = fs.subset("train")
    if len(train) == 0:
        raise TalkstreamError(f"no training identities in {cfg.data.faces} (all held out)")
    return train


def one_face_warning(cfg: TrainConfig) -> str | None:
    """The warning for a config whose renderer would learn one face only, or None.

    Fine-tuning an existing checkpoint on one photo (``init``: ``talkstream enroll``) is meant
    to specialise it, so it is not warned about.
    """
    renders = any(s in cfg.stages for s in ("teacher", "distill", "e2e"))
    one_face = cfg.data.faces is None and cfg.data.videos is None
    if not renders or not one_face or cfg.init is not None:
        return None
    return (
        "training the renderer on one face only (the corpus photo): the model will not render "
        "other people well. Pass --faces DIR (a folder of portrait photos) for a model that "
        "animates any face, as the shipped one does"
    )


def prepare_data(cfg: TrainConfig, dist: DistInfo, audio: AudioConfig) -> TrainData:
    """Build (rank 0) or find the data a config names, and load its training split."""
    warning = one_face_warning(cfg)
    if warning is not None and dist.is_main:
        log.warning(warning)
    parts: list[TrainData] = []
    corpus = corpus_dir(cfg)
    faces = prepare_faces(cfg, dist)
    if faces is not None:
        # Every identity talks with the corpus' speech and mouth motion; frames are rendered
        # on the fly, so the corpus needs none.
        if corpus is None:
            raise TalkstreamError("data.faces needs a corpus: set data.build or data.corpus")
        if cfg.data.corpus is None and dist.is_main:
            assert cfg.data.build is not None
            _build_corpus(cfg, corpus, cfg.data.build.minutes, frames=False)
        dist.barrier()
        base = load_dataset(corpus, "train", audio, frames=False)
        return TalkingFaces(base, faces, cfg.data.augment, seed=cfg.seed)
    if corpus is not None:
        if cfg.data.corpus is None and dist.is_main:
            assert cfg.data.build is not None
            _build_corpus(cfg, corpus, cfg.data.build.minutes, frames=True)
        dist.barrier()
        parts.append(load_dataset(corpus, "train", audio))
    if cfg.data.videos is not None:
        from talkstream.training.video import VideoPrepConfig, preprocess_videos

        cache = Path(cfg.data.video_cache or Path(cfg.out) / "video_cache")
        if dist.is_main:
            preprocess_videos(cfg.data.videos, cache, VideoPrepConfig(), progress=cfg.progress)
        dist.barrier()
        parts.append(load_dataset(cache, "train", audio))
    if not parts:
        raise TalkstreamError(
            "the config names no training data: set data.corpus, data.build or data.videos"
        )
    return concat_datasets(parts)


def _same_heldout(a: Path, b: Path) -> bool:
    def heldout(p: Path) -> tuple[Any, ...]:
        m = json.loads((p / "manifest.json").read_text(encoding="utf-8"))
        h = m.get("splits", {}).get("heldout", {})
        return (m.get("avatar_key"), h.get("available_sentence_ids"), h.get("voice_variants"))

    return heldout(a) == heldout(b)


def prepare_motion_data(
    cfg: TrainConfig, dist: DistInfo, audio: AudioConfig, data: TrainData
) -> TrainData:
    """The motion stage's data: its own corpus (audio and landmarks) if the config names or
    builds one, else ``data``. Real videos, if any, stay in (their mouths are real)."""
    path = motion_corpus_dir(cfg)
    faces = data.faces if isinstance(data, TalkingFaces) else None
    if path is None:
        return data
    if cfg.data.motion_corpus is None and dist.is_main:
        b = cfg.data.build
        assert b is not None and b.motion_minutes is not None
        _build_corpus(cfg, path, b.motion_minutes, frames=False)
    dist.barrier()
    main = corpus_dir(cfg)
    if main is not None and (main / "manifest.json").is_file() and not _same_heldout(main, path):
        log.warning(
            "motion corpus %s holds out other sentences, voices or another face than %s: "
            "held-out scores of the motion model will be optimistic",
            path,
            main,
        )
    parts = [load_dataset(path, "train", audio, frames=False)]
    if cfg.data.videos is not None:
        cache = Path(cfg.data.video_cache or Path(cfg.out) / "video_cache")
        parts.append(load_dataset(cache, "train", audio, frames=False))
    merged = concat_datasets(parts)
    if faces is not None and all(c.params is not None for c in merged.clips):
        return AnyFaceMotion(merged, faces)
    return merged


# ----------------------------------------------------------------------------- stages


def _stage_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / "stages" / stage


def _stage_done(run_dir: Path, stage: str) -> bool:
    return (_stage_dir(run_dir, stage) / "stage.json").is_file()


def _finish_stage(ctx: StageContext, stage: str, models: Models, summary: dict[str, Any]) -> None:
    if ctx.dist.is_main:
        d = _stage_dir(ctx.run_dir, stage)
        save_checkpoint(d, models)
        (d / "stage.json").write_text(json.dumps({"stage": stage, **summary}, indent=1))
    ctx.dist.barrier()


def _load_stage(run_dir: Path, stage: str, nets: Nets) -> None:
    """Take the networks a finished stage produced."""
    models = load_checkpoint(_stage_dir(run_dir, stage))
    if stage in ("motion", "e2e"):
        nets.motion.load_state_dict(models.motion.state_dict())
    if stage == "teacher":
        nets.teacher.load_state_dict(models.denoiser.state_dict())
        nets.teacher_trained = True
    if stage in ("distill", "e2e"):
        if nets.student is None:
            nets.student = copy.deepcopy(nets.teacher)
        nets.student.load_state_dict(models.denoiser.state_dict())
    nets.trained.append(stage)


def _run_motion(ctx: StageContext, cfg: TrainConfig, nets: Nets, data: TrainData) -> dict[str, Any]:
    st = cfg.motion
    n_local = ctx.dist.local_batch(st.batch)
    mcfg = nets.motion.cfg
    task = MotionTask(nets.motion, st, data.crop_size).to(ctx.device)
    dev = ctx.device

    def make(step: int, rnd: StepRandom) -> tuple[tuple[Any, ...], dict[str, Any]]:
        b = data.motion_batch(rnd.data, n_local, st.seq_len, mcfg, cfg.data.gain_jitter_db)
        la = pick_lookahead(rnd.shared, mcfg.lookahead_frames, st.full_lookahead_prob)
        return (b.windows.to(dev), b.neutral.to(dev), b.target.to(dev), la, st.seq_len), {}

    groups = [{"params": list(nets.motion.parameters()), "lr": st.lr}]
    return run_stage(
        ctx, "motion", st, task, groups, {"motion": nets.motion}, make, st.batch * st.seq_len
    )


def _run_teacher(
    ctx: StageContext, cfg: TrainConfig, nets: Nets, data: TrainData
) -> dict[str, Any]:
    st = cfg.teacher
    n_local = ctx.dist.local_batch(st.batch)
    schedule = NoiseSchedule(nets.sampler)
    task = DiffusionTask(nets.teacher, schedule, st).to(ctx.device)
    dev = ctx.device
    s = data.crop_size

    batches, close = _frame_batches(ctx, "teacher", st.steps, data, n_local)

    def make(step: int, rnd: StepRandom) -> tuple[tuple[Any, ...], dict[str, Any]]:
        b = batches(step, rnd)
        t = schedule.sample_timesteps(n_local, rnd.torch)
        noise = torch.randn((n_local, 3, s, s), generator=rnd.torch)
        ri = None if b.ref_index is None else b.ref_index.to(dev)
        args = (b.x0.to(dev), b.landmarks.to(dev), b.refs.to(dev), ri, t.to(dev), noise.to(dev))
        return args, {}

    groups = [{"params": list(nets.teacher.parameters()), "lr": st.lr}]
    try:
        summary = run_stage(
            ctx, "teacher", st, task, groups, {"denoiser": nets.teacher}, make, st.batch
        )
    finally:
        close()
    nets.teacher_trained = True
    return summary


def _run_distill(
    ctx: StageContext, cfg: TrainConfig, nets: Nets, data: TrainData
) -> dict[str, Any]:
    st = cfg.distill
    if st.teacher_weight > 0 and not nets.teacher_trained:
        raise TalkstreamError(
            "the distill stage needs a trained teacher: run the teacher stage first, or pass an "
            f"init checkpoint with a '{TEACHER_DIR}/' folder, or set distill.teacher_weight=0"
        )
    if st.student_init == "init" and nets.student is None:
        raise TalkstreamError("distill.student_init='init' needs an init checkpoint")
    base = nets.teacher if st.student_init == "teacher" or nets.student is None else nets.student
    student = copy.deepcopy(base).to(ctx.device)
    schedule = NoiseSchedule(nets.sampler)
    pool = None
    if st.teacher_weight > 0:
        pool = build_pool(ctx, nets.teacher.to(ctx.device), schedule, data, st)
    task = StudentTask(student, schedule, st).to(ctx.device)
    make = distill_inputs(data, pool, st, ctx.dist.local_batch(st.batch), ctx.device)
    groups = [{"params": list(student.parameters()), "lr": st.lr}]
    summary = run_stage(ctx, "distill", st, task, groups, {"denoiser": student}, make, st.batch)
    nets.student = student
    return summary


def _run_e2e(ctx: StageContext, cfg: TrainConfig, nets: Nets, data: TrainData) -> dict[str, Any]:
    st = cfg.e2e
    if nets.student is None:
        log.warning("e2e without a distilled student: fine-tuning a copy of the teacher")
        nets.student = copy.deepcopy(nets.teacher)
    n_local = ctx.dist.local_batch(st.batch)
    schedule = NoiseSchedule(nets.sampler)
    task = EndToEndTask(nets.motion, nets.student, schedule, st).to(ctx.device)
    mcfg = nets.motion.cfg
    dev = ctx.device
    s = data.crop_size

    batches, close = _frame_batches(
        ctx, "e2e", st.steps, data, n_local, mcfg, cfg.data.gain_jitter_db
    )

    def make(step: int, rnd: StepRandom) -> tuple[tuple[Any, ...], dict[str, Any]]:
        b = batches(step, rnd)
        assert b.windows is not None and b.neutral is not None
        assert b.speech_target is not None and b.idle is not None
        noise = torch.randn((n_local, 3, s, s), generator=rnd.torch)
        la = pick_lookahead(rnd.shared, mcfg.lookahead_frames, st.full_lookahead_prob)
        steps = int(rnd.shared.choice(np.asarray(st.student_steps)))
        ri = None if b.ref_index is None else b.ref_index.to(dev)
        args = (
            b.windows.to(dev),
            b.neutral.to(dev),
            b.speech_target.to(dev),
            b.idle.to(dev),
            b.landmarks.to(dev),
            b.x0.to(dev),
            b.refs.to(dev),
            ri,
            noise.to(dev),
            la,
            steps,
        )
        return args, {}

    groups = [
        {"params": list(nets.motion.parameters()), "lr": st.motion_lr},
        {"params": list(nets.student.parameters()), "lr": st.lr},
    ]
    exported = {"motion": nets.motion, "denoiser": nets.student}
    try:
        return run_stage(ctx, "e2e", st, task, groups, exported, make, st.batch)
    finally:
        close()


def _frame_batches(
    ctx: StageContext,
    stage: str,
    steps: int,
    data: TrainData,
    n: int,
    mcfg: MotionConfig | None = None,
    gain_db: float = 0.0,
) -> tuple[Callable[[int, StepRandom], FrameBatch], Callable[[], None]]:
    """``(step, rnd) -> FrameBatch`` for a stage, and a close function.

    Frames rendered on the fly (:class:`TalkingFaces`) are built for the next steps in a
    worker process while this one trains; the batch of a step is the same either way.
    """
    if not isinstance(data, TalkingFaces):
        return (lambda step, rnd: data.frame_batch(rnd.data, n, mcfg, gain_db)), (lambda: None)
    seed, rank = ctx.seed, ctx.dist.rank

    def job(step: int) -> dict[str, np.ndarray]:
        rnd = StepRandom.for_step(seed, stage, step, rank)
        return data.frame_arrays(rnd.data, n, mcfg, gain_db)

    pre = Prefetcher(job, 0, steps)
    return (lambda step, rnd: data.batch_from_arrays(pre.get(step))), pre.close


_RUNNERS: dict[str, Callable[[StageContext, TrainConfig, Nets, TrainData], dict[str, Any]]] = {
    "motion": _run_motion,
    "teacher": _run_teacher,
    "distill": _run_distill,
    "e2e": _run_e2e,
}


# ----------------------------------------------------------------------------- entry point


@dataclass
class TrainResult:
    """What :func:`train` did."""

    run_dir: Path
    final: Path | None  # RUN/final, when any stage has finished
    exported: Path | None
    stages: dict[str, dict[str, Any]]  # per stage run now: steps, last losses, wall time
    wall_s: float
    nets: Nets  # the networks as this process holds them at the end


# Settings that decide what the saved state means: a resumed run must not change them.
_RESUME_KEYS = ("preset", "motion_arch", "denoiser_arch", "seed", "init", "data")


def _check_run_config(run_dir: Path, cfg: TrainConfig) -> None:
    path = run_dir / "config.json"
    new = config_to_dict(cfg)
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in _RESUME_KEYS if old.get(k) != new.get(k)]
        if changed:
            raise TalkstreamError(
                f"{run_dir} holds a run with different {', '.join(changed)}: resuming it with "
                "this config would mix two trainings. Use another 'out' folder, or delete it."
            )
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(new, indent=1))


def _corpus_summary(path: Path) -> dict[str, Any] | None:
    """Where a corpus is, its seed, length and splits (None if it has no manifest yet)."""
    if not (path / "manifest.json").is_file():
        return None
    m = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    return {
        "path": str(path),
        "seed": m.get("seed"),
        "duration_s": m.get("duration_s"),
        "splits": {
            k: {"clips": v["clips"], "duration_s": v["duration_s"]}
            for k, v in m.get("splits", {}).items()
        },
    }


def _data_summary(cfg: TrainConfig, data: TrainData | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    corpus = corpus_dir(cfg)
    summary = _corpus_summary(corpus) if corpus is not None else None
    if summary is not None:
        b = cfg.data.build
        image = b.image if b is not None and cfg.data.corpus is None else None
        out["corpus"] = {**summary, "image": image}
    mcorpus = motion_corpus_dir(cfg)
    summary = _corpus_summary(mcorpus) if mcorpus is not None else None
    if summary is not None:
        out["motion_corpus"] = summary
    if cfg.data.videos is not None:
        out["videos"] = str(cfg.data.videos)
    if data is not None:
        out["train_frames"] = data.total_frames
    return out


def train(
    cfg: TrainConfig,
    dist: DistInfo | None = None,
    data: TrainData | None = None,
    on_step: Callable[[str, int], None] | None = None,
) -> TrainResult:
    """Run (or resume) the stages of ``cfg``; see the module docstring.

    Args:
        cfg: the config tree.
        dist: this process's place in a torchrun job (default: a single process). The process
            group is initialised here (``env://``) and destroyed at the end.
        data: training data to use instead of what ``cfg.data`` names (tests).
        on_step: called as ``on_step(stage, step)`` after every step (tests: simulated kills).

    Returns:
        A :class:`TrainResult`.
    """
    dist = dist or DistInfo()
    t0 = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    own_group = False
    if dist.enabled and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(
            backend, init_method="env://", rank=dist.rank, world_size=dist.world_size
        )
        own_group = True
    try:
        return _train(cfg, dist, data, on_step, device, t0)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _train(
    cfg: TrainConfig,
    dist: DistInfo,
    data: TrainData | None,
    on_step: Callable[[str, int], None] | None,
    device: torch.device,
    t0: float,
) -> TrainResult:
    run_dir = Path(cfg.out)
    if dist.is_main:
        _check_run_config(run_dir, cfg)
    dist.barrier()
    ctx = StageContext(run_dir, cfg.seed, dist, device, cfg.progress, on_step)
    nets = initial_nets(cfg)
    nets.motion.to(device)
    nets.teacher.to(device)
    summaries: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        if _stage_done(run_dir, stage):
            _load_stage(run_dir, stage, nets)
            continue
        if stage not in cfg.stages:
            continue
        if data is None:
            data = prepare_data(cfg, dist, nets.audio)
        if data.crop_size != nets.teacher.cfg.image_size:
            raise TalkstreamError(
                f"the data's crops are {data.crop_size}px but the denoiser renders "
                f"{nets.teacher.cfg.image_size}px"
            )
        stage_data = data
        if stage == "motion":
            stage_data = prepare_motion_data(cfg, dist, nets.audio, data)
        summary = _RUNNERS[stage](ctx, cfg, nets, stage_data)
        summaries[stage] = summary
        denoiser = nets.teacher if stage in ("motion", "teacher") else nets.student
        assert denoiser is not None
        meta = {"stage": stage, "random_init": False, "summary": summary}
        _finish_stage(ctx, stage, _models(nets, denoiser, meta), summary)
        nets.trained.append(stage)

    final = exported = None
    if nets.trained and dist.is_main:
        meta = _final_meta(cfg, nets, data, run_dir)
        final = run_dir / "final"
        _export(final, nets, meta)
        if cfg.export is not None:
            exported = Path(cfg.export)
            _export(exported, nets, meta)
    dist.barrier()
    return TrainResult(run_dir, final, exported, summaries, time.perf_counter() - t0, nets)


def _final_meta(
    cfg: TrainConfig, nets: Nets, data: TrainData | None, run_dir: Path
) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for s in nets.trained:
        f = _stage_dir(run_dir, s) / "stage.json"
        if f.is_file():
            stages[s] = json.loads(f.read_text())
    return {
        "random_init": False,
        "trained_by": f"talkstream {__version__} train",
        "stages": stages,
        "student_steps": list(cfg.distill.student_steps),
        "data": _data_summary(cfg, data),
        "config": config_to_dict(cfg),
    }


def _export(path: Path, nets: Nets, meta: dict[str, Any]) -> None:
    """The engine checkpoint (motion + student) with the teacher in a sub-folder."""
    student = nets.student if nets.student is not None else nets.teacher
    kind = "student" if nets.student is not None else "teacher"
    save_checkpoint(path, _models(nets, student, {**meta, "denoiser": kind}))
    tdir = path / TEACHER_DIR
    # Only a teacher trained in this run belongs beside the student (an enrolment fine-tunes
    # the student alone: the init's teacher never saw the new face).
    if "teacher" in nets.trained and nets.student is not None:
        save_checkpoint(tdir, _models(nets, nets.teacher, {**meta, "denoiser": "teacher"}))
    elif tdir.exists():
        shutil.rmtree(tdir)
