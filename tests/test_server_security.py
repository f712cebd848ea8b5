"""Hostile clients (issue 14): tokens, Origin and Host checks, deep JSON, broken SDP, audio bombs,
abandoned peers, paused pushers and slowloris. Each case failed (a 5xx, a hang, a leak or no
check at all) before the server was hardened.

All traffic stays on 127.0.0.1; peers are real aiortc connections.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")
pytest.importorskip("aiohttp", reason="the serve extra (aiohttp) is not installed")

import aiohttp
import soundfile

from talkstream import cli
from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from talkstream.streaming.client import ClientPeer, SpeechTrack, connect
from talkstream.streaming.config import ServeConfig
from talkstream.streaming.decode import DecodeLimits, decode_audio_capped
from talkstream.streaming.security import AccessPolicy, JsonInputError, json_depth, parse_json
from talkstream.streaming.sessions import NegotiationError
from tests.test_server import Harness, _offer_sdp, running_server, speech_48k, wait_for

VIEWER = "viewer-secret-1"
CONTROL = "control-secret-2"
# Exception class names that must never reach a client.
INTERNALS = ("Error:", "Exception", "Traceback", "RecursionError", "AttributeError", "<_io.")


@pytest.fixture(scope="module")
def warm_engine(tiny_engine: Engine, default_avatar: Avatar) -> Iterator[Engine]:
    tiny_engine.warmup(default_avatar)
    yield tiny_engine


def deep_json(depth: int = 1000) -> bytes:
    return b"[" * depth + b"]" * depth


def flac_bomb(seconds: int = 60, channels: int = 8, rate: int = 192_000) -> bytes:
    """~94 KB of FLAC that decodes to ``seconds`` of ``channels``-channel audio at ``rate``."""
    buf = io.BytesIO()
    with soundfile.SoundFile(
        buf, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16"
    ) as f:
        block = np.zeros((rate, channels), np.int16)
        for _ in range(seconds):
            f.write(block)
    return buf.getvalue()


def without_length(flac: bytes) -> bytes:
    """The FLAC with its STREAMINFO total-samples field zeroed ("length unknown")."""
    data = bytearray(flac)
    assert data[:4] == b"fLaC"
    field = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
    data[18:26] = field.to_bytes(8, "big")
    return bytes(data)


def float_wav(x: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, x, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (Linux: clear_refs 5) and return the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS:")


def peak_rss() -> int:
    return _status_bytes("VmHWM:")


def assert_clean(body: Any) -> None:
    """An error body with a reason and no internals."""
    text = body["error"] if isinstance(body, dict) else str(body)
    assert text
    for word in INTERNALS:
        assert word not in text, (word, text)


async def status_of(h: Harness, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    async with h.http.request(method, h.url + path, **kw) as r:
        data = await r.read()
        if r.content_type == "application/json":
            return r.status, json.loads(data)
        return r.status, data


async def ws_status(h: Harness, path: str, **kw: Any) -> int:
    try:
        async with h.http.ws_connect(h.url + path, **kw):
            return 101
    except aiohttp.WSServerHandshakeError as e:
        return e.status


# ----------------------------------------------------------------------------- access


def test_tokens_required_off_loopback() -> None:
    with pytest.raises(ValueError, match="--viewer-token"):
        ServeConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match="--no-auth"):
        ServeConfig(host="192.0.2.7", viewer_token=VIEWER)
    assert ServeConfig(host="0.0.0.0", no_auth=True).no_auth
    assert ServeConfig(host="0.0.0.0", viewer_token=VIEWER, control_token=CONTROL)
    assert ServeConfig(host="127.0.0.1").viewer_token is None  # optional on loopback
    assert ServeConfig(host="localhost")


def test_serve_off_loopback_without_tokens_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--viewer-token" in err and "--no-auth" in err


async def test_tokens_guard_viewer_and_control_routes(
    warm_engine: Engine, default_avatar: Avatar
) -> None:
    async with running_server(
        warm_engine, default_avatar, viewer_token=VIEWER, control_token=CONTROL
    ) as h:
        v = {"Authorization": f"Bearer {VIEWER}"}
        c = {"Authorization": f"Bearer {CONTROL}"}
        assert (await status_of(h, "GET", "/health"))[0] == 200  # liveness stays public
        assert (await status_of(h, "GET", "/static/app.js"))[0] == 200
        status, body = await status_of(h, "GET", "/")
        assert status == 401 and "viewer token" in body["error"]
        async with h.http.get(h.url + f"/?token={VIEWER}") as r:
            assert r.status == 200
            # Not framed by other sites; the token is not passed on as a Referer.
            assert r.headers["X-Frame-Options"] == "DENY"
            assert r.headers["Referrer-Policy"] == "no-referrer"
        assert (await status_of(h, "GET", "/", headers={"Authorization": "Bearer wrong-token"}))[
            0
        ] == 401
        assert (await status_of(h, "GET", "/preview.jpg", headers=v))[0] == 200
        offer = {"sdp": await _offer_sdp(), "type": "offer"}
        assert (await status_of(h, "POST", "/offer", json=offer))[0] == 401
        # Control: the viewer token is not enough, the control token is.
        status, body = await status_of(h, "POST", "/presenters/p", headers=v)
        assert status == 401 and "control token" in body["error"]
        assert (await status_of(h, "POST", "/presenters/p", headers=c))[0] == 201
        assert (await status_of(h, "GET", "/metrics", headers=v))[0] == 401
        assert (await status_of(h, "GET", "/metrics", headers=c))[0] == 200
        assert await ws_status(h, "/presenters/p/ws?rate=16000") == 401
        assert await ws_status(h, f"/presenters/p/ws?rate=16000&token={VIEWER}") == 401
        assert await ws_status(h, f"/presenters/p/ws?rate=16000&token={CONTROL}") == 101
        # The control token opens viewer routes too.
        assert (await status_of(h, "GET", "/presenters", headers=c))[0] == 200
        watch = {"sdp": await _offer_sdp(mic=False), "type": "offer"}
        assert (await status_of(h, "POST", "/presenters/p/offer", json=watch))[0] == 401
        assert (await status_of(h, "POST", "/presenters/p/offer", json=watch, headers=v))[0] == 200
        assert (await status_of(h, "DELETE", "/presenters/p", headers=c))[0] == 200


async def test_cross_origin_and_rebinding_host_are_refused(
    warm_engine: Engine, default_avatar: Avatar
) -> None:
    async with running_server(warm_engine, default_avatar) as h:
        evil = {"Origin": "http://evil.example"}
        # A page of another origin may neither create presenters nor push nor open the socket.
        status, body = await status_of(h, "POST", "/presenters/p", headers=evil)
        assert status == 403 and "--allow-origin" in body["error"]
        assert not h.manager.presenters
        assert await ws_status(h, "/presenters/p/ws?rate=16000", headers=evil) == 403
        assert await ws_status(h, "/presenters/p/ws?rate=16000", headers={"Origin": "null"}) == 403
        assert (await status_of(h, "OPTIONS", "/offer", headers=evil))[0] == 403  # no CORS
        # ... while the server's own page may.
        port = h.url.rsplit(":", 1)[1]
        own = {"Origin": f"http://127.0.0.1:{port}"}
        assert (await status_of(h, "POST", "/presenters/p", headers=own))[0] == 201
        # DNS rebinding: a name that is not ours in Host.
        status, body = await status_of(h, "GET", "/", headers={"Host": f"attacker.example:{port}"})
        assert status == 421 and "--allow-host" in body["error"]
        status, _ = await status_of(
            h, "POST", "/presenters/q", headers={"Host": f"attacker.example:{port}"}
        )
        assert status == 421 and "q" not in h.manager.presenters
        assert (await status_of(h, "GET", "/", headers={"Host": f"localhost:{port}"}))[0] == 200
        assert (await status_of(h, "GET", "/", headers={"Host": f"[::1]:{port}"}))[0] == 200

    async with running_server(
        warm_engine,
        default_avatar,
        allowed_origins=("http://app.example",),
        allowed_hosts=("avatar.example",),
    ) as h:
        app = {"Origin": "http://app.example"}
        async with h.http.options(
            h.url + "/presenters/p",
            headers=app | {"Access-Control-Request-Method": "POST"},
        ) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "http://app.example"
        async with h.http.post(h.url + "/presenters/p", headers=app) as r:
            assert r.status == 201
            assert r.headers["Access-Control-Allow-Origin"] == "http://app.example"
        assert (
            await status_of(h, "POST", "/presenters/p2", headers={"Origin": "http://x.example"})
        )[0] == 403
        assert (await status_of(h, "GET", "/", headers={"Host": "avatar.example"}))[0] == 200


def test_access_policy_rules() -> None:
    p = AccessPolicy(bind_host="127.0.0.1")
    assert p.host_ok("127.0.0.1:8080") and p.host_ok("localhost") and p.host_ok("[::1]:1")
    assert not p.host_ok("rebind.example:8080") and not p.host_ok(None)
    assert not p.host_ok("10.0.0.5:8080")  # bound to loopback: only loopback names
    wide = AccessPolicy(bind_host="0.0.0.0", viewer_token=VIEWER, control_token=CONTROL)
    assert wide.host_ok("10.0.0.5:8080") and not wide.host_ok("rebind.example")
    assert wide.token_ok("viewer", CONTROL) and wide.token_ok("viewer", VIEWER)
    assert not wide.token_ok("control", VIEWER) and not wide.token_ok("control", None)
    assert wide.token_ok("public", None)
    assert p.same_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert not p.origin_ok("http://127.0.0.1:9999", "127.0.0.1:8080")
    assert p.origin_ok(None, "127.0.0.1:8080")  # not a browser page


# ----------------------------------------------------------------------------- hostile input


def test_json_depth_limit() -> None:
    assert json_depth(b'{"a": [1, {"b": "[[[[["}]}') == 3
    with pytest.raises(JsonInputError, match="levels deep"):
        parse_json(deep_json(100_000), max_bytes=1 << 20)
    with pytest.raises(JsonInputError):
        parse_json(b"\xff\xfe", max_bytes=100)
    assert parse_json(b'{"type": "offer"}', max_bytes=100) == {"type": "offer"}


async def test_deep_json_and_broken_sdp_are_400_with_slot_freed(
    warm_engine: Engine, default_avatar: Avatar
) -> None:
    async with running_server(warm_engine, default_avatar) as h:
        assert (await h.post("/presenters/p"))[0] == 201
        for path in ("/offer", "/presenters/p/offer"):
            status, body = await h.post(
                path, data=deep_json(), headers={"Content-Type": "application/json"}
            )
            assert status == 400, (path, status, body)
            assert "deep" in body["error"]
            assert_clean(body)
        async with h.http.ws_connect(h.url + "/presenters/p/ws?rate=16000") as ws:
            await ws.send_str(deep_json().decode())
            assert (await ws.receive_json())["type"] == "error"
            await ws.send_str('{"type": "interrupt"}')  # the socket is still served
            assert (await ws.receive_json())["type"] == "interrupted"

        good = await _offer_sdp()
        assert "a=group:BUNDLE" in good
        no_mid = good.replace("a=mid:0\r\n", "", 1)
        assert no_mid != good
        # Codec names the server knows, at a clock rate it cannot negotiate.
        bad_clock = good.replace("VP8/90000", "VP8/1000").replace("H264/90000", "H264/1000")
        for sdp in (no_mid, bad_clock):
            status, body = await h.post("/offer", json={"sdp": sdp, "type": "offer"})
            assert status == 400, body
            assert_clean(body)
            status, body = await h.post("/presenters/p/offer", json={"sdp": sdp, "type": "offer"})
            assert status == 400, body
        assert not h.manager.peers and h.manager.stream_count == 1  # the presenter only

        # Past the checks, aiortc's own failures are a NegotiationError with the peer closed.
        with pytest.raises(NegotiationError):
            await h.manager.create_live(no_mid)
        with pytest.raises(NegotiationError):
            await h.manager.create_viewer("p", no_mid)
        assert not h.manager.peers and h.manager.stream_count == 1
        assert not h.manager.presenters["p"].viewers
        status, health = await h.get_json("/health")
        assert status == 200 and health["accepting"]


def test_audio_bomb_is_refused_before_decoding() -> None:
    bomb = flac_bomb()
    assert len(bomb) < 150_000
    tracemalloc.start()
    try:
        for data in (bomb, without_length(flac_bomb(seconds=25))):
            with pytest.raises(ValueError, match="at most"):
                decode_audio_capped(data, DecodeLimits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The declared bomb costs nothing; the one that hides its length stops at the cap.
    assert peak < 50e6, peak
    x = np.zeros(1600, np.float32)
    x[7] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        decode_audio_capped(float_wav(x), DecodeLimits())
    pcm, rate = decode_audio_capped(float_wav(np.full(1600, 0.25, np.float32)), DecodeLimits())
    assert rate == 16000 and pcm.shape == (1600, 1) and pcm.max() == pytest.approx(0.25)


async def test_audio_bomb_push_costs_no_memory_nor_a_stall(
    warm_engine: Engine, default_avatar: Avatar
) -> None:
    bomb = flac_bomb()
    nan_wav = float_wav(np.array([0.0, np.nan] * 800, np.float32))
    async with running_server(warm_engine, default_avatar) as h:
        assert (await h.post("/presenters/p"))[0] == 201
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        rss0 = reset_peak_rss()
        tick = asyncio.create_task(ticker())
        for ctype in ("audio/wav", "audio/flac"):
            status, body = await h.post(
                "/presenters/p/speech", data=bomb, headers={"Content-Type": ctype}
            )
            assert status == 400 and "at most" in body["error"], body
            assert_clean(body)
        status, body = await h.post(
            "/presenters/p/speech", data=nan_wav, headers={"Content-Type": "audio/wav"}
        )
        assert status == 400 and "NaN" in body["error"]
        status, body = await h.post(
            "/presenters/p/speech",
            data=b"RIFF" + os.urandom(5000),
            headers={"Content-Type": "audio/wav"},
        )
        assert status == 400
        assert_clean(body)
        stop.set()
        await tick
        rss1 = peak_rss()
        # Before: +495 MB and a 3-4 s freeze of every stream.
        print(f"bomb: peak RSS +{(rss1 - rss0) / 1e6:.1f} MB, longest loop stall {max(gaps):.3f} s")
        assert rss1 - rss0 < 50e6, (rss1 - rss0) / 1e6
        assert max(gaps) < 0.5, max(gaps)
        assert h.manager.presenters["p"].stream.queued_samples == 0


# ----------------------------------------------------------------------------- abandoned peers


async def test_abandoned_offers_free_their_slots(
    warm_engine: Engine, default_avatar: Avatar
) -> None:
    async with running_server(
        warm_engine, default_avatar, max_sessions=2, connect_timeout_s=1.5
    ) as h:
        assert (await h.post("/presenters/p"))[0] == 201
        # An offer whose ICE never completes: its answer is never applied.
        status, _ = await h.post("/offer", json={"sdp": await _offer_sdp(), "type": "offer"})
        assert status == 200
        status, _ = await h.post("/offer", json={"sdp": await _offer_sdp(), "type": "offer"})
        assert status == 503  # the abandoned offer holds the second slot ...
        status, _ = await h.post(
            "/presenters/p/offer", json={"sdp": await _offer_sdp(mic=False), "type": "offer"}
        )
        assert status == 200 and h.manager.viewer_count == 1
        t0 = time.monotonic()
        # ... for the connect timeout, not the 60 s idle timeout; the viewer goes too.
        assert await wait_for(lambda: not h.manager.peers, 8), "abandoned peers kept"
        print(f"abandoned offer and viewer freed after {time.monotonic() - t0:.1f} s")
        assert time.monotonic() - t0 < 6
        client = await connect(h.url, mic=SpeechTrack(speech_48k(1.0)), session=h.http)
        await client.close()


_KILLED_CLIENT = """
import asyncio, sys
from talkstream.streaming.client import SpeechTrack, connect
from talkstream.streaming.sdp import use_loopback_ice
import numpy as np

async def main():
    use_loopback_ice()
    c = await connect(sys.argv[1], mic=SpeechTrack(np.zeros(48000, np.float32), loop=True))
    while len(c.received.video_arrivals) < 5:
        await asyncio.sleep(0.05)
    print(c.session_id, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_killed_client_is_reaped_and_live_one_kept(
    warm_engine: Engine, default_avatar: Avatar
) -> None:
    async with running_server(
        warm_engine, default_avatar, peer_silence_timeout_s=2.5, idle_timeout_s=60.0
    ) as h:
        live: ClientPeer | None = None
        # The doomed client's interpreter starts while the live one connects.
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_CLIENT, h.url],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            live = await connect(h.url, mic=SpeechTrack(speech_48k(1.0), loop=True), session=h.http)
            t_live = time.monotonic()
            loop = asyncio.get_running_loop()
            line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 60)
            sid = line.strip()
            assert sid in h.manager.peers
            # A killed tab says no goodbye (no DTLS close): only its silence tells.
            os.kill(proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            assert await wait_for(lambda: sid not in h.manager.peers, 10)
            print(f"killed client reaped after {time.monotonic() - t0:.1f} s")
            assert time.monotonic() - t0 < 7  # was ~30 s (ICE consent) and more
            # The live client answers with RTCP all along: kept past the silence timeout (a
            # reaper deaf to its RTCP closes it within 2.5 s + one 1 s sweep of connecting).
            assert live.session_id in h.manager.peers
            await asyncio.sleep(max(0.0, t_live + 2.5 + 2.0 - time.monotonic()))
            assert live.session_id in h.manager.peers
        finally:
            proc.kill()
            proc.wait()
            if live is not None:
                await live.close()


async def test_paused_pusher_keeps_its_presenter_and_close_is_explicit(
    warm_engine: Engine, default_avatar: Avatar
) -> None:
    async with running_server(warm_engine, default_avatar, idle_timeout_s=0.5) as h:
        pcm = (np.zeros(1600, np.int16)).tobytes()
        async with h.http.ws_connect(h.url + "/presenters/p/ws?rate=16000") as ws:
            await ws.send_bytes(pcm)
            assert (await ws.receive_json())["type"] == "ack"
            # A pause of three idle timeouts (a dozen reaper sweeps of idle_timeout_s / 4).
            await asyncio.sleep(1.5)
            stream = h.manager.presenters["p"].stream
            await ws.send_bytes(pcm)
            assert (await ws.receive_json())["type"] == "ack"
            assert not stream.closed and stream.queued_samples + stream.written > 0
            # Closed under the pusher: an error and a close, not acks into a dead stream.
            async with h.http.delete(h.url + "/presenters/p") as r:
                assert r.status == 200
            msg = await ws.receive_json(timeout=5)
            assert msg["type"] == "error" and "closed" in msg["error"]
            closing = await ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == 4410
        # Once the pusher is gone the presenter idles out as before.
        assert (await h.post("/presenters/q"))[0] == 201
        assert await wait_for(lambda: not h.manager.presenters, 5)


async def test_slowloris_headers_are_cut_off(warm_engine: Engine, default_avatar: Avatar) -> None:
    async with running_server(
        warm_engine, default_avatar, header_timeout_s=1.0, body_timeout_s=1.0
    ) as h:
        port = int(h.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed_after = None
        try:
            for _ in range(50):  # one header line every 0.2 s, never the blank line
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(1024), 0.2)
                except TimeoutError:
                    continue
                if not data:
                    closed_after = time.monotonic() - t0
                    break
        except ConnectionError:
            closed_after = time.monotonic() - t0
        finally:
            writer.close()
        assert closed_after is not None and closed_after < 4.0, closed_after
        status, _ = await h.get_json("/health")  # others are served meanwhile
        assert status == 200

        # A body trickled in slowly: 408 once body_timeout_s has passed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        writer.write(
            b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        reply = b""
        try:
            for _ in range(50):
                writer.write(b" ")
                await writer.drain()
                try:
                    reply = await asyncio.wait_for(reader.read(1024), 0.2)
                except TimeoutError:
                    continue
                break
        except ConnectionError:
            pass
        finally:
            writer.close()
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
        assert time.monotonic() - t0 < 4.0
