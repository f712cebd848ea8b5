"""A pipecat voice agent with a talkstream face, in your browser, with no API key.

    python examples/pipecat_agent.py            # then open http://127.0.0.1:8090/
    python examples/pipecat_agent.py --image me.jpg --script "Hello." "I am a talking photo."

Each browser that connects gets its own pipecat pipeline::

    SmallWebRTC input -> EspeakTTSService -> TalkstreamVideoService -> SmallWebRTC output

The agent speaks the script when the page connects; the page's text box makes it say more, and
its *Interrupt* button barges in (an ``InterruptionFrame``, as a user starting to speak would
send). The model and the avatar load once and are shared by every connection.

Where an LLM and speech recognition plug in: put an STT service after ``transport.input()``
(enable ``audio_in_enabled`` in the transport params), then the user context aggregator and an
LLM service before the TTS, as in any pipecat agent::

    Pipeline([transport.input(), stt, user_aggregator, llm, tts, video, transport.output(),
              assistant_aggregator])

Needs the pipecat extra (``pip install 'talkstream[pipecat]'``) and espeak-ng.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from talkstream.errors import TalkstreamError

log = logging.getLogger("pipecat_agent")

SCRIPT = (
    "Hello! I am a talking face, rendered live on this computer.",
    "Type something below and I will say it. Press interrupt to cut me off.",
)
MAX_TEXT_CHARS = 2000

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>talkstream + pipecat</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 720px; }
video { background: #222; width: 100%; max-width: 640px; }
input[type=text] { width: 60%; }
#stats { color: #555; font-size: 0.9em; }
#error { color: #b00; }
</style></head>
<body>
<h1>talkstream + pipecat</h1>
<p>A pipecat pipeline (espeak-ng TTS, talkstream video) streamed over SmallWebRTC.</p>
<p><button id="start">Connect</button> <button id="stop" disabled>Hang up</button></p>
<video id="video" autoplay playsinline></video>
<p><input type="text" id="text" placeholder="Something to say">
<button id="say">Say</button> <button id="interrupt">Interrupt</button></p>
<p id="stats"></p><p id="error"></p>
<script>
"use strict";
// window.ts: state for tests and benchmarks. Every presented frame's time (performance.now(),
// requestVideoFrameCallback), the mouth region's mean change per frame, the avatar's voice
// level every 5 ms, and (while ts.capture is true) grey crops of the face for landmarking.
const JITTER_MS = Number(new URLSearchParams(location.search).get("jitter_ms") ?? 0);
const ts = { state: "idle", error: null, pcId: null, faceBox: null, mouthBox: null,
             presented: [], mouth: [], voice: [], faces: [], capture: false };
window.ts = ts;
const $ = (id) => document.getElementById(id);
const video = $("video");
let pc = null, timers = [], audioCtx = null;

function showError(m) { ts.error = m; $("error").textContent = m || ""; }

async function post(path, body) {
  const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                body: JSON.stringify(body) });
  const j = await r.json();
  if (!r.ok) throw new Error(j.error || r.status);
  return j;
}

async function start() {
  showError("");
  $("start").disabled = true;
  ts.state = "connecting";
  try {
    pc = new RTCPeerConnection({ iceServers: [] });
    pc.createDataChannel("chat");
    // pipecat's SmallWebRTC expects an audio, then a video transceiver.
    pc.addTransceiver("audio", { direction: "sendrecv" });
    pc.addTransceiver("video", { direction: "sendrecv" });
    const remote = new MediaStream();
    pc.ontrack = (ev) => {
      // ?jitter_ms=N asks Chromium for an N ms jitter buffer on the voice and the face from
      // the first packet. Left alone it starts the video near 0 ms and the audio at 40-60 ms
      // and brings them together over ~20 s; 60 ms steadied that but cost ~20 ms of latency
      // with no measurable lip-sync gain (benchmarks/RESULTS.md), so the default is Chromium's.
      if (JITTER_MS > 0 && "jitterBufferTarget" in ev.receiver) {
        ev.receiver.jitterBufferTarget = JITTER_MS;
      }
      remote.addTrack(ev.track);
      video.srcObject = remote;
      if (ev.track.kind === "audio") levelProbe(new MediaStream([ev.track]), ts.voice);
    };
    pc.onconnectionstatechange = () => { ts.state = pc.connectionState; };
    await pc.setLocalDescription(await pc.createOffer());
    if (pc.iceGatheringState !== "complete") {
      await new Promise((ok) => {
        pc.addEventListener("icegatheringstatechange", () => {
          if (pc.iceGatheringState === "complete") ok();
        });
        setTimeout(ok, 3000);
      });
    }
    const answer = await post("/offer", { sdp: pc.localDescription.sdp, type: "offer" });
    ts.pcId = answer.pc_id;
    ts.faceBox = answer.face_box;
    ts.mouthBox = answer.mouth_box;
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    video.requestVideoFrameCallback(onFrame);
    timers.push(setInterval(() => {
      const now = performance.now();
      $("stats").textContent = `${ts.presented.filter((t) => t > now - 1000).length} fps`;
    }, 1000));
    $("stop").disabled = false;
  } catch (e) {
    showError(String(e.message || e));
    stop();
  }
}

function stop() {
  for (const t of timers) clearInterval(t);
  timers = [];
  if (pc) pc.close();
  pc = null;
  ts.state = "idle";
  $("start").disabled = false;
  $("stop").disabled = true;
}

const canvas = document.createElement("canvas");
const ctx = canvas.getContext("2d", { willReadFrequently: true });
let prevMouth = null;

function grab(box) {
  const [x0, y0, x1, y1] = box;
  canvas.width = x1 - x0;
  canvas.height = y1 - y0;
  ctx.drawImage(video, x0, y0, x1 - x0, y1 - y0, 0, 0, x1 - x0, y1 - y0);
  return ctx.getImageData(0, 0, x1 - x0, y1 - y0).data;
}

function b64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 8192) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 8192));
  }
  return btoa(s);
}

function onFrame(now, meta) {
  const t = meta.expectedDisplayTime || now;
  ts.presented.push(t);
  if (ts.mouthBox) {
    const px = grab(ts.mouthBox);
    if (prevMouth && prevMouth.length === px.length) {
      let sum = 0;
      for (let i = 0; i < px.length; i += 4) {
        sum += Math.abs(px[i] - prevMouth[i]) + Math.abs(px[i + 1] - prevMouth[i + 1]);
      }
      ts.mouth.push([t, sum / (px.length / 2)]);
    }
    prevMouth = px;
  }
  if (ts.capture && ts.faceBox) {
    const px = grab(ts.faceBox);
    const grey = new Uint8Array(px.length / 4);
    for (let i = 0; i < grey.length; i++) {
      grey[i] = (px[4 * i] * 77 + px[4 * i + 1] * 150 + px[4 * i + 2] * 29) >> 8;
    }
    ts.faces.push([t, b64(grey)]);
  }
  if (pc) video.requestVideoFrameCallback(onFrame);
}

function levelProbe(stream, out) {
  // RMS of the last 256 samples every 5 ms, on performance.now()'s clock.
  audioCtx = audioCtx || new AudioContext();
  const an = audioCtx.createAnalyser();
  an.fftSize = 256;
  audioCtx.createMediaStreamSource(stream).connect(an);
  const buf = new Float32Array(an.fftSize);
  timers.push(setInterval(() => {
    an.getFloatTimeDomainData(buf);
    let s = 0;
    for (const v of buf) s += v * v;
    out.push([performance.now(), Math.sqrt(s / buf.length)]);
  }, 5));
}

$("start").onclick = start;
$("stop").onclick = stop;
const fail = (e) => showError(String(e.message || e));
$("say").onclick = () => post("/say", { pc_id: ts.pcId, text: $("text").value }).catch(fail);
$("interrupt").onclick = () => post("/interrupt", { pc_id: ts.pcId }).catch(fail);
if (new URLSearchParams(location.search).get("autostart") === "1") start();
</script></body></html>
"""


def frame_landmarks(avatar: Avatar) -> np.ndarray:
    """The avatar's 68 neutral landmarks in output-frame pixels: (68, 2)."""
    inv = np.linalg.inv(np.vstack([avatar.frame_to_crop, [0.0, 0.0, 1.0]]))[:2]  # crop -> frame
    pts: np.ndarray = avatar.neutral @ inv[:, :2].T + inv[:, 2]
    return pts


def boxes(avatar: Avatar) -> tuple[list[int], list[int]]:
    """(face box, mouth box) [x0, y0, x1, y1] in frame pixels, for the page's probes."""
    h, w = avatar.image.shape[:2]
    pts = frame_landmarks(avatar)

    def box(p: np.ndarray, pad: float, below: float) -> list[int]:
        (x0, y0), (x1, y1) = p.min(axis=0), p.max(axis=0)
        m = pad * (x1 - x0)
        return [
            max(int(x0 - m), 0),
            max(int(y0 - m), 0),
            min(int(np.ceil(x1 + m)), w),
            min(int(np.ceil(y1 + below * (x1 - x0))), h),
        ]

    # The face with room around it (dlib's detector wants some); the mouth with room for the jaw.
    return box(pts, 0.35, 0.35), box(pts[48:68], 0.25, 0.5)


@dataclass
class Connection:
    """One browser: its pipeline and the task running it."""

    worker: Any
    runner: Any
    task: asyncio.Task[Any]
    video: Any


@dataclass
class AgentConfig:
    script: Sequence[str] = SCRIPT
    voice: str = "en"
    words_per_minute: int = 160
    service_options: dict[str, Any] = field(default_factory=dict)


class Agent:
    """The web app: the page, SmallWebRTC signalling, and one pipeline per connection.

    ``engine``/``avatar`` are loaded once (:meth:`load`) and shared by every connection's
    :class:`TalkstreamVideoService`.
    """

    def __init__(
        self, cfg: AgentConfig, engine: Engine | None = None, avatar: Avatar | None = None
    ):
        self.cfg = cfg
        self.engine = engine
        self.avatar = avatar
        self.connections: dict[str, Connection] = {}
        self._own_engine = engine is None

    async def load(self) -> None:
        """Load the model and the avatar once (in a worker thread), warmed up."""
        from talkstream.integrations.pipecat import TalkstreamVideoService

        if self.engine is not None and self.avatar is not None:
            return
        probe = TalkstreamVideoService(**self.cfg.service_options)
        await probe.load()
        self.engine, self.avatar = probe.engine, probe.avatar

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024)
        app.router.add_get("/", self._page)
        app.router.add_post("/offer", self._offer)
        app.router.add_post("/say", self._say)
        app.router.add_post("/interrupt", self._interrupt)
        app.on_shutdown.append(lambda _app: self.close())
        return app

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "the body is not JSON"}), content_type="application/json"
            ) from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "the body must be a JSON object"}),
                content_type="application/json",
            )
        return data

    def _connection(self, data: dict[str, Any]) -> Connection:
        conn = self.connections.get(str(data.get("pc_id")))
        if conn is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": "no such connection: connect first"}),
                content_type="application/json",
            )
        return conn

    async def _offer(self, request: web.Request) -> web.Response:
        from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection

        data = await self._json(request)
        if data.get("type") != "offer" or not isinstance(data.get("sdp"), str):
            return web.json_response(
                {"error": 'expected {"sdp": ..., "type": "offer"}'}, status=400
            )
        assert self.avatar is not None
        webrtc = SmallWebRTCConnection()
        await webrtc.initialize(sdp=data["sdp"], type="offer")
        conn = await self.start_pipeline(webrtc)
        answer = webrtc.get_answer()
        face_box, mouth_box = boxes(self.avatar)
        self.connections[answer["pc_id"]] = conn
        return web.json_response({**answer, "face_box": face_box, "mouth_box": mouth_box})

    async def start_pipeline(self, webrtc: Any) -> Connection:
        """Build and start the pipeline of one connection."""
        from pipecat.frames.frames import TTSSpeakFrame
        from pipecat.pipeline.pipeline import Pipeline
        from pipecat.pipeline.worker import PipelineParams, PipelineWorker
        from pipecat.transports.base_transport import TransportParams
        from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
        from pipecat.workers.runner import WorkerRunner

        from talkstream.integrations.pipecat import EspeakTTSService, tune_smallwebrtc

        # Once per process, for every connection: without it the voice falls behind the lips
        # during long speech on a busy CPU, every image waits up to two frames in pipecat's
        # pacing, and a barge-in lets 80 ms of the cut sentence play (see its docstring).
        tune_smallwebrtc()
        video = self.make_video_service()
        width, height = video.frame_size
        transport = SmallWebRTCTransport(
            webrtc_connection=webrtc,
            params=TransportParams(
                audio_out_enabled=True,
                audio_out_sample_rate=48000,
                video_out_enabled=True,
                # Frames are paced by the service: the transport sends each as it comes.
                video_out_is_live=True,
                video_out_width=width,
                video_out_height=height,
                video_out_framerate=25,
            ),
        )
        tts = EspeakTTSService(voice=self.cfg.voice, words_per_minute=self.cfg.words_per_minute)
        pipeline = Pipeline([transport.input(), tts, video, transport.output()])
        worker = PipelineWorker(
            pipeline,
            params=PipelineParams(audio_out_sample_rate=48000),
            cancel_on_idle_timeout=False,
        )
        pc_id = webrtc.pc_id
        script = list(self.cfg.script)

        @transport.event_handler("on_client_connected")
        async def on_connected(_transport: Any, _client: Any) -> None:
            for line in script:
                await worker.queue_frame(TTSSpeakFrame(line))

        @transport.event_handler("on_client_disconnected")
        async def on_disconnected(_transport: Any, _client: Any) -> None:
            self.connections.pop(pc_id, None)
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        task = asyncio.create_task(runner.run(), name=f"pipecat-{pc_id}")
        return Connection(worker=worker, runner=runner, task=task, video=video)

    def make_video_service(self) -> Any:
        """The connection's TalkstreamVideoService, on the shared engine and avatar."""
        from talkstream.integrations.pipecat import TalkstreamVideoService

        return TalkstreamVideoService(engine=self.engine, avatar=self.avatar)

    async def _say(self, request: web.Request) -> web.Response:
        from pipecat.frames.frames import TTSSpeakFrame

        data = await self._json(request)
        text = data.get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS:
            return web.json_response(
                {"error": f"text must be 1-{MAX_TEXT_CHARS} characters"}, status=400
            )
        await self._connection(data).worker.queue_frame(TTSSpeakFrame(text.strip()))
        return web.json_response({"ok": True})

    async def _interrupt(self, request: web.Request) -> web.Response:
        from pipecat.frames.frames import InterruptionFrame

        data = await self._json(request)
        await self._connection(data).worker.queue_frame(InterruptionFrame())
        return web.json_response({"ok": True})

    async def close(self) -> None:
        """End every pipeline; close the engine if this agent loaded it."""
        for conn in list(self.connections.values()):
            await conn.worker.cancel()
        for conn in list(self.connections.values()):
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(conn.task, 10)
        self.connections.clear()
        if self._own_engine and self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.close)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python examples/pipecat_agent.py",
        description="A pipecat agent with a talkstream face: espeak-ng speaks a script (and "
        "whatever you type) and the avatar says it, streamed to your browser over SmallWebRTC. "
        "No API key needed.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8090, help="port (8090)")
    p.add_argument("--image", type=Path, default=None, help="face photo; default: the bundled face")
    p.add_argument(
        "--framing",
        default="call",
        choices=["call", "portrait", "landscape", "square", "full"],
        help="output frame around the face (call: 640x480)",
    )
    p.add_argument("--preset", default="tiny", choices=["tiny", "base"], help="model size (tiny)")
    p.add_argument("--checkpoint", type=Path, default=None, help="model checkpoint directory")
    p.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "compiled", "onnxruntime", "tensorrt", "auto"],
        help="what runs the networks (torch)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.add_argument("--no-idle", action="store_true", help="no blinks or head sway when silent")
    p.add_argument(
        "--script", nargs="+", default=list(SCRIPT), metavar="LINE", help="what to say on connect"
    )
    p.add_argument("--voice", default="en", help="espeak-ng voice (en)")
    p.add_argument("--wpm", type=int, default=160, help="speaking rate, words per minute (160)")
    p.add_argument(
        "--loopback-only",
        action="store_true",
        help="offer only 127.0.0.1 ICE candidates (browser on this machine)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


async def serve(agent: Agent, host: str, port: int) -> None:
    await agent.load()
    runner = web.AppRunner(agent.app())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"open http://{host}:{port}/ in a browser and press Connect", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO)
    if not a.verbose:
        with contextlib.suppress(ImportError):
            from loguru import logger  # pipecat logs through loguru, very chattily at DEBUG

            logger.remove()
            logger.add(sys.stderr, level="INFO")
    try:
        from talkstream.integrations import pipecat as _check  # noqa: F401
    except TalkstreamError as e:
        print(f"pipecat_agent: error: {e}", file=sys.stderr)
        return 2
    if a.loopback_only:
        from talkstream.streaming.sdp import use_loopback_ice

        use_loopback_ice()
    options: dict[str, Any] = {
        "image": a.image,
        "framing": a.framing,
        "preset": a.preset,
        "checkpoint": a.checkpoint,
        "backend": a.backend,
        "threads": a.threads,
        "device": a.device,
        "idle": not a.no_idle,
    }
    cfg = AgentConfig(
        script=a.script,
        voice=a.voice,
        words_per_minute=a.wpm,
        service_options=options,
    )
    try:
        asyncio.run(serve(Agent(cfg), a.host, a.port))
    except TalkstreamError as e:
        print(f"pipecat_agent: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"pipecat_agent: error: cannot listen on {a.host}:{a.port}: {e.strerror}",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
