"""Our process's CPU as viewers grow: one presenter through Janus vs served by ``talkstream serve``.

For each audience size (default 1, 5, 10 viewers) and each path:

- **janus**: ``talkstream publish --janus`` (the real command, in its own process) renders and
  encodes the presenter once and publishes it into a local Janus VideoRoom; the viewers
  subscribe through Janus;
- **direct**: ``talkstream serve`` (its own process) with one presenter; every viewer is a
  WebRTC peer of the server (its own video track and encoder).

The viewers are aiortc subscribers in a separate process (so their decoding is not counted as
ours). Speech is pushed every few seconds so the face moves. CPU is read from /proc for our
process (publish / serve), Janus, and the viewer process over the measured window; the
machine's load average is recorded beside it.

Latency (1 viewer, each path): the wall time from a speech push to the first frame at the viewer
whose mouth region moves (a sentence after silence; the shipped model, idle motion off), i.e.
push -> render -> encode -> (Janus) -> decode -> display. Measured twice: by the aiortc
subscriber of the CPU runs (arrival of the decoded frame), and with ``--browser`` in headless
Chromium (the display time of the frame, requestVideoFrameCallback): through Janus with the
viewer page of ``talkstream publish`` (``/watch``), directly with ``talkstream serve``'s own
page (``/watch?presenter=``). The difference between the paths is what the SFU hop adds.

Capacity of one render worker (``--capacity 1,2,3``): K presenters in one process (one engine,
as a cluster worker runs them; the shipped model, the backend ``serve`` picks), each publishing
into Janus with speech queued; per stream, frames rendered per second and frames skipped (the
renderer fell behind its deadline). A worker's capacity is the largest K at ~25 fps.

Run: ``python benchmarks/sfu_viewers.py [--viewers 1,5,10] [--seconds 8] [--capacity 1,2,3]``;
about 3 minutes on 2 cores. Writes JSON (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
BURST_EVERY_S = 4.0
BROWSER: list[dict[str, Any]] = []  # --browser results
ENGINE_ARGS = ["--backend", "torch", "--threads", "1", "--no-idle"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its reaped children) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / CLK_TCK


def http_json(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(
        url, data=data, headers=headers or {}, method="POST" if data is not None else "GET"
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def espeak_wav(path: Path) -> bytes:
    subprocess.run(
        ["espeak-ng", "-w", str(path), "hello there, how are you today"],
        check=True,
        capture_output=True,
    )
    return path.read_bytes()


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=1)
            return
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f} s")


# -- the viewer process -----------------------------------------------------------------------


async def _child(args: argparse.Namespace) -> None:
    """N viewers of one path; prints 'ready', then at SIGTERM prints JSON stats."""
    from talkstream.publish.publisher import ViewerStats, collect, watch_janus

    box = tuple(json.loads(args.box)) if args.box else None
    viewers: list[Any] = []
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if args.path == "janus":
        from talkstream.publish.local import local_ice_address, use_local_ice

        ice = use_local_ice(local_ice_address() or "127.0.0.1")
        ice.__enter__()
        for _ in range(args.n):
            viewers.append(await watch_janus(args.url, int(args.target), region=box))  # type: ignore[arg-type]
        stats = [v.stats for v in viewers]
    else:
        import aiohttp
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        from talkstream.streaming.sdp import use_loopback_ice

        use_loopback_ice()
        stats = []
        async with aiohttp.ClientSession() as http:
            for _ in range(args.n):
                pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
                st = ViewerStats()
                tasks: list[asyncio.Task[None]] = []

                @pc.on("track")
                def on_track(track: Any, st: ViewerStats = st, tasks: list[Any] = tasks) -> None:
                    tasks.append(asyncio.create_task(collect(track, st, box)))  # type: ignore[arg-type]

                pc.addTransceiver("audio", direction="recvonly")
                pc.addTransceiver("video", direction="recvonly")
                await pc.setLocalDescription(await pc.createOffer())
                body = {"sdp": pc.localDescription.sdp, "type": "offer"}
                async with http.post(f"{args.url}/presenters/{args.target}/offer", json=body) as r:
                    answer = await r.json()
                    assert r.status == 200, answer
                await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
                viewers.append((pc, tasks))
                stats.append(st)
    print("ready", flush=True)
    await stop.wait()
    out = []
    for st in stats:
        t = np.asarray(st.video_arrivals[1:])[: len(st.region_change)]
        out.append(
            {
                "fps": round(st.fps(last_s=args.window), 2),
                "frames": len(st.video_arrivals),
                "change": list(zip(t.tolist(), st.region_change[: len(t)], strict=True))
                if args.keep_trace
                else [],
            }
        )
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)  # the peers' teardown is not what we measure


def start_viewers(
    path: str, url: str, target: str, n: int, box: list[int], window: float, trace: bool
) -> subprocess.Popen[str]:
    cmd = [
        sys.executable, __file__, "--child", path, "--url", url, "--target", str(target),
        "--n", str(n), "--box", json.dumps(box), "--window", str(window),
    ]  # fmt: skip
    if trace:
        cmd.append("--keep-trace")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"viewer process failed: {line!r}")
    return proc


def stop_viewers(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return list(json.loads(line[7:]))
    raise RuntimeError("viewer process gave no result")


# -- one measurement --------------------------------------------------------------------------


def measure(
    path: str,
    pids: dict[str, int],
    push_url: str,
    speech: bytes,
    url: str,
    target: str,
    n: int,
    box: list[int],
    seconds: float,
) -> dict[str, Any]:
    viewers = start_viewers(path, url, target, n, box, seconds, trace=n == 1)
    stats_url = push_url.rsplit("/", 1)[0] + "/stats" if path == "janus" else None
    try:
        time.sleep(2.0)  # ICE, DTLS, keyframes
        pids = {**pids, "viewers": viewers.pid}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        sent0 = http_json(stats_url)["frames_sent"] if stats_url else 0
        t0 = time.monotonic()
        pushes = []
        next_push = t0
        while time.monotonic() - t0 < seconds:
            if time.monotonic() >= next_push:
                pushes.append(time.monotonic())
                http_json(push_url, speech, {"Content-Type": "audio/wav"})
                next_push += BURST_EVERY_S
            time.sleep(0.05)
        wall = time.monotonic() - t0
        cpu = {k: round(100 * (cpu_seconds(p) - cpu0[k]) / wall, 1) for k, p in pids.items()}
        sent = (http_json(stats_url)["frames_sent"] - sent0) / wall if stats_url else None
        load = os.getloadavg()[0]
    finally:
        result = stop_viewers(viewers)
    fps = [v["fps"] for v in result]
    # Video frames our process encodes per second: the publisher's one track through Janus;
    # directly, one encoder per viewer, so the viewers' received frame rates added up.
    encoded = sent if sent is not None else sum(fps)
    rec: dict[str, Any] = {
        "path": path,
        "viewers": n,
        "cpu_percent": cpu,
        "encoded_fps": round(encoded, 1),
        "viewer_fps_min": min(fps),
        "viewer_fps_mean": round(float(np.mean(fps)), 2),
        "load1": round(load, 2),
    }
    if n == 1:
        rec["latency_ms"] = onset_latencies(result[0]["change"], pushes)
    return rec


def onset_latencies(change: list[list[float]], pushes: list[float]) -> list[float]:
    """Per push: ms from the push to the first arriving frame whose mouth moves."""
    if not change:
        return []
    arr = np.asarray(change)
    t, c = arr[:, 0], arr[:, 1]
    out = []
    for tp in pushes:
        quiet = c[(t > tp - 1.0) & (t < tp)]
        after = (t > tp) & (t < tp + 2.0)
        if quiet.size < 5 or not after.any():
            continue
        thr = max(4 * float(np.median(quiet)), float(np.max(quiet)) * 1.5, 0.3)
        moving = np.nonzero(after & (c > thr))[0]
        if moving.size:
            out.append(round(1000 * float(t[moving[0]] - tp), 1))
    return out


# -- the two paths ----------------------------------------------------------------------------


def browser_latency(
    path: str, page_url: str, push_url: str, speech: bytes, bursts: int = 3
) -> dict[str, Any]:
    """Push-to-display of a moving mouth in headless Chromium (epoch clocks on both sides)."""

    async def run() -> dict[str, Any]:
        from playwright.async_api import async_playwright

        from talkstream.benchmarking.browser import CHROMIUM_FLAGS

        async with async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_FLAGS
            )
            try:
                page = await browser.new_page()
                await page.goto(page_url)
                if path == "janus":
                    await page.wait_for_function(
                        "window.viewer.state === 'playing'", timeout=30_000
                    )
                else:
                    await page.wait_for_function(
                        "window.talkstream && window.talkstream.state === 'connected'",
                        timeout=30_000,
                    )
                await asyncio.sleep(2.0)
                pushes = []
                for _ in range(bursts):
                    pushes.append(time.time())
                    await asyncio.to_thread(
                        http_json, push_url, speech, {"Content-Type": "audio/wav"}
                    )
                    await asyncio.sleep(BURST_EVERY_S)
                if path == "janus":
                    mouth = await page.evaluate("window.viewer.mouth")
                    presented = await page.evaluate("window.viewer.presented")
                    change = [[t / 1000, c] for t, c in mouth]
                    shown = [t / 1000 for t in presented]
                else:
                    origin = await page.evaluate("performance.timeOrigin")
                    mouth = await page.evaluate("window.talkstream.probe.mouth")
                    presented = await page.evaluate("window.talkstream.presented")
                    change = [[(origin + m[0]) / 1000, m[1]] for m in mouth]
                    shown = [(origin + t) / 1000 for t in presented]
            finally:
                await browser.close()
        last = [t for t in shown if t > shown[-1] - 4.0]
        fps = (len(last) - 1) / (last[-1] - last[0]) if len(last) > 1 else 0.0
        return {"latency_ms": onset_latencies(change, pushes), "fps": round(fps, 1)}

    rec = asyncio.run(run())
    rec["path"] = path
    rec["load1"] = round(os.getloadavg()[0], 2)
    print(json.dumps({"browser": rec}), flush=True)
    return rec


def run_janus(
    counts: list[int], seconds: float, speech: bytes, tmp: Path, browser: bool = False
) -> list[dict[str, Any]]:
    from talkstream.publish.local import LocalJanus, free_port

    results = []
    with LocalJanus() as j:
        port = free_port()
        room = 1234
        pub = subprocess.Popen(
            [sys.executable, "-m", "talkstream.cli", "publish", "--janus", j.url,
             "--room", str(room), "--listen", f"127.0.0.1:{port}", "--ice-local-only",
             *ENGINE_ARGS],
            stdout=subprocess.DEVNULL, stderr=(tmp / "publish.log").open("w"), cwd=REPO,
        )  # fmt: skip
        try:
            wait_http(f"http://127.0.0.1:{port}/stats", 120)
            stats = http_json(f"http://127.0.0.1:{port}/stats")
            for n in counts:
                assert j.pid is not None
                rec = measure(
                    "janus", {"ours": pub.pid, "janus": j.pid}, f"http://127.0.0.1:{port}/speech",
                    speech, j.url, str(room), n, stats["mouth_box"], seconds,
                )  # fmt: skip
                print(json.dumps(rec), flush=True)
                results.append(rec)
            if browser:
                box = ",".join(str(v) for v in stats["mouth_box"])
                page = f"http://127.0.0.1:{port}/watch?box={box}&muted=1"
                BROWSER.append(
                    browser_latency("janus", page, f"http://127.0.0.1:{port}/speech", speech)
                )
        finally:
            pub.send_signal(signal.SIGTERM)
            pub.wait(30)
    return results


def run_direct(
    counts: list[int], seconds: float, speech: bytes, tmp: Path, browser: bool = False
) -> list[dict[str, Any]]:
    from talkstream.publish.local import free_port

    results = []
    port = free_port()
    srv = subprocess.Popen(
        [sys.executable, "-m", "talkstream.cli", "serve", "--port", str(port),
         "--ice-loopback-only", "--max-viewers", "16", *ENGINE_ARGS],
        stdout=subprocess.DEVNULL, stderr=(tmp / "serve.log").open("w"), cwd=REPO,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health", 120)
        http_json(base + "/presenters/bench", b"")
        # The mouth box of the serve presenter: from a viewer's answer (one quick viewer).
        box = _direct_box(base)
        for n in counts:
            rec = measure(
                "direct", {"ours": srv.pid}, base + "/presenters/bench/speech", speech, base,
                "bench", n, box, seconds,
            )  # fmt: skip
            print(json.dumps(rec), flush=True)
            results.append(rec)
        if browser:
            page = f"{base}/watch?presenter=bench&probe=1&autostart=1"
            BROWSER.append(
                browser_latency("direct", page, base + "/presenters/bench/speech", speech)
            )
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(30)
    return results


def _direct_box(base: str) -> list[int]:
    async def probe() -> list[int]:
        from talkstream.streaming.client import connect
        from talkstream.streaming.sdp import use_loopback_ice

        use_loopback_ice()
        peer = await connect(base, presenter="bench")
        await peer.close()
        return list(peer.answer["mouth_box"])

    return asyncio.run(probe())


async def _capacity(counts: list[int], seconds: float, speech: bytes) -> list[dict[str, Any]]:
    import io

    import soundfile

    from talkstream.config import AvatarConfig, EngineConfig, IdleConfig
    from talkstream.engine.avatar import load_avatar_source, prepare_avatar_source
    from talkstream.publish.local import LocalJanus, local_ice_address, use_local_ice
    from talkstream.publish.publisher import publish_to_janus
    from talkstream.runtime import load_engine
    from talkstream.streaming.config import StreamConfig
    from talkstream.streaming.tracks import AvatarStream

    pcm, rate = soundfile.read(io.BytesIO(speech), dtype="float32")
    acfg = AvatarConfig()
    engine = load_engine(EngineConfig(idle=IdleConfig(enabled=False), backend="auto"))
    out = []
    try:
        import dataclasses

        avatar = prepare_avatar_source(
            load_avatar_source(None, None, acfg),
            dataclasses.replace(acfg, crop_size=engine.crop_size),
        )
        engine.encode_avatar(avatar)
        engine.warmup(avatar)
        with LocalJanus() as j, use_local_ice(local_ice_address() or "127.0.0.1"):
            for k in counts:
                streams = [
                    AvatarStream(engine, avatar, StreamConfig(), mode="presenter", name=f"s{i}")
                    for i in range(k)
                ]
                pubs = []
                for i, st in enumerate(streams):
                    st.start()
                    pubs.append(await publish_to_janus(st, j.url, 1300 + i))
                for st in streams:
                    for _ in range(int(seconds / (pcm.shape[0] / rate)) + 3):
                        st.push_speech(pcm, rate)
                await asyncio.sleep(2.0)
                r0 = [(st.stats.frames_rendered, st.stats.frames_skipped) for st in streams]
                cpu0, t0 = cpu_seconds(os.getpid()), time.monotonic()
                await asyncio.sleep(seconds)
                wall = time.monotonic() - t0
                cpu = 100 * (cpu_seconds(os.getpid()) - cpu0) / wall
                deltas = [
                    (st.stats.frames_rendered - a, st.stats.frames_skipped - b)
                    for st, (a, b) in zip(streams, r0, strict=True)
                ]
                fps = [d[0] / wall for d in deltas]
                skipped = [d[1] / wall for d in deltas]
                rec = {
                    "sessions": k,
                    "rendered_fps_min": round(min(fps), 1),
                    "skipped_per_s_max": round(max(skipped), 1),
                    "cpu_percent": round(cpu, 1),
                    "backend": str(getattr(engine.backend, "name", "?")),
                    "load1": round(os.getloadavg()[0], 2),
                }
                print(json.dumps(rec), flush=True)
                out.append(rec)
                for p in pubs:
                    await p.close()
                for st in streams:
                    await st.close()
    finally:
        engine.close()
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| path | viewers | our process CPU % | frames we encode /s | Janus CPU % "
        "| viewer process CPU % | viewer fps (min) | load1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        c = r["cpu_percent"]
        lines.append(
            f"| {r['path']} | {r['viewers']} | {c['ours']} | {r['encoded_fps']} | "
            f"{c.get('janus', '-')} | "
            f"{c['viewers']} | {r['viewer_fps_min']} | {r['load1']} |"
        )
    lat = [r for r in results if r.get("latency_ms")]
    if lat:
        lines += [
            "",
            "| path | push -> moving mouth at an aiortc viewer, ms (per burst) | median |",
            "|---|---|---:|",
        ]
        for r in lat:
            lines.append(f"| {r['path']} | {r['latency_ms']} | {np.median(r['latency_ms']):.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--viewers", default="1,5,10", help="audience sizes (1,5,10)")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window per size (8)")
    ap.add_argument("--paths", default="janus,direct", help="janus,direct (empty: none)")
    ap.add_argument(
        "--browser", action="store_true", help="also measure latency in headless Chromium"
    )
    ap.add_argument(
        "--capacity", default="", help="also measure a worker with these session counts (1,2,3)"
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "sfu_viewers.json")
    # the viewer process
    ap.add_argument("--child", choices=["janus", "direct"], help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--box", default="", help=argparse.SUPPRESS)
    ap.add_argument("--window", type=float, default=8.0, help=argparse.SUPPRESS)
    ap.add_argument("--keep-trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.path = args.child
        asyncio.run(_child(args))
        return 0
    if shutil.which("espeak-ng") is None:
        print("espeak-ng is needed (apt-get install espeak-ng)", file=sys.stderr)
        return 2
    counts = [int(x) for x in args.viewers.split(",")]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        speech = espeak_wav(tmp / "speech.wav")
        paths = args.paths.split(",")
        if "janus" in paths:
            results += run_janus(counts, args.seconds, speech, tmp, args.browser)
        if "direct" in paths:
            results += run_direct(counts, args.seconds, speech, tmp, args.browser)
        capacity = []
        if args.capacity:
            ks = [int(x) for x in args.capacity.split(",")]
            capacity = asyncio.run(_capacity(ks, args.seconds, speech))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"cpus": os.cpu_count(), "results": results, "capacity": capacity}, indent=1)
    )
    if results:
        print(markdown(results))
    for b in BROWSER:
        med = np.median(b["latency_ms"]) if b["latency_ms"] else float("nan")
        print(
            f"browser ({b['path']}): push -> moving mouth on screen {b['latency_ms']} ms "
            f"(median {med:.0f}), {b['fps']} fps, load {b['load1']}"
        )
    for c in capacity:
        print(
            f"capacity: {c['sessions']} sessions -> min {c['rendered_fps_min']} fps rendered, "
            f"max {c['skipped_per_s_max']} skipped/s, {c['cpu_percent']} % CPU, load {c['load1']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
