"""Few-step distillation of the denoiser teacher into a 1-2 step student.

Method: knowledge distillation of the sampler's output (Luhman & Luhman 2021, "Knowledge
Distillation in Iterative Generative Models for Improved Sampling Speed"): the teacher runs its
full deterministic DDIM sampler (``teacher_steps``, 25 by default) from a noise tensor, and the
student learns to reach that same image from that same noise in 1 or 2 steps of the engine's
``FewStepSampler``, gradients flowing through both student steps. Because the corpus pairs every
landmark set with its true frame, the ground-truth frame is a second regression target; with
``teacher_weight = 0`` the stage is plain supervised fine-tuning of the few-step sampler (what
enrolment uses). Why this method and not progressive or consistency distillation: see
``docs/decisions.md``.

The teacher's outputs are computed once into a pool (``pool_size`` samples, stored as fp16
safetensors chunks in the run folder, resumable) and reused every epoch: the 25-step teacher is
the expensive part on a CPU, a regression step is cheap.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from talkstream.engine.denoiser import ReferenceFeatures, TalkFormerDenoiser
from talkstream.engine.sampler import FewStepSampler, NoiseSchedule
from talkstream.training.config import DistillStageConfig
from talkstream.training.dataset import TrainData
from talkstream.training.loop import StageContext, StepRandom
from talkstream.training.losses import image_loss, mouth_weight_map

log = logging.getLogger(__name__)

__all__ = [
    "DDIMSampler",
    "DistillPool",
    "StudentTask",
    "build_pool",
    "select_reference",
]

_POOL_SEED_TAG = 7701  # separates the pool's draws from the training steps' draws


class DDIMSampler:
    """Deterministic DDIM (eta = 0) with an x0-predicting model over any number of steps.

    Same trailing timesteps and update as :class:`talkstream.engine.sampler.FewStepSampler`
    (which stops at 4 steps, the student's range): ``round(T - i * T / steps) - 1``.
    """

    def __init__(self, schedule: NoiseSchedule, steps: int) -> None:
        if not 1 <= steps <= schedule.num_timesteps:
            raise ValueError(f"steps must be in 1..{schedule.num_timesteps}, got {steps}")
        self.schedule = schedule
        self.steps = steps
        T = schedule.num_timesteps
        self.timesteps = tuple(round(T - i * T / steps) - 1 for i in range(steps))

    def sample(self, model_fn: Callable[..., Tensor], noise: Tensor, **cond: Any) -> Tensor:
        """x0 after all steps, starting from ``noise`` taken as x_{T-1}."""
        x = noise
        b = noise.shape[0]
        ts = self.timesteps
        for i, t in enumerate(ts):
            tt = torch.full((b,), t, dtype=torch.long, device=noise.device)
            x0 = model_fn(x, tt, **cond)
            if i + 1 == len(ts):
                return x0
            ab_t = self.schedule.alpha_bar_value(t)
            ab_prev = self.schedule.alpha_bar_value(ts[i + 1])
            eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
            x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
        raise AssertionError("unreachable")


def select_reference(ref: ReferenceFeatures, index: Tensor | None) -> ReferenceFeatures:
    """Per-sample reference features from the batch's distinct references (None: broadcast)."""
    if index is None:
        return ref
    return ReferenceFeatures(
        patches=ref.patches[index], levels=tuple(lv[index] for lv in ref.levels)
    )


class StudentTask(nn.Module):
    """Loss of the student's k-step sample against the teacher's output and the true frame."""

    def __init__(
        self, student: TalkFormerDenoiser, schedule: NoiseSchedule, cfg: DistillStageConfig
    ) -> None:
        super().__init__()
        self.student = student
        self.cfg = cfg
        self.samplers = {k: FewStepSampler(schedule, k) for k in set(cfg.student_steps)}

    def forward(
        self,
        noise: Tensor,  # (B, 3, S, S)
        landmarks: Tensor,  # (B, 68, 2)
        refs: Tensor,  # (R, 3, S, S)
        ref_index: Tensor | None,
        x_gt: Tensor,  # (B, 3, S, S)
        teacher_out: Tensor | None,  # (B, 3, S, S)
        steps: int,
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        ref = select_reference(self.student.encode_reference(refs), ref_index)
        out = self.samplers[steps].sample(self.student, noise, landmarks=landmarks, ref=ref)
        w = mouth_weight_map(landmarks, x_gt.shape[-1], cfg.mouth_weight)
        losses: dict[str, Tensor] = {}
        total = out.new_zeros(())
        if cfg.gt_weight > 0:
            gt = image_loss(out, x_gt, w, cfg.l1_weight)
            losses["gt_mse"] = gt["mse"]
            total = total + cfg.gt_weight * gt["loss"]
        if teacher_out is not None and cfg.teacher_weight > 0:
            kd = image_loss(out, teacher_out, w, cfg.l1_weight)
            losses["kd_mse"] = kd["mse"]
            total = total + cfg.teacher_weight * kd["loss"]
        losses["loss"] = total
        return losses


@dataclass
class DistillPool:
    """Teacher outputs for fixed (frame, noise) pairs."""

    clip_index: np.ndarray  # (N,)
    frame_index: np.ndarray  # (N,)
    noise: Tensor  # (N, 3, S, S) float32
    teacher_out: Tensor  # (N, 3, S, S) float16

    def __len__(self) -> int:
        return len(self.clip_index)


def _chunk_draws(
    data: TrainData, seed: int, chunk: int, n: int
) -> tuple[np.ndarray, np.ndarray, Tensor]:
    rng = np.random.default_rng([seed, _POOL_SEED_TAG, chunk])
    clips, frames = data.sample_frames(rng, n)
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    s = data.crop_size
    noise = torch.randn((n, 3, s, s), generator=gen)
    return clips, frames, noise


@torch.no_grad()
def build_pool(
    ctx: StageContext,
    teacher: TalkFormerDenoiser,
    schedule: NoiseSchedule,
    data: TrainData,
    cfg: DistillStageConfig,
    chunk_size: int = 16,
) -> DistillPool:
    """Compute (or load the already computed chunks of) the teacher-output pool.

    Chunks are split over the processes of a multi-GPU run; each is a safetensors file in
    ``RUN/state/distill/pool``, so an interrupted build resumes where it stopped.
    """
    pool_dir = ctx.state_dir("distill") / "pool"
    pool_dir.mkdir(parents=True, exist_ok=True)
    key = {
        "pool_size": cfg.pool_size,
        "teacher_steps": cfg.teacher_steps,
        "chunk": chunk_size,
        "seed": ctx.seed,
        "frames": data.total_frames,
    }
    key_file = pool_dir / "pool.json"
    if ctx.dist.is_main:
        if key_file.is_file() and json.loads(key_file.read_text()) != key:
            log.warning("distill pool settings changed: rebuilding the pool")
            for f in pool_dir.glob("chunk_*.safetensors"):
                f.unlink()
        key_file.write_text(json.dumps(key))
    ctx.dist.barrier()

    sampler = DDIMSampler(schedule, cfg.teacher_steps)
    n_chunks = math.ceil(cfg.pool_size / chunk_size)
    teacher.eval()
    mine = [k for k in range(n_chunks) if k % ctx.dist.world_size == ctx.dist.rank]
    todo = [k for k in mine if not (pool_dir / f"chunk_{k:05d}.safetensors").is_file()]
    from tqdm import tqdm

    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc="distill pool",
        unit="chunk",
        dynamic_ncols=True,
        disable=not (ctx.progress and ctx.dist.is_main),
    )
    for k in todo:
        n = min(chunk_size, cfg.pool_size - k * chunk_size)
        clips, frames, noise = _chunk_draws(data, ctx.seed, k, n)
        batch = data.frame_batch(np.random.default_rng(0), n, picks=(clips, frames))
        dev = ctx.device
        ref = select_reference(
            teacher.encode_reference(batch.refs.to(dev)),
            None if batch.ref_index is None else batch.ref_index.to(dev),
        )
        out = sampler.sample(teacher, noise.to(dev), landmarks=batch.landmarks.to(dev), ref=ref)
        tmp = pool_dir / f".chunk_{k:05d}.tmp"
        save_file(
            {
                "clip_index": torch.from_numpy(clips.astype(np.int64)),
                "frame_index": torch.from_numpy(frames.astype(np.int64)),
                "teacher_out": out.to("cpu", torch.float16).contiguous(),
            },
            str(tmp),
        )
        tmp.replace(pool_dir / f"chunk_{k:05d}.safetensors")
        bar.update(1)
    bar.close()
    ctx.dist.barrier()

    clip_idx, frame_idx, noises, outs = [], [], [], []
    for k in range(n_chunks):
        t = load_file(str(pool_dir / f"chunk_{k:05d}.safetensors"))
        n = len(t["clip_index"])
        _, _, noise = _chunk_draws(data, ctx.seed, k, n)
        clip_idx.append(t["clip_index"].numpy())
        frame_idx.append(t["frame_index"].numpy())
        noises.append(noise)
        outs.append(t["teacher_out"])
    return DistillPool(
        np.concatenate(clip_idx), np.concatenate(frame_idx), torch.cat(noises), torch.cat(outs)
    )


def distill_inputs(
    data: TrainData,
    pool: DistillPool | None,
    cfg: DistillStageConfig,
    local_batch: int,
    device: torch.device,
) -> Callable[[int, StepRandom], tuple[tuple[Any, ...], dict[str, Any]]]:
    """The per-step inputs of :class:`StudentTask`: pool samples, or fresh frames and noise."""

    def make(step: int, rnd: StepRandom) -> tuple[tuple[Any, ...], dict[str, Any]]:
        steps = int(rnd.shared.choice(np.asarray(cfg.student_steps)))
        if pool is not None:
            idx = rnd.data.integers(0, len(pool), size=local_batch)
            batch = data.frame_batch(
                rnd.data, local_batch, picks=(pool.clip_index[idx], pool.frame_index[idx])
            )
            noise = pool.noise[torch.from_numpy(idx)]
            teacher_out: Tensor | None = pool.teacher_out[torch.from_numpy(idx)].float().to(device)
        else:
            batch = data.frame_batch(rnd.data, local_batch)
            s = data.crop_size
            noise = torch.randn((local_batch, 3, s, s), generator=rnd.torch)
            teacher_out = None
        args = (
            noise.to(device),
            batch.landmarks.to(device),
            batch.refs.to(device),
            None if batch.ref_index is None else batch.ref_index.to(device),
            batch.x0.to(device),
            teacher_out,
            steps,
        )
        return args, {}

    return make


def pool_path(run_dir: Path) -> Path:
    """Where the teacher-output pool of a run lives."""
    return run_dir / "state" / "distill" / "pool"
