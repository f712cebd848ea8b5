"""Does the browser show what we render? Lip sync measured along the chain, with one speech.

    python benchmarks/browser_lipsync.py [--seconds 25] [--variants page,raw] [--out DIR]

The mouth opening that dlib finds (inner lips / eye distance) is correlated with the speech
envelope (RMS per 40 ms frame), see :mod:`talkstream.benchmarking.lipsync`:

1. ``offline``: the same engine and avatar that ``talkstream serve`` uses render the speech file
   frame by frame (``talkstream render``'s loop);
2. for each browser variant: a ``talkstream serve`` in this process (the shipped model, serve's
   defaults), a real headless Chromium whose fake microphone loops the speech file, the web
   client as shipped, and an in-page capture of every presented frame's face
   (``requestVideoFrameCallback``, canvas, JPEG q 0.95). The variants change only what the page
   does with the microphone: ``page`` is the client as shipped (the avatar's voice muted, so no
   echo cancellation), ``unmuted`` the client with the avatar's voice playing (echo cancellation
   on), ``raw`` forces echo cancellation, noise suppression and gain control off, ``aec`` forces
   only echo cancellation on.

Beside r it reports what can lose motion in between: the motion model's own inner-lip opening
(offline and from the server's live trace, no pixels), how closely the audio the server received
follows the file (best lag over the loop), frames the server skipped or repeated, and media
frames the browser never presented. Writes ``result.json`` and ``README.md`` into ``--out``.

``--pipecat`` adds the pipecat path (``examples/pipecat_agent.py``: SmallWebRTC, espeak-ng TTS,
``TalkstreamVideoService``) to Chromium. There the voice is the avatar's own, so the browser is
scored against the voice it *played*: the audio the service handed to aiortc, placed at the RTP
timestamps Chromium reports handing out for playout (``getSynchronizationSources``; the two
are matched by the RTP header's levels), RMS per 40 ms, against the mouth shown during each
40 ms (time-weighted over the presented frames). That is the offline render's measure with
Chromium's timing in it. Also reported: ``serve``'s measure (the mouth shown against the audio
the service spoke, one best alignment, no playout), the older coarse readings of the voice (the
page's Web Audio probe; the RTP header's whole-dB level), and, as the reference, the offline
render of the very audio the service spoke in that run, over the same stretch the browser
showed (r depends on the speech: a different stretch scores differently).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from talkstream.benchmarking.lipsync import (
    FPS,
    MouthMeter,
    best_shift_r,
    cell_mean,
    decode_jpeg_data_url,
    envelope,
    face_box,
    lagged_r,
    pearson,
    presented_stats,
    resample_series,
)

TEXT = (
    "Good morning, and thank you all for coming. Today I want to talk about three things. "
    "First, where we stand. Second, what we learned this year. And third, what comes next. "
    "We started with a small team and a simple idea. Speak, and a face speaks with you. "
    "It was harder than we thought. Every frame must arrive on time, or the spell breaks. "
    "So we measured everything, and we fixed what we found."
)
LEAD_S = 1.0
VARIANTS: dict[str, tuple[str, dict[str, bool] | None]] = {
    # name: (page query, getUserMedia audio constraints forced on the page or None)
    "page": ("", None),  # the web client as shipped (the avatar's voice muted)
    "unmuted": ("mute=0", None),  # the web client with the avatar's voice playing
    "raw": ("", {"echoCancellation": False, "noiseSuppression": False, "autoGainControl": False}),
    "aec": ("", {"echoCancellation": True, "noiseSuppression": False, "autoGainControl": False}),
}


def speech_wav(out: Path, seconds: float) -> Path:
    """espeak-ng reading :data:`TEXT` (repeated to ``seconds``), after a second of silence."""
    import soundfile

    if shutil.which("espeak-ng") is None:
        sys.exit("browser_lipsync: espeak-ng is missing: apt-get install espeak-ng")
    raw = out / "espeak.wav"
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(raw), TEXT], check=True)
    x, rate = soundfile.read(raw, dtype="float32")
    reps = max(1, math.ceil(seconds / (len(x) / rate)))
    x = np.concatenate([np.zeros(int(LEAD_S * rate), np.float32), *([x] * reps)])
    x = x[: int((seconds + LEAD_S) * rate)]
    path = out / "speech.wav"
    soundfile.write(path, x, rate, subtype="PCM_16")
    return path


def offline(
    engine: Any,
    avatar: Any,
    x: np.ndarray,
    rate: int,
    meter: MouthMeter,
    span: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Render the speech as ``talkstream render`` does; r of dlib's mouth and of the model's
    (also over frames ``span`` = [start, end) alone, when given: the part a browser showed)."""
    from talkstream.streaming.tracks import _inner_lip_opening

    session = engine.session(avatar)
    frames = []
    block = rate // 50
    for i in range(0, len(x), block):
        session.push_audio(x[i : i + block], rate)
        while session.has_ready():
            frames += session.render_ready()
    session.end_audio()
    while session.has_ready():
        frames += session.render_ready()
    x0, y0, x1, y1 = face_box(avatar)
    dlib_open = meter.openings(f.image[y0:y1, x0:x1] for f in frames)
    lm_open = np.array([_inner_lip_opening(f.landmarks) for f in frames])
    env = envelope(x, rate, len(frames))
    r_loop, _ = loop_r(dlib_open, env)  # the browser's measure: best start within the loop
    out: dict[str, Any] = {
        "frames": len(frames),
        "detected": round(float(np.isfinite(dlib_open).mean()), 3),
        "dlib_vs_speech_r": None if r_loop is None else round(r_loop, 3),
        "dlib": lagged_r(dlib_open, env).as_dict(),
        "landmarks": lagged_r(lm_open, env).as_dict(),
    }
    if span is not None:
        a, b = max(span[0], 0), min(span[1], len(frames))
        out["span"] = [a, b]
        out["dlib_span"] = lagged_r(dlib_open[a:b], env[a:b]).as_dict()
    return out


def loop_r(series: np.ndarray, env_loop: np.ndarray) -> tuple[float | None, int | None]:
    """Best r of ``series`` against the looped envelope, over every start within the loop."""
    n, m = len(series), len(env_loop)
    if n < 10 or m < 10:
        return None, None
    tiled = np.tile(env_loop, n // m + 2)
    best: tuple[float | None, int | None] = (None, None)
    for k in range(m):
        r = pearson(series, tiled[k : k + n])
        if r is not None and (best[0] is None or r > best[0]):
            best = (r, k)
    return best


def grid_mean(times_s: np.ndarray, values: np.ndarray, t0: float, n: int) -> np.ndarray:
    """Mean of ``values`` within each 40 ms cell from ``t0`` (NaN in empty cells)."""
    idx = np.floor((np.asarray(times_s) - t0) * FPS).astype(int)
    out = np.full(n, np.nan)
    ok = (idx >= 0) & (idx < n)
    if ok.any():
        sums = np.bincount(idx[ok], weights=np.asarray(values)[ok], minlength=n)
        counts = np.bincount(idx[ok], minlength=n)
        with np.errstate(invalid="ignore"):
            out = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return out


CAPTURE_JS = """
(box) => {
  const v = document.getElementById("video");
  const c = document.createElement("canvas");
  c.width = box[2] - box[0];
  c.height = box[3] - box[1];
  const g = c.getContext("2d");
  window.__cap = [];
  window.__capOn = true;
  const step = (now, md) => {
    if (!window.__capOn) return;
    g.drawImage(v, box[0], box[1], c.width, c.height, 0, 0, c.width, c.height);
    window.__cap.push([md.expectedDisplayTime || now, md.rtpTimestamp ?? null,
                       c.toDataURL("image/jpeg", 0.95)]);
    v.requestVideoFrameCallback(step);
  };
  v.requestVideoFrameCallback(step);
}
"""
TAKE_JS = "() => { const out = window.__cap; window.__cap = []; return out; }"


def constraints_js(c: dict[str, bool] | None) -> str:
    if c is None:
        return ""
    return (
        "(() => { const gum = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);"
        " navigator.mediaDevices.getUserMedia = (q) => gum({...q, audio: "
        + json.dumps(c)
        + "}); })();"
    )


async def browser_run(
    url: str, wav: Path, box: list[int], seconds: float, variant: str, chromium: str, tmp: Path
) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    from talkstream.benchmarking.browser import CHROMIUM_FLAGS, FETCH_JSON_JS, INIT_JS

    async with async_playwright() as p:
        ctx = await p.chromium.launch_persistent_context(
            str(tmp / f"profile-{variant}"),
            executable_path=chromium,
            headless=True,
            args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}"],
        )
        try:
            query, constraints = VARIANTS[variant]
            await ctx.add_init_script(INIT_JS + constraints_js(constraints))
            page = ctx.pages[0] if ctx.pages else await ctx.new_page()
            await page.goto(f"{url}/?probe=1&{query}", wait_until="load", timeout=20_000)
            await page.click("#start")
            await page.wait_for_function(
                "talkstream.presented.length > 0 || !!talkstream.error", timeout=30_000
            )
            if err := await page.evaluate("talkstream.error"):
                raise RuntimeError(f"the web client failed: {err}")
            await page.evaluate(CAPTURE_JS, box)
            frames: list[list[Any]] = []
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                await asyncio.sleep(1.0)
                frames += await page.evaluate(TAKE_JS)
            await page.evaluate("window.__capOn = false")
            frames += await page.evaluate(TAKE_JS)
            probe = await page.evaluate("talkstream.probe.mic")
            voice = await page.evaluate("talkstream.probe.voice")
            sid = urllib.parse.quote(str(await page.evaluate("talkstream.sessionId")))
            trace = (await page.evaluate(FETCH_JSON_JS, f"/sessions/{sid}/trace"))["body"]
            stats = (await page.evaluate(FETCH_JSON_JS, f"/sessions/{sid}/stats"))["body"]
            with contextlib.suppress(Exception):
                await page.click("#stop", timeout=2_000)
        finally:
            await ctx.close()
    return {"frames": frames, "mic": probe, "voice": voice, "trace": trace, "stats": stats}


def analyse_browser(
    raw: dict[str, Any], env_loop: np.ndarray, meter: MouthMeter, settle_s: float = 2.0
) -> dict[str, Any]:
    frames = raw["frames"]
    t = np.array([f[0] for f in frames], dtype=np.float64) / 1000
    keep = t >= t[0] + settle_s  # the encoder's quality ramp
    imgs = [decode_jpeg_data_url(f[2]) for f, k in zip(frames, keep, strict=True) if k]
    tk = t[keep]
    opening = meter.openings(imgs)
    n = int((tk[-1] - tk[0]) * FPS)
    grid = tk[0] + np.arange(n) / FPS
    mouth = resample_series(tk, opening, grid)
    r_seen, _ = loop_r(mouth, env_loop)
    # The microphone as the page captured it, and the audio the server received (timeline).
    mic = np.asarray(raw["mic"], dtype=np.float64).reshape(-1, 2)
    mic_env = grid_mean(mic[:, 0] / 1000, mic[:, 1], tk[0], n)
    r_mic, _ = loop_r(mic_env, env_loop)
    # The pipecat path's measure (no file to compare with there): against the voice the page
    # played, best shift.
    heard = voice_r(tk[0], n, mouth, np.asarray(raw["voice"], dtype=np.float64).reshape(-1, 2))
    trace = raw["trace"] or {}
    inp = np.asarray(trace.get("input", []), dtype=np.float64).reshape(-1, 2)
    mth = np.asarray(trace.get("mouth", []), dtype=np.float64).reshape(-1, 2)
    out: dict[str, Any] = {
        "presented": presented_stats([f[0] for f in frames], [f[1] for f in frames]),
        "detected": round(float(np.isfinite(opening).mean()), 3),
        "dlib_vs_speech_r": None if r_seen is None else round(r_seen, 3),
        "mic_vs_speech_r": None if r_mic is None else round(r_mic, 3),
        "dlib_vs_voice_r": heard[0],
        "voice_after_mouth_ms": heard[1],
        "server": {
            k: (raw["stats"] or {}).get(k)
            for k in ("frames_rendered", "frames_skipped", "frames_repeated", "display_fps")
        },
    }
    if len(inp) and len(mth):
        t0 = max(inp[0, 0], mth[0, 0]) + settle_s
        m = int((min(inp[-1, 0], mth[-1, 0]) - t0) * FPS)
        srv_env = grid_mean(inp[:, 0], inp[:, 1], t0, m)
        srv_mouth = grid_mean(mth[:, 0], mth[:, 1], t0, m)
        r_in, _ = loop_r(srv_env, env_loop)
        out["server_input_vs_speech_r"] = None if r_in is None else round(r_in, 3)
        out["server_landmarks"] = lagged_r(srv_mouth, srv_env).as_dict()
        r_lm, _ = loop_r(srv_mouth, env_loop)
        out["server_landmarks_vs_speech_r"] = None if r_lm is None else round(r_lm, 3)
    return out


SENTENCES = [x.strip() + "." for x in TEXT.split(".") if x.strip()]
PIPECAT_WPM = 160  # EspeakTTSService's default rate


def pipecat_speech(out: Path) -> tuple[np.ndarray, int]:
    """The script as the example's EspeakTTSService says it: sentence by sentence (offline)."""
    import soundfile

    parts: list[np.ndarray] = []
    rate = 22050
    for i, text in enumerate(SENTENCES):
        raw = out / f"sentence{i}.wav"
        subprocess.run(
            ["espeak-ng", "-v", "en", "-s", str(PIPECAT_WPM), "-w", str(raw), text], check=True
        )
        x, rate = soundfile.read(raw, dtype="float32")
        parts += [x, np.zeros(int(0.3 * rate), np.float32)]
    return np.concatenate(parts), rate


async def pipecat_run(
    seconds: float,
    chromium: str,
    tmp: Path,
    backend: str | None = None,
    late_start: bool = False,
) -> dict[str, Any]:
    """The pipecat example agent (SmallWebRTC, espeak-ng TTS, TalkstreamVideoService) speaking
    the script to headless Chromium; the page's own captures (voice level, grey face crops)."""
    from playwright.async_api import async_playwright

    from talkstream.benchmarking.browser import CHROMIUM_FLAGS, PLAYOUT_JS
    from talkstream.benchmarking.local import listen_on_loopback, load_example
    from talkstream.streaming.sdp import use_loopback_ice

    example = load_example()
    use_loopback_ice()
    from talkstream.streaming.config import StreamConfig

    options: dict[str, Any] = {} if backend is None else {"backend": backend}
    if late_start:
        options["stream_config"] = StreamConfig(early_speech_start=False)
    agent = example.Agent(
        example.AgentConfig(
            script=SENTENCES,
            words_per_minute=PIPECAT_WPM,
            service_options=options,
        )
    )
    await agent.load()
    runner, url = await listen_on_loopback(agent.app())
    sent = SentAudioRecorder()
    try:
        async with async_playwright() as p:
            ctx = await p.chromium.launch_persistent_context(
                str(tmp / "profile-pipecat"),
                executable_path=chromium,
                headless=True,
                args=CHROMIUM_FLAGS,
            )
            try:
                page = ctx.pages[0] if ctx.pages else await ctx.new_page()
                await page.goto(f"{url}/?autostart=1")
                await page.wait_for_function(
                    "window.ts && window.ts.state === 'connected'", timeout=60_000
                )
                writes = await record_timeline(agent)
                await page.evaluate(f"({PLAYOUT_JS.strip()})(pc)")  # the page's connection
                await page.evaluate("ts.capture = true")
                await asyncio.sleep(seconds)
                got: dict[str, Any] = await page.evaluate(
                    "(() => { ts.capture = false; return {presented: ts.presented,"
                    " voice: ts.voice, played: window.__playout, faces: ts.faces,"
                    " faceBox: ts.faceBox}; })()"
                )
                got["service"] = service_traces(agent)
                got["spoken"] = spoken_audio(writes)
                got["avatar"] = agent.avatar
                got["sent"] = sent.chunks, sent.rate
            finally:
                await ctx.close()
    finally:
        sent.stop()
        await runner.cleanup()
        await agent.close()
    return got


class SentAudioRecorder:
    """Every chunk pipecat's SmallWebRTC audio track hands to aiortc's encoder (its pts and
    samples), for the played voice's exact envelope. Installed over the example's own tuning
    (kept, and marked as applied), removed by :meth:`stop`."""

    def __init__(self) -> None:
        import pipecat.transports.smallwebrtc.transport as tr

        from talkstream.integrations.smallwebrtc import tune_smallwebrtc

        tune_smallwebrtc()  # what the example applies for each connection: first, then ours
        self.cls, self.original = tr.RawAudioTrack, tr.RawAudioTrack.recv
        self.chunks: list[tuple[int, np.ndarray]] = []
        self.rate = 0
        original, rec = self.original, self

        async def recv(track: Any) -> Any:
            frame = await original(track)
            rec.rate = track._sample_rate
            rec.chunks.append((int(frame.pts), frame.to_ndarray().reshape(-1).copy()))
            return frame

        recv._talkstream_patches = getattr(original, "_talkstream_patches", frozenset())  # type: ignore[attr-defined]
        self.cls.recv = recv

    def stop(self) -> None:
        self.cls.recv = self.original


async def record_timeline(agent: Any) -> list[tuple[int, np.ndarray]]:
    """Record every write to the service's timeline from now on (position, int16 samples)."""
    stream = None
    while stream is None:
        conns = list(agent.connections.values())
        stream = conns[0].video.stream if conns else None
        await asyncio.sleep(0.01)
    tl = stream.timeline
    sink = tl._sink
    writes: list[tuple[int, np.ndarray]] = []

    def record(pcm: np.ndarray) -> None:
        writes.append((tl.written - pcm.shape[0], pcm.copy()))
        if sink is not None:
            sink(pcm)

    tl._sink = record
    return writes


def spoken_audio(writes: list[tuple[int, np.ndarray]]) -> tuple[int, np.ndarray]:
    """The timeline's final content from the first recorded frame start on (an early speech
    start overwrites what it took back): (that frame's index, the audio the service spoke,
    48 kHz int16)."""
    from talkstream.streaming.clock import SAMPLES_PER_FRAME_48K as SPF

    # An early start may rewind to before the first recorded write: start at the earliest.
    start = min(pos for pos, _ in writes)
    end = max(pos + pcm.shape[0] for pos, pcm in writes)
    audio = np.zeros(end - start, dtype=np.int16)
    for pos, pcm in writes:
        audio[pos - start : pos - start + pcm.shape[0]] = pcm
    first = -(-start // SPF)
    return first, audio[first * SPF - start :]


def service_traces(agent: Any) -> dict[str, Any] | None:
    """What the service itself rendered and said: its stream's counters, the model's
    inner-lip opening per rendered frame and the level of each chunk of its timeline."""
    for conn in list(agent.connections.values()):
        stream = conn.video.stream
        if stream is None:
            continue
        st = stream.stats
        return {
            "seed": stream.session.seed,
            "stats": {
                k: getattr(st, k)
                for k in ("frames_rendered", "frames_skipped", "frames_repeated", "early_starts")
            },
            "mouth": [list(x) for x in stream.mouth_trace],
            "input": [list(x) for x in stream.input_trace],
        }
    return None


def service_r(service: dict[str, Any] | None) -> dict[str, Any] | None:
    """The model's mouth (landmarks) against the speech on the service's own timeline, on the
    frame grid: what the service rendered, before any encoder or browser."""
    if not service or not service["mouth"] or not service["input"]:
        return None
    from talkstream.streaming.clock import SAMPLES_PER_FRAME_48K

    mouth = np.asarray(service["mouth"], dtype=np.float64)
    chunks = np.asarray(service["input"], dtype=np.float64)
    lo, hi = int(mouth[:, 0].min()), int(mouth[:, 0].max()) + 1
    grid = np.full(hi - lo, np.nan)
    grid[mouth[:, 0].astype(int) - lo] = mouth[:, 1]
    # Each frame's level: that of the timeline chunk holding the frame's middle sample.
    mid = (np.arange(lo, hi) + 0.5) * SAMPLES_PER_FRAME_48K
    k = np.searchsorted(chunks[:, 0], mid, side="right") - 1
    env = np.where(k >= 0, chunks[np.clip(k, 0, None), 1], np.nan)
    return {"stats": service["stats"], "landmarks": lagged_r(grid, env).as_dict()}


def analyse_pipecat(
    raw: dict[str, Any], meter: MouthMeter, spoken: np.ndarray | None = None
) -> dict[str, Any]:
    """dlib's mouth on the presented frames against the voice the page heard (best shift)."""
    x0, y0, x1, y1 = raw["faceBox"]
    t = np.array([f[0] for f in raw["faces"]], dtype=np.float64) / 1000
    opening = np.array(
        [
            meter.opening(
                np.repeat(
                    np.frombuffer(base64.b64decode(b64), np.uint8).reshape(y1 - y0, x1 - x0)[
                        :, :, None
                    ],
                    3,
                    axis=2,
                )
            )
            for _, b64 in raw["faces"]
        ]
    )
    n = int((t[-1] - t[0]) * FPS)
    grid = t[0] + np.arange(n) / FPS
    mouth = resample_series(t, opening, grid)
    voice = np.asarray(raw["voice"], dtype=np.float64).reshape(-1, 2)
    r, shift = voice_r(t[0], n, mouth, voice)
    # The same, per 6 s window (half overlapping): does the voice's offset from the face move
    # during the run? A moving offset costs r that no single shift recovers.
    win = 6 * FPS
    windows = [
        voice_r(t[0] + k / FPS, win, mouth[k : k + win], voice)
        for k in range(0, max(n - win, 0) + 1, win // 2)
    ]
    # The mouth shown during each 40 ms cell (time-weighted): the exact measures' series.
    shown = cell_mean(t, opening, t[0], n)
    presented = np.asarray(raw["presented"], dtype=np.float64)
    # The same against the voice at Chromium's playout (js/playout.js), without the page's Web
    # Audio probe and its own buffering in between.
    playout_rows = np.asarray(raw.get("played") or [], dtype=np.float64).reshape(-1, 3)
    played = playout_rows[:, :2]
    r_played, shift_played = voice_r(t[0], n, mouth, played) if len(played) > 50 else (None, None)
    return {
        "presented": presented_stats(list(presented), []),
        "detected": round(float(np.isfinite(opening).mean()), 3),
        "dlib_vs_voice_r": r,
        "voice_after_mouth_ms": shift,
        "dlib_vs_played_voice_r": r_played,
        "played_voice_after_mouth_ms": shift_played,
        "by_window": [{"r": w_r, "voice_after_mouth_ms": w_s} for w_r, w_s in windows],
        "exact": exact_played(raw.get("sent"), playout_rows, t[0], shown),
        "shown_vs_spoken": shown_vs_spoken(spoken, shown),
        "service": service_r(raw.get("service")),
    }


def shown_vs_spoken(spoken: np.ndarray | None, shown: np.ndarray) -> Any:
    """``serve``'s measure on the pipecat path: the mouth shown during each 40 ms against the
    envelope of the audio the service spoke, at the best single alignment (no voice playout in
    between: what the face does with the speech, as the serve benchmark scores it against the
    microphone's file). ``shown``: the mouth shown per 40 ms cell. None without the audio."""
    if spoken is None or len(spoken) == 0:
        return None
    n = len(shown)
    x = np.asarray(spoken, np.float64) / 32768
    best: tuple[float, int] | None = None
    for phase_s in (0.0, 0.01, 0.02, 0.03):  # 10 ms steps, as the played voice's search
        # The capture may start before the first speech: the timeline was silent then.
        env = np.concatenate([np.zeros(n), envelope(x, 48_000, offset_s=phase_s)])
        for k in range(0, max(len(env) - int(0.8 * n), 0) + 1):
            seg = env[k : k + n]
            r = pearson(shown[: len(seg)], seg)
            if r is not None and (best is None or r > best[0]):
                best = (r, k - n)
    if best is None:
        return None
    # Frames [start, end) of the audio spoken (its offline render's frames) were on screen.
    return {"r": round(best[0], 3), "frames": [best[1], best[1] + n]}


def exact_played(
    sent_raw: tuple[list[tuple[int, np.ndarray]], int] | None,
    playout_rows: np.ndarray,
    t0: float,
    shown: np.ndarray,
) -> dict[str, Any]:
    """The measure of the offline render, on what Chromium showed and played: the mouth shown
    during each 40 ms (time-weighted over the presented frames) against the RMS of the voice
    played during it (the audio the service sent, at the RTP time Chromium was playing).
    Best shift in 10 ms steps within the offline's lag range (+-240 ms). ``shown``: the
    mouth shown per 40 ms cell from page time ``t0`` (s)."""
    from talkstream.benchmarking.lipsync import (
        Playout,
        SentAudio,
        match_playout,
        played_envelope,
    )

    playout = Playout.from_records(playout_rows.tolist())
    if not sent_raw or not sent_raw[0] or playout is None:
        return {}
    sent = SentAudio.from_chunks(*sent_raw)
    match = match_playout(sent, playout)
    out: dict[str, Any] = {"match_r": None if match is None else round(match[1], 3)}
    if match is None or match[1] < 0.8:  # the levels do not line up: no trustworthy map
        return out
    n = len(shown)
    envs = {
        s: played_envelope(sent, playout, match[0], t0 + s / 1000, n) for s in range(-240, 241, 10)
    }
    later = np.arange(n) >= 6 * FPS
    for name, mask in (("all", np.ones(n, bool)), ("after_6s", later)):
        best = best_shift_r(np.where(mask, shown, np.nan), envs.__getitem__, envs)
        out[name] = (
            None if best is None else {"r": round(best[0], 3), "voice_after_mouth_ms": best[1]}
        )
    return out


def voice_r(
    t0: float, n: int, mouth: np.ndarray, voice: np.ndarray
) -> tuple[float | None, int | None]:
    """Best r of the mouth series (40 ms grid from ``t0``) against the level of the voice the
    page played ((ms, rms) rows), over shifts of the voice of -120..+520 ms."""
    best = best_shift_r(
        mouth,
        lambda s: grid_mean(voice[:, 0] / 1000 - s / 1000, voice[:, 1], t0, n),
        range(-120, 521, 40),  # the voice may play a little after its frame
    )
    return (None, None) if best is None else (round(best[0], 3), best[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=25.0, help="speech and capture length (25)")
    ap.add_argument(
        "--variants", default="page,unmuted", help="comma list of: " + ",".join(VARIANTS)
    )
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the variants (1)")
    ap.add_argument(
        "--pipecat",
        action="store_true",
        help="also the pipecat path: examples/pipecat_agent.py (SmallWebRTC, espeak-ng TTS, "
        "TalkstreamVideoService) to Chromium, against an offline render of the same speech",
    )
    ap.add_argument(
        "--pipecat-backend",
        default=None,
        help="engine backend of the pipecat path (default: the service's own, auto)",
    )
    ap.add_argument(
        "--pipecat-late-start",
        action="store_true",
        help="pipecat path with StreamConfig.early_speech_start=False (speech after the fed "
        "silence, the behaviour before it)",
    )
    ap.add_argument("--out", type=Path, default=Path("bench-out/lipsync"))
    ap.add_argument("--backend", default="auto", help="engine backend, as serve's (auto)")
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    if variants == ["none"]:
        variants = []
    if bad := [v for v in variants if v not in VARIANTS]:
        ap.error(f"unknown variant {bad[0]!r}: choose from {', '.join(VARIANTS)}")
    import soundfile

    from talkstream.benchmarking.browser import find_chromium
    from talkstream.benchmarking.local import serve_in_background
    from talkstream.config import EngineConfig
    from talkstream.runtime import load_engine
    from talkstream.streaming.config import ServeConfig
    from talkstream.streaming.server import load_avatar

    chromium = find_chromium()
    if chromium is None:
        sys.exit("browser_lipsync: no Chromium found: apt-get install chromium")
    a.out.mkdir(parents=True, exist_ok=True)
    wav = speech_wav(a.out, a.seconds)
    x, rate = soundfile.read(wav, dtype="float32")
    env_loop = envelope(x, rate)
    meter = MouthMeter()
    engine = load_engine(EngineConfig(backend=a.backend))
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_1min": os.getloadavg()[0],
        "backend": engine.backend.describe(),
        "seconds": a.seconds,
    }
    try:
        avatar = load_avatar(ServeConfig(), engine)
        engine.encode_avatar(avatar)
        engine.warmup(avatar)
        print("offline render ...", flush=True)
        result["offline"] = offline(engine, avatar, x, rate, meter)
        print(json.dumps(result["offline"]), flush=True)
        box = face_box(avatar)
        with serve_in_background(engine, avatar) as url, tempfile.TemporaryDirectory() as tmp:
            # Rounds interleave the variants, so that a change of machine load hits them alike.
            for rnd in range(a.repeats):
                for v in variants:
                    print(f"browser ({v}, round {rnd + 1}) ...", flush=True)
                    prof = Path(tmp) / f"r{rnd}"
                    raw = asyncio.run(browser_run(url, wav, box, a.seconds, v, chromium, prof))
                    result.setdefault(v, []).append(analyse_browser(raw, env_loop, meter))
                    print(json.dumps(result[v][-1]), flush=True)
        if a.pipecat:
            px, prate = pipecat_speech(a.out)
            print("offline render of the pipecat script ...", flush=True)
            result["pipecat_offline"] = offline(engine, avatar, px, prate, meter)
    finally:
        engine.close()
    if a.pipecat:
        with tempfile.TemporaryDirectory() as tmp:
            for rnd in range(a.repeats):
                print(f"browser (pipecat, round {rnd + 1}) ...", flush=True)
                raw = asyncio.run(
                    pipecat_run(
                        a.seconds,
                        chromium,
                        Path(tmp) / f"r{rnd}",
                        a.pipecat_backend,
                        a.pipecat_late_start,
                    )
                )
                (_, spoken), pc_avatar = raw.pop("spoken"), raw.pop("avatar")
                row = analyse_pipecat(raw, meter, spoken)
                # The fair comparison: the same engine rendering the very audio the service
                # spoke in this run (the TTS's own pauses and timing included), offline.
                print("offline render of the audio the service spoke ...", flush=True)
                same = load_engine(EngineConfig(backend=a.backend))
                try:
                    shown = (row.get("shown_vs_spoken") or {}).get("frames")
                    span = None if shown is None else (shown[0], shown[1])
                    row["offline_same_audio"] = offline(
                        same, pc_avatar, spoken, 48_000, meter, span
                    )
                finally:
                    same.close()
                result.setdefault("pipecat", []).append(row)
                print(json.dumps(result["pipecat"][-1]), flush=True)
    result["load_1min_end"] = os.getloadavg()[0]
    (a.out / "result.json").write_text(json.dumps(result, indent=2))
    summary = summarise(result, variants)
    (a.out / "README.md").write_text(summary)
    print(summary)
    return 0


def _median(xs: list[Any]) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return round(float(np.median(vals)), 3) if vals else None


def _same(run: dict[str, Any], key: str) -> Any:
    return (run.get("offline_same_audio") or {}).get(key, {}).get("r")


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _exact(run: dict[str, Any], part: str, key: str) -> Any:
    return ((run.get("exact") or {}).get(part) or {}).get(key)


def summarise(result: dict[str, Any], variants: list[str]) -> str:
    """A markdown table: medians over the rounds of each variant."""
    off = result["offline"]
    lines = [
        f"# Lip sync along the chain ({result['date']}, {result['machine']}, "
        f"load {result['load_1min']:.1f} -> {result['load_1min_end']:.1f})",
        "",
        f"backend: {result['backend']}; {result['seconds']:g} s of espeak-ng speech",
        "",
        "| path | mouth (dlib) vs speech r | model's lips vs speech r | audio received vs "
        "speech r | frames skipped / rendered (server) | media frames not presented |",
        "|---|---|---|---|---|---|",
        f"| offline render | {off['dlib_vs_speech_r']} | {off['landmarks']['r']} | 1 | 0 / "
        f"{off['frames']} | 0 |",
    ]
    for v in variants:
        runs = result.get(v, [])

        def med(key: str, runs: list[dict[str, Any]] = runs) -> float | None:
            return _median([r.get(key) for r in runs])

        skipped = _median([r["server"].get("frames_skipped") for r in runs])
        rendered = _median([r["server"].get("frames_rendered") for r in runs])
        missing = _median([r["presented"].get("media_frames_missing") for r in runs])
        lines.append(
            f"| browser, {v} ({len(runs)} runs) | {med('dlib_vs_speech_r')} | "
            f"{med('server_landmarks_vs_speech_r')} | {med('server_input_vs_speech_r')} | "
            f"{skipped} / {rendered} | {missing} |"
        )
    if "pipecat" in result:
        po, runs = result["pipecat_offline"], result["pipecat"]
        lines += [
            "",
            "| pipecat path (the same script through TalkstreamVideoService) | mouth (dlib) vs "
            "speech/voice r | voice after mouth | fps presented |",
            "|---|---|---|---|",
            f"| offline render of the script | {po['dlib_vs_speech_r']} | - | - |",
            f"| examples/pipecat_agent.py -> SmallWebRTC -> Chromium ({len(runs)} runs), the "
            f"voice through the page's Web Audio probe | "
            f"{_median([r['dlib_vs_voice_r'] for r in runs])} | "
            f"{_median([r['voice_after_mouth_ms'] for r in runs])} ms | "
            f"{_median([r['presented'].get('fps') for r in runs])} |",
            "| the same runs, the voice at Chromium's playout | "
            f"{_median([r.get('dlib_vs_played_voice_r') for r in runs])} | "
            f"{_median([r.get('played_voice_after_mouth_ms') for r in runs])} ms | - |",
            "| the same runs, the voice Chromium played (the sent audio at the RTP time it "
            "played) against the mouth shown in each 40 ms: the offline render's measure | "
            f"{_median([_exact(r, 'all', 'r') for r in runs])} (from 6 s: "
            f"{_median([_exact(r, 'after_6s', 'r') for r in runs])}) | "
            f"{_median([_exact(r, 'all', 'voice_after_mouth_ms') for r in runs])} ms | - |",
            "| the same runs, the mouth shown in each 40 ms against the audio the service "
            "spoke (serve's measure: one alignment, no voice playout) | "
            f"{_median([(r.get('shown_vs_spoken') or {}).get('r') for r in runs])} | - | - |",
            "| offline render of the audio the service spoke (same runs): all of it / the part "
            "the browser showed | "
            f"{_median([_same(r, 'dlib') for r in runs])} / "
            f"{_median([_same(r, 'dlib_span') for r in runs])} | - | - |",
            "",
            "Per run: the browser (the voice it played, the offline render's measure) against "
            "the offline render of the same stretch of the same audio.",
            "",
            "| run | browser, voice played | browser, serve's measure | offline, same stretch "
            "| difference |",
            "|---|---|---|---|---|",
            *(
                f"| {i + 1} | {_exact(r, 'all', 'r')} | "
                f"{(r.get('shown_vs_spoken') or {}).get('r')} | {_same(r, 'dlib_span')} | "
                f"{_diff(_same(r, 'dlib_span'), _exact(r, 'all', 'r'))} |"
                for i, r in enumerate(runs)
            ),
            "",
            "| model's mouth (landmarks) vs speech r, best lag | offline (script / the audio "
            "spoken) | pipecat service (its own timeline) | frames rendered / skipped |",
            "|---|---|---|---|",
            f"| | {po['landmarks']['r']} / "
            f"{_median([_same(r, 'landmarks') for r in runs])} | "
            f"{_median([(r['service'] or {}).get('landmarks', {}).get('r') for r in runs])} | "
            + ", ".join(
                f"{r['service']['stats']['frames_rendered']} / "
                f"{r['service']['stats']['frames_skipped']}"
                for r in runs
                if r.get("service")
            )
            + " |",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
