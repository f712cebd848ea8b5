"""Noise schedule and the few-step x0-prediction sampler."""

from __future__ import annotations

import math

import pytest
import torch

from talkstream.config import SamplerConfig
from talkstream.engine.sampler import SCHEDULES, FewStepSampler, NoiseSchedule, session_noise


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_monotone_in_unit_interval(name):
    sched = NoiseSchedule(SamplerConfig(schedule=name))
    ab = sched.alphas_cumprod
    assert ab.dtype == torch.float32 and ab.shape == (1000,)
    assert torch.all(ab > 0) and torch.all(ab <= 1)
    assert torch.all(ab[1:] < ab[:-1])  # strictly more noise at every later step
    assert ab[0] > 0.99 and ab[-1] < 1e-3  # from nearly clean to nearly pure noise
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(sched.alpha_bar(t), ab[t])
    assert sched.alpha_bar_value(999) == pytest.approx(float(ab[-1]), rel=1e-6)


def test_cosine_schedule_matches_closed_form():
    sched = NoiseSchedule(SamplerConfig(schedule="cosine", train_timesteps=1000))
    s = 0.008

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    # Away from the clipped end the discrete product equals f(t/T) / f(0) (telescoping).
    for t in (0, 100, 500, 900):
        assert sched.alpha_bar_value(t) == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)


def test_unknown_schedule_names_the_allowed_ones():
    with pytest.raises(ValueError, match="cosine"):
        NoiseSchedule(SamplerConfig(schedule="sigmoid"))


def test_add_noise_statistics():
    sched = NoiseSchedule(SamplerConfig())
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((2, n), 0.5)
    noise = torch.randn(2, n, generator=g)
    t = torch.tensor([10, 700])
    xt = sched.add_noise(x0, noise, t)
    assert xt.shape == x0.shape and xt.dtype == x0.dtype
    for i in range(2):
        ab = sched.alpha_bar_value(int(t[i]))
        assert xt[i].mean().item() == pytest.approx(0.5 * math.sqrt(ab), abs=0.01)
        assert xt[i].std().item() == pytest.approx(math.sqrt(1 - ab), rel=0.01)
    # Exact per-element formula.
    ab_t = sched.alpha_bar(t)[:, None]  # (2, 1)
    torch.testing.assert_close(xt, ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * noise)


def test_add_noise_checks_shapes():
    sched = NoiseSchedule(SamplerConfig())
    with pytest.raises(ValueError, match="t must"):
        sched.add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1]))


def test_sample_timesteps_in_range_and_reproducible():
    sched = NoiseSchedule(SamplerConfig(train_timesteps=50))
    a = sched.sample_timesteps(4096, torch.Generator().manual_seed(3))
    b = sched.sample_timesteps(4096, torch.Generator().manual_seed(3))
    assert a.dtype == torch.long and a.shape == (4096,)
    assert torch.equal(a, b)
    assert int(a.min()) == 0 and int(a.max()) == 49


@pytest.mark.parametrize("steps", [0, 5, -1])
def test_steps_out_of_range(steps):
    with pytest.raises(ValueError, match=r"1\.\.4"):
        FewStepSampler(NoiseSchedule(SamplerConfig()), steps)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [(1, (999,)), (2, (999, 499)), (3, (999, 666, 332)), (4, (999, 749, 499, 249))],
)
def test_timesteps_descend_from_last(steps, expected):
    sampler = FewStepSampler(NoiseSchedule(SamplerConfig()), steps)
    assert sampler.timesteps == expected


class _Recorder:
    """A model that predicts a fixed x0 and records what it was called with."""

    def __init__(self, x0: torch.Tensor) -> None:
        self.x0 = x0
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def __call__(self, x_t, t, **cond):
        self.calls.append((x_t.clone(), t.clone(), cond))
        return self.x0.clone()


def test_one_step_returns_model_x0_at_last_timestep():
    sampler = FewStepSampler.from_config(SamplerConfig(steps=1))
    noise = session_noise((2, 3, 4, 4), seed=1)
    x0 = torch.randn(2, 3, 4, 4)
    model = _Recorder(x0)
    out = sampler.sample(model, noise, landmarks="lm", ref="r")
    assert torch.equal(out, x0)
    assert len(model.calls) == 1
    x_t, t, cond = model.calls[0]
    assert torch.equal(x_t, noise)
    assert t.dtype == torch.long and t.tolist() == [999, 999]
    assert cond == {"landmarks": "lm", "ref": "r"}


@pytest.mark.parametrize("steps", [2, 4])
def test_ddim_with_fixed_x0_model_converges_exactly(steps):
    sched = NoiseSchedule(SamplerConfig())
    sampler = FewStepSampler(sched, steps)
    noise = session_noise((3, 3, 8, 8), seed=7, dtype=torch.float64)
    x0 = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    model = _Recorder(x0)
    out = sampler.sample(model, noise)
    assert torch.equal(out, x0)
    assert [int(c[1][0]) for c in model.calls] == list(sampler.timesteps)
    # Every intermediate x_t is exactly on the DDIM path: x_t = sqrt(ab_t) x0 + sqrt(1-ab_t) eps,
    # with the eps implied by the starting noise.
    ab_first = sched.alpha_bar_value(sampler.timesteps[0])
    eps = (noise - math.sqrt(ab_first) * x0) / math.sqrt(1 - ab_first)
    for x_t, t, _ in model.calls[1:]:
        ab = sched.alpha_bar_value(int(t[0]))
        expected = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
        torch.testing.assert_close(x_t, expected, rtol=1e-12, atol=1e-12)


def test_session_noise_deterministic_by_seed():
    a = session_noise((1, 3, 16, 16), seed=5)
    b = session_noise((1, 3, 16, 16), seed=5)
    c = session_noise((1, 3, 16, 16), seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.float32
    assert abs(a.mean().item()) < 0.2 and 0.8 < a.std().item() < 1.2
    # Same values in another dtype (drawn in fp32, then cast), and the global RNG is untouched.
    state = torch.random.get_rng_state()
    half = session_noise((1, 3, 16, 16), seed=5, dtype=torch.bfloat16)
    assert torch.equal(half, a.to(torch.bfloat16))
    assert torch.equal(torch.random.get_rng_state(), state)
