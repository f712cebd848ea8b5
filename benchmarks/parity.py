"""Speed parity against a baseline commit: the same model, old code against new, in one run.

    python benchmarks/parity.py [--base 204e0f1] [--backends onnxruntime,torch]
        [--rounds 12] [--frames 25] [--threads 1] [--json out.json]

The baseline's tree is exported with ``git archive`` into a temporary folder (the checkout, its
branch and its worktree list are left alone). Two worker processes per backend, one importing
the baseline's ``talkstream``, one this tree's, load the same shipped checkpoint (this tree's
``talkstream/assets/models/tiny``) on the CPU with the same thread count, prepare the same
avatar and warm up. Then they take turns: a round is ``--frames`` frames on one side, then on the
other (who goes first alternates), ``--rounds`` rounds; only one side runs at a time. Per frame
(one frame per call, as a live stream renders):

- ``core``: the engine's work for a frame: take the due item, ``Engine.render`` and the
  paste-back (inside ``render`` in the baseline; ``Session.compose`` after it here);
- ``whole``: core + yuv420p (swscale, as the video track converts a host frame) + aiortc's
  ``Vp8Encoder`` (what ``serve`` sends), i.e. to the VP8 packet.

Audio is pushed between frames (untimed). Printed: the median of each side, new/old, and the
median of the per-round ratios (robust to load drifting over the run); the issue's target: new
at most 5 % slower than old (exit status 1 otherwise). Run it on a quiet machine: other load
makes both sides noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.05

# The worker: runs inside one tree (PYTHONPATH), speaks JSON lines on stdin/stdout. It adapts to
# both engine APIs: Engine(cfg) and render -> frames (baseline), load_engine and render -> faces
# + Session.compose (this tree).
WORKER = r"""
import json, sys, time
import numpy as np
import torch

backend, checkpoint, threads, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
from pathlib import Path
import soundfile
from av import VideoFrame
from aiortc.codecs.vpx import Vp8Encoder
from fractions import Fraction
import talkstream
from talkstream.config import AvatarConfig, EngineConfig
from talkstream.engine.avatar import default_image, default_landmarks, prepare_avatar

acfg = AvatarConfig(cache_dir=Path(cache), framing="full")
cfg = EngineConfig(preset="tiny", checkpoint=Path(checkpoint), backend=backend, threads=threads,
                   avatar=acfg)
try:
    from talkstream.runtime import load_engine
    engine = load_engine(cfg)
except ImportError:
    from talkstream.engine.pipeline import Engine
    engine = Engine(cfg)
avatar = prepare_avatar(default_image(), AvatarConfig(crop_size=engine.crop_size, framing="full"),
                        landmarks=default_landmarks())
session = engine.session(avatar, seed=0)
session.max_batch = 1
wav = Path(talkstream.__file__).parent / "assets" / "sample_speech.wav"
pcm, rate = soundfile.read(str(wav), dtype="float32")
pcm = np.tile(pcm, 40)
cursor = 0
encoder = Vp8Encoder()
pts = 0

def push_frame():
    global cursor
    for _ in range(2):  # 40 ms in 20 ms chunks
        session.push_audio(pcm[cursor:cursor + 320], 16000)
        cursor += 320

def one():
    global pts
    while not session.has_ready():
        push_frame()
    t0 = time.perf_counter()
    items = session.take_ready()
    out = engine.render(items)
    frames = out if isinstance(out, list) else session.compose(items, out)
    image = frames[0].image
    t1 = time.perf_counter()
    h, w = image.shape[0] - image.shape[0] % 2, image.shape[1] - image.shape[1] % 2
    rgb = VideoFrame.from_ndarray(np.ascontiguousarray(image[:h, :w]), format="rgb24")
    yuv = rgb.reformat(format="yuv420p").to_ndarray()
    vf = VideoFrame.from_ndarray(yuv, format="yuv420p")
    vf.pts = pts * 3600
    vf.time_base = Fraction(1, 90000)
    pts += 1
    payloads, _ = encoder.encode(vf, False)
    t2 = time.perf_counter()
    assert payloads
    return t1 - t0, t2 - t0

with torch.inference_mode():
    for _ in range(15):
        one()
    print(json.dumps({"ready": engine.backend.describe(), "file": talkstream.__file__}),
          flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        core, whole = [], []
        for _ in range(int(cmd[1])):
            c, w = one()
            core.append(c)
            whole.append(w)
        print(json.dumps({"core": core, "whole": whole}), flush=True)
engine.close()
"""


def export_tree(commit: str, dest: Path) -> Path:
    """``commit``'s files under ``dest`` (``git archive``: read-only for the repository)."""
    tar = dest / "tree.tar"
    with open(tar, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", commit], stdout=f, check=True)
    tree = dest / "tree"
    tree.mkdir()
    with tarfile.open(tar) as t:
        t.extractall(tree, filter="data")
    tar.unlink()
    return tree


class Worker:
    def __init__(self, tree: Path, backend: str, checkpoint: Path, threads: int, cache: Path):
        env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, backend, str(checkpoint), str(threads), str(cache)],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._read()
        if not str(self.info.get("file", "")).startswith(str(tree)):
            raise RuntimeError(f"worker imported {self.info.get('file')}, not the tree {tree}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited (code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def run(self, frames: int) -> dict[str, list[float]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"run {frames}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def compare(old: Worker, new: Worker, rounds: int, frames: int) -> dict[str, dict[str, Any]]:
    samples: dict[str, dict[str, list[float]]] = {
        side: {"core": [], "whole": []} for side in ("old", "new")
    }
    ratios: dict[str, list[float]] = {"core": [], "whole": []}
    for r in range(rounds):
        order = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
        got = {}
        for side, w in order:
            got[side] = w.run(frames)
            for k in ("core", "whole"):
                samples[side][k] += got[side][k]
        for k in ("core", "whole"):
            ratios[k].append(float(np.median(got["new"][k]) / np.median(got["old"][k])))
    out: dict[str, dict[str, Any]] = {}
    for k in ("core", "whole"):
        o = float(np.median(samples["old"][k])) * 1e3
        n = float(np.median(samples["new"][k])) * 1e3
        out[k] = {
            "old_ms": round(o, 3),
            "new_ms": round(n, 3),
            "ratio": round(n / o, 4),
            "ratio_of_rounds": round(float(np.median(ratios[k])), 4),
            "frames_per_side": len(samples["old"][k]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="204e0f1", help="baseline commit (204e0f1)")
    ap.add_argument("--backends", default="onnxruntime,torch")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--frames", type=int, default=25, help="frames per side per round")
    ap.add_argument("--threads", type=int, default=1, help="torch/onnxruntime threads (1)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args(argv)
    checkpoint = ROOT / "talkstream" / "assets" / "models" / "tiny"
    results: dict[str, Any] = {
        "base": args.base,
        "head": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        + " + working tree",
        "threads": args.threads,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "backends": {},
    }
    ok = True
    with tempfile.TemporaryDirectory(prefix="talkstream-parity-") as tmp:
        base_tree = export_tree(args.base, Path(tmp))
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            t0 = time.perf_counter()
            print(f"{backend}: loading both sides ...", flush=True)
            old = Worker(base_tree, backend, checkpoint, args.threads, Path(tmp) / "cache-old")
            try:
                new = Worker(ROOT, backend, checkpoint, args.threads, Path(tmp) / "cache-new")
                try:
                    res = compare(old, new, args.rounds, args.frames)
                finally:
                    new.close()
            finally:
                old.close()
            res["old_backend"] = old.info["ready"]
            res["new_backend"] = new.info["ready"]
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            results["backends"][backend] = res
            for k in ("core", "whole"):
                r = res[k]
                # The target: the refactor costs no speed (new at most 5 % slower).
                q = r["ratio_of_rounds"]
                verdict = "ok" if q <= 1 + TARGET else f"SLOWER by {100 * (q - 1):.0f} %"
                if q < 1 - TARGET:
                    verdict = f"ok (faster by {100 * (1 - q):.0f} %)"
                ok &= verdict.startswith("ok")
                print(
                    f"{backend:12s} {k:5s} old {r['old_ms']:8.2f} ms  new {r['new_ms']:8.2f} ms  "
                    f"new/old {r['ratio']:.3f} (median of rounds {r['ratio_of_rounds']:.3f}) "
                    f"{verdict}",
                    flush=True,
                )
    results["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average {results['load_avg_start']} -> {results['load_avg_end']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
