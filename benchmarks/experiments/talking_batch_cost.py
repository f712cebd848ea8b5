"""What a many-identity training batch costs on this CPU: the numbers behind docs/decisions.md
("Talking frames are rendered on the fly, in a forked data process").

    python benchmarks/experiments/talking_batch_cost.py [RUN]   # RUN: a finished --faces run

Needs a run folder with the face set and the corpus (default runs/default_tiny). Prints the
median cost of building one face's mesh, of rendering one augmented training pair, of a batch
of 16 pairs of 16 identities (one core, this process), and of one teacher step on such a batch
with 2 torch threads.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np
import torch

from talkstream.config import SamplerConfig
from talkstream.engine.denoiser import DenoiserConfig, TalkFormerDenoiser
from talkstream.engine.sampler import NoiseSchedule
from talkstream.training.config import TeacherStageConfig
from talkstream.training.dataset import load_dataset
from talkstream.training.faces import load_face_set
from talkstream.training.frames import FrameRenderer
from talkstream.training.talking import TalkingFaces
from talkstream.training.trainer import DiffusionTask


def main() -> None:
    run = sys.argv[1] if len(sys.argv) > 1 else "runs/default_tiny"
    logging.getLogger("talkstream.training.frames").setLevel(logging.ERROR)
    faces = load_face_set(f"{run}/faces").subset("train")
    data = TalkingFaces(load_dataset(f"{run}/corpus", "train", frames=False), faces)
    t = []
    for j in range(20):
        t0 = time.perf_counter()
        FrameRenderer(faces.crops[j], faces.neutral[j])
        t.append(time.perf_counter() - t0)
    print(f"mesh of one face: {1000 * np.median(t):.1f} ms")
    for j in range(64):  # warm the mesh cache for the identities the batches below use
        data._renderer(j)
    rng = np.random.default_rng(0)
    t = []
    for _ in range(48):
        t0 = time.perf_counter()
        data.render_sample(0, 5, rng, identity=int(rng.integers(64)))
        t.append(time.perf_counter() - t0)
    print(f"one augmented pair (mesh cached): {1000 * np.median(t):.1f} ms")
    t = []
    picks_rng = np.random.default_rng(1)
    for _ in range(5):
        clips, frames = data.sample_frames(picks_rng, 16)
        t0 = time.perf_counter()
        batch = data.frame_arrays(picks_rng, 16, picks=(clips, frames))
        t.append(time.perf_counter() - t0)
    print(f"batch of 16 pairs: {np.median(t):.3f} s (meshes partly cold)")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = TalkFormerDenoiser(DenoiserConfig())
    task = DiffusionTask(net, NoiseSchedule(SamplerConfig()), TeacherStageConfig())
    opt = torch.optim.AdamW(net.parameters())
    b = data.batch_from_arrays(batch)
    t = []
    for _ in range(6):
        t0 = time.perf_counter()
        ts = torch.randint(0, 1000, (16,))
        loss = task(b.x0, b.landmarks, b.refs, b.ref_index, ts, torch.randn_like(b.x0))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        t.append(time.perf_counter() - t0)
    print(f"teacher step, 16 identities, 2 threads: {np.median(t[1:]):.3f} s")


if __name__ == "__main__":
    main()
