"""Motion-model ablation: train AudioToMotion alone on a corpus, score it on a held-out split.

The experiment behind `data.build.motion_minutes` (docs/decisions.md). Run from the repository
root; it builds the landmark-only corpus first if --corpus names a folder without a manifest:

    python benchmarks/experiments/motion_ablation.py --corpus runs/exp/mcorpus60 --minutes 60 \
        --out runs/exp/B_60min.json
    python benchmarks/experiments/motion_ablation.py --corpus runs/exp/mcorpus60 --minutes 60 \
        --dropout 0.1 --freq_shift 3 --out runs/exp/C_60min_aug.json

(2026-11-25, 2-core dev CPU, one thread each, the two runs side by side: ~450-525 s each.) The
held-out clips come from --heldout (the frame corpus of the default run); with the same seed the
landmark corpus holds out the same sentences and voices. Reports lip LMD and the correlation of
the predicted inner-lip opening with the phoneme-derived one, at lookahead 0 and 2.
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from talkstream.config import AudioConfig
from talkstream.engine.audio import log_mel
from talkstream.engine.avatar import crop_px_to_norm, norm_to_crop_px
from talkstream.engine.motion import AudioToMotion, MotionConfig, predict_offline, silence_level
from talkstream.training.clipformat import read_clip
from talkstream.training.dataset import concat_datasets, load_corpus, read_wav_16k
from talkstream.training.evaluate import _LIPS, _MOTION, inner_lip_opening, pearson
from talkstream.training.losses import motion_loss
from talkstream.training.trainer import pick_lookahead

p = argparse.ArgumentParser()
p.add_argument("--corpus", nargs="+", default=["runs/default_tiny/corpus"])
p.add_argument("--steps", type=int, default=4800)
p.add_argument("--batch", type=int, default=48)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--wd", type=float, default=0.01)
p.add_argument("--dropout", type=float, default=0.0)
p.add_argument("--freq_shift", type=int, default=0)
p.add_argument("--fmask", type=int, default=0)
p.add_argument("--d", type=int, default=128)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--out", required=True)
p.add_argument("--minutes", type=float, default=60.0, help="landmark corpus to build if missing")
p.add_argument(
    "--heldout", default="runs/default_tiny/corpus", help="corpus with the held-out split"
)
a = p.parse_args()
for c in a.corpus:
    if not (Path(c) / "manifest.json").is_file():
        from talkstream.engine.avatar import default_image, default_landmarks
        from talkstream.training.synthetic import CorpusConfig, build_corpus

        build_corpus(
            default_image(),
            default_landmarks(),
            c,
            a.minutes,
            0,
            True,
            CorpusConfig(render_frames=False),
        )
torch.manual_seed(0)
torch.set_num_threads(a.threads)
audio = AudioConfig()
data = concat_datasets([load_corpus(c, "train", audio, frames=False) for c in a.corpus])
print("train clips", len(data.clips), "frames", data.total_frames, flush=True)
mcfg = MotionConfig(d_model=a.d, n_layers=a.layers)
model = AudioToMotion(mcfg)
if a.dropout:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = a.dropout
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd)
warm = 100


def lrf(s):
    if s < warm:
        return (s + 1) / warm
    pr = min((s - warm) / max(a.steps - warm, 1), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * pr))


seq = 4
t0 = time.time()
for step in range(a.steps):
    rng = np.random.default_rng([0, step])
    b = data.motion_batch(rng, a.batch, seq, mcfg, 6.0)
    w = b.windows
    if a.freq_shift:
        # shift the mel axis per sequence by -k..k bins (vocal tract length), edge-padded
        sh = rng.integers(-a.freq_shift, a.freq_shift + 1, size=a.batch)
        w = w.reshape(a.batch, seq, *w.shape[1:])
        for i, s in enumerate(sh):
            if s:
                w[i] = torch.roll(w[i], int(s), dims=-1)
            if s > 0:
                w[i, ..., :s] = w[i, ..., s : s + 1]
            if s < 0:
                w[i, ..., s:] = w[i, ..., s - 1 : s]
        w = w.reshape(-1, *w.shape[2:])
    if a.fmask:
        w = w.reshape(a.batch, seq, *w.shape[1:])
        for i in range(a.batch):
            f = int(rng.integers(0, a.fmask + 1))
            f0 = int(rng.integers(0, 80 - f))
            if f:
                w[i, ..., f0 : f0 + f] = w[i].mean()
        w = w.reshape(-1, *w.shape[2:])
    la = pick_lookahead(rng, mcfg.lookahead_frames, 0.5)
    for g in opt.param_groups:
        g["lr"] = a.lr * lrf(step)
    model.train()
    out = motion_loss(model(w, b.neutral, la), b.target, seq, data.crop_size, 1.0)
    opt.zero_grad()
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if step % 400 == 0:
        print(step, float(out["l1_px"]), round(time.time() - t0), flush=True)
model.eval()
# held-out
root = Path(a.heldout)
man = json.loads((root / "manifest.json").read_text())
size = man["crop_size"]
npx = np.asarray(man["neutral"], np.float32)
neutral = crop_px_to_norm(npx, size)
sil = silence_level(audio)
res = {}
with torch.no_grad():
    for la in (0, 2):
        errs, po, go = [], [], []
        for e in man["clips"]:
            if e["split"] != "heldout":
                continue
            z = read_clip(root / e["data"])
            sp = z["speech_landmarks"].astype(np.float32)
            mel = log_mel(read_wav_16k(root / e["wav"]), audio)
            disp = predict_offline(model, mel, len(sp), neutral, sil, la)
            pred = np.broadcast_to(neutral, sp.shape).copy()
            pred[:, _MOTION] += disp
            px = norm_to_crop_px(pred, size)
            errs.append(np.sqrt(((px - sp) ** 2).sum(-1))[:, _LIPS].mean(1))
            po.append(inner_lip_opening(px))
            go.append(inner_lip_opening(sp))
        res[f"lmd_lips_la{la}"] = float(np.concatenate(errs).mean())
        res[f"r_motion_la{la}"] = pearson(np.concatenate(po), np.concatenate(go))
res.update(vars(a))
res["train_l1_last"] = float(out["l1_px"])
res["wall_s"] = time.time() - t0
print(json.dumps(res))
Path(a.out).write_text(json.dumps(res, indent=1))
torch.save(model.state_dict(), a.out + ".pt")
