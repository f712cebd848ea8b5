"""Soak: the server at its session limit for N minutes, with real WebRTC clients, while a
fuzzer attacks it (issue 14).

    python benchmarks/soak.py                  # 10 minutes, 4 sessions (the default limit)
    python benchmarks/soak.py --minutes 2 --json soak.json

The server runs in this process (a thread with its own event loop, as ``talkstream serve``
would), so its memory, file descriptors, threads and asyncio tasks can be counted; the clients
(aiortc, one live session each, a looping speech-like microphone) and the fuzzer run in
processes of their own, so their decoders and garbage do not count against the server.

Reported:

* RSS growth of the server process from the start of the soak (clients connected, 20 s of
  settling) to its end, in % (target: under 5 %), and its samples every 10 s.
* Fresh frames per second per session, counted by the client: a decoded frame whose luma plane
  differs from the previous frame's is fresh, a repeat is not (target: 25). Also the server's
  own count of rendered frames, the worst 10-s window and the longest gap between frames (a
  freeze; target: none over 100 ms beyond the frame period).
* Leaks: file descriptors, threads and asyncio tasks of the server before the clients came
  and after they left (target: no growth).
* The fuzzer's request count and status histogram (target: no 5xx but 503 at capacity).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from talkstream.streaming.config import default_max_sessions

SAMPLE_EVERY_S = 10.0
SETTLE_S = 20.0


@dataclass
class Scenario:
    minutes: float = 10.0
    # = max_sessions: the server at its limit (serve's default for a CPU: one per core).
    sessions: int = default_max_sessions("cpu")
    preset: str = "tiny"
    backend: str = "auto"
    fuzz_concurrency: int = 4
    # Hostile requests per second over all fuzz workers: enough to hit every refusal path
    # many times a minute without turning the soak into a flood test.
    fuzz_rps: float = 25.0
    seed: int = 14


@dataclass
class Snapshot:
    rss_mb: float
    fds: int
    threads: int
    tasks: int
    thread_names: list[str] = field(default_factory=list)
    task_names: list[str] = field(default_factory=list)


@dataclass
class Result:
    scenario: Scenario
    machine: dict[str, Any]
    baseline: Snapshot
    start: Snapshot
    end: Snapshot
    after: Snapshot
    rss_growth_pct: float
    rss_samples_mb: list[float]
    sessions: list[dict[str, Any]]
    server_sessions: list[dict[str, Any]]
    fuzz: dict[str, Any]
    server_loop_lag: dict[str, float]
    server_fresh_fps_by_10s: dict[str, list[float]]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- the server


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """The talkstream app in a thread with its own loop, on a free loopback port."""

    def __init__(self, scenario: Scenario) -> None:
        from aiohttp import web

        from talkstream.benchmarking.local import local_engine
        from talkstream.config import EngineConfig
        from talkstream.streaming.config import ServeConfig
        from talkstream.streaming.sdp import use_loopback_ice
        from talkstream.streaming.security import quiet_client_protocol_errors
        from talkstream.streaming.server import (
            MANAGER_KEY,
            create_app,
            load_avatar,
            make_runner,
        )

        use_loopback_ice()
        quiet_client_protocol_errors()
        self.engine = local_engine(EngineConfig(preset=scenario.preset, backend=scenario.backend))
        cfg = ServeConfig(port=0, ice_loopback_only=True, max_sessions=scenario.sessions)
        avatar = load_avatar(cfg, self.engine)
        self.engine.encode_avatar(avatar)
        self.engine.warmup(avatar)
        self.app = create_app(cfg, self.engine, avatar)
        self.manager = self.app[MANAGER_KEY]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="soak-server")
        self.thread.start()

        async def start() -> tuple[web.AppRunner, str]:
            runner = make_runner(self.app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"

        self.runner, self.url = self.call(start())
        self.lags: list[float] = []
        self.lag_task = self.call(self._start_lag_monitor())

    async def _start_lag_monitor(self) -> asyncio.Task[None]:
        async def monitor() -> None:
            # How late a 10 ms sleep wakes up: the server loop's stalls (every stream waits).
            while True:
                t0 = time.perf_counter()
                await asyncio.sleep(0.01)
                self.lags.append(time.perf_counter() - t0 - 0.01)

        return asyncio.create_task(monitor(), name="soak-lag-monitor")

    def lag_report(self, since: int) -> dict[str, float]:
        lags = np.asarray(self.lags[since:]) * 1000
        if not lags.size:
            return {}
        return {
            "p50_ms": round(float(np.percentile(lags, 50)), 1),
            "p99_ms": round(float(np.percentile(lags, 99)), 1),
            "max_ms": round(float(lags.max()), 1),
            "over_100ms": int((lags > 100).sum()),
        }

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def snapshot(self) -> Snapshot:
        async def tasks() -> list[str]:
            return sorted(t.get_name() for t in asyncio.all_tasks())

        names = self.call(tasks())
        threads = sorted(t.name for t in threading.enumerate())
        return Snapshot(
            rss_mb=round(rss_mb(), 1),
            fds=len(os.listdir("/proc/self/fd")),
            threads=len(threads),
            tasks=len(names),
            thread_names=threads,
            task_names=names,
        )

    def stats(self) -> list[dict[str, Any]]:
        async def collect() -> list[dict[str, Any]]:
            return [
                {"session_id": p.id, **p.stream.snapshot()}
                for p in self.manager.peers.values()
                if p.kind == "live"
            ]

        return self.call(collect())

    def peer_count(self) -> int:
        async def count() -> int:
            return len(self.manager.peers)

        return self.call(count())

    def close_presenters(self) -> None:
        async def close_all() -> None:
            for name in list(self.manager.presenters):
                await self.manager.close_presenter(name)

        self.call(close_all())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.lag_task.cancel)
        with contextlib.suppress(Exception):
            self.call(self.runner.cleanup(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.engine.close()


# ----------------------------------------------------------------------------- clients


def speechlike_signal() -> np.ndarray:
    t = np.arange(48000 * 4) / 48000
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.6 * np.sin(2 * np.pi * 180 * t) * env).astype(np.float32)


async def run_clients(url: str, n: int, seconds: float) -> None:
    """Child process: n live sessions for ``seconds``; prints one JSON line when connected
    and one with per-session frame counts at the end."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    from talkstream.streaming.client import SpeechTrack
    from talkstream.streaming.sdp import use_loopback_ice

    use_loopback_ice()
    sig = speechlike_signal()
    peers: list[tuple[RTCPeerConnection, dict[str, Any]]] = []
    tasks: list[asyncio.Task[None]] = []

    async def count(track: Any, rec: dict[str, Any]) -> None:
        prev = None
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                # The luma plane of the decoded frame: equal to the last one = a repeat.
                digest = hashlib.blake2b(bytes(frame.planes[0]), digest_size=8).digest()
                rec["arrivals"].append(now)
                rec["fresh"].append(digest != prev)
                prev = digest
        except MediaStreamError:
            pass

    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            rec: dict[str, Any] = {"arrivals": [], "fresh": []}

            @pc.on("track")
            def on_track(track: Any, rec: dict[str, Any] = rec) -> None:
                if track.kind == "video":
                    tasks.append(asyncio.create_task(count(track, rec)))

            pc.addTrack(SpeechTrack(sig, loop=True))
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            body = {"sdp": pc.localDescription.sdp, "type": "offer"}
            async with http.post(url + "/offer", json=body) as r:
                answer = await r.json()
                if r.status != 200:
                    raise SystemExit(f"offer refused: {r.status} {answer}")
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
            rec["session_id"] = answer["session_id"]
            peers.append((pc, rec))
        print(json.dumps({"ids": [r["session_id"] for _, r in peers]}), flush=True)
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        t1 = time.monotonic()
        out = []
        for _, rec in peers:
            out.append(frame_report(rec, t0 + SETTLE_S, t1))
        print(json.dumps({"sessions": out}), flush=True)
        for pc, _ in peers:
            await pc.close()
        for t in tasks:
            t.cancel()


def frame_report(rec: dict[str, Any], t0: float, t1: float) -> dict[str, Any]:
    """Fresh and received fps between t0 and t1, the worst 10-s window, the longest gap."""
    t = np.asarray(rec["arrivals"])
    fresh = np.asarray(rec["fresh"], dtype=bool)
    keep = (t >= t0) & (t <= t1)
    t, fresh = t[keep], fresh[keep]
    span = max(t1 - t0, 1e-9)
    windows = []
    for w0 in np.arange(t0, t1 - SAMPLE_EVERY_S + 1e-9, SAMPLE_EVERY_S):
        m = (t >= w0) & (t < w0 + SAMPLE_EVERY_S)
        windows.append(float(fresh[m].sum()) / SAMPLE_EVERY_S)
    # A repeated frame is encoded again and VP8 refines a still image, so a changed luma plane
    # is an upper bound on fresh frames; the server's count of rendered frames is the measure.
    return {
        "session_id": rec.get("session_id"),
        "fresh_fps": round(float(fresh.sum()) / span, 2),
        "received_fps": round(len(t) / span, 2),
        "worst_10s_fresh_fps": round(min(windows), 2) if windows else None,
        "fresh_fps_by_10s": [round(w, 1) for w in windows],
        "max_gap_ms": round(float(np.diff(t).max()) * 1000, 1) if len(t) > 1 else None,
        "gaps_over_140ms": int((np.diff(t) > 0.14).sum()) if len(t) > 1 else 0,
    }


# ----------------------------------------------------------------------------- the fuzzer


async def run_fuzz(url: str, seconds: float, concurrency: int, seed: int, rps: float) -> None:
    """Child process: hostile requests for ``seconds``; prints a JSON status histogram."""
    import io

    import aiohttp
    import soundfile

    rng = random.Random(seed)
    statuses: Counter[str] = Counter()
    buf = io.BytesIO()
    with soundfile.SoundFile(
        buf, "w", samplerate=192_000, channels=8, format="FLAC", subtype="PCM_16"
    ) as f:
        block = np.zeros((192_000, 8), np.int16)
        for _ in range(60):
            f.write(block)
    bomb = buf.getvalue()
    deep = b"[" * 1000 + b"]" * 1000
    nan = np.full(1600, np.nan, "<f4").tobytes()
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/offer", {"data": deep, "headers": {"Content-Type": "application/json"}}),
        ("POST", "/offer", {"json": {"type": "offer", "sdp": "v=0\r\nm=audio 9 x\r\n"}}),
        ("POST", "/offer", {"data": b"{nope", "headers": {"Content-Type": "application/json"}}),
        (
            "POST",
            "/presenters/fz/offer",
            {"data": deep, "headers": {"Content-Type": "application/json"}},
        ),
        ("POST", "/presenters/fz/speech", {"data": bomb, "headers": {"Content-Type": "audio/wav"}}),
        (
            "POST",
            "/presenters/fz/speech?rate=16000&format=f32le",
            {"data": nan, "headers": {"Content-Type": "application/octet-stream"}},
        ),
        (
            "POST",
            "/presenters/fz/speech",
            {"data": b"RIFF" + bytes(100), "headers": {"Content-Type": "audio/wav"}},
        ),
        ("GET", "/presenters/fz/stats", {}),
        ("GET", "/", {"headers": {"Host": "rebind.example"}}),
        ("POST", "/presenters/fz", {"headers": {"Origin": "http://evil.example"}}),
        ("PUT", "/health", {}),
        ("GET", "/health", {"headers": {"X-Big": "x" * 20_000}}),
        ("GET", "/sessions/nope/stats", {}),
        ("DELETE", "/sessions/nope", {}),
    ]
    end = time.monotonic() + seconds

    async def worker(http: aiohttp.ClientSession) -> None:
        while time.monotonic() < end:
            roll = rng.random()
            try:
                if roll < 0.05:
                    async with http.ws_connect(url + "/presenters/fz/ws?rate=16000") as ws:
                        await ws.send_str(deep.decode())
                        await ws.receive(timeout=10)
                    statuses["101"] += 1
                    continue
                method, path, kw = rng.choice(cases)
                async with http.request(
                    method, url + path, timeout=aiohttp.ClientTimeout(total=15), **kw
                ) as r:
                    await r.read()
                    statuses[str(r.status)] += 1
            except aiohttp.WSServerHandshakeError as e:
                statuses[str(e.status)] += 1
            except aiohttp.ClientResponseError as e:
                statuses[str(e.status)] += 1
            except aiohttp.ClientError:
                statuses["cut"] += 1
            except TimeoutError:
                statuses["timeout"] += 1
            await asyncio.sleep(rng.uniform(0.5, 1.5) * concurrency / rps)

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    print(json.dumps({"statuses": dict(statuses), "requests": sum(statuses.values())}), flush=True)


# ----------------------------------------------------------------------------- the soak


def server_fresh_fps(windows: list[dict[str, int]], every_s: float) -> dict[str, list[float]]:
    """Frames the server rendered (each a fresh image; repeats are not rendered) per second,
    per session and sampling window; a session that closed has no further entries."""
    out: dict[str, list[float]] = {}
    for before, after in itertools.pairwise(windows):
        for sid, n in after.items():
            if sid in before:
                out.setdefault(sid, []).append(round((n - before[sid]) / every_s, 1))
    return out


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in load]}


def soak(sc: Scenario) -> Result:
    seconds = sc.minutes * 60
    server = Server(sc)
    notes: list[str] = []
    try:
        # The loop's default executor and aiortc's threads start with the first session.
        time.sleep(1.0)
        baseline = server.snapshot()
        me = [sys.executable, __file__]
        clients = subprocess.Popen(
            [*me, "--clients", server.url, str(sc.sessions), str(seconds + SETTLE_S)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert clients.stdout is not None
        first = json.loads(clients.stdout.readline())
        print(
            f"soak: {len(first['ids'])} sessions connected; settling {SETTLE_S:.0f} s", flush=True
        )
        time.sleep(SETTLE_S)
        start = server.snapshot()
        fuzz = None
        if sc.fuzz_rps > 0:
            fuzz = subprocess.Popen(
                [
                    *me,
                    "--fuzz",
                    server.url,
                    str(seconds),
                    str(sc.fuzz_concurrency),
                    str(sc.seed),
                    str(sc.fuzz_rps),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        lag_from = len(server.lags)
        samples = [start.rss_mb]
        server_windows: list[dict[str, int]] = [
            {x["session_id"]: x["frames_rendered"] for x in server.stats()}
        ]
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            time.sleep(min(SAMPLE_EVERY_S, max(t_end - time.monotonic(), 0)))
            samples.append(round(rss_mb(), 1))
            rendered = {x["session_id"]: x["frames_rendered"] for x in server.stats()}
            server_windows.append(rendered)
            print(
                f"soak: RSS {samples[-1]:.0f} MB, {len(rendered)} sessions, server rendered "
                f"{sorted(rendered.values())} frames so far, loop lag "
                f"{server.lag_report(len(server.lags) - 1000)}",
                flush=True,
            )
        end = server.snapshot()
        loop_lag = server.lag_report(lag_from)
        rendered_fps = server_fresh_fps(server_windows, SAMPLE_EVERY_S)
        server_sessions = server.stats()
        report = json.loads(clients.stdout.readline())
        clients.wait(timeout=60)
        fuzz_report: dict[str, Any] = {}
        if fuzz is not None:
            out, _ = fuzz.communicate(timeout=120)
            fuzz_report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        deadline = time.monotonic() + 30
        while server.peer_count() and time.monotonic() < deadline:
            time.sleep(0.5)
        # A presenter the fuzzer may have made (when a slot was free) is closed as DELETE
        # would: what remains after that is a leak.
        server.close_presenters()
        time.sleep(3.0)
        after = server.snapshot()
        if server.peer_count():
            notes.append(f"{server.peer_count()} peers still open 30 s after the clients left")
    finally:
        server.close()
    growth = 100.0 * (end.rss_mb - start.rss_mb) / start.rss_mb
    return Result(
        scenario=sc,
        machine=machine(),
        baseline=baseline,
        start=start,
        end=end,
        after=after,
        rss_growth_pct=round(growth, 2),
        rss_samples_mb=samples,
        sessions=report["sessions"],
        server_sessions=[
            {
                k: s.get(k)
                for k in (
                    "session_id",
                    "frames_rendered",
                    "frames_skipped",
                    "frames_repeated",
                    "display_fps",
                )
            }
            for s in server_sessions
        ],
        fuzz=fuzz_report,
        server_loop_lag=loop_lag,
        server_fresh_fps_by_10s=rendered_fps,
        notes=notes,
    )


def table(r: Result) -> str:
    five = sum(
        n
        for s, n in r.fuzz.get("statuses", {}).items()
        if s.isdigit() and int(s) >= 500 and s != "503"
    )
    lines = [
        f"soak: {r.scenario.minutes:g} min, {r.scenario.sessions} sessions "
        f"({r.scenario.preset}, {r.scenario.backend}), {r.machine['cpus']} CPUs, "
        f"load at start {r.machine['loadavg_at_start']}",
        f"RSS: {r.start.rss_mb:.0f} -> {r.end.rss_mb:.0f} MB ({r.rss_growth_pct:+.1f} %)",
        "server-rendered (fresh) fps per session, mean over the soak: "
        + ", ".join(
            f"{np.mean(v):.1f} (min 10 s: {min(v):.1f})" for v in r.server_fresh_fps_by_10s.values()
        ),
        "client: received fps "
        + ", ".join(f"{s['received_fps']:.1f}" for s in r.sessions)
        + "; frames whose decoded luma changed, per s "
        + ", ".join(f"{s['fresh_fps']:.1f}" for s in r.sessions)
        + " (longest gap ms: "
        + ", ".join(f"{s['max_gap_ms']}" for s in r.sessions)
        + ")",
        f"leaks (before clients -> after): fds {r.baseline.fds} -> {r.after.fds}, "
        f"threads {r.baseline.threads} -> {r.after.threads} "
        f"(new: {sorted(set(r.after.thread_names) - set(r.baseline.thread_names))}), "
        f"tasks {r.baseline.tasks} -> {r.after.tasks}",
        f"server event loop lag: {r.server_loop_lag}",
        f"fuzz: {r.fuzz.get('requests', 0)} requests, statuses {r.fuzz.get('statuses')}, "
        f"5xx other than 503 (capacity): {five}",
    ]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--clients":
        asyncio.run(run_clients(argv[1], int(argv[2]), float(argv[3])))
        return 0
    if argv and argv[0] == "--fuzz":
        asyncio.run(run_fuzz(argv[1], float(argv[2]), int(argv[3]), int(argv[4]), float(argv[5])))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=Scenario.minutes)
    p.add_argument("--sessions", type=int, default=Scenario.sessions)
    p.add_argument("--preset", default=Scenario.preset)
    p.add_argument("--backend", default=Scenario.backend)
    p.add_argument("--fuzz-concurrency", type=int, default=Scenario.fuzz_concurrency)
    p.add_argument("--fuzz-rps", type=float, default=Scenario.fuzz_rps, help="0: no fuzzing")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.add_argument("--log", action="store_true", help="log the server's session events")
    a = p.parse_args(argv)
    if a.log:
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("talkstream.streaming.sessions").setLevel(logging.INFO)
    sc = Scenario(a.minutes, a.sessions, a.preset, a.backend, a.fuzz_concurrency, a.fuzz_rps)
    result = soak(sc)
    print(table(result))
    if a.json:
        a.json.write_text(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
