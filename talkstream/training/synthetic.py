"""The synthetic talking corpus: real synthetic speech, ground-truth visemes, rendered faces.

No talking-face dataset can be downloaded here, so the default model learns from clips made
offline from one photo:

* speech: espeak-ng (several languages, voices, rates and pitches) through its C API, which
  also reports when each phoneme starts (:mod:`talkstream.training.espeak`);
* motion: phonemes -> visemes -> coarticulated jaw and lip landmarks
  (:mod:`talkstream.training.visemes`), plus blinks and a slight head sway from
  :class:`talkstream.engine.idle.IdleMotion` (the same idle motion the engine adds live);
* frames: the avatar's aligned reference crop warped piecewise-affinely onto each frame's
  landmarks (a Delaunay mesh of the 68 points, head-fixed anchors on the cheeks and around the
  jaw, and fixed crop-border points, with the lip and eye outlines forced into the mesh), with
  a drawn mouth interior (cavity, teeth, tongue).

Everything is deterministic per seed. ``build_corpus`` writes::

    OUT/manifest.json          clip list, splits, settings (format "talkstream.corpus" v1)
    OUT/reference.png          the aligned reference crop (S x S RGB)
    OUT/clips/NNNNN.wav        16 kHz mono 16-bit PCM
    OUT/clips/NNNNN.npz        compressed numpy arrays (no pickled objects), below

Arrays of a clip's ``.npz`` (T frames, crop pixels, times in seconds on the WAV's timeline):

    frames_delta      (T, S, S, 3) uint8   frames, temporally differenced (decode_frames)
    landmarks         (T, 68, 2) float32   what each frame shows (speech + blinks + sway)
    speech_landmarks  (T, 68, 2) float32   neutral + speech motion only (AudioToMotion target)
    params            (T, 5) float32       mouth parameters, columns param_names
    blink             (T,) float32         0 open .. 1 shut
    frame_time_s      (T,) float32         the instant frame i shows: (i + 0.5) * 40 ms
    phoneme           (N,) <U8             espeak mnemonics, with phoneme_start_s/_end_s (N,)
    phoneme_viseme    (N,) int16           first viseme of each phoneme (index in viseme_names)
    word, word_start_s (M,)                words and their start times
    spec, generator   0-d str              the ClipSpec as JSON; generator version + avatar key

Frames are stored losslessly in the ``.npz`` rather than as an mp4: the corpus frames are the
denoiser's targets and the reference for PSNR/SSIM, so a lossy codec would put its artefacts
into both, and one file per clip keeps frames, landmarks and phonemes aligned without a codec
dependency. They are stored as temporal differences (uint8, modulo 256; see
:func:`encode_frames`): consecutive frames differ little, so zlib packs them to about a quarter
of the raw size (about 16 MB per minute at 128 px; lossless H.264 would be about 1.5x smaller
again, at the price of a codec in the training loop).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

import numpy as np
import soundfile as sf
from PIL import Image
from scipy.spatial import Delaunay

from talkstream.config import FPS, SAMPLE_RATE_HZ, AvatarConfig, IdleConfig
from talkstream.engine.audio import StreamingResampler
from talkstream.engine.avatar import crop_px_to_norm, prepare_avatar
from talkstream.engine.idle import IdleMotion
from talkstream.engine.landmarks import NUM_LANDMARKS
from talkstream.engine.motion import frames_for_samples
from talkstream.errors import InputError
from talkstream.kernels.post import bilinear_taps
from talkstream.training.espeak import PhonemeSegment, Utterance, synthesize
from talkstream.training.visemes import (
    PARAMS,
    VISEME_INDEX,
    VISEMES,
    MouthGeometry,
    params_to_landmarks,
    viseme_segments,
    viseme_trajectory,
    visemes_for_phoneme,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CORPUS_FORMAT",
    "CORPUS_VERSION",
    "ClipSpec",
    "CorpusConfig",
    "CorpusResult",
    "FrameRenderer",
    "Sentence",
    "add_corpus_parser",
    "build_corpus",
    "corpus_digest",
    "decode_frames",
    "encode_frames",
    "frame_times",
    "load_sentences",
    "read_clip",
    "synthesize_clip",
]

CORPUS_FORMAT: Final = "talkstream.corpus"
CORPUS_VERSION: Final = 1
# Bump when the speech, motion or rendering of a clip changes for the same spec: clips written by
# an older generator are then rebuilt instead of reused.
GENERATOR_VERSION: Final = 1
FRAME_MS: Final = 1000 // FPS  # 40 ms
_SENTENCES_ASSET: Final = "corpus_sentences.txt"

# espeak-ng voices per language (``espeak-ng --voices``) and the voice variants that change
# the timbre (espeak-ng-data/voices/!v). A corpus voice is "<language voice>+<variant>".
LANGUAGE_VOICES: Final[dict[str, tuple[str, ...]]] = {
    # "en" and "fr" are British English and French (France): their files are gmw/en and
    # roa/fr, and espeak_SetVoiceByName does not accept "en-gb" or "fr-fr" for them.
    "en": ("en-us", "en", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc"),
    "de": ("de",),
    "fr": ("fr", "fr-be"),
    "es": ("es", "es-419"),
    "it": ("it",),
}
MALE_VARIANTS: Final = ("m1", "m2", "m3", "m4", "m5", "m6", "m7")
FEMALE_VARIANTS: Final = ("f1", "f2", "f3", "f4", "f5")


# --------------------------------------------------------------------------------- sentences


@dataclass(frozen=True)
class Sentence:
    """One corpus sentence: its index in the asset, language code and text."""

    id: int
    language: str
    text: str


def load_sentences() -> list[Sentence]:
    """The bundled sentence list (``assets/corpus_sentences.txt``: ``lang<TAB>text`` lines)."""
    ref = resources.files("talkstream").joinpath("assets", _SENTENCES_ASSET)
    out: list[Sentence] = []
    for line in ref.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        lang, sep, text = line.partition("\t")
        if not sep or lang not in LANGUAGE_VOICES or not text.strip():
            raise ValueError(f"{_SENTENCES_ASSET}: malformed line {line!r}")
        out.append(Sentence(len(out), lang, text.strip()))
    return out


# --------------------------------------------------------------------------------- rendering


def _border_points(size: int, per_side: int = 8) -> np.ndarray:
    """Fixed points on the crop's outer edge (pixel-centre coords): the mesh covers the crop."""
    lo, hi = -0.5, size - 0.5
    t = np.linspace(lo, hi, per_side + 1)
    top = np.stack([t[:-1], np.full(per_side, lo)], axis=1)
    right = np.stack([np.full(per_side, hi), t[:-1]], axis=1)
    bottom = np.stack([t[::-1][:-1], np.full(per_side, hi)], axis=1)
    left = np.stack([np.full(per_side, lo), t[::-1][:-1]], axis=1)
    return np.concatenate([top, right, bottom, left])  # (4 * per_side, 2)


def _segments_cross(p: np.ndarray, q: np.ndarray, r: np.ndarray, s: np.ndarray) -> bool:
    """Whether open segments pq and rs properly intersect (shared endpoints do not count)."""

    def orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
        return float((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))

    d1, d2 = orient(p, q, r), orient(p, q, s)
    d3, d4 = orient(r, s, p), orient(r, s, q)
    return d1 * d2 < 0 and d3 * d4 < 0


def constrained_triangulation(
    points: np.ndarray, constraints: Sequence[tuple[int, int]]
) -> np.ndarray:
    """A Delaunay triangulation with the given edges forced in, by edge flips.

    The lip and eye outlines must be mesh edges, or a triangle would mix lip and mouth
    interior (or lid and eye) and tear when the mouth opens. Delaunay alone misses some of
    them at the mouth corners, where inner and outer lip points nearly coincide. Each missing
    edge is inserted by flipping the edges that cross it (Sloan, 1993); the quadrilaterals
    here are small and nearly always convex, so this ends after a few flips.

    Args:
        points: (N, 2) vertices.
        constraints: index pairs that must be edges.

    Returns:
        (M, 3) int64 triangles.
    """
    pts = np.asarray(points, dtype=np.float64)
    tris = [tuple(int(v) for v in t) for t in Delaunay(pts).simplices]

    def edge_map() -> dict[tuple[int, int], list[int]]:
        m: dict[tuple[int, int], list[int]] = {}
        for k, t in enumerate(tris):
            for i in range(3):
                a, b = t[i], t[(i + 1) % 3]
                m.setdefault((min(a, b), max(a, b)), []).append(k)
        return m

    for a, b in constraints:
        for _ in range(200):
            edges = edge_map()
            if (min(a, b), max(a, b)) in edges:
                break
            flipped = False
            for (c, d), owners in edges.items():
                if len(owners) != 2 or not _segments_cross(pts[a], pts[b], pts[c], pts[d]):
                    continue
                t1, t2 = tris[owners[0]], tris[owners[1]]
                e = next(v for v in t1 if v not in (c, d))
                f = next(v for v in t2 if v not in (c, d))
                # Flip only a convex quad: then the new diagonal ef lies inside it.
                if not _segments_cross(pts[e], pts[f], pts[c], pts[d]):
                    continue
                tris[owners[0]] = (e, f, c)
                tris[owners[1]] = (e, f, d)
                flipped = True
                break
            if not flipped:
                logger.warning("could not force mesh edge %d-%d into the triangulation", a, b)
                break
    return np.array(tris, dtype=np.int64)


def _ring(indices: Sequence[int]) -> list[tuple[int, int]]:
    return [(indices[i], indices[(i + 1) % len(indices)]) for i in range(len(indices))]


# Mesh edges the warp must keep: lips (outer and inner), eyes, jaw line.
_CONSTRAINED_EDGES: Final = (
    _ring(range(60, 68)) + _ring(range(48, 60)) + _ring(range(36, 42)) + _ring(range(42, 48))
)

# Rigid points (nose bridge, eye corners): they move only with the head, so a similarity fitted
# to them tells where the skull (and the upper teeth) went.
_RIGID: Final = np.array([27, 28, 29, 30, 31, 33, 35, 36, 39, 42, 45])


_OUTER_JAW: Final = (1, 3, 5, 7, 8, 9, 11, 13, 15)


def _head_anchors(neutral: np.ndarray, size: int) -> np.ndarray:
    """Extra mesh points that move with the head but not with the jaw, (K, 2).

    Four on the cheekbones (below each eye, beside each nostril): without them Delaunay joins
    the jaw line straight to the eyes and the nose, and an opening jaw drags the lower eyelids
    along. A ring just outside the jaw line (neck, background beside the face): there the
    skin beyond the jaw absorbs the jaw's motion, instead of the whole region down to the crop
    border (which would bend the background).
    """
    nl = np.asarray(neutral, dtype=np.float64)
    cheeks = np.stack(
        [
            0.5 * (nl[41] + nl[2]),  # below the right eye (image left)
            0.5 * (nl[46] + nl[14]),  # below the left eye
            0.5 * (nl[31] + nl[3]),  # beside the right nostril
            0.5 * (nl[35] + nl[13]),  # beside the left nostril
        ]
    )
    jaw = nl[list(_OUTER_JAW)]
    # Pushed away from the nose tip, but kept inside the crop (and off the border points).
    ring = np.clip(jaw + 0.25 * (jaw - nl[30]), 2.0, size - 3.0)
    pts = np.concatenate([cheeks, ring])
    # Drop points that crowd another anchor or a landmark (thin, fragile triangles).
    keep: list[int] = []
    for i, p in enumerate(pts):
        others = np.concatenate([nl, pts[keep]]) if keep else nl
        if np.hypot(*(others - p).T).min() >= 3.0:
            keep.append(i)
    return pts[keep]


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (2, 3) with ``dst ~= A[:, :2] @ src + A[:, 2]`` (Umeyama)."""
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    s0, d0 = src - ms, dst - md
    cov = d0.T @ s0 / len(src)  # (2, 2)
    u, sig, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u @ vt))
    fix = np.diag([1.0, d])
    rot = u @ fix @ vt
    scale = float((sig * np.diag(fix)).sum() / max((s0**2).sum() / len(src), 1e-12))
    lin = scale * rot
    return np.concatenate([lin, (md - lin @ ms)[:, None]], axis=1)


def _signed_distance(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Signed distance of (N, 2) points to a closed polygon: positive inside, negative out."""
    a = poly
    b = np.roll(poly, -1, axis=0)
    ab = b - a  # (K, 2)
    ap = points[:, None, :] - a[None]  # (N, K, 2)
    t = np.clip((ap * ab[None]).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    dist = np.sqrt(((ap - t[..., None] * ab[None]) ** 2).sum(-1)).min(axis=1)  # (N,)
    py = points[:, 1:2]
    ay, by = a[None, :, 1], b[None, :, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = a[None, :, 0] + (py - ay) * (b[None, :, 0] - a[None, :, 0]) / (by - ay)
    crossings = (((ay > py) != (by > py)) & (points[:, 0:1] < xc)).sum(axis=1)
    return np.where(crossings % 2 == 1, dist, -dist)


@dataclass(frozen=True)
class MouthStyle:
    """Colours (RGB 0-255) and proportions of the drawn mouth interior."""

    teeth: tuple[float, float, float] = (226.0, 222.0, 206.0)
    cavity: tuple[float, float, float] = (52.0, 18.0, 22.0)
    tongue: tuple[float, float, float] = (170.0, 78.0, 84.0)
    upper_teeth_w: float = 0.1  # visible upper-teeth height below the neutral inner lip / W
    lower_teeth_w: float = 0.035  # lower-teeth height above the neutral lower inner lip / W


class FrameRenderer:
    """Renders crop frames of an avatar for arbitrary 68-point landmarks.

    The reference crop is warped piecewise-affinely from the neutral landmarks to the target
    ones (fixed crop-border points keep the background still while the head moves), then the
    mouth interior is drawn inside the inner-lip polygon: a dark cavity with an inner shadow,
    the upper teeth (attached to the skull: they do not move with the lip), the lower teeth
    and a tongue (attached to the jaw), all anti-aliased. Deterministic; no randomness.

    Args:
        reference: (S, S, 3) uint8 aligned crop.
        neutral: (68, 2) landmarks of the crop, in crop pixels.
        style: mouth-interior colours; by default the teeth colour is measured on the
            reference when its mouth shows teeth, and all colours follow its skin brightness.
    """

    def __init__(
        self, reference: np.ndarray, neutral: np.ndarray, style: MouthStyle | None = None
    ) -> None:
        ref = np.asarray(reference)
        if (
            ref.dtype != np.uint8
            or ref.ndim != 3
            or ref.shape[2] != 3
            or ref.shape[0] != ref.shape[1]
        ):
            raise ValueError(
                f"reference must be a square (S, S, 3) uint8 crop, got {ref.shape} {ref.dtype}"
            )
        nl = np.asarray(neutral, dtype=np.float64)
        if nl.shape != (NUM_LANDMARKS, 2):
            raise ValueError(f"neutral landmarks must have shape (68, 2), got {nl.shape}")
        self.size = int(ref.shape[0])
        self.reference = ref
        self.neutral = nl
        self._ref_flat = ref.reshape(-1, 3).astype(np.float32)  # (S*S, 3)
        self._border = _border_points(self.size)  # (B, 2)
        self._anchors = _head_anchors(nl, self.size)  # (K, 2)
        self._src = np.concatenate([nl, self._anchors, self._border])  # (68 + K + B, 2)
        self.triangles = constrained_triangulation(self._src, _CONSTRAINED_EDGES)  # (M, 3)
        self.style = style if style is not None else self._measure_style()
        self._mouth_w = float(np.hypot(*(nl[54] - nl[48])))
        # Neutral inner-lip curves (x sorted), for the teeth lines.
        up = nl[[60, 61, 62, 63, 64]]
        lo = nl[[60, 67, 66, 65, 64]]
        self._upper_curve = up[np.argsort(up[:, 0])]
        self._lower_curve = lo[np.argsort(lo[:, 0])]

    def _measure_style(self) -> MouthStyle:
        s = self.size
        nl = self.neutral
        # Skin brightness from the cheeks and the nose: colours drawn in the mouth follow the
        # photo's exposure, so a dark photo does not get glowing teeth.
        probe = nl[[1, 2, 3, 13, 14, 15, 29, 30]] * 0.7 + nl[[30]] * 0.3  # (8, 2) on the cheeks
        xs = np.clip(np.rint(probe[:, 0]).astype(int), 0, s - 1)
        ys = np.clip(np.rint(probe[:, 1]).astype(int), 0, s - 1)
        skin = self.reference[ys, xs].astype(np.float64).mean(axis=0)  # (3,)
        gain = float(np.clip(skin.mean() / 170.0, 0.45, 1.25))
        base = MouthStyle()
        teeth = tuple(min(255.0, c * gain) for c in base.teeth)
        # If the photo shows teeth, take their colour: the brightest part of the inner mouth.
        vs, us = np.mgrid[0:s, 0:s]
        grid = np.stack([us.ravel(), vs.ravel()], axis=1).astype(np.float64)
        inside = _signed_distance(grid, nl[60:68]) > 0.5
        if inside.sum() >= 12:
            pix = self.reference.reshape(-1, 3)[inside].astype(np.float64)  # (n, 3)
            luma = pix @ np.array([0.299, 0.587, 0.114])
            bright = pix[luma >= np.quantile(luma, 0.7)].mean(axis=0)
            # Accept only a light, low-saturation colour (not lips or a dark gap).
            if bright.mean() > 0.75 * skin.mean() and bright.max() - bright.min() < 60:
                teeth = (float(bright[0]), float(bright[1]), float(bright[2]))
        return MouthStyle(
            teeth=teeth,  # type: ignore[arg-type]
            cavity=tuple(c * gain for c in base.cavity),  # type: ignore[arg-type]
            tongue=tuple(c * gain for c in base.tongue),  # type: ignore[arg-type]
        )

    # -- warp ---------------------------------------------------------------------------------

    def source_map(self, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each output pixel samples the reference: (S, S) x and y source coordinates.

        Rasterises every triangle at once: each triangle's bounding box lists its candidate
        pixels (about twice the crop area in all), barycentric coordinates select the pixels
        inside, and those map through the triangle's affine to the neutral mesh.
        """
        s = self.size
        lm = np.asarray(landmarks, dtype=np.float64)
        # The anchors ride with the head (a similarity fitted to rigid points), so jaw motion
        # stretches only the skin between them and the jaw line.
        head = _similarity(self.neutral[_RIGID], lm[_RIGID])  # (2, 3) neutral -> frame
        anchors = self._anchors @ head[:, :2].T + head[:, 2]  # (K, 2)
        dst = np.concatenate([lm, anchors, self._border])
        d = dst[self.triangles]  # (M, 3, 2) target triangles
        sv = self._src[self.triangles]  # (M, 3, 2) the same triangles on the reference
        det = (d[:, 1, 1] - d[:, 2, 1]) * (d[:, 0, 0] - d[:, 2, 0]) + (d[:, 2, 0] - d[:, 1, 0]) * (
            d[:, 0, 1] - d[:, 2, 1]
        )  # (M,) twice the signed area
        x0 = np.clip(np.floor(d[..., 0].min(axis=1)), 0, s - 1).astype(np.int64)  # (M,)
        x1 = np.clip(np.ceil(d[..., 0].max(axis=1)), 0, s - 1).astype(np.int64)
        y0 = np.clip(np.floor(d[..., 1].min(axis=1)), 0, s - 1).astype(np.int64)
        y1 = np.clip(np.ceil(d[..., 1].max(axis=1)), 0, s - 1).astype(np.int64)
        bw, bh = x1 - x0 + 1, y1 - y0 + 1
        # A collapsed triangle (a shut eye, closed lips) covers no pixel.
        area = np.where(np.abs(det) > 1e-9, bw * bh, 0)  # (M,)
        tri = np.repeat(np.arange(len(area)), area)  # (K,) candidate pairs
        start = np.cumsum(area) - area
        off = np.arange(tri.size) - np.repeat(start, area)  # position inside the box
        px = (x0[tri] + off % bw[tri]).astype(np.int64)  # (K,)
        py = (y0[tri] + off // bw[tri]).astype(np.int64)
        dt = d[tri]  # (K, 3, 2)
        rx = px - dt[:, 2, 0]
        ry = py - dt[:, 2, 1]
        l0 = ((dt[:, 1, 1] - dt[:, 2, 1]) * rx + (dt[:, 2, 0] - dt[:, 1, 0]) * ry) / det[tri]
        l1 = ((dt[:, 2, 1] - dt[:, 0, 1]) * rx + (dt[:, 0, 0] - dt[:, 2, 0]) * ry) / det[tri]
        l2 = 1.0 - l0 - l1
        inside = (l0 >= -1e-7) & (l1 >= -1e-7) & (l2 >= -1e-7)  # (K,)
        lam = np.stack([l0[inside], l1[inside], l2[inside]], axis=1)  # (k, 3)
        src = np.einsum("kc,kcd->kd", lam, sv[tri[inside]])  # (k, 2)
        flat = py[inside] * s + px[inside]  # (k,)
        # Pixels no triangle claims (none in practice) sample themselves.
        vs, us = np.mgrid[0:s, 0:s].astype(np.float64)
        map_x, map_y = us.reshape(-1), vs.reshape(-1)
        # A pixel on a shared edge is claimed twice: both triangles give the same point.
        map_x[flat] = src[:, 0]
        map_y[flat] = src[:, 1]
        return map_x.reshape(s, s), map_y.reshape(s, s)

    def warp(self, landmarks: np.ndarray) -> np.ndarray:
        """The reference warped onto ``landmarks``: (S, S, 3) float32 in 0-255."""
        s = self.size
        map_x, map_y = self.source_map(landmarks)
        index, weight, _ = bilinear_taps(map_x, map_y, s, s)  # (4, S*S) each
        out = (self._ref_flat[index] * weight[:, :, None]).sum(axis=0)  # (S*S, 3)
        return out.reshape(s, s, 3)

    # -- mouth interior -----------------------------------------------------------------------

    def _draw_mouth(self, img: np.ndarray, landmarks: np.ndarray) -> None:
        """Draw the mouth interior into ``img`` ((S, S, 3) float32), in place."""
        s = self.size
        lm = np.asarray(landmarks, dtype=np.float64)
        poly = lm[60:68]  # (8, 2) inner lip outline
        x0 = max(int(np.floor(poly[:, 0].min())) - 1, 0)
        x1 = min(int(np.ceil(poly[:, 0].max())) + 1, s - 1)
        y0 = max(int(np.floor(poly[:, 1].min())) - 1, 0)
        y1 = min(int(np.ceil(poly[:, 1].max())) + 1, s - 1)
        if x1 <= x0 or y1 <= y0:
            return
        vs, us = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
        pts = np.stack([us.ravel(), vs.ravel()], axis=1)  # (n, 2)
        sd = _signed_distance(pts, poly)  # (n,) px, positive inside
        # Pixel coverage: from the distance to the outline, and never more than the local
        # height of the opening, so a nearly shut mouth (a sliver polygon) draws nothing
        # instead of a half-covered line.
        up_t = poly[[0, 1, 2, 3, 4]]
        lo_t = poly[[0, 7, 6, 5, 4]]
        up_t = up_t[np.argsort(up_t[:, 0])]
        lo_t = lo_t[np.argsort(lo_t[:, 0])]
        height = np.interp(pts[:, 0], lo_t[:, 0], lo_t[:, 1]) - np.interp(
            pts[:, 0], up_t[:, 0], up_t[:, 1]
        )
        cover = np.clip(sd + 0.5, 0.0, 1.0) * np.clip(height, 0.0, 1.0)
        if not (cover > 0).any():
            return
        st = self.style
        w = self._mouth_w
        # Teeth and tongue positions in the neutral frame: undo the head motion (a similarity
        # fitted to rigid points), so the upper teeth stay fixed to the skull.
        head = _similarity(self.neutral[_RIGID], lm[_RIGID])  # neutral -> frame
        inv = np.linalg.inv(np.vstack([head, [0.0, 0.0, 1.0]]))[:2]  # frame -> neutral
        q = pts @ inv[:, :2].T + inv[:, 2]  # (n, 2) pixel positions in the neutral frame
        # How far the jaw dropped, measured at the chin in the neutral frame.
        chin = lm[8] @ inv[:, :2].T + inv[:, 2]
        drop = max(float(chin[1] - self.neutral[8, 1]), 0.0)
        up_y = np.interp(q[:, 0], self._upper_curve[:, 0], self._upper_curve[:, 1])
        lo_y = np.interp(q[:, 0], self._lower_curve[:, 0], self._lower_curve[:, 1])
        cx = float(0.5 * (self.neutral[60, 0] + self.neutral[64, 0]))
        half_in = max(0.5 * abs(self.neutral[64, 0] - self.neutral[60, 0]), 1.0)
        across = np.clip(np.abs(q[:, 0] - cx) / half_in, 0.0, 1.0)  # 0 middle, 1 corners

        cavity = np.array(st.cavity)
        col = np.broadcast_to(cavity, (len(pts), 3)).copy()  # (n, 3)
        # Tongue: an ellipse resting on the floor of the mouth, moving with the jaw.
        ty = lo_y + 0.85 * drop
        opening = np.maximum(ty - up_y, 0.0)
        ry = np.maximum(0.35 * opening, 0.8)
        r = np.hypot((q[:, 0] - cx) / (0.62 * half_in), (q[:, 1] - ty) / ry)
        tongue_a = np.clip((1.0 - r) * np.minimum(ry, 0.62 * half_in) + 0.5, 0.0, 1.0)
        col += tongue_a[:, None] * (np.array(st.tongue) - col)
        # Lower teeth: a band above the lower lip, on the jaw.
        lower_top = lo_y + 0.85 * drop - st.lower_teeth_w * w
        # Mostly hidden behind the lower lip: drawn fainter than the upper teeth.
        lower_a = 0.7 * np.clip(q[:, 1] - lower_top + 0.5, 0.0, 1.0)
        teeth = np.array(st.teeth)
        col += lower_a[:, None] * (0.8 * teeth - col)
        # Upper teeth: from the lip down to a fixed line on the skull.
        upper_bottom = up_y + st.upper_teeth_w * w
        upper_a = np.clip(upper_bottom - q[:, 1] + 0.5, 0.0, 1.0)
        # A faint gap between teeth: brightness ripples with the tooth width.
        tooth = 1.0 - 0.1 * np.cos(np.pi * (q[:, 0] - cx) / (0.09 * w)) ** 16
        col += upper_a[:, None] * (teeth * tooth[:, None] - col)
        # Depth: darker towards the corners and near the lips (inner shadow).
        shade = (1.0 - 0.4 * across**2) * (0.72 + 0.28 * np.clip(sd / 1.5, 0.0, 1.0))
        col *= shade[:, None]
        region = img[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3)
        region += cover[:, None] * (col - region)
        img[y0 : y1 + 1, x0 : x1 + 1] = region.reshape(y1 - y0 + 1, x1 - x0 + 1, 3)

    def render(self, landmarks: np.ndarray) -> np.ndarray:
        """One frame for (68, 2) crop-pixel ``landmarks``: (S, S, 3) uint8."""
        lm = np.asarray(landmarks, dtype=np.float64)
        if lm.shape != (NUM_LANDMARKS, 2) or not np.all(np.isfinite(lm)):
            raise ValueError(f"landmarks must be a finite (68, 2) array, got shape {lm.shape}")
        img = self.warp(lm)
        self._draw_mouth(img, lm)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------- clips


def frame_times(n_frames: int) -> np.ndarray:
    """The instant each frame shows: the centre of its 40 ms, in seconds; (T,) float64."""
    return (np.arange(n_frames, dtype=np.float64) + 0.5) * (FRAME_MS / 1000.0)


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip (a clip is a pure function of its spec + avatar)."""

    clip_id: str
    split: str  # "train" | "heldout"
    sentence_id: int
    language: str
    text: str
    voice: str  # espeak voice with variant, e.g. "en-us+m3"
    rate_wpm: int
    pitch: int
    articulation: float  # scale of the mouth movements (viseme_trajectory)
    gain_db: float  # peak level of the speech, dBFS
    lead_s: float  # silence before the speech
    tail_s: float  # silence after it
    sway_amplitude: float  # IdleConfig.sway_amplitude
    blink_interval_s: float  # IdleConfig.blink_interval_s
    seed: int  # idle-motion seed

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False)


@dataclass
class Clip:
    """A synthesised clip, in memory (see :func:`synthesize_clip`)."""

    spec: ClipSpec
    audio: np.ndarray  # (N,) float32 16 kHz mono
    phonemes: list[PhonemeSegment]  # times on the clip's timeline (lead included)
    words: list[tuple[str, float]]
    params: np.ndarray  # (T, 5) float32
    speech_landmarks: np.ndarray  # (T, 68, 2) float32: neutral + speech motion
    landmarks: np.ndarray  # (T, 68, 2) float32: + blinks and head sway (what frames show)
    blink: np.ndarray  # (T,) float32, 0 open .. 1 shut
    frames: np.ndarray | None  # (T, S, S, 3) uint8, None if not rendered


def _resample_to_16k(utt: Utterance) -> np.ndarray:
    x = utt.pcm.astype(np.float32) / 32768.0
    rs = StreamingResampler(utt.sample_rate, SAMPLE_RATE_HZ)
    return np.concatenate([rs.push(x), rs.flush()]).astype(np.float32)


def synthesize_clip(
    spec: ClipSpec,
    geometry: MouthGeometry,
    renderer: FrameRenderer | None,
) -> Clip:
    """Speech, motion and (if ``renderer`` is given) frames of one clip.

    The audio is espeak's speech resampled to 16 kHz, scaled to ``spec.gain_db`` peak and
    padded with ``lead_s``/``tail_s`` of silence; frame ``i`` shows the mouth at
    ``(i + 0.5) * 40 ms`` and there is one frame per started 40 ms of audio.
    """
    # A fresh espeak process per clip: the audio is then a function of the spec alone, not of
    # which clips this process synthesised before (a resumed build matches a fresh one).
    utt = synthesize(spec.text, spec.voice, spec.rate_wpm, spec.pitch, fresh_process=True)
    speech = _resample_to_16k(utt)
    peak = float(np.abs(speech).max()) if speech.size else 0.0
    if peak > 0:
        speech = speech * (10.0 ** (spec.gain_db / 20.0) / peak)
    lead = round(spec.lead_s * SAMPLE_RATE_HZ)
    tail = round(spec.tail_s * SAMPLE_RATE_HZ)
    audio = np.concatenate(
        [np.zeros(lead, np.float32), speech.astype(np.float32), np.zeros(tail, np.float32)]
    )
    offset = lead / SAMPLE_RATE_HZ
    phonemes = [
        PhonemeSegment(p.name, p.start_s + offset, p.end_s + offset) for p in utt.phonemes()
    ]
    words = [(w, t + offset) for w, t in utt.words()]
    n_frames = frames_for_samples(len(audio))
    times = frame_times(n_frames)
    segs = viseme_segments(phonemes, spec.language)
    params = viseme_trajectory(segs, times, articulation=spec.articulation)  # (T, 5)
    speech_lm = params_to_landmarks(geometry, params)  # (T, 68, 2)
    speech_lm = speech_lm.reshape(n_frames, NUM_LANDMARKS, 2)

    # Idle motion works in normalised crop coordinates, like the engine's.
    size = renderer.size if renderer is not None else 128
    idle = IdleMotion(
        crop_px_to_norm(geometry.neutral.astype(np.float32), size),
        IdleConfig(sway_amplitude=spec.sway_amplitude, blink_interval_s=spec.blink_interval_s),
        spec.seed,
    )
    offsets = (
        np.stack([idle.offset(t) for t in range(n_frames)])
        if n_frames
        else np.zeros((0, NUM_LANDMARKS, 2), np.float32)
    )  # (T, 68, 2) normalised
    landmarks = (speech_lm + offsets * (size / 2.0)).astype(np.float32)
    blink = np.array([idle.blink_amount(t) for t in range(n_frames)], dtype=np.float32)

    frames = None
    if renderer is not None:
        frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
        for t in range(n_frames):
            frames[t] = renderer.render(landmarks[t])
    return Clip(spec, audio, phonemes, words, params, speech_lm, landmarks, blink, frames)


def _write_clip(
    clip: Clip, reference: np.ndarray, wav_path: Path, npz_path: Path, avatar_key: str
) -> None:
    """Write the WAV and the npz atomically (temporary names, then renames; npz last)."""
    pcm16 = np.clip(np.rint(clip.audio * 32767.0), -32768, 32767).astype(np.int16)
    tmp_wav = wav_path.with_name(wav_path.stem + ".tmp.wav")
    sf.write(tmp_wav, pcm16, SAMPLE_RATE_HZ, subtype="PCM_16")
    names = [p.name for p in clip.phonemes]
    arrays: dict[str, np.ndarray] = {
        "spec": np.array(clip.spec.to_json()),
        # What made the clip besides its spec: a resumed build reuses it only if both match.
        "generator": np.array(f"{GENERATOR_VERSION}:{avatar_key}"),
        "frame_time_s": frame_times(len(clip.params)).astype(np.float32),
        "params": clip.params,
        "param_names": np.array(PARAMS),
        "speech_landmarks": clip.speech_landmarks,
        "landmarks": clip.landmarks,
        "blink": clip.blink,
        "phoneme": np.array(names, dtype="<U8"),
        "phoneme_start_s": np.array([p.start_s for p in clip.phonemes], dtype=np.float32),
        "phoneme_end_s": np.array([p.end_s for p in clip.phonemes], dtype=np.float32),
        "phoneme_viseme": np.array(
            [
                VISEME_INDEX[(visemes_for_phoneme(n, clip.spec.language) or ("rest",))[0]]
                for n in names
            ],
            dtype=np.int16,
        ),
        "viseme_names": np.array([v.name for v in VISEMES]),
        "word": np.array([w for w, _ in clip.words], dtype=str),
        "word_start_s": np.array([t for _, t in clip.words], dtype=np.float32),
    }
    if clip.frames is not None:
        arrays["frames_delta"] = encode_frames(clip.frames, reference)
    tmp_npz = npz_path.with_name(npz_path.stem + ".tmp.npz")
    np.savez_compressed(tmp_npz, **arrays)  # type: ignore[arg-type]
    os.replace(tmp_wav, wav_path)
    os.replace(tmp_npz, npz_path)


def encode_frames(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Frames as temporal differences, uint8 modulo 256 (lossless).

    Element 0 is frame 0 minus the reference crop, element t frame t minus frame t-1. Most
    differences are 0 or +-1, so zlib packs them about 4x smaller than the raw frames.
    """
    f = np.asarray(frames, dtype=np.uint8)  # (T, S, S, 3)
    out = np.empty_like(f)
    if len(f):
        out[0] = f[0] - reference  # uint8 arithmetic wraps modulo 256: exactly invertible
        np.subtract(f[1:], f[:-1], out=out[1:])
    return out


def decode_frames(delta: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_frames`: (T, S, S, 3) uint8 frames."""
    out = np.cumsum(delta, axis=0, dtype=np.uint8)  # wraps modulo 256
    out += reference[None]
    return out


def read_clip(npz_path: str | Path, reference: np.ndarray | None = None) -> dict[str, Any]:
    """Load a clip's arrays (no pickle).

    Args:
        npz_path: the clip's ``.npz``.
        reference: the corpus reference crop (``reference.png``), needed to decode frames;
            if None, it is read from the corpus folder (two levels up).

    Returns:
        A dict with the arrays listed in the module docstring, with ``"frames_delta"``
        decoded to ``"frames"`` ((T, S, S, 3) uint8) and ``"spec"`` parsed into a dict of the
        :class:`ClipSpec` fields.
    """
    p = Path(npz_path)
    with np.load(p, allow_pickle=False) as z:
        out: dict[str, Any] = {k: z[k] for k in z.files}
    out["spec"] = json.loads(str(out["spec"]))
    if "frames_delta" in out:
        if reference is None:
            reference = np.asarray(Image.open(p.parent.parent / "reference.png").convert("RGB"))
        out["frames"] = decode_frames(out.pop("frames_delta"), reference)
    return out


# --------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class CorpusConfig:
    """Knobs of :func:`build_corpus` (ranges are sampled uniformly per clip)."""

    heldout_fraction: float = 0.1  # of the audio duration
    heldout_sentence_fraction: float = 0.1  # per language, at least 2 sentences
    rate_wpm: tuple[int, int] = (125, 225)
    pitch: tuple[int, int] = (30, 70)
    articulation: tuple[float, float] = (0.85, 1.15)
    gain_db: tuple[float, float] = (-9.0, -1.0)
    lead_s: tuple[float, float] = (0.15, 0.6)
    tail_s: tuple[float, float] = (0.15, 0.6)
    sway_amplitude: tuple[float, float] = (0.003, 0.012)
    blink_interval_s: tuple[float, float] = (2.5, 5.0)
    render_frames: bool = True
    avatar: AvatarConfig = field(default_factory=AvatarConfig)


@dataclass
class CorpusResult:
    """What :func:`build_corpus` made."""

    out_dir: Path
    manifest: dict[str, Any]
    clips: int
    duration_s: float
    wall_s: float
    reused: int  # clips already on disk from an interrupted run


def _split_plan(
    sentences: Sequence[Sentence], cfg: CorpusConfig, seed: int
) -> tuple[dict[str, list[Sentence]], dict[str, list[str]]]:
    """Held-out sentences (per language) and voice variants, chosen by ``seed``."""
    rng = np.random.default_rng([seed, 1])
    by_split: dict[str, list[Sentence]] = {"train": [], "heldout": []}
    for lang in LANGUAGE_VOICES:
        group = [s for s in sentences if s.language == lang]
        if not group:
            continue
        n_held = max(2, round(cfg.heldout_sentence_fraction * len(group)))
        order = rng.permutation(len(group))
        held = {int(i) for i in order[:n_held]}
        for i, s in enumerate(group):
            by_split["heldout" if i in held else "train"].append(s)
    male = list(MALE_VARIANTS)
    female = list(FEMALE_VARIANTS)
    held_m = male[int(rng.integers(len(male)))]
    held_f = female[int(rng.integers(len(female)))]
    variants = {
        "train": [v for v in male + female if v not in (held_m, held_f)],
        "heldout": [held_m, held_f],
    }
    return by_split, variants


def _plan_clip(
    k: int,
    split: str,
    sentence: Sentence,
    variants: Sequence[str],
    cfg: CorpusConfig,
    seed: int,
) -> ClipSpec:
    rng = np.random.default_rng([seed, 2, k])
    base = LANGUAGE_VOICES[sentence.language]
    voice = f"{base[int(rng.integers(len(base)))]}+{variants[int(rng.integers(len(variants)))]}"

    def uni(r: tuple[float, float]) -> float:
        return float(rng.uniform(r[0], r[1]))

    return ClipSpec(
        clip_id=f"{k:05d}",
        split=split,
        sentence_id=sentence.id,
        language=sentence.language,
        text=sentence.text,
        voice=voice,
        rate_wpm=int(rng.integers(cfg.rate_wpm[0], cfg.rate_wpm[1] + 1)),
        pitch=int(rng.integers(cfg.pitch[0], cfg.pitch[1] + 1)),
        articulation=round(uni(cfg.articulation), 4),
        gain_db=round(uni(cfg.gain_db), 2),
        lead_s=round(uni(cfg.lead_s), 3),
        tail_s=round(uni(cfg.tail_s), 3),
        sway_amplitude=round(uni(cfg.sway_amplitude), 5),
        blink_interval_s=round(uni(cfg.blink_interval_s), 3),
        seed=int(rng.integers(2**31 - 1)),
    )


def _existing_clip(
    npz_path: Path, wav_path: Path, spec: ClipSpec, avatar_key: str
) -> dict[str, Any] | None:
    """Facts about an already written clip with this exact spec, or None."""
    if not (npz_path.is_file() and wav_path.is_file()):
        return None
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            if str(z["spec"]) != spec.to_json():
                return None
            if (
                "generator" not in z.files
                or str(z["generator"]) != f"{GENERATOR_VERSION}:{avatar_key}"
            ):
                return None
            n_frames = int(z["params"].shape[0])
        n_samples = int(sf.info(str(wav_path)).frames)
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    if frames_for_samples(n_samples) != n_frames:
        return None
    return {"n_samples": n_samples, "n_frames": n_frames}


def build_corpus(
    image: np.ndarray,
    landmarks: np.ndarray | None,
    out_dir: str | Path,
    minutes: float,
    seed: int = 0,
    progress: bool = True,
    cfg: CorpusConfig | None = None,
) -> CorpusResult:
    """Build a synthetic talking corpus for one face.

    Clips are planned one after another from ``seed`` until their audio adds up to
    ``minutes`` (and both splits have at least one clip). The held-out split uses sentences and
    voice variants that no training clip uses (chosen per seed), and gets about
    ``cfg.heldout_fraction`` of the audio. A rerun into the same folder with the same
    arguments reuses the clips already written (an interrupted build resumes).

    Args:
        image: (H, W, 3) uint8 RGB photo with one face.
        landmarks: its (68, 2) pixel landmarks, or None to detect them (needs dlib).
        out_dir: output folder (created).
        minutes: audio duration to generate, > 0.
        seed: everything random derives from it.
        progress: show a tqdm progress bar (seconds of audio).
        cfg: ranges and options (default :class:`CorpusConfig`).

    Returns:
        A :class:`CorpusResult`; the manifest is also written to ``out_dir/manifest.json``.

    Raises:
        ValueError: ``minutes`` not positive.
        InputError: no face, or bad landmarks.
        EspeakError: libespeak-ng is missing.
    """
    if not (isinstance(minutes, int | float) and math.isfinite(minutes) and minutes > 0):
        raise ValueError(f"minutes must be a positive number, got {minutes!r}")
    cfg = cfg if cfg is not None else CorpusConfig()
    t_start = time.perf_counter()
    out = Path(out_dir)
    clip_dir = out / "clips"
    clip_dir.mkdir(parents=True, exist_ok=True)

    avatar = prepare_avatar(image, cfg.avatar, landmarks=landmarks)
    crop = avatar.crop
    geometry = MouthGeometry.from_neutral(avatar.neutral)
    renderer = FrameRenderer(crop, avatar.neutral) if cfg.render_frames else None
    Image.fromarray(crop).save(out / "reference.png")

    sentences = load_sentences()
    by_split, variants = _split_plan(sentences, cfg, seed)
    orders = {
        s: list(np.random.default_rng([seed, 3, i]).permutation(len(by_split[s])))
        for i, s in enumerate(("train", "heldout"))
    }
    cursor = {"train": 0, "heldout": 0}

    target_s = 60.0 * float(minutes)
    done = {"train": 0.0, "heldout": 0.0}
    entries: list[dict[str, Any]] = []
    reused = 0
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=math.ceil(target_s), unit="s", desc="corpus", dynamic_ncols=True)
    try:
        k = 0
        while sum(done.values()) < target_s or not (done["train"] and done["heldout"]):
            total = sum(done.values())
            if k == 1 or (not done["heldout"] and total >= target_s):
                split = "heldout"  # a held-out clip early, so even a tiny corpus has one
            elif not done["train"]:
                split = "train"
            else:
                split = "heldout" if done["heldout"] < cfg.heldout_fraction * total else "train"
            pool = by_split[split]
            order = orders[split]
            sentence = pool[order[cursor[split] % len(pool)]]
            cursor[split] += 1
            spec = _plan_clip(k, split, sentence, variants[split], cfg, seed)
            wav_path = clip_dir / f"{spec.clip_id}.wav"
            npz_path = clip_dir / f"{spec.clip_id}.npz"
            facts = _existing_clip(npz_path, wav_path, spec, avatar.key)
            if facts is None:
                clip = synthesize_clip(spec, geometry, renderer)
                _write_clip(clip, crop, wav_path, npz_path, avatar.key)
                facts = {"n_samples": len(clip.audio), "n_frames": len(clip.params)}
            else:
                reused += 1
            duration = facts["n_samples"] / SAMPLE_RATE_HZ
            done[split] += duration
            entries.append(
                {
                    "id": spec.clip_id,
                    "split": split,
                    "wav": f"clips/{wav_path.name}",
                    "data": f"clips/{npz_path.name}",
                    **{k2: v for k2, v in dataclasses.asdict(spec).items() if k2 != "clip_id"},
                    "n_samples": facts["n_samples"],
                    "n_frames": facts["n_frames"],
                    "duration_s": round(duration, 4),
                }
            )
            if bar is not None:  # whole seconds of audio done
                bar.update(int(sum(done.values())) - bar.n)
            k += 1
    finally:
        if bar is not None:
            bar.close()

    def used(split: str, key: str) -> list[Any]:
        return sorted({e[key] for e in entries if e["split"] == split})

    manifest: dict[str, Any] = {
        "format": CORPUS_FORMAT,
        "version": CORPUS_VERSION,
        "seed": seed,
        "minutes_requested": float(minutes),
        "duration_s": round(sum(done.values()), 3),
        "fps": FPS,
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "frame_time": "frame i shows the mouth at (i + 0.5) * 40 ms; one frame per started 40 ms",
        "crop_size": int(crop.shape[0]),
        "reference": "reference.png",
        "avatar_key": avatar.key,
        "neutral": [[round(float(x), 4), round(float(y), 4)] for x, y in avatar.neutral],
        "params": list(PARAMS),
        "visemes": [v.name for v in VISEMES],
        "frames": "frames_delta" if cfg.render_frames else None,
        "splits": {
            s: {
                "clips": sum(1 for e in entries if e["split"] == s),
                "duration_s": round(done[s], 3),
                "sentence_ids": used(s, "sentence_id"),
                "voices": used(s, "voice"),
                "voice_variants": sorted(variants[s]),
                "available_sentence_ids": sorted(x.id for x in by_split[s]),
            }
            for s in ("train", "heldout")
        },
        "config": _jsonable(dataclasses.asdict(cfg)),
        "clips": entries,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "manifest.json")
    wall = time.perf_counter() - t_start
    return CorpusResult(out, manifest, len(entries), sum(done.values()), wall, reused)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def corpus_digest(out_dir: str | Path) -> str:
    """sha256 over the manifest's clip list and every clip file's bytes."""
    out = Path(out_dir)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    h = hashlib.sha256(json.dumps(manifest["clips"], sort_keys=True).encode())
    for e in manifest["clips"]:
        h.update((out / e["wav"]).read_bytes())
        h.update((out / e["data"]).read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------- CLI


def add_corpus_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``talkstream corpus`` on the CLI's subparsers; returns the new parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "corpus",
        help="build a synthetic talking corpus (espeak-ng speech + rendered face) for training",
        description="Synthesise speech with espeak-ng (several languages, voices, rates), "
        "derive jaw and lip motion from its phoneme timings, and render 25 fps face crops of "
        "the photo. Writes WAV + npz clips and a manifest with a held-out split (sentences "
        "and voices never used in training). Needs libespeak-ng (Debian: libespeak-ng1).",
    )
    p.add_argument(
        "--image", type=Path, default=None, help="face photo; default: the bundled astronaut"
    )
    p.add_argument(
        "--landmarks",
        type=Path,
        default=None,
        help="JSON with the photo's 68 iBUG landmarks, instead of detecting them",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--minutes", type=float, default=1.0, help="minutes of speech to generate (1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_corpus)
    return p


def _cmd_corpus(a: argparse.Namespace) -> int:
    from talkstream.engine.avatar import default_image, default_landmarks, load_image
    from talkstream.engine.landmarks import load_landmarks_json

    cfg = CorpusConfig()
    points: np.ndarray | None
    if a.image is None:
        if a.landmarks is not None:
            raise InputError("--landmarks needs --image (they must belong to the same photo)")
        image, points = default_image(), default_landmarks()
    else:
        image = load_image(a.image, cfg.avatar)
        points = load_landmarks_json(a.landmarks) if a.landmarks is not None else None
    res = build_corpus(image, points, a.out, a.minutes, a.seed, not a.no_progress, cfg)
    splits = res.manifest["splits"]
    print(
        f"wrote {res.clips} clips ({res.duration_s / 60:.2f} min of speech; "
        f"{splits['train']['clips']} train, {splits['heldout']['clips']} held-out) to "
        f"{res.out_dir} in {res.wall_s:.1f} s"
        + (f"; {res.reused} reused from an earlier run" if res.reused else "")
    )
    return 0
