"""Idle motion: deterministic, random-access, plausible blink rate, small sway."""

from __future__ import annotations

import numpy as np

from talkstream.config import IdleConfig
from talkstream.engine.idle import IdleMotion


def _neutral() -> np.ndarray:
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.5, 0.5, (68, 2)).astype(np.float32)
    pts[[41, 40, 47, 46], 1] = pts[[37, 38, 43, 44], 1] + 0.06  # lower lids below upper lids
    return pts


def test_deterministic_and_random_access() -> None:
    a = IdleMotion(_neutral(), IdleConfig(), seed=7)
    b = IdleMotion(_neutral(), IdleConfig(), seed=7)
    seq = [a.offset(t) for t in range(0, 3000, 7)]
    rev = [b.offset(t) for t in reversed(range(0, 3000, 7))][::-1]
    np.testing.assert_array_equal(np.stack(seq), np.stack(rev))
    c = IdleMotion(_neutral(), IdleConfig(), seed=8)
    assert not np.array_equal(np.stack(seq), np.stack([c.offset(t) for t in range(0, 3000, 7)]))


def test_blink_rate_and_shape() -> None:
    idle = IdleMotion(_neutral(), IdleConfig(blink_interval_s=3.5), seed=1)
    amounts = np.array([idle.blink_amount(t) for t in range(25 * 120)])  # two minutes
    starts = np.flatnonzero((amounts[1:] > 0.5) & (amounts[:-1] <= 0.5))
    assert 20 <= len(starts) <= 50  # about one blink every 3.5 s
    assert amounts.max() > 0.9 and amounts.min() == 0.0
    # A blink is a smooth bump, never a step: neighbouring frames differ by less than 1.
    assert np.abs(np.diff(amounts)).max() < 0.95
    shut = int(np.argmax(amounts))
    off = idle.offset(shut)
    assert (off[[37, 38, 43, 44], 1] - off[[41, 40, 47, 46], 1]).mean() > 0.03  # lids close


def test_sway_is_small_and_disabled_is_zero() -> None:
    idle = IdleMotion(_neutral(), IdleConfig(sway_amplitude=0.006), seed=2)
    mouth = np.stack([idle.offset(t)[48:68] for t in range(0, 25 * 20, 5)])
    assert 0.001 < np.abs(mouth).max() < 0.05  # a few tenths of a pixel to ~3 px at 128
    off = IdleMotion(_neutral(), IdleConfig(enabled=False), seed=2)
    assert not off.offset(123).any()
