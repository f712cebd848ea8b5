"""Identity distance: does the rendered face still look like the person in the photo?

Measured independently of the model, with dlib's face-recognition ResNet
(``dlib_face_recognition_resnet_model_v1.dat`` from the ``face-recognition-models`` package, the
``detect`` extra): each face is detected (HOG), its 68 landmarks fitted (the same predictor the
engine uses), the face chip aligned on them (``compute_face_descriptor(image, shape)``, dlib's
150 px chip with 25% padding) and mapped to a 128-d descriptor. The Euclidean distance between
two descriptors is dlib's identity measure: under **0.6** dlib calls two faces the same person
(99.38% on LFW); the same photo scores about 0, a re-encoded or slightly shifted copy a few
hundredths, two different people typically 0.7-0.9.

:meth:`FaceIdentity.compare` gives the **median** distance of a video's frames to the photo.
Frames in which no face is found do not enter the distance: they count against the detection
rate it also returns (a face the detector cannot find is a failure of its own kind, reported
separately, not a large distance).

The recognition model was trained on photos of adults (mostly from the web: the same skews as
most face data sets); it is a yardstick, not ground truth. Its distance is low for two photos of
one person taken years apart, so a small distance does not prove a perfect likeness, but a
distance over 0.6 between a photo and a video made from it means the video shows, to this
model, somebody else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from talkstream.engine.landmarks import DlibDetector, LandmarkDetector, face_models_file
from talkstream.errors import MissingDependencyError

__all__ = [
    "SAME_PERSON_THRESHOLD",
    "FaceIdentity",
    "IdentityResult",
    "descriptor_distance",
    "recognition_model_path",
]

SAME_PERSON_THRESHOLD = 0.6  # dlib's: distances below are the same person
_RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
# Faces smaller than this (box side, px) are detected and described on a 2x copy: the HOG
# detector wants ~80 px faces and the chip is 150 px anyway.
_MIN_FACE_PX = 100


def recognition_model_path() -> Path | None:
    """The ResNet descriptor model shipped by ``face-recognition-models``, or None."""
    p = face_models_file(_RECOGNITION_FILE)
    return p if p is not None and p.is_file() else None


def descriptor_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance of two 128-d descriptors (dlib's identity measure)."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


@dataclass
class IdentityResult:
    """A video's frames against one photo.

    Attributes:
        distance: median descriptor distance over the frames with a face; None when no frame
            had one (or the photo had none).
        distances: (n_found,) the per-frame distances, frame order.
        found: (n_frames,) bool, a face was detected in the frame.
        photo_found: a face was found in the photo (else nothing is compared).
    """

    distance: float | None
    distances: np.ndarray
    found: np.ndarray
    photo_found: bool

    @property
    def detection_rate(self) -> float:
        return float(self.found.mean()) if len(self.found) else 0.0

    @property
    def same_person_rate(self) -> float | None:
        """Share of the frames with a face that are under dlib's 0.6 threshold."""
        if not len(self.distances):
            return None
        return float((self.distances < SAME_PERSON_THRESHOLD).mean())


class FaceIdentity:
    """dlib's face descriptor of photos and frames.

    Args:
        detector: finds the face and its 68 landmarks (default: a
            :class:`~talkstream.engine.landmarks.DlibDetector`, the engine's).
        model_path: the ResNet ``.dat`` (default: from ``face-recognition-models``).

    Raises:
        MissingDependencyError: dlib or the model file is not installed.
    """

    def __init__(
        self, detector: LandmarkDetector | None = None, model_path: str | Path | None = None
    ) -> None:
        try:
            import dlib
        except ImportError as e:
            raise MissingDependencyError("the identity measure", "dlib", "detect") from e
        path = Path(model_path) if model_path is not None else recognition_model_path()
        if path is None or not path.is_file():
            raise MissingDependencyError(
                "the identity measure", "face_recognition_models", "detect"
            )
        self._dlib: Any = dlib
        self._model: Any = dlib.face_recognition_model_v1(str(path))
        self.detector = detector if detector is not None else DlibDetector()

    def _shape(self, landmarks: np.ndarray, box: tuple[float, float, float, float]) -> Any:
        dlib = self._dlib
        rect = dlib.rectangle(
            round(box[0]), round(box[1]), max(round(box[2]) - 1, 0), max(round(box[3]) - 1, 0)
        )
        pts = dlib.points()
        for x, y in np.asarray(landmarks, dtype=np.float64):
            pts.append(dlib.point(round(x), round(y)))
        return dlib.full_object_detection(rect, pts)

    def descriptor(
        self, image: np.ndarray, landmarks: np.ndarray | None = None
    ) -> np.ndarray | None:
        """The 128-d descriptor of the (largest) face in ``image``; None if there is none.

        Args:
            image: (H, W, 3) uint8 RGB.
            landmarks: (68, 2) pixel landmarks of the face instead of detection.
        """
        img = np.ascontiguousarray(image, dtype=np.uint8)
        if landmarks is None:
            faces = self.detector.detect(img)
            if not faces:
                return None
            # The most confident detection: a HOG false positive (a suit, a shirt collar) can
            # be as large as the face but scores lower.
            best = max(faces, key=lambda f: f.score)
            pts = np.asarray(best.landmarks, dtype=np.float64)
        else:
            pts = np.asarray(landmarks, dtype=np.float64)
        if np.ptp(pts, axis=0).max() < _MIN_FACE_PX:
            # Small faces: the chip is sampled from a 2x (bicubic) copy, not from few pixels.
            from PIL import Image

            h, w = img.shape[:2]
            img = np.asarray(Image.fromarray(img).resize((2 * w, 2 * h), Image.Resampling.BICUBIC))
            pts = (pts + 0.5) * 2.0 - 0.5
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0)
        # dlib aligns the chip on the parts alone; the rectangle is the points' bounding box.
        shape = self._shape(pts, (float(x0), float(y0), float(x1) + 1, float(y1) + 1))
        d = self._model.compute_face_descriptor(img, shape, 0, 0.25)
        return np.asarray(d, dtype=np.float32)  # (128,)

    def distance(self, a: np.ndarray, b: np.ndarray) -> float | None:
        """Descriptor distance of the faces in two images; None if either has no face."""
        da, db = self.descriptor(a), self.descriptor(b)
        if da is None or db is None:
            return None
        return descriptor_distance(da, db)

    def compare(
        self,
        photo: np.ndarray | None,
        frames: Sequence[np.ndarray] | np.ndarray,
        *,
        photo_descriptor: np.ndarray | None = None,
        photo_landmarks: np.ndarray | None = None,
    ) -> IdentityResult:
        """Median distance of ``frames`` to ``photo`` (frames without a face are left out).

        Args:
            photo: (H, W, 3) uint8 RGB; or None with ``photo_descriptor``.
            frames: N (h, w, 3) uint8 RGB frames.
            photo_descriptor: the photo's descriptor, if already computed.
            photo_landmarks: the photo's landmarks (skips its detection).
        """
        ref = photo_descriptor
        if ref is None and photo is not None:
            ref = self.descriptor(photo, photo_landmarks)
        found = np.zeros(len(frames), dtype=bool)
        dists: list[float] = []
        for i, f in enumerate(frames):
            d = self.descriptor(f)
            if d is None:
                continue
            found[i] = True
            if ref is not None:
                dists.append(descriptor_distance(ref, d))
        arr = np.asarray(dists, dtype=np.float64)
        med = float(np.median(arr)) if ref is not None and len(arr) else None
        return IdentityResult(med, arr, found, ref is not None)
