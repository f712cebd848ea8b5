"""The A/V analysis of benchmarks/stream_latency.py on synthetic probes with known delays."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "stream_latency.py"


@pytest.fixture(scope="module")
def sl() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stream_latency_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _probe(
    video_delay_s: float, audio_delay_s: float, mic_delay_s: float, origin: int, n_bursts: int
) -> tuple[np.ndarray, list, list, list]:
    """A session where frame k (media time 40 k ms) is displayed video_delay_s after the mic
    captured its instant, and the voice plays audio_delay_s after the mic; bursts every 5 s."""
    rng = np.random.default_rng(0)
    speech = [2.0 + 5.0 * i for i in range(n_bursts)]  # media time of each speech onset
    mic_pairs = [(s, s + mic_delay_s + rng.uniform(-0.004, 0.004)) for s in speech]
    voice_pairs = [(s, m + audio_delay_s) for s, (_, m) in zip(speech, mic_pairs, strict=True)]
    k = np.arange(int((speech[-1] + 3.0) / 0.04))
    shown = k * 0.04 + mic_delay_s + video_delay_s + rng.uniform(0, 0.016, size=k.size)  # vsync
    rtp = (origin + k * 3600) % 2**32  # wraps around 2^32 on the way
    mouth = np.stack([shown * 1000, np.ones_like(shown), rtp.astype(np.float64)], axis=1)
    # Motion onsets a frame after the speech onset, found in the browser one frame late or early.
    mouth_pairs = []
    for i, s in enumerate(speech):
        m = round(s / 0.04) * 0.04 + 0.04
        jitter = (-1, 0, 0, 1)[i % 4] * 0.04
        mouth_pairs.append((m, m + mic_delay_s + video_delay_s + jitter + 0.008))
    return mouth, mic_pairs, voice_pairs, mouth_pairs


def test_exact_av_recovers_known_offsets(sl: ModuleType) -> None:
    origin = 2**32 - 3600 * 50  # the 32-bit RTP clock wraps 2 s into the session
    mouth, mic, voice, motion = _probe(0.290, 0.300, 0.050, origin, n_bursts=12)
    r = sl.exact_av(mouth, mic, voice, motion)
    assert r["rtp_anchor_agreement"] >= 0.5
    assert r["frame_delay_ms"] == pytest.approx(298, abs=6)  # 290 + mean vsync wait (8)
    assert len(r["av_exact_bursts_ms"]) == 12
    # video 290 (+8) ms, voice 300 ms after the mic: offset -2 ms, within the noise
    assert all(abs(a + 2) < 8 for a in r["av_exact_bursts_ms"])
    assert abs(r["av_exact_drift_ms_per_min"]) < 10  # a minute of +-4 ms noise


def test_exact_av_without_rtp_timestamps_reports_nothing(sl: ModuleType) -> None:
    mouth, mic, voice, motion = _probe(0.29, 0.3, 0.05, 0, n_bursts=5)
    mouth[:, 2] = 0  # a browser that does not report rtpTimestamp
    r = sl.exact_av(mouth, mic, voice, motion)
    assert r["av_exact_bursts_ms"] == [] and np.isnan(r["frame_delay_ms"])
