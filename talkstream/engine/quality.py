"""Can this face be animated well? One check shared by avatar preparation and the face dataset.

The renderer keeps the photo's own pixels outside the mouth and redraws the lower face from the
68 landmarks, so it needs a face that is frontal enough for the jaw and lips to be seen, large
enough for the lips to span several pixels, and a mouth that the landmark fit actually found.
The check works on the landmarks (and the detector's score) alone: it is cheap, needs no model
of its own, and gives the same answer during training (rejecting photos) and at run time
(refusing, in one line, a photo that would give a broken face).

The "mouth covered" test is a heuristic: a hand, a microphone or a mask in front of the mouth
makes the shape predictor place the lips implausibly (mouth too narrow or too wide for the eyes,
lips outside the jaw, an inner lip crossing the outer one). A covered mouth that the predictor
still fits plausibly is not caught.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FaceCheck", "QualityConfig", "check_face"]


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of :func:`check_face` (pixels of the original photo)."""

    min_face_px: float = 40.0  # jaw width (point 0 to 16); smaller faces have 2-3 px lips
    max_yaw: float = 0.6  # |nose offset from the face's centre| / half the jaw width
    max_roll_deg: float = 35.0  # tilt of the eye line
    mouth_to_eyes: tuple[float, float] = (0.55, 1.6)  # mouth width / distance between eyes
    min_score: float = -0.5  # dlib HOG score; None-like scores (other detectors) pass


@dataclass(frozen=True)
class FaceCheck:
    """The verdict: ``ok`` or a short ``reason`` key and a one-line ``message``."""

    ok: bool
    reason: str  # "" | "tiny" | "profile" | "tilted" | "mouth" | "weak"
    message: str
    face_px: float
    yaw: float

    @property
    def advice(self) -> str:
        return _ADVICE.get(self.reason, "")


_ADVICE = {
    "tiny": "use a photo where the face is at least 80 px wide (closer, or a larger photo)",
    "profile": "use a photo taken from the front, both eyes and both mouth corners visible",
    "tilted": "use an upright photo (the head tilted less than 30 degrees)",
    "mouth": "use a photo whose mouth is uncovered and in view (no hand, mask or microphone)",
    "weak": "use a sharper, well-lit photo of one frontal face",
}


def _cross(a: np.ndarray, b: np.ndarray) -> float:
    return float(a[0] * b[1] - a[1] * b[0])


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def check_face(
    points: np.ndarray, score: float | None = None, cfg: QualityConfig | None = None
) -> FaceCheck:
    """Judge a face from its 68 landmarks (photo pixels) and, if known, the detector score."""
    cfg = cfg or QualityConfig()
    p = np.asarray(points, dtype=np.float64)
    if p.shape != (68, 2) or not np.all(np.isfinite(p)):
        raise ValueError(f"points must be a finite (68, 2) array, got {p.shape}")
    jaw_vec = p[16] - p[0]
    face_px = float(np.hypot(*jaw_vec))
    eyes_l, eyes_r = p[36:42].mean(axis=0), p[42:48].mean(axis=0)
    eye_vec = eyes_r - eyes_l
    eye_d = float(np.hypot(*eye_vec))
    # Yaw: where the nose tip sits between the jaw ends, along the jaw line (0 = centred).
    t = float(np.dot(p[30] - p[0], jaw_vec) / max(face_px**2, 1e-9))
    yaw = abs(2.0 * t - 1.0)
    roll = float(np.degrees(np.arctan2(eye_vec[1], eye_vec[0])))

    def bad(reason: str, what: str) -> FaceCheck:
        return FaceCheck(False, reason, what, face_px, yaw)

    if face_px < cfg.min_face_px:
        return bad("tiny", f"the face is only {face_px:.0f} px wide")
    if yaw > cfg.max_yaw:
        return bad("profile", f"the face is turned to the side (yaw {yaw:.2f})")
    if abs(roll) > cfg.max_roll_deg:
        return bad("tilted", f"the head is tilted {abs(roll):.0f} degrees")
    mouth_w = float(np.hypot(*(p[54] - p[48])))
    ratio = mouth_w / max(eye_d, 1e-9)
    outer, inner = p[48:60], p[60:68]
    lo, hi = cfg.mouth_to_eyes
    # The mouth must lie below the nose, between the jaw ends, with its inner outline inside
    # the outer one and both outlines turning the same way.
    down = np.array([-eye_vec[1], eye_vec[0]]) / max(eye_d, 1e-9)  # unit, towards the chin
    below_nose = float(np.dot(p[51] - p[33], down)) > 0.0
    in_jaw = (
        float(np.dot(p[48] - p[0], jaw_vec)) > 0.0 and float(np.dot(p[54] - p[16], jaw_vec)) < 0
    )
    a_out, a_in = _polygon_area(outer), _polygon_area(inner)
    same_turn = a_out * a_in >= 0.0 and abs(a_in) <= abs(a_out) + 1e-6
    if not (
        lo <= ratio <= hi
        and below_nose
        and in_jaw
        and same_turn
        and _cross(p[54] - p[48], p[57] - p[48]) * _cross(eye_vec, down) > 0
    ):
        return bad("mouth", "the mouth is covered or not found (implausible lip landmarks)")
    if score is not None and score < cfg.min_score:
        return bad("weak", f"the face was found only weakly (detector score {score:.2f})")
    return FaceCheck(True, "", "", face_px, yaw)
