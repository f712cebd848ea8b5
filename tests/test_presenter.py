"""Presenter mode: speech pushed over HTTP or WebSocket, watched by several viewers over WebRTC,
rendered once per presenter; interrupt."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")

import soundfile

from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine, Faces, RenderItem
from talkstream.streaming.client import connect
from tests.conftest import speechlike
from tests.test_server import running_server, wait_for


@pytest.fixture(scope="module")
def warm_engine(tiny_engine: Engine, default_avatar: Avatar) -> Engine:
    tiny_engine.warmup(default_avatar)
    return tiny_engine


def _wav_bytes(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def test_fan_out_renders_once_per_presenter(
    warm_engine: Engine, default_avatar: Avatar, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered: list[int] = []
    real_render = warm_engine.render

    def counting_render(items: Sequence[RenderItem]) -> Faces:
        rendered.extend(it.pts for it in items)
        return real_render(items)

    monkeypatch.setattr(warm_engine, "render", counting_render)
    async with running_server(warm_engine, default_avatar) as h:
        status, body = await h.post("/presenters/anna")
        assert status == 201 and body["created"]
        viewers = [await connect(h.url, presenter="anna", session=h.http) for _ in range(3)]
        try:
            assert h.manager.viewer_count == 3
            # Two sentences as WAV chunks at 22.05 kHz (espeak's rate), one after the other.
            speech = speechlike(22050 * 2, rate=22050) * 2
            for chunk in (speech[:22050], speech[22050:]):
                status, body = await h.post(
                    "/presenters/anna/speech",
                    data=_wav_bytes(chunk, 22050),
                    headers={"Content-Type": "audio/wav"},
                )
                assert status == 200, body
                assert body["pushed_s"] == pytest.approx(1.0, abs=0.01)
            assert 1.0 < body["queued_s"] < 2.01  # playing out already
            t0 = time.monotonic()
            await asyncio.sleep(3.0)
            elapsed = time.monotonic() - t0
            for v in viewers:
                assert v.received.fps(last_s=2.0) >= 20
                assert max(v.received.audio_rms) > 0.05  # each hears the speech
            # One render per frame of the presenter's timeline, however many viewers watch:
            # at most 25 per second since the presenter was created (plus warm-up slack).
            stream = h.manager.presenters["anna"].stream
            media_s = stream.written / 48000
            assert len(rendered) <= 25 * media_s + 5, (len(rendered), media_s)
            assert len(set(rendered)) == len(rendered)  # no frame rendered twice
            received = sum(len(v.received.video_arrivals) for v in viewers)
            assert received > 2 * len(rendered) > 0
            assert elapsed < media_s + 1
            _, stats = await h.get_json("/presenters/anna/stats")
            assert stats["viewers"] == 3 and stats["speech_s"] == pytest.approx(2.0, abs=0.1)
            _, listing = await h.get_json("/presenters")
            assert [p["name"] for p in listing["presenters"]] == ["anna"]
        finally:
            for v in viewers:
                await v.close()
        assert await wait_for(lambda: h.manager.viewer_count == 0, 10)
        async with h.http.delete(h.url + "/presenters/anna") as r:
            assert r.status == 200
        assert not h.manager.presenters


async def test_interrupt_and_websocket_push(warm_engine: Engine, default_avatar: Avatar) -> None:
    async with running_server(warm_engine, default_avatar) as h:
        viewer = None
        async with h.http.ws_connect(h.url + "/presenters/bob/ws?rate=16000&format=s16le") as ws:
            viewer = await connect(h.url, presenter="bob", session=h.http)
            pcm = (speechlike(16000 * 10) * 2 * 32767).astype("<i2")
            for i in range(0, pcm.shape[0], 16000):  # 1 s messages
                await ws.send_bytes(pcm[i : i + 16000].tobytes())
                ack: dict[str, Any] = await ws.receive_json()
                assert ack["type"] == "ack"
            assert ack["queued_s"] > 9.0
            await ws.send_bytes(b"\0\0\0")  # not whole samples: an error, the socket stays
            err = await ws.receive_json()
            assert err["type"] == "error" and "whole number" in err["error"]
            await ws.send_str("hello")
            assert (await ws.receive_json())["type"] == "error"
            await asyncio.sleep(1.0)
            await ws.send_str('{"type": "interrupt"}')
            reply = await ws.receive_json()
            assert reply["type"] == "interrupted" and reply["dropped_s"] > 8.0
            stream = h.manager.presenters["bob"].stream
            assert stream.queued_samples == 0
            # Within the latency budget (plus a little) the avatar's voice is silent.
            t_int = time.monotonic()
            rec = viewer.received

            def late() -> list[float]:
                after = t_int + stream.budget["total_s"] + 0.3
                return [
                    r for t, r in zip(rec.audio_arrivals, rec.audio_rms, strict=True) if t > after
                ]

            # 300 ms of the viewer's audio after that (a loaded machine may deliver it late).
            deadline = t_int + stream.budget["total_s"] + 10.0
            while len(late()) < 15 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(late()) >= 15 and max(late()) < 0.01
            early = [r for t, r in zip(rec.audio_arrivals, rec.audio_rms, strict=True) if t < t_int]
            assert max(early) > 0.05
            # HTTP interrupt: nothing left to drop.
            status, body = await h.post("/presenters/bob/interrupt")
            assert status == 200 and body["dropped_s"] == 0
            # A message over the size limit closes the socket (1009), the server carries on.
            with contextlib.suppress(ConnectionError):  # closed while we were still sending
                await ws.send_bytes(b"\0" * (8 * 1024 * 1024 + 2))
            msg = await ws.receive()
            assert msg.type.name in ("CLOSE", "CLOSED", "CLOSING", "ERROR")
            assert ws.close_code in (None, 1006, 1009)  # 1006: cut while still sending
        assert viewer is not None
        await viewer.close()
        status, health = await h.get_json("/health")
        assert status == 200 and health["presenters"] == 1
        # Queue limit: 429 with a reason.
        big = np.zeros(16000 * 60, dtype="<i2").tobytes()
        for _ in range(3):  # 60 s each; the limit is 120 s
            status, body = await h.post(
                "/presenters/bob/speech?rate=16000",
                data=big,
                headers={"Content-Type": "application/octet-stream"},
            )
        assert status == 429 and "limit" in body["error"]
