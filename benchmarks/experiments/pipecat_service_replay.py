"""Does the pipecat service render what an offline render of the same audio renders?

    .venv/bin/python benchmarks/experiments/pipecat_service_replay.py [--seconds 25]

The example agent (``examples/pipecat_agent.py``: SmallWebRTC, espeak-ng TTS,
``TalkstreamVideoService``) speaks ``browser_lipsync.py``'s script to headless Chromium, as in
that benchmark's pipecat path. Every write to the service's timeline is recorded (its final
content: an early speech start overwrites what it took back), so the exact audio the service
said is known. Then the same engine renders that audio offline (``talkstream render``'s loop,
the service session's seed) and both are scored the same way: the model's inner-lip opening
(landmarks) per frame against the mean absolute level of that frame's 40 ms of the service's
audio, best lag.

If the service's own figure is below the offline one on the same audio, the service loses
motion (skipped frames, interrupted renders, rewinds). If both are equal, the gap to
``browser_lipsync.py``'s offline figure comes from the speech itself (the TTS's pauses and
timing), not from the service.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _lipsync_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "browser_lipsync", ROOT / "benchmarks/browser_lipsync.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


async def run(seconds: float) -> dict[str, Any]:
    import tempfile

    from talkstream.benchmarking.browser import find_chromium
    from talkstream.benchmarking.lipsync import lagged_r
    from talkstream.config import EngineConfig
    from talkstream.runtime import load_engine
    from talkstream.streaming.clock import OUT_RATE_HZ, SAMPLES_PER_FRAME_48K
    from talkstream.streaming.tracks import _inner_lip_opening

    bl = _lipsync_module()
    chromium = find_chromium()
    if chromium is None:
        sys.exit("pipecat_service_replay: no Chromium found: apt-get install chromium")
    # browser_lipsync.py's pipecat path: it records every write to the service's timeline.
    with tempfile.TemporaryDirectory() as tmp:
        raw = await bl.pipecat_run(seconds, chromium, Path(tmp))
    f0, audio = raw["spoken"]
    avatar, service = raw["avatar"], raw["service"]
    mouth = np.asarray(service["mouth"], dtype=np.float64)
    seed, stats = service["seed"], service["stats"]
    n = audio.shape[0] // SAMPLES_PER_FRAME_48K
    env = (
        np.sqrt((audio[: n * SAMPLES_PER_FRAME_48K].astype(np.float64) / 32768) ** 2)
        .reshape(n, -1)
        .mean(axis=1)
    )
    # The service's own frames on that grid.
    svc = np.full(n, np.nan)
    for pts, value in mouth:
        k = int(pts) - f0
        if 0 <= k < n:
            svc[k] = value
    # Offline: the same audio, the same seed, render_ready's loop, on a fresh engine with the
    # service's backend choice (the agent's own is closed with it).
    engine = load_engine(EngineConfig(backend="auto"))
    session = engine.session(avatar, seed=seed)
    opening: list[float] = []
    block = OUT_RATE_HZ // 50
    silence = np.zeros(f0 * SAMPLES_PER_FRAME_48K, dtype=np.int16)  # the idle before it
    for x in (silence, audio[: n * SAMPLES_PER_FRAME_48K]):
        for i in range(0, x.shape[0], block):
            session.push_audio(x[i : i + block], OUT_RATE_HZ)
            while session.has_ready():
                opening += [_inner_lip_opening(f.landmarks) for f in session.render_ready()]
    session.end_audio()
    while session.has_ready():
        opening += [_inner_lip_opening(f.landmarks) for f in session.render_ready()]
    off = np.asarray(opening[f0 : f0 + n])
    engine.close()
    both = np.isfinite(svc)
    return {
        "seconds_of_audio": round(n / 25, 1),
        "speech_fraction": round(float((env > 0.01).mean()), 3),
        "service_frames": int(both.sum()),
        "service_stats": {
            k: stats[k] for k in ("frames_rendered", "frames_skipped", "early_starts")
        },
        "service_vs_its_audio": lagged_r(svc, env).as_dict(),
        "offline_same_audio": lagged_r(off, env).as_dict(),
        "service_vs_offline_landmarks_r": round(float(np.corrcoef(svc[both], off[both])[0, 1]), 3),
        "max_abs_diff": round(float(np.nanmax(np.abs(svc - off))), 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=25.0)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(run(a.seconds)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
