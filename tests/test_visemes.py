"""Phonemes -> visemes -> coarticulated parameters -> landmarks: mapping, timing, geometry."""

from __future__ import annotations

import numpy as np
import pytest

from talkstream.engine.avatar import Avatar
from talkstream.training.espeak import PhonemeSegment, espeak_available, synthesize
from talkstream.training.visemes import (
    JAW_DROP_H,
    N_PARAMS,
    PARAMS,
    VISEME_INDEX,
    VISEMES,
    MouthGeometry,
    VisemeSegment,
    inner_lip_gap,
    params_to_landmarks,
    viseme_segments,
    viseme_trajectory,
    visemes_for_phoneme,
)

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="libespeak-ng not installed")
JAW, SPREAD, ROUND, UPPER, LOWER = range(N_PARAMS)


@pytest.fixture(scope="module")
def geometry(default_avatar: Avatar) -> MouthGeometry:
    return MouthGeometry.from_neutral(default_avatar.neutral)


def test_phoneme_mapping() -> None:
    assert PARAMS == ("jaw", "spread", "round", "upper_lip", "lower_lip")
    for p in ("p", "b", "m"):
        assert visemes_for_phoneme(p, "en-us") == ("PBM",)
    assert visemes_for_phoneme("f", "en") == ("FV",)
    assert visemes_for_phoneme("A:", "en") == ("AA",)
    assert visemes_for_phoneme("u:", "en") == ("UW",)
    assert visemes_for_phoneme("aI", "en-us") == ("AA", "IY")  # diphthong: a path
    assert visemes_for_phoneme("aI2", "en-us") == ("AA", "IY")  # modifier stripped
    assert visemes_for_phoneme("t#", "en-us") == ("TDNL",)
    assert visemes_for_phoneme("3", "en") == ("EH",)  # a vowel, not a modifier digit
    assert visemes_for_phoneme("0", "en") == ("OH",)
    # Language-specific r: rounded approximant, uvular, alveolar trill.
    assert visemes_for_phoneme("r", "en-us") == ("R",)
    assert visemes_for_phoneme("R", "de") == ("KG",)
    assert visemes_for_phoneme("r", "fr") == ("KG",)
    assert visemes_for_phoneme("r", "es") == ("TDNL",)
    assert visemes_for_phoneme("y", "fr") == ("UW",)
    assert visemes_for_phoneme("Y:", "de") == ("UW",)
    assert visemes_for_phoneme("B", "es") == ("PBM",)
    # Pauses rest, markers vanish, unknown phonemes fall back by class.
    assert visemes_for_phoneme("_:", "en") == ("rest",)
    assert visemes_for_phoneme("(en)", "fr") == ()
    assert visemes_for_phoneme(";", "es") == ()
    assert visemes_for_phoneme("eQx", "xx") == ("EH",)
    assert visemes_for_phoneme("Xq", "xx") == ("TDNL",)


@needs_espeak
@pytest.mark.parametrize(
    ("voice", "text"),
    [
        ("en-us", "The quick brown fox jumps over the lazy dog, she says."),
        ("de", "Die Kinder spielen im Garten mit dem Ball über Bäume."),
        ("fr", "Les enfants jouent au ballon dans le jardin, où vous êtes."),
        ("es", "Los niños juegan con la pelota en el jardín, por favor."),
        ("it", "I bambini giocano a palla in giardino, per favore."),
    ],
)
def test_real_phonemes_map_without_fallback(voice: str, text: str) -> None:
    from talkstream.training import visemes as v

    u = synthesize(text, voice)
    names = [p.name for p in u.phonemes()]
    assert len(names) > 20
    unknown = []
    for n in names:
        mapped = visemes_for_phoneme(n, voice)
        assert all(m in VISEME_INDEX for m in mapped)
        # Known: the name (or it without modifiers) is in a table, or it is a pause/marker.
        base = n.rstrip(v._MODIFIERS) or n
        lang = v._LANGUAGE.get(voice.split("-")[0], {})
        tables = (v._COMMON, lang)
        if mapped and mapped != ("rest",) and not any(n in t or base in t for t in tables):
            unknown.append(n)
    assert not unknown, f"{voice}: phonemes mapped only by fallback: {sorted(set(unknown))}"


def _segments(spec: list[tuple[str, float]], lead: float = 0.4) -> list[VisemeSegment]:
    """Phoneme list with durations -> viseme segments, with silence around."""
    phs = [PhonemeSegment("_", 0.0, lead)]
    t = lead
    for name, dur in spec:
        phs.append(PhonemeSegment(name, t, t + dur))
        t += dur
    phs.append(PhonemeSegment("_", t, t + 0.6))
    return viseme_segments(phs, "en-us")


def test_rest_pose_is_neutral(geometry: MouthGeometry) -> None:
    lm = params_to_landmarks(geometry, np.zeros(N_PARAMS))
    np.testing.assert_array_equal(lm, geometry.neutral.astype(np.float32))
    segs = _segments([("m", 0.08), ("A:", 0.15), ("m", 0.08)])
    times = np.array([0.0, 0.1, 2.0, 3.0])  # in the leading and far trailing silence
    p = viseme_trajectory(segs, times)
    assert np.abs(p[[0, 3]]).max() < 0.01


def test_jaw_peaks_in_vowels_and_lips_close_on_bilabials(geometry: MouthGeometry) -> None:
    spec = [("m", 0.08), ("A:", 0.16), ("p", 0.09), ("a", 0.14), ("b", 0.08), ("aI", 0.2)]
    segs = _segments(spec)
    t = np.arange(0.0, 1.8, 0.001)
    p = viseme_trajectory(segs, t)
    gap = inner_lip_gap(params_to_landmarks(geometry, p))
    start = 0.4
    bounds = []
    for name, dur in spec:
        bounds.append((name, start, start + dur))
        start += dur
    for i, (name, a, b) in enumerate(bounds):
        mid = 0.5 * (a + b)
        k = round(mid * 1000)
        if name in ("m", "p", "b"):
            assert gap[k] < 0.6, (name, gap[k])  # lips shut at the closure
            assert p[k, LOWER] > 0.8
        else:
            # Jaw peak of the vowel: inside the vowel, not on a neighbouring consonant.
            lo = round(bounds[i - 1][1] * 1000 + 20)
            hi = round((bounds[i + 1][2] if i + 1 < len(bounds) else b + 0.1) * 1000)
            peak_t = t[lo + int(np.argmax(p[lo:hi, JAW]))]
            assert a - 0.02 <= peak_t <= b + 0.02, (name, a, b, peak_t)
            assert p[k, JAW] > 0.5
            assert gap[k] > 8.0  # mouth clearly open
            prev_mid = round(0.5 * (bounds[i - 1][1] + bounds[i - 1][2]) * 1000)
            assert p[k, JAW] > p[prev_mid, JAW] + 0.2


def test_anticipation(geometry: MouthGeometry) -> None:
    # A rounded vowel after a long neutral vowel: rounding must start before its onset.
    onset = 0.4 + 0.3
    segs = _segments([("E", 0.3), ("u:", 0.25)])
    t = np.arange(0.3, 1.2, 0.001)
    p = viseme_trajectory(segs, t)
    before = p[np.searchsorted(t, onset - 0.2), ROUND]
    target = p[np.searchsorted(t, onset + 0.125), ROUND]
    started = t[np.argmax(p[:, ROUND] > before + 0.1 * (target - before))]
    assert 0.03 <= onset - started <= 0.12, onset - started
    # And the lips close for an /m/ before its acoustic onset.
    onset_m = 0.4 + 0.2
    segs = _segments([("A:", 0.2), ("m", 0.1), ("A:", 0.2)])
    p = viseme_trajectory(segs, t)
    gap = inner_lip_gap(params_to_landmarks(geometry, p))
    open_gap = gap[np.searchsorted(t, onset_m - 0.1)]
    at_onset = gap[np.searchsorted(t, onset_m)]
    assert at_onset < 0.5 * open_gap  # mostly closed already when the m starts
    after = t >= onset_m - 0.1
    moving = t[after][np.argmax(gap[after] < 0.9 * open_gap)]
    assert 0.02 <= onset_m - moving <= 0.12, onset_m - moving


@needs_espeak
def test_trajectories_are_smooth_on_real_speech(geometry: MouthGeometry) -> None:
    u = synthesize("Bob bought a big map, and Mum made marmalade for me.", "en-us", 200, 50)
    segs = viseme_segments(u.phonemes(), "en-us")
    fine = np.arange(-0.2, u.duration_s + 0.3, 0.001)
    p = viseme_trajectory(segs, fine)
    # Continuous: at 1 ms steps no parameter jumps (a step function would jump by up to 1).
    # Continuous with bounded acceleration: at 1 ms steps a step function would jump by up to
    # 1 in one step; a full closing movement here takes about 40 ms (0.025 per ms at most).
    assert np.abs(np.diff(p, axis=0)).max() < 0.04
    assert np.abs(np.diff(p, n=2, axis=0)).max() < 0.006
    # At 25 fps: no parameter crosses most of its range between two frames.
    frames = viseme_trajectory(segs, (np.arange(int(u.duration_s / 0.04) + 1) + 0.5) * 0.04)
    assert np.abs(np.diff(frames, axis=0)).max() < 0.9
    assert np.abs(np.diff(frames, n=2, axis=0)).max() < 1.5
    assert np.all(np.isfinite(frames))
    lm = params_to_landmarks(geometry, frames)
    step = np.abs(np.diff(lm, axis=0)).max()
    assert step < 0.3 * geometry.face_h  # no landmark jumps across the face between frames


def test_geometry(geometry: MouthGeometry) -> None:
    g = geometry
    neutral = g.neutral
    aa = np.array(VISEMES[VISEME_INDEX["AA"]].target)
    lm = params_to_landmarks(g, aa).astype(np.float64)
    moved = np.abs(lm - neutral).max(axis=1) > 1e-4
    assert not moved[17:48].any()  # brows, nose, eyes untouched
    assert moved[8] and moved[57]
    drop = lm[8, 1] - neutral[8, 1]
    assert drop == pytest.approx(JAW_DROP_H * g.face_h * aa[0], rel=0.05)
    # Hinged at the ears: the jaw moves less the closer to the ear.
    assert abs(lm[0, 1] - neutral[0, 1]) < 0.15 * drop
    assert abs(lm[4, 1] - neutral[4, 1]) < abs(lm[8, 1] - neutral[8, 1])
    assert inner_lip_gap(lm) > inner_lip_gap(neutral) + 0.5 * drop
    # Spread widens the mouth, rounding narrows it.
    width = lambda q: float(np.hypot(*(q[54] - q[48])))  # noqa: E731
    spread = params_to_landmarks(g, np.array([0.0, 1.0, 0, 0, 0]))
    rnd = params_to_landmarks(g, np.array([0.0, 0.0, 1.0, 0, 0]))
    assert width(spread) > 1.15 * width(neutral)
    assert width(rnd) < 0.92 * width(neutral)
    # Lower-lip raise closes the lips (contact, never crossing), even with the jaw a bit open.
    shut = params_to_landmarks(g, np.array([0.1, 0.0, 0.0, 0.0, 1.0]))
    assert inner_lip_gap(shut) < 0.5
    down = (shut[[67, 66, 65]] - shut[[61, 62, 63]]) @ g.v  # along the face's vertical
    assert np.all(down >= -1e-4)
    # Batched and single give the same answer.
    batch = params_to_landmarks(g, np.stack([aa, np.zeros(N_PARAMS)]))
    np.testing.assert_allclose(batch[0], lm, atol=1e-4)
