"""libespeak-ng through ctypes: PCM, timed phoneme events, voices, errors."""

from __future__ import annotations

import ctypes.util
import itertools
import threading

import numpy as np
import pytest

from talkstream.errors import TalkstreamError
from talkstream.training import espeak
from talkstream.training.espeak import EspeakError, espeak_available, synthesize

pytestmark = pytest.mark.skipif(
    not espeak_available(), reason="libespeak-ng is not installed (Debian: libespeak-ng1)"
)


def _rms_track(pcm: np.ndarray, sr: int, win_s: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Short-time RMS (times of window centres, values)."""
    n = int(sr * win_s)
    k = len(pcm) // n
    x = pcm[: k * n].astype(np.float64).reshape(k, n)
    return (np.arange(k) + 0.5) * win_s, np.sqrt((x**2).mean(axis=1))


def test_events_are_ordered_and_inside_the_audio() -> None:
    u = synthesize("The quick brown fox jumps over the lazy dog.", "en-us", 175, 50)
    assert u.sample_rate == 22050
    assert u.pcm.dtype == np.int16 and u.pcm.ndim == 1
    assert 1.5 < u.duration_s < 5.0
    samples = [e.sample for e in u.events]
    assert samples == sorted(samples)
    assert all(0 <= s <= len(u.pcm) for s in samples)
    ph = u.phonemes()
    assert len(ph) >= 25
    starts = [p.start_s for p in ph]
    assert all(b > a for a, b in itertools.pairwise(starts))
    assert all(p.end_s > p.start_s for p in ph)
    assert ph[-1].end_s == pytest.approx(u.duration_s)
    kinds = {e.kind for e in u.events}
    assert {"phoneme", "word", "sentence", "end"} <= kinds
    words = [w for w, _ in u.words()]
    assert words[:3] == ["The", "quick", "brown"] and words[-1] == "dog"


def test_bilabial_closures_fall_on_energy_dips() -> None:
    # Each /m/ of "mama" is a lip closure: the voice goes on through the nose, much quieter
    # than the open vowels around it. The event timing must put the m's on those dips.
    u = synthesize("mama mama mama", "en-us", 130, 50)
    ph = u.phonemes()
    names = [p.name for p in ph]
    assert names.count("m") >= 6, names
    t, rms = _rms_track(u.pcm, u.sample_rate)
    checked = 0
    for i, p in enumerate(ph):
        if p.name != "m" or i == 0 or i + 1 >= len(ph):
            continue
        prev, nxt = ph[i - 1], ph[i + 1]
        if prev.name.startswith("_") or nxt.name.startswith("_"):
            continue
        # Where is the quietest point between the two vowel centres?
        sel = (t > prev.centre_s) & (t < nxt.centre_s)
        t_min = t[sel][np.argmin(rms[sel])]
        assert p.start_s - 0.02 <= t_min <= p.end_s + 0.02, (p, t_min)
        # The dip is deep: the quietest point of the m is well below the loudest of the
        # neighbouring vowels.
        in_m = rms[(t >= p.start_s - 0.02) & (t < p.end_s + 0.02)].min()
        in_vowels = rms[(t >= prev.start_s) & (t < nxt.end_s)].max()
        assert in_m < 0.5 * in_vowels
        checked += 1
    assert checked >= 3


def _f0(pcm: np.ndarray, sr: int) -> float:
    """Median pitch of voiced 40 ms windows by autocorrelation (60-400 Hz)."""
    n = int(0.04 * sr)
    out = []
    x = pcm.astype(np.float64)
    for s in range(0, len(x) - n, n):
        w = x[s : s + n] - x[s : s + n].mean()
        if np.sqrt((w**2).mean()) < 0.1 * np.abs(x).max() / 3:
            continue
        ac = np.correlate(w, w, "full")[n - 1 :]
        lo, hi = sr // 400, sr // 60
        lag = lo + int(np.argmax(ac[lo:hi]))
        out.append(sr / lag)
    return float(np.median(out))


def test_voice_language_and_pitch_change_the_audio() -> None:
    text = "Hello, this is a test of the voices."
    base = synthesize(text, "en-us", 175, 50)
    variant = synthesize(text, "en-us+f3", 175, 50)
    german = synthesize(text, "de", 175, 50)
    for other in (variant, german):
        assert len(other.pcm) != len(base.pcm) or not np.array_equal(other.pcm, base.pcm)
    # A different language reads the same letters with other phonemes.
    assert [p.name for p in german.phonemes()] != [p.name for p in base.phonemes()]
    low = synthesize(text, "en-us", 175, 10)
    high = synthesize(text, "en-us", 175, 90)
    assert _f0(high.pcm, high.sample_rate) > 1.2 * _f0(low.pcm, low.sample_rate)
    fast = synthesize(text, "en-us", 300, 50)
    assert fast.duration_s < 0.75 * base.duration_s


def test_fresh_process_is_reproducible() -> None:
    # In one process espeak's hidden state (pitch-flutter phase...) carries over between
    # calls; a fresh child process gives the same samples and events whatever came before.
    text = "Peter picked a peck of pickled peppers."
    first = synthesize(text, "en-us+f2", 180, 40, fresh_process=True)
    synthesize("Something else first, to disturb the state.", "de", 120, 70)
    again = synthesize(text, "en-us+f2", 180, 40, fresh_process=True)
    assert np.array_equal(first.pcm, again.pcm)
    assert first.events == again.events
    inproc = synthesize(text, "en-us+f2", 180, 40)
    # Same phonemes and nearly the same timing in-process (a few samples of jitter).
    a = [(e.phoneme, e.sample) for e in first.events if e.kind == "phoneme"]
    b = [(e.phoneme, e.sample) for e in inproc.events if e.kind == "phoneme"]
    assert [n for n, _ in a] == [n for n, _ in b]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)) < 0.005 * 22050
    with pytest.raises(EspeakError, match="no voice"):
        synthesize("hello", "xx-nonexistent", fresh_process=True)


def test_errors() -> None:
    with pytest.raises(EspeakError, match="no voice") as e:
        synthesize("hello", "xx-nonexistent")
    assert isinstance(e.value, TalkstreamError)
    with pytest.raises(ValueError, match="rate_wpm"):
        synthesize("hello", "en-us", rate_wpm=20)
    with pytest.raises(ValueError, match="pitch"):
        synthesize("hello", "en-us", pitch=101)
    with pytest.raises(ValueError, match="non-empty"):
        synthesize("   ")
    # The library still works after the errors.
    assert len(synthesize("hello").pcm) > 0


def test_missing_library_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(espeak, "_LIB_NAMES", ("libespeak-ng-does-not-exist.so.9",))
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(EspeakError, match="libespeak-ng1") as e:
        espeak._load_library()
    assert isinstance(e.value, TalkstreamError)


def test_concurrent_calls_are_serialised() -> None:
    texts = ["One two three four.", "Five six seven eight.", "Nine ten eleven."]
    expected = [synthesize(t, "en-us", 180, 50) for t in texts]
    got: dict[int, espeak.Utterance] = {}

    def work(i: int) -> None:
        got[i] = synthesize(texts[i], "en-us", 180, 50)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i, ref in enumerate(expected):
        # Not interleaved: each call got its own words and audio of its own length.
        assert got[i].words() == [(w, pytest.approx(t, abs=0.01)) for w, t in ref.words()]
        assert [p.name for p in got[i].phonemes()] == [p.name for p in ref.phonemes()]
