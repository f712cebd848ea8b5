"""The browser benchmark's parts without a browser: signal analysis on synthetic curves, the fake
microphone's WAV, the shipped page scripts, and the shared local server."""

from __future__ import annotations

import fnmatch
import json
import shutil
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from talkstream.benchmarking.browser import analysis, harness, speech
from talkstream.benchmarking.browser.analysis import (
    best_offset,
    counter_rates,
    level_curve,
    match_answers,
    median3,
    motion_onsets,
    onsets,
    worst_window_rate,
)
from talkstream.errors import TalkstreamError

ROOT = Path(__file__).resolve().parents[1]


def steps(times: np.ndarray, on: list[tuple[float, float]], high: float, low: float) -> np.ndarray:
    """``high`` inside each (start, end) interval, ``low`` elsewhere."""
    level = np.full(times.shape, low)
    for a, b in on:
        level[(times >= a) & (times < b)] = high
    return level


def test_onsets_need_quiet_before_them() -> None:
    t = np.arange(0.0, 6.0, 0.005)
    # A burst at 1 s after silence, a second at 1.3 s with too little quiet before it, a third
    # at 4 s after silence.
    level = steps(t, [(1.0, 1.2), (1.3, 2.0), (4.0, 4.5)], 0.1, 0.0005)
    got = onsets(t, level, analysis.SPEECH_RMS, analysis.QUIET_RMS, analysis.QUIET_BEFORE_ONSET_S)
    assert np.allclose(got, [1.0, 4.0], atol=0.006), got
    assert onsets(t[:1], level[:1], 0.02, 0.003, 0.4) == []


def test_a_one_frame_blip_is_not_mouth_motion() -> None:
    t = np.arange(0.0, 8.0, 0.04)  # 25 fps
    level = steps(t, [(2.0, 2.04), (5.0, 6.0)], 1.0, 0.01)  # a keyframe blip, then speech
    smooth = median3(level)
    assert smooth[np.searchsorted(t, 2.0)] < 0.5  # the blip is gone
    assert motion_onsets(t, smooth, 0.3) == pytest.approx([5.0], abs=0.041)
    # Unsmoothed, the blip has no sustained motion after it: still not an onset.
    assert motion_onsets(t, level, 0.3) == pytest.approx([5.0], abs=0.041)


def test_answers_are_matched_once_and_not_past_the_next_cue() -> None:
    cues = [1.0, 3.0, 5.0]
    answers = [1.25, 1.3, 5.9, 7.0]
    # 3.0 has no answer before 5.0; 5.0 takes 5.9 (within 1.5 s); 1.3 is never reused.
    assert match_answers(cues, answers) == [(1.0, 1.25), (5.0, 5.9)]
    assert match_answers(cues, answers, max_s=0.5) == [(1.0, 1.25)]


def test_best_offset_finds_the_clock_shift_despite_missing_onsets() -> None:
    ref = [1.0, 2.7, 5.1, 6.0, 8.4]
    seen = [r + 12.5 + d for r, d in zip(ref, [0.01, -0.02, 0.0, 0.02, -0.01], strict=True)]
    got = best_offset(ref, seen[1:], tol=0.2)  # the first onset on the seen side is missing
    assert got is not None
    off, pairs = got
    assert pairs == 4 and abs(off - 12.5) < 0.02, got
    assert best_offset(ref, seen, tol=0.2, lo=20.0) is None  # outside the allowed range


def test_frame_rates() -> None:
    frames = np.concatenate([np.arange(0.0, 5.0, 0.04), np.arange(6.0, 10.0, 0.04)])  # 1 s gap
    assert worst_window_rate(frames, 0.0, 10.0, 5.0) == pytest.approx(20.0, abs=0.3)
    polls: list[dict[str, Any]] = [
        {"now": 1000.0 * s, "video": {"framesDecoded": 25.0 * min(s, 4) + 10.0 * max(s - 4, 0)}}
        for s in range(0, 11)
    ]
    mean, worst = counter_rates(polls, "framesDecoded", 5.0)
    assert mean == pytest.approx((100 + 60) / 10)
    assert worst == pytest.approx(10.0)


def test_level_curve_is_the_rms_the_page_records() -> None:
    rate = 16000
    x = np.concatenate([np.zeros(rate), 0.5 * np.ones(rate)]).astype(np.float32)
    t, rms = level_curve(x, rate)
    assert rms[t < 0.9].max() == 0.0
    assert rms[t > 1.1] == pytest.approx(0.5)
    assert np.all(np.diff(t) == pytest.approx(0.005))


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_fake_microphone_wav_has_its_bursts(tmp_path: Path) -> None:
    path, info = speech.prepare_mic_wav(None, tmp_path)
    assert path == tmp_path / "speech.wav" and info["phrases"] == list(speech.PHRASES)
    on = info["onsets_in_loop_s"]
    assert len(on) == len(speech.PHRASES), info  # one onset per phrase, in one loop
    assert on[0] == pytest.approx(speech.LEAD_S, abs=0.1), info
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(16000, np.float32), 16000)
    with pytest.raises(TalkstreamError, match="no speech burst"):
        speech.prepare_mic_wav(silent, tmp_path)


def test_page_scripts_are_shipped_as_package_data() -> None:
    js = sorted((ROOT / "talkstream/benchmarking/browser/js").glob("*.js"))
    assert {p.stem for p in js} >= {"init", "poll", "fetch_json", "guess_mouth_box"}
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["talkstream"]
    for p in js:
        rel = p.relative_to(ROOT / "talkstream").as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not in package-data"
    # Loaded without their leading comments: the poll script is a function of one argument.
    assert harness.POLL_JS.startswith("async (last) =>")
    assert "RTCPeerConnection" in harness.INIT_JS and not harness.INIT_JS.startswith("//")


def test_serve_in_background_serves_and_stops(tiny_engine: Any, default_avatar: Any) -> None:
    pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")
    from talkstream.benchmarking.local import serve_in_background

    with serve_in_background(tiny_engine, default_avatar, max_sessions=3) as url:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            health = json.loads(r.read())
        assert health["max_sessions"] == 3 and health["sessions"] == 0, health
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=2)
