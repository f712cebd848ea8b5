"""Where does the pipecat path lose lip motion? Each stage measured by frame index (issue 12).

    python benchmarks/experiments/pipecat_stages.py [--seconds 25] [--variant NAME] [--out F]

Runs the pipecat example agent (examples/pipecat_agent.py: espeak-ng TTS ->
TalkstreamVideoService -> SmallWebRTC) to headless Chromium, as the pipecat path of
``benchmarks/browser_lipsync.py`` does, with every emitted image stamped with its frame index
(12 black/white 16 px cells in the top-left corner, away from the face). Three stages:

1. service output: every ``OutputImageRawFrame`` and speech block the service pushes, by index
   (content hash: frames the stream repeated);
2. transport send: each image pipecat's SmallWebRTC video track hands to the encoder (queue
   depth, send time, RTP pts);
3. browser: each frame Chromium presented (``requestVideoFrameCallback``), its index read back
   from the stamp, and a grey face crop.

dlib's mouth opening (same crop everywhere) is correlated with the speech envelope *by frame
index* (the RMS of the 40 ms block the service emitted with that image), so stage 3 against
stage 1 isolates what the video path loses, independent of audio playout; the usual measure
(against the voice the page heard, best shift) is reported beside it. ``--variant`` picks a
change to test (see VARIANTS); run variants interleaved with ``base``.

``browser.playout``: the voice as Chromium plays it, not as the page's Web Audio probe hears
it. The page polls the audio receiver's ``getSynchronizationSources()`` every 5 ms (WebRTC
records the RTP timestamp of each audio frame it hands out for playout, and when); aiortc's
RTP timestamp origin is set to 0 in this process, so that timestamp is the audio track's pts,
and the recorder knows which pts each speech block went out at. Hence, per presented frame,
the A/V offset (the audio being played at its display time minus its own audio block), and
the mouth's r against the played voice beside r against each frame's own voice (a perfect
A/V path), over the whole run and from 6 s on. ``STAGES_LIGHT=1`` drops the page's face
crops (no r): the offsets and jitter buffers with less load on the browser.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import itertools

import browser_lipsync as bl

from talkstream.benchmarking.lipsync import MouthMeter, lagged_r, pearson, resample_series
from talkstream.benchmarking.stamp import STAMP_BITS, STAMP_CELL, stamp

# Pixels of the stamp, read in the page at every presented frame.
PROBE_JS = """
(args) => {
  const [bits, cell, box, light] = args;
  const v = document.getElementById("video");
  const c = document.createElement("canvas");
  const g = c.getContext("2d", { willReadFrequently: true });
  window.__st = [];
  window.__stOn = true;
  const step = (now, md) => {
    if (!window.__stOn) return;
    c.width = bits * cell; c.height = cell;
    g.drawImage(v, 0, 0, bits * cell, cell, 0, 0, bits * cell, cell);
    const px = g.getImageData(0, 0, bits * cell, cell).data;
    let idx = 0;
    for (let b = 0; b < bits; b++) {
      const i = 4 * ((cell >> 1) * bits * cell + b * cell + (cell >> 1));
      if (px[i] > 128) idx |= 1 << b;
    }
    if (light) {  // the stamp only: no face crops (a lighter load on the browser)
      window.__st.push([md.expectedDisplayTime || now, md.rtpTimestamp ?? null,
                        md.presentedFrames, idx, ""]);
      v.requestVideoFrameCallback(step);
      return;
    }
    const w = box[2] - box[0], h = box[3] - box[1];
    c.width = w; c.height = h;
    g.drawImage(v, box[0], box[1], w, h, 0, 0, w, h);
    const f = g.getImageData(0, 0, w, h).data;
    const grey = new Uint8Array(w * h);
    for (let i = 0; i < grey.length; i++) {
      grey[i] = (f[4 * i] * 77 + f[4 * i + 1] * 150 + f[4 * i + 2] * 29) >> 8;
    }
    let s = "";
    for (let i = 0; i < grey.length; i += 8192) {
      s += String.fromCharCode.apply(null, grey.subarray(i, i + 8192));
    }
    window.__st.push([md.expectedDisplayTime || now, md.rtpTimestamp ?? null,
                      md.presentedFrames, idx, btoa(s)]);
    v.requestVideoFrameCallback(step);
  };
  v.requestVideoFrameCallback(step);
  // What Chromium's audio receiver delivers for playout, and when: the RTP timestamp of the
  // newest audio frame handed to the track (getSynchronizationSources: WebRTC's SourceTracker
  // records it at playout, not at arrival). Every 5 ms, when it changes. This is the path
  // the <video> element plays, without the page's Web Audio level probe in between.
  window.__play = [];
  const aRecv = pc.getReceivers().find((r) => r.track && r.track.kind === "audio");
  let lastRtp = null;
  const playPoll = setInterval(() => {
    if (!window.__stOn) { clearInterval(playPoll); return; }
    for (const s of aRecv.getSynchronizationSources()) {
      if (s.rtpTimestamp !== lastRtp) {
        lastRtp = s.rtpTimestamp;
        window.__play.push([performance.now(), s.timestamp - performance.timeOrigin,
                            s.rtpTimestamp]);
      }
    }
  }, 5);
  // The first 4 s, every 20 ms: when audio packets arrive, when their playout starts, when
  // video frames are decoded (what a connection's start looks like to the receiver).
  window.__early = [];
  const t0 = performance.now();
  const early = async () => {
    if (!window.__stOn || performance.now() - t0 > 4000) return;
    const rep = await pc.getStats();
    const row = [performance.now()];
    rep.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "audio") {
        row.push(s.packetsReceived, s.jitterBufferEmittedCount, s.jitterBufferDelay);
      }
    });
    rep.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") row.push(s.framesDecoded ?? 0);
    });
    window.__early.push(row);
    setTimeout(early, 20);
  };
  early();
  // Chromium's receive side, once a second: jitter buffer delays of the audio and the video.
  window.__stats = [];
  const poll = async () => {
    if (!window.__stOn || !pc) return;
    const rep = await pc.getStats();
    const row = { t: performance.now() };
    rep.forEach((s) => {
      if (s.type === "inbound-rtp") {
        row[s.kind] = { jbd: s.jitterBufferDelay, n: s.jitterBufferEmittedCount,
                        target: s.jitterBufferTargetDelay, min: s.jitterBufferMinimumDelay,
                        proc: s.totalProcessingDelay, dec: s.framesDecoded ?? null,
                        // NetEq's time stretching and concealment (audio only)
                        recv: s.totalSamplesReceived ?? null, conc: s.concealedSamples ?? null,
                        ins: s.insertedSamplesForDeceleration ?? null,
                        rem: s.removedSamplesForAcceleration ?? null };
      }
    });
    window.__stats.push(row);
    setTimeout(poll, 1000);
  };
  poll();
}
"""
# STAGES_LIGHT=1: no face crops in the page (no lip-sync r): the A/V offsets and jitter
# buffers with less load on the browser, to see what the measurement itself costs.
LIGHT = bool(os.environ.get("STAGES_LIGHT"))
TAKE_JS = "() => { const out = window.__st; window.__st = []; return out; }"


def grey(img: np.ndarray) -> np.ndarray:
    # All in uint16: in numpy 2 a uint8 channel times 150 stays uint8 and wraps (which made
    # the service side's crops dark and garbled until 2026-12-06).
    c = img.astype(np.uint16)
    return ((c[..., 0] * 77 + c[..., 1] * 150 + c[..., 2] * 29) >> 8).astype(np.uint8)


class Recorder:
    def __init__(self) -> None:
        self.images: dict[int, tuple[float, str, np.ndarray]] = {}  # index -> (t, hash, crop)
        self.audio: dict[int, tuple[float, float]] = {}  # index -> (t, rms)
        self.added: list[tuple[float, int, int]] = []  # transport: (t, index, queue depth)
        self.sent: list[tuple[float, int, int]] = []  # transport: (t, index, pts)
        self.box: list[int] = []
        self.service_options: dict[str, Any] = {}  # passed to the service by a variant
        self.audio_created = 0.0
        self.loop_lag: list[float] = []
        self.loop_lag_t: list[float] = []
        self.draws: list[tuple[float, float, int]] = []  # pipecat video draws: t, s, queue
        self.page_js: str | None = None  # run in the page once connected, by a variant
        self.page_js_arg: Any = None  # its argument
        self.page_query = ""  # added to the page's URL, by a variant
        self.audio_loud: list[bool] = []
        self.audio_added: dict[str, tuple[float, int]] = {}  # block hash -> (t, first pts)
        self.audio_emitted: list[tuple[float, str]] = []  # speech blocks: (t, hash)
        self.audio_sent: list[tuple[float, int]] = []  # RawAudioTrack.recv: (t, pts)
        self.audio_hash: dict[int, str] = {}  # index -> its speech block's hash
        self.queue_speech: list[tuple[float, float]] = []  # service._queue_speech: (t, s)
        self.yield_after_speech = False  # a variant: the service yields after each TTS chunk
        self.rtp_sent: list[tuple[float, int]] = []  # (t, payload type) of each RTP packet
        self.audio_track: Any = None  # pipecat's audio track of the connection


def install(rec: Recorder, variant: str) -> None:
    """Hook pipecat's SmallWebRTC video track (stage 2) and apply the variant."""
    import pipecat.transports.smallwebrtc.transport as tr

    cls = tr.RawVideoTrack
    orig_add, orig_recv = cls.add_video_frame, cls.recv

    def add(self: Any, frame: Any) -> None:
        order = self.__dict__.setdefault("_stage_order", deque())
        idx = frame.metadata.get("talkstream", {}).get("index", -1)
        rec.added.append((time.monotonic(), idx, self._video_buffer.qsize()))
        order.append(idx)
        orig_add(self, frame)

    async def recv(self: Any) -> Any:
        vf = await orig_recv(self)
        idx = self._stage_order.popleft()
        rec.sent.append((time.monotonic(), idx, int(vf.pts)))
        return vf

    cls.add_video_frame, cls.recv = add, recv
    # The audio track: when it was made, and every recv (wall time, pts), to see bursts.
    acls = tr.RawAudioTrack
    orig_init, orig_arecv = acls.__init__, acls.recv

    def ainit(self: Any, *a: Any, **kw: Any) -> None:
        orig_init(self, *a, **kw)
        rec.audio_created = time.monotonic()
        rec.audio_track = self

    async def arecv(self: Any) -> Any:
        f = await orig_arecv(self)
        rec.audio_sent.append((time.monotonic(), int(f.pts)))
        # Underruns: silence handed out right between two chunks of speech (the writer, which
        # waits for each block to be consumed, was late): each pushes the voice 10 ms later.
        loud = bool(np.abs(f.to_ndarray()).max() > 300)
        rec.audio_loud.append(loud)
        return f

    orig_addb = acls.add_audio_bytes

    def addb(self: Any, audio_bytes: bytes) -> Any:
        # Where this block's first sample will go out: the pts after what is queued.
        first = self._timestamp + sum(len(c) for c, _ in self._chunk_queue) // 2
        key = hashlib.blake2b(audio_bytes, digest_size=8).hexdigest()
        rec.audio_added[key] = (time.monotonic(), first)
        return orig_addb(self, audio_bytes)

    acls.__init__, acls.recv, acls.add_audio_bytes = ainit, arecv, addb
    # aiortc draws each sender's RTP timestamp origin at random: 0 here, so that the RTP
    # timestamp the browser reports is the track's own pts (SSRCs stay random).
    import aiortc.rtcrtpsender as rs

    draw = rs.random32

    def origin_zero() -> int:
        return 0 if sys._getframe(1).f_code.co_name == "_run_rtp" else draw()

    rs.random32 = origin_zero
    # Every RTP packet aiortc sends (monotonic time, payload type): when the audio leaves.
    import aiortc.rtcdtlstransport as dt

    send_rtp = dt.RTCDtlsTransport._send_rtp

    async def sent_rtp(self: Any, data: bytes) -> None:
        if len(data) > 1 and not 192 <= data[1] <= 223:  # RTP, not RTCP
            rec.rtp_sent.append((time.monotonic(), data[1] & 0x7F))
        await send_rtp(self, data)

    dt.RTCDtlsTransport._send_rtp = sent_rtp
    VARIANTS[variant](rec)


def _no_remb(rec: Recorder) -> None:
    """Hold the VP8 bitrate like serve (no REMB-driven encoder restarts)."""
    import pipecat.transports.smallwebrtc.connection as conn

    from talkstream.streaming.sessions import hold_video_bitrate

    orig = conn.SmallWebRTCConnection.initialize

    async def initialize(self: Any, *a: Any, **kw: Any) -> Any:
        out = await orig(self, *a, **kw)
        for t in self.pc.getTransceivers():
            if t.kind == "video" and t.sender is not None:
                hold_video_bitrate(t.sender)
        return out

    conn.SmallWebRTCConnection.initialize = initialize


def _media_pts(rec: Recorder) -> None:
    """Stamp each video frame's RTP time from the service's frame index (its media time),
    as serve's tracks do, instead of aiortc's 30 fps counter."""
    import fractions

    import pipecat.transports.smallwebrtc.transport as tr
    from av import VideoFrame

    cls = tr.RawVideoTrack

    async def recv(self: Any) -> Any:
        raw = await self._video_buffer.get()
        rgb = np.frombuffer(raw.image, dtype=np.uint8).reshape((self._height, self._width, 3))
        vf = VideoFrame.from_ndarray(rgb, format="rgb24")
        idx = raw.metadata.get("talkstream", {}).get("index", 0)
        vf.pts, vf.time_base = idx * 3600, fractions.Fraction(1, 90_000)
        self._stage_order.popleft()
        rec.sent.append((time.monotonic(), idx, int(vf.pts)))
        return vf

    cls.recv = recv


def _pipecat_audio(rec: Recorder) -> None:
    """pipecat's own audio handoff: the example's steady_smallwebrtc_audio() made a no-op."""
    import talkstream.integrations.smallwebrtc as sw

    sw.steady_smallwebrtc_audio = lambda: False  # type: ignore[assignment]


def _pipecat_silence(rec: Recorder) -> None:
    """pipecat's own audio pacing: the example's skip_late_silence() made a no-op."""
    import talkstream.integrations.smallwebrtc as sw

    sw.skip_late_silence = lambda: False  # type: ignore[assignment]


def _pipecat_video(rec: Recorder) -> None:
    """pipecat's own live video pacing: the example's prompt_live_video() made a no-op."""
    import talkstream.integrations.smallwebrtc as sw

    sw.prompt_live_video = lambda: False  # type: ignore[assignment]


def _jb_target(rec: Recorder) -> None:
    """The page asks Chromium for a 60 ms jitter buffer on both receivers from the first
    packet (?jitter_ms=60; the example page leaves Chromium's default)."""
    rec.page_query = "&jitter_ms=60"


def _jb_late(rec: Recorder) -> None:
    """Chromium's default at first, then 60 ms asked for once connected."""
    rec.page_js = "pc.getReceivers().forEach((r) => { r.jitterBufferTarget = 60; })"


JB_VIDEO_JS = """
(ms) => pc.getReceivers().forEach((r) => {
  if (r.track && r.track.kind === "video") r.jitterBufferTarget = ms;
})
"""


def _jb_video(rec: Recorder) -> None:
    """Once connected, the page asks for a 50 ms jitter buffer on the video only: about
    what Chromium's audio jitter buffer holds, so its A/V sync has nothing to catch up."""
    rec.page_js = JB_VIDEO_JS.strip() + "\n"
    rec.page_js_arg = 50


def _yield_speech(rec: Recorder) -> None:
    """The service yields to the event loop after each TTS chunk it takes in."""
    rec.yield_after_speech = True


def _media_pts_jb_video(rec: Recorder) -> None:
    """Both media_pts and jb_video."""
    _media_pts(rec)
    _jb_video(rec)


def _lead(ms: float) -> Any:
    # The service's voice ms ahead of its images (sender reports in media time).
    def variant(rec: Recorder) -> None:
        rec.service_options = {"audio_lead_ms": ms}

    return variant


def _no_catch_up(rec: Recorder) -> None:
    """The example's catch_up_in_pauses() made a no-op (the voice's backlog stays)."""
    import talkstream.integrations.smallwebrtc as sw

    sw.catch_up_in_pauses = lambda: False  # type: ignore[assignment]


def _wall_reports(rec: Recorder) -> None:
    """aiortc's own sender reports (wall time at sending): the example's
    sender_reports_in_media_time() made a no-op (so no lead either)."""
    import talkstream.integrations.smallwebrtc as sw

    sw.sender_reports_in_media_time = lambda: False  # type: ignore[assignment]


VARIANTS = {
    "lead_0": _lead(0.0),
    "lead_40": _lead(40.0),
    "lead_80": _lead(80.0),
    "lead_120": _lead(120.0),
    "wall_reports": _wall_reports,
    "no_catch_up": _no_catch_up,
    "pipecat_silence": _pipecat_silence,
    "yield_speech": _yield_speech,
    "jb_video": _jb_video,
    "media_pts_jb_video": _media_pts_jb_video,
    "jb_target": _jb_target,
    "jb_late": _jb_late,
    "pipecat_audio": _pipecat_audio,
    "pipecat_video": _pipecat_video,
    "base": lambda rec: None,
    "no_remb": _no_remb,
    "media_pts": _media_pts,
}


def make_agent(example: Any, rec: Recorder, options: dict[str, Any]) -> Any:
    from pipecat.frames.frames import OutputImageRawFrame, TTSAudioRawFrame
    from pipecat.processors.frame_processor import FrameDirection

    from talkstream.integrations.pipecat import META_KEY, TalkstreamVideoService

    class Stamping(TalkstreamVideoService):  # type: ignore[misc]
        async def push_frame(
            self, frame: Any, direction: FrameDirection = FrameDirection.DOWNSTREAM
        ) -> None:
            meta = getattr(frame, "metadata", {}).get(META_KEY)
            now = time.monotonic()
            if meta is not None and isinstance(frame, OutputImageRawFrame):
                w, h = frame.size
                img = np.frombuffer(frame.image, np.uint8).reshape(h, w, 3).copy()
                digest = hashlib.blake2b(img.tobytes(), digest_size=8).hexdigest()
                x0, y0, x1, y1 = rec.box
                rec.images[meta["index"]] = (now, digest, grey(img[y0:y1, x0:x1]))
                stamp(img, meta["index"])
                frame.image = img.tobytes()
            elif meta is not None and isinstance(frame, TTSAudioRawFrame):
                pcm = np.frombuffer(frame.audio, np.int16).astype(np.float64) / 32768
                rec.audio[meta["index"]] = (now, float(np.sqrt(np.mean(pcm**2))))
                key = hashlib.blake2b(frame.audio, digest_size=8).hexdigest()
                rec.audio_emitted.append((now, key))
                rec.audio_hash[meta["index"]] = key
            await super().push_frame(frame, direction)

        async def _queue_speech(self, frame: Any) -> None:
            t = time.perf_counter()
            await super()._queue_speech(frame)
            rec.queue_speech.append((time.monotonic(), time.perf_counter() - t))
            if rec.yield_after_speech:
                await asyncio.sleep(0)

    class StageAgent(example.Agent):  # type: ignore[misc,name-defined]
        def make_video_service(self) -> Any:
            return Stamping(engine=self.engine, avatar=self.avatar, **rec.service_options)

    return StageAgent(
        example.AgentConfig(
            script=bl.SENTENCES, words_per_minute=bl.PIPECAT_WPM, service_options=options
        )
    )


async def run(seconds: float, variant: str, tmp: Path) -> tuple[Recorder, dict[str, Any]]:
    from playwright.async_api import async_playwright

    from talkstream.benchmarking.browser import CHROMIUM_FLAGS
    from talkstream.benchmarking.local import listen_on_loopback, load_example
    from talkstream.streaming.sdp import use_loopback_ice

    example = load_example()
    use_loopback_ice()
    rec = Recorder()
    install(rec, variant)
    agent = make_agent(example, rec, {})
    await agent.load()
    rec.box = example.boxes(agent.avatar)[0]
    runner, url = await listen_on_loopback(agent.app())
    got: dict[str, Any] = {}

    async def lag_probe() -> None:  # the event loop's lateness, every 10 ms
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            rec.loop_lag.append(time.monotonic() - t - 0.01)
            rec.loop_lag_t.append(t)

    probe = asyncio.create_task(lag_probe())
    watchdog = StallWatch(threading.get_ident()) if os.environ.get("STAGES_STALL_STACKS") else None
    try:
        async with async_playwright() as p:
            ctx = await p.chromium.launch_persistent_context(
                str(tmp / "profile"),
                executable_path="/usr/bin/chromium",
                headless=True,
                args=CHROMIUM_FLAGS,
            )
            try:
                page = ctx.pages[0] if ctx.pages else await ctx.new_page()
                await page.goto(f"{url}/?autostart=1{rec.page_query}")
                await page.wait_for_function(
                    "window.ts && window.ts.state === 'connected' && ts.faceBox", timeout=60_000
                )
                if rec.page_js:
                    await page.evaluate(rec.page_js, rec.page_js_arg)
                await page.evaluate(PROBE_JS, [STAMP_BITS, STAMP_CELL, rec.box, LIGHT])
                frames: list[Any] = []
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    await asyncio.sleep(1.0)
                    frames += await page.evaluate(TAKE_JS)
                await page.evaluate("window.__stOn = false")
                frames += await page.evaluate(TAKE_JS)
                got = {
                    "frames": frames,
                    "voice": await page.evaluate("ts.voice"),
                    "stats": await page.evaluate("window.__stats"),
                    "play": await page.evaluate("window.__play"),
                    "early": await page.evaluate("window.__early"),
                    "first_presented_ms": await page.evaluate("ts.presented[0]"),
                    # performance.now() + timeOrigin = time.time(): map to monotonic.
                    "origin_ms": await page.evaluate("performance.timeOrigin")
                    + 1000 * (time.monotonic() - time.time()),
                }
            finally:
                await ctx.close()
    finally:
        probe.cancel()
        if watchdog is not None:
            watchdog.stop()
        await runner.cleanup()
        await agent.close()
    return rec, got


class StallWatch:
    """Where the event loop is stuck: a thread that samples the loop thread's stack whenever
    the loop has not ticked for 40 ms (STAGES_STALL_STACKS=1; printed at the end)."""

    def __init__(self, loop_thread: int) -> None:
        import traceback

        self._tb = traceback
        self._loop = asyncio.get_running_loop()
        self._tid = loop_thread
        self._last = time.monotonic()
        self._stop = False
        self.samples: dict[str, int] = {}
        self._loop.call_soon(self._tick)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        self._last = time.monotonic()
        if not self._stop:
            self._loop.call_later(0.005, self._tick)

    def _run(self) -> None:
        while not self._stop:
            time.sleep(0.01)
            if time.monotonic() - self._last > 0.04:
                frame = sys._current_frames().get(self._tid)
                if frame is not None:
                    # The innermost frames, and the innermost of this project's or pipecat's
                    # (what started a lazy import, say).
                    full = self._tb.extract_stack(frame)
                    ours = [
                        f for f in full if "talkstream" in f.filename or "pipecat/" in f.filename
                    ]
                    stack = [*full[-4:], "...", *ours[-3:]]
                    key = " <- ".join(
                        f if isinstance(f, str) else f"{Path(f.filename).name}:{f.lineno}:{f.name}"
                        for f in reversed(stack)
                    )
                    self.samples[key] = self.samples.get(key, 0) + 1

    def stop(self) -> None:
        self._stop = True
        for key, n in sorted(self.samples.items(), key=lambda kv: -kv[1])[:15]:
            print(f"stall sample x{n}: {key}", file=sys.stderr)


def audio_path(rec: Recorder, aus: np.ndarray) -> dict[str, Any]:
    """Per speech block: service push -> handed to the audio track -> its first sample sent
    (the track's recv), in ms; medians over the first and the last 4 s of blocks."""
    sent_at = dict(zip(aus[:, 1].astype(int), aus[:, 0], strict=True))
    rows = []
    for t, key in rec.audio_emitted:
        if key in rec.audio_added:
            ta, first = rec.audio_added[key]
            ts = sent_at.get(first)
            if ts is not None:
                rows.append((t, ta - t, ts - ta))
    if len(rows) < 20:
        return {}
    r = np.array(rows)
    SERIES["audio_path"] = r  # per block: push time, push -> track, track -> first sample out
    head, tail = r[:, 0] < r[0, 0] + 4, r[:, 0] > r[-1, 0] - 4
    return {
        "audio_push_to_track_ms_first_last": [
            round(1000 * float(np.median(r[head, 1])), 1),
            round(1000 * float(np.median(r[tail, 1])), 1),
        ],
        "audio_track_to_sent_ms_first_last": [
            round(1000 * float(np.median(r[head, 2])), 1),
            round(1000 * float(np.median(r[tail, 2])), 1),
        ],
        "audio_blocks_matched": len(rows),
    }


def underruns(loud: list[bool], span: int = 3) -> int:
    """Runs of at most ``span`` silent 10 ms chunks with speech on both sides."""
    n, i, out = len(loud), 0, 0
    while i < n:
        if not loud[i]:
            j = i
            while j < n and not loud[j]:
                j += 1
            if i > 0 and j < n and j - i <= span:
                out += j - i
            i = j
        else:
            i += 1
    return out


SERIES: dict[str, np.ndarray] = {}


def best_voice_shift(
    ref: np.ndarray, voice: np.ndarray, t0: float, shifts: range
) -> tuple[float, int] | None:
    """Best (r, shift ms) of ``ref`` (40 ms grid from ``t0``, s) against the page's voice level
    ((ms, level) rows) moved by each of ``shifts``; None when no shift gives an r."""
    best = None
    for shift_ms in shifts:
        v = bl.grid_mean(voice[:, 0] / 1000 - shift_ms / 1000, voice[:, 1], t0, len(ref))
        r = pearson(ref, v)
        if r is not None and (best is None or r > best[0]):
            best = (r, shift_ms)
    return best


def playout(
    rec: Recorder, got: dict[str, Any], grid: np.ndarray, opening: np.ndarray, voice: np.ndarray
) -> dict[str, Any]:
    """Lips and voice as Chromium plays them, from its audio receiver's playout records.

    For each time on ``grid`` (page clock, s): the audio pts being played then (the newest
    RTP timestamp delivered for playout, advanced at 48 kHz since), hence the service's own
    speech envelope at that pts: the voice the element plays, without the Web Audio probe.
    Reports the mouth's r against it (best single shift), the A/V offset of each presented
    frame's own audio block, and where the Web Audio probe's voice sits against it."""
    pm = playout_map(got)
    if pm is None:
        return {}
    starts, rms = [], []
    for i, key in rec.audio_hash.items():
        if key in rec.audio_added:
            starts.append(rec.audio_added[key][1])
            rms.append(rec.audio[i][1])
    if len(starts) < 50:
        return {}
    o = np.argsort(starts)
    st, rm = np.asarray(starts, np.float64)[o], np.asarray(rms)[o]

    def pts_at(t: np.ndarray) -> np.ndarray:
        return pts_playing(pm, t)

    def env_at(p: np.ndarray) -> np.ndarray:
        j = np.searchsorted(st, p, side="right") - 1
        out = np.zeros(p.shape)
        inside = (j >= 0) & (p - st[np.clip(j, 0, None)] < 1920)
        out[inside] = rm[j[inside]]
        out[np.isnan(p)] = np.nan
        return out

    def best_r(env_of: Any, part: np.ndarray) -> tuple[float, int] | None:
        out = None
        for shift_ms in range(-200, 601, 20):
            e = env_of(grid + shift_ms / 1000)
            ok = np.isfinite(e) & np.isfinite(opening) & part
            r = pearson(opening[ok], e[ok])
            if r is not None and (out is None or r > out[0]):
                out = (round(r, 3), shift_ms)
        return out

    # The voice each presented frame was emitted with, at that frame's display time: what a
    # perfect A/V path would play (the same shift search).
    b_t0, b_i0 = SERIES["b_t"], SERIES["b_idx"]
    own_pts = np.array(
        [
            rec.audio_added[rec.audio_hash[int(i)]][1]
            if int(i) in rec.audio_hash and rec.audio_hash[int(i)] in rec.audio_added
            else -1e12
            for i in b_i0
        ]
    )

    def own_env(t: np.ndarray) -> np.ndarray:
        k = np.clip(np.searchsorted(b_t0, t, side="right") - 1, 0, len(b_t0) - 1)
        return env_at(own_pts[k] + (t - b_t0[k]) * 48000)

    everything = np.ones(len(grid), bool)
    later = grid >= grid[0] + 6.0
    best = best_r(lambda t: env_at(pts_at(t)), everything)
    r_parts = {
        "played_all": best,
        "own_all": best_r(own_env, everything),
        "played_after_6s": best_r(lambda t: env_at(pts_at(t)), later),
        "own_after_6s": best_r(own_env, later),
    }
    # The Web Audio probe's voice, same shifts and grid: the like-for-like comparison.
    best_probe = None
    for shift_ms in range(-200, 601, 20):
        v = bl.grid_mean(voice[:, 0] / 1000 - shift_ms / 1000, voice[:, 1], grid[0], len(grid))
        ok = np.isfinite(v) & np.isfinite(opening)
        r = pearson(opening[ok], v[ok])
        if r is not None and (best_probe is None or r > best_probe[0]):
            best_probe = (round(r, 3), shift_ms)
    # The Web Audio probe against the playout: best shift of the probe's voice vs the
    # played envelope, per 4 s window (> 0: the probe hears it later).
    probe = []
    e_grid = env_at(pts_at(grid))
    for w0 in range(0, len(grid) - 100, 100):
        bw = best_voice_shift(e_grid[w0 : w0 + 100], voice, grid[w0], range(-100, 301, 10))
        if bw is not None and bw[0] > 0.5:
            probe.append(bw[1])
    return {
        "dlib_vs_voice_played": {"r": best[0], "voice_after_mouth_ms": best[1]} if best else None,
        "dlib_vs_voice_probe_same_search": best_probe,
        "r_played_vs_own_voice": r_parts,
        "probe_after_playout_ms_per_4s_window": probe,
        "playout_records": len(pm[0]),
        **av_offsets(rec, got, SERIES["b_t"], SERIES["b_idx"]),
    }


def playout_map(got: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(delivery time s, RTP timestamp) of the audio Chromium handed out for playout."""
    play = np.asarray(got.get("play") or [], dtype=np.float64).reshape(-1, 3)
    if len(play) < 100:
        return None
    t_del, rtp = play[:, 1] / 1000, play[:, 2]
    order = np.argsort(t_del, kind="stable")
    return t_del[order], rtp[order]


def pts_playing(pm: tuple[np.ndarray, np.ndarray], t: np.ndarray) -> np.ndarray:
    """The audio pts being played at page time ``t`` (s): the newest RTP timestamp delivered,
    advanced at 48 kHz since (NaN over 100 ms from a delivery)."""
    t_del, rtp = pm
    k = np.searchsorted(t_del, t, side="right") - 1
    out = np.full(t.shape, np.nan)
    ok = (k >= 0) & (t - t_del[np.clip(k, 0, None)] < 0.1)
    out[ok] = rtp[k[ok]] + (t[ok] - t_del[k[ok]]) * 48000
    return out


def av_offsets(
    rec: Recorder, got: dict[str, Any], b_t: np.ndarray, b_idx: np.ndarray
) -> dict[str, Any]:
    """Per presented frame whose index carried speech: the audio pts Chromium was playing at
    its display time minus that frame's own audio block's pts (ms; > 0: voice ahead)."""
    pm = playout_map(got)
    if pm is None:
        return {}
    own = np.array(
        [
            rec.audio_added[rec.audio_hash[int(i)]][1]
            if int(i) in rec.audio_hash and rec.audio_hash[int(i)] in rec.audio_added
            else np.nan
            for i in b_idx
        ]
    )
    off = (pts_playing(pm, b_t) - own) / 48
    ok = np.isfinite(off)
    t_rel = b_t[ok] - b_t[0]
    windows = [
        round(float(np.median(off[ok][(t_rel >= w) & (t_rel < w + 4)])))
        for w in range(0, int(t_rel[-1]) - 3, 4)
        if ((t_rel >= w) & (t_rel < w + 4)).sum() > 10
    ]
    SERIES.update(frame_av_offset_ms=off)
    return {
        "frame_av_offset_ms_median_p5_p95": [
            round(float(np.median(off[ok]))),
            round(float(np.percentile(off[ok], 5))),
            round(float(np.percentile(off[ok], 95))),
        ],
        "frame_av_offset_ms_per_4s_window": windows,
    }


def analyse_light(rec: Recorder, got: dict[str, Any]) -> dict[str, Any]:
    """STAGES_LIGHT runs: presented frames, A/V offsets at playout, jitter buffers."""
    fr = got["frames"]
    lo = min(rec.images)
    b_idx = np.array([f[3] for f in fr]) + (lo // 4096) * 4096
    b_t = np.array([f[0] for f in fr], dtype=np.float64) / 1000
    return {
        "browser": {
            "presented": len(fr),
            "fps": round((len(fr) - 1) / (b_t[-1] - b_t[0]), 2),
            "playout": av_offsets(rec, got, b_t, b_idx),
            "jitter_buffer_ms_delay_first_last_target_first_last": jitter_buffers(got),
            "first_presented_ms": got.get("first_presented_ms"),
            "queue_speech": queue_speech_cost(rec),
            "audio_burst_ms": audio_burst(got.get("early") or []),
            "audio_burst_sent_ms": sent_burst(rec),
            "first_played_ms": (got.get("play") or [[None, None]])[0][1],
            # [page ms, audio packets, audio samples played, jitter delay s, video decoded]
            "early": got.get("early"),
        }
    }


def audio_burst(early: list[list[float]]) -> float | None:
    """The most audio (ms) that reached Chromium ahead of real time within 300 ms during the
    first seconds: a sender stall followed by its catch-up (20 ms Opus packets)."""
    rows = [r for r in early if len(r) >= 2 and r[1] is not None]
    best = None
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            if b[0] - a[0] > 300:
                break
            excess = 20 * (b[1] - a[1]) - (b[0] - a[0])
            best = excess if best is None else max(best, excess)
    return None if best is None else round(best)


def sent_burst(rec: Recorder) -> dict[str, Any] | None:
    """The same as :func:`audio_burst` at the sender, over the first 4 s of audio packets
    (the audio's payload type is the one whose packets are ~20 ms apart: Opus packets go out
    one per 20 ms, a video frame's back to back), and when it happened."""
    if len(rec.rtp_sent) < 100:
        return None
    a = np.array(rec.rtp_sent, dtype=np.float64)

    def median_gap_ms(pt: float) -> float:
        t = a[a[:, 1] == pt, 0]
        return float(np.median(np.diff(t))) * 1000 if len(t) > 10 else 1e9

    audio_pt = min(np.unique(a[:, 1]), key=lambda pt: abs(median_gap_ms(pt) - 20))
    t = a[a[:, 1] == audio_pt, 0]
    t = t[t < t[0] + 4] * 1000
    best, at = None, None
    for i in range(len(t)):
        j = np.searchsorted(t, t[i] + 300, side="right") - 1
        excess = 20 * (j - i) - (t[j] - t[i])
        if best is None or excess > best:
            best, at = excess, t[i] - t[0]
    return {"burst_ms": round(float(best)), "at_ms_after_first": round(float(at))}


def queue_speech_cost(rec: Recorder) -> dict[str, Any]:
    """What taking in the TTS audio costs the event loop: calls, total and longest call (ms),
    and the most time spent in it within any 200 ms."""
    q = np.array(rec.queue_speech, dtype=np.float64).reshape(-1, 2)
    if not len(q):
        return {}
    busiest = max(float(q[(q[:, 0] >= t) & (q[:, 0] < t + 0.2), 1].sum()) for t in q[:, 0])
    return {
        "calls": len(q),
        "total_ms": round(1000 * float(q[:, 1].sum()), 1),
        "max_ms": round(1000 * float(q[:, 1].max()), 1),
        "busiest_200ms_ms": round(1000 * busiest, 1),
    }


def jitter_buffers(got: dict[str, Any]) -> dict[str, list[float | None]]:
    """Chromium's jitter buffers: mean delay per emitted frame/sample, first and last 4 s."""
    jb: dict[str, list[float | None]] = {}
    st = got.get("stats") or []
    for kind in ("audio", "video"):
        rows = [r[kind] for r in st if kind in r and r[kind].get("n")]

        def per(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
            dn = b["n"] - a["n"]
            return round(1000 * (b[key] - a[key]) / dn, 1) if dn > 0 and key in b else None

        if len(rows) >= 6:
            jb[kind] = [
                per(rows[1], rows[5], "jbd"),
                per(rows[-5], rows[-1], "jbd"),
                per(rows[1], rows[5], "target"),
                per(rows[-5], rows[-1], "target"),
            ]
    return jb


def analyse(rec: Recorder, got: dict[str, Any], meter: MouthMeter) -> dict[str, Any]:
    x0, y0, x1, y1 = rec.box
    h, w = y1 - y0, x1 - x0

    def dlib(g: np.ndarray) -> float:
        return meter.opening(np.repeat(g[:, :, None], 3, axis=2))

    # Stage 1: the service output.
    idx = sorted(rec.images)
    lo, hi = idx[0], idx[-1]
    env = np.array([rec.audio.get(i, (0.0, 0.0))[1] for i in range(lo, hi + 1)])
    hashes = [rec.images[i][1] if i in rec.images else None for i in range(lo, hi + 1)]
    svc_open = np.array(
        [dlib(rec.images[i][2]) if i in rec.images else np.nan for i in range(lo, hi + 1)]
    )
    repeats = sum(1 for a, b in itertools.pairwise(hashes) if a is not None and a == b)
    # Stage 2: transport.
    sent = [s[1] for s in rec.sent]
    depth = [a[2] for a in rec.added]
    t_add = {a[1]: a[0] for a in rec.added}
    send_lag = [s[0] - t_add[s[1]] for s in rec.sent if s[1] in t_add]
    # Stage 3: browser.
    fr = got["frames"]
    b_idx = np.array([f[3] for f in fr])
    # The stamp holds 12 bits: unwrap against the service's indices.
    b_idx = b_idx + (lo // 4096) * 4096
    b_open_by: dict[int, float] = {}
    b_t = np.array([f[0] for f in fr], dtype=np.float64) / 1000
    b_open = []
    for f, i in zip(fr, b_idx, strict=True):
        g = np.frombuffer(base64.b64decode(f[4]), np.uint8).reshape(h, w)
        o = dlib(g)
        b_open.append(o)
        b_open_by.setdefault(int(i), o)
        if os.environ.get("STAGES_SAVE_CROPS") and int(i) in rec.images and int(i) % 5 == 0:
            crops = SERIES.setdefault("crops", [])  # type: ignore[arg-type]
            if not any(c[0] == int(i) for c in crops):  # type: ignore[index]
                crops.append((int(i), g, rec.images[int(i)][2]))  # type: ignore[union-attr]
    b_open_arr = np.array(b_open)
    steps = np.diff(b_idx)
    by_index = np.array([b_open_by.get(i, np.nan) for i in range(lo, hi + 1)])
    held = resample_series(
        np.array([i for i in range(lo, hi + 1) if i in b_open_by], dtype=np.float64),
        np.array([b_open_by[i] for i in range(lo, hi + 1) if i in b_open_by]),
        np.arange(lo, hi + 1, dtype=np.float64),
    )
    both = np.isfinite(svc_open) & np.isfinite(by_index)
    SERIES.update(  # for a closer look (--out writes them beside the JSON)
        img_t=np.array([[i, rec.images[i][0]] for i in idx]),
        qs=np.array(rec.queue_speech).reshape(-1, 2),
        b_t=b_t,
        b_idx=b_idx,
        b_open=b_open_arr,
        lo=np.array([lo]),
        env=env,
        svc_open=svc_open,
    )
    voice = np.asarray(got["voice"], dtype=np.float64).reshape(-1, 2)
    n = int((b_t[-1] - b_t[0]) * 25)
    grid = b_t[0] + np.arange(n) / 25
    heard = bl.voice_r(b_t[0], n, resample_series(b_t, b_open_arr, grid), voice)
    played = playout(rec, got, grid, resample_series(b_t, b_open_arr, grid), voice)
    # Restrict the by-index comparison to the browser's window.
    win = (np.arange(lo, hi + 1) >= b_idx.min()) & (np.arange(lo, hi + 1) <= b_idx.max())

    # A/V offset in the browser over time: the envelope of each presented frame's own audio
    # block, placed at its presentation time, against the voice the page heard; best shift
    # per 4 s window (no dlib: exact).
    env_at = np.array([rec.audio.get(int(i), (0.0, 0.0))[1] for i in b_idx])
    s_grid = resample_series(b_t, env_at, grid)
    offsets = []
    window_r = []
    for w0 in range(0, n - 100, 50):
        best = best_voice_shift(s_grid[w0 : w0 + 100], voice, grid[w0], range(-200, 601, 20))
        if best is not None:
            window_r.append(round(best[0], 3))
        if best is not None and best[0] > 0.5:
            offsets.append(best[1])
    # The same over the whole run, one shift: how much of the emitted voice's shape the voice
    # heard keeps, placed by the video's presentation times (1.0: a perfect A/V path).
    whole = None
    for shift_ms in range(-200, 601, 20):
        v = bl.grid_mean(voice[:, 0] / 1000 - shift_ms / 1000, voice[:, 1], grid[0], n)
        r = pearson(s_grid, v)
        if r is not None and (whole is None or r > whole[0]):
            whole = (round(r, 3), shift_ms)
    # Per-frame path time, service push -> browser presentation (constant clock offset removed).
    emit = np.array([rec.images[int(i)][0] if int(i) in rec.images else np.nan for i in b_idx])
    path = b_t + got["origin_ms"] / 1000 - emit  # both on time.monotonic()
    ok = np.isfinite(path)
    slope = np.polyfit(b_t[ok] - b_t[0], path[ok], 1)[0] * 1000  # ms per s
    path_ms = path[ok] * 1000
    path = path_ms - np.median(path_ms)
    t_ok = b_t[ok] - b_t[0]
    lat_first = float(np.median(path_ms[(t_ok > 2) & (t_ok < 5)]))
    lat_last = float(np.median(path_ms[t_ok > t_ok[-1] - 3]))

    jb = jitter_buffers(got)
    st = got.get("stats") or []

    # NetEq: samples concealed, inserted (slowed) and removed (sped up), per second received.
    neteq: dict[str, float] = {}
    arows = [r["audio"] for r in st if "audio" in r and r["audio"].get("recv")]
    if len(arows) >= 3:
        a0, a1 = arows[1], arows[-1]
        got_s = (a1["recv"] - a0["recv"]) / 48000
        if got_s > 0:
            neteq = {
                k: round((a1[k] - a0[k]) / 48 / got_s, 1)
                for k in ("conc", "ins", "rem")
                if a1.get(k) is not None
            }  # ms per s
    # Audio packets the track handed out ahead of real time (bursts): its pts against the
    # wall clock since its first packet; the most it ran ahead, and at the first packet.
    aus = np.array(rec.audio_sent, dtype=np.float64).reshape(-1, 2)
    audio_track: dict[str, Any] = {}
    if len(aus):
        ahead = aus[:, 1] / 48000 - (aus[:, 0] - aus[0, 0])
        gaps = np.diff(aus[:, 0])
        lag = np.array(rec.loop_lag) * 1000
        audio_track = {
            "recv_gap_ms_p99_max": [
                round(float(np.percentile(gaps, 99)) * 1000, 1),
                round(float(gaps.max()) * 1000, 1),
            ],
            "loop_lag_ms_p50_p99_max": [
                round(float(np.percentile(lag, 50)), 1),
                round(float(np.percentile(lag, 99)), 1),
                round(float(lag.max()), 1),
            ],
            "loop_stalls_over_50ms": int((lag > 50).sum()),
            "underruns_in_speech": underruns(rec.audio_loud),
            **audio_path(rec, aus),
            "first_recv_after_creation_ms": round(1000 * (aus[0, 0] - rec.audio_created)),
            "pause_dropped_ms": round(
                1000 * getattr(rec.audio_track, "_talkstream_dropped_s", 0.0)
            ),
            "pts_ahead_of_wall_ms_max": round(1000 * float(ahead.max())),
            "pts_ahead_of_wall_ms_at_1s": round(
                1000 * float(ahead[np.searchsorted(aus[:, 0], aus[0, 0] + 1.0)])
            ),
        }

    def lr(a: np.ndarray, e: np.ndarray) -> dict[str, Any]:
        return lagged_r(a, e).as_dict()

    return {
        "service": {
            "frames": hi - lo + 1,
            "missing_indices": int(hi - lo + 1 - len(idx)),
            "repeated_content": repeats,
            "speech_blocks": len(rec.audio),
            "dlib_vs_env_by_index": lr(svc_open[win], env[win]),
        },
        "transport": {
            "added": len(rec.added),
            "sent": len(sent),
            "out_of_order": int(sum(1 for a, b in itertools.pairwise(sent) if b != a + 1)),
            "queue_depth_max": max(depth) if depth else None,
            "queue_depth_mean": round(float(np.mean(depth)), 2) if depth else None,
            "send_lag_ms_median": round(1000 * float(np.median(send_lag)), 1) if send_lag else None,
            "send_lag_ms_max": round(1000 * float(np.max(send_lag)), 1) if send_lag else None,
        },
        "audio_track": audio_track,
        "browser": {
            "presented": len(fr),
            "fps": round((len(fr) - 1) / (b_t[-1] - b_t[0]), 2),
            "index_repeats": int((steps == 0).sum()),
            "index_skipped": int(np.clip(steps - 1, 0, None).sum()),
            "index_backwards": int((steps < 0).sum()),
            "dlib_vs_env_by_index_held": lr(held[win], env[win]),
            "dlib_browser_vs_service_same_index_r": pearson(svc_open[both], by_index[both]),
            "dlib_vs_voice_heard": {"r": heard[0], "voice_after_mouth_ms": heard[1]},
            "playout": played,
            "av_offset_ms_per_4s_window": offsets,
            "emitted_vs_heard_voice_r_per_4s_window": window_r,
            "emitted_vs_heard_voice_whole_run": whole,
            "neteq_per_s_of_audio": neteq,
            "path_ms_push_to_present_at_2_5s_and_last_3s": [round(lat_first), round(lat_last)],
            "path_drift_ms_per_s": round(float(slope), 1),
            "jitter_buffer_ms_delay_first_last_target_first_last": jb,
            "path_jitter_ms_p5_p95": [
                round(float(np.percentile(path, 5)), 1),
                round(float(np.percentile(path, 95)), 1),
            ],
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=25.0)
    ap.add_argument("--variant", default="base", choices=sorted(VARIANTS))
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    a = ap.parse_args()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rec, got = asyncio.run(run(a.seconds, a.variant, Path(tmp)))
    if a.out:  # the raw series, for a closer look
        fr = got["frames"]
        np.savez(
            a.out.with_suffix(".npz"),
            emit=np.array([(i, t) for i, (t, _, _) in sorted(rec.images.items())]),
            audio=np.array([(i, t, r) for i, (t, r) in sorted(rec.audio.items())]),
            added=np.array(rec.added),
            sent=np.array(rec.sent),
            presented=np.array([(f[0], f[2], f[3]) for f in fr], dtype=np.float64),
            voice=np.asarray(got["voice"], dtype=np.float64).reshape(-1, 2),
            time_origin=np.array([got.get("origin_ms", np.nan)]),
            loop_lag=np.array([rec.loop_lag_t, rec.loop_lag]),
            audio_sent=np.array(rec.audio_sent),
            draws=np.array(rec.draws),
            rtp_sent=np.array(rec.rtp_sent),
        )
        a.out.with_suffix(".stats.json").write_text(
            json.dumps({"stats": got.get("stats"), "origin_ms": got.get("origin_ms")})
        )
    res = analyse_light(rec, got) if LIGHT else analyse(rec, got, MouthMeter())
    if a.out:
        crops = SERIES.pop("crops", None)
        if crops:
            SERIES["crop_index"] = np.array([c[0] for c in crops])
            SERIES["crop_browser"] = np.stack([c[1] for c in crops])
            SERIES["crop_service"] = np.stack([c[2] for c in crops])
        np.savez(a.out.with_suffix(".series.npz"), **SERIES)
    res.update(
        variant=a.variant,
        load=[round(load0, 2), round(os.getloadavg()[0], 2)],
        date=time.strftime("%Y-%m-%d %H:%M"),
    )
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
