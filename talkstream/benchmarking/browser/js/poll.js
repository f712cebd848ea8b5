// One poll: the page's state, new presented frames, and the inbound RTP statistics.
// Evaluated by playwright as a function of the last presented time already collected.
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
