"""Augmentations for many-identity training: appearance, geometry and the mouth interior.

The renderer must take a person's look from the reference photo, never from memory, so every
training pair (reference crop, target frame) is augmented with the *same* draw: a skin tone, a
hue, a light, greyscale or sepia, blur, JPEG and noise that the network cannot memorise because
it changes every sample, and a similarity (scale, shift, rotation, mirror) that moves the face
within the crop as an imperfect alignment would. The mouth interior (teeth, cavity, tongue) and
the lip colour are drawn per sample as well, so no one mouth becomes "the" mouth.

All functions are numpy-only and deterministic given a ``numpy.random.Generator``: they run in
the trainer's data process, where torch is never used.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from talkstream.engine.avatar import warp_crop
from talkstream.training.frames import MouthStyle

__all__ = [
    "MIRROR_68",
    "AppearanceDraw",
    "AugmentConfig",
    "GeometryDraw",
    "apply_appearance",
    "apply_geometry",
    "draw_appearance",
    "draw_geometry",
    "draw_mouth_style",
    "tint_lips",
]

# 68-point iBUG index of each point's mirror image (left <-> right).
MIRROR_68 = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 21, -1))  # brows 17-21 <-> 26-22
    + list(range(21, 16, -1))
    + [27, 28, 29, 30]  # nose bridge
    + [35, 34, 33, 32, 31]  # nostrils
    + [45, 44, 43, 42, 47, 46]  # right eye <- left eye
    + [39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lip
    + [64, 63, 62, 61, 60, 67, 66, 65]  # inner lip
)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges. ``enabled=False`` gives the identity transform."""

    enabled: bool = True
    hue_p: float = 0.5
    hue_max_rad: float = 0.6
    tone_p: float = 0.8  # per-channel gains: skin tone and white balance
    tone_range: tuple[float, float] = (0.75, 1.25)
    dark_p: float = 0.3  # darker skin / darker exposure
    dark_range: tuple[float, float] = (0.35, 0.8)
    gamma_range: tuple[float, float] = (0.7, 1.45)
    contrast_range: tuple[float, float] = (0.75, 1.25)
    grey_p: float = 0.2
    sepia_p: float = 0.1
    blur_p: float = 0.25
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    jpeg_p: float = 0.3
    jpeg_quality: tuple[int, int] = (35, 92)
    noise_p: float = 0.3
    noise_sigma: tuple[float, float] = (1.0, 6.0)
    flip_p: float = 0.5
    scale_range: tuple[float, float] = (0.92, 1.08)
    shift_frac: float = 0.04
    rotate_deg: float = 8.0
    lip_tint_p: float = 0.5


@dataclass(frozen=True)
class AppearanceDraw:
    matrix: np.ndarray  # (3, 3) colour matrix applied to RGB in [0, 1]
    gamma: float
    contrast: float
    blur_sigma: float  # 0: none
    jpeg_quality: int  # 0: none
    noise_sigma: float  # 0: none (0-255 units)
    noise_seed: int


@dataclass(frozen=True)
class GeometryDraw:
    matrix: np.ndarray  # (2, 3) crop px -> crop px (mirror included)
    flip: bool


_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)
_SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
_GREY = np.tile(np.array([[0.299, 0.587, 0.114]]), (3, 1))


def draw_appearance(rng: np.random.Generator, cfg: AugmentConfig) -> AppearanceDraw:
    """One appearance draw (identity when ``cfg.enabled`` is False)."""
    m = np.eye(3)
    if not cfg.enabled:
        return AppearanceDraw(m, 1.0, 1.0, 0.0, 0, 0.0, 0)
    if rng.random() < cfg.hue_p:
        a = rng.uniform(-cfg.hue_max_rad, cfg.hue_max_rad)
        rot = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
        m = _YIQ_INV @ rot @ _YIQ @ m
    if rng.random() < cfg.tone_p:
        m = np.diag(rng.uniform(*cfg.tone_range, size=3)) @ m
    if rng.random() < cfg.dark_p:
        m = rng.uniform(*cfg.dark_range) * m
    u = rng.random()
    if u < cfg.grey_p:
        m = _GREY @ m
    elif u < cfg.grey_p + cfg.sepia_p:
        m = _SEPIA @ m
    return AppearanceDraw(
        matrix=m,
        gamma=float(np.exp(rng.uniform(np.log(cfg.gamma_range[0]), np.log(cfg.gamma_range[1])))),
        contrast=float(rng.uniform(*cfg.contrast_range)),
        blur_sigma=float(rng.uniform(*cfg.blur_sigma)) if rng.random() < cfg.blur_p else 0.0,
        jpeg_quality=int(rng.integers(*cfg.jpeg_quality)) if rng.random() < cfg.jpeg_p else 0,
        noise_sigma=float(rng.uniform(*cfg.noise_sigma)) if rng.random() < cfg.noise_p else 0.0,
        noise_seed=int(rng.integers(0, 2**31)),
    )


def apply_appearance(img: np.ndarray, d: AppearanceDraw) -> np.ndarray:
    """(S, S, 3) uint8 -> augmented (S, S, 3) uint8."""
    x = img.astype(np.float32) / 255.0
    x = x @ d.matrix.T.astype(np.float32)
    x = np.clip(x, 0.0, 1.0) ** np.float32(d.gamma)
    x = (x - 0.5) * np.float32(d.contrast) + 0.5
    if d.blur_sigma > 0:
        x = gaussian_filter(x, sigma=(d.blur_sigma, d.blur_sigma, 0), mode="nearest")
    x = x * 255.0
    if d.noise_sigma > 0:
        # The same noise pattern for the reference and the target: static pixels stay equal.
        n = np.random.default_rng(d.noise_seed).normal(0.0, d.noise_sigma, size=x.shape)
        x = x + n.astype(np.float32)
    out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if d.jpeg_quality:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=d.jpeg_quality)
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def draw_geometry(rng: np.random.Generator, cfg: AugmentConfig, size: int) -> GeometryDraw:
    """A similarity about the crop centre (and maybe a mirror), crop px -> crop px."""
    if not cfg.enabled:
        return GeometryDraw(np.array([[1.0, 0, 0], [0, 1.0, 0]]), False)
    flip = bool(rng.random() < cfg.flip_p)
    s = rng.uniform(*cfg.scale_range)
    a = math.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
    t = rng.uniform(-cfg.shift_frac, cfg.shift_frac, size=2) * size
    c = (size - 1) / 2.0
    r = s * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    f = np.diag([-1.0, 1.0]) if flip else np.eye(2)
    lin = r @ f
    off = np.array([c, c]) + t - lin @ np.array([c, c])
    return GeometryDraw(np.concatenate([lin, off[:, None]], axis=1), flip)


def apply_geometry(
    img: np.ndarray, landmarks: np.ndarray | None, g: GeometryDraw
) -> tuple[np.ndarray, np.ndarray | None]:
    """Warp a crop (and its (68, 2) crop-px landmarks; mirrored indices on a flip)."""
    size = img.shape[0]
    out = warp_crop(img, g.matrix, size)
    if landmarks is None:
        return out, None
    lm = landmarks @ g.matrix[:, :2].T + g.matrix[:, 2]
    if g.flip:
        lm = lm[MIRROR_68]
    return out, lm.astype(landmarks.dtype)


def draw_mouth_style(
    rng: np.random.Generator, base: MouthStyle, enabled: bool = True
) -> MouthStyle:
    """A random variant of a measured ``MouthStyle`` (teeth, cavity, tongue, teeth sizes)."""
    from dataclasses import replace

    if not enabled:
        return base
    teeth = (
        np.asarray(base.teeth)
        * rng.uniform(0.7, 1.1)
        * np.array([1.0, rng.uniform(0.93, 1.0), rng.uniform(0.8, 1.0)])
    )
    cavity = np.asarray(base.cavity) * rng.uniform(0.5, 1.6, size=3)
    tongue = np.asarray(base.tongue) * rng.uniform(0.75, 1.2, size=3)

    def rgb(c: np.ndarray) -> tuple[float, float, float]:
        r, g, b = (float(v) for v in np.clip(c, 0, 255))
        return (r, g, b)

    return replace(
        base,
        teeth=rgb(teeth),
        cavity=rgb(cavity),
        tongue=rgb(tongue),
        upper_teeth_w=float(rng.uniform(0.04, 0.14)),
        lower_teeth_w=float(rng.uniform(0.0, 0.06)),
    )


def tint_lips(
    img: np.ndarray, neutral: np.ndarray, rng: np.random.Generator, p: float
) -> np.ndarray:
    """Recolour the lips (outer-lip polygon, feathered) with probability ``p``."""
    if rng.random() >= p:
        return img
    from PIL import ImageDraw

    s = img.shape[0]
    poly = neutral[48:60]
    x0, y0 = np.floor(poly.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(poly.max(axis=0)).astype(int) + 2
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, s - 1), min(y1, s - 1)
    if x1 <= x0 or y1 <= y0:
        return img
    canvas = Image.new("L", (x1 - x0 + 1, y1 - y0 + 1), 0)
    ImageDraw.Draw(canvas).polygon([(float(x - x0), float(y - y0)) for x, y in poly], fill=255)
    m = gaussian_filter(np.asarray(canvas, dtype=np.float32) / 255.0, 0.8)[..., None]
    gain = np.array([rng.uniform(0.8, 1.2), rng.uniform(0.7, 1.1), rng.uniform(0.7, 1.15)])
    gain = gain * rng.uniform(0.75, 1.1)
    out = img.astype(np.float32).copy()
    reg = out[y0 : y1 + 1, x0 : x1 + 1]
    out[y0 : y1 + 1, x0 : x1 + 1] = reg * (1 - m) + np.clip(reg * gain, 0, 255) * m
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
