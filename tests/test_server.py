"""The server, aiortc to aiortc in one process: live sessions, limits, teardown, idle timeout,
/health, /metrics and every kind of bad input.

All WebRTC traffic stays on 127.0.0.1 (loopback-only ICE, no STUN).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")
pytest.importorskip("aiohttp", reason="the serve extra (aiohttp) is not installed")

import aiohttp
import soundfile
from aiortc.mediastreams import MediaStreamTrack

from talkstream.benchmarking.local import start_server
from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from talkstream.streaming.client import SpeechTrack, connect
from talkstream.streaming.config import StreamConfig, default_max_sessions
from talkstream.streaming.sessions import SessionManager
from tests.conftest import speechlike


@dataclass
class Harness:
    url: str
    http: aiohttp.ClientSession
    manager: SessionManager

    async def get_json(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.url + path) as r:
            return r.status, await r.json()

    async def post(self, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.http.post(self.url + path, **kw) as r:
            body = await r.text()
            try:
                return r.status, json.loads(body)
            except json.JSONDecodeError:
                return r.status, body


@contextlib.asynccontextmanager
async def running_server(
    engine: Engine, avatar: Avatar, **overrides: Any
) -> AsyncIterator[Harness]:
    """A server on a free loopback port (the benchmarks' own, :func:`start_server`) and an HTTP
    client, torn down afterwards."""
    async with start_server(engine, avatar, **overrides) as srv, aiohttp.ClientSession() as http:
        yield Harness(srv.url, http, srv.manager)


@pytest.fixture(scope="module")
def warm_engine(tiny_engine: Engine, default_avatar: Avatar) -> Iterator[Engine]:
    # A cold engine's first frames take a second: warm it as `serve` does at start-up.
    tiny_engine.warmup(default_avatar)
    yield tiny_engine


def speech_48k(seconds: float) -> np.ndarray:
    return speechlike(int(48000 * seconds), rate=48000) * 2


async def wait_for(cond: Any, timeout: float, step: float = 0.05) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if cond():
            return True
        await asyncio.sleep(step)
    return bool(cond())


def _own_threads() -> set[str]:
    """Threads other than the event loop's default executor: a bounded pool that aiortc's
    encoders share and that keeps its idle workers (sized by load, not by sessions)."""
    return {t.name for t in threading.enumerate() if not t.name.startswith("asyncio_")}


class StalledMic(MediaStreamTrack):
    """A microphone that never delivers a frame (a muted or frozen capture device)."""

    kind = "audio"

    async def recv(self) -> Any:
        await asyncio.Event().wait()


# ----------------------------------------------------------------------------- live sessions


async def test_live_session_streams_avatar_and_bad_input_leaves_it_running(
    warm_engine: Engine, default_avatar: Avatar
) -> None:
    # Budgets other than the defaults (40 and 40), and each other: the report must show these.
    stream = StreamConfig(jitter_budget_ms=60.0, compute_budget_ms=50.0)
    async with running_server(warm_engine, default_avatar, stream=stream) as h:
        client = await connect(h.url, mic=SpeechTrack(speech_48k(6.0)), session=h.http)
        try:
            assert client.answer["latency_budget_ms"] == stats_budget(warm_engine, default_avatar)
            assert len(client.answer["mouth_box"]) == 4
            await asyncio.sleep(2.0)
            # Meanwhile, every kind of bad input gets a 4xx with a reason ...
            await _every_bad_input(h)
            await asyncio.sleep(1.5)
            rec = client.received
            # ... and the session kept streaming: 25 fps video, the delayed speech back.
            assert rec.fps(last_s=2.0) >= 20, rec.fps(last_s=2.0)
            assert len(rec.audio_arrivals) > 100
            assert max(rec.audio_rms) > 0.05  # the avatar's voice: our speech, replayed
            status, stats = await h.get_json(f"/sessions/{client.session_id}/stats")
            assert status == 200
            assert stats["speech_s"] > 2.0  # the server received the speech
            # Frames are rendered or, on a machine too busy to keep up, skipped by deadline.
            assert stats["frames_rendered"] > 5
            assert stats["frames_rendered"] + stats["frames_skipped"] > 60
            # The budget the stream runs on: the engine's algorithmic latency, then the live
            # jitter and the compute budget as configured, in milliseconds.
            assert stats["latency_budget_ms"] == stats_budget(warm_engine, default_avatar)
            status, trace = await h.get_json(f"/sessions/{client.session_id}/trace")
            assert status == 200 and max(m for _, m in trace["motion"]) > 0
        finally:
            await client.close()


def stats_budget(engine: Engine, avatar: Avatar) -> Any:
    """The latency budget a live stream with 60 ms jitter and 50 ms compute budgets reports."""
    algorithmic_ms = engine.session(avatar).latency_s * 1000
    assert 80 < algorithmic_ms < 200  # the 2-frame lookahead (80 ms) plus the audio frontend's
    budget = {
        "algorithmic_ms": algorithmic_ms,
        "jitter_ms": 60.0,
        "compute_ms": 50.0,
        "total_ms": algorithmic_ms + 60.0 + 50.0,
    }
    return pytest.approx(budget, abs=0.06)  # the report rounds to 0.1 ms


async def _every_bad_input(h: Harness) -> None:
    good = await _offer_sdp()

    async def offer(path: str = "/offer", **kw: Any) -> tuple[int, Any]:
        return await h.post(path, **kw)

    cases: list[tuple[str, tuple[int, Any], int]] = [
        (
            "wrong content type",
            await offer(data=b"v=0", headers={"Content-Type": "text/plain"}),
            415,
        ),
        ("not json", await offer(data=b"{nope", headers={"Content-Type": "application/json"}), 400),
        ("json not an object", await offer(json=[1, 2]), 400),
        ("type answer", await offer(json={"sdp": good, "type": "answer"}), 400),
        ("sdp missing", await offer(json={"type": "offer"}), 400),
        ("not sdp", await offer(json={"sdp": "hello", "type": "offer"}), 400),
        (
            "no media",
            await offer(json={"sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\n", "type": "offer"}),
            400,
        ),
        ("oversized", await offer(json={"sdp": good + "a=x\r\n" * 30000, "type": "offer"}), 413),
        ("unknown codecs", await offer(json={"sdp": _rename_codecs(good), "type": "offer"}), 400),
        (
            "no microphone",
            await offer(json={"sdp": await _offer_sdp(mic=False), "type": "offer"}),
            400,
        ),
        (
            "garbled sdp",
            await offer(
                json={"sdp": good.replace("a=fingerprint", "a=fingerprint:x"), "type": "offer"}
            ),
            400,
        ),
        (
            "viewer of nobody",
            await offer("/presenters/nobody/offer", json={"sdp": good, "type": "offer"}),
            404,
        ),
        (
            "bad presenter name",
            await h.post(
                "/presenters/bad%20name!/speech",
                data=b"\0\0",
                headers={"Content-Type": "audio/wav"},
            ),
            400,
        ),
        (
            "push: bad rate",
            await h.post(
                "/presenters/p1/speech?rate=1234",
                data=b"\0\0" * 100,
                headers={"Content-Type": "application/octet-stream"},
            ),
            400,
        ),
        (
            "push: rate not a number",
            await h.post(
                "/presenters/p1/speech?rate=fast",
                data=b"\0\0",
                headers={"Content-Type": "application/octet-stream"},
            ),
            400,
        ),
        (
            "push: no rate",
            await h.post(
                "/presenters/p1/speech",
                data=b"\0\0",
                headers={"Content-Type": "application/octet-stream"},
            ),
            400,
        ),
        (
            "push: odd bytes",
            await h.post(
                "/presenters/p1/speech?rate=16000",
                data=b"\0\0\0",
                headers={"Content-Type": "application/octet-stream"},
            ),
            400,
        ),
        (
            "push: bad wav",
            await h.post(
                "/presenters/p1/speech", data=b"RIFFjunk", headers={"Content-Type": "audio/wav"}
            ),
            400,
        ),
        (
            "push: wav at a bad rate",
            await h.post(
                "/presenters/p1/speech", data=_wav(4000), headers={"Content-Type": "audio/wav"}
            ),
            400,
        ),
        (
            "push: not audio",
            await h.post(
                "/presenters/p1/speech?rate=16000",
                data=b"{}",
                headers={"Content-Type": "application/json"},
            ),
            415,
        ),
        (
            "push: too much",
            await h.post(
                "/presenters/p1/speech?rate=16000",
                data=b"\0" * (8 * 1024 * 1024 + 2),
                headers={"Content-Type": "application/octet-stream"},
            ),
            413,
        ),
        ("ws: bad rate", await _ws_status(h, "/presenters/p1/ws?rate=99"), 400),
    ]
    for what, (status, body), expected in cases:
        assert status == expected, (what, status, body)
        reason = body.get("error") if isinstance(body, dict) else body
        assert reason, (what, body)
    # No bad push left a presenter behind.
    assert not h.manager.presenters
    status, health = await h.get_json("/health")
    assert status == 200 and health["status"] == "ok"


async def _ws_status(h: Harness, path: str) -> tuple[int, Any]:
    try:
        async with h.http.ws_connect(h.url + path):
            return 101, {"error": "accepted"}
    except aiohttp.WSServerHandshakeError as e:
        return e.status, {"error": e.message}


def _wav(rate: int) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(rate // 10, np.float32), rate, format="WAV")
    return buf.getvalue()


def _rename_codecs(sdp: str) -> str:
    # Every codec renamed to something no one speaks.
    out = []
    for line in sdp.splitlines():
        if line.startswith("a=rtpmap:"):
            head, rest = line.split(" ", 1)
            line = f"{head} X-UNKNOWN{rest[rest.index('/') :]}"
        out.append(line)
    return "\r\n".join(out) + "\r\n"


async def _offer_sdp(mic: bool = True) -> str:
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        if mic:
            pc.addTrack(SpeechTrack(np.zeros(960, np.float32)))
        else:
            pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        return str(pc.localDescription.sdp)
    finally:
        await pc.close()


async def test_session_limit_is_503_with_reason(
    warm_engine: Engine, default_avatar: Avatar
) -> None:
    async with running_server(warm_engine, default_avatar, max_sessions=1) as h:
        first = await connect(h.url, mic=SpeechTrack(speech_48k(1.0)), session=h.http)
        try:
            status, body = await h.post("/offer", json={"sdp": await _offer_sdp(), "type": "offer"})
            assert status == 503
            assert "in use" in body["error"]
            # A presenter is a stream too.
            status, body = await h.post(
                "/presenters/p/speech?rate=16000",
                data=b"\0\0" * 160,
                headers={"Content-Type": "application/octet-stream"},
            )
            assert status == 503
            _, health = await h.get_json("/health")
            assert health["accepting"] is False and health["sessions"] == 1
        finally:
            await first.close()


async def test_teardown_when_peer_disconnects_mid_stream(
    warm_engine: Engine, default_avatar: Avatar
) -> None:
    async with running_server(warm_engine, default_avatar) as h:
        # One session first: aiortc and the loop's executor start their long-lived threads.
        warm = await connect(h.url, mic=SpeechTrack(speech_48k(1.0)), session=h.http)
        await asyncio.sleep(1.0)
        await warm.close()
        assert await wait_for(lambda: not h.manager.peers, 10)
        await asyncio.sleep(0.3)
        tasks_before = len(asyncio.all_tasks())
        threads_before = _own_threads()

        for _ in range(2):
            client = await connect(h.url, mic=SpeechTrack(speech_48k(5.0)), session=h.http)
            assert await wait_for(lambda c=client: len(c.received.video_arrivals) > 10, 10)
            stream = h.manager.get_peer(client.session_id).stream
            # Hang up in the middle of speech, without saying goodbye over HTTP.
            await client.close()
            assert await wait_for(lambda: not h.manager.peers, 10), "server kept the peer"
            assert stream.closed and stream.session.ended
        await asyncio.sleep(0.5)
        assert len(asyncio.all_tasks()) <= tasks_before
        assert _own_threads() <= threads_before
        _, health = await h.get_json("/health")
        assert health["sessions"] == 0


async def test_idle_timeout_closes_silent_sessions_and_presenters(
    warm_engine: Engine, default_avatar: Avatar
) -> None:
    async with running_server(warm_engine, default_avatar, idle_timeout_s=1.0) as h:
        client = await connect(h.url, mic=StalledMic(), session=h.http)
        try:
            status, _ = await h.post("/presenters/quiet")
            assert status == 201
            assert h.manager.live_count == 1 and "quiet" in h.manager.presenters
            assert await wait_for(lambda: not h.manager.peers and not h.manager.presenters, 6)
            status, _ = await h.get_json(f"/sessions/{client.session_id}/stats")
            assert status == 404
        finally:
            await client.close()


async def test_health_metrics_and_web_client(warm_engine: Engine, default_avatar: Avatar) -> None:
    async with running_server(warm_engine, default_avatar) as h:
        client = await connect(h.url, mic=SpeechTrack(speech_48k(2.0)), session=h.http)
        try:
            await asyncio.sleep(2.0)
            status, health = await h.get_json("/health")
            assert status == 200
            assert health | {"uptime_s": 0} == health | {
                "status": "ok",
                "sessions": 1,
                "presenters": 0,
                "viewers": 0,
                "max_sessions": default_max_sessions("cpu"),
                "accepting": True,
                "preset": "tiny",
                "random_weights": True,
                "uptime_s": 0,
            }
            async with h.http.get(h.url + "/metrics") as r:
                assert r.status == 200 and r.content_type == "text/plain"
                text = await r.text()
            for name in (
                "talkstream_sessions 1",
                "talkstream_frames_rendered_total",
                "talkstream_frames_skipped_total",
                "talkstream_frames_repeated_total",
                'talkstream_frame_render_seconds_bucket{le="+Inf"}',
                "talkstream_pipeline_latency_seconds_count 1",
                "talkstream_fps",
                "# TYPE talkstream_frame_slack_seconds histogram",
            ):
                assert name in text, name
            rendered = next(
                float(line.split()[1])
                for line in text.splitlines()
                if line.startswith("talkstream_frames_rendered_total ")
            )
            assert rendered > 10
        finally:
            await client.close()
        async with h.http.get(h.url + "/") as r:
            page = await r.text()
            assert r.status == 200 and "app.js" in page
        async with h.http.get(h.url + "/static/app.js") as r:
            assert r.status == 200 and "RTCPeerConnection" in await r.text()
        async with h.http.get(h.url + "/static/../server.py") as r:
            assert r.status == 404
