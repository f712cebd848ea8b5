"""Where an onnxruntime frame's time goes inside Engine.render, per spinning policy.

    python benchmarks/experiments/ort_spin_parts.py SPINNING MOTION_ONE_THREAD
    python benchmarks/experiments/ort_spin_parts.py off 0   # 2026-11-25: motion 0.71 ms/call
    python benchmarks/experiments/ort_spin_parts.py run 0   # motion 3.12 ms/call
    python benchmarks/experiments/ort_spin_parts.py off 1   # motion 0.54 ms/call
    python benchmarks/experiments/ort_spin_parts.py run 1   # motion 0.56 ms/call

(2-core dev CPU, random-weight tiny, 2 threads, nothing else running; medians of 200-300 calls;
noisy from run to run, see benchmarks/backends_cpu.py --isolate for the comparison to quote.)
"""

import sys
import time

import numpy as np
import torch

from talkstream.config import EngineConfig
from talkstream.engine.avatar import default_image, default_landmarks, prepare_avatar
from talkstream.engine.checkpoint import Models
from talkstream.kernels.post import rgb_to_i420
from talkstream.runtime import load_engine

compose = sys.modules["talkstream.engine.compose"]

spin = sys.argv[1]
torch.set_num_threads(2)
cfg = EngineConfig(backend="onnxruntime", threads=2)
eng = load_engine(
    cfg,
    Models.random_init("tiny", seed=0),
    ort_spinning=spin,
    ort_motion_one_thread=sys.argv[2] == "1",
)
av = prepare_avatar(default_image(), cfg.avatar, landmarks=default_landmarks())
s = eng.session(av)
s.max_batch = 1
s.push_audio((np.random.default_rng(0).standard_normal(16000 * 30) * 0.1).astype(np.float32), 16000)
i420 = np.empty((av.image.shape[0] * 3 // 2, av.image.shape[1]), np.uint8)
T = {"take": [], "render": [], "i420": [], "paste_only": []}
img = av.image.copy()
for _i in range(300):
    t0 = time.perf_counter()
    items = s.take_ready()
    t1 = time.perf_counter()
    (f,) = s.compose(items, eng.render(items))
    t2 = time.perf_counter()
    rgb_to_i420(f.image, out=i420)
    t3 = time.perf_counter()
    T["take"].append(t1 - t0)
    T["render"].append(t2 - t1)
    T["i420"].append(t3 - t2)
print(spin, {k: round(np.median(v) * 1000, 2) for k, v in T.items() if v})
P = {"motion": [], "sample": [], "paste": []}


def wrap(obj, name, key):
    fn = getattr(obj, name)

    def w(*a, **k):
        t = time.perf_counter()
        r = fn(*a, **k)
        P[key].append(time.perf_counter() - t)
        return r

    setattr(obj, name, w)


wrap(eng.backend, "motion", "motion")
wrap(eng.backend, "sample", "sample")
wrap(compose, "paste_back", "paste")  # the name the post stage (Compositor) calls
for _i in range(200):
    items = s.take_ready()
    s.compose(items, eng.render(items))
print(spin, {k: round(np.median(v) * 1000, 2) for k, v in P.items()})
