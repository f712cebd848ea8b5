"""Concurrency scenario of benchmarks/stream_latency.py with every Engine.render timed.

    python benchmarks/experiments/engine_in_server.py MAX_SESSIONS COMPUTE_BUDGET_MS THREADS BACKEND
    # 2026-11-25, median engine call for one frame:
    python benchmarks/experiments/engine_in_server.py 2 60 2 torch        # 36.7 ms
    python benchmarks/experiments/engine_in_server.py 3 60 1 torch        # 1 frame 26.5 ms
    python benchmarks/experiments/engine_in_server.py 3 60 2 onnxruntime  # 1 frame 13.0 ms

(2-core dev CPU, shipped model, clients in their own process, nothing else running.) Prints the
skipped share per session count and the median/p90 time of an engine call per batch size.
"""

import argparse
import asyncio
import importlib.util
import sys
import time

import numpy as np

from talkstream.config import AvatarConfig
from talkstream.engine.avatar import default_image, default_landmarks, prepare_avatar

spec = importlib.util.spec_from_file_location("sl", "benchmarks/stream_latency.py")
assert spec is not None and spec.loader is not None
sl = importlib.util.module_from_spec(spec)
sys.modules["sl"] = sl
spec.loader.exec_module(sl)

ap = argparse.Namespace(
    audio_lead_ms=None,
    backend=sys.argv[4],
    threads=int(sys.argv[3]),
    lookahead=None,
    checkpoint="talkstream/assets/models/tiny",
    landmark_gain=30.0,
    compute_budget_ms=float(sys.argv[2]),
    jitter_budget_ms=40.0,
    max_concurrent=int(sys.argv[1]),
    level_s=8.0,
    drop_threshold=1.0,
)
eng = sl.build_engine(ap)
av = prepare_avatar(default_image(), AvatarConfig(), landmarks=default_landmarks())
eng.warmup(av)
rec = []
orig = eng.render


def timed(items):
    t = time.perf_counter()
    r = orig(items)
    rec.append((len(items), time.perf_counter() - t))
    return r


eng.render = timed
levels = asyncio.run(sl.concurrency_scenario(ap, eng, av))
n = np.array(rec)
for k in sorted(set(n[:, 0])):
    sel = n[n[:, 0] == k][:, 1]
    print(
        f"batch {int(k)}: calls {len(sel)}, median {1000 * np.median(sel):.1f} ms, "
        f"p90 {1000 * np.percentile(sel, 90):.1f}"
    )
