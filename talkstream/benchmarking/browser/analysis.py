"""What the page recorded, as numbers: onsets, latencies, frame rates, freezes (pure numpy).

Every function here works on plain arrays and dicts (the page's records, the server's trace),
so it is unit-tested on synthetic recordings without a browser; :func:`analyse` is the whole
analysis of one recorded session (:func:`talkstream.benchmarking.browser.harness.record`).

Onsets: levels are RMS of float samples; mouth motion is the page's mean absolute change of the
mouth region between presented frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

NOMINAL_FPS = 25.0
SPEECH_RMS = 0.02  # a level above this is speech
QUIET_RMS = 0.003  # below this is silence
QUIET_BEFORE_ONSET_S = 0.4  # a speech onset needs this much silence before it
MOUTH_QUIET_S = 0.3  # a motion onset needs this much stillness before it
RISE_S = 0.1  # from the end of the quiet stretch to the onset level
MOUTH_MIN_RANGE = 0.05  # typical speech motion minus stillness below this: too small to time
SUSTAIN_S = 0.2  # a motion onset must be followed by this much motion (not a keyframe blip)
# The first second of video is the encoder's quality ramp (large frame-to-frame changes): speech
# onsets that early are not timed, and it does not set the mouth's thresholds.
VIDEO_SETTLE_S = 1.0
MAX_LATENCY_S = 1.5  # a mouth onset later than this after a speech onset is not its answer
BEST_OFFSET_GUESSES = 8  # onsets on each side whose differences are tried as clock offsets
PAIR_TOL_S = 0.2  # onset pairing tolerance for the server-timeline mapping
WORST_WINDOW_S = 5.0


# ----------------------------------------------------------------------------- onsets


def level_curve(x: np.ndarray, rate: int, hop_s: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
    """RMS of 256-sample windows every ``hop_s`` (what the page's analyser records)."""
    hop = max(int(rate * hop_s), 1)
    starts = np.arange(0, max(len(x) - 256, 1), hop)
    rms = np.array([np.sqrt(np.mean(x[s : s + 256] ** 2)) for s in starts], dtype=np.float64)
    return (starts + 256) / rate, rms


def onsets(
    times: np.ndarray, level: np.ndarray, on: float, quiet: float, quiet_s: float
) -> list[float]:
    """Times where ``level`` rises to ``on`` within :data:`RISE_S` of a stretch of at least
    ``quiet_s`` below ``quiet``."""
    out: list[float] = []
    if len(times) < 2:
        return out
    loud = level >= on
    for i in np.flatnonzero(loud[1:] & ~loud[:-1]) + 1:
        t = times[i]
        lo, hi = np.searchsorted(times, [t - RISE_S - quiet_s, t - RISE_S])
        lo = max(lo - 1, 0)  # the sample at or just before the window's start (sparse traces)
        if (
            hi - lo >= 2
            and level[lo:hi].max() < quiet
            and times[hi - 1] - times[lo] >= 0.7 * quiet_s
        ):
            out.append(float(t))
    return out


def pair_up(
    media_on: Sequence[float], browser_on: Sequence[float], guess: float, tol: float
) -> list[tuple[float, float]]:
    """(media onset, browser onset) pairs: each media onset with the browser onset nearest to
    ``media + guess``, within ``tol`` seconds."""
    seen = np.sort(np.asarray(browser_on, dtype=np.float64))
    pairs: list[tuple[float, float]] = []
    if seen.size == 0:
        return pairs
    for m in media_on:
        target = m + guess
        i = int(np.searchsorted(seen, target))
        near = [j for j in (i - 1, i) if 0 <= j < seen.size]
        j = min(near, key=lambda k: abs(seen[k] - target))
        if abs(seen[j] - target) <= tol:
            pairs.append((m, float(seen[j])))
    return pairs


def mouth_thresholds(level: np.ndarray) -> tuple[float, float] | None:
    """(onset threshold, typical motion) of the mouth-change curve, or None when the mouth
    barely moves (speech motion within :data:`MOUTH_MIN_RANGE` of stillness)."""
    if level.size < 10:
        return None
    lo, hi = float(np.percentile(level, 20)), float(np.percentile(level, 90))
    if hi - lo < MOUTH_MIN_RANGE:
        return None
    return lo + 0.3 * (hi - lo), hi


def median3(x: np.ndarray) -> np.ndarray:
    """A centred median of three: removes one-frame blips (an encoder refresh in a still
    picture) and keeps monotonic edges where they are."""
    if x.size < 3:
        return x.copy()
    padded = np.concatenate([x[:1], x, x[-1:]])
    return np.median(np.stack([padded[:-2], padded[1:-1], padded[2:]]), axis=0)


def motion_onsets(times: np.ndarray, level: np.ndarray, thr: float) -> list[float]:
    """Onsets of motion after stillness that last (most frames of the next :data:`SUSTAIN_S`
    move): a keyframe's one-frame blip is not speech."""
    out = []
    for t in onsets(times, level, thr, thr, MOUTH_QUIET_S):
        lo, hi = np.searchsorted(times, [t, t + SUSTAIN_S])
        if hi > lo and np.mean(level[lo:hi] >= thr) >= 0.5:
            out.append(t)
    return out


def match_answers(
    cues: Sequence[float], answers: Sequence[float], max_s: float = MAX_LATENCY_S
) -> list[tuple[float, float]]:
    """Each cue with the first answer in ``[cue - 50 ms, cue + max_s]`` not before the next cue
    (an answer is used once)."""
    pairs: list[tuple[float, float]] = []
    used = -math.inf
    for i, c in enumerate(cues):
        limit = c + max_s
        if i + 1 < len(cues):
            limit = min(limit, cues[i + 1])
        cand = [a for a in answers if c - 0.05 <= a <= limit and a > used]
        if cand:
            pairs.append((c, cand[0]))
            used = cand[0]
    return pairs


def best_offset(
    ref: Sequence[float],
    seen: Sequence[float],
    tol: float,
    lo: float = -math.inf,
    hi: float = math.inf,
) -> tuple[float, int] | None:
    """The clock offset ``seen - ref`` (within [lo, hi]) that pairs the most onsets, as
    (median offset of its pairs, pairs); the first onsets on either side may be missing."""
    best: tuple[int, float, float] | None = None  # (pairs, -spread, offset)
    # The offset is one number: guesses from the first onsets on each side find it.
    for r in ref[:BEST_OFFSET_GUESSES]:
        for s in seen[:BEST_OFFSET_GUESSES]:
            guess = s - r
            if not lo <= guess <= hi:
                continue
            pairs = pair_up(ref, seen, guess, tol)
            diffs = [b - a for a, b in pairs]
            off = float(np.median(diffs))
            key = (len(pairs), -float(np.ptp(diffs)), off)
            if best is None or key[:2] > best[:2]:
                best = key
    return None if best is None else (best[2], best[0])


def distribution_ms(values_s: Sequence[float]) -> dict[str, Any] | None:
    """p50/p90/min/max in ms of a list of seconds, or None when empty."""
    if not values_s:
        return None
    v = 1000 * np.asarray(values_s, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(v, 50)), 1),
        "p90": round(float(np.percentile(v, 90)), 1),
        "min": round(float(v.min()), 1),
        "max": round(float(v.max()), 1),
        "n": int(v.size),
        "values": [round(float(x), 1) for x in v],
    }


def rounded(x: float | None, digits: int = 2) -> float | None:
    """``x`` rounded, or None when it is None or not finite (JSON has no NaN)."""
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


# ----------------------------------------------------------------------------- analysis


# ----------------------------------------------------------------------------- analysis


def frame_rate(times_s: np.ndarray) -> float | None:
    """Frames per second over a list of frame times."""
    if times_s.size < 2 or times_s[-1] <= times_s[0]:
        return None
    return float((times_s.size - 1) / (times_s[-1] - times_s[0]))


def worst_window_rate(times_s: np.ndarray, t0: float, t1: float, win: float) -> float | None:
    """The lowest frame count per second over windows of ``win`` seconds in [t0, t1]."""
    if times_s.size < 2:
        return None
    if t1 - t0 <= win:
        return frame_rate(times_s)
    rates = []
    for s in np.arange(t0, t1 - win + 1e-9, 0.5):
        n = np.count_nonzero((times_s >= s) & (times_s < s + win))
        rates.append(n / win)
    return float(min(rates))


def counter_rates(
    snaps: Sequence[dict[str, Any]], key: str, win: float
) -> tuple[float | None, float | None]:
    """(mean rate, worst rate over ``win`` s) of a cumulative video counter in the polls."""
    pts = [
        (s["now"] / 1000, float(s["video"][key]))
        for s in snaps
        if s.get("video") and s["video"].get(key) is not None
    ]
    if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
        return None, None
    mean = (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])
    worst: float | None = None
    for i, (ti, vi) in enumerate(pts):
        later = [(t, v) for t, v in pts[i + 1 :] if t - ti >= win - 0.05]
        if later:
            t, v = later[0]
            r = (v - vi) / (t - ti)
            worst = r if worst is None else min(worst, r)
    return mean, mean if worst is None else worst


def _delta(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if not a or not b or a.get(key) is None or b.get(key) is None:
        return None
    return float(b[key]) - float(a[key])


def _ratio_ms(num: float | None, den: float | None) -> float | None:
    if num is None or not den:
        return None
    return 1000 * num / den


def analyse(raw: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's numbers from what the page recorded (``harness.record``'s dict); pure."""
    t0, t1 = raw["window_ms"][0] / 1000, raw["window_ms"][1] / 1000
    notes: list[str] = []
    presented = np.asarray(raw["presented"], dtype=np.float64) / 1000
    win = presented[(presented >= t0) & (presented <= t1)]
    polls = [s for s in raw["polls"] if t0 - 0.5 <= s["now"] / 1000 <= t1 + 0.5]
    first, last = (polls[0], polls[-1]) if polls else ({}, {})
    v0, v1 = first.get("video"), last.get("video")

    decoded_mean, decoded_worst = counter_rates(polls, "framesDecoded", WORST_WINDOW_S)
    received_mean, _ = counter_rates(polls, "framesReceived", WORST_WINDOW_S)
    fps = {
        "nominal": NOMINAL_FPS,
        "presented_mean": rounded(frame_rate(win)),
        "presented_worst_5s": rounded(worst_window_rate(win, t0, t1, WORST_WINDOW_S)),
        "decoded_mean": rounded(decoded_mean),
        "decoded_worst_5s": rounded(decoded_worst),
        "received_mean": rounded(received_mean),
    }

    gaps = np.diff(win)
    frames: dict[str, Any] = {"presented": int(win.size)}
    if gaps.size:
        med = float(np.median(gaps))
        freeze = max(3 * med, med + 0.150)
        frozen = gaps[gaps > freeze]
        frames.update(
            median_interval_ms=rounded(1000 * med, 1),
            freeze_threshold_ms=rounded(1000 * freeze, 1),
            freezes=int(frozen.size),
            frozen_s=rounded(float(frozen.sum()), 3),
            longest_gap_ms=rounded(1000 * float(gaps.max()), 1),
        )
    for key, name in (
        ("framesReceived", "received"),
        ("framesDecoded", "decoded"),
        ("framesDropped", "dropped_by_decoder"),
        ("freezeCount", "chromium_freezes"),
        ("totalFreezesDuration", "chromium_frozen_s"),
        ("packetsLost", "packets_lost"),
        ("nackCount", "nacks"),
        ("pliCount", "plis"),
        ("keyFramesDecoded", "keyframes_decoded"),
    ):
        d = _delta(v0, v1, key)
        frames[name] = None if d is None else (round(d, 3) if key.startswith("total") else int(d))

    dec_time = _delta(v0, v1, "totalDecodeTime")
    client = {
        "rtt_ms": rounded(last.get("rttMs"), 2),
        "video_jitter_buffer_ms": rounded(
            _ratio_ms(
                _delta(v0, v1, "jitterBufferDelay"), _delta(v0, v1, "jitterBufferEmittedCount")
            )
        ),
        "audio_jitter_buffer_ms": rounded(
            _ratio_ms(
                _delta(first.get("audio"), last.get("audio"), "jitterBufferDelay"),
                _delta(first.get("audio"), last.get("audio"), "jitterBufferEmittedCount"),
            )
        ),
        "decode_ms": rounded(_ratio_ms(dec_time, _delta(v0, v1, "framesDecoded"))),
        "frame_size": [v1.get("frameWidth"), v1.get("frameHeight")] if v1 else None,
    }

    # Latency: speech onsets at the microphone -> the first mouth (voice) onset after each.
    probe = raw["probe"]
    mic = np.asarray(probe.get("mic") or np.zeros((0, 2)), dtype=np.float64).reshape(-1, 2)
    voice = np.asarray(probe.get("voice") or np.zeros((0, 2)), dtype=np.float64).reshape(-1, 2)
    mouth = np.asarray(probe.get("mouth") or np.zeros((0, 3)), dtype=np.float64).reshape(-1, 3)
    mic_on = onsets(mic[:, 0] / 1000, mic[:, 1], SPEECH_RMS, QUIET_RMS, QUIET_BEFORE_ONSET_S)
    cues = [m for m in mic_on if t0 + VIDEO_SETTLE_S <= m <= t1]
    voice_on = onsets(voice[:, 0] / 1000, voice[:, 1], SPEECH_RMS, QUIET_RMS, QUIET_BEFORE_ONSET_S)
    settled = mouth[mouth[:, 0] / 1000 >= t0 + VIDEO_SETTLE_S]
    settled[:, 1] = median3(settled[:, 1])
    thresholds = mouth_thresholds(settled[:, 1])
    mouth_on: list[float] = []
    if thresholds is None:
        notes.append(
            "the mouth region barely changes in the decoded video: no mouth onsets to time "
            "(a model with random weights, or idle motion off and no speech reaching the server)"
        )
    else:
        mouth_on = motion_onsets(settled[:, 0] / 1000, settled[:, 1], thresholds[0])
    if not cues:
        notes.append(
            "no speech onset at the microphone inside the measured window after its first "
            f"{VIDEO_SETTLE_S:g} s (is it longer than one loop of the WAV?)"
        )
    mouth_pairs = match_answers(cues, mouth_on)
    voice_pairs = match_answers(cues, voice_on)
    latency = {
        "bursts_at_mic": len(cues),
        "matched": len(mouth_pairs),
        "mic_to_mouth_ms": distribution_ms([b - a for a, b in mouth_pairs]),
        "voice_matched": len(voice_pairs),
        "mic_to_voice_ms": distribution_ms([b - a for a, b in voice_pairs]),
        "mouth_threshold": rounded(thresholds[0], 3) if thresholds else None,
        "mouth_typical_motion": rounded(thresholds[1], 3) if thresholds else None,
    }
    av = [mp[1] - vp[1] for mp in mouth_pairs for vp in voice_pairs if mp[0] == vp[0]]
    latency["av_offset_ms"] = distribution_ms(av)  # mouth onset minus voice onset (+: video late)

    server = server_breakdown(raw, mic_on, mouth_on, mouth_pairs, client, notes)
    return {
        "fps": fps,
        "frames": frames,
        "latency": latency,
        "client": client,
        "server_side": server,
        "notes": notes,
    }


def server_breakdown(
    raw: dict[str, Any],
    mic_on: Sequence[float],
    mouth_on: Sequence[float],
    mouth_pairs: Sequence[tuple[float, float]],
    client: dict[str, Any],
    notes: list[str],
) -> dict[str, Any] | None:
    """The server's share, from its trace (media time) and stats, when it serves them.

    Speech onsets of the trace's input map the microphone to media time, onsets of its landmark
    motion map the video: their difference is the time from the microphone capturing an
    instant to the display of that instant's frame; the model's motion onset relative to the
    speech onset (in media time) is what it adds or takes away (anticipation in the lookahead).
    """
    trace, stats = raw.get("trace"), raw.get("stats")
    if not isinstance(trace, dict):
        return None
    out: dict[str, Any] = {}
    budget = trace.get("budget_s") or {}
    out["budget_ms"] = {
        k.removesuffix("_s"): rounded(1000 * float(v), 1) for k, v in budget.items()
    }
    if isinstance(stats, dict):
        out["stats"] = {
            k: stats.get(k)
            for k in (
                "frames_rendered",
                "frames_skipped",
                "frames_repeated",
                "display_fps",
                "render_ms",
                "slack_ms",
                "speech_s",
                "silence_filled_s",
                "clock_slew_ms",
            )
        }
    try:
        inp = np.asarray(trace["input"], dtype=np.float64).reshape(-1, 2)
        mot = np.asarray(trace["motion"], dtype=np.float64).reshape(-1, 2)
    except (KeyError, TypeError, ValueError):
        notes.append("the server's trace has no input/motion series: no server-side split")
        return out
    speech_media = onsets(inp[:, 0], inp[:, 1], SPEECH_RMS, QUIET_RMS, QUIET_BEFORE_ONSET_S)
    motion_media: list[float] = []
    if mot.size:
        # The first frames where the landmark motion reaches 30 % of its typical speech level.
        thr_m = 0.3 * float(np.percentile(mot[:, 1], 90))
        if thr_m > 0:
            motion_media = onsets(mot[:, 0], mot[:, 1], thr_m, thr_m, MOUTH_QUIET_S)
    lead = []
    for s in speech_media:
        near = [m for m in motion_media if -0.5 <= m - s <= 0.5]
        if near:
            lead.append(min(near, key=lambda m: abs(m - s)) - s)
    out["motion_onset_vs_speech_ms"] = distribution_ms(lead)  # negative: the model anticipates
    mic_map = best_offset(speech_media, mic_on, PAIR_TOL_S)
    if mic_map is None:
        notes.append("no speech onset of the server's trace matched the microphone's")
        return out
    # The video's mapping: after the microphone's (causal), within MAX_LATENCY_S.
    l_mic, n_mic = mic_map
    mouth_map = best_offset(motion_media, mouth_on, PAIR_TOL_S, l_mic, l_mic + MAX_LATENCY_S + 0.5)
    out["mapped_bursts"] = {"mic": n_mic, "video": mouth_map[1] if mouth_map else 0}
    if mouth_map is None:
        notes.append("no motion onset of the server's trace matched the video's")
        return out
    frame_ms = 1000 * (mouth_map[0] - l_mic)
    out["mic_to_frame_ms"] = rounded(frame_ms, 1)  # capture of an instant -> display of its frame
    total = budget.get("total_s")
    terms = [
        1000 * float(total) if total is not None else None,
        (client["rtt_ms"] / 2) if client.get("rtt_ms") is not None else None,
        client.get("video_jitter_buffer_ms"),
        client.get("decode_ms"),
    ]
    if all(t is not None for t in terms):
        out["network_half_rtt_ms"] = rounded(terms[1], 2)
        out["unaccounted_ms"] = rounded(frame_ms - sum(float(t) for t in terms if t is not None), 1)
    if mouth_pairs and lead:
        direct = float(np.median([b - a for a, b in mouth_pairs]))
        out["direct_minus_frame_ms"] = rounded(1000 * direct - frame_ms, 1)
    return out


# ----------------------------------------------------------------------------- the browser
