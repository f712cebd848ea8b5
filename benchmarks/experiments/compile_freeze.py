"""torch.compile on CPU with and without inductor freezing, the shipped tiny denoiser alone.

    python benchmarks/experiments/compile_freeze.py THREADS FREEZE [MODE]
    python benchmarks/experiments/compile_freeze.py 1 0     # 2026-11-25: 1.03x over eager
    python benchmarks/experiments/compile_freeze.py 1 1     # 1.28x
    python benchmarks/experiments/compile_freeze.py 1 1 max-autotune   # 1.20x

(2-core dev CPU, one thread, while a training run used the other core: ratios, not absolute
times, are what these runs are good for.)
"""

import sys
import time

import torch
import torch._inductor.config as ic

from talkstream.engine.checkpoint import load_checkpoint
from talkstream.engine.pipeline import default_checkpoint

threads = int(sys.argv[1])
freeze = sys.argv[2] == "1"
torch.set_num_threads(threads)
ic.freezing = freeze
models = load_checkpoint(default_checkpoint("tiny"))
d = models.denoiser.eval()
s = 128
with torch.inference_mode():
    ref = d.encode_reference(torch.zeros(1, 3, s, s))
    noise = torch.randn(1, 3, s, s)
    lm = torch.zeros(1, 68, 2)
    t = torch.zeros(1, dtype=torch.long)

    def bench(f, n=100):
        for _ in range(10):
            f()
        ts = []
        for _ in range(n):
            a = time.perf_counter()
            f()
            ts.append(time.perf_counter() - a)
        ts.sort()
        return ts[len(ts) // 2] * 1000

    e = bench(lambda: d(noise, t, lm, ref))
    t0 = time.perf_counter()
    mode = sys.argv[3] if len(sys.argv) > 3 else None
    c = torch.compile(d, dynamic=False, mode=mode)
    c(noise, t, lm, ref)
    print("compile s", time.perf_counter() - t0)
    cc = bench(lambda: c(noise, t, lm, ref))
    e2 = bench(lambda: d(noise, t, lm, ref))
    print(
        f"threads {threads} freeze {freeze}: eager {e:.2f}/{e2:.2f} ms, "
        f"compiled {cc:.2f} ms, ratio {min(e, e2) / cc:.2f}"
    )
    out_e = d(noise, t, lm, ref)
    out_c = c(noise, t, lm, ref)
    print("maxdiff", (out_e - out_c).abs().max().item())
