"""``talkstream live --janus/--whip``: the live loop's publishing output.

The live loop runs in process on a capture thread that plays espeak speech in real time
(``test_live.ThreadCapture``); its :class:`PublishSink` publishes into a real Janus started
here, and an aiortc subscriber watches through Janus: ~25 fps, the voice, the mouth moving
while the voice sounds and resting in the silence around it, the voice arriving with the
lips (held back by the loop's video delay), and the publisher gone from the room afterwards.
"""

from __future__ import annotations

import asyncio
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")

from aiortc.mediastreams import MediaStreamError

from talkstream.cli import main
from talkstream.config import FPS
from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from talkstream.errors import TalkstreamError
from talkstream.publish import janus
from talkstream.publish.local import (
    LocalJanus,
    LocalWhipServer,
    janus_binary,
    local_ice_address,
    whip_server_missing,
)
from talkstream.publish.publisher import JanusPublication, PublishError, watch_janus
from talkstream.publish.sink import PublishSink, PublishTarget
from talkstream.streaming.live import LiveLoop
from talkstream.streaming.server import mouth_box
from talkstream.streaming.sessions import shorten_audio_prefetch
from tests.conftest import speechlike
from tests.test_janus import (  # noqa: F401  (fixtures)
    NO_ADDRESS,
    NO_JANUS,
    espeak_speech,
    local_ice,
    still_engine,
)
from tests.test_live import ThreadCapture
from tests.test_mic import FILE_MIC, file_mic_home, requires_pyaudio, run_cli

needs_janus = [
    pytest.mark.skipif(janus_binary() is None, reason=NO_JANUS),
    pytest.mark.skipif(local_ice_address() is None, reason=NO_ADDRESS),
]


@pytest.fixture(scope="module")
def local_janus() -> Iterator[LocalJanus]:
    # With websockets: simple-whip-server (the WHIP test) talks to Janus through them.
    with LocalJanus(websockets=True) as j:
        yield j


LEAD_S = 1.0  # silence before the sentence
TAIL_S = 2.0  # silence after it


def _pcm(tmp: Path) -> tuple[np.ndarray, int, float]:
    """Silence, an espeak sentence, silence: int16 mono at espeak's rate (22050 Hz)."""
    speech, rate = espeak_speech(tmp)
    x = np.concatenate([np.zeros(int(LEAD_S * rate)), speech, np.zeros(int(TAIL_S * rate))]).astype(
        np.float32
    )
    return (np.clip(x, -1, 1) * 32000).astype(np.int16), rate, speech.shape[0] / rate


def _lag(t_a: np.ndarray, a: np.ndarray, t_b: np.ndarray, b: np.ndarray) -> float:
    """Seconds (0 to 1) by which series ``b`` trails ``a``: best match in 40 ms bins."""
    edges = np.arange(0.0, max(t_a.max(), t_b.max()) + 0.04, 0.04)

    def binned(t: np.ndarray, x: np.ndarray) -> np.ndarray:
        idx = np.digitize(t, edges)
        y = np.array(
            [x[idx == i].mean() if np.any(idx == i) else np.nan for i in range(1, len(edges) + 1)]
        )
        y = np.where(np.isnan(y), np.nanmean(y), y)
        return (y - y.mean()) / (y.std() + 1e-9)

    ya, yb = binned(t_a, a), binned(t_b, b)
    n = len(ya)
    score = [float(np.dot(ya[: n - k], yb[k:])) / (n - k) for k in range(26)]
    return int(np.argmax(score)) * 0.04


async def _left_room(j: LocalJanus, room: int, within_s: float = 2.0) -> None:
    """The room has no publisher within ``within_s`` (Janus drops a destroyed session's
    handles a moment after answering the destroy)."""
    deadline = time.monotonic() + within_s
    async with await janus.JanusSession.open(j.url) as s:
        handle = await s.attach()
        while (pubs := await janus.list_publishers(handle, room)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    assert pubs == [], pubs


class Tap:
    """Passes everything to the sink and records the mouth's change per slot as rendered."""

    def __init__(self, sink: PublishSink, box: list[int]) -> None:
        self.sink, self.box = sink, box
        self.description = "tap"
        self.change: list[float] = []
        self._prev: np.ndarray | None = None

    def audio(self, pcm: np.ndarray, rate_hz: int) -> None:
        self.sink.audio(pcm, rate_hz)

    def video(self, image: np.ndarray, pts: int) -> None:
        x0, y0, x1, y1 = self.box
        gray = image[y0:y1, x0:x1].astype(np.float32).mean(axis=2)
        if self._prev is not None:
            self.change.append(float(np.abs(gray - self._prev).mean()))
        self._prev = gray
        self.sink.video(image, pts)

    def finish(self) -> None:
        self.sink.finish()

    def abort(self) -> None:
        self.sink.abort()


@pytest.mark.slow
@needs_janus[0]
@needs_janus[1]
async def test_live_publishes_into_janus(
    local_janus: LocalJanus,
    local_ice: None,  # noqa: F811
    still_engine: Engine,  # noqa: F811
    default_avatar: Avatar,
    tmp_path: Path,
) -> None:
    pcm, rate, speech_s = _pcm(tmp_path)
    room = 2101
    target = PublishTarget(janus=local_janus.url, room=room, display="live")
    sink = await asyncio.to_thread(PublishSink, target)  # connects (blocking): off the loop
    viewer = None
    try:
        assert isinstance(sink.pub, JanusPublication) and sink.pub.feed > 0
        box = mouth_box(types.SimpleNamespace(avatar=default_avatar))  # type: ignore[arg-type]
        viewer = await watch_janus(local_janus.url, room, sink.pub.feed, region=tuple(box))  # type: ignore[arg-type]
        # aiortc's receiver holds 80 ms of voice before the first decode (a browser's jitter
        # buffer lines it up with the video; aiortc's does not): 20 ms here, nothing has come yet.
        for r in viewer.pc.getReceivers():
            if r.track.kind == "audio":
                assert shorten_audio_prefetch(r, 1)

        await asyncio.to_thread(still_engine.warmup, default_avatar)
        session = still_engine.session(default_avatar)
        tap = Tap(sink, box)
        loop = LiveLoop(session, tap, delay_s=session.latency_s + 0.1)
        capture = ThreadCapture(pcm, loop, rate, realtime=True)
        t0 = time.monotonic()  # the capture's first sample, give or take a thread start
        stats = await asyncio.to_thread(loop.run, capture, threading.Event())
        t_finish = time.monotonic()
        await asyncio.to_thread(sink.finish)
        assert time.monotonic() - t_finish < 3.0  # the tail drains and the peer closes quickly
    finally:
        if viewer is not None:
            await viewer.close()
        await asyncio.to_thread(sink.abort)  # a no-op after finish()

    # Every slot went out (25 per second of audio), none dropped by the sink's queues.
    ps = sink.stats
    assert stats.frames_out == ps.video_queued and ps.video_dropped == 0, (stats, ps)
    audio_s = len(pcm) / rate
    assert ps.audio_sent * 0.02 == pytest.approx(audio_s, abs=0.05), ps
    assert ps.audio_dropped == 0, ps

    st = viewer.stats
    assert st.frame_size == default_avatar.image.shape[1::-1]
    assert len(st.video_arrivals) >= 0.8 * stats.frames_out, (len(st.video_arrivals), stats)
    assert st.fps() >= 18, st.fps()  # 25 fps sent; generous for a loaded 2-core machine

    # When the voice plays at the viewer: its capture time plus the loop's video delay.
    t_voice = t0 + LEAD_S + loop.delay_s
    t_audio = np.asarray(st.audio_arrivals)
    rms = np.asarray(st.audio_rms)
    lead = rms[(t_audio > t0 + 0.3) & (t_audio < t_voice - 0.2)]
    during = rms[(t_audio > t_voice + 0.3) & (t_audio < t_voice + speech_s - 0.3)]
    assert lead.size >= 10 and during.size >= 20, (lead.size, during.size)
    assert lead.max() < 0.01 and during.max() > 0.05, (lead.max(), during.max())

    # The mouth moves while the voice sounds and rests in the silence before and after it.
    t_frames = np.asarray(st.video_arrivals[1:])[: len(st.region_change)]
    change = np.asarray(st.region_change)[: len(t_frames)]
    speaking = change[(t_frames > t_voice + 0.3) & (t_frames < t_voice + speech_s - 0.3)]
    silent = change[
        ((t_frames > t0 + 0.3) & (t_frames < t_voice - 0.2)) | (t_frames > t_voice + speech_s + 0.8)
    ]
    assert speaking.size >= 20 and silent.size >= 15, (speaking.size, silent.size)
    assert np.median(speaking) > 0.3, np.median(speaking)
    assert np.median(speaking) > 4 * max(np.median(silent), 0.02), (
        np.median(speaking),
        np.median(silent),
    )

    # Lips and voice arrive together. Each reaches the viewer some time after it was made:
    # the mouth's motion (frame-to-frame change of the mouth box) after its slot's time, the
    # voice's loudness after its capture. Both lags must equal the loop's video delay plus the
    # way through Janus; without holding the voice back it would lead the lips by ``delay_s``.
    chunk = rate // 50
    src_rms = np.sqrt(
        np.mean((pcm[: len(pcm) // chunk * chunk].reshape(-1, chunk) / 32768.0) ** 2, axis=1)
    )
    lag_audio = _lag(np.arange(len(src_rms)) * 0.02 + 0.01, src_rms, t_audio - t0, rms)
    slots = np.arange(1, len(tap.change) + 1) / FPS
    lag_video = _lag(slots, np.asarray(tap.change), t_frames - t0, change)
    assert lag_video == pytest.approx(loop.delay_s + 0.05, abs=0.15), (lag_video, loop.delay_s)
    assert abs(lag_audio - lag_video) <= 0.08, (lag_audio, lag_video, loop.delay_s)

    # The publisher left the room when the sink finished.
    await _left_room(local_janus, room)


@pytest.mark.slow
@needs_janus[0]
@needs_janus[1]
@pytest.mark.skipif(
    whip_server_missing() is not None, reason=f"simple-whip-server: {whip_server_missing()}"
)
async def test_live_publishes_through_whip(
    local_janus: LocalJanus,
    local_ice: None,  # noqa: F811
    still_engine: Engine,  # noqa: F811
    default_avatar: Avatar,
) -> None:
    """The same sink to a WHIP endpoint (simple-whip-server, Janus behind it), with a Bearer
    token; finish() DELETEs the resource, so the publisher leaves the room."""
    room, token = 2102, "live-token"
    with LocalWhipServer(local_janus) as whip:
        url = whip.create_endpoint("live", room, token=token)
        async with await janus.JanusSession.open(local_janus.url) as s:
            await janus.ensure_room(await s.attach(), room)  # the WHIP server creates none
        with pytest.raises(TalkstreamError, match="check --token"):
            await asyncio.to_thread(PublishSink, PublishTarget(whip=url, token="wrong"))
        sink = await asyncio.to_thread(PublishSink, PublishTarget(whip=url, token=token))
        viewer = None
        try:
            assert sink.pub.client is not None and sink.pub.client.resource  # type: ignore[union-attr]
            viewer = await watch_janus(local_janus.url, room)
            session = still_engine.session(default_avatar)
            loop = LiveLoop(session, sink, delay_s=session.latency_s + 0.1)
            pcm = (speechlike(16_000 * 2) * 20_000).astype(np.int16)
            capture = ThreadCapture(pcm, loop, 16_000, realtime=True)
            stats = await asyncio.to_thread(loop.run, capture, threading.Event())
            t_finish = time.monotonic()
            await asyncio.to_thread(sink.finish)
            assert time.monotonic() - t_finish < 3.0
            await asyncio.sleep(0.3)
        finally:
            if viewer is not None:
                await viewer.close()
            await asyncio.to_thread(sink.abort)
        assert stats.frames_out == 50 and sink.stats.video_dropped == 0, (stats, sink.stats)
        st = viewer.stats
        assert len(st.video_arrivals) >= 35, len(st.video_arrivals)
        assert len(st.audio_arrivals) >= 70 and max(st.audio_rms) > 0.05, len(st.audio_arrivals)
        await _left_room(local_janus, room)


@pytest.mark.slow
@needs_janus[0]
@needs_janus[1]
async def test_janus_hangup_stops_the_live_run(
    local_janus: LocalJanus,
    local_ice: None,  # noqa: F811
    still_engine: Engine,  # noqa: F811
    default_avatar: Avatar,
) -> None:
    """When Janus drops the publisher (its room destroyed) the live loop stops with a
    one-line error instead of sending into nothing."""
    room = 2104
    sink = await asyncio.to_thread(PublishSink, PublishTarget(janus=local_janus.url, room=room))
    session = still_engine.session(default_avatar)
    loop = LiveLoop(session, sink, delay_s=session.latency_s + 0.1)
    pcm = (speechlike(16_000 * 4) * 20_000).astype(np.int16)
    capture = ThreadCapture(pcm, loop, 16_000, realtime=True)
    run = asyncio.ensure_future(asyncio.to_thread(loop.run, capture, threading.Event()))
    try:
        t_start = time.monotonic()
        while loop.stats.frames_out < 5:  # publishing: the first frames have gone out
            assert not run.done() and time.monotonic() - t_start < 10.0, loop.stats
            await asyncio.sleep(0.05)
        async with await janus.JanusSession.open(local_janus.url) as s:
            await janus.destroy_room(await s.attach(), room)
        t_destroy = time.monotonic()
        with pytest.raises(PublishError, match=f"the stream to Janus room {room}") as e:
            await asyncio.wait_for(run, 10.0)
        assert "\n" not in str(e.value)
        assert loop.stats.frames_out < 90  # stopped well before the 4 s of audio ran out
        assert time.monotonic() - t_destroy < 5.0
    finally:
        await asyncio.to_thread(sink.abort)


@pytest.mark.slow
@requires_pyaudio
@needs_janus[0]
@needs_janus[1]
async def test_cli_live_janus(local_janus: LocalJanus, tmp_path: Path) -> None:
    """``talkstream live --janus`` end to end on the ALSA file microphone of ``test_mic``."""
    home, _ = file_mic_home(tmp_path, seconds=2.0)
    proc = await asyncio.to_thread(
        run_cli,
        home, "live", "--janus", local_janus.url, "--room", "2103", "--display", "cli",
        "--ice-local-only", "--duration", "1", "--input-device", FILE_MIC, "--pace-input",
        "--no-cache", "--threads", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "ALSA lib" not in proc.stderr
    out = proc.stdout
    assert "live done: 1.00 s of audio" in out and "25 frames at 25 fps" in out, out
    assert f"published to Janus room 2103 at {local_janus.url} (feed " in out, out
    assert "25 video frames, 1.00 s of audio" in out and "peer stalled" not in out, out
    await _left_room(local_janus, 2103)


@pytest.fixture()
def no_microphone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Opening the audio system fails the test: the checks must come before it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the audio system was opened before the destination was checked")

    monkeypatch.setattr("talkstream.streaming.mic.AudioSystem.__init__", refuse)
    yield


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--janus", "http://127.0.0.1:9/janus"], "cannot reach Janus at http://127.0.0.1:9"),
        (["--whip", "ftp://x/whip"], "not an http(s) URL"),
        (["--janus", "http://127.0.0.1:9/janus", "--out", "x.mp4"], "--out and --janus"),
        (["--whip", "http://127.0.0.1:9/w", "--room", "5"], "--room and --display are for"),
        (["--janus", "http://127.0.0.1:9/janus", "--token", "t"], "--token is for --whip"),
        (["--room", "5", "--out", "x.mp4"], "--room is for publishing"),
    ],
)
def test_live_publish_errors_are_one_line(
    no_microphone: None, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["live", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("talkstream: error:") and message in err, err
    assert err.count("\n") == 1, err


def test_live_help_names_publishing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["live", "--help"])
    out = capsys.readouterr().out
    for flag in ("--janus URL", "--whip URL", "--room", "--display", "--token"):
        assert flag in out, flag


async def test_queue_track_drops_oldest_and_never_blocks() -> None:
    """A stalled peer costs the oldest frames (counted), never a wait in the live thread."""
    from fractions import Fraction

    from av import VideoFrame

    from talkstream.publish.sink import VIDEO_QUEUE, QueueTrack, _Pacer

    track = QueueTrack("video", asyncio.get_running_loop(), _Pacer(), VIDEO_QUEUE, 1 / FPS)

    def put_all() -> float:
        t = time.perf_counter()
        for k in range(VIDEO_QUEUE + 5):
            f = VideoFrame(16, 16, "rgb24")
            f.pts, f.time_base = k * 3600, Fraction(1, 90_000)
            track.put(f)
        return time.perf_counter() - t

    assert await asyncio.to_thread(put_all) < 0.5  # from another thread, like the live loop
    assert (track.queued, track.dropped, track.backlog) == (VIDEO_QUEUE + 5, 5, VIDEO_QUEUE)
    first = await asyncio.wait_for(track.recv(), 2.0)
    assert first.pts == 5 * 3600  # the 5 oldest went
    track.end()
    rest = [await asyncio.wait_for(track.recv(), 2.0) for _ in range(VIDEO_QUEUE - 1)]
    assert [f.pts for f in rest] == [k * 3600 for k in range(6, VIDEO_QUEUE + 5)]
    with pytest.raises(MediaStreamError):
        await asyncio.wait_for(track.recv(), 2.0)


async def test_a_janus_publication_prefers_janus_word_on_why_it_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Janus closes the connection as it hangs up, and its hangup event may come a moment
    later: the end reason is Janus's when it comes within the grace, the connection's after it."""
    from aiortc import RTCPeerConnection

    from talkstream.publish import publisher

    monkeypatch.setattr(publisher, "HANGUP_GRACE_S", 0.3)
    pc = RTCPeerConnection()
    try:
        handle = janus.JanusHandle(None, 1, janus.VIDEOROOM)  # type: ignore[arg-type]
        pub = JanusPublication(pc, None, "a room", handle=handle)
        pub._connection_lost("connection closed")
        await asyncio.sleep(0.05)
        assert not pub.ended.is_set()  # waiting for Janus
        handle.hangup_reason = "room destroyed"
        handle.closed.set()
        await asyncio.wait_for(pub.ended.wait(), 2.0)
        assert pub.end_reason == "Janus hung up: room destroyed"

        silent = JanusPublication(pc, None, "a room", handle=janus.JanusHandle(None, 2, "x"))  # type: ignore[arg-type]
        t0 = time.monotonic()
        silent._connection_lost("connection failed")
        await asyncio.wait_for(silent.ended.wait(), 2.0)
        assert silent.end_reason == "connection failed"
        assert time.monotonic() - t0 >= 0.25
    finally:
        await pc.close()
