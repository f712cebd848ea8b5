"""Noise schedule (training) and the few-step sampler (inference).

The denoiser predicts x0 directly. With that parameterisation one sampling step is simply the
model's answer at the noisiest timestep, which is what a distilled CPU student runs every frame;
2-4 steps use deterministic DDIM (eta = 0) updates between trained timesteps.

Every frame of a session starts from the same noise tensor (``session_noise``): a diffusion model
fed fresh noise per frame renders slightly different textures each time, which reads as flicker.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from talkstream.config import SamplerConfig

__all__ = ["SCHEDULES", "FewStepSampler", "NoiseSchedule", "session_noise"]

SCHEDULES = ("cosine", "linear")
MAX_STEPS = 4  # a distilled student: 1-4 steps
_COSINE_OFFSET = 0.008  # Nichol & Dhariwal's s: keeps beta_0 from vanishing
_MAX_BETA = 0.999  # their clip: avoids a singular last step
_LINEAR_BETA_RANGE = (1e-4, 2e-2)  # DDPM's linear schedule, defined for T = 1000


def _cosine_alpha_bar(num_timesteps: int) -> Tensor:
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps  # (T + 1,)
    f = torch.cos((steps + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2  # (T + 1,)
    # Betas from the continuous alpha-bar, clipped, then re-accumulated: exactly the discrete
    # schedule the paper trains with (alpha_bar stays > 0 at t = T - 1).
    betas = (1 - f[1:] / f[:-1]).clamp(max=_MAX_BETA)  # (T,)
    return torch.cumprod(1 - betas, dim=0)  # (T,)


def _linear_alpha_bar(num_timesteps: int) -> Tensor:
    # Scaled so that other T keep the same total noise as DDPM's T = 1000.
    lo, hi = (b * 1000 / num_timesteps for b in _LINEAR_BETA_RANGE)
    betas = torch.linspace(lo, hi, num_timesteps, dtype=torch.float64)  # (T,)
    return torch.cumprod(1 - betas, dim=0)  # (T,)


class NoiseSchedule:
    """Discrete forward-process schedule: ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``.

    Computed in float64 and stored as float32 tensors on the CPU; ``add_noise`` moves the few
    values it needs to the data's device.

    Raises:
        ValueError: unknown ``cfg.schedule`` (allowed: ``SCHEDULES``) or ``train_timesteps < 2``.
    """

    def __init__(self, cfg: SamplerConfig) -> None:
        if cfg.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown noise schedule {cfg.schedule!r}; expected one of {', '.join(SCHEDULES)}"
            )
        if cfg.train_timesteps < 2:
            raise ValueError(f"train_timesteps must be at least 2, got {cfg.train_timesteps}")
        self.name = cfg.schedule
        self.num_timesteps = cfg.train_timesteps
        build = _cosine_alpha_bar if cfg.schedule == "cosine" else _linear_alpha_bar
        ab64 = build(cfg.train_timesteps)  # (T,) float64
        self.alphas_cumprod = ab64.float()  # (T,)
        self.sqrt_alphas_cumprod = ab64.sqrt().float()  # (T,)
        self.sqrt_one_minus_alphas_cumprod = (1 - ab64).sqrt().float()  # (T,)
        # Python floats for the sampler: its coefficients are fixed, so no device lookups per step.
        self._ab_list: list[float] = ab64.tolist()

    def alpha_bar(self, t: Tensor | int) -> Tensor:
        """``alpha_bar`` at integer timesteps ``t`` (any shape), on ``t``'s device."""
        if isinstance(t, int):
            return self.alphas_cumprod[t]
        return self.alphas_cumprod.to(t.device)[t]

    def alpha_bar_value(self, t: int) -> float:
        """``alpha_bar`` at one timestep as a Python float (float64 precision)."""
        return self._ab_list[t]

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward process: ``sqrt(ab_t) * x0 + sqrt(1 - ab_t) * noise``.

        Args:
            x0: (B, ...) clean data.
            noise: same shape as ``x0``, standard normal.
            t: (B,) integer timesteps in ``[0, num_timesteps)``.

        Returns:
            x_t, same shape and dtype as ``x0``.
        """
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        if t.dim() != 1 or t.shape[0] != x0.shape[0]:
            raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
        bcast = (-1,) + (1,) * (x0.dim() - 1)
        a = self.sqrt_alphas_cumprod.to(x0.device)[t].view(bcast)  # (B, 1, ...)
        s = self.sqrt_one_minus_alphas_cumprod.to(x0.device)[t].view(bcast)  # (B, 1, ...)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Uniform training timesteps: (batch,) int64 on the generator's device (CPU if none)."""
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randint(
            0, self.num_timesteps, (batch,), generator=generator, device=device, dtype=torch.long
        )


ModelFn = Callable[..., Tensor]


class FewStepSampler:
    """Deterministic DDIM (eta = 0) over 1-4 fixed timesteps with an x0-predicting model.

    The timesteps are "trailing" (``round(T - i * T / steps) - 1``): the first is always
    ``T - 1``, the noisiest trained timestep, so step one sees what the student saw in training.

    Raises:
        ValueError: ``steps`` outside 1..4.
    """

    def __init__(self, schedule: NoiseSchedule, steps: int) -> None:
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(
                f"steps must be in 1..{MAX_STEPS} (a distilled few-step student), got {steps}"
            )
        self.schedule = schedule
        self.steps = steps
        T = schedule.num_timesteps
        self.timesteps: tuple[int, ...] = tuple(round(T - i * T / steps) - 1 for i in range(steps))
        # Per-transition DDIM coefficients t -> t_prev as Python floats:
        #   x_prev = sqrt(ab_prev) * x0 + sqrt(1 - ab_prev) * eps,
        #   eps    = (x_t - sqrt(ab_t) * x0) / sqrt(1 - ab_t).
        self._coeffs: list[tuple[float, float, float]] = []
        for t, t_prev in zip(self.timesteps[:-1], self.timesteps[1:], strict=True):
            ab_t, ab_prev = schedule.alpha_bar_value(t), schedule.alpha_bar_value(t_prev)
            ratio = math.sqrt((1 - ab_prev) / (1 - ab_t))  # scales the (x_t - sqrt(ab_t) x0) term
            self._coeffs.append((math.sqrt(ab_prev), ratio, math.sqrt(ab_t)))

    @classmethod
    def from_config(cls, cfg: SamplerConfig) -> FewStepSampler:
        """Schedule and step count from one ``SamplerConfig``."""
        return cls(NoiseSchedule(cfg), cfg.steps)

    def sample(self, model_fn: ModelFn, noise: Tensor, **cond: object) -> Tensor:
        """Run the sampler from ``noise`` (taken as x_{T-1}) and return the final x0 prediction.

        Args:
            model_fn: ``model_fn(x_t, t, **cond) -> x0``, ``t`` a (B,) int64 tensor.
            noise: (B, ...) starting noise, e.g. from ``session_noise``.
            **cond: conditioning passed through to ``model_fn`` (landmarks, reference features).

        Returns:
            (B, ...) the model's x0 at the last timestep.
        """
        x = noise  # (B, ...)
        batch = noise.shape[0]
        for t, (sqrt_ab_prev, ratio, sqrt_ab_t) in zip(
            self.timesteps[:-1], self._coeffs, strict=True
        ):
            x0 = model_fn(x, self._t_batch(t, batch, noise.device), **cond)  # (B, ...)
            x = sqrt_ab_prev * x0 + ratio * (x - sqrt_ab_t * x0)  # (B, ...) at t_prev
        return model_fn(x, self._t_batch(self.timesteps[-1], batch, noise.device), **cond)

    @staticmethod
    def _t_batch(t: int, batch: int, device: torch.device) -> Tensor:
        return torch.full((batch,), t, dtype=torch.long, device=device)  # (B,)


def session_noise(
    shape: tuple[int, ...] | torch.Size,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The fixed starting noise of a session: drawn once, reused for every frame.

    Drawn in float32 on the CPU from a private generator, then moved: the same seed gives the
    same noise on every device and dtype, and the global RNG is left untouched.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)
