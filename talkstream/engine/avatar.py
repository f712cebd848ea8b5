"""Avatar preparation: load the reference photo, find the face, judge it, cut the output frame
around it, align a square crop, build the paste-back mask.

Framing: the output frame is not the photo. ``AvatarConfig.framing`` cuts a frame of a fixed size
(``call`` 640x480 by default) around the face, scaled so the face has a fixed share of the
frame's height (:func:`frame_photo`); a 12 MP phone photo becomes a frame a CPU can encode at
25 fps. ``full`` keeps the whole photo. Detection runs on a copy no larger than
``AvatarConfig.detect_max_side``; landmarks stay in the photo's pixels, and the quality check
(:mod:`talkstream.engine.quality`) is made on them before any framing.

Done once per avatar (and cached on disk when ``AvatarConfig.cache_dir`` is set). Per frame the
denoiser regenerates the whole crop from target landmarks;
:func:`talkstream.kernels.post.paste_back` blends it into the full frame through the feathered
mask built here.

Alignment is a similarity transform (rotation, uniform scale, translation) that puts the eye
midpoint and the mouth centre at fixed canonical positions, with the eye-to-mouth distance equal
to ``face_scale * crop_size``. Every face therefore appears at the same place and size in the
crop, which is what the motion model and the denoiser are trained on.

Coordinates: ``(x, y)`` pixels with pixel ``i`` centred on ``i``. Normalised crop coordinates
are in [-1, 1] with the ``align_corners=False`` convention: ``x' = (x + 0.5) / S * 2 - 1``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import math
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from talkstream.config import AvatarConfig
from talkstream.engine.landmarks import (
    LEFT_EYE,
    NUM_LANDMARKS,
    RIGHT_EYE,
    DlibDetector,
    FaceDetection,
    LandmarkDetector,
    load_landmarks_json,
    save_landmarks_json,
    validate_landmarks,
)
from talkstream.engine.quality import FaceCheck, check_face
from talkstream.errors import InputError
from talkstream.kernels.post import PasteMap, bilinear_taps, build_paste_map, invert_affine

logger = logging.getLogger(__name__)

# Bump when anything that changes the cached arrays changes (alignment, mask, crop sampling).
# 2: the paste-back mask covers the lower face and the eyes only. 3: framing; the photo's
# landmarks and the detector score are cached too.
CACHE_FORMAT_VERSION = 3
# With several detections, those scoring under this share of the best one are ignored.
WEAK_FACE_SCORE_RATIO = 0.25

# Canonical layout, as a fraction of the crop from its top edge: the midpoint between the eye
# midpoint and the mouth centre. Slightly above the centre, because the face extends further
# below the mouth (chin, and the jaw drops when speaking) than above the eyes (brows).
# Checked on the bundled astronaut at face_scale 0.32: brows at ~0.17 S, chin at ~0.86 S.
_FACE_CENTRE_Y_FRACTION = 0.42
# Extra room around the face outline before the mask starts to fall off: the jaw moves down by
# a few percent of the crop when the mouth opens, and that moved chin must still be pasted.
_MASK_GROW_FRACTION = 0.04
# The asset holding the default face's landmarks (inside the package).
_DEFAULT_LANDMARKS_ASSET = "astronaut.landmarks.json"


# ----------------------------------------------------------------------------- image loading


def load_image(path: str | Path, cfg: AvatarConfig) -> np.ndarray:
    """Read a photo as RGB; one larger than ``cfg.max_image_pixels`` comes back reduced.

    See :func:`load_photo`, which also returns the reduction factor (what landmarks given in the
    photo's own pixels need).
    """
    return load_photo(path, cfg)[0]


def reduction_factor(width: int, height: int, max_pixels: int) -> int:
    """The smallest power of two ``k`` for which a ``width x height`` image reduced ``k`` times
    (each side divided by ``k``, rounded up) has at most ``max_pixels`` pixels."""
    k = 1
    while math.ceil(width / k) * math.ceil(height / k) > max_pixels and k < 1 << 12:
        k *= 2
    return k


def load_photo(path: str | Path, cfg: AvatarConfig) -> tuple[np.ndarray, int]:
    """Read a photo as RGB, reduced ``k`` times when it has more than ``cfg.max_image_pixels``.

    A phone photo of 48-50 MP is more than the output frame or the detector can use: it is
    reduced by the smallest power of two that brings it under the limit (a 50 MP photo to 12.5
    MP), while it is decoded where the format allows it (JPEG's DCT scaling: the full-size
    pixels are never held in memory), else by box-averaging ``k x k`` blocks after decoding.
    Pixel ``(x, y)`` of the photo is at ``((x + 0.5) / k - 0.5, (y + 0.5) / k - 0.5)`` in the
    result. The pixel count is read from the header before any pixel is decoded; more than
    Pillow's decompression-bomb limit (~89 MP) is refused. EXIF orientation is applied;
    transparency is flattened onto white; 16-bit and float images are scaled to 8 bit.

    Args:
        path: image file (any format Pillow reads: JPEG, PNG, WebP, ...).
        cfg: ``max_file_bytes`` (refused above) and ``max_image_pixels`` (reduced above).

    Returns:
        ``((H, W, 3) uint8 RGB C-contiguous, k)``; ``k`` is 1 for a photo within the limit.

    Raises:
        InputError: missing path, a directory, unreadable, too large (bytes, or pixels beyond
            the bomb guard), not an image, or corrupt/truncated; the message names the path.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"image file not found: {p}")
    if p.is_dir():
        raise InputError(f"image path is a directory, not a file: {p}")
    try:
        with p.open("rb") as f:
            # Read at most one byte past the limit: enough to tell, without trusting st_size
            # (a pipe or a growing file has none that is reliable).
            data = f.read(cfg.max_file_bytes + 1)
    except PermissionError as e:
        raise InputError(f"image file is not readable (permission denied): {p}") from e
    except OSError as e:
        raise InputError(f"cannot read image file {p}: {e.strerror or e}") from e
    if len(data) > cfg.max_file_bytes:
        limit_mb = cfg.max_file_bytes / 2**20
        raise InputError(
            f"image file {p} is larger than {limit_mb:.0f} MB; save it as a JPEG (a phone "
            "photo is 3-15 MB) or make it smaller, then try again"
        )
    if not data:
        raise InputError(f"image file {p} is empty")

    with warnings.catch_warnings():
        # Pillow's own bomb guard warns before it errors: make the warning an error too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as e:
            raise InputError(f"{p} is not an image file (or not a format Pillow can read)") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(_too_many_pixels(p, e)) from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InputError(f"image file {p} is corrupt: {e}") from e
        with im:
            width, height = im.size
            if width < 1 or height < 1:
                raise InputError(f"image {p} is empty ({width}x{height})")
            k = reduction_factor(width, height, cfg.max_image_pixels)
            try:
                if k > 1:
                    target = (math.ceil(width / k), math.ceil(height / k))
                    # JPEG: decode at 1/2, 1/4 or 1/8 scale directly (no-op for other formats).
                    im.draft(im.mode if im.mode in ("L", "RGB") else "RGB", target)
                im.load()
                done = round(width / im.size[0])  # what the decoder reduced already
                pic: Image.Image = im
                if k > done:
                    pic = _reducible(im).reduce(k // done)
                oriented = ImageOps.exif_transpose(pic)
                rgb = _to_rgb_array(oriented)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise InputError(_too_many_pixels(p, e)) from e
            except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
                raise InputError(f"image file {p} is corrupt or truncated: {e}") from e
    if k > 1:
        logger.info(
            "%s is %dx%d (%.0f MP): using it reduced %d times, %dx%d",
            p, width, height, width * height / 1e6, k, rgb.shape[1], rgb.shape[0],
        )  # fmt: skip
    return rgb, k


def _reducible(im: Image.Image) -> Image.Image:
    """``im`` in a mode ``Image.reduce`` averages (palette, 1-bit and 16-bit modes are not)."""
    if im.mode in ("L", "LA", "RGB", "RGBA", "I", "F"):
        return im
    if im.mode == "P":
        return im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode == "1":
        return im.convert("L")
    if im.mode.startswith("I;16"):
        return im.convert("I")
    return im.convert("RGB")


def _too_many_pixels(p: Path, e: Exception) -> str:
    limit_mp = (Image.MAX_IMAGE_PIXELS or 0) / 1e6
    return (
        f"image {p} has too many pixels to be a photo ({e}); make it smaller than "
        f"{limit_mp:.0f} MP first (a phone photo is 12-50 MP)"
    )


def scale_points_to_reduced(points: np.ndarray, k: int) -> np.ndarray:
    """(68, 2) pixel points of a photo -> the same points in it reduced ``k`` times."""
    if k == 1:
        return points
    return ((np.asarray(points, dtype=np.float64) + 0.5) / k - 0.5).astype(np.float32)


def scale_points_from_reduced(points: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`scale_points_to_reduced`: back to the photo's own pixels."""
    if k == 1:
        return points
    return ((np.asarray(points, dtype=np.float64) + 0.5) * k - 0.5).astype(np.float32)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any Pillow mode."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info
    ):
        # Flatten onto white: a transparent background reads as a plain backdrop, which is
        # what the paste-back expects around the face.
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        im = canvas
    if im.mode.startswith("I") or im.mode == "F":
        # 16-bit / integer / float greyscale: convert("RGB") would clip at 255; scale instead.
        arr = np.asarray(im, dtype=np.float64)  # (H, W)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)  # (H, W)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))  # (H, W, 3)
    return np.array(im.convert("RGB"), dtype=np.uint8, order="C")  # (H, W, 3)


# ----------------------------------------------------------------------------- defaults


def default_image() -> np.ndarray:
    """The bundled default face: ``skimage.data.astronaut()``, (512, 512, 3) uint8 RGB.

    NASA public domain; shipped inside scikit-image, so no download is needed.
    """
    import skimage.data  # lazy: only the default avatar needs it

    img = skimage.data.astronaut()
    return np.ascontiguousarray(img, dtype=np.uint8)  # (512, 512, 3)


def default_landmarks() -> np.ndarray:
    """The 68 landmarks of :func:`default_image`, (68, 2) float32, from the packaged asset."""
    ref = resources.files("talkstream").joinpath("assets", _DEFAULT_LANDMARKS_ASSET)
    with resources.as_file(ref) as path:
        return load_landmarks_json(path)


# ----------------------------------------------------------------------------- coordinates


def crop_px_to_norm(points: np.ndarray, crop_size: int) -> np.ndarray:
    """Crop pixel coordinates -> [-1, 1] (``align_corners=False``): ``(x + 0.5) / S * 2 - 1``."""
    return ((np.asarray(points, dtype=np.float32) + 0.5) / crop_size * 2.0 - 1.0).astype(np.float32)


def norm_to_crop_px(points: np.ndarray, crop_size: int) -> np.ndarray:
    """Inverse of :func:`crop_px_to_norm`: ``(x' + 1) / 2 * S - 0.5``."""
    return ((np.asarray(points, dtype=np.float32) + 1.0) * 0.5 * crop_size - 0.5).astype(np.float32)


def canonical_eye_mouth(crop_size: int, face_scale: float) -> np.ndarray:
    """Where alignment puts the eye midpoint and the mouth centre.

    Returns:
        (2, 2) float64 crop pixel coordinates: row 0 the eye midpoint, row 1 the mouth
        centre (the midpoint of the mouth corners, points 48 and 54). Both are on the vertical
        centre line, ``face_scale * crop_size`` apart.
    """
    s = float(crop_size)
    cx = s / 2.0 - 0.5  # centre line, in pixel-centre coordinates
    cy = _FACE_CENTRE_Y_FRACTION * s - 0.5
    half = 0.5 * face_scale * s
    return np.array([[cx, cy - half], [cx, cy + half]], dtype=np.float64)


def face_anchors(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right eye centre, left eye centre and mouth centre of (68, 2) landmarks, each (2,)."""
    pts = np.asarray(landmarks, dtype=np.float64)  # (68, 2)
    right_eye = pts[list(RIGHT_EYE)].mean(axis=0)  # (2,), image left for an upright face
    left_eye = pts[list(LEFT_EYE)].mean(axis=0)  # (2,)
    # Mouth corners, not the mean of all lip points: stable whether or not the mouth is open.
    mouth = 0.5 * (pts[48] + pts[54])  # (2,)
    return right_eye, left_eye, mouth


def alignment_transform(landmarks: np.ndarray, crop_size: int, face_scale: float) -> np.ndarray:
    """The similarity transform from frame pixels to aligned-crop pixels.

    Scale: the eye-midpoint-to-mouth distance becomes ``face_scale * crop_size``. Rotation:
    the average of the direction the eyes give (right eye -> left eye is +x) and the one the
    eye-to-mouth line gives (+y), so neither a turned head (short eye line) nor an
    asymmetric mouth dominates. Translation: the eye/mouth midpoint lands on the canonical one.

    Args:
        landmarks: (68, 2) frame pixel coordinates.
        crop_size: S.
        face_scale: ``AvatarConfig.face_scale``.

    Returns:
        (2, 3) float64 ``A`` with ``crop_xy = A[:, :2] @ frame_xy + A[:, 2]``.

    Raises:
        InputError: degenerate landmarks (eyes on the mouth).
    """
    right_eye, left_eye, mouth = face_anchors(landmarks)
    eye_mid = 0.5 * (right_eye + left_eye)
    em = mouth - eye_mid  # (2,) eye midpoint -> mouth
    em_len = float(np.hypot(*em))
    if not em_len > 1.0:
        raise InputError(
            f"landmarks are degenerate: the eyes and the mouth are {em_len:.2f} px apart"
        )
    x_from_mouth = np.array([em[1], -em[0]]) / em_len  # em rotated by -90 degrees
    ee = left_eye - right_eye
    ee_len = float(np.hypot(*ee))
    x_dir = x_from_mouth + (ee / ee_len if ee_len > 1e-6 else 0.0)
    x_dir = x_dir / float(np.hypot(*x_dir))
    scale = face_scale * crop_size / em_len
    rot = np.array([[x_dir[0], x_dir[1]], [-x_dir[1], x_dir[0]]])  # rows: crop x, crop y axes
    lin = scale * rot  # (2, 2)
    canon = canonical_eye_mouth(crop_size, face_scale)  # (2, 2)
    src_centre = 0.5 * (eye_mid + mouth)
    dst_centre = canon.mean(axis=0)
    return np.concatenate([lin, (dst_centre - lin @ src_centre)[:, None]], axis=1)  # (2, 3)


def apply_affine(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine to (N, 2) points; returns (N, 2) float64."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ np.asarray(m, dtype=np.float64)[:, :2].T + m[:, 2]


def warp_crop(image: np.ndarray, frame_to_crop: np.ndarray, crop_size: int) -> np.ndarray:
    """Sample the aligned crop: bilinear, border replicated.

    Args:
        image: (H, W, 3) uint8 frame.
        frame_to_crop: (2, 3) affine, frame pixels -> crop pixels.
        crop_size: S.

    Returns:
        (S, S, 3) uint8 crop.
    """
    h, w = image.shape[:2]
    inv = invert_affine(frame_to_crop)  # crop -> frame
    vs, us = np.mgrid[0:crop_size, 0:crop_size].astype(np.float64)  # (S, S) each
    fx = inv[0, 0] * us + inv[0, 1] * vs + inv[0, 2]  # (S, S) frame x
    fy = inv[1, 0] * us + inv[1, 1] * vs + inv[1, 2]  # (S, S) frame y
    index, weight, _ = bilinear_taps(fx, fy, w, h)  # (4, S*S) each
    src = image.reshape(h * w, 3).astype(np.float32)  # (H*W, 3)
    out = (src[index] * weight[:, :, None]).sum(axis=0)  # (S*S, 3)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(crop_size, crop_size, 3)


# ----------------------------------------------------------------------------- mask


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _polygon_distance(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Distance from each point to a closed polygon's area: 0 inside, Euclidean outside.

    Exact (sub-pixel) and vectorised over points x edges; polygons here have ~30 edges.

    Args:
        points: (N, 2) query points.
        poly: (K, 2) vertices in order (closed implicitly).

    Returns:
        (N,) float64.
    """
    a = poly  # (K, 2) edge starts
    b = np.roll(poly, -1, axis=0)  # (K, 2) edge ends
    ab = b - a  # (K, 2)
    ap = points[:, None, :] - a[None, :, :]  # (N, K, 2)
    denom = np.maximum((ab * ab).sum(axis=1), 1e-12)  # (K,)
    t = np.clip((ap * ab[None]).sum(axis=2) / denom, 0.0, 1.0)  # (N, K)
    closest = a[None] + t[:, :, None] * ab[None]  # (N, K, 2)
    dist = np.sqrt(((points[:, None, :] - closest) ** 2).sum(axis=2)).min(axis=1)  # (N,)
    # Even-odd rule: count edges a horizontal ray to +x crosses.
    px, py = points[:, 0:1], points[:, 1:2]  # (N, 1)
    ay, by = a[None, :, 1], b[None, :, 1]  # (1, K)
    straddles = (ay > py) != (by > py)  # (N, K)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = a[None, :, 0] + (py - ay) * (b[None, :, 0] - a[None, :, 0]) / (by - ay)
    crossings = (straddles & (px < x_cross)).sum(axis=1)  # (N,)
    inside = (crossings % 2) == 1
    return np.where(inside, 0.0, dist)


def face_mask(neutral: np.ndarray, crop_size: int, feather: float) -> np.ndarray:
    """The paste-back mask in crop space: only where the face moves.

    1 over the lower face (the jaw line from ear to ear, closed under the nose: lips, jaw and
    chin, grown by a margin for the jaw's opening) and over the eyes (so that blinks are
    pasted), then falling smoothly to 0 over ``feather * S`` pixels; also faded to exactly 0
    at the crop border so the paste has no visible edge. Everything else (hair, brows,
    forehead, nose, the cheeks' upper part, background) stays the photo's own pixels, whatever
    the renderer draws there.

    Args:
        neutral: (68, 2) landmarks in crop pixels.
        crop_size: S.
        feather: feather width as a fraction of S (``AvatarConfig.feather``).

    Returns:
        (S, S) float32 in [0, 1].
    """
    s = crop_size
    pts = np.asarray(neutral, dtype=np.float64)
    vs, us = np.mgrid[0:s, 0:s].astype(np.float64)  # (S, S)
    grid = np.stack([us.reshape(-1), vs.reshape(-1)], axis=1)  # (S*S, 2) as (x, y)
    fw = max(feather * s, 1.0)
    # Lower face: jaw points 2-14, then up to the nostrils' line (points 35 .. 31).
    nose_line = pts[[35, 34, 33, 32, 31]]
    lower = np.concatenate([pts[2:15], nose_line])  # (18, 2)
    grow = _MASK_GROW_FRACTION * s
    dist = _polygon_distance(grid, lower).reshape(s, s)
    m = _smoothstep((grow + fw - dist) / fw)  # (S, S)
    # The eyes, a little grown: the lids move in a blink.
    for eye in (pts[36:42], pts[42:48]):
        d = _polygon_distance(grid, eye).reshape(s, s)
        m = np.maximum(m, _smoothstep((0.5 * grow + 0.6 * fw - d) / (0.6 * fw)))
    edge = np.arange(s, dtype=np.float64)
    edge = np.minimum(edge, s - 1 - edge)  # distance to the nearest border pixel
    border = np.minimum.outer(edge, edge)  # (S, S)
    m = m * _smoothstep(border / fw)  # exactly 0 on the border
    return m.astype(np.float32)


# ----------------------------------------------------------------------------- framing

# Where a cut frame puts the face: the eye midpoint this far down from the frame's top edge and
# the face's centre line (between the eye midpoint and the mouth) in the middle. The frame may
# then slide by up to these fractions of its width and height towards the inside of the photo
# when that shows less padding: a face a little off-centre looks natural in a call, smeared
# edge pixels do not.
_FRAME_EYES_Y_FRACTION = 0.42
_FRAME_MAX_SHIFT = (0.2, 0.15)
# The landmarks end at the brows; the classical facial thirds put the brows a third of the way
# from the hairline to the chin, so the face (hairline to chin) is 1.5x brows-to-chin.
_FACE_HEIGHT_PER_BROWS_TO_CHIN = 1.5


@dataclass(frozen=True)
class Framing:
    """An output frame cut from a photo by :func:`frame_photo`.

    Attributes:
        image: (H, W, 3) uint8 output frame.
        photo_to_frame: (2, 3) float64 affine, photo pixels -> frame pixels: a uniform scale
            and a translation (``x' = scale * x + t``).
        scale: the photo's scale in the frame (< 1: downscaled, 1: its own pixels).
    """

    image: np.ndarray
    photo_to_frame: np.ndarray
    scale: float


def face_height(landmarks: np.ndarray) -> float:
    """The face's height, hairline to chin, estimated from (68, 2) landmarks, in their pixels."""
    pts = np.asarray(landmarks, dtype=np.float64)
    brows = pts[17:27].mean(axis=0)  # (2,) the brows' points
    return _FACE_HEIGHT_PER_BROWS_TO_CHIN * float(np.hypot(*(pts[8] - brows)))


# Backdrop where a photo does not fill its frame: blur radius and fade width as fractions of
# the frame's longer side, and its brightness.
_BACKDROP_BLUR = 0.03
_BACKDROP_FADE = 0.02
_BACKDROP_DIM = 0.6


def _place(ideal: float, extent: float, out: int, max_shift: float) -> int:
    """The frame's origin along one axis (scaled-photo pixel edges): ``ideal`` moved by at most
    ``max_shift`` towards the origins that pad least (the frame inside the photo if it fits,
    else the photo inside the frame)."""
    lo, hi = min(0.0, extent - out), max(0.0, extent - out)
    o = min(max(ideal, lo), hi)
    o = min(max(o, ideal - max_shift), ideal + max_shift)
    return round(o)


def _inside(origin: int, n_out: int, n_in: int, scale: float) -> tuple[int, int]:
    """Output pixels ``[lo, hi)`` along one axis whose source interval lies in the photo."""
    lo = max(0, -origin)
    hi = min(n_out, int(np.floor(n_in * scale + 1e-6)) - origin)
    if hi <= lo:  # less than a whole output pixel of overlap: keep one, sampled at the edge
        lo = min(max(lo, 0), n_out - 1)
        hi = lo + 1
    return lo, hi


def _cut(photo: np.ndarray, scale: float, ox: int, oy: int, width: int, height: int) -> np.ndarray:
    """The (height, width, 3) frame whose pixel (0, 0) is scaled-photo pixel (ox, oy).

    Downscaling averages areas (Pillow's box filter), upscaling is bicubic, scale 1 copies
    pixels; frame pixels beyond the photo show a blurred, dimmed backdrop of the photo.
    """
    ih, iw = photo.shape[:2]
    j0, j1 = _inside(ox, width, iw, scale)
    i0, i1 = _inside(oy, height, ih, scale)
    if scale == 1.0:
        c0 = min(max(ox + j0, 0), iw - 1)
        r0 = min(max(oy + i0, 0), ih - 1)
        part = photo[r0 : r0 + (i1 - i0), c0 : c0 + (j1 - j0)]  # (i1-i0, j1-j0, 3) or less
        if part.shape[:2] != (i1 - i0, j1 - j0):  # only in the degenerate case of _inside
            part = np.resize(part, (i1 - i0, j1 - j0, 3))
    else:
        # Source box in pixel-edge coordinates, clipped against rounding.
        bx0 = min(max((ox + j0) / scale, 0.0), iw - 0.5)
        bx1 = min(max((ox + j1) / scale, bx0 + 0.5), float(iw))
        by0 = min(max((oy + i0) / scale, 0.0), ih - 0.5)
        by1 = min(max((oy + i1) / scale, by0 + 0.5), float(ih))
        # Hand Pillow only the rows and columns the box touches, plus the bicubic filter's
        # reach (2 px) and one for rounding: a 12 MP photo is never copied whole.
        c0, c1 = max(0, int(np.floor(bx0)) - 3), min(iw, int(np.ceil(bx1)) + 3)
        r0, r1 = max(0, int(np.floor(by0)) - 3), min(ih, int(np.ceil(by1)) + 3)
        src = Image.fromarray(np.ascontiguousarray(photo[r0:r1, c0:c1]))
        resample = Image.Resampling.BOX if scale < 1.0 else Image.Resampling.BICUBIC
        part = np.asarray(
            src.resize(
                (j1 - j0, i1 - i0),
                resample,
                box=(bx0 - c0, by0 - r0, bx1 - c0, by1 - r0),
            ),
            dtype=np.uint8,
        )  # (i1-i0, j1-j0, 3)
    pad = ((i0, height - i1), (j0, width - j1), (0, 0))
    if not any(p for axis in pad for p in axis):
        return np.ascontiguousarray(part)  # (height, width, 3)
    # The photo does not fill the frame (a small or narrow photo): the rest is the photo again,
    # scaled to cover the frame, blurred and dimmed (a backdrop, as video players fill a
    # portrait video's sides), faded into the sharp photo over a few pixels. Repeating the edge
    # pixels drew long streaks.
    cover = max(width / iw, height / ih) * 1.0001
    cx = (ox + 0.5 * width) / scale * cover - 0.5 * width  # the same frame centre
    cy = (oy + 0.5 * height) / scale * cover - 0.5 * height
    bx = round(min(max(cx, 0.0), cover * iw - width))
    by = round(min(max(cy, 0.0), cover * ih - height))
    bg = _cut(photo, cover, bx, by, width, height)
    radius = max(2.0, _BACKDROP_BLUR * max(width, height))
    bg = np.asarray(Image.fromarray(bg).filter(ImageFilter.GaussianBlur(radius)), np.float32)
    bg *= _BACKDROP_DIM
    sharp = np.pad(part, pad, mode="edge").astype(np.float32)
    f = max(1.0, _BACKDROP_FADE * max(width, height))
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    inside = np.minimum(
        np.minimum(ys - i0 + 1, i1 - ys) if (i0 or i1 < height) else np.full_like(ys, f),
        np.minimum(xs - j0 + 1, j1 - xs) if (j0 or j1 < width) else np.full_like(xs, f),
    )  # (H, W): distance inside the photo's part, in pixels (<= 0 outside)
    w = np.clip(inside / f, 0.0, 1.0)[..., None]
    out = w * sharp + (1.0 - w) * bg
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def frame_photo(photo: np.ndarray, landmarks: np.ndarray, cfg: AvatarConfig) -> Framing:
    """Cut the output frame around the face (``cfg.framing``).

    ``full`` returns the photo itself. Every other framing gives a frame of its size
    (``cfg.frame_wh()``) in which the face, hairline to chin (:func:`face_height`), is
    ``cfg.frame_face_fraction`` of the frame's height, centred horizontally, with the eyes a
    little above the middle (42% from the top). A larger photo is downscaled with an area
    filter; a smaller one is enlarged, but by at most ``cfg.max_upscale`` (the face then stays
    smaller than asked): enlarging further adds only blur. Where the face would leave padding,
    the frame slides towards the inside of the photo by up to 20% of its width / 15% of its
    height; what remains outside the photo is a blurred, dimmed copy of it scaled to cover the
    frame (a backdrop), faded into the sharp photo.

    Args:
        photo: (H, W, 3) uint8 RGB.
        landmarks: (68, 2) landmarks of the face, photo pixels.
        cfg: ``framing``, ``frame_size``, ``frame_face_fraction``, ``max_upscale``.

    Returns:
        The :class:`Framing`.
    """
    size = cfg.frame_wh()
    if size is None:
        return Framing(photo, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), 1.0)
    width, height = size
    ih, iw = photo.shape[:2]
    target = cfg.frame_face_fraction * height / max(face_height(landmarks), 1e-6)
    scale = min(target, cfg.max_upscale)
    right_eye, left_eye, mouth = face_anchors(landmarks)
    eye_mid = 0.5 * (right_eye + left_eye)
    centre_x = 0.5 * (eye_mid[0] + mouth[0])
    # In scaled-photo pixel-edge coordinates, pixel-centre x is at scale * (x + 0.5).
    ideal_x = scale * (centre_x + 0.5) - 0.5 * width
    ideal_y = scale * (eye_mid[1] + 0.5) - _FRAME_EYES_Y_FRACTION * height
    ox = _place(ideal_x, scale * iw, width, _FRAME_MAX_SHIFT[0] * width)
    oy = _place(ideal_y, scale * ih, height, _FRAME_MAX_SHIFT[1] * height)
    image = _cut(photo, scale, ox, oy, width, height)
    # Pixel centres: x' + 0.5 = scale * (x + 0.5) - ox.
    photo_to_frame = np.array(
        [[scale, 0.0, 0.5 * scale - 0.5 - ox], [0.0, scale, 0.5 * scale - 0.5 - oy]]
    )
    return Framing(image, photo_to_frame, float(scale))


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The (2, 3) affine ``outer(inner(p))``."""
    lin = outer[:, :2] @ inner[:, :2]
    return np.concatenate([lin, (outer[:, :2] @ inner[:, 2] + outer[:, 2])[:, None]], axis=1)


# ----------------------------------------------------------------------------- finding the face


@dataclass(frozen=True)
class LocatedFace:
    """The face an avatar is made from, found (or given) and judged.

    Attributes:
        points: (68, 2) float32 landmarks in the photo's own pixels.
        score: the detector's score; None for given landmarks.
        detector: the detector's name; None when the landmarks were given.
        check: the verdict of :func:`talkstream.engine.quality.check_face` (not ``ok`` only
            when ``AvatarConfig.check_quality`` is off).
    """

    points: np.ndarray
    score: float | None
    detector: str | None
    check: FaceCheck


def judge_face(
    points: np.ndarray, score: float | None, cfg: AvatarConfig, source_name: str
) -> FaceCheck:
    """:func:`~talkstream.engine.quality.check_face` on photo-pixel landmarks, as a user sees it.

    Raises:
        InputError: the face cannot be animated well and ``cfg.check_quality`` is on. The
            message is one line: the photo, what is wrong, what would work.
    """
    verdict = check_face(points, score)
    if verdict.ok:
        return verdict
    line = f"{source_name}: {verdict.message}; {verdict.advice}"
    if cfg.check_quality:
        raise InputError(f"{line}; --force tries anyway")
    logger.warning("%s. Animating it anyway (--force): expect a distorted face", line)
    return verdict


def _detect(image: np.ndarray, det: LandmarkDetector, cfg: AvatarConfig) -> list[FaceDetection]:
    """``det.detect`` on a copy no larger than ``cfg.detect_max_side``; photo-pixel results.

    A face too small to be found on the copy (dlib's detector already retries at 2x) is too
    small to animate anyway: below ~20 px on a 1024 px copy.
    """
    ih, iw = image.shape[:2]
    longest = max(ih, iw)
    if longest <= cfg.detect_max_side:
        return det.detect(image)
    f = cfg.detect_max_side / longest
    dw, dh = max(1, round(iw * f)), max(1, round(ih * f))
    small = np.asarray(Image.fromarray(image).resize((dw, dh), Image.Resampling.BOX))
    sx, sy = dw / iw, dh / ih
    logger.debug("detecting on a %dx%d copy of the %dx%d photo", dw, dh, iw, ih)
    faces = []
    for face in det.detect(small):
        pts = (np.asarray(face.landmarks, dtype=np.float64) + 0.5) / (sx, sy) - 0.5  # (68, 2)
        x0, y0, x1, y1 = face.box  # pixel edges
        faces.append(
            FaceDetection(
                box=(x0 / sx, y0 / sy, x1 / sx, y1 / sy),
                landmarks=pts.astype(np.float32),
                score=face.score,
            )
        )
    return faces


def locate_face(
    image: np.ndarray,
    cfg: AvatarConfig,
    *,
    landmarks: np.ndarray | None = None,
    detector: LandmarkDetector | None = None,
    source_name: str = "image",
    enforce: bool = True,
) -> LocatedFace:
    """Find the face in a photo (or take the given landmarks) and judge it.

    Detection runs on a copy no larger than ``cfg.detect_max_side`` (a 12 MP photo is not
    searched at full size); landmarks are returned in the photo's pixels, and the quality check
    (tiny, turned, tilted, mouth covered) is made on them, so "tiny" means tiny in the photo.

    Args:
        image: (H, W, 3) uint8 RGB photo.
        cfg: detection size, quality check switch.
        landmarks: (68, 2) landmarks instead of detection.
        detector: default: a new :class:`~talkstream.engine.landmarks.DlibDetector`.
        source_name: how messages name the photo.
        enforce: False: the verdict is only returned (neither raised nor logged), for a caller
            that saves the landmarks rather than animating them.

    Raises:
        InputError: no face; landmarks malformed, outside the photo or degenerate; a face that
            cannot be animated well (unless ``cfg.check_quality`` is off or ``enforce`` is
            False).
        MissingDependencyError: detection needed but dlib is not installed.
    """
    _check_image(image)
    hw = (int(image.shape[0]), int(image.shape[1]))
    score: float | None = None
    name: str | None = None
    if landmarks is not None:
        points = validate_landmarks(landmarks, what=f"landmarks for {source_name}")  # (68, 2)
        _check_points_in_image(points, hw, f"landmarks for {source_name}")
    else:
        det = detector if detector is not None else DlibDetector()
        name = det.name
        faces = _detect(image, det, cfg)
        if not faces:
            raise InputError(
                f"no face found in {source_name} (detector: {det.name}). Use a photo with one "
                "frontal, well-lit face at least ~80 px wide, or pass its 68 landmarks as a "
                "JSON file."
            )
        # Weak detections beside a confident one are false positives (a HOG detector finds
        # "faces" in patterned clothing): among the rest, the largest face is the subject.
        top = max(f.score for f in faces)
        likely = [f for f in faces if top <= 0 or f.score >= WEAK_FACE_SCORE_RATIO * top]
        best = max(likely, key=lambda f: f.area)
        if len(faces) > 1:
            x0, y0, x1, y1 = best.box
            logger.warning(
                "found %d faces in %s (%d weak, ignored); using the largest "
                "(box x %.0f-%.0f, y %.0f-%.0f)",
                len(faces),
                source_name,
                len(faces) - len(likely),
                x0,
                x1,
                y0,
                y1,
            )
        points = validate_landmarks(best.landmarks, what=f"detected landmarks in {source_name}")
        score = float(best.score)
    alignment_transform(points, cfg.crop_size, cfg.face_scale)  # raises on degenerate points
    # Not enforced: only the verdict (neither raised nor logged).
    check = judge_face(points, score, cfg, source_name) if enforce else check_face(points, score)
    return LocatedFace(points=points, score=score, detector=name, check=check)


# ----------------------------------------------------------------------------- avatar


@dataclass
class Avatar:
    """A prepared avatar: everything per-frame rendering needs from the reference photo.

    Attributes:
        image: (H, W, 3) uint8 output frame (the background every frame is pasted on): the
            photo cut around the face by ``AvatarConfig.framing``, or the photo itself.
        crop: (S, S, 3) uint8 aligned face crop (the denoiser's reference image).
        neutral: (68, 2) float32 landmarks in crop pixel coordinates.
        frame_to_crop: (2, 3) float64 affine, frame pixels -> crop pixels.
        mask: (S, S) float32 feathered paste-back mask in crop space, in [0, 1].
        paste: the paste-back geometry for frames of ``image``'s size (numpy arrays).
        key: sha256 hex digest of the inputs and settings that determine the above.
        photo_to_frame: (2, 3) float64 affine, photo pixels -> frame pixels (the framing).
        photo_landmarks: (68, 2) float32 landmarks in the photo's own pixels.
        check: the quality verdict on the face (``ok`` unless the check was overridden).
    """

    image: np.ndarray
    crop: np.ndarray
    neutral: np.ndarray
    frame_to_crop: np.ndarray
    mask: np.ndarray
    paste: PasteMap
    key: str
    photo_to_frame: np.ndarray | None = None
    photo_landmarks: np.ndarray | None = None
    check: FaceCheck | None = None

    @property
    def crop_size(self) -> int:
        """S, the side of the square crop in pixels."""
        return int(self.crop.shape[0])

    def neutral_normalized(self) -> np.ndarray:
        """:attr:`neutral` in [-1, 1] crop coordinates (see :func:`crop_px_to_norm`), (68, 2)."""
        return crop_px_to_norm(self.neutral, self.crop_size)


def _cache_key(
    image: np.ndarray, landmarks: np.ndarray | None, detector_name: str, cfg: AvatarConfig
) -> str:
    h = hashlib.sha256()
    h.update(f"talkstream.avatar.v{CACHE_FORMAT_VERSION}\0".encode())
    h.update(f"shape={image.shape}\0".encode())
    h.update(np.ascontiguousarray(image).data)
    if landmarks is not None:
        h.update(b"landmarks\0")
        h.update(np.ascontiguousarray(landmarks, dtype=np.float32).data)
    else:
        h.update(f"detector={detector_name};detect_max_side={cfg.detect_max_side}\0".encode())
    # Only the fields that change the arrays: the limits and the quality switch do not.
    h.update(f"crop={cfg.crop_size};scale={cfg.face_scale!r};feather={cfg.feather!r}".encode())
    size = cfg.frame_wh()
    if size is not None:
        h.update(
            f";framing={cfg.framing};frame={size[0]}x{size[1]};"
            f"face={cfg.frame_face_fraction!r};upscale={cfg.max_upscale!r}".encode()
        )
    else:
        h.update(b";framing=full")
    return h.hexdigest()


def _cache_path(cfg: AvatarConfig, key: str) -> Path | None:
    if cfg.cache_dir is None:
        return None
    return Path(cfg.cache_dir) / "avatars" / f"{key}.npz"


_CACHED = ("crop", "neutral", "frame_to_crop", "mask", "points", "score")


def _load_cached(path: Path, key: str, s: int) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None on a miss; a corrupt file is logged and treated as a miss."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in (*_CACHED, "key")}
        expected = {
            "crop": ((s, s, 3), np.uint8),
            "neutral": ((NUM_LANDMARKS, 2), np.float32),
            "frame_to_crop": ((2, 3), np.float64),
            "mask": ((s, s), np.float32),
            "points": ((NUM_LANDMARKS, 2), np.float32),
            "score": ((), np.float64),
        }
        for name, (shape, dtype) in expected.items():
            a = arrays[name]
            if a.shape != shape or a.dtype != dtype:
                raise ValueError(f"{name} is {a.shape} {a.dtype}, expected {shape} {dtype}")
        if str(arrays["key"]) != key:
            raise ValueError("stored key does not match the file name")
        if not all(np.all(np.isfinite(arrays[k])) for k in ("neutral", "mask", "points")):
            raise ValueError("non-finite values")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        logger.warning("avatar cache file %s is unreadable (%s); rebuilding it", path, e)
        return None
    return arrays


def _save_cached(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file + rename), so a crash never leaves half a cache file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, key=np.array(key), **{k: arrays[k] for k in _CACHED})  # type: ignore[arg-type]
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        # The cache only saves time: failing to write it is not an error for the caller.
        logger.warning("could not write avatar cache file %s: %s", path, e)


def _check_points_in_image(points: np.ndarray, hw: tuple[int, int], what: str) -> None:
    h, w = hw
    # Accept both pixel-centre (0..W-1) and pixel-edge (0..W) conventions.
    outside = (
        (points[:, 0] < -0.5) | (points[:, 0] > w) | (points[:, 1] < -0.5) | (points[:, 1] > h)
    )
    if np.any(outside):
        i = int(np.flatnonzero(outside)[0])
        raise InputError(
            f"{what}: point {i} ({points[i, 0]:.1f}, {points[i, 1]:.1f}) lies outside the "
            f"{w}x{h} image ({int(outside.sum())} points outside in all); are they for this image?"
        )


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be an (H, W, 3) uint8 RGB array, got shape {image.shape} "
            f"dtype {image.dtype}"
        )


def prepare_avatar(
    image: np.ndarray,
    cfg: AvatarConfig,
    *,
    landmarks: np.ndarray | None = None,
    detector: LandmarkDetector | None = None,
    source_name: str = "image",
    face: LocatedFace | None = None,
) -> Avatar:
    """Prepare an avatar from a photo.

    Steps: find the face (:func:`locate_face`: detection on a downscaled copy, or the given
    landmarks) and judge it; cut the output frame around it (:func:`frame_photo`); align the
    crop, build the paste-back mask. The crop is sampled from the photo itself unless the
    framing downscaled the photo, in which case it is sampled from the (area-filtered) frame.

    Args:
        image: (H, W, 3) uint8 RGB photo.
        cfg: crop size, face scale, feather, framing, quality check, cache directory.
        landmarks: (68, 2) ``(x, y)`` pixel landmarks of the face in ``image``; if None they
            are detected.
        detector: the detector to use when ``landmarks`` is None (default: a new
            :class:`~talkstream.engine.landmarks.DlibDetector`, created only on a cache miss).
        source_name: how messages name the image (e.g. its path).
        face: the result of :func:`locate_face` on ``image`` (then ``landmarks`` and
            ``detector`` must be None): lets a caller judge the photo before loading a model.

    Returns:
        The :class:`Avatar`. With several faces in the photo, the largest of the confident ones
        is used (detections scoring under a quarter of the best are ignored as false
        positives); a warning is logged.

    Raises:
        InputError: no face found; ``landmarks`` malformed or outside the image; a face that
            cannot be animated well (unless ``cfg.check_quality`` is off), also on a cache hit.
        MissingDependencyError: detection needed but dlib is not installed.
    """
    _check_image(image)
    if cfg.crop_size < 16:
        raise ValueError(f"AvatarConfig.crop_size must be at least 16, got {cfg.crop_size}")
    image = np.ascontiguousarray(image)
    s = cfg.crop_size

    given: np.ndarray | None = None
    if face is not None:
        if landmarks is not None or detector is not None:
            raise ValueError("pass either face or landmarks/detector, not both")
        given = face.points if face.detector is None else None
        detector_name = face.detector or DlibDetector.name
    else:
        if landmarks is not None:
            given = validate_landmarks(landmarks, what=f"landmarks for {source_name}")  # (68, 2)
            hw = (int(image.shape[0]), int(image.shape[1]))
            _check_points_in_image(given, hw, f"landmarks for {source_name}")
        detector_name = detector.name if detector is not None else DlibDetector.name
    key = _cache_key(image, given, detector_name, cfg)
    path = _cache_path(cfg, key)

    cached = _load_cached(path, key, s) if path is not None else None
    if cached is not None:
        logger.debug("avatar %s loaded from cache %s", source_name, path)
        points = cached["points"]
        score = None if np.isnan(cached["score"]) else float(cached["score"])
        check = face.check if face is not None else judge_face(points, score, cfg, source_name)
    else:
        if face is None:
            face = locate_face(
                image, cfg, landmarks=given, detector=detector, source_name=source_name
            )
        points, score, check = face.points, face.score, face.check

    framing = frame_photo(image, points, cfg)
    frame = framing.image
    if framing.scale != 1.0 or frame is not image:
        logger.debug(
            "%s: %dx%d photo framed to %dx%d (%s, scale %.3f)",
            source_name,
            image.shape[1],
            image.shape[0],
            frame.shape[1],
            frame.shape[0],
            cfg.framing,
            framing.scale,
        )
    if cached is not None:
        crop, neutral = cached["crop"], cached["neutral"]
        frame_to_crop, mask = cached["frame_to_crop"], cached["mask"]
    else:
        photo_to_crop = alignment_transform(points, s, cfg.face_scale)  # (2, 3)
        frame_to_crop = _compose(photo_to_crop, invert_affine(framing.photo_to_frame))  # (2, 3)
        if framing.scale < 1.0:
            # The frame is the photo area-filtered down: sampling it does not alias.
            crop = warp_crop(frame, frame_to_crop, s)  # (S, S, 3)
        else:
            # The photo's own pixels, not an enlarged copy of them: one interpolation only.
            crop = warp_crop(image, photo_to_crop, s)  # (S, S, 3)
        neutral = apply_affine(photo_to_crop, points).astype(np.float32)  # (68, 2)
        mask = face_mask(neutral, s, cfg.feather)  # (S, S)
        if path is not None:
            _save_cached(
                path,
                key,
                {
                    "crop": crop,
                    "neutral": neutral,
                    "frame_to_crop": frame_to_crop,
                    "mask": mask,
                    "points": np.asarray(points, dtype=np.float32),
                    "score": np.array(np.nan if score is None else score, dtype=np.float64),
                },
            )
    return Avatar(
        image=frame,
        crop=crop,
        neutral=neutral,
        frame_to_crop=frame_to_crop,
        mask=mask,
        paste=build_paste_map((frame.shape[0], frame.shape[1]), frame_to_crop, mask),
        key=key,
        photo_to_frame=framing.photo_to_frame,
        photo_landmarks=np.asarray(points, dtype=np.float32),
        check=check,
    )


def prepare_avatar_from_path(
    path: str | Path,
    cfg: AvatarConfig,
    landmarks_path: str | Path | None = None,
    detector: LandmarkDetector | None = None,
) -> Avatar:
    """:func:`load_image` + optional :func:`load_landmarks_json` + :func:`prepare_avatar`.

    Landmarks in the JSON file are in the pixel coordinates of the image as displayed, i.e.
    after its EXIF orientation is applied.
    """
    image, k = load_photo(path, cfg)
    points = load_landmarks_json(landmarks_path) if landmarks_path is not None else None
    if points is not None:
        points = scale_points_to_reduced(points, k)
    return prepare_avatar(image, cfg, landmarks=points, detector=detector, source_name=str(path))


@dataclass(frozen=True)
class AvatarSource:
    """A photo named by the user (or the default face), its face found and judged.

    Everything about the avatar that needs no model: the commands build it before loading one,
    so a photo that cannot work fails in a second, not after the model has loaded.
    """

    image: np.ndarray
    face: LocatedFace
    name: str


def load_avatar_source(
    image_path: str | Path | None,
    landmarks_path: str | Path | None,
    cfg: AvatarConfig,
    detector: LandmarkDetector | None = None,
) -> AvatarSource:
    """Load the photo (None: the bundled default face) and :func:`locate_face` in it.

    Raises:
        InputError: unreadable photo or landmarks file, no face, a face that cannot be
            animated well (unless ``cfg.check_quality`` is off).
    """
    landmarks = load_landmarks_json(landmarks_path) if landmarks_path is not None else None
    if image_path is None:
        image = default_image()
        if landmarks is None:
            landmarks = default_landmarks()
        name = "the default face"
    else:
        image, k = load_photo(image_path, cfg)
        name = str(image_path)
        if landmarks is not None:
            landmarks = scale_points_to_reduced(landmarks, k)
    face = locate_face(image, cfg, landmarks=landmarks, detector=detector, source_name=name)
    return AvatarSource(image=image, face=face, name=name)


def prepare_avatar_source(source: AvatarSource, cfg: AvatarConfig) -> Avatar:
    """:func:`prepare_avatar` for a :func:`load_avatar_source` result (``cfg`` sets the crop)."""
    return prepare_avatar(source.image, cfg, face=source.face, source_name=source.name)


def _main(argv: list[str] | None = None) -> int:
    """Maintenance entry point: regenerate the packaged default-face landmarks."""
    parser = argparse.ArgumentParser(prog="python -m talkstream.engine.avatar")
    parser.add_argument(
        "--write-default-landmarks",
        action="store_true",
        help="detect the astronaut's landmarks with dlib and write the packaged JSON asset",
    )
    args = parser.parse_args(argv)
    if not args.write_default_landmarks:
        parser.print_help()
        return 2
    faces = DlibDetector().detect(default_image())
    if len(faces) != 1:
        raise SystemExit(f"expected one face in the default image, found {len(faces)}")
    out = Path(__file__).resolve().parent.parent / "assets" / _DEFAULT_LANDMARKS_ASSET
    save_landmarks_json(out, faces[0].landmarks)
    print(f"wrote {out}")
    return 0


__all__ = [
    "CACHE_FORMAT_VERSION",
    "Avatar",
    "AvatarSource",
    "Framing",
    "LocatedFace",
    "alignment_transform",
    "apply_affine",
    "canonical_eye_mouth",
    "crop_px_to_norm",
    "default_image",
    "default_landmarks",
    "face_anchors",
    "face_height",
    "face_mask",
    "frame_photo",
    "judge_face",
    "load_avatar_source",
    "load_image",
    "load_photo",
    "locate_face",
    "norm_to_crop_px",
    "prepare_avatar",
    "prepare_avatar_from_path",
    "prepare_avatar_source",
    "reduction_factor",
    "scale_points_from_reduced",
    "scale_points_to_reduced",
    "warp_crop",
]


if __name__ == "__main__":
    raise SystemExit(_main())
