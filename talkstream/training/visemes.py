"""Phonemes -> visemes -> coarticulated mouth parameters -> jaw and lip landmarks.

Three steps, each a pure function:

1. :func:`visemes_for_phoneme` maps an espeak-ng phoneme mnemonic (English, German, French,
   Spanish, Italian; others by class) to one viseme, or to a sequence for diphthongs.
2. :func:`viseme_trajectory` blends the visemes' targets over time with dominance functions
   (Cohen & Massaro, 1993): every segment pulls each mouth parameter towards its target with a
   strength that is flat over the segment and decays smoothly before it (anticipation) and after
   it (carry-over). A parameter a segment does not articulate (lip rounding during /k/) has a
   low dominance, so the neighbouring vowels' rounding carries through it, as in real speech.
   The blend is a ratio of smooth functions, then low-passed: there are no steps.
3. :func:`params_to_landmarks` turns the parameters into displacements of the jaw (0-16) and
   lip (48-67) points of the avatar's neutral landmarks, geometrically: the jaw hinges at the
   ears, the lower lip rides on the jaw and can be raised towards the upper lip (closure),
   lips spread or round about the mouth centre.

Mouth parameters (:data:`PARAMS`), all dimensionless:

* ``jaw``: jaw opening, 0 (rest) .. 1 (wide /a/).
* ``spread``: lip-corner spreading, -1 (narrow) .. 1 (wide /i/).
* ``round``: rounding and protrusion, 0 .. 1 (/u/).
* ``upper_lip``: upper-lip raise, -1 (lowered) .. 1 (raised, teeth showing).
* ``lower_lip``: lower-lip raise relative to the jaw, 0 .. 1, where 1 closes the lips (/p b m/).

All zeros is the rest pose: the avatar's own neutral landmarks, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from talkstream.training.espeak import PhonemeSegment

__all__ = [
    "N_PARAMS",
    "PARAMS",
    "VISEMES",
    "VISEME_INDEX",
    "MouthGeometry",
    "Viseme",
    "VisemeSegment",
    "inner_lip_gap",
    "params_to_landmarks",
    "viseme_segments",
    "viseme_trajectory",
    "visemes_for_phoneme",
]

PARAMS: Final = ("jaw", "spread", "round", "upper_lip", "lower_lip")
N_PARAMS: Final = len(PARAMS)


@dataclass(frozen=True)
class Viseme:
    """A mouth shape: a target per parameter, how strongly it holds each one against its
    neighbours, and how far in time its influence reaches (a factor on the anticipation and
    carry-over time constants)."""

    name: str
    target: tuple[float, float, float, float, float]
    dominance: tuple[float, float, float, float, float]
    reach: float = 1.0


# Targets (jaw, spread, round, upper_lip, lower_lip) and dominances. Consonants that need an
# articulation to be reached (lip closure, lip-teeth contact) dominate the lip parameters
# strongly but briefly (short reach), so the closure happens even between two open vowels
# without swallowing them; vowels dominate evenly and actively keep the lower lip down;
# schwa and /h/ are weak and take their shape from the neighbours.
VISEMES: Final[tuple[Viseme, ...]] = (
    Viseme("rest", (0.0, 0.0, 0.0, 0.0, 0.0), (0.8, 0.8, 0.8, 0.8, 0.8)),
    Viseme("PBM", (0.05, 0.0, 0.0, -0.3, 1.0), (3.0, 0.4, 0.4, 3.0, 20.0), 0.6),
    Viseme("FV", (0.1, 0.05, 0.0, 0.3, 0.7), (1.5, 0.4, 0.4, 3.0, 10.0), 0.6),
    Viseme("TH", (0.22, 0.1, 0.0, 0.15, 0.1), (2.0, 0.5, 0.4, 1.0, 1.0), 0.8),
    Viseme("TDNL", (0.22, 0.1, 0.0, 0.05, 0.0), (1.0, 0.3, 0.2, 0.5, 1.0)),
    Viseme("SZ", (0.1, 0.35, 0.0, 0.15, 0.0), (2.5, 1.0, 0.4, 1.0, 1.0), 0.8),
    Viseme("SH", (0.15, -0.25, 0.7, 0.3, 0.0), (2.5, 2.0, 2.0, 1.0, 1.0), 0.8),
    Viseme("KG", (0.3, 0.05, 0.0, 0.0, 0.0), (0.8, 0.2, 0.2, 0.2, 0.5)),
    Viseme("R", (0.22, -0.25, 0.45, 0.1, 0.0), (1.0, 1.2, 1.2, 0.5, 1.0)),
    Viseme("W", (0.1, -0.5, 1.0, 0.0, 0.0), (1.5, 3.0, 3.0, 1.0, 1.0), 0.8),
    Viseme("AA", (0.95, 0.15, 0.0, 0.2, 0.0), (2.0, 1.0, 1.0, 1.0, 2.0)),
    Viseme("EH", (0.55, 0.3, 0.0, 0.1, 0.0), (1.5, 1.0, 1.0, 1.0, 2.0)),
    Viseme("AX", (0.35, 0.1, 0.0, 0.05, 0.0), (0.6, 0.4, 0.4, 0.4, 1.0)),
    Viseme("IY", (0.2, 0.75, 0.0, 0.15, 0.0), (1.0, 1.5, 1.0, 1.0, 2.0)),
    Viseme("OH", (0.6, -0.3, 0.65, 0.05, 0.0), (1.5, 1.5, 1.5, 1.0, 2.0)),
    Viseme("UW", (0.25, -0.5, 1.0, 0.0, 0.0), (1.0, 2.0, 2.0, 1.0, 2.0)),
)
VISEME_INDEX: Final[dict[str, int]] = {v.name: i for i, v in enumerate(VISEMES)}
_TARGETS: Final = np.array([v.target for v in VISEMES], dtype=np.float64)  # (V, P)
_DOMINANCE: Final = np.array([v.dominance for v in VISEMES], dtype=np.float64)  # (V, P)
_REACH: Final = np.array([v.reach for v in VISEMES], dtype=np.float64)  # (V,)
# Visemes whose shape scales with how energetically the speaker articulates; closures do not
# (a lazy /p/ still closes the lips).
_SCALED_PARAMS: Final = np.array([1.0, 1.0, 1.0, 1.0, 0.0])

# espeak-ng mnemonics shared by the languages espeak ships (Kirshenbaum-like ASCII names).
_COMMON: Final[dict[str, tuple[str, ...]]] = {
    # bilabials (Spanish B is the fricative between vowels: still nearly closed lips)
    "p": ("PBM",), "b": ("PBM",), "m": ("PBM",), "B": ("PBM",),
    "f": ("FV",), "v": ("FV",),
    "T": ("TH",), "D": ("TH",),
    "t": ("TDNL",), "d": ("TDNL",), "n": ("TDNL",), "l": ("TDNL",), "l^": ("TDNL",),
    "n^": ("TDNL",), "L": ("TDNL",),
    "s": ("SZ",), "z": ("SZ",), "ts": ("SZ",), "ss": ("SZ",), "dz": ("SZ",),
    "S": ("SH",), "Z": ("SH",), "tS": ("SH",), "dZ": ("SH",),
    "k": ("KG",), "g": ("KG",), "N": ("KG",), "h": ("KG",), "x": ("KG",), "C": ("KG",),
    "Q": ("KG",), "J^": ("KG",), "c": ("KG",), "J": ("KG",),
    "w": ("W",), "W": ("OH",), "j": ("IY",),
    "r": ("R",), "R": ("KG",),
    # vowels
    "a": ("AA",), "A": ("AA",), "A:": ("AA",), "aa": ("AA",), "a#": ("AA",), "a:": ("AA",),
    "A~": ("AA",), "&": ("AA",), "a~": ("AA",),
    "e": ("EH",), "e:": ("EH",), "E": ("EH",), "E:": ("EH",), "E~": ("EH",), "3": ("EH",),
    "3:": ("EH",), "V": ("EH",),
    "@": ("AX",), "@-": ("AX",), "@2": ("AX",), "@5": ("AX",),
    "i": ("IY",), "i:": ("IY",), "I": ("IY",), "I#": ("IY",), "I2": ("IY",),
    "o": ("OH",), "o:": ("OH",), "O": ("OH",), "O:": ("OH",), "0": ("OH",), "O~": ("OH",),
    "O2": ("OH",),
    "u": ("UW",), "u:": ("UW",), "U": ("UW",), "y": ("UW",), "y:": ("UW",), "Y": ("UW",),
    "Y:": ("UW",), "W~": ("OH",),
    # diphthongs: the mouth travels from the first shape to the second
    "aI": ("AA", "IY"), "aU": ("AA", "UW"), "OI": ("OH", "IY"), "OY": ("OH", "IY"),
    "eI": ("EH", "IY"), "oU": ("OH", "UW"), "oI": ("OH", "IY"), "aI@": ("AA", "IY", "AX"),
    "aU@": ("AA", "UW", "AX"), "i@": ("IY", "AX"), "i@3": ("IY", "AX"), "e@": ("EH", "AX"),
    "U@": ("UW", "AX"), "A@": ("AA", "AX"), "O@": ("OH", "AX"), "o@": ("OH", "AX"),
    "IR": ("IY", "R"), "VR": ("EH", "R"), "@L": ("AX", "TDNL"), "3:r": ("EH", "R"),
}  # fmt: skip
# Per-language differences: German and French r is uvular (no lip rounding, like /k/);
# Spanish and Italian r is an alveolar tap or trill.
_LANGUAGE: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "de": {"r": ("KG",), "R": ("KG",), "W": ("OH",), "y": ("UW",)},
    "fr": {"r": ("KG",), "R": ("KG",), "W": ("OH",), "Y": ("UW",)},
    "es": {"r": ("TDNL",), "R": ("TDNL",), "R2": ("TDNL",)},
    "it": {"r": ("TDNL",), "R": ("TDNL",)},
    "pt": {"r": ("TDNL",), "R": ("KG",)},
}
# First characters of espeak vowel mnemonics: the class of an unknown phoneme.
_VOWEL_CHARS: Final = frozenset("aeiouyAEIOUVY@03&")
# Modifier characters espeak appends to a base mnemonic (variant, length, nasal, reduced...).
_MODIFIERS: Final = "#-~:;/!'2456789"


def visemes_for_phoneme(name: str, language: str = "en") -> tuple[str, ...]:
    """The viseme names of one espeak-ng phoneme.

    Args:
        name: the mnemonic from an ``espeakEVENT_PHONEME`` event (e.g. ``"A:"``, ``"tS"``).
        language: the voice's language code (``"en-us"``, ``"de"``...); its base decides
            language-specific mappings such as the uvular r of German and French.

    Returns:
        One viseme name, several for a diphthong (the interval is shared among them), or an
        empty tuple for markers that are not sounds (e.g. a language switch ``"(en)"``).
        Pauses (``"_"``, ``"_:"``...) are ``("rest",)``. Unknown phonemes fall back by class:
        a vowel to the mid viseme ``EH``, a consonant to ``TDNL``.
    """
    if not name or name.startswith("(") or not any(ch.isalnum() or ch in "@&" for ch in name):
        return ("rest",) if name.startswith("_") else ()
    if name.startswith("_"):
        return ("rest",)
    table = _LANGUAGE.get(language.split("-")[0].split("+")[0].lower(), {})
    candidates = [name]
    stripped = name
    # Strip trailing modifiers one by one ("aI2" -> "aI", "t#" -> "t") but never the whole
    # name: "3" and "0" are vowels, not modifiers.
    while len(stripped) > 1 and stripped[-1] in _MODIFIERS:
        stripped = stripped[:-1]
        candidates.append(stripped)
    for cand in candidates:
        if cand in table:
            return table[cand]
        if cand in _COMMON:
            return _COMMON[cand]
    if stripped[:2] in _COMMON:
        return _COMMON[stripped[:2]]
    return ("EH",) if stripped[0] in _VOWEL_CHARS else ("TDNL",)


@dataclass(frozen=True)
class VisemeSegment:
    """A viseme held over ``[start_s, end_s)``; ``phoneme`` is the espeak phoneme it came from."""

    viseme: int
    start_s: float
    end_s: float
    phoneme: str


def viseme_segments(
    phonemes: Sequence[PhonemeSegment], language: str = "en"
) -> list[VisemeSegment]:
    """Viseme segments of a phoneme sequence.

    A diphthong's interval is split evenly among its visemes. Markers (no viseme) are merged
    into the previous segment, so the segments tile the same time span as the phonemes.
    """
    out: list[VisemeSegment] = []
    for ph in phonemes:
        names = visemes_for_phoneme(ph.name, language)
        if not names:
            if out:
                last = out[-1]
                out[-1] = VisemeSegment(last.viseme, last.start_s, ph.end_s, last.phoneme)
            continue
        step = (ph.end_s - ph.start_s) / len(names)
        for k, v in enumerate(names):
            a = ph.start_s + k * step
            out.append(VisemeSegment(VISEME_INDEX[v], a, a + step, ph.name))
    return out


def _gaussian_kernel(sigma_samples: float) -> np.ndarray:
    half = max(1, int(np.ceil(3.0 * sigma_samples)))
    x = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma_samples) ** 2)
    return k / k.sum()


def viseme_trajectory(
    segments: Sequence[VisemeSegment],
    times_s: np.ndarray,
    *,
    articulation: float = 1.0,
    anticipation_s: float = 0.05,
    carryover_s: float = 0.04,
    smoothing_s: float = 0.018,
    resolution_s: float = 0.002,
) -> np.ndarray:
    """Mouth parameters at ``times_s`` from timed visemes, with coarticulation.

    Each segment ``s`` has, per parameter ``p``, the dominance
    ``alpha[s, p] * exp(-(gap / tau) ** 2)``, where ``gap`` is the distance from ``t`` to the
    segment's interval (0 inside it) and ``tau`` is ``anticipation_s`` before the segment and
    ``carryover_s`` after it. The parameters are the dominance-weighted mean of the targets,
    with a weak rest pose everywhere (so long pauses and the time outside the segments relax to
    rest). The curve is computed on a ``resolution_s`` grid, low-passed by a Gaussian of
    ``smoothing_s`` (articulators have inertia) and interpolated at ``times_s``.

    Because a segment's dominance rises ``anticipation_s`` before its onset, the mouth starts
    moving towards it early (about 40-80 ms for the defaults); strongly dominant visemes (lip
    closure) are nearly reached by their onset.

    Args:
        segments: from :func:`viseme_segments`, in time order.
        times_s: (T,) query times in seconds (e.g. video frame centres).
        articulation: scales the open/spread/round/raise targets (not the closure): below 1
            is lazier speech, above 1 more energetic.
        anticipation_s, carryover_s: decay constants of the dominance before and after a
            segment.
        smoothing_s: standard deviation of the final low-pass (0 to skip it).
        resolution_s: internal time step.

    Returns:
        (T, N_PARAMS) float32, columns in :data:`PARAMS` order.
    """
    times = np.asarray(times_s, dtype=np.float64).reshape(-1)  # (T,)
    if times.size == 0:
        return np.zeros((0, N_PARAMS), dtype=np.float32)
    if anticipation_s <= 0 or carryover_s <= 0 or resolution_s <= 0:
        raise ValueError("anticipation_s, carryover_s and resolution_s must be positive")
    margin = 4.0 * max(anticipation_s, carryover_s, smoothing_s)
    t0, t1 = float(times.min()) - margin, float(times.max()) + margin
    grid = t0 + resolution_s * np.arange(int(np.ceil((t1 - t0) / resolution_s)) + 1)  # (G,)

    rest = VISEME_INDEX["rest"]
    num = np.zeros((grid.size, N_PARAMS))  # (G, P) sum of dominance * target
    den = np.zeros((grid.size, N_PARAMS))  # (G, P) sum of dominance
    # A weak rest pose everywhere: the mouth relaxes to rest far from any speech.
    den += 0.02 * _DOMINANCE[rest]
    scale = 1.0 + (articulation - 1.0) * _SCALED_PARAMS  # (P,)
    for seg in segments:
        # Only the grid points within reach of the segment's tails matter.
        tau_a = anticipation_s * _REACH[seg.viseme]
        tau_c = carryover_s * _REACH[seg.viseme]
        lo = np.searchsorted(grid, seg.start_s - 4.0 * tau_a)
        hi = np.searchsorted(grid, seg.end_s + 4.0 * tau_c)
        if hi <= lo:
            continue
        t = grid[lo:hi]  # (g,)
        before = np.maximum(seg.start_s - t, 0.0) / tau_a
        after = np.maximum(t - seg.end_s, 0.0) / tau_c
        shape = np.exp(-(before**2) - after**2)  # (g,): 1 on the interval, smooth tails
        d = shape[:, None] * _DOMINANCE[seg.viseme][None, :]  # (g, P)
        num[lo:hi] += d * (_TARGETS[seg.viseme] * scale)[None, :]
        den[lo:hi] += d
    curve = num / den  # (G, P)
    if smoothing_s > 0:
        k = _gaussian_kernel(smoothing_s / resolution_s)
        pad = k.size // 2
        padded = np.pad(curve, ((pad, pad), (0, 0)), mode="edge")
        curve = np.stack(
            [np.convolve(padded[:, p], k, mode="valid") for p in range(N_PARAMS)], axis=1
        )  # (G, P)
    out = np.stack([np.interp(times, grid, curve[:, p]) for p in range(N_PARAMS)], axis=1)
    return out.astype(np.float32)  # (T, P)


# --- geometry -------------------------------------------------------------------------------

# iBUG lip points, outer then inner, as used below.
_UPPER_OUTER: Final = np.array([49, 50, 51, 52, 53])
_LOWER_OUTER: Final = np.array([55, 56, 57, 58, 59])
_UPPER_INNER: Final = np.array([61, 62, 63])
# In iBUG order 61-63 run left to right and 65-67 right to left: pair them by column.
_LOWER_INNER: Final = np.array([67, 66, 65])
_LOWER_OUTER_MID: Final = np.array([58, 57, 56])  # the outer points below 67, 66, 65
_CORNERS: Final = np.array([48, 54, 60, 64])
_LIPS: Final = np.arange(48, 68)
_JAW: Final = np.arange(0, 17)

# Amplitudes, as fractions of the eye-to-mouth distance H (41 px in a 128 crop) or of the mouth
# width W. Chosen by eye on the default face; a wide /a/ opens the lips about 0.17 W beyond rest.
JAW_DROP_H: Final = 0.22  # chin drop at jaw = 1
UPPER_LIP_H: Final = 0.07  # upper-lip raise at upper_lip = 1
LIP_PRESS_H: Final = 0.04  # how far past contact a closure pushes (lips compress)
SPREAD_W: Final = 0.12  # corner displacement per unit spread, each side
ROUND_OUTER_W: Final = 0.12  # horizontal narrowing of the outer lips at round = 1
ROUND_INNER_W: Final = 0.3  # ... of the inner lips (the opening becomes round)
POUT_W: Final = 0.05  # protruded lips look fuller: outer lips move away from the centre
JAW_NARROW: Final = 0.08  # the lower face narrows slightly as the jaw opens


@dataclass(frozen=True)
class MouthGeometry:
    """Per-avatar constants of :func:`params_to_landmarks`, derived from neutral landmarks."""

    neutral: np.ndarray  # (68, 2) float64 crop px
    centre: np.ndarray  # (2,) mouth centre (midpoint of the outer corners)
    u: np.ndarray  # (2,) unit vector, right mouth corner direction (image x for an upright face)
    v: np.ndarray  # (2,) unit vector, down the face
    face_h: float  # eye midpoint to mouth centre, px
    mouth_w: float  # outer corner to corner, px
    local: np.ndarray  # (68, 2) neutral in the (u, v) frame about ``centre``
    gap: np.ndarray  # (68,) neutral inner-lip gap at each point's column (0 off the mouth)
    lower_follow: np.ndarray  # (68,) how much of the jaw drop each point follows
    thickness: np.ndarray  # (3,) neutral lower-lip thickness below points 67, 66, 65

    @classmethod
    def from_neutral(cls, neutral: np.ndarray) -> MouthGeometry:
        """Measure a face. ``neutral``: (68, 2) landmarks in crop pixels."""
        pts = np.asarray(neutral, dtype=np.float64)
        if pts.shape != (68, 2):
            raise ValueError(f"neutral landmarks must have shape (68, 2), got {pts.shape}")
        left, right = pts[48], pts[54]
        centre = 0.5 * (left + right)
        mouth_w = float(np.hypot(*(right - left)))
        if mouth_w < 1.0:
            raise ValueError(f"degenerate mouth: corners {mouth_w:.2f} px apart")
        u = (right - left) / mouth_w
        v = np.array([-u[1], u[0]])  # u rotated +90 degrees: down for an upright face
        eyes = 0.5 * (pts[36:42].mean(axis=0) + pts[42:48].mean(axis=0))
        face_h = float(np.hypot(*(centre - eyes)))
        rel = pts - centre
        local = np.stack([rel @ u, rel @ v], axis=1)  # (68, 2)

        # Inner-lip gap as a function of the horizontal position: upper and lower inner curves
        # through the inner corners.
        up = local[[60, 61, 62, 63, 64]]
        lo = local[[60, 67, 66, 65, 64]]
        up = up[np.argsort(up[:, 0])]
        lo = lo[np.argsort(lo[:, 0])]
        xs = local[:, 0]
        gap_fn = np.interp(xs, lo[:, 0], lo[:, 1], left=np.nan, right=np.nan) - np.interp(
            xs, up[:, 0], up[:, 1], left=np.nan, right=np.nan
        )
        gap = np.where(np.isfinite(gap_fn), np.maximum(gap_fn, 0.0), 0.0)
        gap[_CORNERS] = 0.0
        mask = np.zeros(68, dtype=bool)
        mask[_LIPS] = True
        gap[~mask] = 0.0

        half = 0.5 * mouth_w
        follow = np.zeros(68)
        a = np.clip(np.abs(local[:, 0]) / half, 0.0, 1.0)
        lower = np.concatenate([_LOWER_OUTER, _LOWER_INNER])
        upper = np.concatenate([_UPPER_OUTER, _UPPER_INNER])
        # The lower lip sits on the jaw (nearly all of the drop at the middle); the corners are
        # shared by both lips and take about a third; the upper lip stays with the skull.
        follow[lower] = 0.35 + 0.6 * (1.0 - a[lower] ** 2)
        follow[upper] = 0.35 * a[upper] ** 4
        follow[_CORNERS] = 0.35
        thickness = np.maximum(local[_LOWER_OUTER_MID, 1] - local[_LOWER_INNER, 1], 0.5)
        return cls(
            neutral=pts,
            centre=centre,
            u=u,
            v=v,
            face_h=face_h,
            mouth_w=mouth_w,
            local=local,
            gap=gap,
            lower_follow=follow,
            thickness=thickness,
        )


def params_to_landmarks(geometry: MouthGeometry, params: np.ndarray) -> np.ndarray:
    """Landmarks of the mouth parameters: the neutral face with its jaw and lips moved.

    Args:
        geometry: the avatar's :class:`MouthGeometry`.
        params: (T, N_PARAMS) or (N_PARAMS,) parameters (:data:`PARAMS` order).

    Returns:
        (T, 68, 2) (or (68, 2)) float32 crop-pixel landmarks. Only points 0-16 and 48-67
        move; all-zero parameters give exactly the neutral landmarks.
    """
    g = geometry
    p = np.asarray(params, dtype=np.float64)
    single = p.ndim == 1
    p = p.reshape(-1, N_PARAMS)  # (T, P)
    jaw, spread, rnd, upper, lower = (p[:, i : i + 1] for i in range(N_PARAMS))  # (T, 1) each
    loc = np.broadcast_to(g.local, (p.shape[0], 68, 2)).copy()  # (T, 68, 2)
    x0 = g.local[None, :, 0]  # (1, 68)
    y0 = g.local[None, :, 1]

    drop = JAW_DROP_H * g.face_h * jaw  # (T, 1) chin drop in px

    # Jaw outline: hinged at the ears, so a point drops in proportion to its distance below
    # the ear line (points 0 and 16) relative to the chin (point 8).
    ear = max(g.local[0, 1], g.local[16, 1])  # both top jaw points stay on the skull
    w = np.clip((g.local[_JAW, 1] - ear) / max(g.local[8, 1] - ear, 1e-6), 0.0, 1.0)  # (17,)
    half_face = max(0.5 * abs(g.local[16, 0] - g.local[0, 0]), 1.0)
    loc[:, _JAW, 1] = y0[:, _JAW] + drop * w[None]
    loc[:, _JAW, 0] = x0[:, _JAW] * (1.0 - JAW_NARROW * drop * w[None] / half_face)

    # Lips, horizontally: spread widens, rounding narrows (the inner opening more).
    lips = _LIPS
    inner = np.zeros(68, dtype=bool)
    inner[60:68] = True
    sx_outer = 1.0 + SPREAD_W * 2.0 * spread - ROUND_OUTER_W * rnd  # (T, 1)
    sx_inner = 1.0 + SPREAD_W * 2.0 * spread - ROUND_INNER_W * rnd
    sx = np.where(inner[None, lips], sx_inner, sx_outer)  # (T, 20)
    loc[:, lips, 0] = x0[:, lips] * sx

    # Lips, vertically.
    half = 0.5 * g.mouth_w
    bump = np.clip(1.0 - (x0[:, lips] / half) ** 2, 0.0, 1.0)  # (1, 20): 1 mid, 0 corners
    dy = drop * g.lower_follow[None, lips]  # (T, 20): ride on the jaw
    is_upper = np.isin(lips, np.concatenate([_UPPER_OUTER, _UPPER_INNER]))
    is_lower = np.isin(lips, np.concatenate([_LOWER_OUTER, _LOWER_INNER]))
    dy = dy - np.where(is_upper[None], UPPER_LIP_H * g.face_h * upper * bump, 0.0)
    # Lower-lip raise, relative to the jaw: at 1 it cancels the jaw drop and the neutral gap
    # and presses a little further (the contact constraint below stops it at the upper lip).
    close = g.gap[None, lips] + dy + LIP_PRESS_H * g.face_h * bump
    dy = dy - np.where(is_lower[None], lower * close, 0.0)
    # Rounding protrudes the lips: seen from the front they get fuller.
    outer_upper = np.isin(lips, _UPPER_OUTER)
    outer_lower = np.isin(lips, _LOWER_OUTER)
    pout = POUT_W * g.mouth_w * rnd * bump  # (T, 20)
    dy = dy - np.where(outer_upper[None], pout, 0.0) + np.where(outer_lower[None], pout, 0.0)
    loc[:, lips, 1] = y0[:, lips] + dy

    # Contact: the inner lower lip cannot pass the inner upper lip (pairs 67-61, 66-62,
    # 65-63), and the outer lower lip keeps part of its thickness. A face whose neutral lips
    # overlap keeps that overlap as its floor, so the rest pose stays the neutral one.
    floor = np.minimum(g.local[_LOWER_INNER, 1] - g.local[_UPPER_INNER, 1], 0.0)  # (3,)
    top = loc[:, _UPPER_INNER, 1] + floor[None]  # (T, 3)
    loc[:, _LOWER_INNER, 1] = np.maximum(loc[:, _LOWER_INNER, 1], top)
    below = loc[:, _LOWER_INNER, 1] + 0.4 * g.thickness[None]  # (T, 3)
    loc[:, _LOWER_OUTER_MID, 1] = np.maximum(loc[:, _LOWER_OUTER_MID, 1], below)

    # Back to crop pixels.
    out = g.centre[None, None, :] + loc[..., 0:1] * g.u + loc[..., 1:2] * g.v  # (T, 68, 2)
    out[:, 17:48] = g.neutral[17:48]  # untouched groups stay bit-exact
    out = out.astype(np.float32)
    return out[0] if single else out


def inner_lip_gap(landmarks: np.ndarray) -> np.ndarray:
    """Mean vertical inner-lip opening in pixels: the mouth-opening signal.

    Args:
        landmarks: (..., 68, 2).

    Returns:
        (...,) mean distance of the inner-lip pairs 61-67, 62-66, 63-65.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    d = lm[..., [67, 66, 65], :] - lm[..., [61, 62, 63], :]
    return np.sqrt((d**2).sum(axis=-1)).mean(axis=-1)
