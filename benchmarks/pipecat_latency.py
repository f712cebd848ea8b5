"""pipecat + talkstream latency: first moving mouth, interruption, A/V offset, fps.

    .venv/bin/python benchmarks/pipecat_latency.py --out benchmarks/pipecat_latency.json
    .venv/bin/python benchmarks/pipecat_latency.py --utterances 4 --conversation-s 40  # short

Scenario 1 (browser, loopback): ``examples/pipecat_agent.py``'s app runs in this process (the
real pipeline: SmallWebRTC transport, EspeakTTSService, TalkstreamVideoService with the shipped
``tiny`` model, idle motion off so that a moving mouth means speech); headless Chromium
(Debian's, via playwright) connects and records, on its clock, every presented frame, the change
of the mouth region in it and the level of the avatar's voice. ``performance.timeOrigin`` puts
those on the same wall clock (``time.time()``) as the service's own events. Per utterance:

- first moving mouth: from the first ``TTSAudioRawFrame`` entering the service to the first
  presented frame whose mouth region changed beyond the still face's noise (3x its p99, and at
  least 1.0 grey level per pixel; frames the renderer skipped repeat the previous one, so
  motion comes in single-frame steps and a "sustained" rule would miss it);
- mouth away from rest: the same to the first presented frame whose mouth region differs from
  a snapshot of the face at rest (taken 0.3 s before the utterance) by more than the still
  frames do (3x their p99, at least 1.0 grey level per pixel): a mouth that opens slowly never
  changes much between two frames, so the frame-to-frame measure above can miss its start;
- first moving frame shown: the same to the moment Chromium presented the first frame whose
  *landmarks* moved at the service (the service's own criterion, 5x the still face's p99), found
  by the frame index this benchmark stamps into each image's top-left corner
  (``talkstream.benchmarking.stamp``): the same event as at the service, with no pixel
  threshold; sentences whose first phonemes barely move the lips are not held back by it;
- first voice: the same to the voice rising above 0.02 RMS in the browser; their difference is
  the A/V offset at the receiver at speech onsets;
- interruption: an ``InterruptionFrame`` ~1 s into the utterance; speech stopped at the service
  (end of the last 40 ms speech block it emitted, minus the interruption's arrival) and in the
  browser (from queueing the frame to the voice falling below 0.003 RMS for 0.3 s), and the
  mouth at rest (the end of the last frame with moving landmarks the service emitted after it);
- presented fps; and, for the breakdown, when the service emitted the first frame whose
  landmarks moved (its stream's motion trace);
- the voice as Chromium hands it out for playout (``playout_voice_ms``, ``playout_stop_ms``):
  the same onset and end as "first voice" and the browser's stop, read from the audio
  receiver's ``getSynchronizationSources()`` (when WebRTC delivered each packet's audio for
  playout, and the audio level aiortc wrote into its RTP header) instead of the page's Web
  Audio level probe, which adds its own buffering (40-50 ms here). The sound device's output
  buffer comes after either.

Scenario 2 (service output, no browser): a conversation of ``--conversation-s`` seconds through
``EspeakTTSService -> TalkstreamVideoService`` in a pipecat pipeline, with ``--interruptions``
interruptions spread over it: output fps, and per image during speech the A/V offset (the speech
emitted up to that image minus the image's share of it, and the wall time between an audio
block's push and its image's).

Medians are printed; ``--out`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from talkstream.benchmarking.browser import CHROMIUM_FLAGS, PLAYOUT_JS, find_chromium
from talkstream.benchmarking.local import load_example, serve_app
from talkstream.benchmarking.stamp import STAMP_PROBE_JS, stamp, unwrap

SENTENCES = (
    "Hello there, how are you doing today?",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Talking faces should move their lips exactly when they speak.",
    "Here is a long sentence that you will probably cut off before it ends, like people do.",
)
SPEECH_RMS = 0.02
REST_STILL_S = 0.3  # still frames recorded against the rest snapshot before each utterance

# The mouth box of every presented frame against a snapshot of the face at rest, taken when
# window.__snap is set (before each utterance): the mean change per pixel (R and G, as the
# page's own frame-to-frame measure) into window.__rest as [presentation time, change]. A mouth
# that opens slowly never changes much from one frame to the next, but it does from rest.
REST_PROBE_JS = """
(box) => {
  const v = document.querySelector("#video");
  const [x0, y0, x1, y1] = box, w = x1 - x0, h = y1 - y0;
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  const g = c.getContext("2d", { willReadFrequently: true });
  window.__rest = []; window.__ref = null; window.__snap = false;
  const step = (now, meta) => {
    g.drawImage(v, x0, y0, w, h, 0, 0, w, h);
    const px = g.getImageData(0, 0, w, h).data;
    if (window.__snap) { window.__ref = px.slice(); window.__snap = false; }
    const ref = window.__ref;
    if (ref) {
      let sum = 0;
      for (let i = 0; i < px.length; i += 4) {
        sum += Math.abs(px[i] - ref[i]) + Math.abs(px[i + 1] - ref[i + 1]);
      }
      window.__rest.push([meta.expectedDisplayTime || now, sum / (px.length / 2)]);
    }
    v.requestVideoFrameCallback(step);
  };
  v.requestVideoFrameCallback(step);
}
"""
QUIET_RMS = 0.003
QUIET_HOLD_S = 0.3
MOUTH_MIN_DIFF = 1.0
FRAME_S = 0.04


def median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------- scenario 1


def instrumented_service_class() -> type:
    """TalkstreamVideoService that notes when each utterance's first TTS audio arrives."""
    from talkstream.integrations.pipecat import META_KEY, TalkstreamVideoService

    class Timed(TalkstreamVideoService):  # type: ignore[misc]
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.first_audio_at: list[float] = []  # time.time()
            self.speech_blocks_at: list[float] = []
            self.interrupts_at: list[float] = []
            self.images_at: dict[int, float] = {}  # video frame index -> time.time() emitted
            self.kept_stream: Any = None
            self._fresh = True

        async def _queue_speech(self, frame: Any) -> None:
            if self._fresh:
                self.first_audio_at.append(time.time())
                self._fresh = False
            await super()._queue_speech(frame)

        def _interrupt(self) -> None:
            self.interrupts_at.append(time.time())
            self._fresh = True
            super()._interrupt()

        def rearm(self) -> None:
            self._fresh = True

        async def _start(self) -> None:
            await super()._start()
            self.kept_stream = self._stream  # its motion trace outlives the pipeline

        async def push_frame(self, frame: Any, direction: Any = None) -> None:
            from pipecat.frames.frames import OutputImageRawFrame, TTSAudioRawFrame

            if isinstance(frame, TTSAudioRawFrame):
                self.speech_blocks_at.append(time.time())
            elif isinstance(frame, OutputImageRawFrame):
                index = frame.metadata[META_KEY]["index"]
                self.images_at[index] = time.time()
                # Mark the image with its index (top-left corner, off the face), so the page
                # can tell exactly when this frame was shown.
                w, h = frame.size
                img = np.frombuffer(frame.image, np.uint8).reshape(h, w, 3).copy()
                stamp(img, index)
                frame.image = img.tobytes()
            if direction is None:
                await super().push_frame(frame)
            else:
                await super().push_frame(frame, direction)

    return Timed


def from_rest(at: np.ndarray, val: np.ndarray, snap: float | None, t_in: float) -> dict[str, float]:
    """When the mouth first differs visibly from its rest snapshot: the still frames between
    the snapshot and the first TTS audio give the noise (3x their p99, at least 1.0 grey level
    per pixel, as the frame-to-frame measure)."""
    if snap is None or not at.size:
        return {}
    still = val[(at > snap) & (at < t_in)]
    if still.size < 3:
        return {}
    thr = max(3 * float(np.percentile(still, 99)), MOUTH_MIN_DIFF)
    t = first_above(at, val, t_in, thr)
    return {} if t is None else {"mouth_from_rest_ms": round(1000 * (t - t_in), 1)}


def first_above(times: np.ndarray, values: np.ndarray, after: float, thr: float) -> float | None:
    """First time > ``after`` where ``values`` exceed ``thr``."""
    idx = np.flatnonzero((times > after) & (values > thr))
    return float(times[idx[0]]) if idx.size else None


def quiet_from(times: np.ndarray, level: np.ndarray, after: float) -> float | None:
    """Start of the first stretch after ``after`` where the level stays below QUIET_RMS for
    QUIET_HOLD_S (the end of speech)."""
    sel = times > after
    t, v = times[sel], level[sel]
    start = None
    for ti, vi in zip(t, v, strict=True):
        if vi < QUIET_RMS:
            if start is None:
                start = ti
            if ti - start >= QUIET_HOLD_S:
                return float(start)
        else:
            start = None
    return None


async def browser_scenario(args: argparse.Namespace, example: ModuleType) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    from talkstream.streaming.sdp import use_loopback_ice

    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("pipecat_latency: Chromium is needed: apt-get install chromium")
    use_loopback_ice()
    timed = instrumented_service_class()

    class Agent(example.Agent):  # type: ignore[misc,name-defined]
        def make_video_service(self) -> Any:
            return timed(engine=self.engine, avatar=self.avatar, stream_config=stream_config(args))

    agent = Agent(example.AgentConfig(script=[], service_options={"idle": False}))
    t0 = time.perf_counter()
    await agent.load()
    load_s = time.perf_counter() - t0
    results: dict[str, Any] = {"load_s": round(load_s, 1), "utterances": []}
    try:
        async with serve_app(agent.app()) as url, async_playwright() as p:
            browser = await p.chromium.launch_persistent_context(
                str(args.tmp / "profile"),
                executable_path=chromium,
                headless=True,
                args=CHROMIUM_FLAGS,
            )
            try:
                page = browser.pages[0] if browser.pages else await browser.new_page()
                query = "" if args.jitter_ms is None else f"&jitter_ms={args.jitter_ms}"
                await page.goto(f"{url}/?autostart=1{query}")
                await page.wait_for_function(
                    "window.ts && window.ts.state === 'connected'", timeout=30_000
                )
                origin_ms = await page.evaluate("performance.timeOrigin")
                await page.evaluate(STAMP_PROBE_JS, "#video")
                await page.evaluate(REST_PROBE_JS, await page.evaluate("ts.mouthBox"))
                await page.evaluate(f"({PLAYOUT_JS.strip()})(pc)")  # the page's connection
                conn = next(iter(agent.connections.values()))
                svc = conn.video
                await asyncio.sleep(3.0)  # the encoder's quality ramp; a still face to learn
                from pipecat.frames.frames import InterruptionFrame, TTSSpeakFrame

                queued_int: list[float] = []
                snaps: list[float] = []
                for k in range(args.utterances):
                    snaps.append(time.time())
                    await page.evaluate("window.__snap = true")
                    await asyncio.sleep(REST_STILL_S)
                    svc.rearm()
                    await conn.worker.queue_frame(TTSSpeakFrame(SENTENCES[k % len(SENTENCES)]))
                    await asyncio.sleep(args.interrupt_after_s)
                    queued_int.append(time.time())
                    await conn.worker.queue_frame(InterruptionFrame())
                    await asyncio.sleep(args.gap_s)
                got = await page.evaluate(
                    "({presented: ts.presented, mouth: ts.mouth, voice: ts.voice,"
                    " stamps: window.__stamps, rest: window.__rest, playout: window.__playout})"
                )
            finally:
                await browser.close()
        if args.raw_out:
            raw = {
                **got,
                "origin_ms": origin_ms,
                "first_audio_at": svc.first_audio_at,
                "interrupts_at": svc.interrupts_at,
                "queued_int": queued_int,
                "speech_blocks_at": svc.speech_blocks_at,
            }
            args.raw_out.write_text(json.dumps(raw))
        results.update(analyse_browser(got, origin_ms, svc, queued_int, snaps))
    finally:
        await agent.close()
    return results


def analyse_browser(
    got: dict[str, Any],
    origin_ms: float,
    svc: Any,
    queued_int: list[float],
    snaps: list[float] | None = None,
) -> dict[str, Any]:
    to_wall = lambda a: (np.asarray(a, dtype=np.float64) + origin_ms) / 1000  # noqa: E731
    presented = to_wall(got["presented"])
    mouth = np.asarray(got["mouth"], dtype=np.float64)
    mt, md = to_wall(mouth[:, 0]), mouth[:, 1]
    voice = np.asarray(got["voice"], dtype=np.float64)
    vt, vl = to_wall(voice[:, 0]), voice[:, 1]
    played = np.asarray(got.get("playout") or [], dtype=np.float64).reshape(-1, 3)[:, :2]
    pt, pl = to_wall(played[:, 0]), played[:, 1]
    first_audio = svc.first_audio_at
    # The still face's noise: frames before the first utterance (after the first second).
    still = md[(mt > mt[0] + 1.0) & (mt < first_audio[0])] if first_audio else md
    thr = max(3 * float(np.percentile(still, 99)) if still.size else 0.0, MOUTH_MIN_DIFF)
    # The service's own view: landmark motion of every rendered frame and when it left.
    motion = list(svc.kept_stream.motion_trace) if svc.kept_stream is not None else []
    m_pts = np.array([p for p, _ in motion], dtype=np.int64)
    m_val = np.array([v for _, v in motion], dtype=np.float64)
    m_at = np.array([svc.images_at.get(int(p), np.nan) for p in m_pts])
    still_m = m_val[m_at < first_audio[0]] if first_audio else m_val
    m_thr = max(5 * float(np.percentile(still_m, 99)) if still_m.size else 0.0, 1e-3)
    # Every presented frame's own index, from its stamp.
    st = np.asarray(got.get("stamps") or [], dtype=np.float64).reshape(-1, 2)
    s_at = to_wall(st[:, 0])
    s_idx = unwrap(st[:, 1].astype(np.int64), max(svc.images_at)) if st.size else st[:, 1]
    rest = np.asarray(got.get("rest") or [], dtype=np.float64).reshape(-1, 2)
    r_at, r_val = to_wall(rest[:, 0]), rest[:, 1]
    rows = []
    blocks = np.asarray(svc.speech_blocks_at)
    for k, t_in in enumerate(first_audio):
        mouth_at = first_above(mt, md, t_in, thr)
        voice_at = first_above(vt, vl, t_in, SPEECH_RMS)
        played_at = first_above(pt, pl, t_in, SPEECH_RMS) if pt.size else None
        row: dict[str, Any] = {
            "first_audio_in": t_in,
            "mouth_ms": None if mouth_at is None else round(1000 * (mouth_at - t_in), 1),
            **from_rest(r_at, r_val, snaps[k] if snaps and k < len(snaps) else None, t_in),
            "voice_ms": None if voice_at is None else round(1000 * (voice_at - t_in), 1),
        }
        if played_at is not None:
            row["playout_voice_ms"] = round(1000 * (played_at - t_in), 1)
        moving = np.flatnonzero((m_at > t_in) & (m_val > m_thr))
        if moving.size:
            row["service_mouth_ms"] = round(1000 * (m_at[moving[0]] - t_in), 1)
            # That very frame (or a later one, if it was never shown) on the browser's screen.
            shown = np.flatnonzero((s_at > t_in) & (s_idx >= m_pts[moving[0]]))
            if shown.size:
                row["moving_frame_shown_ms"] = round(1000 * (s_at[shown[0]] - t_in), 1)
        if mouth_at is not None and voice_at is not None:
            row["mouth_minus_voice_ms"] = round(1000 * (mouth_at - voice_at), 1)
        if k < len(queued_int) and k < len(svc.interrupts_at):
            t_q, t_arr = queued_int[k], svc.interrupts_at[k]
            before = blocks[blocks <= t_arr]
            if before.size:
                row["service_stop_ms"] = round(1000 * (before[-1] + FRAME_S - t_arr), 1)
            row["interrupt_transit_ms"] = round(1000 * (t_arr - t_q), 1)
            # The mouth comes to rest once the frames rendered from speech already fed to the
            # engine have played: the last moving frame the service emitted after the cut.
            settling = np.flatnonzero((m_at > t_arr) & (m_at < t_arr + 1.0) & (m_val > m_thr))
            row["service_mouth_rest_ms"] = (
                round(1000 * (m_at[settling[-1]] + FRAME_S - t_arr), 1) if settling.size else 0.0
            )
            quiet = quiet_from(vt, vl, t_q)
            if quiet is not None:
                row["browser_stop_ms"] = round(1000 * (quiet - t_q), 1)
            quiet = quiet_from(pt, pl, t_q) if pt.size else None
            if quiet is not None:
                row["playout_stop_ms"] = round(1000 * (quiet - t_q), 1)
        rows.append(row)
    span = presented[-1] - presented[0] if presented.size > 1 else 0.0
    col = lambda key: [r[key] for r in rows if r.get(key) is not None]  # noqa: E731
    return {
        "mouth_threshold": round(thr, 3),
        "utterances": rows,
        "presented_fps": round((presented.size - 1) / span, 2) if span else None,
        "median_first_mouth_ms": median(col("mouth_ms")),
        "median_mouth_from_rest_ms": median(col("mouth_from_rest_ms")),
        "median_first_voice_ms": median(col("voice_ms")),
        "median_playout_voice_ms": median(col("playout_voice_ms")),
        "median_service_mouth_ms": median(col("service_mouth_ms")),
        "median_moving_frame_shown_ms": median(col("moving_frame_shown_ms")),
        "median_mouth_minus_voice_ms": median(col("mouth_minus_voice_ms")),
        "median_service_stop_ms": median(col("service_stop_ms")),
        "median_browser_stop_ms": median(col("browser_stop_ms")),
        "median_playout_stop_ms": median(col("playout_stop_ms")),
        "median_service_mouth_rest_ms": median(col("service_mouth_rest_ms")),
        "median_interrupt_transit_ms": median(col("interrupt_transit_ms")),
        "matched": f"{len(col('mouth_ms'))}/{len(rows)}",
    }


# ----------------------------------------------------------------------------- scenario 2


async def conversation_scenario(
    args: argparse.Namespace, engine: Any, avatar: Any
) -> dict[str, Any]:
    from pipecat.frames.frames import (
        InterruptionFrame,
        OutputAudioRawFrame,
        OutputImageRawFrame,
        TTSSpeakFrame,
    )
    from pipecat.observers.base_observer import BaseObserver, FramePushed
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams
    from pipecat.processors.frame_processor import FrameDirection
    from pipecat.tests.utils import SleepFrame, run_test

    from talkstream.integrations.pipecat import META_KEY, EspeakTTSService, TalkstreamVideoService

    svc = TalkstreamVideoService(engine=engine, avatar=avatar, stream_config=stream_config(args))
    tts = EspeakTTSService()

    class Log(BaseObserver):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.frames: list[tuple[float, Any]] = []

        async def on_push_frame(self, data: FramePushed) -> None:
            if data.source is svc and data.direction == FrameDirection.DOWNSTREAM:
                self.frames.append((data.timestamp / 1e9, data.frame))

    # A turn every `turn_s`; `interruptions` of them are cut after 1-3 s, the others finish.
    n_turns = max(int(args.conversation_s // args.turn_s), 1)
    cut = set(np.linspace(0, n_turns - 1, min(args.interruptions, n_turns)).round().astype(int))
    rng = np.random.default_rng(0)
    frames: list[Any] = [SleepFrame(sleep=1.0)]
    for k in range(n_turns):
        frames.append(TTSSpeakFrame(SENTENCES[k % len(SENTENCES)]))
        if k in cut:
            wait = float(rng.uniform(1.0, 3.0))
            frames += [SleepFrame(sleep=wait), InterruptionFrame(), SleepFrame(args.turn_s - wait)]
        else:
            frames.append(SleepFrame(sleep=args.turn_s))
    log = Log()
    t0 = time.perf_counter()
    await run_test(
        Pipeline([tts, svc]),
        frames_to_send=frames,
        observers=[log],
        pipeline_params=PipelineParams(audio_out_sample_rate=48000),
        start_timeout=60,
    )
    wall = time.perf_counter() - t0
    images = [(t, f) for t, f in log.frames if isinstance(f, OutputImageRawFrame)]
    audio = [(t, f) for t, f in log.frames if isinstance(f, OutputAudioRawFrame)]
    it = np.array([t for t, _ in images])
    image_at = {f.metadata[META_KEY]["index"]: t for t, f in images}
    push_gap_ms = [
        1000 * abs(image_at[f.metadata[META_KEY]["index"]] - t)
        for t, f in audio
        if f.metadata[META_KEY]["index"] in image_at
    ]
    # Cumulative offset within each run of consecutive speech blocks.
    offsets_ms: list[float] = []
    emitted = 0
    run_first: int | None = None
    prev: int | None = None
    for _, f in log.frames:
        if isinstance(f, OutputAudioRawFrame):
            k = f.metadata[META_KEY]["index"]
            if prev is None or k != prev + 1:
                run_first, emitted = k, 0
            emitted += f.num_frames
            prev = k
        elif isinstance(f, OutputImageRawFrame) and prev is not None:
            k = f.metadata[META_KEY]["index"]
            if k == prev and run_first is not None:
                offsets_ms.append(1000 * (emitted / 48000 - (k - run_first + 1) * FRAME_S))
    gaps = np.diff(it) if it.size > 1 else np.array([0.0])
    return {
        "wall_s": round(wall, 1),
        "turns": n_turns,
        "interruptions": len(cut),
        "images": int(it.size),
        "output_fps": round((it.size - 1) / (it[-1] - it[0]), 2) if it.size > 1 else None,
        "worst_gap_ms": round(1000 * float(gaps.max()), 1),
        "speech_s": round(sum(f.num_frames for _, f in audio) / 48000, 2),
        "median_av_offset_ms": median([abs(o) for o in offsets_ms]),
        "max_av_offset_ms": round(max((abs(o) for o in offsets_ms), default=0.0), 2),
        "median_audio_image_push_gap_ms": median(push_gap_ms),
        "max_audio_image_push_gap_ms": round(max(push_gap_ms, default=0.0), 2),
        "stream_stats": svc.last_snapshot,
    }


# ----------------------------------------------------------------------------- main


def stream_config(args: argparse.Namespace) -> Any:
    from talkstream.streaming.config import StreamConfig

    return StreamConfig(early_speech_start=not args.late_start)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--utterances", type=int, default=6, help="browser utterances (6)")
    p.add_argument(
        "--interrupt-after-s",
        type=float,
        default=1.5,
        help="interrupt each browser utterance this long after queueing it (1.5)",
    )
    p.add_argument("--gap-s", type=float, default=2.0, help="silence after each (2.0)")
    p.add_argument(
        "--conversation-s", type=float, default=120.0, help="scenario 2 length in seconds (120)"
    )
    p.add_argument("--turn-s", type=float, default=6.0, help="scenario 2 turn length (6)")
    p.add_argument("--interruptions", type=int, default=10, help="scenario 2 interruptions (10)")
    p.add_argument("--skip-browser", action="store_true", help="scenario 2 only")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--raw-out", type=Path, default=None, help="write the browser's raw probe")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    p.add_argument(
        "--late-start",
        action="store_true",
        help="speech arriving while idle starts after the silence already fed ahead of the "
        "display (StreamConfig.early_speech_start=False, the behaviour before it)",
    )
    p.add_argument(
        "--jitter-ms",
        type=int,
        default=None,
        help="a jitter buffer for the page to ask Chromium for (default: Chromium's own)",
    )
    p.add_argument(
        "--untuned",
        default="",
        help="comma list of SmallWebRTC fixes to leave out, for comparisons: video (pipecat's "
        "own live video pacing), interruption (the audio track kept on a barge-in), audio "
        "(pipecat's audio handoff), reports (aiortc's sender reports at sending time, and no "
        "audio lead)",
    )
    return p.parse_args(argv)


UNTUNED = {
    "audio": "steady_smallwebrtc_audio",
    "video": "prompt_live_video",
    "interruption": "drop_smallwebrtc_audio_on_interruption",
    "reports": "sender_reports_in_media_time",
}


def leave_out(names: str) -> list[str]:
    """Make the named fixes of talkstream.integrations.smallwebrtc no-ops (before the example
    applies them with tune_smallwebrtc())."""
    import talkstream.integrations.smallwebrtc as sw

    out = [n for n in names.split(",") if n]
    for name in out:
        if name not in UNTUNED:
            raise SystemExit(f"pipecat_latency: --untuned takes {', '.join(UNTUNED)}, not {name}")
        setattr(sw, UNTUNED[name], lambda: False)
    return out


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    import torch

    torch.set_num_threads(args.threads)
    example = load_example()
    result: dict[str, Any] = {
        "early_speech_start": not args.late_start,
        "untuned": leave_out(args.untuned),
        "page_jitter_ms": args.jitter_ms,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_before": load_avg(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = Path(tmp)
        if not args.skip_browser:
            result["browser"] = await browser_scenario(args, example)
            result["load_after_browser"] = load_avg()
    agent = example.Agent(example.AgentConfig(script=[]))
    await agent.load()  # the shipped tiny model, idle motion on
    try:
        result["conversation"] = await conversation_scenario(args, agent.engine, agent.avatar)
    finally:
        await agent.close()
    result["load_after"] = load_avg()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result = asyncio.run(amain(args))
    b = result.get("browser", {})
    c = result["conversation"]
    print(
        f"load average (1/5/15 min): before {result['load_before']}, after {result['load_after']}"
    )
    if b:
        print(
            f"browser: first moving mouth after first TTS audio {b['median_first_mouth_ms']} ms "
            f"(median, {b['matched']} utterances), first voice {b['median_first_voice_ms']} ms, "
            f"mouth - voice {b['median_mouth_minus_voice_ms']} ms; presented "
            f"{b['presented_fps']} fps; at the service's output the mouth moves "
            f"{b['median_service_mouth_ms']} ms after the first TTS audio, and Chromium shows "
            f"that frame {b['median_moving_frame_shown_ms']} ms after it; the mouth first "
            f"differs visibly from its rest pose in Chromium {b['median_mouth_from_rest_ms']} ms "
            "after it"
        )
        print(
            f"interruption: speech stopped {b['median_service_stop_ms']} ms after it reached the "
            f"service, {b['median_browser_stop_ms']} ms after it was queued as heard in the "
            f"browser (pipeline transit {b['median_interrupt_transit_ms']} ms); the mouth at rest "
            f"{b['median_service_mouth_rest_ms']} ms after it (service output)"
        )
        print(
            "the voice as Chromium hands it out for playout (not through the page's Web Audio "
            f"probe): first heard {b['median_playout_voice_ms']} ms after the first TTS audio, "
            f"quiet {b['median_playout_stop_ms']} ms after the interruption was queued"
        )
    print(
        f"service output over {c['wall_s']} s, {c['interruptions']} interruptions: "
        f"{c['output_fps']} fps (worst gap {c['worst_gap_ms']} ms), A/V offset median "
        f"{c['median_av_offset_ms']} ms, max {c['max_av_offset_ms']} ms; audio-image push gap "
        f"median {c['median_audio_image_push_gap_ms']} ms, "
        f"max {c['max_audio_image_push_gap_ms']} ms"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
