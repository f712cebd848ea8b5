"""Renders face-crop frames of an avatar for arbitrary 68-point landmarks.

:class:`FrameRenderer` warps the avatar's aligned reference crop piecewise-affinely onto each
frame's landmarks: a Delaunay mesh of the 68 points, head-fixed anchors on the cheeks and
around the jaw, and fixed crop-border points, with the lip and eye outlines forced into the
mesh (:func:`constrained_triangulation`). It then draws the mouth interior (cavity, teeth,
tongue) inside the inner-lip outline. Deterministic: no randomness.

The synthetic corpus (:mod:`talkstream.training.synthetic`) renders its clips with it; a change
here that alters the pixels of a frame must bump ``synthetic.GENERATOR_VERSION``, so that a
resumed build does not reuse clips rendered the old way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from scipy.spatial import Delaunay

from talkstream.engine.landmarks import NUM_LANDMARKS
from talkstream.kernels.post import bilinear_taps

logger = logging.getLogger(__name__)

__all__ = [
    "FrameRenderer",
    "MouthStyle",
    "constrained_triangulation",
]


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


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (2, 3) with ``dst ~= A[:, :2] @ src + A[:, 2]`` (Umeyama 1991):
    rotation, uniform scale and translation mapping the (N, 2) ``src`` points onto ``dst``."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
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
        head = fit_similarity(self.neutral[_RIGID], lm[_RIGID])  # (2, 3) neutral -> frame
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
        head = fit_similarity(self.neutral[_RIGID], lm[_RIGID])  # neutral -> frame
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
