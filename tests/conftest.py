"""Shared fixtures: a tiny random-weight engine and the default avatar (no detector needed)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from talkstream.benchmarking.local import random_engine
from talkstream.config import AvatarConfig, EngineConfig
from talkstream.engine.avatar import Avatar, default_image, default_landmarks, prepare_avatar
from talkstream.engine.pipeline import Engine


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    # CI has 2 cores; keep torch from oversubscribing them when tests run.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def default_avatar() -> Avatar:
    # The photo's own 512x512 frame: the streaming and pipeline tests do not depend on framing
    # (tests/test_framing.py and tests/test_render.py cover the default "call" framing).
    cfg = AvatarConfig(framing="full")
    return prepare_avatar(default_image(), cfg, landmarks=default_landmarks())


@pytest.fixture(scope="session")
def tiny_engine() -> Iterator[Engine]:
    eng = random_engine(EngineConfig(preset="tiny"), seed=0)  # the benchmarks' own builder
    yield eng
    eng.close()


def speechlike(n: int, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-modulated test signal (float32, mono)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    sig = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.standard_normal(n)
    return (env * sig).astype(np.float32)
