"""Avatar preparation: load the reference photo, find the face, align a square crop, build the
paste-back mask.

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
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from talkstream.config import AvatarConfig
from talkstream.engine.landmarks import (
    BROWS,
    JAW,
    LEFT_EYE,
    NUM_LANDMARKS,
    RIGHT_EYE,
    DlibDetector,
    LandmarkDetector,
    load_landmarks_json,
    save_landmarks_json,
    validate_landmarks,
)
from talkstream.errors import InputError
from talkstream.kernels.post import PasteMap, bilinear_taps, build_paste_map, invert_affine

logger = logging.getLogger(__name__)

# Bump when anything that changes the cached arrays changes (alignment, mask, crop sampling).
CACHE_FORMAT_VERSION = 1
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
    """Read a photo as RGB.

    The pixel count is checked against ``cfg.max_image_pixels`` from the header, before any
    pixel is decoded, so a decompression bomb is never decompressed. EXIF orientation is
    applied; transparency is flattened onto white; 16-bit and float images are scaled to 8 bit.

    Args:
        path: image file (any format Pillow reads: JPEG, PNG, WebP, ...).
        cfg: limits ``max_file_bytes`` and ``max_image_pixels``.

    Returns:
        (H, W, 3) uint8 RGB, C-contiguous.

    Raises:
        InputError: missing path, a directory, unreadable, too large (bytes or pixels), not an
            image, or corrupt/truncated; the message names the path.
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
        raise InputError(
            f"image file {p} is larger than the limit of {cfg.max_file_bytes} bytes "
            "(AvatarConfig.max_file_bytes)"
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
            raise InputError(
                f"image {p} has too many pixels (decompression bomb guard): {e}"
            ) from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InputError(f"image file {p} is corrupt: {e}") from e
        with im:
            width, height = im.size
            if width * height > cfg.max_image_pixels:
                raise InputError(
                    f"image {p} is {width}x{height} = {width * height} pixels, more than the "
                    f"limit of {cfg.max_image_pixels} (AvatarConfig.max_image_pixels)"
                )
            if width < 1 or height < 1:
                raise InputError(f"image {p} is empty ({width}x{height})")
            try:
                im.load()
                oriented = ImageOps.exif_transpose(im)
                rgb = _to_rgb_array(oriented)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise InputError(f"image {p} has too many pixels: {e}") from e
            except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
                raise InputError(f"image file {p} is corrupt or truncated: {e}") from e
    return rgb


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
    """The paste-back mask in crop space.

    1 over the face outline (jaw points, then the brows: the eyes are included so that blinks
    rendered by the denoiser are pasted too), grown by a margin for jaw opening, then falling
    smoothly to 0 over ``feather * S`` pixels; also faded to exactly 0 at the crop border so
    the paste has no visible edge.

    Args:
        neutral: (68, 2) landmarks in crop pixels.
        crop_size: S.
        feather: feather width as a fraction of S (``AvatarConfig.feather``).

    Returns:
        (S, S) float32 in [0, 1].
    """
    s = crop_size
    pts = np.asarray(neutral, dtype=np.float64)
    poly = np.concatenate([pts[list(JAW)], pts[list(BROWS)][::-1]])  # (27, 2) face outline
    vs, us = np.mgrid[0:s, 0:s].astype(np.float64)  # (S, S)
    grid = np.stack([us.reshape(-1), vs.reshape(-1)], axis=1)  # (S*S, 2) as (x, y)
    dist = _polygon_distance(grid, poly).reshape(s, s)  # (S, S)
    fw = max(feather * s, 1.0)
    grow = _MASK_GROW_FRACTION * s
    m = _smoothstep((grow + fw - dist) / fw)  # (S, S): 1 within grow, 0 beyond grow + fw
    edge = np.arange(s, dtype=np.float64)
    edge = np.minimum(edge, s - 1 - edge)  # distance to the nearest border pixel
    border = np.minimum.outer(edge, edge)  # (S, S)
    m = m * _smoothstep(border / fw)  # exactly 0 on the border
    return m.astype(np.float32)


# ----------------------------------------------------------------------------- avatar


@dataclass
class Avatar:
    """A prepared avatar: everything per-frame rendering needs from the reference photo.

    Attributes:
        image: (H, W, 3) uint8 full reference frame (the background every frame is pasted on).
        crop: (S, S, 3) uint8 aligned face crop (the denoiser's reference image).
        neutral: (68, 2) float32 landmarks in crop pixel coordinates.
        frame_to_crop: (2, 3) float64 similarity affine, frame pixels -> crop pixels.
        mask: (S, S) float32 feathered paste-back mask in crop space, in [0, 1].
        paste: the paste-back geometry for frames of ``image``'s size (numpy arrays).
        key: sha256 hex digest of the inputs and settings that determine the above.
    """

    image: np.ndarray
    crop: np.ndarray
    neutral: np.ndarray
    frame_to_crop: np.ndarray
    mask: np.ndarray
    paste: PasteMap
    key: str

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
        h.update(f"detector={detector_name}\0".encode())
    # Only the fields that change the arrays: the limits do not.
    h.update(f"crop={cfg.crop_size};scale={cfg.face_scale!r};feather={cfg.feather!r}".encode())
    return h.hexdigest()


def _cache_path(cfg: AvatarConfig, key: str) -> Path | None:
    if cfg.cache_dir is None:
        return None
    return Path(cfg.cache_dir) / "avatars" / f"{key}.npz"


def _load_cached(path: Path, key: str, s: int) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None on a miss; a corrupt file is logged and treated as a miss."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("crop", "neutral", "frame_to_crop", "mask", "key")}
        expected = {
            "crop": ((s, s, 3), np.uint8),
            "neutral": ((NUM_LANDMARKS, 2), np.float32),
            "frame_to_crop": ((2, 3), np.float64),
            "mask": ((s, s), np.float32),
        }
        for name, (shape, dtype) in expected.items():
            a = arrays[name]
            if a.shape != shape or a.dtype != dtype:
                raise ValueError(f"{name} is {a.shape} {a.dtype}, expected {shape} {dtype}")
        if str(arrays["key"]) != key:
            raise ValueError("stored key does not match the file name")
        if not (np.all(np.isfinite(arrays["neutral"])) and np.all(np.isfinite(arrays["mask"]))):
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
                np.savez(
                    f,
                    key=np.array(key),
                    crop=arrays["crop"],
                    neutral=arrays["neutral"],
                    frame_to_crop=arrays["frame_to_crop"],
                    mask=arrays["mask"],
                )
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


def prepare_avatar(
    image: np.ndarray,
    cfg: AvatarConfig,
    *,
    landmarks: np.ndarray | None = None,
    detector: LandmarkDetector | None = None,
    source_name: str = "image",
) -> Avatar:
    """Prepare an avatar from a photo.

    Args:
        image: (H, W, 3) uint8 RGB photo.
        cfg: crop size, face scale, feather, cache directory.
        landmarks: (68, 2) ``(x, y)`` pixel landmarks of the face in ``image``; if None they
            are detected.
        detector: the detector to use when ``landmarks`` is None (default: a new
            :class:`~talkstream.engine.landmarks.DlibDetector`, created only on a cache miss).
        source_name: how messages name the image (e.g. its path).

    Returns:
        The :class:`Avatar`. With several faces in the photo, the largest of the confident ones
        is used (detections scoring under a quarter of the best are ignored as false
        positives); a warning is logged.

    Raises:
        InputError: no face found, or ``landmarks`` malformed or outside the image.
        MissingDependencyError: detection needed but dlib is not installed.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be an (H, W, 3) uint8 RGB array, got shape {image.shape} "
            f"dtype {image.dtype}"
        )
    if cfg.crop_size < 16:
        raise ValueError(f"AvatarConfig.crop_size must be at least 16, got {cfg.crop_size}")
    image = np.ascontiguousarray(image)
    hw = (int(image.shape[0]), int(image.shape[1]))
    s = cfg.crop_size

    given: np.ndarray | None = None
    if landmarks is not None:
        given = validate_landmarks(landmarks, what=f"landmarks for {source_name}")  # (68, 2)
        _check_points_in_image(given, hw, f"landmarks for {source_name}")
    detector_name = detector.name if detector is not None else DlibDetector.name
    key = _cache_key(image, given, detector_name, cfg)
    path = _cache_path(cfg, key)

    cached = _load_cached(path, key, s) if path is not None else None
    if cached is not None:
        logger.debug("avatar %s loaded from cache %s", source_name, path)
        frame_to_crop = cached["frame_to_crop"]
        mask = cached["mask"]
        return Avatar(
            image=image,
            crop=cached["crop"],
            neutral=cached["neutral"],
            frame_to_crop=frame_to_crop,
            mask=mask,
            paste=build_paste_map(hw, frame_to_crop, mask),
            key=key,
        )

    if given is None:
        det = detector if detector is not None else DlibDetector()
        faces = det.detect(image)
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
    else:
        points = given

    frame_to_crop = alignment_transform(points, s, cfg.face_scale)  # (2, 3)
    crop = warp_crop(image, frame_to_crop, s)  # (S, S, 3)
    neutral = apply_affine(frame_to_crop, points).astype(np.float32)  # (68, 2)
    mask = face_mask(neutral, s, cfg.feather)  # (S, S)
    if path is not None:
        _save_cached(
            path,
            key,
            {"crop": crop, "neutral": neutral, "frame_to_crop": frame_to_crop, "mask": mask},
        )
    return Avatar(
        image=image,
        crop=crop,
        neutral=neutral,
        frame_to_crop=frame_to_crop,
        mask=mask,
        paste=build_paste_map(hw, frame_to_crop, mask),
        key=key,
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
    image = load_image(path, cfg)
    points = load_landmarks_json(landmarks_path) if landmarks_path is not None else None
    return prepare_avatar(image, cfg, landmarks=points, detector=detector, source_name=str(path))


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
    "alignment_transform",
    "apply_affine",
    "canonical_eye_mouth",
    "crop_px_to_norm",
    "default_image",
    "default_landmarks",
    "face_anchors",
    "face_mask",
    "load_image",
    "norm_to_crop_px",
    "prepare_avatar",
    "prepare_avatar_from_path",
    "warp_crop",
]


if __name__ == "__main__":
    raise SystemExit(_main())
