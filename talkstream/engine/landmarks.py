"""68-point facial landmarks (iBUG scheme): index groups, detection, and a JSON file format.

The speech motion model predicts displacements of the jaw and lip points only
(:data:`MOTION_POINTS`); the avatar alignment uses the eyes and the mouth corners. Detection
goes through the :class:`LandmarkDetector` protocol so the bundled dlib predictor (whose training
data licence excludes commercial use) can be replaced without touching the rest of the engine.

Coordinates are ``(x, y)`` in pixels, with pixel ``i`` centred on coordinate ``i`` (dlib's
convention).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from talkstream.errors import InputError, MissingDependencyError

NUM_LANDMARKS = 68

# iBUG 68-point groups. "Right"/"left" are the subject's: RIGHT_EYE appears on the image's left.
JAW = range(0, 17)
BROWS = range(17, 27)
NOSE = range(27, 36)
RIGHT_EYE = range(36, 42)
LEFT_EYE = range(42, 48)
LIPS = range(48, 68)
OUTER_LIPS = range(48, 60)
INNER_LIPS = range(60, 68)
# The points speech moves: jaw + lips, 37 indices, sorted.
MOTION_POINTS: tuple[int, ...] = tuple(sorted({*JAW, *LIPS}))

LANDMARKS_FORMAT = "talkstream.landmarks"
LANDMARKS_VERSION = 1
LANDMARKS_SCHEME = "ibug68"

_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"


@dataclass
class FaceDetection:
    """One detected face.

    Attributes:
        box: face box ``(x0, y0, x1, y1)`` in pixels, as the detector reports it; the jaw
            landmarks may lie a little outside it.
        landmarks: ``(68, 2)`` float32 ``(x, y)`` pixel coordinates, iBUG order.
        score: detector confidence (detector-specific scale; higher is more confident).
    """

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float

    @property
    def area(self) -> float:
        """Area of :attr:`box` in square pixels (0 for a degenerate box)."""
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@runtime_checkable
class LandmarkDetector(Protocol):
    """Anything that finds faces and their 68 iBUG landmarks in an RGB image.

    ``name`` identifies the detector (and its model version) in avatar cache keys, so two
    detectors that can give different points must have different names.
    """

    name: str

    def detect(self, image_rgb: np.ndarray) -> list[FaceDetection]:
        """Return every face found in ``image_rgb`` ((H, W, 3) uint8 RGB); empty if none."""
        ...


def face_models_file(name: str) -> Path | None:
    """Path of a model file shipped by ``face-recognition-models`` (in its ``models/``), or
    None when the package is not installed.

    The package is located without importing it: its ``__init__`` imports ``pkg_resources``,
    which recent setuptools no longer provides.
    """
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models" / name


def _default_predictor_path() -> Path | None:
    """Path of the 68-point predictor shipped by ``face-recognition-models``, or None."""
    return face_models_file(_PREDICTOR_FILE)


class DlibDetector:
    """dlib's HOG frontal face detector plus its 68-point shape predictor.

    The predictor file comes from the ``face-recognition-models`` package (the ``detect``
    extra). Its training data (iBUG 300-W) is licensed for non-commercial use only; a
    commercial deployment should pass another :class:`LandmarkDetector` to
    :func:`talkstream.engine.avatar.prepare_avatar`.

    Detection runs at the image's own resolution first and, only if no face is found, once
    more with the image upsampled 2x, which finds faces down to about 40 px wide at 2-4x the
    cost. The models are loaded once per instance; an instance is not meant to be shared
    between threads.

    Raises:
        MissingDependencyError: dlib or the predictor file is not installed.
    """

    name = "dlib-hog+shape_predictor_68"

    def __init__(self, predictor_path: str | Path | None = None) -> None:
        """Load the detector and the predictor (``predictor_path`` overrides the packaged one)."""
        try:
            import dlib  # lazy: an optional dependency, and slow to import
        except ImportError as e:
            raise MissingDependencyError("68-point landmark detection", "dlib", "detect") from e
        path = Path(predictor_path) if predictor_path is not None else _default_predictor_path()
        if path is None or not path.is_file():
            raise MissingDependencyError(
                "68-point landmark detection", "face_recognition_models", "detect"
            )
        self._detector: Any = dlib.get_frontal_face_detector()
        self._predictor: Any = dlib.shape_predictor(str(path))

    def detect(self, image_rgb: np.ndarray) -> list[FaceDetection]:
        """Find faces and their landmarks.

        Args:
            image_rgb: (H, W, 3) uint8 RGB image.

        Returns:
            One :class:`FaceDetection` per face, in the detector's order; empty if none.
        """
        if not isinstance(image_rgb, np.ndarray):
            raise TypeError(f"image_rgb must be a numpy array, got {type(image_rgb).__name__}")
        if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
            raise ValueError(
                "image_rgb must be an (H, W, 3) uint8 RGB array, "
                f"got shape {image_rgb.shape} dtype {image_rgb.dtype}"
            )
        image = np.ascontiguousarray(image_rgb)  # dlib needs C order
        rects, scores, _ = self._detector.run(image, 0, 0.0)
        if len(rects) == 0:
            # Small faces: one 2x upsampling, only when needed (it costs ~4x).
            rects, scores, _ = self._detector.run(image, 1, 0.0)
        faces: list[FaceDetection] = []
        for rect, score in zip(rects, scores, strict=True):
            shape = self._predictor(image, rect)
            points = np.array(
                [(shape.part(i).x, shape.part(i).y) for i in range(NUM_LANDMARKS)],
                dtype=np.float32,
            )  # (68, 2)
            # dlib's right/bottom are inclusive pixel indices: +1 makes the box half-open.
            box = (
                float(rect.left()),
                float(rect.top()),
                float(rect.right() + 1),
                float(rect.bottom() + 1),
            )
            faces.append(FaceDetection(box=box, landmarks=points, score=float(score)))
        return faces


def validate_landmarks(points: Any, what: str = "landmarks") -> np.ndarray:
    """Check a (68, 2) array of finite numbers and return it as float32.

    Raises:
        InputError: wrong shape or non-finite values; the message starts with ``what``.
    """
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what}: expected {NUM_LANDMARKS} [x, y] number pairs ({e})") from e
    if arr.shape != (NUM_LANDMARKS, 2):
        raise InputError(
            f"{what}: expected {NUM_LANDMARKS} [x, y] pairs (shape (68, 2)), got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        bad = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise InputError(f"{what}: point {bad} is not a finite number ({arr[bad].tolist()})")
    return arr.astype(np.float32)  # (68, 2)


def load_landmarks_json(path: str | Path) -> np.ndarray:
    """Read 68 landmarks from a JSON file.

    Accepts the format :func:`save_landmarks_json` writes
    (``{"format": "talkstream.landmarks", "version": 1, "scheme": "ibug68", "points": [...]}``)
    or a plain JSON list of 68 ``[x, y]`` pairs.

    Returns:
        (68, 2) float32 ``(x, y)`` pixel coordinates.

    Raises:
        InputError: missing or unreadable file, invalid JSON, unknown format/version/scheme,
            wrong number of points, or non-finite numbers; the message names the path.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise InputError(f"landmarks file not found: {p}") from e
    except IsADirectoryError as e:
        raise InputError(f"landmarks path is a directory, not a file: {p}") from e
    except PermissionError as e:
        raise InputError(f"landmarks file is not readable (permission denied): {p}") from e
    except UnicodeDecodeError as e:
        raise InputError(f"landmarks file {p} is not UTF-8 JSON text") from e
    except OSError as e:
        raise InputError(f"cannot read landmarks file {p}: {e.strerror or e}") from e
    try:
        # parse_constant: reject NaN/Infinity literals, which JSON itself does not allow.
        data = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise InputError(f"landmarks file {p} is not valid JSON: {e}") from e

    if isinstance(data, dict):
        fmt = data.get("format")
        if fmt != LANDMARKS_FORMAT:
            raise InputError(
                f"landmarks file {p}: unknown format {fmt!r} (expected {LANDMARKS_FORMAT!r})"
            )
        version = data.get("version")
        if version != LANDMARKS_VERSION:
            raise InputError(
                f"landmarks file {p}: unsupported version {version!r} "
                f"(this talkstream reads version {LANDMARKS_VERSION})"
            )
        scheme = data.get("scheme", LANDMARKS_SCHEME)
        if scheme != LANDMARKS_SCHEME:
            raise InputError(
                f"landmarks file {p}: unsupported scheme {scheme!r} "
                f"(expected {LANDMARKS_SCHEME!r}, the 68-point iBUG layout)"
            )
        if "points" not in data:
            raise InputError(f"landmarks file {p}: no 'points' entry")
        points = data["points"]
    elif isinstance(data, list):
        points = data
    else:
        raise InputError(
            f"landmarks file {p}: expected a JSON object or a list of 68 [x, y] pairs, "
            f"got {type(data).__name__}"
        )
    if not isinstance(points, list) or not all(
        isinstance(pt, list)
        and len(pt) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in pt)
        for pt in points
    ):
        raise InputError(f"landmarks file {p}: 'points' must be a list of [x, y] number pairs")
    if len(points) != NUM_LANDMARKS:
        raise InputError(
            f"landmarks file {p}: expected {NUM_LANDMARKS} points, found {len(points)}"
        )
    return validate_landmarks(points, what=f"landmarks file {p}")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def save_landmarks_json(path: str | Path, points: np.ndarray) -> None:
    """Write 68 landmarks in the ``talkstream.landmarks`` version-1 JSON format.

    Args:
        path: destination file (overwritten).
        points: (68, 2) ``(x, y)`` pixel coordinates, finite.

    Raises:
        InputError: ``points`` is not a finite (68, 2) array.
    """
    arr = validate_landmarks(points, what="landmarks to save")
    # Written by hand rather than json.dumps(indent=...) so each point sits on one line and
    # diffs of the file stay readable. Three decimals are far below a pixel.
    rows = ",\n".join(f"    [{float(x):.3f}, {float(y):.3f}]" for x, y in arr)
    text = (
        "{\n"
        f'  "format": "{LANDMARKS_FORMAT}",\n'
        f'  "version": {LANDMARKS_VERSION},\n'
        f'  "scheme": "{LANDMARKS_SCHEME}",\n'
        f'  "points": [\n{rows}\n  ]\n'
        "}\n"
    )
    Path(path).write_text(text, encoding="utf-8")


__all__ = [
    "BROWS",
    "INNER_LIPS",
    "JAW",
    "LANDMARKS_FORMAT",
    "LANDMARKS_SCHEME",
    "LANDMARKS_VERSION",
    "LEFT_EYE",
    "LIPS",
    "MOTION_POINTS",
    "NOSE",
    "NUM_LANDMARKS",
    "OUTER_LIPS",
    "RIGHT_EYE",
    "DlibDetector",
    "FaceDetection",
    "LandmarkDetector",
    "load_landmarks_json",
    "save_landmarks_json",
    "validate_landmarks",
]
