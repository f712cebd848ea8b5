"""AudioToMotion: streaming windows equal offline windows, and so do the predicted landmarks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from talkstream.config import AudioConfig
from talkstream.engine.audio import MelFrontend, log_mel
from talkstream.engine.motion import (
    N_MOTION_POINTS,
    AudioToMotion,
    MotionConfig,
    MotionStreamer,
    build_windows,
    frames_for_samples,
    latency_samples,
    predict_offline,
    rows_needed,
    silence_level,
    token_rows,
)

SILENCE = silence_level(AudioConfig())


def _speechlike(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)  # syllable-rate envelope
    return (env * (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n))).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def model() -> AudioToMotion:
    torch.manual_seed(0)
    return AudioToMotion(MotionConfig.from_name("tiny")).eval()


def _stream(
    model: AudioToMotion,
    audio: np.ndarray,
    chunk: int,
    neutral: np.ndarray,
    lookahead: int | None = None,
) -> tuple[list[int], np.ndarray, np.ndarray]:
    fe = MelFrontend(AudioConfig())
    st = MotionStreamer(model.cfg, SILENCE, lookahead)
    idx: list[int] = []
    wins: list[np.ndarray] = []
    for s in range(0, len(audio), chunk):
        st.push_mel(fe.push(audio[s : s + chunk], 16000))
        f, w = st.ready_windows()
        idx += f
        wins.append(w)
    st.push_mel(fe.flush())
    st.end(fe.samples_received_16k)
    f, w = st.ready_windows()
    idx += f
    wins.append(w)
    windows = np.concatenate(wins).astype(np.float32)
    with torch.inference_mode():
        disp = model(
            torch.from_numpy(windows),
            torch.from_numpy(neutral)[None].expand(len(idx), -1, -1),
            lookahead,
        )
    return idx, windows, disp.numpy()


@pytest.mark.parametrize("chunk_ms", [10, 20, 37])
def test_streaming_equals_offline(model: AudioToMotion, chunk_ms: int) -> None:
    audio = _speechlike(16000 * 2 + 123)
    neutral = np.random.default_rng(1).uniform(-0.6, 0.6, (68, 2)).astype(np.float32)
    idx, windows, disp = _stream(model, audio, 16 * chunk_ms, neutral)
    n_frames = frames_for_samples(len(audio))
    assert idx == list(range(n_frames))  # every frame once, in order
    mel = log_mel(audio)
    np.testing.assert_array_equal(windows, build_windows(mel, range(n_frames), model.cfg, SILENCE))
    offline = predict_offline(model, mel, n_frames, neutral, SILENCE)
    assert offline.shape == (n_frames, N_MOTION_POINTS, 2)
    np.testing.assert_allclose(disp, offline, atol=1e-5, rtol=0)


def test_smaller_lookahead_streams_and_matches(model: AudioToMotion) -> None:
    audio = _speechlike(16000, seed=3)
    neutral = np.zeros((68, 2), np.float32)
    idx, _, disp = _stream(model, audio, 320, neutral, lookahead=0)
    mel = log_mel(audio)
    offline = predict_offline(model, mel, len(idx), neutral, SILENCE, lookahead=0)
    np.testing.assert_allclose(disp, offline, atol=1e-5, rtol=0)
    full = predict_offline(model, mel, len(idx), neutral, SILENCE, lookahead=2)
    assert np.abs(full - offline).max() > 1e-4  # masking really removes the future tokens


def test_lookahead_bounds_and_latency() -> None:
    cfg = MotionConfig()
    # Frame t needs rows up to the end of token t+L; with L=2 that is 8 rows past floor(3.2 t).
    assert rows_needed(0, cfg, 2) == token_rows(2, cfg)[1] == 6 + cfg.mel_offset + cfg.mel_rows
    la2 = latency_samples(cfg, AudioConfig(), 2)
    la0 = latency_samples(cfg, AudioConfig(), 0)
    # Two frames (80 ms = 1280 samples) of lookahead, in whole mel rows: 6 rows = 1200 samples.
    assert la2 - la0 == (token_rows(2, cfg)[1] - token_rows(0, cfg)[1]) * 200 == 1200
    with pytest.raises(ValueError, match="lookahead"):
        MotionStreamer(cfg, SILENCE, lookahead=3)


def test_streamer_holds_bounded_rows(model: AudioToMotion) -> None:
    fe = MelFrontend(AudioConfig())
    st = MotionStreamer(model.cfg, SILENCE)
    audio = _speechlike(16000 * 6)
    held = []
    for s in range(0, len(audio), 320):
        st.push_mel(fe.push(audio[s : s + 320], 16000))
        st.ready_windows()
        held.append(st._rows.shape[0])
    # The window spans 11 frames (35 rows) plus at most a chunk's worth: never the whole clip.
    assert max(held) < 60
    assert st.next_frame > 140


def test_gradients_and_config_roundtrip(model: AudioToMotion) -> None:
    cfg = model.cfg
    assert MotionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown MotionConfig keys"):
        MotionConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown motion preset"):
        MotionConfig.from_name("huge")
    m = AudioToMotion(cfg)
    win = torch.randn(2, cfg.window, cfg.mel_rows, cfg.n_mels) - 6
    neutral = torch.zeros(2, 68, 2, requires_grad=True)
    out = m.apply_displacement(neutral, m(win, neutral))
    out.square().sum().backward()
    assert m.mel_proj.weight.grad is not None and m.mel_proj.weight.grad.abs().sum() > 0
    assert neutral.grad is not None and neutral.grad.abs().sum() > 0
