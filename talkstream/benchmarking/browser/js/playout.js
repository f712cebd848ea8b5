// The avatar's voice as Chromium hands it out for playout, not through a Web Audio probe:
// every 5 ms, the audio receiver's synchronization source when it changes. Its timestamp is
// when WebRTC delivered that packet's audio for playout (page clock once timeOrigin is taken
// off); its level is the RTP audio-level header the sender wrote from the packet's samples
// (aiortc does); its RTP timestamp says which audio it was. Pushes [page ms, level 0..1,
// RTP timestamp] to window.__playout. The argument is the RTCPeerConnection (the page's own,
// or the last one init.js kept).
(peer) => {
  const pc = peer || window.__tsbench.pcs[window.__tsbench.pcs.length - 1];
  const recv = pc.getReceivers().find((r) => r.track && r.track.kind === "audio");
  window.__playout = [];
  let last = null;
  window.__playoutTimer = setInterval(() => {
    for (const s of recv.getSynchronizationSources()) {
      if (s.rtpTimestamp !== last) {
        last = s.rtpTimestamp;
        window.__playout.push([s.timestamp - performance.timeOrigin, s.audioLevel ?? 0,
                               s.rtpTimestamp]);
      }
    }
  }, 5);
}
