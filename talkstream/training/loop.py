"""The training loop every stage shares: schedule, EMA, logging, checkpoints, resume, DDP.

Resume is exact. A stage's resumable state is its weights (and EMA weights), the optimizer's
state and the step count; nothing else carries randomness across steps, because every step
draws its batch, noise and timesteps from generators seeded by ``(seed, stage, step, rank)``
(counter-based seeding). So a run killed after step ``k`` and resumed from its checkpoint at
step ``c <= k`` recomputes steps ``c+1..k`` bit for bit, and a multi-GPU run needs no per-rank
RNG files.

State on disk, per stage (written atomically: a new ``step_N`` folder, then the ``latest``
pointer is replaced, then older folders are removed)::

    RUN/state/<stage>/latest                   "step_000400"
    RUN/state/<stage>/step_000400/weights.safetensors   "task.*" and "ema.*" tensors
    RUN/state/<stage>/step_000400/optim.safetensors     optimizer state tensors
    RUN/state/<stage>/step_000400/state.json            step, param groups, scalars, timing

Nothing is pickled: tensors go to safetensors, everything else to JSON.

Multi-GPU: under ``torchrun`` every process runs the same loop on its own share of each batch;
gradients are averaged by DistributedDataParallel, rank 0 alone writes files and logs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from talkstream.training.config import STAGES, StageConfig

log = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "StageContext",
    "StepRandom",
    "lr_factor",
    "run_stage",
]

_SHARED_RANK = 1_000_003  # the "rank" of draws every process must agree on (step count, ...)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly) multi-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DistInfo:
        """From torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); the CLI passes
        ``os.environ`` (no module below the CLI reads the environment)."""
        return cls(
            rank=int(env.get("RANK", "0")),
            world_size=int(env.get("WORLD_SIZE", "1")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
        )

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def local_batch(self, batch: int) -> int:
        """This process's share of a global batch."""
        if batch % self.world_size:
            raise ValueError(
                f"batch {batch} is not divisible by the {self.world_size} processes of this run"
            )
        return batch // self.world_size


@dataclass
class StepRandom:
    """The generators of one step: per-process data draws and draws shared by all processes."""

    data: np.random.Generator  # batch composition (differs per rank)
    torch: torch.Generator  # noise and timesteps (differs per rank)
    shared: np.random.Generator  # choices all ranks must agree on (lookahead, step count)

    @classmethod
    def for_step(cls, seed: int, stage: str, step: int, rank: int) -> StepRandom:
        sid = STAGES.index(stage) if stage in STAGES else 99
        data = np.random.default_rng([seed, sid, step, rank])
        gen = torch.Generator().manual_seed(int(data.integers(0, 2**62)))
        shared = np.random.default_rng([seed, sid, step, _SHARED_RANK])
        return cls(data, gen, shared)


def lr_factor(step: int, cfg: StageConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``cfg.steps``."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min(max(step - cfg.warmup, 0) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StageContext:
    """What a stage run needs besides its task."""

    run_dir: Path
    seed: int
    dist: DistInfo = field(default_factory=DistInfo)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    # Called after every completed step (after a checkpoint, if one was due): tests use it
    # to simulate a kill.
    on_step: Callable[[str, int], None] | None = None

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.jsonl"

    def state_dir(self, stage: str) -> Path:
        return self.run_dir / "state" / stage


# ----------------------------------------------------------------------------- state files


def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{pid}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_files(
    opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]
    ]
    opt.load_state_dict({"state": state, "param_groups": groups})


def latest_state(state_dir: Path) -> Path | None:
    """The newest complete state folder of a stage, or None."""
    pointer = state_dir / "latest"
    if not pointer.is_file():
        return None
    path = state_dir / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def save_state(
    state_dir: Path,
    step: int,
    task: nn.Module,
    ema: Mapping[str, nn.Module],
    opt: torch.optim.Optimizer,
    extra: dict[str, Any],
) -> Path:
    """Write a resumable state folder for ``step`` and point ``latest`` at it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = state_dir / name
    tmp = state_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {f"task.{k}": v.detach().to("cpu").contiguous() for k, v in task.state_dict().items()}
    for ename, module in ema.items():
        for k, v in module.state_dict().items():
            weights[f"ema.{ename}.{k}"] = v.detach().to("cpu").contiguous()
    save_file(weights, str(tmp / "weights.safetensors"))
    otensors, ometa = _optimizer_to_files(opt)
    save_file(otensors, str(tmp / "optim.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": ometa, **extra}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = state_dir / ".latest.tmp"
    pointer_tmp.write_text(name)
    os.replace(pointer_tmp, state_dir / "latest")
    for old in state_dir.glob("step_*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(
    path: Path,
    task: nn.Module,
    ema: Mapping[str, nn.Module],
    opt: torch.optim.Optimizer,
    device: torch.device,
) -> dict[str, Any]:
    """Restore a state folder written by :func:`save_state`; returns its JSON."""
    meta: dict[str, Any] = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "weights.safetensors"), device=str(device))
    task.load_state_dict(
        {k[len("task.") :]: v for k, v in weights.items() if k.startswith("task.")}, strict=True
    )
    for ename, module in ema.items():
        prefix = f"ema.{ename}."
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True
        )
    otensors = load_file(str(path / "optim.safetensors"), device=str(device))
    _optimizer_from_files(opt, otensors, meta["optimizer"])
    return meta


# ----------------------------------------------------------------------------- the loop


@torch.no_grad()
def _ema_update(ema: nn.Module, live: nn.Module, decay: float) -> None:
    for ep, p in zip(ema.parameters(), live.parameters(), strict=True):
        ep.lerp_(p.detach(), 1.0 - decay)
    for eb, b in zip(ema.buffers(), live.buffers(), strict=True):
        eb.copy_(b)


InputsFn = Callable[[int, StepRandom], tuple[tuple[Any, ...], dict[str, Any]]]


def run_stage(
    ctx: StageContext,
    name: str,
    cfg: StageConfig,
    task: nn.Module,
    param_groups: list[dict[str, Any]],
    exported: Mapping[str, nn.Module],
    make_inputs: InputsFn,
    samples_per_step: int,
) -> dict[str, Any]:
    """Train ``task`` for ``cfg.steps`` steps (resuming from the stage's saved state).

    Args:
        ctx: run folder, seed, process group, device, progress.
        name: the stage (names the state folder and the log lines).
        cfg: steps, schedule, checkpointing.
        task: a module whose ``forward(*args, **kwargs)`` returns a dict of scalar losses with
            the total under ``"loss"``; its submodules are the networks being trained.
        param_groups: optimizer groups, each with ``"params"`` and ``"lr"`` (the peak rate).
        exported: submodules of ``task`` whose weights the stage produces; with
            ``cfg.ema_decay > 0`` their EMA copies are kept and loaded back into them at the end.
        make_inputs: ``(step, StepRandom) -> (args, kwargs)`` of the task's forward.
        samples_per_step: global samples per step (for the throughput in the log).

    Returns:
        A summary: steps, last logged losses, wall time of all runs of this stage.
    """
    dist = ctx.dist
    for g in param_groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
    ema: dict[str, nn.Module] = {}
    if cfg.ema_decay > 0:
        ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in exported.items()}

    state_dir = ctx.state_dir(name)
    step, wall_before = 0, 0.0
    resumed = latest_state(state_dir)
    if resumed is not None:
        peak = [g["base_lr"] for g in opt.param_groups]
        meta = load_state(resumed, task, ema, opt, ctx.device)
        # The config's rates win over the saved ones: a resumed run may change them.
        for g, lr in zip(opt.param_groups, peak, strict=True):
            g["base_lr"] = lr
        step, wall_before = int(meta["step"]), float(meta.get("wall_s", 0.0))
        if dist.is_main:
            log.info("%s: resuming at step %d from %s", name, step, resumed)

    model: nn.Module = task
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(
            task, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    trainable = [p for g in param_groups for p in g["params"]]
    bar = _progress_bar(ctx.progress and dist.is_main, name, cfg.steps, step)
    sums: dict[str, float] = {}
    count = 0
    last: dict[str, float] = {}
    t_start = time.perf_counter()
    t_log = t_start
    saved_step = step
    task.train()
    try:
        while step < cfg.steps:
            factor = lr_factor(step, cfg)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            rnd = StepRandom.for_step(ctx.seed, name, step, dist.rank)
            args, kwargs = make_inputs(step, rnd)
            losses = model(*args, **kwargs)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            opt.step()
            step += 1
            if ema:
                # Short warm-up of the decay: early EMA weights would otherwise be mostly init.
                decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                for k, m in exported.items():
                    _ema_update(ema[k], m, decay)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            count += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                last = _reduce_means(sums, count, dist, ctx.device)
                now = time.perf_counter()
                rate = samples_per_step * count / max(now - t_log, 1e-9)
                if dist.is_main:
                    _write_log(ctx.log_path, name, step, opt.param_groups[0]["lr"], last, rate)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in last.items()}, refresh=False)
                sums, count, t_log = {}, 0, now
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                wall = wall_before + time.perf_counter() - t_start
                if dist.is_main:
                    save_state(state_dir, step, task, ema, opt, {"stage": name, "wall_s": wall})
                saved_step = step
                dist.barrier()
            if ctx.on_step is not None:
                ctx.on_step(name, step)
    except KeyboardInterrupt:
        # Ctrl-C: keep the work done since the last checkpoint, then stop.
        if dist.is_main and step > saved_step:
            wall = wall_before + time.perf_counter() - t_start
            save_state(state_dir, step, task, ema, opt, {"stage": name, "wall_s": wall})
            log.warning("%s: interrupted; state saved at step %d", name, step)
        raise
    finally:
        bar.close()
    task.eval()
    for k, m in ema.items():
        exported[k].load_state_dict(m.state_dict())
    return {
        "steps": cfg.steps,
        "losses": last,
        "wall_s": round(wall_before + time.perf_counter() - t_start, 2),
    }


def _reduce_means(
    sums: dict[str, float], count: int, dist: DistInfo, device: torch.device
) -> dict[str, float]:
    keys = sorted(sums)
    vals = torch.tensor([sums[k] / max(count, 1) for k in keys], dtype=torch.float64)
    if dist.enabled:
        vals = vals.to(device)
        torch.distributed.all_reduce(vals)
        vals = vals.cpu() / dist.world_size
    return {k: float(v) for k, v in zip(keys, vals.tolist(), strict=True)}


def _write_log(
    path: Path, stage: str, step: int, lr: float, losses: dict[str, float], rate: float
) -> None:
    line = {
        "stage": stage,
        "step": step,
        "lr": float(f"{lr:.6g}"),
        **{k: float(f"{v:.6g}") for k, v in losses.items()},
        "samples_per_s": round(rate, 2),
        "time": round(time.time(), 1),
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def _progress_bar(enabled: bool, name: str, total: int, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=name,
        unit="step",
        dynamic_ncols=True,
        disable=not enabled,
        leave=True,
    )
