"""Pixel-space warp output vs the plain U-Net output, teachers trained identically.

Behind `docs/decisions.md` ("Any face from one photo"). Two teacher-stage runs of the default
config on the same face set and corpus, differing only in `denoiser_arch.pixel_warp`, stopped at
the same step (the same data, seeded by step; the same learning-rate schedule)::

    talkstream train --config configs/default_tiny.json --faces DIR --out runs/ablate_warp \\
        --stage teacher --set 'data.faces_cache="runs/default_tiny/faces"' \\
        --set 'data.corpus="runs/default_tiny/corpus"' --set export=null
    talkstream train ... --out runs/ablate_nowarp --set 'denoiser_arch={"pixel_warp": false}' ...
    # stop both after the state of step N is written (ckpt_every 250), then:
    python benchmarks/experiments/pixel_warp_ablation.py runs/ablate_warp runs/ablate_nowarp

On held-out identities (never trained on), for the same synthetic talking frames (no
augmentation), it samples each teacher with 10-step DDIM from the same noise and reports PSNR
against the true frame (whole crop and mouth box) and dlib's identity distance of the sampled
crop to the reference photo.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from talkstream.config import SamplerConfig
from talkstream.engine.denoiser import DenoiserConfig, TalkFormerDenoiser
from talkstream.engine.sampler import NoiseSchedule
from talkstream.training.augment import AugmentConfig
from talkstream.training.dataset import load_dataset
from talkstream.training.distill import DDIMSampler
from talkstream.training.faces import load_face_set
from talkstream.training.identity import FaceIdentity
from talkstream.training.talking import TalkingFaces


def teacher(run: Path) -> tuple[TalkFormerDenoiser, int]:
    state = sorted((run / "state" / "teacher").glob("step_*"))[-1]
    cfg = json.loads((run / "config.json").read_text())
    arch = {**DenoiserConfig().to_dict(), **cfg.get("denoiser_arch", {})}
    net = TalkFormerDenoiser(DenoiserConfig.from_dict(arch))
    w = load_file(str(state / "weights.safetensors"))
    pre = "ema.denoiser."
    net.load_state_dict({k[len(pre) :]: v for k, v in w.items() if k.startswith(pre)})
    return net.eval(), int(state.name.split("_")[1])


def main() -> None:
    runs = [Path(a) for a in sys.argv[1:3]]
    n_faces = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    torch.set_num_threads(2)
    faces = load_face_set("runs/default_tiny/faces").subset("heldout")
    base = load_dataset("runs/default_tiny/corpus", "train", frames=False)
    data = TalkingFaces(base, faces, AugmentConfig(enabled=False))
    measure = FaceIdentity()
    sched = NoiseSchedule(SamplerConfig())
    rng = np.random.default_rng(0)
    picks = []
    for j in range(min(n_faces, len(faces))):
        c = int(rng.integers(len(base.clips)))
        t = int(np.argmax(base.clips[c].params[:, 0]))  # the widest-open frame of a clip
        picks.append(data.render_sample(c, t, np.random.default_rng(j), identity=j))
    for run in runs:
        net, step = teacher(run)
        psnr, psnr_mouth, ident = [], [], []
        for j, s in enumerate(picks):
            ref = torch.from_numpy(s["ref"].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
            lm = torch.from_numpy((s["landmarks"] + 0.5) / 64.0 - 1.0)[None]
            noise = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(j))
            with torch.no_grad():
                r = net.encode_reference(ref)
                out = DDIMSampler(sched, 10).sample(net, noise, landmarks=lm, ref=r)
            img = ((out[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            err = (img.astype(float) - s["frame"]) ** 2
            psnr.append(10 * np.log10(255**2 / max(err.mean(), 1e-9)))
            x0, y0 = np.floor(s["landmarks"][48:68].min(0)).astype(int) - 3
            x1, y1 = np.ceil(s["landmarks"][48:68].max(0)).astype(int) + 3
            m = err[max(y0, 0) : y1, max(x0, 0) : x1].mean()
            psnr_mouth.append(10 * np.log10(255**2 / max(m, 1e-9)))
            d = measure.distance(s["ref"], img)
            if d is not None:
                ident.append(d)
        print(
            f"{run.name} (step {step}, pixel_warp={net.cfg.pixel_warp}): PSNR {np.median(psnr):.2f}"
            f" dB, mouth {np.median(psnr_mouth):.2f} dB, identity distance "
            f"{np.median(ident) if ident else float('nan'):.3f} ({len(ident)}/{len(picks)} found)"
        )


if __name__ == "__main__":
    main()
