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


# -- The voice as the browser plays it, from the audio that was sent ---------------------------
#
# A browser's lip sync is judged against the voice it *plays*. Its level as the page can read
# it is coarse (the RTP header's whole-dB level of one 10 ms frame per packet, or a Web Audio
# probe with its own buffering). The sender knows the exact audio it handed to the encoder, and
# the browser reports which RTP timestamp it is playing when (``getSynchronizationSources``):
# together they give the played voice's envelope with the offline measure's precision and the
# browser's own timing.

RTP_AUDIO_RATE = 48_000  # Opus's RTP clock


def cell_mean(times_s: np.ndarray, values: np.ndarray, t0: float, n: int) -> np.ndarray:
    """The time-weighted mean of a step series over each 40 ms cell from ``t0``.

    Value ``i`` holds from ``times_s[i]`` until ``times_s[i + 1]`` (the last for one frame
    period): what a viewer sees of frames presented at those times. NaN values are left out;
    a cell less than a quarter covered is NaN. (The offline render shows each frame for exactly
    its cell, where this is the frame's own value.)
    """
    t = np.asarray(times_s, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if len(t) == 0:
        return np.full(n, np.nan)
    knots = np.append(t, t[-1] + FRAME_S)
    dur = np.diff(knots)
    ok = np.isfinite(v)
    cum_v = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0) * dur)])
    cum_w = np.concatenate([[0.0], np.cumsum(ok * dur)])
    edges = t0 + np.arange(n + 1) * FRAME_S
    sv, sw = np.diff(np.interp(edges, knots, cum_v)), np.diff(np.interp(edges, knots, cum_w))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sw >= FRAME_S / 4, sv / np.where(sw > 0, sw, 1.0), np.nan)


@dataclass(frozen=True)
class SentAudio:
    """What a sender's audio track handed to the encoder: each chunk's start (s, the track's
    clock) and its mean square (full scale 1)."""

    start_s: np.ndarray
    power: np.ndarray
    chunk_s: float

    @classmethod
    def from_chunks(cls, chunks: Sequence[tuple[int, np.ndarray]], rate: int) -> SentAudio:
        """From (pts in samples at ``rate``, int16 samples) of equal-length chunks."""
        chunks = sorted(chunks, key=lambda c: c[0])
        start = np.array([pts / rate for pts, _ in chunks], dtype=np.float64)
        power = np.array(
            [float(np.mean((np.asarray(x, np.float64) / 32768.0) ** 2)) for _, x in chunks]
        )
        size = len(chunks[0][1]) if chunks else rate // 100
        return cls(start, power, size / rate)

    def power_at(self, t_s: np.ndarray) -> np.ndarray:
        """Mean square of the chunk holding track time ``t_s`` (NaN outside what was sent)."""
        t_s = np.asarray(t_s, dtype=np.float64)
        j = np.searchsorted(self.start_s, t_s, side="right") - 1
        jj = np.clip(j, 0, max(len(self.start_s) - 1, 0))
        ok = (j >= 0) & np.isfinite(t_s)
        ok &= np.where(ok, t_s - self.start_s[jj] < self.chunk_s, False)
        out = np.full(t_s.shape, np.nan)
        out[ok] = self.power[jj[ok]]
        return out

    def level_dbov(self, t_s: np.ndarray) -> np.ndarray:
        """The RFC 6465 level (dBov, -127..0) a sender writes for the chunk at ``t_s``."""
        p = self.power_at(t_s)
        with np.errstate(divide="ignore", invalid="ignore"):
            db = np.where(p > 0, 10 * np.log10(np.where(p > 0, p, 1.0)), -127.0)
        return np.where(np.isfinite(p), np.clip(np.round(db), -127, 0), np.nan)


@dataclass(frozen=True)
class Playout:
    """What a browser's audio receiver handed out for playout: when (page clock, s) and the
    RTP timestamp (unwrapped, s of the 48 kHz clock from the first record) of each."""

    t_s: np.ndarray
    rtp_s: np.ndarray
    level_dbov: np.ndarray

    @classmethod
    def from_records(cls, rows: Sequence[Sequence[float]]) -> Playout | None:
        """From ``js/playout.js``'s [page ms, level 0..1, RTP timestamp] rows (None if they
        carry no RTP timestamps)."""
        a = np.asarray(rows, dtype=np.float64).reshape(-1, 3) if len(rows) else np.zeros((0, 3))
        a = a[np.isfinite(a).all(axis=1)]
        if len(a) < 10:
            return None
        a = a[np.argsort(a[:, 0], kind="stable")]
        rtp = np.unwrap(a[:, 2], period=2.0**32)
        with np.errstate(divide="ignore"):
            db = np.where(a[:, 1] > 0, np.round(20 * np.log10(np.maximum(a[:, 1], 1e-7))), -127)
        return cls(a[:, 0] / 1000, (rtp - rtp[0]) / RTP_AUDIO_RATE, db)

    def playing(self, t_s: np.ndarray) -> np.ndarray:
        """The RTP time being played at page time ``t_s``: the newest handed out, advanced in
        real time since (NaN more than 100 ms after a hand-out: nothing is playing)."""
        t_s = np.asarray(t_s, dtype=np.float64)
        k = np.searchsorted(self.t_s, t_s, side="right") - 1
        kk = np.clip(k, 0, None)
        ok = (k >= 0) & (t_s - self.t_s[kk] < 0.1)
        return np.where(ok, self.rtp_s[kk] + (t_s - self.t_s[kk]), np.nan)


def match_playout(
    sent: SentAudio, played: Playout, step_s: float = 0.01
) -> tuple[float, float] | None:
    """The offset ``o`` with RTP time ``rtp_s`` carrying the sent audio at track time
    ``rtp_s + o``, found by matching the RTP header's levels the browser saw against the levels
    of the sent chunks; with the match's r (near 1 when found). None when nothing matches."""
    if len(sent.start_s) < 10:
        return None
    lo = sent.start_s[0] - played.rtp_s[-1]
    hi = sent.start_s[-1] - played.rtp_s[0]
    best: tuple[float, float] | None = None
    for o in np.arange(lo, hi + step_s, step_s):
        pred = sent.level_dbov(played.rtp_s + o)
        ok = np.isfinite(pred)
        if ok.sum() < max(50, len(pred) // 2):
            continue
        r = pearson(pred[ok], played.level_dbov[ok])
        if r is not None and (best is None or r > best[1]):
            best = (float(o), r)
    return best


def played_envelope(
    sent: SentAudio, played: Playout, offset_s: float, t0: float, n: int
) -> np.ndarray:
    """RMS per 40 ms cell from page time ``t0`` of the voice the browser played (the sent
    audio, at the RTP time it was playing; 5 ms steps). NaN where nothing was playing."""
    sub = t0 + (np.arange(n * 8) + 0.5) * (FRAME_S / 8)
    power = sent.power_at(played.playing(sub) + offset_s).reshape(n, 8)
    ok = np.isfinite(power)
    count = ok.sum(axis=1)
    total = np.where(ok, power, 0.0).sum(axis=1)
    return np.where(count >= 4, np.sqrt(total / np.maximum(count, 1)), np.nan)


def best_shift_r(
    mouth: np.ndarray, env_of: Any, shifts_ms: Iterable[int]
) -> tuple[float, int] | None:
    """The best r of ``mouth`` against ``env_of(shift_ms)`` (an envelope on the same cells,
    the voice taken ``shift_ms`` later) over ``shifts_ms``: (r, shift ms)."""
    best: tuple[float, int] | None = None
    for s in shifts_ms:
        r = pearson(mouth, env_of(s))
        if r is not None and (best is None or r > best[0]):
            best = (r, int(s))
    return best
