"""The WHIP client (RFC 9725) and ``talkstream publish``, against simple-whip-server.

simple-whip-server is Debian's JavaScript (``make whip-server`` unpacks it and installs its npm
dependencies), run with node in front of a real Janus: the WHIP endpoint publishes into a
VideoRoom, where an aiortc subscriber watches what arrived.
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
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")

import aiohttp
import soundfile

from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from talkstream.publish import janus
from talkstream.publish.cli import PublishConfig, publish_until_stopped
from talkstream.publish.local import (
    LocalJanus,
    LocalWhipServer,
    janus_binary,
    local_ice_address,
    use_local_ice,
    whip_server_missing,
)
from talkstream.publish.publisher import publish_to_whip, watch_janus
from talkstream.publish.whip import IceServer, WhipClient, WhipError, parse_ice_links
from talkstream.streaming.config import StreamConfig
from talkstream.streaming.tracks import AvatarStream
from tests.conftest import speechlike

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "talkstream" / "assets" / "sample_speech.wav"
TOKEN = "s3cret-token"
LINKS = [
    {"uri": "stun:stun.example.net:3478"},
    {"uri": "turn:turn.example.net?transport=udp", "username": "u1", "credential": "p,1"},
]


def _servers_missing() -> str | None:
    if janus_binary() is None:
        return "janus is not installed (apt-get install janus; `make test` does it)"
    why = whip_server_missing()
    if why:
        return f"simple-whip-server: {why}"
    if local_ice_address() is None:
        return "no IPv4 address besides loopback: Janus gathers no ICE candidate on loopback"
    return None


needs_servers = pytest.mark.skipif(_servers_missing() is not None, reason=str(_servers_missing()))


# -- Link headers (no server) -----------------------------------------------------------------


def test_ice_servers_from_link_headers() -> None:
    headers = [
        '<stun:stun.example.net>; rel="ice-server"',
        '<turn:turn.example.net?transport=udp>; rel="ice-server"; username="user"; '
        'credential="pa,ss"; credential-type="password", '
        '<https://example.net/whip/x>; rel="self", <turns:t.example.net:443>; rel=ice-server',
        '<http://not-ice.example>; rel="ice-server"',
    ]
    assert parse_ice_links(headers) == [
        IceServer("stun:stun.example.net"),
        IceServer("turn:turn.example.net?transport=udp", "user", "pa,ss"),
        IceServer("turns:t.example.net:443"),
    ]
    assert parse_ice_links([]) == []
    assert parse_ice_links(["garbage, <also garbage"]) == []


def test_client_refuses_a_non_http_url() -> None:
    with pytest.raises(WhipError, match="not an http"):
        WhipClient("stun:example.net")


async def test_unreachable_endpoint_is_one_line() -> None:
    client = WhipClient("http://127.0.0.1:9/whip/endpoint/x", token="t")
    try:
        with pytest.raises(WhipError, match="cannot reach WHIP endpoint") as e:
            await client.publish("v=0\r\n")
        assert e.value.status is None and "\n" not in str(e.value)
        assert await client.discover() == []  # OPTIONS is best effort
    finally:
        await client.close()


# -- against simple-whip-server with Janus behind ---------------------------------------------


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LocalJanus, LocalWhipServer]]:
    with LocalJanus(websockets=True) as j, LocalWhipServer(j) as w:
        yield j, w


@pytest.fixture()
def local_ice() -> Iterator[None]:
    address = local_ice_address()
    assert address is not None
    with use_local_ice(address):
        yield


def endpoints(w: LocalWhipServer) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(w.url + "/endpoints", timeout=5) as r:
        return {e["id"]: e for e in json.loads(r.read())}


async def ensure_room(j: LocalJanus, room: int) -> None:
    async with await janus.JanusSession.open(j.url) as s:
        await janus.ensure_room(await s.attach(), room)


async def publishers(j: LocalJanus, room: int) -> list[dict[str, Any]]:
    async with await janus.JanusSession.open(j.url) as s:
        return await janus.list_publishers(await s.attach(), room)


async def until_received(stats: Any, rms: float, timeout: float = 15.0) -> None:
    """Until a viewer has had 1.5 s of video at >= 20 fps and heard audio louder than ``rms``
    (AssertionError after ``timeout`` seconds)."""

    def received() -> bool:
        t = stats.video_arrivals
        loud = bool(stats.audio_rms) and max(stats.audio_rms) > rms
        return len(t) > 1 and t[-1] - t[0] >= 1.5 and stats.fps(last_s=1.5) >= 20 and loud

    t0 = time.monotonic()
    while not received():
        assert time.monotonic() - t0 < timeout, (
            f"fps {stats.fps(last_s=1.5):.1f}, loudest {max(stats.audio_rms, default=0.0):.3f}"
        )
        await asyncio.sleep(0.1)


@needs_servers
@pytest.mark.parametrize("case", ["bad-token", "no-token", "no-endpoint"])
async def test_refusals_are_one_line(
    servers: tuple[LocalJanus, LocalWhipServer], case: str
) -> None:
    _, w = servers
    url = w.create_endpoint(f"refuse-{case}", 3001, token=TOKEN)
    token = {"bad-token": "wrong", "no-token": None, "no-endpoint": TOKEN}[case]
    if case == "no-endpoint":
        url = w.url + "/endpoint/nobody"
    client = WhipClient(url, token=token)
    try:
        with pytest.raises(WhipError) as e:
            await client.publish("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\n")
    finally:
        await client.close()
    msg = str(e.value)
    assert "\n" not in msg
    if case == "no-endpoint":
        assert e.value.status == 404 and "check the endpoint URL" in msg
    else:
        assert e.value.status == 403 and "check --token" in msg


@needs_servers
@pytest.mark.slow
@pytest.mark.usefixtures("local_ice")
async def test_publish_watch_and_delete(
    servers: tuple[LocalJanus, LocalWhipServer], tiny_engine: Engine, default_avatar: Avatar
) -> None:
    j, w = servers
    room = 3002
    await ensure_room(j, room)
    url = w.create_endpoint("studio", room, token=TOKEN, ice_servers=LINKS)
    # OPTIONS with the token names the endpoint's ICE servers (Link headers).
    probe = WhipClient(url, token=TOKEN)
    try:
        assert [s.urls for s in await probe.discover()] == [x["uri"] for x in LINKS]
    finally:
        await probe.close()
    stream = AvatarStream(tiny_engine, default_avatar, StreamConfig(), mode="presenter")
    stream.start()
    # ice_servers=[]: the example servers are not reachable from here.
    pub = await publish_to_whip(stream, url, token=TOKEN, ice_servers=[])
    viewer = None
    try:
        client = pub.client
        assert client is not None
        assert client.resource == w.url + "/resource/studio"  # relative Location resolved
        assert client.ice_servers == [
            IceServer("stun:stun.example.net:3478"),
            IceServer("turn:turn.example.net?transport=udp", "u1", "p,1"),
        ]
        assert endpoints(w)["studio"]["enabled"] is True
        # The endpoint takes one publisher at a time.
        second = WhipClient(url, token=TOKEN)
        try:
            with pytest.raises(WhipError) as e:
                await second.publish(pub.pc.localDescription.sdp)
            assert e.value.status == 403 and "already in use" in str(e.value)
        finally:
            await second.close()
        viewer = await watch_janus(j.url, room)
        stream.push_speech(speechlike(16000 * 2), 16000)
        await until_received(viewer.stats, rms=0.05)
    finally:
        if viewer is not None:
            await viewer.close()
        await pub.close()  # DELETE
        await stream.close()
    assert pub.client is not None and pub.client.resource is None
    assert endpoints(w)["studio"]["enabled"] is False
    for _ in range(50):  # Janus tears the publisher down asynchronously
        if not await publishers(j, room):
            break
        await asyncio.sleep(0.1)
    assert await publishers(j, room) == []


@needs_servers
@pytest.mark.slow
@pytest.mark.usefixtures("local_ice")
async def test_push_api_of_publish(
    servers: tuple[LocalJanus, LocalWhipServer], tiny_engine: Engine, default_avatar: Avatar
) -> None:
    """``publish`` without --audio: speech pushed over HTTP reaches the SFU's viewers."""
    j, w = servers
    room = 3003
    await ensure_room(j, room)
    url = w.create_endpoint("pushed", room, token=TOKEN)
    cfg = PublishConfig(whip=url, token=TOKEN, listen=("127.0.0.1", 0), loopback_ice=True)
    stop = asyncio.Event()
    ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        publish_until_stopped(
            cfg, tiny_engine, default_avatar, None, stop=stop, ready=ready.set_result
        )
    )
    viewer = None
    try:
        info = await asyncio.wait_for(ready, 30)
        viewer = await watch_janus(j.url, room)
        buf = io.BytesIO()
        soundfile.write(buf, speechlike(22050 * 2, rate=22050) * 2, 22050, format="WAV")
        async with aiohttp.ClientSession() as http:
            async with http.post(
                info["push_url"] + "/speech",
                data=buf.getvalue(),
                headers={"Content-Type": "audio/wav"},
            ) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["pushed_s"] == pytest.approx(2.0, abs=0.01)
            async with http.post(
                info["push_url"] + "/speech", data=b"xx", headers={"Content-Type": "text/plain"}
            ) as r:
                assert r.status == 415
            await asyncio.sleep(2.5)
            async with http.get(info["push_url"] + "/stats") as r:
                stats = await r.json()
        assert stats["speech_s"] == pytest.approx(2.0, abs=0.1)
        assert max(viewer.stats.audio_rms) > 0.05
        assert viewer.stats.fps(last_s=2.0) >= 20
    finally:
        if viewer is not None:
            await viewer.close()
        stop.set()
        assert await asyncio.wait_for(task, 15) == 0
    assert endpoints(w)["pushed"]["enabled"] is False  # DELETEd on stop


def _publish_cmd(url: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "talkstream.cli", "publish", "--whip", url,
        "--ice-local-only", "--framing", "square", "--threads", "1", *extra,
    ]  # fmt: skip


@needs_servers
@pytest.mark.slow
async def test_publish_command_speaks_then_stops_on_sigterm(
    servers: tuple[LocalJanus, LocalWhipServer],
    local_ice: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    j, w = servers
    room = 3004
    await ensure_room(j, room)
    url = w.create_endpoint("cli", room, token=TOKEN)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # publish runs serve's backend (onnxruntime on a CPU): the session's shared artifact cache
    # has the shipped model's graphs (tests/test_export_onnx.py), the user's cache is left alone.
    cache = tmp_path_factory.getbasetemp() / "talkstream-shared-cache"
    proc = subprocess.Popen(
        _publish_cmd(url, "--token", TOKEN, "--audio", str(SAMPLE), "--cache-dir", str(cache)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    viewer = None
    try:
        deadline = time.monotonic() + 90
        while not await publishers(j, room):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the command never published"
            await asyncio.sleep(0.5)
        viewer = await watch_janus(j.url, room)
        await until_received(viewer.stats, rms=0.02)  # the sample sentence
        assert viewer.stats.frame_size == (512, 512)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if viewer is not None:
            await viewer.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"publishing to" in out and b"stopping" in out
    assert endpoints(w)["cli"]["enabled"] is False  # the resource was DELETEd


def test_publish_command_unreachable_is_one_line_before_loading() -> None:
    t0 = time.monotonic()
    r = subprocess.run(
        _publish_cmd("http://127.0.0.1:9/whip/endpoint/x", "--audio", str(SAMPLE)),
        capture_output=True,
        cwd=REPO,
        timeout=120,
    )
    took = time.monotonic() - t0
    err = r.stderr.decode()
    assert r.returncode == 2, err
    # One line, nothing logged before it: the models were never loaded.
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("talkstream: error: cannot reach WHIP endpoint http://127.0.0.1:9/")
    assert "Traceback" not in err and took < 30
