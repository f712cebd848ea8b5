"""Helpers for the training tests (no tests here): tiny data, tiny networks, a shared corpus.

The tiny dataset needs neither espeak nor dlib: the mouth opens and closes with the envelope of
a voiced signal, the frames are the reference crop with a dark mouth whose height follows the
opening. Small, but audio, landmarks and frames are tied together, so losses can fall.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from talkstream.config import AudioConfig, AvatarConfig
from talkstream.engine.audio import log_mel
from talkstream.engine.avatar import (
    crop_px_to_norm,
    default_image,
    default_landmarks,
    prepare_avatar,
)
from talkstream.training.config import TrainConfig, config_from_dict
from talkstream.training.dataset import TrainClip, TrainData

SIZE = 32
MOTION_ARCH: dict[str, Any] = {
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "context_frames": 3,
    "lookahead_frames": 1,
}
DENOISER_ARCH: dict[str, Any] = {
    "image_size": SIZE,
    "patch": 4,
    "widths": [8, 16],
    "blocks": [1, 1],
    "attn_levels": [1],
    "heads": 2,
    "token_dim": 16,
    "n_fourier_freqs": 3,
    "time_dim": 16,
    "flow_hidden": 4,
    "norm_groups": 4,
    "ref_blocks": 1,
}

_AVATAR: Any = None


@pytest.fixture
def one_thread() -> Any:
    """Tiny networks run fastest on one thread; on a loaded machine a second torch thread
    mostly waits at barriers for a core. Restores the previous setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_models_128(seed: int = 0) -> Any:
    """Random networks that render 128 px crops (the corpus's size) but cost little."""
    import torch

    from talkstream.config import SamplerConfig
    from talkstream.engine.checkpoint import Models
    from talkstream.engine.denoiser import DenoiserConfig, TalkFormerDenoiser
    from talkstream.engine.motion import AudioToMotion, MotionConfig

    torch.manual_seed(seed)
    arch = {**DENOISER_ARCH, "image_size": 128, "patch": 8}
    return Models(
        motion=AudioToMotion(
            MotionConfig.from_dict(
                {**MotionConfig().to_dict(), "d_model": 32, "n_heads": 2, "n_layers": 1}
            )
        ),
        denoiser=TalkFormerDenoiser(
            DenoiserConfig.from_dict({**DenoiserConfig().to_dict(), **arch})
        ),
        audio=AudioConfig(),
        sampler=SamplerConfig(),
        preset="tiny",
        meta={"random_init": True},
    )


def default_crop(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The astronaut's aligned crop at ``size`` px and its landmarks in crop pixels."""
    global _AVATAR
    if _AVATAR is None:
        _AVATAR = prepare_avatar(default_image(), AvatarConfig(), landmarks=default_landmarks())
    crop = np.asarray(Image.fromarray(_AVATAR.crop).resize((size, size), Image.Resampling.BILINEAR))
    scale = size / _AVATAR.crop.shape[0]
    neutral = (_AVATAR.neutral + 0.5) * scale - 0.5
    return crop, neutral.astype(np.float32)


def tiny_data(n_clips: int = 2, n_frames: int = 30, size: int = SIZE, seed: int = 0) -> TrainData:
    """Clips whose mouth opening follows the loudness of their audio."""
    rng = np.random.default_rng(seed)
    crop, neutral_px = default_crop(size)
    audio_cfg = AudioConfig()
    clips = []
    for c in range(n_clips):
        t = np.arange(n_frames) / 25.0
        rate = rng.uniform(2.0, 4.0)
        opening = 0.5 - 0.5 * np.cos(2 * np.pi * rate * t + rng.uniform(0, 6))  # (T,) 0..1
        samples = np.arange(n_frames * 640) / 16000.0
        env = np.interp(samples, t, opening)
        audio = (env * 0.3 * np.sin(2 * np.pi * 160 * samples)).astype(np.float32)
        speech_px = np.repeat(neutral_px[None], n_frames, axis=0)  # (T, 68, 2)
        drop = opening[:, None] * size * 0.04
        speech_px[:, 5:12, 1] += drop  # chin
        speech_px[:, 55:60, 1] += drop  # lower outer lip
        speech_px[:, 65:68, 1] += drop  # lower inner lip
        sway = 0.3 * np.sin(2 * np.pi * 0.3 * t + c)[:, None, None]
        shown_px = speech_px + sway
        frames = np.repeat(crop[None], n_frames, axis=0).copy()
        yy, xx = np.mgrid[0:size, 0:size]
        for i in range(n_frames):
            cx, cy = shown_px[i, 60:68].mean(axis=0)
            h = 0.6 + 3.0 * opening[i] * size / 32
            inside = ((xx - cx) / (0.09 * size)) ** 2 + ((yy - cy) / h) ** 2 < 1
            frames[i][inside] = (40, 15, 20)
        clips.append(
            TrainClip(
                name=f"tiny/{c}",
                mel=log_mel(audio, audio_cfg),
                landmarks=crop_px_to_norm(shown_px, size),
                speech=crop_px_to_norm(speech_px, size),
                neutral=crop_px_to_norm(neutral_px, size),
                ref=0,
                frames=frames,
            )
        )
    return TrainData(clips, crop[None], audio_cfg)


def tiny_config(out: Path, steps: int = 4, **overrides: Any) -> TrainConfig:
    """A config of tiny networks and few steps; ``overrides``: top-level sections/values."""
    common = {"warmup": 1, "ckpt_every": 2, "log_every": 1}
    d: dict[str, Any] = {
        "out": str(out),
        "progress": False,
        "motion_arch": MOTION_ARCH,
        "denoiser_arch": DENOISER_ARCH,
        "data": {"build": None},
        "motion": {"steps": steps, "batch": 4, "seq_len": 3, **common},
        "teacher": {"steps": steps, "batch": 4, **common},
        "distill": {"steps": steps, "batch": 4, "teacher_steps": 3, "pool_size": 6, **common},
        "e2e": {"steps": steps, "batch": 4, **common},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return config_from_dict(d)


_CORPUS: dict[str, Path] = {}


def shared_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic corpus (one training and one held-out clip), built once per session."""
    from talkstream.training.espeak import espeak_available

    if not espeak_available():
        pytest.skip("libespeak-ng is not installed (Debian: libespeak-ng1)")
    if "path" not in _CORPUS:
        from talkstream.training.synthetic import build_corpus

        out = tmp_path_factory.mktemp("corpus")
        build_corpus(default_image(), default_landmarks(), out, 0.05, seed=3, progress=False)
        _CORPUS["path"] = out
    return _CORPUS["path"]
