"""Browser glass-to-glass benchmark: ``talkstream bench --browser URL``.

Headless Chromium (driven by playwright) opens the talkstream web client at ``URL`` with
``?probe=1`` and presses *Start*. Its fake microphone loops a WAV of speech bursts separated by
silence (espeak-ng phrases, written into the output folder, or a WAV of your own). The page
records, on one clock (``performance.now()``): the level of its microphone and of the avatar's
voice every 5 ms, the change of the mouth region in every presented video frame, and the
presentation time of every frame. From those alone the benchmark computes

- presented, decoded and received frames per second (mean, and the worst 5 s);
- mic-to-mouth latency: from each speech onset at the microphone (its level rising above
  0.02 RMS after 0.4 s below 0.003) to the first onset of mouth motion after it in the decoded
  video (the mouth region's change, one-frame blips filtered out, rising 30 % of the way from
  stillness to typical speech motion after 0.3 s of stillness, and staying there); p50/p90
  over the bursts, and how many matched. Speech in the video's first second (the encoder's
  quality ramp) is not timed. The avatar's voice is timed the same way (mic-to-voice). The
  model's own anticipation is part of it: a lookahead lets the mouth open slightly before
  the sound it shapes;
- frames dropped by the decoder, freezes (gaps between presented frames longer than
  ``max(3 x median, median + 150 ms)``, Chromium's own definition), lost packets.

When the server is talkstream and serves ``/sessions/{id}/trace`` and ``/stats``, the server's
own timeline splits the latency: speech and motion onsets in media time map the microphone and
the video to it, giving the delay from the microphone capturing an instant to the display of
that instant's frame, and how early the model moves the mouth around a speech onset; beside
them, the server's declared budget (lookahead, jitter, compute), its measured render time and
skipped or repeated frames, and the receiver's RTT, jitter buffer and decode time.

``URL`` may also be ``local``: the harness then starts a talkstream server in this process on
127.0.0.1 (idle motion off; random weights get a landmark gain so mouth motion survives VP8,
see :func:`local_engine`).

Needs the Python package ``playwright`` and a Chromium binary (``/usr/bin/chromium``, another
``chromium``/``google-chrome`` on ``PATH``, or ``$TALKSTREAM_CHROMIUM``); ``playwright install``
is never needed. Generating the speech needs ``espeak-ng`` unless a WAV is given.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from talkstream.errors import TalkstreamError

if TYPE_CHECKING:
    from talkstream.config import EngineConfig
    from talkstream.engine.avatar import Avatar
    from talkstream.engine.pipeline import Engine

log = logging.getLogger("talkstream.bench.browser")

SCHEMA = "talkstream-browser-bench/1"
LOCAL = "local"  # the URL that asks for a server started in this process
DEFAULT_DURATION_S = 20.0
NOMINAL_FPS = 25.0

CHROMIUM_ENV = "TALKSTREAM_CHROMIUM"
CHROMIUM_DEFAULT = "/usr/bin/chromium"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Fake media devices with no permission prompt, autoplay, and loopback ICE candidates allowed
# (a server on the same machine); no GPU, no background traffic.
CHROMIUM_FLAGS = [
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-loopback-in-peer-connection",
]

# The fake microphone's loop: each phrase, then silence. Two phrases of different lengths make
# the pattern aperiodic within a loop, so bursts cannot be matched one burst off.
PHRASES = ("hello there", "how are you doing today")
LEAD_S = 0.5
GAP_S = 1.6

# Onsets (levels are RMS of float samples; mouth motion is the page's mean absolute change).
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
TAIL_S = MAX_LATENCY_S  # recorded after the measured window, for the last bursts' answers
BEST_OFFSET_GUESSES = 8  # onsets on each side whose differences are tried as clock offsets
PAIR_TOL_S = 0.2  # onset pairing tolerance for the server-timeline mapping
WORST_WINDOW_S = 5.0

CONNECT_TIMEOUT_S = 30.0
FIRST_FRAME_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 5.0
LANDMARK_GAIN = 30.0

# Before the page's scripts: keep every RTCPeerConnection, to read its getStats() later.
INIT_JS = """
(() => {
  const Orig = window.RTCPeerConnection;
  if (!Orig || window.__tsbench) return;
  const pcs = [];
  window.__tsbench = { pcs };
  const Wrapped = function (...args) {
    const pc = new Orig(...args);
    pcs.push(pc);
    return pc;
  };
  Wrapped.prototype = Orig.prototype;
  Object.setPrototypeOf(Wrapped, Orig);
  window.RTCPeerConnection = Wrapped;
})();
"""

# One poll: the page's state, new presented frames, and the inbound RTP statistics.
POLL_JS = """
async (last) => {
  const ts = window.talkstream || {};
  const pcs = (window.__tsbench && window.__tsbench.pcs) || [];
  const pc = pcs[pcs.length - 1];
  const snap = {
    now: performance.now(),
    state: ts.state || null,
    error: ts.error || null,
    presented: (ts.presented || []).filter((t) => t > last),
    video: null,
    audio: null,
    rttMs: null,
  };
  const keep = [
    "framesReceived", "framesDecoded", "framesDropped", "keyFramesDecoded", "freezeCount",
    "totalFreezesDuration", "pauseCount", "totalPausesDuration", "jitterBufferDelay",
    "jitterBufferEmittedCount", "totalDecodeTime", "packetsReceived", "packetsLost",
    "nackCount", "pliCount", "frameWidth", "frameHeight", "concealedSamples",
    "totalSamplesReceived",
  ];
  if (pc && pc.connectionState !== "closed") {
    for (const r of (await pc.getStats()).values()) {
      if (r.type === "inbound-rtp" && (r.kind === "video" || r.kind === "audio")) {
        const o = {};
        for (const k of keep) if (r[k] !== undefined) o[k] = r[k];
        snap[r.kind] = o;
      } else if (r.type === "candidate-pair" && r.nominated
                 && r.currentRoundTripTime !== undefined) {
        snap.rttMs = 1000 * r.currentRoundTripTime;
      }
    }
  }
  return snap;
}
"""

FETCH_JSON_JS = """
async (path) => {
  try {
    const r = await fetch(path, { cache: "no-store" });
    return { status: r.status, body: r.ok ? await r.json() : null };
  } catch (e) {
    return { status: 0, body: null };
  }
}
"""


# ----------------------------------------------------------------------------- prerequisites


def find_chromium() -> str | None:
    """A Chromium or Chrome binary: ``$TALKSTREAM_CHROMIUM``, Debian's, or one on ``PATH``."""
    env = os.environ.get(CHROMIUM_ENV)
    if env:
        return env if Path(env).is_file() else None
    if Path(CHROMIUM_DEFAULT).is_file():
        return CHROMIUM_DEFAULT
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def check_browser_tools() -> str:
    """The Chromium binary to drive; :class:`TalkstreamError` naming what to install."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        raise TalkstreamError(
            "the browser benchmark needs the Python package 'playwright' (it drives the "
            "system Chromium; no browser download): pip install playwright"
        ) from None
    chromium = find_chromium()
    if chromium is None:
        where = os.environ.get(CHROMIUM_ENV)
        if where:
            raise TalkstreamError(f"${CHROMIUM_ENV} is {where!r}, which is not a file")
        raise TalkstreamError(
            "the browser benchmark needs Chromium: apt-get install chromium (or set "
            f"${CHROMIUM_ENV} to a Chromium or Chrome binary)"
        )
    return chromium


def client_urls(url: str) -> tuple[str, str]:
    """``(base, page)``: the server's origin and the web client with the probe on."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TalkstreamError(f"--browser needs an http(s) URL of a talkstream server, got {url!r}")
    query = urllib.parse.parse_qs(parts.query)
    if "presenter" in query:
        raise TalkstreamError(
            "a presenter page has no microphone: point --browser at the live client "
            "(the server's root URL)"
        )
    base = f"{parts.scheme}://{parts.netloc}"
    return base, f"{base}/?probe=1"


def _get(url: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"User-Agent": "talkstream-bench"})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), b""


def check_server(base: str) -> dict[str, Any] | None:
    """Is a talkstream web client served at ``base``? Returns ``/health`` when it answers."""
    try:
        status, body = _get(base + "/")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TalkstreamError(
            f"cannot reach {base}/: {reason}. Is a talkstream server running there "
            "(talkstream serve), or use --browser local to start one"
        ) from None
    if status != 200 or b"talkstream" not in body or b'id="start"' not in body:
        raise TalkstreamError(
            f"{base}/ does not serve the talkstream web client (HTTP {status}); "
            "point --browser at the address `talkstream serve` prints"
        )
    try:
        status, body = _get(base + "/health")
        health = json.loads(body) if status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        health = None
    if isinstance(health, dict) and health.get("accepting") is False:
        raise TalkstreamError(
            f"the server at {base} is full ({health.get('sessions')} sessions of "
            f"{health.get('max_sessions')}): try again later"
        )
    return health if isinstance(health, dict) else None


# ----------------------------------------------------------------------------- the fake mic


def level_curve(x: np.ndarray, rate: int, hop_s: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
    """RMS of 256-sample windows every ``hop_s`` (what the page's analyser records)."""
    hop = max(int(rate * hop_s), 1)
    starts = np.arange(0, max(len(x) - 256, 1), hop)
    rms = np.array([np.sqrt(np.mean(x[s : s + 256] ** 2)) for s in starts], dtype=np.float64)
    return (starts + 256) / rate, rms


def make_speech_wav(out_dir: Path) -> Path:
    """Espeak-ng phrases and silences (:data:`PHRASES`, :data:`GAP_S`) as ``speech.wav``."""
    import soundfile

    if shutil.which("espeak-ng") is None:
        raise TalkstreamError(
            "generating the fake microphone's speech needs espeak-ng: apt-get install "
            "espeak-ng (or pass a WAV of speech bursts separated by silence)"
        )
    parts: list[np.ndarray] = []
    rate = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, phrase in enumerate(PHRASES):
            raw = Path(tmp) / f"phrase{i}.wav"
            subprocess.run(["espeak-ng", "-w", str(raw), phrase], check=True, capture_output=True)
            x, r = soundfile.read(raw, dtype="float32", always_2d=True)
            rate = r
            parts.append(x.mean(axis=1))
    gap = np.zeros(int(GAP_S * rate), np.float32)
    seq: list[np.ndarray] = [np.zeros(int(LEAD_S * rate), np.float32)]
    for p in parts:
        seq += [p, gap]
    out = out_dir / "speech.wav"
    soundfile.write(out, np.concatenate(seq), rate, subtype="PCM_16")
    return out


def prepare_mic_wav(speech_wav: Path | None, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The WAV the fake microphone loops (16-bit mono, in ``out_dir``) and its burst pattern."""
    import soundfile

    if speech_wav is None:
        path = make_speech_wav(out_dir)
    else:
        try:
            x, rate = soundfile.read(speech_wav, dtype="float32", always_2d=True)
        except (OSError, RuntimeError) as e:  # soundfile raises LibsndfileError (RuntimeError)
            raise TalkstreamError(f"cannot read the speech WAV {speech_wav}: {e}") from None
        path = out_dir / "speech.wav"
        soundfile.write(path, x.mean(axis=1), rate, subtype="PCM_16")
    x, rate = soundfile.read(path, dtype="float32")
    loop_s = len(x) / rate
    # The fake device loops the file: its second pass has the end's silence before its start.
    t, rms = level_curve(np.concatenate([x, x]), rate)
    loop_on = [
        round(v - loop_s, 3)
        for v in onsets(t, rms, SPEECH_RMS, QUIET_RMS, QUIET_BEFORE_ONSET_S)
        if loop_s <= v < 2 * loop_s
    ]
    if not loop_on:
        raise TalkstreamError(
            f"{speech_wav or path}: no speech burst found (the level must rise above "
            f"{SPEECH_RMS} RMS after at least {QUIET_BEFORE_ONSET_S} s below {QUIET_RMS})"
        )
    return path, {
        "path": str(path),
        "phrases": list(PHRASES) if speech_wav is None else None,
        "loop_s": round(loop_s, 3),
        "onsets_in_loop_s": loop_on,
    }


# ----------------------------------------------------------------------------- onsets


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


def _dist(values_s: Sequence[float]) -> dict[str, Any] | None:
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


def _r(x: float | None, digits: int = 2) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


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
    """The benchmark's numbers from what the page recorded (:func:`record`'s dict); pure."""
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
        "presented_mean": _r(frame_rate(win)),
        "presented_worst_5s": _r(worst_window_rate(win, t0, t1, WORST_WINDOW_S)),
        "decoded_mean": _r(decoded_mean),
        "decoded_worst_5s": _r(decoded_worst),
        "received_mean": _r(received_mean),
    }

    gaps = np.diff(win)
    frames: dict[str, Any] = {"presented": int(win.size)}
    if gaps.size:
        med = float(np.median(gaps))
        freeze = max(3 * med, med + 0.150)
        frozen = gaps[gaps > freeze]
        frames.update(
            median_interval_ms=_r(1000 * med, 1),
            freeze_threshold_ms=_r(1000 * freeze, 1),
            freezes=int(frozen.size),
            frozen_s=_r(float(frozen.sum()), 3),
            longest_gap_ms=_r(1000 * float(gaps.max()), 1),
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
        "rtt_ms": _r(last.get("rttMs"), 2),
        "video_jitter_buffer_ms": _r(
            _ratio_ms(
                _delta(v0, v1, "jitterBufferDelay"), _delta(v0, v1, "jitterBufferEmittedCount")
            )
        ),
        "audio_jitter_buffer_ms": _r(
            _ratio_ms(
                _delta(first.get("audio"), last.get("audio"), "jitterBufferDelay"),
                _delta(first.get("audio"), last.get("audio"), "jitterBufferEmittedCount"),
            )
        ),
        "decode_ms": _r(_ratio_ms(dec_time, _delta(v0, v1, "framesDecoded"))),
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
        "mic_to_mouth_ms": _dist([b - a for a, b in mouth_pairs]),
        "voice_matched": len(voice_pairs),
        "mic_to_voice_ms": _dist([b - a for a, b in voice_pairs]),
        "mouth_threshold": _r(thresholds[0], 3) if thresholds else None,
        "mouth_typical_motion": _r(thresholds[1], 3) if thresholds else None,
    }
    av = [mp[1] - vp[1] for mp in mouth_pairs for vp in voice_pairs if mp[0] == vp[0]]
    latency["av_offset_ms"] = _dist(av)  # mouth onset minus voice onset (+: video late)

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
    out["budget_ms"] = {k.removesuffix("_s"): _r(1000 * float(v), 1) for k, v in budget.items()}
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
    out["motion_onset_vs_speech_ms"] = _dist(lead)  # negative: the model anticipates
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
    out["mic_to_frame_ms"] = _r(frame_ms, 1)  # capture of an instant -> display of its frame
    total = budget.get("total_s")
    terms = [
        1000 * float(total) if total is not None else None,
        (client["rtt_ms"] / 2) if client.get("rtt_ms") is not None else None,
        client.get("video_jitter_buffer_ms"),
        client.get("decode_ms"),
    ]
    if all(t is not None for t in terms):
        out["network_half_rtt_ms"] = _r(terms[1], 2)
        out["unaccounted_ms"] = _r(frame_ms - sum(float(t) for t in terms if t is not None), 1)
    if mouth_pairs and lead:
        direct = float(np.median([b - a for a, b in mouth_pairs]))
        out["direct_minus_frame_ms"] = _r(1000 * direct - frame_ms, 1)
    return out


# ----------------------------------------------------------------------------- the browser


async def record(
    page_url: str, chromium: str, wav: Path, duration_s: float, profile: Path
) -> dict[str, Any]:
    """Drive Chromium through one session: press Start, measure ``duration_s`` from the first
    presented frame (plus :data:`TAIL_S` for the last bursts), hang up; the page's records."""
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        try:
            ctx = await p.chromium.launch_persistent_context(
                str(profile),  # a fresh --user-data-dir
                executable_path=chromium,
                headless=True,
                args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}"],
            )
        except PlaywrightError as e:
            raise TalkstreamError(
                f"Chromium ({chromium}) did not start: {str(e).splitlines()[0]}"
            ) from None
        try:
            await ctx.add_init_script(INIT_JS)
            page = ctx.pages[0] if ctx.pages else await ctx.new_page()
            try:
                resp = await page.goto(page_url, wait_until="load", timeout=20_000)
            except PlaywrightError as e:
                raise TalkstreamError(
                    f"Chromium cannot open {page_url}: {str(e).splitlines()[0]}"
                ) from None
            if resp is not None and resp.status >= 400:
                raise TalkstreamError(f"{page_url} answered HTTP {resp.status}")
            if not await page.evaluate("!!(window.talkstream && document.getElementById('start'))"):
                raise TalkstreamError(f"{page_url} is not the talkstream web client")
            user_agent = await page.evaluate("navigator.userAgent")
            t_click = await page.evaluate("performance.now()")
            await page.click("#start")
            try:
                await page.wait_for_function(
                    "talkstream.state === 'connected' || !!talkstream.error",
                    timeout=CONNECT_TIMEOUT_S * 1000,
                )
            except PlaywrightError:
                state = await page.evaluate("talkstream.state")
                raise TalkstreamError(
                    f"no WebRTC connection within {CONNECT_TIMEOUT_S:.0f} s (state {state}); "
                    "a server behind NAT needs ICE to reach this machine"
                ) from None
            err = await page.evaluate("talkstream.error")
            if err:
                raise TalkstreamError(f"the web client failed to start: {err}")
            t_connected = await page.evaluate("performance.now()")
            if not await page.evaluate("!!talkstream.mouthBox"):
                # An older server without mouth_box: the lower middle of the video.
                await page.evaluate(
                    "(() => { const v = document.getElementById('video');"
                    " const w = v.videoWidth || 512, h = v.videoHeight || 512;"
                    " talkstream.mouthBox = [Math.round(0.3 * w), Math.round(0.55 * h),"
                    " Math.round(0.7 * w), Math.round(0.85 * h)]; })()"
                )
                mouth_box_guessed = True
            else:
                mouth_box_guessed = False
            try:
                await page.wait_for_function(
                    "talkstream.presented.length > 0", timeout=FIRST_FRAME_TIMEOUT_S * 1000
                )
            except PlaywrightError:
                raise TalkstreamError(
                    f"connected, but no video frame within {FIRST_FRAME_TIMEOUT_S:.0f} s"
                ) from None
            t_first = float(await page.evaluate("talkstream.presented[0]"))
            polls: list[dict[str, Any]] = []
            presented: list[float] = []
            last = -1.0

            async def poll() -> dict[str, Any]:
                nonlocal last
                snap: dict[str, Any] = await page.evaluate(POLL_JS, last)
                presented.extend(snap.pop("presented"))
                if presented:
                    last = presented[-1]
                polls.append(snap)
                return snap

            await poll()
            t_window_end = t_first + 1000 * duration_s
            end_snap: dict[str, Any] | None = None
            while True:
                snap = await poll()
                if snap["error"]:
                    raise TalkstreamError(f"the web client reported: {snap['error']}")
                if snap["state"] in ("failed", "closed", "idle"):
                    raise TalkstreamError(f"the connection ended early (state {snap['state']})")
                if end_snap is None and snap["now"] >= t_window_end:
                    end_snap = snap
                if snap["now"] >= t_window_end + 1000 * TAIL_S:
                    break
                next_ms = t_window_end if end_snap is None else t_window_end + 1000 * TAIL_S
                await asyncio.sleep(min(1.0, max((next_ms - snap["now"]) / 1000, 0.02)))
            ts = await page.evaluate(
                "({probe: talkstream.probe, sessionId: talkstream.sessionId,"
                " budget: talkstream.budget, mouthBox: talkstream.mouthBox})"
            )
            trace = stats = None
            trace_status = 0
            if ts["sessionId"]:
                sid = urllib.parse.quote(str(ts["sessionId"]))
                got = await page.evaluate(FETCH_JSON_JS, f"/sessions/{sid}/trace")
                trace, trace_status = got["body"], got["status"]
                got = await page.evaluate(FETCH_JSON_JS, f"/sessions/{sid}/stats")
                stats = got["body"]
            # Hang up through the page: the server frees the session at once.
            with contextlib.suppress(PlaywrightError):
                await page.click("#stop", timeout=2_000)
                await asyncio.sleep(0.2)
        finally:
            await ctx.close()
    return {
        "user_agent": user_agent,
        "click_ms": t_click,
        "connected_ms": t_connected,
        "first_frame_ms": t_first,
        "window_ms": [t_first, float(end_snap["now"]) if end_snap else t_window_end],
        "presented": presented,
        "polls": polls,
        "probe": ts["probe"],
        "session_id": ts["sessionId"],
        "budget_ms": ts["budget"],
        "mouth_box": ts["mouthBox"],
        "mouth_box_guessed": mouth_box_guessed,
        "trace": trace,
        "trace_status": trace_status,
        "stats": stats,
    }


# ----------------------------------------------------------------------------- a local server


def local_engine(cfg: EngineConfig | None = None, landmark_gain: float = LANDMARK_GAIN) -> Engine:
    """The engine ``--browser local`` serves: ``cfg`` (default: tiny) with idle motion off.

    Without a trained checkpoint the weights are random, and random weights barely let the
    landmarks into the image (about one grey level in the mouth region), which VP8 smooths
    away; the landmark cross-attention is then amplified by ``landmark_gain`` so the mouth
    visibly follows the speech (as ``tests/test_browser.py`` does). Timing is unaffected.
    """
    import torch

    from talkstream.config import EngineConfig, IdleConfig
    from talkstream.engine.checkpoint import Models
    from talkstream.engine.denoiser import LandmarkCrossAttention
    from talkstream.engine.pipeline import Engine, default_checkpoint

    cfg = dataclasses.replace(cfg or EngineConfig(), idle=IdleConfig(enabled=False))
    if cfg.checkpoint is not None or default_checkpoint(cfg.preset) is not None:
        return Engine(cfg)
    models = Models.random_init(cfg.preset, sampler=cfg.sampler)
    with torch.no_grad():
        for mod in models.denoiser.modules():
            if isinstance(mod, LandmarkCrossAttention) and mod.proj.bias is not None:
                mod.proj.weight.mul_(landmark_gain)
                mod.proj.bias.mul_(landmark_gain)
    return Engine(cfg, models=models)


@contextlib.contextmanager
def serve_in_background(engine: Engine, avatar: Avatar, **overrides: Any) -> Iterator[str]:
    """A talkstream server on a free 127.0.0.1 port, in a thread with its own event loop;
    yields its URL. Loopback-only ICE (process-wide). ``overrides``: ``ServeConfig`` fields."""
    try:
        from aiohttp import web

        from talkstream.streaming.config import ServeConfig
        from talkstream.streaming.sdp import use_loopback_ice
        from talkstream.streaming.server import create_app
    except ImportError as e:
        raise TalkstreamError(
            f"serving needs the serve extra ({e.name} is missing): pip install 'talkstream[serve]'"
        ) from None

    use_loopback_ice()
    cfg = ServeConfig(host="127.0.0.1", port=0, ice_loopback_only=True, **overrides)

    async def start() -> tuple[web.AppRunner, str]:
        runner = web.AppRunner(
            create_app(cfg, engine, avatar), handle_signals=False, access_log=None
        )
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="talkstream-bench-server", daemon=True)
    thread.start()
    try:
        runner, url = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=60)
        try:
            yield url
        finally:
            fut = asyncio.run_coroutine_threadsafe(runner.cleanup(), loop)
            with contextlib.suppress(concurrent.futures.TimeoutError):
                fut.result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()


@contextlib.contextmanager
def local_server(
    engine_config: EngineConfig | None, landmark_gain: float
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Load, warm up and serve the local engine (``--browser local``); yields (URL, info)."""
    from talkstream.streaming.config import ServeConfig
    from talkstream.streaming.server import load_avatar, warm_up

    engine = local_engine(engine_config, landmark_gain)
    try:
        avatar = load_avatar(ServeConfig(engine=engine.cfg), engine.crop_size)
        engine.prepare(avatar)
        warm_s = warm_up(engine, avatar)
        info = {
            "preset": engine.models.preset,
            "random_weights": engine.random_init,
            "landmark_gain": landmark_gain if engine.random_init else None,
            "device": engine.cfg.device,
            "idle": False,
            "warm_up_s": round(warm_s, 2),
            "backend": engine.backend.describe(),
        }
        with serve_in_background(engine, avatar) as url:
            yield url, info
    finally:
        engine.close()


# ----------------------------------------------------------------------------- the benchmark


def run_browser_bench(
    url: str,
    out_dir: Path,
    duration_s: float = DEFAULT_DURATION_S,
    speech_wav: Path | None = None,
    *,
    engine_config: EngineConfig | None = None,
    landmark_gain: float = LANDMARK_GAIN,
) -> dict[str, Any]:
    """Measure glass-to-glass latency and fps in headless Chromium against ``url``.

    Args:
        url: a talkstream server (its root, e.g. ``http://host:8080``), or ``"local"`` to
            start one in this process from ``engine_config`` (see :func:`local_engine`).
        out_dir: gets ``speech.wav`` (the fake microphone), ``browser.json`` (this result),
            ``browser-raw.json`` (what the page recorded) and ``browser.md`` (the table).
        duration_s: seconds measured from the first presented frame.
        speech_wav: the fake microphone's loop (speech bursts separated by >= 0.4 s of
            silence); default: espeak-ng phrases.

    Returns:
        The JSON-ready result (also in ``browser.json``).
    """
    if not duration_s > 0:
        raise TalkstreamError(f"--duration must be positive, got {duration_s}")
    out_dir = Path(out_dir)
    local = url.strip().lower() == LOCAL
    if local:
        chromium = check_browser_tools()
        out_dir.mkdir(parents=True, exist_ok=True)
        wav, mic_info = prepare_mic_wav(speech_wav, out_dir)
        log.info("starting a local talkstream server")
        with local_server(engine_config, landmark_gain) as (served, info):
            health = check_server(served)
            result = _measure(served, chromium, wav, mic_info, duration_s, out_dir, health)
        result["url"] = LOCAL
        result["local_server"] = info
    else:
        base, _ = client_urls(url)
        health = check_server(base)  # the most likely mistake first, before any launch
        chromium = check_browser_tools()
        out_dir.mkdir(parents=True, exist_ok=True)
        wav, mic_info = prepare_mic_wav(speech_wav, out_dir)
        result = _measure(url, chromium, wav, mic_info, duration_s, out_dir, health)
    write_outputs(result, out_dir)
    return result


def _measure(
    url: str,
    chromium: str,
    wav: Path,
    mic_info: dict[str, Any],
    duration_s: float,
    out_dir: Path,
    health: dict[str, Any] | None,
) -> dict[str, Any]:
    """One recorded session against ``url``, analysed (the result less its outputs)."""
    _, page = client_urls(url)
    log.info("Chromium against %s for %.0f s", page, duration_s)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="talkstream-chromium-") as profile:
        raw = asyncio.run(record(page, chromium, wav, duration_s, Path(profile)))
    (out_dir / "browser-raw.json").write_text(json.dumps(raw))
    res = analyse(raw)
    if raw["mouth_box_guessed"]:
        res["notes"].append("the server sent no mouth_box: the lower middle of the video is used")
    if raw["trace"] is None and raw["session_id"]:
        res["notes"].append(
            f"no server trace (/sessions/{{id}}/trace answered HTTP {raw['trace_status']})"
        )
    window_s = (raw["window_ms"][1] - raw["window_ms"][0]) / 1000
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "url": url,
        "page": page,
        "server": health,
        "browser": {"chromium": chromium, "user_agent": raw["user_agent"]},
        "mic": mic_info,
        "duration_s": round(window_s, 2),
        "wall_s": round(time.perf_counter() - wall, 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "connect_ms": _r(raw["connected_ms"] - raw["click_ms"], 1),
        "first_frame_ms": _r(raw["first_frame_ms"] - raw["click_ms"], 1),
        "session_id": raw["session_id"],
        "latency_budget_ms": raw["budget_ms"],
        **res,
    }


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    """``browser.json`` and ``browser.md`` in ``out_dir``."""
    (out_dir / "browser.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "browser.md").write_text(render_markdown(result))


# ----------------------------------------------------------------------------- Markdown


def _v(x: Any, digits: int = 0, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}{unit}"
    return f"{x}{unit}"


def _pair(a: Any, b: Any, digits: int = 0, unit: str = "") -> str:
    return f"{_v(a, digits)} / {_v(b, digits)}{unit}"


def _rows(rows: Sequence[tuple[str, str]], header: tuple[str, str]) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def render_markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown section: the client's view, then the server's split."""
    lat, fps, fr, cl = result["latency"], result["fps"], result["frames"], result["client"]
    mic = result["mic"]
    mm, mv = lat.get("mic_to_mouth_ms") or {}, lat.get("mic_to_voice_ms") or {}
    av = lat.get("av_offset_ms") or {}
    chrome = result["browser"]["user_agent"].split("Chrome/")[-1].split()[0]
    ms = " ms"
    rows = [
        ("connect (Start to connected)", _v(result["connect_ms"], 0, ms)),
        ("first frame (Start to first frame)", _v(result["first_frame_ms"], 0, ms)),
        (
            "presented fps, mean / worst 5 s",
            _pair(fps["presented_mean"], fps["presented_worst_5s"], 1),
        ),
        ("decoded fps, mean / worst 5 s", _pair(fps["decoded_mean"], fps["decoded_worst_5s"], 1)),
        ("received fps", _v(fps["received_mean"], 1)),
        ("**mic-to-mouth p50 / p90**", f"**{_pair(mm.get('p50'), mm.get('p90'), 0, ms)}**"),
        ("speech bursts matched (mouth)", f"{lat['matched']} of {lat['bursts_at_mic']}"),
        ("mic-to-voice p50 / p90", _pair(mv.get("p50"), mv.get("p90"), 0, ms)),
        ("mouth onset minus voice onset, p50", _v(av.get("p50"), 0, ms)),
        (
            "frames presented / decoded / received",
            f"{fr['presented']} / {_v(fr.get('decoded'))} / {_v(fr.get('received'))}",
        ),
        ("frames dropped by the decoder", _v(fr.get("dropped_by_decoder"))),
        (
            f"freezes (gaps > {_v(fr.get('freeze_threshold_ms'), 0, ms)}), total",
            f"{_v(fr.get('freezes'))}, {_v(fr.get('frozen_s'), 2, ' s')}",
        ),
        ("longest gap between frames", _v(fr.get("longest_gap_ms"), 0, ms)),
        (
            "packets lost / NACKs / PLIs",
            f"{_v(fr.get('packets_lost'))} / {_v(fr.get('nacks'))} / {_v(fr.get('plis'))}",
        ),
        (
            "RTT / video jitter buffer / decode",
            f"{_v(cl.get('rtt_ms'), 1)} / {_v(cl.get('video_jitter_buffer_ms'), 1)} / "
            f"{_v(cl.get('decode_ms'), 1)} ms",
        ),
    ]
    lines = [
        f"## Browser glass-to-glass: {result['url']}",
        "",
        f"{_who(result)}; {result['created']}; load average {result['load_avg']}.",
        f"Headless Chromium {chrome}, fake microphone looping {Path(mic['path']).name} "
        f"({mic['loop_s']:g} s, {len(mic['onsets_in_loop_s'])} speech bursts per loop); "
        f"{result['duration_s']:g} s measured from the first frame.",
        "",
        *_rows(rows, ("measure", "value")),
        "",
    ]
    ss = result.get("server_side")
    if ss:
        b = ss.get("budget_ms", {})
        st = ss.get("stats") or {}
        lead = ss.get("motion_onset_vs_speech_ms") or {}
        mapped = ss.get("mapped_bursts") or {}
        receiver = _sum(cl.get("video_jitter_buffer_ms"), cl.get("decode_ms"))
        terms = [
            ("lookahead (algorithmic)", _v(b.get("algorithmic"), 0)),
            ("input jitter budget", _v(b.get("jitter"), 0)),
            (
                f"compute budget (render measured: {_v(st.get('render_ms'), 1, ms)})",
                _v(b.get("compute"), 0),
            ),
            ("network (RTT / 2)", _v(ss.get("network_half_rtt_ms"), 1)),
            ("receiver jitter buffer + decode", _v(receiver, 0)),
            (
                "unaccounted (encode, audio capture and send, pacing)",
                _v(ss.get("unaccounted_ms"), 0),
            ),
            (
                "**= mic capture of an instant to display of its frame**",
                _v(ss.get("mic_to_frame_ms"), 0),
            ),
            ("model's motion onset vs speech onset, p50 (- = early)", _v(lead.get("p50"), 0)),
        ]
        lines += [
            "Server side (its trace on the media timeline, and its stats):",
            "",
            *_rows(terms, ("term", "ms")),
            "",
            f"Server frames rendered / skipped / repeated: {_v(st.get('frames_rendered'))} / "
            f"{_v(st.get('frames_skipped'))} / {_v(st.get('frames_repeated'))}; fresh fps "
            f"{_v(st.get('display_fps'), 1)}; bursts mapped to the server's timeline, "
            f"mic / video: {_v(mapped.get('mic'))} / {_v(mapped.get('video'))}.",
            "",
        ]
    for note in result.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def _who(result: dict[str, Any]) -> str:
    """What served the session, in words."""
    local, srv = result.get("local_server"), result.get("server")
    if local:
        gain = local.get("landmark_gain")
        weights = f", random weights (landmark gain {gain:g})" if local["random_weights"] else ""
        return f"talkstream {local['preset']}{weights}, served in this process, idle motion off"
    if srv:
        weights = ", random weights" if srv.get("random_weights") else ""
        return f"talkstream {srv.get('preset')}{weights}"
    return "server"


def _sum(*xs: Any) -> float | None:
    if any(x is None for x in xs):
        return None
    return float(sum(xs))


__all__ = [
    "LOCAL",
    "analyse",
    "check_browser_tools",
    "check_server",
    "client_urls",
    "local_engine",
    "onsets",
    "pair_up",
    "record",
    "render_markdown",
    "run_browser_bench",
    "serve_in_background",
]
