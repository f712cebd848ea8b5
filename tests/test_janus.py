"""Publishing into a real Janus VideoRoom (Janus 1.1 from Debian, started here on loopback).

One presenter is rendered and encoded once and published through the Janus HTTP API; several
aiortc subscribers watch it through Janus. With the shipped model and idle motion off, the
mouth moves only when the avatar speaks: it must move during the pushed speech and rest in
the silence after it, as seen by every subscriber.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")

import aiohttp
import soundfile

from talkstream.config import EngineConfig, IdleConfig
from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from talkstream.publish import janus
from talkstream.publish.local import (
    LocalJanus,
    janus_binary,
    local_ice_address,
    use_local_ice,
)
from talkstream.publish.publisher import publish_to_janus, watch_janus
from talkstream.runtime import load_engine
from talkstream.streaming.config import StreamConfig
from talkstream.streaming.server import mouth_box
from talkstream.streaming.tracks import AvatarStream

NO_JANUS = "the janus binary is not installed (apt-get install janus; `make test` does it)"
NO_ADDRESS = "no IPv4 address besides loopback: Janus gathers no ICE candidate on loopback"

pytestmark = [
    pytest.mark.skipif(janus_binary() is None, reason=NO_JANUS),
    pytest.mark.skipif(local_ice_address() is None, reason=NO_ADDRESS),
]


@pytest.fixture(scope="module")
def local_janus() -> Iterator[LocalJanus]:
    with LocalJanus() as j:
        yield j


@pytest.fixture()
def local_ice() -> Iterator[None]:
    address = local_ice_address()
    assert address is not None
    with use_local_ice(address):
        yield


def espeak_speech(tmp: Path) -> tuple[np.ndarray, int]:
    """A sentence from espeak-ng (float32 mono, its rate)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = tmp / "sentence.wav"
    subprocess.run(
        ["espeak-ng", "-w", str(wav), "hello there, how are you doing on this fine day"],
        check=True,
        capture_output=True,
    )
    x, rate = soundfile.read(wav, dtype="float32")
    return x, int(rate)


@pytest.fixture(scope="module")
def still_engine(default_avatar: Avatar) -> Iterator[Engine]:
    # The shipped trained model (random weights barely move the mouth), idle motion off.
    eng = load_engine(EngineConfig(idle=IdleConfig(enabled=False)))
    assert not eng.models.meta.get("random_init"), "the shipped checkpoint is missing"
    eng.encode_avatar(default_avatar)
    eng.warmup(default_avatar)
    yield eng
    eng.close()


async def test_session_keepalive_and_timeout() -> None:
    """Keepalives hold a session past Janus's session_timeout; without them it ends, and the
    client sees the end (a request on it is a one-line JanusError)."""
    with LocalJanus(session_timeout_s=1) as j:
        kept = await janus.JanusSession.open(j.url, keepalive_s=0.25)
        lapsed = await janus.JanusSession.open(j.url, keepalive_s=1000.0)
        try:
            handle = await kept.attach()
            await asyncio.wait_for(lapsed.closed.wait(), 8.0)  # Janus checks once a second
            assert "timeout" in lapsed.close_reason
            assert not kept.closed.is_set()
            assert await janus.room_exists(handle, 4242) is False
        finally:
            await kept.close()
            await lapsed.close()


async def test_errors_are_one_line(local_janus: LocalJanus) -> None:
    async with await janus.JanusSession.open(local_janus.url) as s:
        h = await s.attach()
        with pytest.raises(janus.JanusError) as e:
            await janus.publish(h, 987654, "v=0\r\n")  # no such room
        assert e.value.code == 426 and "\n" not in str(e.value)
        assert await janus.ensure_room(h, 5555) is True
        assert await janus.ensure_room(h, 5555) is False  # exists: not an error
        assert await janus.list_publishers(h, 5555) == []
        await janus.destroy_room(h, 5555)
        assert await janus.room_exists(h, 5555) is False
    with pytest.raises(janus.JanusError, match="cannot reach Janus") as e:
        await janus.JanusSession.open("http://127.0.0.1:9/janus")
    assert "\n" not in str(e.value)


@pytest.mark.slow
async def test_presenter_through_janus_to_several_viewers(
    local_janus: LocalJanus,
    local_ice: None,
    still_engine: Engine,
    default_avatar: Avatar,
    tmp_path: Path,
) -> None:
    speech, rate = espeak_speech(tmp_path)
    speech_s = speech.shape[0] / rate
    room = 2001
    stream = AvatarStream(
        still_engine, default_avatar, StreamConfig(), mode="presenter", name="janus"
    )
    stream.start()
    box = tuple(mouth_box(stream))
    pub = await publish_to_janus(stream, local_janus.url, room, display="anna")
    viewers = []
    try:
        assert pub.feed > 0
        viewers = [
            await watch_janus(local_janus.url, room, pub.feed, region=box)  # type: ignore[arg-type]
            for _ in range(3)
        ]
        async with await janus.JanusSession.open(local_janus.url) as s:
            listed = await janus.list_publishers(await s.attach(), room)
        assert [(p["id"], p["display"]) for p in listed] == [(pub.feed, "anna")]
        t_wait = time.monotonic()
        while not all(len(v.stats.video_arrivals) >= 5 for v in viewers):  # each has a picture
            assert time.monotonic() - t_wait < 10, [len(v.stats.video_arrivals) for v in viewers]
            await asyncio.sleep(0.05)
        displayed0, t0 = stream.stats.frames_displayed, time.monotonic()
        stream.push_speech(speech, rate)
        t_speech = time.monotonic() + stream.budget["total_s"]  # when the voice plays
        await asyncio.sleep(speech_s + 2.5)  # the sentence, then silence
        elapsed = time.monotonic() - t0
        # Encoded once: our one video track was asked for ~25 frames per second, not 25 per
        # viewer (each aiortc viewer of `talkstream serve` is its own track and encoder).
        per_s = (stream.stats.frames_displayed - displayed0) / elapsed
        assert 15 <= per_s <= 30, per_s
        for v in viewers:
            st = v.stats
            assert st.fps(last_s=3.0) >= 20, st.fps(last_s=3.0)
            assert st.frame_size == (512, 512)
            arrivals = np.asarray(st.audio_arrivals)
            rms = np.asarray(st.audio_rms)
            assert rms[arrivals > t_speech + 0.3].max() > 0.05  # each hears the speech
            # Mouth change per frame while the voice sounds vs in the silence after it.
            t_frames = np.asarray(st.video_arrivals[1:])[: len(st.region_change)]
            change = np.asarray(st.region_change)[: len(t_frames)]
            speaking = change[(t_frames > t_speech + 0.3) & (t_frames < t_speech + speech_s - 0.3)]
            silent = change[t_frames > t_speech + speech_s + 1.0]
            assert speaking.size >= 20 and silent.size >= 10, (speaking.size, silent.size)
            assert np.median(speaking) > 0.3, np.median(speaking)
            assert np.median(speaking) > 4 * np.median(silent), (
                np.median(speaking),
                np.median(silent),
            )
    finally:
        for v in viewers:
            await v.close()
        await pub.close()
        await stream.close()
    # The publisher left the room with its session.
    async with await janus.JanusSession.open(local_janus.url) as s:
        assert await janus.list_publishers(await s.attach(), room) == []


@pytest.fixture()
async def janus_session(local_janus: LocalJanus) -> AsyncIterator[janus.JanusSession]:
    async with await janus.JanusSession.open(local_janus.url) as s:
        yield s


@pytest.mark.slow
async def test_janus_hangup_ends_the_publication(
    local_janus: LocalJanus,
    local_ice: None,
    tiny_engine: Engine,
    default_avatar: Avatar,
    janus_session: janus.JanusSession,
) -> None:
    """When Janus drops the publisher (here: its room is destroyed) the publication ends with
    the reason, instead of sending into nothing."""
    room = 2002
    stream = AvatarStream(tiny_engine, default_avatar, StreamConfig(), mode="presenter")
    stream.start()
    pub = await publish_to_janus(stream, local_janus.url, room)
    try:
        admin = await janus_session.attach()
        await janus.destroy_room(admin, room)
        await asyncio.wait_for(pub.ended.wait(), 10.0)
        # Ended by Janus's hangup (not by ICE giving up later, nor by our own close).
        assert pub.end_reason.startswith("Janus hung up: "), pub.end_reason
    finally:
        await pub.close()
        await stream.close()


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists(),
    reason="Debian chromium (/usr/bin/chromium) is not installed (apt-get install chromium)",
)
@pytest.mark.realtime
async def test_browser_watches_through_janus(
    local_janus: LocalJanus,
    still_engine: Engine,
    default_avatar: Avatar,
    tmp_path: Path,
) -> None:
    """``talkstream publish --janus``'s viewer page in headless Chromium: the browser talks to
    Janus only, sees ~25 fps, and the mouth moves with the pushed speech."""
    playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is missing")
    from talkstream.benchmarking.browser import CHROMIUM_FLAGS
    from talkstream.publish.cli import PublishConfig, publish_until_stopped

    speech, rate = espeak_speech(tmp_path)
    speech_s = speech.shape[0] / rate
    cfg = PublishConfig(
        janus=local_janus.url, room=2003, listen=("127.0.0.1", 0), loopback_ice=True
    )
    stop = asyncio.Event()
    ready: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        publish_until_stopped(
            cfg, still_engine, default_avatar, None, stop=stop, ready=ready.set_result
        )
    )
    try:
        info = await asyncio.wait_for(ready, 30)
        push = str(info["push_url"])
        async with aiohttp.ClientSession() as http:
            async with http.get(push + "/stats") as r:
                stats = await r.json()
            box = ",".join(str(v) for v in stats["mouth_box"])
            budget_s = stats["latency_budget_ms"]["total_ms"] / 1000
            async with playwright_api.async_playwright() as p:
                browser = await p.chromium.launch(
                    executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_FLAGS
                )
                try:
                    page = await browser.new_page()
                    await page.goto(f"{push}/watch?box={box}&muted=1")
                    await page.wait_for_function(
                        "window.viewer.state === 'playing' || window.viewer.state === 'error'",
                        timeout=20_000,
                    )
                    await asyncio.sleep(0.5)
                    buf = io.BytesIO()
                    soundfile.write(buf, speech, rate, format="WAV", subtype="PCM_16")
                    t_push = time.time()
                    async with http.post(
                        push + "/speech",
                        data=buf.getvalue(),
                        headers={"Content-Type": "audio/wav"},
                    ) as r:
                        assert r.status == 200, await r.text()
                    await asyncio.sleep(speech_s + 2.5)
                    v = await page.evaluate("window.viewer")
                finally:
                    await browser.close()
        assert v["state"] == "playing" and not v["error"], v["error"]
        presented = np.asarray(v["presented"]) / 1000.0
        last = presented[presented > presented[-1] - 3.0]
        fps = (len(last) - 1) / (last[-1] - last[0])
        assert fps >= 20, fps
        mouth = np.asarray(v["mouth"])
        t, change = mouth[:, 0] / 1000.0, mouth[:, 1]
        t_voice = t_push + budget_s
        speaking = change[(t > t_voice + 0.3) & (t < t_voice + speech_s - 0.3)]
        silent = change[t > t_voice + speech_s + 1.0]
        assert speaking.size >= 20 and silent.size >= 10, (speaking.size, silent.size)
        assert np.median(speaking) > 3 * max(np.median(silent), 0.05), (
            np.median(speaking),
            np.median(silent),
        )
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 15) == 0
