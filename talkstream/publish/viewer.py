"""A viewer page that watches a presenter through Janus (the VideoRoom, over its HTTP API).

The page is served by a published presenter's push API at ``GET /watch`` (when it publishes
into Janus): the browser talks to Janus directly (Janus's HTTP transport allows any origin),
as a VideoRoom subscriber of the presenter's feed; our process is not in the media path.

For tests and benchmarks it exposes ``window.viewer``: ``state`` (``connecting``, ``playing``,
``error``), ``error``, ``presented`` (display times of decoded frames, epoch ms) and, with a
``box`` query parameter (x0,y0,x1,y1), ``mouth``: ``[epoch ms, mean change]`` per presented
frame of that region.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

VIEWER_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>talkstream viewer</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{margin:0;background:#111;color:#ccc;font:14px sans-serif;text-align:center}
video{max-width:100%;max-height:90vh;background:#000}#status{padding:6px}</style></head>
<body><video id="v" autoplay playsinline></video><div id="status">connecting</div>
<script>
"use strict";
const CONFIG = __CONFIG__;
const viewer = window.viewer = {state: "connecting", error: null, presented: [], mouth: []};
const status = (s) => { document.getElementById("status").textContent = s; };
const tx = () => Math.random().toString(36).slice(2, 12);
const q = new URLSearchParams(location.search);
const box = q.get("box") ? q.get("box").split(",").map(Number) : null;

async function call(url, body) {
  const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                              body: JSON.stringify({...body, transaction: tx()})});
  const j = await r.json();
  if (j.janus === "error") throw new Error(j.error.reason);
  return j;
}

async function main() {
  const base = CONFIG.janus.replace(/\\/$/, "");
  const sid = (await call(base, {janus: "create"})).data.id;
  const surl = base + "/" + sid;
  setInterval(() => call(surl, {janus: "keepalive"}).catch(() => {}), 25000);
  const hid = (await call(surl, {janus: "attach", plugin: "janus.plugin.videoroom"})).data.id;
  const hurl = surl + "/" + hid;
  const waiters = {};
  (async function poll() {  // Janus's long poll: the plugin's answers and events
    for (;;) {
      let evs;
      try { evs = await (await fetch(surl + "?maxev=5&rid=" + tx())).json(); }
      catch (e) { await new Promise((r) => setTimeout(r, 500)); continue; }
      for (const ev of Array.isArray(evs) ? evs : [evs]) {
        if (ev.transaction && waiters[ev.transaction]) waiters[ev.transaction](ev);
        if (ev.janus === "hangup") { viewer.state = "ended"; status("the presenter left"); }
      }
    }
  })();
  const message = (body, jsep) => new Promise((resolve, reject) => {
    const t = tx();
    waiters[t] = (ev) => { delete waiters[t]; resolve(ev); };
    fetch(hurl, {method: "POST", headers: {"Content-Type": "application/json"},
                 body: JSON.stringify({janus: "message", transaction: t, body, jsep})})
      .then((r) => r.json()).then((j) => {
        if (j.janus === "error") reject(new Error(j.error.reason));
        else if (j.janus === "success") { delete waiters[t]; resolve(j); }
      }, reject);
  });
  const joined = await message({request: "join", ptype: "subscriber", room: CONFIG.room,
                                streams: [{feed: CONFIG.feed}]});
  const data = joined.plugindata && joined.plugindata.data;
  if (!joined.jsep) throw new Error((data && data.error) || "no offer from Janus");
  const pc = new RTCPeerConnection({iceServers: CONFIG.iceServers || []});
  const video = document.getElementById("v");
  const stream = new MediaStream();
  pc.ontrack = (e) => { stream.addTrack(e.track); video.srcObject = stream; };
  await pc.setRemoteDescription(joined.jsep);
  const answer = await pc.createAnswer();
  await pc.setLocalDescription(answer);
  await message({request: "start"}, {type: "answer", sdp: pc.localDescription.sdp});
  video.muted = !!q.get("muted");
  video.play().catch(() => {});
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  let prev = null;
  const onFrame = (now, meta) => {
    const t = performance.timeOrigin + (meta.expectedDisplayTime || now);
    viewer.presented.push(t);
    viewer.state = "playing";
    if (box) {
      const [x0, y0, x1, y1] = box, w = x1 - x0, h = y1 - y0;
      canvas.width = w; canvas.height = h;
      ctx.drawImage(video, x0, y0, w, h, 0, 0, w, h);
      const px = ctx.getImageData(0, 0, w, h).data;
      if (prev) {
        let sum = 0;
        for (let i = 0; i < px.length; i += 4) sum += Math.abs(px[i + 1] - prev[i + 1]);
        viewer.mouth.push([t, sum / (px.length / 4)]);
      }
      prev = px;
    }
    status("watching room " + CONFIG.room + " through Janus");
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}
main().catch((e) => { viewer.state = "error"; viewer.error = String(e); status("error: " + e); });
</script></body></html>
"""


def viewer_html(
    janus_url: str, room: int, feed: int, ice_servers: list[dict[str, Any]] | None = None
) -> str:
    """The page, configured for one feed (the config is JSON, safe inside the script)."""
    cfg = json.dumps(
        {"janus": janus_url, "room": room, "feed": feed, "iceServers": ice_servers or []}
    )
    cfg = cfg.replace("<", "\\u003c").replace(">", "\\u003e")
    return VIEWER_HTML.replace("__CONFIG__", cfg)


def watch_handler(janus_url: str, room: int, feed: int) -> Any:
    """An aiohttp handler serving the page for this feed."""
    page = viewer_html(janus_url, room, feed)

    async def watch(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    return watch


__all__ = ["VIEWER_HTML", "viewer_html", "watch_handler"]
