// talkstream web client: microphone in, the avatar's video and voice out, a live stats line.
//
// `/watch?presenter=NAME` watches a presenter: receive-only, the microphone is never asked for.
// `?token=TOKEN` is the server's viewer token, when it has one (sent as a Bearer header).
// `?probe=1` also records, for tests and benchmarks, the level of the microphone and of the
// avatar's voice every 5 ms and the motion of the mouth region in every presented video frame
// (window.talkstream.probe).
"use strict";

const params = new URLSearchParams(location.search);
const watchOnly = location.pathname.replace(/\/+$/, "").endsWith("/watch");
const presenter = params.get("presenter");
const token = params.get("token");
const probeOn = params.get("probe") === "1";
const $ = (id) => document.getElementById(id);
const video = $("video");

function withToken(url) {
  return token ? `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}` : url;
}

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

// The face, still, until the stream starts (instead of a black box).
video.poster = withToken("/preview.jpg");
if (watchOnly) {
  $("start").textContent = "Watch";
  $("intro").textContent = presenter
    ? `Press Watch to see and hear the presenter "${presenter}". No microphone is needed.`
    : "Add ?presenter=NAME to the address to choose the presenter to watch.";
  if (!presenter) $("start").disabled = true;
}

// Everything a test or a curious user may read from the console.
const ts = {
  state: "idle",
  sessionId: null,
  budget: null,
  mouthBox: null,
  presented: [], // performance.now() of every presented video frame
  fps: 0,
  server: null,
  client: null,
  error: null,
  probe: { mic: [], voice: [], mouth: [] },
};
window.talkstream = ts;

let pc = null;
let mic = null;
let timers = [];
let audioCtx = null;

function showError(msg) {
  ts.error = msg;
  $("error").textContent = msg;
  $("error").hidden = !msg;
}

async function waitForIce(pc, timeoutMs) {
  // The server takes the offer whole (no trickle ICE): wait until candidates are gathered.
  if (pc.iceGatheringState === "complete") return;
  await new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") resolve();
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

async function start() {
  showError("");
  $("start").disabled = true;
  ts.state = "connecting";
  try {
    pc = new RTCPeerConnection({ iceServers: [] });
    const remote = new MediaStream();
    pc.ontrack = (ev) => {
      remote.addTrack(ev.track);
      video.srcObject = remote;
      if (probeOn && ev.track.kind === "audio") levelProbe(new MediaStream([ev.track]), ts.probe.voice);
    };
    pc.onconnectionstatechange = () => {
      ts.state = pc.connectionState;
      if (pc.connectionState === "failed") showError("the connection failed");
    };
    if (watchOnly || presenter) {
      if (!presenter) throw new Error("add ?presenter=NAME to the address");
      pc.addTransceiver("audio", { direction: "recvonly" });
    } else {
      // Chromium's echo canceller treats the avatar's voice (the user's own, delayed) as echo
      // and flattens the speech the server hears: the mouth then moves less (measured with
      // benchmarks/browser_lipsync.py). With the avatar muted there is no echo to cancel, so
      // it runs only while the avatar's voice plays (noise suppression and gain control
      // never: they reshape the envelope the lips follow).
      mic = await navigator.mediaDevices.getUserMedia({ audio: micConstraints() });
      for (const track of mic.getAudioTracks()) pc.addTrack(track, mic);
      if (probeOn) levelProbe(mic, ts.probe.mic);
    }
    pc.addTransceiver("video", { direction: "recvonly" });
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc, 3000);
    const url = presenter ? `/presenters/${encodeURIComponent(presenter)}/offer` : "/offer";
    const resp = await fetch(url, {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
    });
    const answer = await resp.json();
    if (!resp.ok) throw new Error(`${resp.status}: ${answer.error || "refused"}`);
    ts.sessionId = answer.session_id;
    ts.budget = answer.latency_budget_ms;
    ts.mouthBox = answer.mouth_box;
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    countFrames();
    timers.push(setInterval(updateStats, 1000));
    $("stop").disabled = false;
  } catch (e) {
    showError(String(e.message || e));
    await stop();
  }
}

async function stop() {
  for (const t of timers) clearInterval(t);
  timers = [];
  if (ts.sessionId && !presenter) {
    // Tell the server at once; closing the connection alone is noticed later.
    fetch(`/sessions/${ts.sessionId}`, { method: "DELETE", headers: authHeaders() }).catch(() => {});
  }
  if (pc) pc.close();
  if (mic) for (const t of mic.getTracks()) t.stop();
  pc = null;
  mic = null;
  ts.state = "idle";
  $("start").disabled = watchOnly && !presenter;
  $("stop").disabled = true;
}

function countFrames() {
  // requestVideoFrameCallback fires once per presented frame: the decoded fps the user sees.
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  let prev = null;
  const onFrame = (now, meta) => {
    ts.presented.push(now);
    if (ts.presented.length > 2000) ts.presented.splice(0, 1000);
    if (probeOn && ts.mouthBox) {
      const [x0, y0, x1, y1] = ts.mouthBox;
      const w = x1 - x0;
      const h = y1 - y0;
      canvas.width = w;
      canvas.height = h;
      ctx.drawImage(video, x0, y0, w, h, 0, 0, w, h);
      const px = ctx.getImageData(0, 0, w, h).data;
      if (prev) {
        let sum = 0;
        for (let i = 0; i < px.length; i += 4) sum += Math.abs(px[i] - prev[i]) + Math.abs(px[i + 1] - prev[i + 1]);
        ts.probe.mouth.push([meta.expectedDisplayTime || now, sum / (px.length / 2), meta.rtpTimestamp || 0]);
      }
      prev = px;
    }
    if (pc) video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

function levelProbe(stream, out) {
  // RMS of the last 256 samples every 5 ms, on performance.now()'s clock.
  audioCtx = audioCtx || new AudioContext();
  const src = audioCtx.createMediaStreamSource(stream);
  const an = audioCtx.createAnalyser();
  an.fftSize = 256;
  src.connect(an);
  const buf = new Float32Array(an.fftSize);
  timers.push(
    setInterval(() => {
      an.getFloatTimeDomainData(buf);
      let s = 0;
      for (const v of buf) s += v * v;
      out.push([performance.now(), Math.sqrt(s / buf.length)]);
    }, 5),
  );
}

async function updateStats() {
  if (!pc) return;
  const now = performance.now();
  ts.fps = ts.presented.filter((t) => t > now - 1000).length;
  const client = {};
  for (const r of (await pc.getStats()).values()) {
    if (r.type === "inbound-rtp" && r.kind === "video") {
      client.framesDecoded = r.framesDecoded;
      client.framesDropped = r.framesDropped || 0;
      if (r.jitterBufferEmittedCount)
        client.jitterBufferMs = (1000 * r.jitterBufferDelay) / r.jitterBufferEmittedCount;
      if (r.framesDecoded) client.decodeMs = (1000 * r.totalDecodeTime) / r.framesDecoded;
      client.keyFramesDecoded = r.keyFramesDecoded;
      client.pliCount = r.pliCount;
      client.nackCount = r.nackCount;
      client.packetsLost = r.packetsLost;
    }
    if (r.type === "candidate-pair" && r.nominated && r.currentRoundTripTime !== undefined)
      client.rttMs = 1000 * r.currentRoundTripTime;
  }
  ts.client = client;
  const statsUrl = presenter
    ? `/presenters/${encodeURIComponent(presenter)}/stats`
    : `/sessions/${ts.sessionId}/stats`;
  try {
    const resp = await fetch(statsUrl, { headers: authHeaders() });
    if (resp.ok) ts.server = await resp.json();
  } catch (e) {
    ts.server = null;
  }
  const s = ts.server || {};
  const b = (s.latency_budget_ms || ts.budget || {});
  const parts = [
    `fps ${ts.fps}`,
    `latency budget ${Math.round(b.total_ms || 0)} ms (lookahead ${Math.round(b.algorithmic_ms || 0)}` +
      ` + jitter ${Math.round(b.jitter_ms || 0)} + compute ${Math.round(b.compute_ms || 0)})`,
    `jitter buffer ${Math.round(client.jitterBufferMs || 0)} ms`,
    `dropped ${(s.frames_skipped || 0) + (s.frames_repeated || 0) + (client.framesDropped || 0)}`,
  ];
  $("stats").textContent = parts.join(" · ");
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
function micConstraints() {
  return { echoCancellation: !$("mute").checked, noiseSuppression: false, autoGainControl: false };
}

// Live mode: the avatar's voice is the speaker's own, 0.2-0.3 s late, which is hard to speak
// over and needs echo cancellation on speakers; it starts muted (`?mute=0` to hear it). A
// presenter's voice is what a viewer came for: unmuted.
$("mute").checked = !(watchOnly || presenter) && params.get("mute") !== "0";
video.muted = $("mute").checked;
$("mute").addEventListener("change", async () => {
  video.muted = $("mute").checked;
  for (const t of mic ? mic.getAudioTracks() : []) {
    try {
      await t.applyConstraints(micConstraints());
    } catch (e) {
      console.warn("cannot switch echo cancellation:", e);
    }
  }
});
if (params.get("autostart") === "1") start();
