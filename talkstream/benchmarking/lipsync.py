"""Lip sync along the delivery chain: does the browser show what the engine renders?

One measure everywhere: the mouth opening that dlib's 68-point predictor finds in a frame (inner
lips, in units of the face's eye distance), correlated (Pearson r) with the speech envelope
(RMS per 40 ms video frame) of the audio that the frame belongs to. Mouth openings lag or lead
the envelope by a frame or two (the motion model anticipates, a jaw closes after the sound), so
r is also reported at the best lag within :data:`MAX_LAG_FRAMES` frames.

The chain, measured stage by stage with the same speech:

- ``offline``: the engine renders the speech file (``talkstream render``'s loop, every frame);
- ``landmarks``: the motion model's own inner-lip opening per frame (no renderer, no detector),
  offline and in the live stream (the server's trace), so a loss in timing or input shows up
  before any pixels;
- ``browser``: the frames a real Chromium presented (captured in the page at each
  ``requestVideoFrameCallback``), against the envelope of the microphone the page captured.

Plus what can lose motion between them: frames the server skipped or repeated, gaps in what the
browser presented, and how well the audio the server received follows the microphone (echo
cancellation, noise suppression, Opus, resampling).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FPS = 25
FRAME_S = 1.0 / FPS
MAX_LAG_FRAMES = 6  # +-240 ms: the lag search of r
_DETECT_MIN_PX = 320  # frames smaller than this are upscaled before detection


def envelope(
    x: np.ndarray, rate: int, n_frames: int | None = None, offset_s: float = 0.0
) -> np.ndarray:
    """RMS of ``x`` per 40 ms video frame (frame ``i`` covers ``offset_s + [i, i+1) * 40 ms``)."""
    x = np.asarray(x, dtype=np.float64)
    hop = rate / FPS
    n = n_frames if n_frames is not None else int((len(x) / rate - offset_s) * FPS)
    out = np.zeros(max(n, 0))
    for i in range(len(out)):
        a = round(offset_s * rate + i * hop)
        b = round(offset_s * rate + (i + 1) * hop)
        seg = x[max(a, 0) : max(min(b, len(x)), 0)]
        out[i] = float(np.sqrt(np.mean(seg**2))) if seg.size else 0.0
    return out


def resample_series(times_s: np.ndarray, values: np.ndarray, grid_s: np.ndarray) -> np.ndarray:
    """Sample-and-hold of an irregular series onto ``grid_s`` (NaN before the first value)."""
    times_s = np.asarray(times_s, dtype=np.float64)
    idx = np.searchsorted(times_s, grid_s, side="right") - 1
    out = np.full(len(grid_s), np.nan)
    ok = idx >= 0
    out[ok] = np.asarray(values, dtype=np.float64)[idx[ok]]
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson r over the positions where both are finite; None with < 10 points or no spread."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 10 or x[ok].std() == 0 or y[ok].std() == 0:
        return None
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


@dataclass(frozen=True)
class LaggedR:
    """r at lag 0, and the best r over lags (``mouth[t]`` against ``env[t - lag]``)."""

    r0: float | None
    best: float | None
    lag_frames: int | None

    def as_dict(self) -> dict[str, Any]:
        rd = lambda v: None if v is None else round(v, 3)  # noqa: E731
        return {
            "r_lag0": rd(self.r0),
            "r": rd(self.best),
            "lag_ms": None if self.lag_frames is None else self.lag_frames * 1000 // FPS,
        }


def lagged_r(mouth: np.ndarray, env: np.ndarray, max_lag: int = MAX_LAG_FRAMES) -> LaggedR:
    """Correlation of a mouth series with an envelope on the same frame grid, over lags."""
    n = min(len(mouth), len(env))
    mouth, env = np.asarray(mouth[:n], float), np.asarray(env[:n], float)
    best: tuple[float, int] | None = None
    r0 = pearson(mouth, env)
    for lag in range(-max_lag, max_lag + 1):
        a, b = (mouth[lag:], env[: n - lag]) if lag >= 0 else (mouth[:lag], env[-lag:])
        r = pearson(a, b)
        if r is not None and (best is None or r > best[0]):
            best = (r, lag)
    return LaggedR(r0, None if best is None else best[0], None if best is None else best[1])


class MouthMeter:
    """dlib's inner-lip opening per frame, in eye distances (NaN where no face is found)."""

    def __init__(self) -> None:
        from talkstream.engine.landmarks import DlibDetector

        self.detector = DlibDetector()

    def opening(self, frame: np.ndarray) -> float:
        from PIL import Image

        from talkstream.training.evaluate import inner_lip_opening

        h, w = frame.shape[:2]
        scale = max(1.0, _DETECT_MIN_PX / min(h, w))
        img = frame
        if scale > 1.0:
            size = (round(w * scale), round(h * scale))
            img = np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BICUBIC))
        faces = self.detector.detect(img)
        if not faces:
            return float("nan")
        pts = max(faces, key=lambda d: d.area).landmarks
        eyes = np.linalg.norm(pts[36:42].mean(axis=0) - pts[42:48].mean(axis=0))
        return float(inner_lip_opening(pts)) / max(float(eyes), 1e-6)

    def openings(self, frames: Iterable[np.ndarray]) -> np.ndarray:
        return np.array([self.opening(f) for f in frames], dtype=np.float64)


def decode_jpeg_data_url(url: str) -> np.ndarray:
    """An RGB array from a ``data:image/jpeg;base64,...`` URL (what a canvas exports)."""
    from PIL import Image

    raw = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def face_box(avatar: Any, pad: float = 0.35) -> list[int]:
    """[x0, y0, x1, y1] around the face in frame pixels (the neutral landmarks, padded)."""
    inv = np.linalg.inv(np.vstack([avatar.frame_to_crop, [0.0, 0.0, 1.0]]))[:2]
    pts = avatar.neutral @ inv[:, :2].T + inv[:, 2]
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    px, py = pad * (x1 - x0), pad * (y1 - y0)
    h, w = avatar.image.shape[:2]
    box = [int(x0 - px), int(y0 - 1.5 * py), int(np.ceil(x1 + px)), int(np.ceil(y1 + py))]
    box = [max(box[0], 0), max(box[1], 0), min(box[2], w), min(box[3], h)]
    # Even sizes: the capture canvas and the video agree on pixels.
    return [box[0], box[1], box[2] - (box[2] - box[0]) % 2, box[3] - (box[3] - box[1]) % 2]


def presented_stats(times_ms: Sequence[float], rtp: Sequence[int | None]) -> dict[str, Any]:
    """What the browser presented: fps, frames repeated (same RTP timestamp twice) and media
    frames never presented (gaps in the 90 kHz timestamps of 3600 per frame)."""
    t = np.asarray(times_ms, dtype=np.float64)
    out: dict[str, Any] = {"presented": len(t)}
    if len(t) >= 2:
        out["fps"] = round((len(t) - 1) / ((t[-1] - t[0]) / 1000), 2)
    ts = [r for r in rtp if r is not None]
    if len(ts) >= 2:
        unwrapped = np.unwrap(np.asarray(ts, dtype=np.float64), period=2.0**32)
        steps = np.round(np.diff(unwrapped) / 3600).astype(int)
        out["repeated"] = int((steps == 0).sum())
        out["media_frames_missing"] = int(np.clip(steps - 1, 0, None).sum())
        out["media_frames_spanned"] = int(steps.sum()) + 1
    return out
