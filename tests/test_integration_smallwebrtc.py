"""pipecat's SmallWebRTC output as talkstream.integrations.smallwebrtc tunes it: pipecat's
own audio track and output transport, aiortc's own sender and a real aiortc peer on loopback.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="the pipecat extra is not installed")
pytest.importorskip("aiortc", reason="pipecat's webrtc extra is not installed")
from pipecat.frames.frames import CancelFrame, InterruptionFrame

from talkstream.integrations.smallwebrtc import META_KEY, MediaTimes

pytestmark = pytest.mark.realtime  # real-time pacing: run alone by `make test`


async def test_steady_smallwebrtc_audio_takes_the_next_block_while_one_plays() -> None:
    pytest.importorskip("aiortc", reason="pipecat's webrtc extra is not installed")
    from pipecat.transports.smallwebrtc.transport import RawAudioTrack

    from talkstream.integrations.smallwebrtc import steady_smallwebrtc_audio

    assert steady_smallwebrtc_audio() and steady_smallwebrtc_audio()  # idempotent
    track = RawAudioTrack(48_000)
    track._start -= 60.0  # a minute behind: recv() hands out chunks without waiting
    blocks = [np.full(1920, v, np.int16) for v in (1000, 2000)]  # 40 ms each
    written = track.add_audio_bytes(blocks[0].tobytes())
    first = await track.recv()
    # Reported written once its first 10 ms chunk is out (pipecat's own: after the last),
    # so the next block can come while the rest of this one plays.
    assert written.done()
    track.add_audio_bytes(blocks[1].tobytes())
    rest = [await track.recv() for _ in range(7)]
    pcm = np.concatenate([f.to_ndarray()[0] for f in [first, *rest]])
    assert np.array_equal(pcm, np.concatenate(blocks))  # in order, no silence in between
    assert [f.pts for f in [first, *rest]] == [480 * k for k in range(8)]


async def test_skip_late_silence_skips_the_silence_a_late_sender_missed_not_speech() -> None:
    pytest.importorskip("aiortc", reason="pipecat's webrtc extra is not installed")
    from pipecat.transports.smallwebrtc.transport import RawAudioTrack

    from talkstream.integrations.smallwebrtc import skip_late_silence

    assert skip_late_silence() and skip_late_silence()  # idempotent
    track = RawAudioTrack(48_000)
    assert (await track.recv()).pts == 0
    track._start -= 0.5  # aiortc's sender came back half a second late
    # Nothing queued: the silence it is late for is not sent; the next chunk is stamped now
    # (pipecat's own track would send 50 chunks of silence back to back, from pts 480 on).
    now = await track.recv()
    assert 24_000 <= now.pts < 48_000 and now.pts % 480 == 0, now.pts
    assert not now.to_ndarray().any()
    # Late again, with speech queued: the speech goes out whole, right after, at once.
    track._start -= 0.5
    block = np.arange(1920, dtype=np.int16)
    track.add_audio_bytes(block.tobytes())
    frames = [await track.recv() for _ in range(4)]
    assert [f.pts for f in frames] == [now.pts + 480 * (k + 1) for k in range(4)]
    assert np.array_equal(np.concatenate([f.to_ndarray()[0] for f in frames]), block)


async def test_prompt_live_video_sends_paced_images_at_once_and_slows_a_burst() -> None:
    from pipecat.frames.frames import OutputImageRawFrame
    from pipecat.transports.base_output import BaseOutputTransport
    from pipecat.transports.base_transport import TransportParams

    from talkstream.integrations.smallwebrtc import prompt_live_video

    assert prompt_live_video() and prompt_live_video()  # idempotent
    drawn: list[tuple[float, int]] = []

    class Recording(BaseOutputTransport):  # pipecat's own transport, writing nowhere
        def get_event_loop(self) -> asyncio.AbstractEventLoop:
            return asyncio.get_running_loop()

        async def write_video_frame(self, frame: OutputImageRawFrame) -> bool:
            drawn.append((asyncio.get_running_loop().time(), frame.pts))
            return True

    params = TransportParams(
        video_out_enabled=True,
        video_out_is_live=True,
        video_out_framerate=25,
        video_out_width=32,
        video_out_height=16,
    )
    sender = BaseOutputTransport.MediaSender(
        Recording(params),
        destination=None,
        sample_rate=48_000,
        audio_chunk_size=3840,
        params=params,
    )
    sender._video_queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def image(k: int) -> OutputImageRawFrame:
        frame = OutputImageRawFrame(bytes(32 * 16 * 3), (32, 16), "RGB")
        frame.pts = k
        return frame

    task = asyncio.create_task(sender._video_task_handler())  # pipecat's own loop
    try:
        # A producer that keeps 25 fps: pipecat would hold each image a frame period (40 ms).
        put_at = {}
        for k in range(10):
            put_at[k] = loop.time()
            await sender._video_queue.put(image(k))
            await asyncio.sleep(0.04)
        # The producer falls 3 frames behind, then sends them at once: they go at once.
        await asyncio.sleep(0.08)
        for k in range(10, 13):
            put_at[k] = loop.time()
            await sender._video_queue.put(image(k))
        await asyncio.sleep(0.1)
        waits = sorted(t - put_at[k] for t, k in drawn)
        # Paced, the last of the three would wait ~80 ms.
        assert len(waits) == 13 and waits[6] < 0.02 and waits[-1] < 0.06, waits
        # A burst of 12 at once from a fresh schedule: spaced one period apart.
        await asyncio.sleep(0.5)
        drawn.clear()
        t0 = loop.time()
        for k in range(12):
            sender._video_queue.put_nowait(image(100 + k))
        await sender._video_queue.join()
        assert [k for _, k in drawn] == list(range(100, 112))
        assert drawn[-1][0] - t0 >= 11 * 0.04 * 0.9
        # This service's own images (its metadata) are never held: it paces them itself.
        await asyncio.sleep(0.5)
        drawn.clear()
        t0 = loop.time()
        for k in range(6):
            ours = image(200 + k)
            ours.metadata[META_KEY] = {"index": k}
            sender._video_queue.put_nowait(ours)
        await sender._video_queue.join()
        assert [k for _, k in drawn] == list(range(200, 206))
        assert drawn[-1][0] - t0 < 0.1
    finally:
        task.cancel()
        sender._executor.shutdown(wait=False)


async def test_an_interruption_also_empties_the_smallwebrtc_audio_track() -> None:
    pytest.importorskip("aiortc", reason="pipecat's webrtc extra is not installed")
    from pipecat.frames.frames import StartFrame
    from pipecat.transports.base_transport import TransportParams
    from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
    from pipecat.transports.smallwebrtc.transport import (
        RawAudioTrack,
        SmallWebRTCCallbacks,
        SmallWebRTCClient,
        SmallWebRTCOutputTransport,
    )
    from pipecat.utils.asyncio.task_manager import TaskManager

    from talkstream.integrations.smallwebrtc import tune_smallwebrtc

    assert tune_smallwebrtc()

    async def ignore(*_: Any, **__: Any) -> None:
        return None

    callbacks = SmallWebRTCCallbacks(
        on_app_message=ignore,
        on_client_connected=ignore,
        on_client_disconnected=ignore,
        on_track_status=ignore,
    )
    client = SmallWebRTCClient(SmallWebRTCConnection(), callbacks)
    params = TransportParams(audio_out_enabled=True, audio_out_sample_rate=48_000)
    transport = SmallWebRTCOutputTransport(
        client, params, task_manager=TaskManager(loop=asyncio.get_running_loop())
    )
    track = RawAudioTrack(48_000)
    client._audio_output_track = track
    # Two 40 ms blocks of the sentence already in the track (steady_smallwebrtc_audio lets
    # it hold two) when the user barges in.
    written = [track.add_audio_bytes(np.full(1920, 3000, np.int16).tobytes()) for _ in range(2)]
    sender = transport.MediaSender(
        transport, destination=None, sample_rate=48_000, audio_chunk_size=3840, params=params
    )
    await sender.start(StartFrame(audio_out_sample_rate=48_000))
    try:
        await sender.handle_interruptions(InterruptionFrame())
        assert not track._chunk_queue and all(w.done() for w in written)
        assert not (await track.recv()).to_ndarray().any()  # silence, not the cut sentence
    finally:
        await sender.cancel(CancelFrame())


def test_media_times_are_noted_per_10_ms_and_taken_once() -> None:
    times = MediaTimes(size=8)
    rng = np.random.default_rng(1)
    block = rng.integers(-3000, 3000, 1920, dtype=np.int16)
    block[480:960] = 0  # a silent 10 ms inside: not noted (every silent piece looks alike)
    raw = block.tobytes()
    times.note(raw, 100.0, lead=0.04)  # sent 40 ms ahead of its image
    pieces = [raw[i : i + 960] for i in range(0, 3840, 960)]
    assert times.take(pieces[2]) == pytest.approx((100.02, 99.98))  # 10 ms later per piece
    assert times.take(pieces[2]) is None  # taken once
    assert times.take(pieces[1]) is None  # silence
    assert times.take(pieces[0]) == pytest.approx((100.0, 99.96))
    # Bounded: the oldest pieces go first.
    for k in range(4):
        times.note(rng.integers(-3000, 3000, 1920, dtype=np.int16).tobytes(), 200.0 + k)
    assert times.take(pieces[3]) is None


async def test_audio_sender_reports_say_when_the_voice_is_due() -> None:
    """A real aiortc peer on loopback receives two of pipecat's audio tracks: speech whose due
    time was noted (half a second after it is handed over, as a voice sent ahead of its images
    would be) and speech that was not. The first's sender reports map its RTP time to when it
    is due; the second's, as aiortc's own, to when it was sent."""
    from aiortc import RTCConfiguration, RTCPeerConnection
    from pipecat.transports.smallwebrtc.transport import RawAudioTrack

    from talkstream.integrations.smallwebrtc import (
        MEDIA_TIMES,
        reports_in_media_time,
        sender_reports_in_media_time,
    )
    from talkstream.streaming.sdp import use_loopback_ice

    assert sender_reports_in_media_time() and sender_reports_in_media_time()  # idempotent
    assert reports_in_media_time()
    use_loopback_ice()
    ahead = RawAudioTrack(48_000)
    plain = RawAudioTrack(48_000)
    tx = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    rx = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    rng = np.random.default_rng(2)

    async def speak() -> None:  # 40 ms blocks in real time, as pipecat's transport writes them
        while True:
            for track, noted in ((ahead, True), (plain, False)):
                block = rng.integers(-8000, 8000, 1920, dtype=np.int16).tobytes()
                if noted:
                    MEDIA_TIMES.note(block, time.time() + 0.5)
                track.add_audio_bytes(block)
            await asyncio.sleep(0.04)

    task = asyncio.create_task(speak())
    try:
        tx.addTrack(ahead)
        tx.addTrack(plain)
        await tx.setLocalDescription(await tx.createOffer())
        await rx.setRemoteDescription(tx.localDescription)
        await rx.setLocalDescription(await rx.createAnswer())
        await tx.setRemoteDescription(rx.localDescription)
        senders = [t.sender for t in tx.getTransceivers()]
        ssrc = {s._ssrc: name for s, name in zip(senders, ("ahead", "plain"), strict=True)}
        offsets: dict[str, dict[Any, float]] = {"ahead": {}, "plain": {}}
        deadline = time.monotonic() + 20
        while min(len(v) for v in offsets.values()) < 2 and time.monotonic() < deadline:
            for receiver in rx.getReceivers():
                for s in (await receiver.getStats()).values():
                    if s.type == "remote-outbound-rtp" and s.ssrc in ssrc:
                        # The report's NTP time against when it arrived (one clock here).
                        offset = (s.remoteTimestamp - s.timestamp).total_seconds()
                        offsets[ssrc[s.ssrc]][s.remoteTimestamp] = offset
            await asyncio.sleep(0.05)
        assert min(len(v) for v in offsets.values()) >= 2, offsets
        # Due 0.5 s after it was handed over (the track holds it up to a block more).
        assert all(0.35 <= o <= 0.65 for o in offsets["ahead"].values()), offsets
        assert all(-0.15 <= o <= 0.15 for o in offsets["plain"].values()), offsets
    finally:
        task.cancel()
        await tx.close()
        await rx.close()


async def test_video_sender_reports_say_when_each_image_came() -> None:
    """pipecat's video track holds a backlog of ten images (a third of a second at its 30 fps)
    on their way to a real aiortc peer: its sender reports map each image's RTP time to when
    the image came to the track, not to when it left."""
    from aiortc import RTCConfiguration, RTCPeerConnection
    from pipecat.frames.frames import OutputImageRawFrame
    from pipecat.transports.smallwebrtc.transport import RawVideoTrack

    from talkstream.integrations.smallwebrtc import sender_reports_in_media_time
    from talkstream.streaming.sdp import use_loopback_ice

    assert sender_reports_in_media_time()
    use_loopback_ice()
    track = RawVideoTrack(64, 48)
    tx = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    rx = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    image = OutputImageRawFrame(bytes(64 * 48 * 3), (64, 48), "RGB")

    async def show() -> None:  # ten at once, then 30 a second: the track's own rate
        t0, added = time.monotonic(), 0
        while True:
            while added < 10 + (time.monotonic() - t0) * 30:
                track.add_video_frame(image)
                added += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(show())
    try:
        tx.addTrack(track)
        await tx.setLocalDescription(await tx.createOffer())
        await rx.setRemoteDescription(tx.localDescription)
        await rx.setLocalDescription(await rx.createAnswer())
        await tx.setRemoteDescription(rx.localDescription)
        offsets: dict[Any, float] = {}
        deadline = time.monotonic() + 20
        while len(offsets) < 2 and time.monotonic() < deadline:
            for receiver in rx.getReceivers():
                for s in (await receiver.getStats()).values():
                    if s.type == "remote-outbound-rtp":
                        offsets[s.remoteTimestamp] = (
                            s.remoteTimestamp - s.timestamp
                        ).total_seconds()
            await asyncio.sleep(0.05)
        assert len(offsets) >= 2, offsets
        # aiortc's own reports would say ~0 (when each packet left).
        assert all(-0.5 <= o <= -0.2 for o in offsets.values()), offsets
    finally:
        task.cancel()
        await tx.close()
        await rx.close()


async def test_catch_up_in_pauses_drops_silence_from_a_held_voice_never_speech() -> None:
    from pipecat.transports.smallwebrtc.transport import RawAudioTrack

    from talkstream.integrations.smallwebrtc import MEDIA_TIMES, catch_up_in_pauses

    assert catch_up_in_pauses() and catch_up_in_pauses()  # idempotent
    rng = np.random.default_rng(3)

    def speech() -> bytes:
        return rng.integers(-8000, 8000, 1920, dtype=np.int16).tobytes()

    def run(held_s: float) -> tuple[list[bytes], Any]:
        """A word, a 40 ms pause, a word: the service sent them ``held_s`` ago."""
        track = RawAudioTrack(48_000)
        track._start -= 60.0  # behind its schedule: recv() hands chunks out at once
        pause = rng.integers(-3, 4, 1920, dtype=np.int16).tobytes()  # a resampler's ringing
        blocks = [speech(), pause, speech()]
        sent = time.time() - held_s
        for k, block in enumerate(blocks):
            MEDIA_TIMES.note(block, sent + 0.04 * k)
            track.add_audio_bytes(block)
        return blocks, track

    blocks, track = run(0.3)  # held 300 ms: the pause goes
    out = [await track.recv() for _ in range(8)]
    pcm = b"".join(f.to_ndarray().tobytes() for f in out)
    assert pcm == blocks[0] + blocks[2]
    assert [f.pts for f in out] == [480 * k for k in range(8)]  # contiguous: no gap
    # The reports' anchor moved with it: the second word is due where it was.
    a_pts, a_due, _ = track._talkstream_anchor
    assert a_pts == 1920 and a_due == pytest.approx(time.time() - 0.3 + 0.08, abs=0.05)

    blocks, track = run(0.0)  # on time: the pause stays whole
    out = [await track.recv() for _ in range(12)]
    assert b"".join(f.to_ndarray().tobytes() for f in out) == b"".join(blocks)
