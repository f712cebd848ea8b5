"""Live-streaming benchmark: mic-to-mouth latency in a real browser, the latency budget, the
audio-video offset over a session, sustained fps, and concurrent sessions before frames drop.

    .venv/bin/python benchmarks/stream_latency.py --duration 60 --out benchmarks/stream_latency.json

``talkstream bench --browser URL`` (``talkstream.benchmarking.browser``) is the installed
glass-to-glass harness, for any talkstream server; this script shares its Chromium flags and
onset detection, and adds the A/V drift over a long session and the concurrency scenario.

Scenario 1 (browser): the server runs in this process on loopback; headless Chromium (driven by
playwright, the harness's CHROMIUM_FLAGS) opens the web client with ``?probe=1``. Its fake
microphone loops an espeak-ng sentence followed by silence. The page records, on one clock
(performance.now()), the level of its microphone and of the avatar's voice every 5 ms, and the
change of the mouth region in every presented video frame. The server's trace gives, in media time
(its timeline), the speech level and the landmark motion of every rendered frame. Burst by burst,
onsets map media time to the browser's clock: speech onsets for the microphone and for the avatar's
voice, onsets of motion after stillness for the video. Matching the video on motion (not speech)
onsets cancels what the model does around the speech (random weights move the mouth as soon as
speech enters the lookahead, ~125 ms early), so:

- mic-to-mouth: from the microphone capturing an instant to the display of its frame (p50);
- mic-to-voice: from the microphone to the avatar's voice playing it (p50);
- A/V offset at the receiver: video minus voice per burst; its trend over the session (after
  the browser's own A/V sync settles, ``SETTLE_S``) is the drift.

Onsets are found on 40 ms video frames, and on a loaded machine frames are skipped by deadline,
so a single burst's A/V offset is uncertain by a frame or two; the median over bursts is not.

Scenario 2 (concurrency): n aiortc clients (``benchmarks/stream_clients.py``, a process of their
own) talk to the server at once, for n = 1, 2, ...; frames "drop" when the server skips
rendering them (deadline passed). The clients decode their video on the same 2 cores, so this
is a lower bound for the server alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from talkstream.benchmarking.browser import (
    CHROMIUM_FLAGS,
    QUIET_BEFORE_ONSET_S,
    QUIET_RMS,
    SPEECH_RMS,
    find_chromium,
    onsets,
    pair_up,
)

CHROMIUM = find_chromium() or "/usr/bin/chromium"
SENTENCE = "hello there, how are you doing today"
SILENCE_S = 2.5
SETTLE_S = 10.0  # the browser's A/V sync converges within this; drift is fitted after it


@dataclass
class BrowserResult:
    duration_s: float
    bursts: int
    matched: list[int]  # bursts matched at the mic, in the voice, in the video
    mic_to_mouth_ms: float  # mic capture of a media instant -> display of its frame (p50)
    mic_to_voice_ms: float  # mic capture -> the avatar's voice playing it (p50)
    av_offset_ms: float  # video minus audio at the receiver (+: video late), p50 over bursts
    av_offset_bursts_ms: list[float]  # the same per burst
    av_burst_times_s: list[float]  # when each burst started, from the first
    av_drift_ms_per_min: float  # trend of the per-burst offset after SETTLE_S
    av_halves_ms: list[float]  # median offset in the first and second half (after SETTLE_S)
    # The same from the exact index of every presented frame (RTP timestamps): see exact_av.
    frame_delay_ms: float  # mic capture of an instant -> display of its frame, p50 of frames
    av_exact_offset_ms: float
    av_exact_bursts_ms: list[float]
    av_exact_burst_times_s: list[float]
    av_exact_drift_ms_per_min: float
    av_exact_halves_ms: list[float]
    rtp_anchor_agreement: float  # share of motion-onset pairs naming the chosen RTP origin
    decoded_fps: float
    decoded_fps_min_5s: float
    server: dict[str, Any]
    client: dict[str, Any]
    budget_ms: dict[str, float]


@dataclass
class ConcurrencyLevel:
    sessions: int
    received_fps: list[float]
    rendered: int
    skipped: int
    drop_fraction: float
    render_ms: float


@dataclass
class Report:
    machine: str
    date: str
    model: str
    browser: BrowserResult | None = None
    concurrency: list[ConcurrencyLevel] = field(default_factory=list)
    max_sessions_without_drops: int = 0
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers


def make_wav(tmp: Path) -> Path:
    import soundfile

    raw = tmp / "sentence.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), SENTENCE], check=True, capture_output=True)
    x, rate = soundfile.read(raw, dtype="float32")
    wav = np.concatenate(
        [np.zeros(int(0.3 * rate), np.float32), x, np.zeros(int(SILENCE_S * rate), np.float32)]
    )
    out = tmp / "speech.wav"
    soundfile.write(out, wav, rate, subtype="PCM_16")
    return out


def build_engine(args: argparse.Namespace) -> Any:
    import torch

    from talkstream.benchmarking.local import local_engine, random_engine
    from talkstream.config import EngineConfig, IdleConfig

    torch.set_num_threads(args.threads)
    cfg = EngineConfig(
        preset="tiny",
        idle=IdleConfig(enabled=False),
        lookahead_frames=args.lookahead,
        checkpoint=args.checkpoint,
        backend=args.backend,
    )
    if args.checkpoint is not None:
        return local_engine(cfg)
    # Random weights barely let the landmarks into the image: the landmark gain lets the
    # browser see the mouth move (see talkstream.benchmarking.local).
    return random_engine(cfg, landmark_gain=args.landmark_gain)


def stream_config(args: argparse.Namespace) -> Any:
    from talkstream.streaming.config import StreamConfig

    lead = {} if args.audio_lead_ms is None else {"audio_lead_ms": args.audio_lead_ms}
    return StreamConfig(
        compute_budget_ms=args.compute_budget_ms, jitter_budget_ms=args.jitter_budget_ms, **lead
    )


@contextlib.asynccontextmanager
async def server(engine: Any, avatar: Any, **overrides: Any) -> AsyncIterator[tuple[str, Any]]:
    from talkstream.benchmarking.local import start_server

    async with start_server(engine, avatar, **overrides) as srv:
        yield srv.url, srv.manager


def vp8_encode_ms(image: np.ndarray, frames: int = 50) -> float:
    """Median time aiortc's VP8 encoder takes per frame of ``image`` on this CPU."""
    from aiortc.codecs.vpx import Vp8Encoder
    from av import VideoFrame

    enc = Vp8Encoder()
    times = []
    rng = np.random.default_rng(0)
    for i in range(frames):
        img = image.copy()
        img[150:180, 190:250] = rng.integers(0, 255, (30, 60, 3), dtype=np.uint8)  # a moving mouth
        vf = VideoFrame.from_ndarray(img, format="rgb24")
        vf.pts = i * 3600
        vf.time_base = Fraction(1, 90000)
        t = time.perf_counter()
        enc.encode(vf)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[5:])


# ----------------------------------------------------------------------------- scenario 1


async def browser_scenario(
    args: argparse.Namespace, engine: Any, avatar: Any, tmp: Path
) -> BrowserResult:
    import aiohttp
    from playwright.async_api import async_playwright

    wav = make_wav(tmp)
    cfg = stream_config(args)
    async with server(engine, avatar, stream=cfg) as (url, _m), async_playwright() as p:
        browser = await p.chromium.launch_persistent_context(
            str(tmp / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}"],
        )
        try:
            page = browser.pages[0] if browser.pages else await browser.new_page()
            await page.goto(f"{url}/?probe=1&autostart=1")
            await page.wait_for_function(
                "window.talkstream && window.talkstream.state === 'connected'", timeout=30_000
            )
            t_end = time.monotonic() + args.duration
            fps_samples = []
            while time.monotonic() < t_end:
                await asyncio.sleep(1.0)
                fps_samples.append(await page.evaluate("talkstream.fps"))
                if len(fps_samples) % 15 == 0:
                    print(f"  {len(fps_samples)} s: decoded fps {fps_samples[-1]}", flush=True)
            ts = await page.evaluate(
                "({presented: talkstream.presented, probe: talkstream.probe,"
                " server: talkstream.server, client: talkstream.client,"
                " sessionId: talkstream.sessionId, budget: talkstream.budget})"
            )
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{url}/sessions/{ts['sessionId']}/trace") as r:
                    trace = await r.json()
                async with http.get(f"{url}/sessions/{ts['sessionId']}/stats") as r:
                    server_stats = await r.json()
        finally:
            await browser.close()

    if args.raw_out is not None:
        args.raw_out.write_text(json.dumps({"probe": ts["probe"], "trace": trace}))
    offsets = analyse(ts["probe"], trace)
    presented = np.asarray(ts["presented"], dtype=np.float64) / 1000
    span = presented[-1] - presented[0] if presented.size > 1 else 0.0
    decoded_fps = (presented.size - 1) / span if span > 0 else 0.0
    win = [float(np.mean(fps_samples[i : i + 5])) for i in range(max(len(fps_samples) - 4, 1))]

    client = ts.get("client") or {}
    budget = trace["budget_s"]
    encode_ms = vp8_encode_ms(avatar.image)
    render_ms = float(server_stats.get("render_ms", 0.0))
    budget_ms = {
        "lookahead_algorithmic": 1000 * budget["algorithmic_s"],
        "jitter_budget_input": 1000 * budget["jitter_s"],
        "compute_budget": 1000 * budget["compute_s"],
        "compute_measured_render": render_ms,
        "encode_vp8_measured": encode_ms,
        "network_rtt_half": float(client.get("rttMs", 0.0)) / 2,
        "receiver_jitter_buffer_video": float(client.get("jitterBufferMs", 0.0)),
        "decode": float(client.get("decodeMs", 0.0)),
    }
    accounted = (
        1000 * budget["total_s"]
        + encode_ms
        + budget_ms["network_rtt_half"]
        + budget_ms["receiver_jitter_buffer_video"]
        + budget_ms["decode"]
    )
    budget_ms["input_path_residual"] = offsets["mic_to_mouth_ms"] - accounted
    return BrowserResult(
        duration_s=args.duration,
        bursts=int(offsets["bursts"]),
        matched=offsets["pairs"],
        mic_to_mouth_ms=offsets["mic_to_mouth_ms"],
        mic_to_voice_ms=offsets["mic_to_voice_ms"],
        av_offset_ms=offsets["av_offset_ms"],
        av_offset_bursts_ms=offsets["av_bursts_ms"],
        av_burst_times_s=offsets["av_burst_times_s"],
        av_drift_ms_per_min=offsets["av_drift_ms_per_min"],
        av_halves_ms=offsets["av_halves_ms"],
        frame_delay_ms=offsets["frame_delay_ms"],
        av_exact_offset_ms=offsets["av_exact_offset_ms"],
        av_exact_bursts_ms=offsets["av_exact_bursts_ms"],
        av_exact_burst_times_s=offsets["av_exact_burst_times_s"],
        av_exact_drift_ms_per_min=offsets["av_exact_drift_ms_per_min"],
        av_exact_halves_ms=offsets["av_exact_halves_ms"],
        rtp_anchor_agreement=offsets["rtp_anchor_agreement"],
        decoded_fps=decoded_fps,
        decoded_fps_min_5s=min(win) if win else 0.0,
        server=server_stats,
        client=client,
        budget_ms=budget_ms,
    )


def trend(times_s: list[float], offsets_ms: list[float]) -> tuple[float, list[float]]:
    """Drift of per-burst A/V offsets after :data:`SETTLE_S` (ms per minute, a line fit; NaN
    with fewer than 3 bursts) and, a robust view of it, the median offset of the first and the
    second half of those bursts ([] with fewer than 2)."""
    late = [(t, a) for t, a in zip(times_s, offsets_ms, strict=True) if t >= SETTLE_S]
    drift = float("nan")
    if len(late) >= 3:
        drift = float(np.polyfit([t for t, _ in late], [a for _, a in late], 1)[0] * 60)
    half = len(late) // 2
    halves = (
        [
            float(np.median([a for _, a in late[:half]])),
            float(np.median([a for _, a in late[half:]])),
        ]
        if half
        else []
    )
    return drift, halves


def analyse(probe: dict[str, Any], trace: dict[str, Any]) -> dict[str, Any]:
    """Map media time (the server's timeline) to the browser's clock, burst by burst, for the
    microphone (speech onsets), the avatar's voice (speech onsets) and the video (onsets of
    mouth motion after stillness); from the mappings, the latencies and the A/V offset.

    The video is matched on motion onsets in media time, not on speech onsets, so whatever the
    model does before or after the speech (random weights move the mouth as soon as speech
    enters the lookahead) cancels out: the result is when the frame of a media instant is shown.
    """
    mic = np.asarray(probe["mic"], dtype=np.float64)
    voice = np.asarray(probe["voice"], dtype=np.float64)
    mouth = np.asarray(probe["mouth"], dtype=np.float64)
    inp = np.asarray(trace["input"], dtype=np.float64)  # (media s, RMS)
    mot = np.asarray(trace["motion"], dtype=np.float64)  # (media s, landmark motion)
    speech_media = onsets(inp[:, 0], inp[:, 1], SPEECH_RMS, QUIET_RMS, QUIET_BEFORE_ONSET_S)
    # Motion ramps up over a few frames: both sides take the frame where it first reaches 30 %
    # of its typical speech level (the 90th percentile), so the onsets name the same frame.
    thr_m = 0.3 * float(np.percentile(mot[:, 1], 90))
    motion_media = onsets(mot[:, 0], mot[:, 1], thr_m, thr_m, 0.3)
    mic_on = onsets(mic[:, 0] / 1000, mic[:, 1], SPEECH_RMS, QUIET_RMS, QUIET_BEFORE_ONSET_S)
    voice_on = onsets(voice[:, 0] / 1000, voice[:, 1], SPEECH_RMS, QUIET_RMS, QUIET_BEFORE_ONSET_S)
    thr = max(0.1, 0.3 * float(np.percentile(mouth[:, 1], 90)))
    mouth_on = onsets(mouth[:, 0] / 1000, mouth[:, 1], thr, thr, 0.3)
    nan = float("nan")
    if not (speech_media and mic_on):
        return {
            **exact_av(mouth, [], [], []),
            "bursts": len(mic_on),
            "mic_to_mouth_ms": nan,
            "mic_to_voice_ms": nan,
            "av_offset_ms": nan,
            "av_bursts_ms": [],
            "av_burst_times_s": [],
            "av_drift_ms_per_min": nan,
            "pairs": [0, 0, 0],
        }

    # The first speech at the microphone is the first speech on the timeline.
    g_mic = mic_on[0] - speech_media[0]
    mic_pairs = pair_up(speech_media, mic_on, g_mic, 0.3)
    l_mic = float(np.median([b - m for m, b in mic_pairs]))
    voice_pairs = pair_up(speech_media, voice_on, l_mic + 0.35, 0.45)
    l_voice = float(np.median([b - m for m, b in voice_pairs])) if voice_pairs else nan
    # The video is searched around the voice, which the design keeps in sync with it.
    mouth_pairs = pair_up(motion_media, mouth_on, l_voice, 0.3) if voice_pairs else []
    l_mouth = float(np.median([b - m for m, b in mouth_pairs])) if mouth_pairs else nan

    # Per burst: the video's mapping minus the audio's, over the session (drift).
    voice_by_speech = dict(voice_pairs)
    av, av_t = [], []
    for m, b in mouth_pairs:
        # The speech onset this motion onset belongs to: the model moves up to ~0.3 s early.
        owners = [sp for sp in voice_by_speech if -0.1 <= sp - m <= 0.4]
        if owners:
            sp = owners[0]
            av.append(1000 * ((b - m) - (voice_by_speech[sp] - sp)))
            av_t.append(sp - speech_media[0])
    drift, halves = trend(av_t, av)
    exact = exact_av(mouth, mic_pairs, voice_pairs, mouth_pairs)
    return {
        **exact,
        "bursts": len(mic_on),
        "av_halves_ms": halves,
        "mic_to_mouth_ms": 1000 * (l_mouth - l_mic),
        "mic_to_voice_ms": 1000 * (l_voice - l_mic),
        "av_offset_ms": float(np.median(av)) if av else nan,
        "av_bursts_ms": av,
        "av_burst_times_s": av_t,
        "av_drift_ms_per_min": drift,
        "pairs": [len(mic_pairs), len(voice_pairs), len(mouth_pairs)],
    }


RTP_TICKS_PER_FRAME = 3600  # 90 kHz video clock, 25 fps


def exact_av(
    mouth: np.ndarray,
    mic_pairs: list[tuple[float, float]],
    voice_pairs: list[tuple[float, float]],
    mouth_pairs: list[tuple[float, float]],
) -> dict[str, Any]:
    """A/V offset per burst from the exact frame index of every presented frame.

    Onsets of mouth motion are found on 40 ms frames and blur a single burst by a frame or two.
    But every presented frame carries its RTP timestamp (``requestVideoFrameCallback``), and
    the server stamps frame ``k`` with ``k * 3600`` plus one random origin per stream: the
    index differences are exact, and the origin is fixed by the motion-onset pairs (each pair
    names a frame's index; the most common answer wins). Then, for every presented frame, the
    video delay is its display time minus the time the microphone captured the instant the
    frame shows (frame ``k`` shows media time ``40 k`` ms, the instant its first audio sample
    plays: the design's sync point); the mapping from media time to the browser's clock is a
    straight-line fit of the microphone's speech onsets (it absorbs any clock drift between
    browser and server). The audio delay of a burst is the avatar's voice onset minus the
    microphone's onset of the same speech, both measured in the browser by the same 5 ms level
    detector. Offset per burst = median video delay of the frames within 1 s after the
    burst's onset minus that burst's audio delay.
    """
    nan = float("nan")
    empty: dict[str, Any] = {
        "frame_delay_ms": nan,
        "av_exact_offset_ms": nan,
        "av_exact_bursts_ms": [],
        "av_exact_burst_times_s": [],
        "av_exact_drift_ms_per_min": nan,
        "av_exact_halves_ms": [],
        "rtp_anchor_agreement": 0.0,
    }
    if mouth.ndim != 2 or mouth.shape[1] < 3 or len(mic_pairs) < 3 or not mouth_pairs:
        return empty
    rtp = mouth[:, 2].astype(np.int64)
    if not rtp.any():
        return empty  # a browser without rtpTimestamp in requestVideoFrameCallback
    d = (np.diff(rtp) + 2**31) % 2**32 - 2**31
    ticks = np.concatenate([[0], np.cumsum(d)])
    k_rel = np.rint(ticks / RTP_TICKS_PER_FRAME).astype(np.int64)  # frame index - origin
    shown = mouth[:, 0] / 1000
    # Origin: each motion-onset pair names the index of the frame presented at its onset.
    cands = []
    for m, b in mouth_pairs:
        j = int(np.argmin(np.abs(shown - b)))
        cands.append(round(m / 0.04) - int(k_rel[j]))
    values, counts = np.unique(cands, return_counts=True)
    origin = int(values[np.argmax(counts)])
    agreement = float(counts.max() / len(cands))
    media_t = (k_rel + origin) * 0.04  # the instant each presented frame shows
    # media time -> browser clock, from the microphone's onsets (a line: drift included)
    sp = np.array([m for m, _ in mic_pairs])
    mic = np.array([b for _, b in mic_pairs])
    slope, icpt = np.polyfit(sp, mic - sp, 1)
    delay = shown - (media_t + icpt + slope * media_t)  # video delay of every presented frame
    mic_by_speech = dict(mic_pairs)
    av, av_t = [], []
    for s0, v in voice_pairs:
        if s0 not in mic_by_speech:
            continue
        near = (media_t >= s0) & (media_t < s0 + 1.0)
        if near.sum() < 10:
            continue
        audio_delay = v - mic_by_speech[s0]
        av.append(1000 * (float(np.median(delay[near])) - audio_delay))
        av_t.append(s0 - sp[0])
    drift, halves = trend(av_t, av)
    return {
        "frame_delay_ms": 1000 * float(np.median(delay)),
        "av_exact_offset_ms": float(np.median(av)) if av else nan,
        "av_exact_bursts_ms": av,
        "av_exact_burst_times_s": av_t,
        "av_exact_drift_ms_per_min": drift,
        "av_exact_halves_ms": halves,
        "rtp_anchor_agreement": agreement,
    }


# ----------------------------------------------------------------------------- scenario 2


async def concurrency_scenario(
    args: argparse.Namespace, engine: Any, avatar: Any
) -> list[ConcurrencyLevel]:
    import sys

    levels = []
    clients_py = Path(__file__).with_name("stream_clients.py")
    for n in range(1, args.max_concurrent + 1):
        async with server(engine, avatar, max_sessions=n, stream=stream_config(args)) as (
            url,
            manager,
        ):
            # The clients run in their own process: their video decoders must not share this
            # interpreter (and its GIL) with the server being measured.
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(clients_py), url, str(n), str(2.0 + args.level_s + 1.0),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert proc.stdout is not None
            ids = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))["ids"]
            await asyncio.sleep(2.0)  # settle
            base = {sid: dict(manager.get_peer(sid).stream.snapshot()) for sid in ids}
            await asyncio.sleep(args.level_s)
            rendered = skipped = 0
            render_ms = []
            for sid in ids:
                s = manager.get_peer(sid).stream.snapshot()
                b = base[sid]
                rendered += int(s["frames_rendered"]) - int(b["frames_rendered"])
                skipped += int(s["frames_skipped"]) - int(b["frames_skipped"])
                render_ms.append(float(s["render_ms"]))
            fps = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))["fps"]
            await proc.wait()
        drop = skipped / max(rendered + skipped, 1)
        levels.append(ConcurrencyLevel(n, fps, rendered, skipped, drop, float(np.mean(render_ms))))
        print(
            f"  {n} session(s): rendered {rendered}, skipped {skipped} ({100 * drop:.1f} %), "
            f"received fps {fps}",
            flush=True,
        )
        if drop > args.drop_threshold:
            break
    return levels


# ----------------------------------------------------------------------------- main


def print_table(rep: Report) -> None:
    rows: list[tuple[str, str]] = []
    b = rep.browser
    if b is not None:
        rows += [
            ("session length (s)", f"{b.duration_s:.0f}"),
            ("speech bursts at the mic", str(b.bursts)),
            ("bursts matched: mic / voice / video", " / ".join(map(str, b.matched))),
            ("mic-to-mouth p50 (ms)", f"{b.mic_to_mouth_ms:.0f}"),
            ("mic-to-voice p50 (ms)", f"{b.mic_to_voice_ms:.0f}"),
            ("A/V offset p50 (ms, + = video late)", f"{b.av_offset_ms:.0f}"),
            (
                "A/V offset per burst, min..max (ms)",
                f"{min(b.av_offset_bursts_ms):.0f}..{max(b.av_offset_bursts_ms):.0f}"
                if b.av_offset_bursts_ms
                else "n/a",
            ),
            (f"A/V drift after {SETTLE_S:.0f} s (ms/min)", f"{b.av_drift_ms_per_min:.1f}"),
            (
                "A/V offset p50, 1st half / 2nd half (ms)",
                " / ".join(f"{x:.0f}" for x in b.av_halves_ms) or "n/a",
            ),
            ("frame delay p50, exact frame index (ms)", f"{b.frame_delay_ms:.0f}"),
            ("A/V offset p50, exact frame index (ms)", f"{b.av_exact_offset_ms:.0f}"),
            (
                "A/V offset per burst, exact, min..max (ms)",
                f"{min(b.av_exact_bursts_ms):.0f}..{max(b.av_exact_bursts_ms):.0f}"
                if b.av_exact_bursts_ms
                else "n/a",
            ),
            (
                "A/V offset per burst, exact, p5..p95 (ms)",
                " .. ".join(f"{x:.0f}" for x in np.percentile(b.av_exact_bursts_ms, [5, 95]))
                if b.av_exact_bursts_ms
                else "n/a",
            ),
            (
                f"A/V drift, exact, after {SETTLE_S:.0f} s (ms/min)",
                f"{b.av_exact_drift_ms_per_min:.1f}",
            ),
            (
                "A/V offset p50, exact, 1st half / 2nd half (ms)",
                " / ".join(f"{x:.0f}" for x in b.av_exact_halves_ms) or "n/a",
            ),
            ("RTP origin agreement of motion onsets", f"{100 * b.rtp_anchor_agreement:.0f} %"),
            ("decoded fps (browser)", f"{b.decoded_fps:.1f}"),
            ("decoded fps, worst 5 s", f"{b.decoded_fps_min_5s:.1f}"),
            ("fresh fps (server)", str(b.server.get("display_fps"))),
            (
                "frames rendered / skipped / repeated",
                " / ".join(
                    str(b.server.get(k))
                    for k in ("frames_rendered", "frames_skipped", "frames_repeated")
                ),
            ),
        ]
        rows += [(f"budget: {k} (ms)", f"{v:.1f}") for k, v in b.budget_ms.items()]
    for lv in rep.concurrency:
        rows.append(
            (
                f"{lv.sessions} concurrent: drop %, render ms",
                f"{100 * lv.drop_fraction:.1f} %, {lv.render_ms:.0f}",
            )
        )
    rows.append(("max sessions without drops", str(rep.max_sessions_without_drops)))
    w = max(len(k) for k, _ in rows)
    print()
    print(f"talkstream live streaming: {rep.machine}, {rep.date}, {rep.model}")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    for note in rep.notes:
        print(f"  note: {note}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--duration", type=float, default=60.0, help="browser session length, s (target 600)"
    )
    ap.add_argument("--max-concurrent", type=int, default=4, help="highest session count to try")
    ap.add_argument(
        "--level-s", type=float, default=8.0, help="seconds measured per concurrency level"
    )
    ap.add_argument(
        "--drop-threshold",
        type=float,
        default=0.05,
        help="skipped fraction that counts as dropping",
    )
    ap.add_argument(
        "--lookahead", type=int, default=None, help="lookahead frames (default: the model's)"
    )
    ap.add_argument("--compute-budget-ms", type=float, default=40.0, help="the server's default")
    ap.add_argument("--jitter-budget-ms", type=float, default=40.0)
    ap.add_argument("--audio-lead-ms", type=float, default=None, help="default: the server's")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument(
        "--backend", default="torch", help="the engine's backend (torch, onnxruntime, auto, ...)"
    )
    ap.add_argument(
        "--checkpoint", type=Path, default=None, help="trained checkpoint (default: random tiny)"
    )
    ap.add_argument(
        "--landmark-gain", type=float, default=30.0, help="random weights only, see the docstring"
    )
    ap.add_argument("--raw-out", type=Path, default=None, help="also save the raw probe + trace")
    ap.add_argument(
        "--framing",
        default="call",
        help="output framing of the default face (call = 640x480, the serve default; full = "
        "the 512x512 photo, as measured before 2026-12-05)",
    )
    ap.add_argument(
        "--frame-size",
        type=lambda v: tuple(int(x) for x in v.lower().split("x")),
        default=None,
        metavar="WxH",
        help="output frame size instead of the framing's own",
    )
    ap.add_argument("--skip-browser", action="store_true")
    ap.add_argument("--skip-concurrency", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/stream_latency.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from talkstream.config import AvatarConfig
    from talkstream.engine.avatar import default_image, default_landmarks, prepare_avatar

    engine = build_engine(args)
    avatar = prepare_avatar(
        default_image(),
        AvatarConfig(framing=args.framing, frame_size=args.frame_size),
        landmarks=default_landmarks(),
    )
    engine.warmup(avatar)
    rep = Report(
        machine=f"{platform.machine()} CPU, {os.cpu_count()} cores",
        date=time.strftime("%Y-%m-%d"),
        model="tiny, "
        + (
            "trained" if args.checkpoint else f"random weights (landmark gain {args.landmark_gain})"
        ),
    )
    try:
        if not args.skip_browser:
            if not Path(CHROMIUM).exists() or shutil.which("espeak-ng") is None:
                rep.notes.append("browser scenario skipped: chromium or espeak-ng missing")
            else:
                print(f"browser session, {args.duration:.0f} s ...", flush=True)
                with tempfile.TemporaryDirectory() as tmp:
                    rep.browser = asyncio.run(browser_scenario(args, engine, avatar, Path(tmp)))
        if not args.skip_concurrency:
            print("concurrent sessions ...", flush=True)
            rep.concurrency = asyncio.run(concurrency_scenario(args, engine, avatar))
            ok = [lv.sessions for lv in rep.concurrency if lv.drop_fraction <= args.drop_threshold]
            rep.max_sessions_without_drops = max(ok) if ok else 0
    finally:
        engine.close()
    print_table(rep)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(asdict(rep), indent=1, default=float))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
