"""A bounded fuzz corpus against the server (issue 14): at least 10,000 requests over every
endpoint and the WebSocket, on loopback only. No request may get a 5xx or hang, and /health
must stay fast throughout.

The corpus is drawn from a seeded generator (the seed is in the failure message): malformed and
deeply nested JSON, mutated SDP offers, random bytes, bad methods and content types, huge
headers, broken and hostile audio (a FLAC bomb, NaN WAVs), raw garbage on the socket, and
WebSocket messages of every kind.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")
pytest.importorskip("aiohttp", reason="the serve extra (aiohttp) is not installed")

import aiohttp
import soundfile

from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from talkstream.streaming.server import ROUTES
from tests.test_server import Harness, _offer_sdp, running_server
from tests.test_server_security import deep_json, flac_bomb

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("TALKSTREAM_FUZZ_SEED", "14"))
REQUESTS = 10_000
CONCURRENCY = 24
REQUEST_TIMEOUT_S = 15.0
PATHS = (
    "/",
    "/watch",
    "/preview.jpg",
    "/static/app.js",
    "/static/../x",
    "/favicon.ico",
    "/offer",
    "/sessions/abc/stats",
    "/sessions/abc/trace",
    "/sessions/abc",
    "/presenters",
    "/presenters/fz",
    "/presenters/fz/speech",
    "/presenters/fz/interrupt",
    "/presenters/fz/offer",
    "/presenters/fz/stats",
    "/presenters/fz/ws",
    "/presenters/bad%20name!/speech",
    "/presenters/" + "x" * 300,
    "/health",
    "/metrics",
    "/nope",
)
METHODS = ("GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "TRACE")
CONTENT_TYPES = (
    "application/json",
    "audio/wav",
    "audio/flac",
    "application/octet-stream",
    "text/plain",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
    "",
)


@pytest.fixture(scope="module")
def warm_engine(tiny_engine: Engine, default_avatar: Avatar) -> Iterator[Engine]:
    tiny_engine.warmup(default_avatar)
    yield tiny_engine


def mutate_sdp(sdp: str, rng: random.Random) -> str:
    lines = sdp.split("\r\n")
    for _ in range(rng.randint(1, 3)):
        if not lines:
            lines = ["v=0"]
        op = rng.randrange(9)
        i = rng.randrange(len(lines))
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2:
            line = lines[i]
            if line:
                j = rng.randrange(len(line))
                lines[i] = line[:j] + rng.choice("x:/ =\x00é9-") + line[j + 1 :]
        elif op == 3:
            lines = lines[:i]
        elif op == 4:
            lines.insert(
                i,
                rng.choice(
                    (
                        "a=mid:",
                        "a=group:BUNDLE 7 8 9",
                        "a=rtpmap:96 VP8/1",
                        "a=fmtp:102 profile-level-id=zz;packetization-mode=9",
                        "a=rtcp-fb:96 nack " + "x" * 500,
                        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
                        "a=sctp-port:abc",
                        "a=ssrc-group:FID a b",
                        "a=extmap:999 urn:x",
                        "a=candidate:1 1 udp 1 127.0.0.1 notaport typ host",
                        "m=video 0 RTP/AVP",
                        "a=setup:nonsense",
                        "c=IN IP4 999.1.1.1",
                    )
                ),
            )
        elif op == 5:
            lines = [
                ln
                for ln in lines
                if not ln.startswith(
                    rng.choice(
                        ("a=mid", "a=ice", "a=rtcp-mux", "a=fingerprint", "a=rtpmap", "a=setup")
                    )
                )
            ]
        elif op == 6:
            lines[i] = lines[i].replace("90000", rng.choice(("0", "-1", "1e9", "")))
        elif op == 7:
            rng.shuffle(lines)
        else:
            lines.insert(i, "a=" + "z" * rng.choice((10, 1000, 60_000)))
    return "\r\n".join(lines)


class Corpus:
    """Draws requests: (method, path, kwargs) for aiohttp."""

    def __init__(self, rng: random.Random, offer: str, viewer_offer: str) -> None:
        self.rng = rng
        self.offer = offer
        self.viewer_offer = viewer_offer
        silence = io.BytesIO()
        soundfile.write(silence, np.zeros(1600, np.float32), 16000, format="WAV")
        self.wav = silence.getvalue()
        nan = io.BytesIO()
        soundfile.write(nan, np.full(800, np.nan, np.float32), 16000, format="WAV", subtype="FLOAT")
        self.nan_wav = nan.getvalue()
        self.bomb = flac_bomb(seconds=30, channels=8, rate=96_000)

    def body(self) -> tuple[bytes, str]:
        rng = self.rng
        kind = rng.randrange(14)
        if kind == 0:
            return deep_json(rng.choice((33, 1000, 20_000))), "application/json"
        if kind == 1:
            return b'{"sdp": ' + b"[" * rng.choice((100, 5000)), "application/json"
        if kind == 2:
            sdp = mutate_sdp(rng.choice((self.offer, self.viewer_offer)), rng)
            return (
                ('{"type": "offer", "sdp": ' + _json_str(sdp) + "}").encode(),
                "application/json",
            )
        if kind == 3:
            return rng.randbytes(rng.choice((0, 1, 64, 4096))), rng.choice(CONTENT_TYPES)
        if kind == 4:
            return rng.choice(
                (b"{nope", b"null", b"[]", b'"x"', b"1e999999", b'{"type": "offer"}')
            ), "application/json"
        if kind == 5:
            return b'{"type": "offer", "sdp": 7}', "application/json"
        if kind == 6:
            return self.wav[: rng.randrange(len(self.wav))], "audio/wav"
        if kind == 7:
            return self.nan_wav, "audio/wav"
        if kind == 8:
            return self.bomb, rng.choice(("audio/wav", "audio/flac"))
        if kind == 9:
            return b"RIFF" + rng.randbytes(2000), "audio/wav"
        if kind == 10:
            return rng.randbytes(rng.choice((1, 3, 3200))), "application/octet-stream"
        if kind == 11:
            return np.full(320, np.nan, "<f4").tobytes(), "application/octet-stream"
        if kind == 12:
            return b'{"sdp": "v=0\\r\\n", "type": "offer"}', "application/json"
        return b"", rng.choice(CONTENT_TYPES)

    def request(self) -> tuple[str, str, dict[str, Any]]:
        rng = self.rng
        if rng.random() < 0.8:  # a real route, with hostile content
            method, path, _ = rng.choice(ROUTES)
            path = path.replace("{name}", rng.choice(("fz", "fz1", "a" * 64, "bad name!", "..")))
            path = path.replace("{id}", rng.choice(("abc", "0" * 12, "%00")))
        else:
            method, path = rng.choice(METHODS), rng.choice(PATHS)
        headers: dict[str, str] = {}
        query = ""
        if rng.random() < 0.3:
            query = "?" + rng.choice(
                (
                    "rate=16000",
                    "rate=16000&format=f32le",
                    "rate=1",
                    "rate=abc",
                    "rate=48000&channels=99",
                    "rate=16000&channels=2",
                    "format=zz&rate=8000",
                    "token=" + "t" * 100,
                    "rate=" + "9" * 50,
                    "presenter=fz",
                )
            )
        body, ctype = self.body()
        if ctype:
            headers["Content-Type"] = ctype
        roll = rng.random()
        if roll < 0.03:
            headers["X-Huge"] = "h" * rng.choice((4000, 9000, 70_000))
        elif roll < 0.06:
            headers["Origin"] = rng.choice(("http://evil.example", "null", "file://"))
        elif roll < 0.08:
            headers["Host"] = rng.choice(("evil.example", "", "[::1", "a" * 300))
        elif roll < 0.10:
            headers["Authorization"] = rng.choice(("Bearer", "Basic xx", "Bearer " + "x" * 5000))
        kw: dict[str, Any] = {"headers": headers, "allow_redirects": False}
        if method not in ("GET", "HEAD") or rng.random() < 0.1:
            kw["data"] = body
        return method, path + query, kw


def _json_str(text: str) -> str:
    import json

    return json.dumps(text)


async def raw_garbage(port: int, rng: random.Random) -> int | None:
    """A raw socket request (not what an HTTP client would send); its status, or None."""
    payload = rng.choice(
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(200),  # a TLS hello
            rng.randbytes(rng.choice((10, 500, 9000))),
            b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            b"BREW /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            b"GET /health HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
            b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
            b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
            b"POST /presenters/fz/speech HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: audio/wav\r\nContent-Length: 99999999999\r\n\r\nRIFF",
        )
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
    except ConnectionError:
        return None
    finally:
        writer.close()
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


async def ws_session(h: Harness, rng: random.Random, note: Callable[[int, str], None]) -> int:
    """One WebSocket with a few random messages; returns how many exchanges it made."""
    query = rng.choice(("rate=16000", "rate=16000&format=f32le", "rate=8000&channels=2", "rate=0"))
    try:
        ws = await h.http.ws_connect(
            h.url + f"/presenters/fz{rng.randrange(3)}/ws?{query}",
            timeout=aiohttp.ClientWSTimeout(ws_close=5),
        )
    except aiohttp.WSServerHandshakeError as e:
        note(e.status, "ws handshake")
        return 1
    note(101, "ws handshake")
    n = 1
    try:
        for _ in range(rng.randint(1, 6)):
            kind = rng.randrange(6)
            if kind == 0:
                await ws.send_bytes(rng.randbytes(rng.choice((1, 2, 3, 640, 3200))))
            elif kind == 1:
                await ws.send_bytes(np.full(160, np.nan, "<f4").tobytes())
            elif kind == 2:
                await ws.send_str(deep_json(rng.choice((10, 1000, 2000))).decode())
            elif kind == 3:
                await ws.send_str(rng.choice(('{"type": "interrupt"}', "{", "null", "x" * 10_000)))
            elif kind == 4:
                await ws.send_bytes(np.zeros(1600, "<i2").tobytes())
            else:
                await ws.ping()
                n += 1
                note(101, "ws ping")
                continue
            msg = await ws.receive(timeout=REQUEST_TIMEOUT_S)
            n += 1
            note(101, "ws message")
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                if ws.close_code is not None and ws.close_code == 1011:
                    note(500, "ws closed 1011 (internal error)")
                break
    finally:
        await ws.close()
    return n


async def test_fuzz_corpus_no_5xx_no_hang(warm_engine: Engine, default_avatar: Avatar) -> None:
    rng = random.Random(SEED)
    statuses: Counter[int] = Counter()
    failures: list[str] = []

    def note(status: int, what: str) -> None:
        statuses[status] += 1
        # 503 is the documented answer when every session or viewer slot is taken (the
        # fuzzer fills them); any other 5xx, or a 503 for another reason, is a failure.
        capacity = status == 503 and ("in use" in what or "ws handshake" in what)
        if status >= 500 and not capacity:
            statuses[-status] += 1
            if len(failures) < 20:
                failures.append(f"{status} {what}")

    async with running_server(
        warm_engine,
        default_avatar,
        max_sessions=2,
        max_viewers=2,
        idle_timeout_s=2.0,
        connect_timeout_s=2.0,
        header_timeout_s=5.0,
    ) as h:
        port = int(h.url.rsplit(":", 1)[1])
        corpus = Corpus(rng, await _offer_sdp(), await _offer_sdp(mic=False))
        health_s: list[float] = []
        done = asyncio.Event()

        async def watch_health() -> None:
            async with aiohttp.ClientSession() as own:  # its own connection: never queued
                while not done.is_set():
                    t0 = time.perf_counter()
                    async with own.get(h.url + "/health") as r:
                        assert r.status == 200
                        await r.read()
                    health_s.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.1)

        async def worker(wid: int) -> None:
            wrng = random.Random(SEED * 1000 + wid)
            local = Corpus.__new__(Corpus)
            local.__dict__ = corpus.__dict__ | {"rng": wrng}
            while sum(n for s, n in statuses.items() if s >= 0) < REQUESTS:
                roll = wrng.random()
                if roll < 0.04:
                    await asyncio.wait_for(ws_session(h, wrng, note), REQUEST_TIMEOUT_S * 3)
                    continue
                if roll < 0.07:
                    status = await raw_garbage(port, wrng)
                    note(0 if status is None else status, "raw")
                    continue
                method, path, kw = local.request()
                try:
                    async with h.http.request(
                        method,
                        h.url + path,
                        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                        **kw,
                    ) as r:
                        body = await r.read()
                        note(r.status, f"{method} {path[:80]} -> {body[:200]!r}")
                except aiohttp.ClientResponseError as e:
                    # A refusal this client would not parse (a 400 for a header too long,
                    # sent as the server closed the connection): its status still counts.
                    note(e.status or 0, f"{method} {path[:80]}: {e.message[:80]}")
                except aiohttp.ClientError:
                    # The server cut a request it refused (a body over the limit, a bad
                    # header) before reading it all: a refusal, not a failure.
                    note(0, "cut")
                except TimeoutError:
                    failures.append(f"hang: {method} {path[:80]}")
                    note(599, "hang")

        health = asyncio.create_task(watch_health())
        t0 = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
        took = time.monotonic() - t0
        done.set()
        await health
        total = sum(n for s, n in statuses.items() if s >= 0)
        fives = sum(n for s, n in statuses.items() if s <= -500)
        print(f"fuzz: {total} requests in {took:.1f} s, statuses {dict(sorted(statuses.items()))}")
        assert total >= REQUESTS
        assert fives == 0, (SEED, failures)
        assert statuses[0] < total * 0.05, statuses  # cut connections stay the exception
        health_s.sort()
        assert health_s and health_s[len(health_s) // 2] < 0.25, health_s[-5:]
        assert health_s[-1] < 2.0, health_s[-5:]
        # Nothing it did outlives it: abandoned offers and idle presenters are reaped.
        ok = False
        for _ in range(100):
            if not h.manager.peers and not h.manager.presenters:
                ok = True
                break
            await asyncio.sleep(0.1)
        assert ok, (len(h.manager.peers), list(h.manager.presenters))
        status, body = await h.get_json("/health")
        assert status == 200 and body["accepting"]
