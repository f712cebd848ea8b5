"""Idle motion: blinks and a slight head sway on top of speech motion.

Deterministic per seed and computable for any frame index in any order (the offline render and
a live session give the same face at the same frame), without storing per-frame state.
"""

from __future__ import annotations

import math

import numpy as np

from talkstream.config import FPS, IdleConfig

# Upper-lid points and the lower-lid points they close onto (iBUG 68).
_UPPER_LID = np.array([37, 38, 43, 44])
_LOWER_LID = np.array([41, 40, 47, 46])
_BLINKS_PER_BLOCK = 64  # blink times are drawn in blocks so any frame is random-access


class IdleMotion:
    """``offset(t)`` gives the (68, 2) landmark offset of frame ``t`` in normalised coords."""

    def __init__(self, neutral: np.ndarray, cfg: IdleConfig, seed: int, fps: int = FPS) -> None:
        if neutral.shape != (68, 2):
            raise ValueError(f"neutral landmarks must be (68, 2), got {neutral.shape}")
        self.cfg = cfg
        self.fps = fps
        self.seed = seed
        self.neutral = neutral.astype(np.float32)  # (68, 2)
        self.centre = self.neutral.mean(axis=0)  # (2,)
        self._lid_gap = (self.neutral[_LOWER_LID] - self.neutral[_UPPER_LID]).astype(np.float32)
        self._blocks: dict[int, np.ndarray] = {}

    def _blink_block(self, block: int) -> np.ndarray:
        """Blink start times (s) of one block of blinks, from a seed-and-block-keyed RNG."""
        if block not in self._blocks:
            rng = np.random.default_rng([self.seed, block])
            # Intervals vary around the mean but never less than 1 s: people rarely blink faster.
            gaps = np.maximum(rng.gamma(4.0, self.cfg.blink_interval_s / 4.0, _BLINKS_PER_BLOCK), 1)
            span = _BLINKS_PER_BLOCK * self.cfg.blink_interval_s
            starts = block * span + np.cumsum(gaps) * (span / gaps.sum())
            self._blocks[block] = starts
            if len(self._blocks) > 4:  # bounded: only the blocks near "now" matter
                del self._blocks[min(self._blocks)]
        return self._blocks[block]

    def blink_amount(self, t: int) -> float:
        """How closed the eyes are at frame ``t``: 0 open, 1 shut (a smooth bump per blink)."""
        time_s = t / self.fps
        span = _BLINKS_PER_BLOCK * self.cfg.blink_interval_s
        block = int(time_s // span)
        amount = 0.0
        for b in (block - 1, block):
            if b < 0:
                continue
            for start in self._blink_block(b):
                phase = (time_s - start) / self.cfg.blink_duration_s
                if 0.0 <= phase <= 1.0:
                    amount = max(amount, math.sin(math.pi * phase) ** 2)
        return amount

    def offset(self, t: int) -> np.ndarray:
        """(68, 2) offset of frame ``t``; zeros when idle motion is disabled."""
        out = np.zeros((68, 2), dtype=np.float32)
        if not self.cfg.enabled:
            return out
        blink = self.blink_amount(t)
        if blink > 0.0:
            # Lids meet a little above the lower lid, as real eyes do.
            out[_UPPER_LID] += 0.85 * blink * self._lid_gap
        time_s = t / self.fps
        w = 2.0 * math.pi / self.cfg.sway_period_s
        # Two incommensurate sines: a sway that never visibly repeats. The amplitude is a
        # fraction of the crop; normalised coords span 2 per crop.
        amp = 2.0 * self.cfg.sway_amplitude
        angle = 0.5 * amp * math.sin(w * time_s + 0.3 * self.seed)
        dx = amp * math.sin(0.61 * w * time_s + 1.7 + self.seed)
        dy = 0.5 * amp * math.sin(0.37 * w * time_s + 0.4)
        rel = self.neutral + out - self.centre  # (68, 2)
        c, s = math.cos(angle), math.sin(angle)
        rotated = np.stack([c * rel[:, 0] - s * rel[:, 1], s * rel[:, 0] + c * rel[:, 1]], 1)
        out += rotated - rel + np.array([dx, dy], dtype=np.float32)
        return out
