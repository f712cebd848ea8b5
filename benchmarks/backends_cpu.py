"""Per-frame cost of each backend on this CPU, and the whole frame through the engine.

    python benchmarks/backends_cpu.py [--backends torch,onnxruntime,compiled] [--iters 200]
                                      [--threads 2] [--json out.json]

Scenarios (one per backend, ``tiny`` preset, batch 1, fp32):

- ``step``: what a frame costs in the networks: motion (one window) + the one-step sampler
  (one denoiser call), called through the backend exactly as ``Engine.render`` calls them;
- ``frame``: ``Session.render_ready`` of one frame (``Engine.render``: motion, idle offsets,
  denoiser; then the session's paste-back into the 512x512 photo) plus the RGB -> I420
  conversion the encoder needs.

Warm-up (export, session creation, compilation) is timed on its own and never mixed into the
samples. Backends are timed round by round (A, B, A, B, ...) so that on a shared machine every
backend sees the same load and the ratios stay meaningful even when the absolute numbers do
not. Reports p50/p90/p99 and fps per scenario, the speed-up of each backend's step over torch
eager, and the checks of issue 6 (best step >= 1.5x eager, frame p50 <= 30 ms). The load
average is printed: on a busy shared machine the absolute numbers are not worth keeping.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from talkstream.config import AvatarConfig, EngineConfig
from talkstream.engine.avatar import default_image, default_landmarks, prepare_avatar
from talkstream.engine.checkpoint import Models
from talkstream.engine.pipeline import Engine, Session
from talkstream.export.backends import get_backend
from talkstream.kernels.post import rgb_to_i420
from talkstream.runtime import load_engine

TARGET_SPEEDUP = 1.5
TARGET_FRAME_MS = 30.0


@dataclass(frozen=True)
class Scenario:
    backend: str
    preset: str = "tiny"
    iters: int = 200
    warmup: int = 20
    threads: int = 2


@dataclass
class Result:
    scenario: Scenario
    setup_s: float  # export / compile / session creation: start-up, not per frame
    step_ms: list[float] = field(default_factory=list)
    frame_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "backend": self.scenario.backend,
            "setup_s": round(self.setup_s, 2),
            "step": _stats(self.step_ms),
            "frame": _stats(self.frame_ms),
        }


def _stats(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {}
    q = np.percentile(ms, [50, 90, 99])
    return {
        "p50_ms": round(float(q[0]), 3),
        "p90_ms": round(float(q[1]), 3),
        "p99_ms": round(float(q[2]), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "fps_p50": round(1000.0 / float(q[0]), 1),
    }


def _once(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@dataclass
class Bench:
    """One backend's engine, ready to time: its per-frame step and whole-frame callables."""

    result: Result
    engine: Engine
    step: Any
    frame: Any


def _split_label(label: str) -> tuple[str, str | None]:
    """``onnxruntime:off`` -> (``onnxruntime``, ``off``): a backend and its spinning policy."""
    name, _, spin = label.partition(":")
    return name, spin or None


def setup(sc: Scenario, cache_dir: Path) -> Bench:
    """Build the engine and the callables; start-up (export, compile) is timed here."""
    torch.set_num_threads(sc.threads)
    name, spin = _split_label(sc.backend)
    cfg = EngineConfig(
        preset=sc.preset,
        backend=name,
        threads=sc.threads,
        avatar=AvatarConfig(cache_dir=cache_dir),
    )
    t0 = time.perf_counter()
    # The config carries no onnxruntime spinning policy: the one this script compares.
    extra = {} if spin is None else {"ort_spinning": spin}
    engine = load_engine(cfg, Models.random_init(sc.preset, seed=0), **extra)
    avatar = prepare_avatar(default_image(), cfg.avatar, landmarks=default_landmarks())
    features = engine.encode_avatar(avatar)

    # step: motion + one-step sampler through the backend, batch 1, as Engine.render calls them
    mc = engine.motion.cfg
    gen = torch.Generator().manual_seed(0)
    windows = torch.randn(1, mc.window, mc.mel_rows, mc.n_mels, generator=gen) * 3 - 6
    neutral = torch.from_numpy(features.neutral)[None].float()  # (1, 68, 2)
    s = engine.crop_size
    noise = torch.randn(1, 3, s, s, generator=gen)

    def step() -> None:
        with torch.inference_mode():
            disp = engine.backend.motion(windows, neutral, None)  # (1, 37, 2)
            target = engine.motion.apply_displacement(neutral, disp)  # (1, 68, 2)
            engine.backend.sample(engine.sampler, noise, target, features.ref)

    # frame: one frame rendered and pasted (Session.render_ready) + I420, as a live session does
    session = Session(engine, avatar, seed=0, max_batch=1)
    session.push_audio(_speech(sc.iters + sc.warmup + 2), 16000)
    i420 = np.empty((avatar.image.shape[0] * 3 // 2, avatar.image.shape[1]), np.uint8)

    def frame() -> None:
        (f,) = session.render_ready()
        rgb_to_i420(f.image, out=i420)

    step()  # first call: lazy builds (compilation) belong to start-up, not to the samples
    return Bench(Result(sc, time.perf_counter() - t0), engine, step, frame)


def run_interleaved(benches: list[Bench], iters: int, warmup: int) -> None:
    """Time every backend round by round (A, B, A, B, ...) so all see the same machine load."""
    for what in ("step", "frame"):
        for i in range(warmup + iters):
            for b in benches:
                ms = _once(getattr(b, what))
                if i >= warmup:
                    getattr(b.result, f"{what}_ms").append(ms)


def _speech(n_frames: int) -> np.ndarray:
    # Enough voiced-looking audio for n_frames video frames (40 ms each) plus the lookahead.
    n = (n_frames + 8) * 640
    t = np.arange(n) / 16000
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    rng = np.random.default_rng(0)
    sig = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.standard_normal(n)
    return (env * sig).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backends", default="torch,onnxruntime", help="comma-separated")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write all samples here")
    p.add_argument(
        "--isolate",
        action="store_true",
        help="time each backend in its own process (thread pools of different runtimes in one "
        "process slow each other down), alternating backends for --rounds rounds",
    )
    p.add_argument("--rounds", type=int, default=2, help="with --isolate: rounds of processes")
    a = p.parse_args(argv)
    if a.isolate:
        return isolated(a)

    print(f"load average before: {os.getloadavg()}; torch {torch.__version__}")
    benches: list[Bench] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name in a.backends.split(","):
                ok, why = get_backend(_split_label(name)[0]).available("cpu", "float32")
                if not ok:
                    print(f"skip {name}: {why}")
                    continue
                sc = Scenario(name, iters=a.iters, warmup=a.warmup, threads=a.threads)
                benches.append(setup(sc, Path(tmp)))
                print(f"{name:12s} start-up {benches[-1].result.setup_s:6.1f} s", flush=True)
            run_interleaved(benches, a.iters, a.warmup)
        finally:
            for b in benches:
                b.engine.close()
    results = [b.result for b in benches]
    return report(results, a.json)


def isolated(a: argparse.Namespace) -> int:
    """Each backend in a fresh process per round (A, B, A, B across rounds); samples merged."""
    import subprocess

    print(f"load average before: {os.getloadavg()}; torch {torch.__version__}; isolated")
    merged: dict[str, Result] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(a.rounds):
            for label in a.backends.split(","):
                out = Path(tmp) / f"{rnd}-{label.replace(':', '_')}.json"
                cmd = [
                    sys.executable, __file__, "--backends", label, "--iters", str(a.iters),
                    "--warmup", str(a.warmup), "--threads", str(a.threads), "--json", str(out),
                ]  # fmt: skip
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0 or not out.is_file():
                    print(f"{label}: failed\n{done.stderr[-2000:]}")
                    continue
                for r in json.loads(out.read_text())["results"]:
                    res = merged.setdefault(
                        label,
                        Result(
                            Scenario(label, iters=a.iters, warmup=a.warmup, threads=a.threads), 0.0
                        ),
                    )
                    res.setup_s = max(res.setup_s, r["setup_s"])
                    res.step_ms += r["step_ms"]
                    res.frame_ms += r["frame_ms"]
                    print(f"  round {rnd}: {label:18s} step p50 {r['step']['p50_ms']:.2f} ms, "
                          f"frame p50 {r['frame']['p50_ms']:.2f} ms", flush=True)  # fmt: skip
    return report(list(merged.values()), a.json)


def report(results: list[Result], json_out: Path | None) -> int:
    for res in results:
        r = res.summary()
        print(
            f"{r['backend']:12s} step p50 {r['step']['p50_ms']:7.2f} p90 {r['step']['p90_ms']:7.2f}"
            f" ms | frame p50 {r['frame']['p50_ms']:7.2f} p90 {r['frame']['p90_ms']:7.2f} ms "
            f"({r['frame']['fps_p50']} fps)"
        )
    print(f"load average after: {os.getloadavg()}")
    by_name = {r.scenario.backend: r.summary() for r in results}
    if "torch" in by_name:
        eager = by_name["torch"]["step"]["p50_ms"]
        best = min(by_name, key=lambda n: by_name[n]["step"]["p50_ms"])
        speedup = eager / by_name[best]["step"]["p50_ms"]
        frame = by_name[best]["frame"]["p50_ms"]
        for n, r in by_name.items():
            print(f"  {n:12s} step speed-up over torch eager: {eager / r['step']['p50_ms']:.2f}x")
        ok1, ok2 = speedup >= TARGET_SPEEDUP, frame <= TARGET_FRAME_MS
        print(f"best: {best}: {speedup:.2f}x eager (target >= {TARGET_SPEEDUP}x: "
              f"{'met' if ok1 else 'NOT met'}); frame p50 {frame:.2f} ms "
              f"(target <= {TARGET_FRAME_MS} ms: {'met' if ok2 else 'NOT met'})")  # fmt: skip
    if json_out is not None:
        json_out.write_text(
            json.dumps(
                {
                    "load_average_after": os.getloadavg(),
                    "results": [
                        {
                            **asdict(r.scenario),
                            **r.summary(),
                            "step_ms": r.step_ms,
                            "frame_ms": r.frame_ms,
                        }
                        for r in results
                    ],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
