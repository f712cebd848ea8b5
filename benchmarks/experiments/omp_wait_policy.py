"""A teacher step of the tiny denoiser on a batch of many identities, with another process busy.

Reproduces the figure behind `docs/decisions.md` ("Training sets OMP_WAIT_POLICY=PASSIVE"):
run it twice, with and without the variable, e.g.

    python benchmarks/experiments/omp_wait_policy.py            # OpenMP default (spinning)
    OMP_WAIT_POLICY=PASSIVE python benchmarks/experiments/omp_wait_policy.py

It starts one busy process (a numpy loop, as the trainer's data process is), then times 6 training
steps with 2 torch threads and prints the median of the last 5. Random data: the step's cost does
not depend on the pixels.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np


def _busy(stop: float) -> None:
    a = np.random.default_rng(0).random((128, 128))
    while time.time() < stop:
        a = np.sqrt(a * a + 1e-3)


def main() -> None:
    import torch

    from talkstream.config import SamplerConfig
    from talkstream.engine.denoiser import DenoiserConfig, TalkFormerDenoiser
    from talkstream.engine.sampler import NoiseSchedule
    from talkstream.training.config import TeacherStageConfig
    from talkstream.training.trainer import DiffusionTask

    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = TalkFormerDenoiser(DenoiserConfig())
    task = DiffusionTask(net, NoiseSchedule(SamplerConfig()), TeacherStageConfig())
    opt = torch.optim.AdamW(net.parameters())
    b = 16
    x0 = torch.rand(b, 3, 128, 128) * 2 - 1
    refs = torch.rand(b, 3, 128, 128) * 2 - 1
    lm = torch.rand(b, 68, 2) * 1.2 - 0.6
    busy = mp.get_context("spawn").Process(target=_busy, args=(time.time() + 120,))
    busy.start()
    try:
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            t = torch.randint(0, 1000, (b,))
            loss = task(x0, lm, refs, torch.arange(b), t, torch.randn_like(x0))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    finally:
        busy.terminate()
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    print(f"OMP_WAIT_POLICY={policy}: median step {np.median(times[1:]):.3f} s (2 threads)")


if __name__ == "__main__":
    main()
