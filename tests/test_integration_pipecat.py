"""TalkstreamVideoService in real pipecat pipelines (pipecat's own ``run_test``).

A cheap engine (tiny, random weights) and the default avatar: these tests check pacing, A/V
alignment, interruption and the frame flow, not what the face looks like. Times are the
pipeline clock's, taken when the service pushes each frame.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="the pipecat extra is not installed")
from pipecat.frames.frames import (
    CancelFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TextFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameDirection
from pipecat.tests.utils import SleepFrame, run_test

from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from talkstream.integrations.pipecat import META_KEY, TalkstreamVideoService
from tests.conftest import speechlike

pytestmark = pytest.mark.realtime  # paced at 25 fps: run alone by `make test`

FRAME_S = 0.04
START_TIMEOUT_S = 30.0


class PushLog(BaseObserver):
    """(pipeline-clock seconds, frame) of every frame ``source`` pushes downstream."""

    def __init__(self, source: Any) -> None:
        super().__init__()
        self.source = source
        self.frames: list[tuple[float, Frame]] = []

    async def on_push_frame(self, data: FramePushed) -> None:
        if data.source is self.source and data.direction == FrameDirection.DOWNSTREAM:
            self.frames.append((data.timestamp / 1e9, data.frame))

    def of(self, kind: type) -> list[tuple[float, Any]]:
        return [(t, f) for t, f in self.frames if isinstance(f, kind)]


@pytest.fixture(scope="module")
def warm_engine(tiny_engine: Engine, default_avatar: Avatar) -> Iterator[Engine]:
    tiny_engine.warmup(default_avatar)
    yield tiny_engine


def tts_chunks(seconds: float, rate: int, channels: int, chunk_s: float = 0.1) -> list[Frame]:
    """Speech as a TTS service sends it: int16, ``channels`` interleaved, ``chunk_s`` chunks."""
    x = (speechlike(int(seconds * rate), rate) * 32767).astype(np.int16)
    pcm = np.repeat(x[:, None], channels, axis=1)  # (n, ch)
    step = int(chunk_s * rate)
    return [
        TTSAudioRawFrame(pcm[i : i + step].tobytes(), rate, channels, context_id="c1")
        for i in range(0, len(pcm), step)
    ]


async def run(service: TalkstreamVideoService, frames: list[Frame], **kw: Any) -> PushLog:
    log = PushLog(service)
    await run_test(
        service, frames_to_send=frames, observers=[log], start_timeout=START_TIMEOUT_S, **kw
    )
    return log


def image_digest(f: OutputImageRawFrame) -> str:
    return hashlib.blake2b(f.image, digest_size=8).hexdigest()


@pytest.mark.slow  # real time: a few seconds of speech and idle each
async def test_speech_then_idle_paced_and_aligned(
    warm_engine: Engine, default_avatar: Avatar
) -> None:
    svc = TalkstreamVideoService(engine=warm_engine, avatar=default_avatar)
    speech_s = 1.5
    frames: list[Frame] = [TextFrame("a"), TTSStartedFrame(context_id="c1")]
    frames += tts_chunks(speech_s, 22050, 2)  # any rate, any channel count
    frames += [TTSStoppedFrame(context_id="c1"), TextFrame("b"), SleepFrame(sleep=3.0)]
    log = await run(svc, frames)

    # Other frames pass through, in order.
    texts = [f.text for _, f in log.of(TextFrame)]
    assert texts == ["a", "b"]
    # The TTS audio is not passed on as it came: every audio frame is the service's own, 48 kHz
    # mono, 40 ms, and together they hold the speech once.
    audio = log.of(OutputAudioRawFrame)
    assert audio, "no speech came out"
    assert all(isinstance(f, TTSAudioRawFrame) for _, f in audio)
    assert {(f.sample_rate, f.num_channels, f.num_frames) for _, f in audio} == {(48000, 1, 1920)}
    emitted_s = sum(f.num_frames for _, f in audio) / 48000
    # After an event-loop stall the service jumps to the present instead of bursting (sync
    # kept, the missed blocks' speech lost): count the frame indices it skipped during speech.
    shown = {f.metadata[META_KEY]["index"] for _, f in log.of(OutputImageRawFrame)}
    lo, hi = (audio[i][1].metadata[META_KEY]["index"] for i in (0, -1))
    skipped_s = sum(k not in shown for k in range(lo, hi + 1)) * FRAME_S
    assert abs(emitted_s + skipped_s - speech_s) <= 0.08, (emitted_s, skipped_s)
    # TTS start/stop bracket the paced speech.
    kinds = [type(f) for _, f in log.frames]
    assert kinds.index(TTSStartedFrame) < kinds.index(TTSAudioRawFrame)
    last_audio = len(kinds) - 1 - kinds[::-1].index(TTSAudioRawFrame)
    assert kinds.index(TTSStoppedFrame) > last_audio

    # About 25 images a second, through speech and idle alike, none in bursts.
    images = log.of(OutputImageRawFrame)
    t = np.array([ts for ts, _ in images])
    span = t[-1] - t[0]
    assert span > speech_s + 1.0
    fps = (len(t) - 1) / span
    assert fps <= 26.0, fps  # never a burst
    assert fps >= 15.0, fps  # generous: a loaded 2-core box stalls the event loop at times
    assert np.median(np.diff(t)) == pytest.approx(FRAME_S, abs=0.01)
    sizes = {f.size for _, f in images}
    h, w = default_avatar.image.shape[:2]
    assert sizes == {(w - w % 2, h - h % 2)}
    assert all(f.format == "RGB" and len(f.image) == f.size[0] * f.size[1] * 3 for _, f in images)

    # A/V alignment: each audio block goes out with the image of the same media time, and the
    # audio emitted up to any image during speech is that image's share of the speech.
    index_of_image = {f.metadata[META_KEY]["index"]: ts for ts, f in images}
    first_block = audio[0][1].metadata[META_KEY]["index"]
    for ts, f in audio:
        k = f.metadata[META_KEY]["index"]
        assert k in index_of_image
        assert abs(index_of_image[k] - ts) <= FRAME_S
    offsets = []
    emitted = 0
    for _, f in log.frames:
        if isinstance(f, OutputAudioRawFrame):
            emitted += f.num_frames
        elif isinstance(f, OutputImageRawFrame) and emitted:
            k = f.metadata[META_KEY]["index"]
            if k <= audio[-1][1].metadata[META_KEY]["index"]:
                offsets.append(emitted / 48000 - (k - first_block + 1) * FRAME_S)
    assert len(offsets) >= 30
    assert max(abs(o) for o in offsets) <= FRAME_S, max(offsets, key=abs)
    # Audio pushes are paced in real time (not a burst): 1.5 s of speech spans ~1.5 s of wall time.
    at = np.array([ts for ts, _ in audio])
    assert at[-1] - at[0] >= speech_s - 0.2, at[-1] - at[0]

    # Idle after the speech: the face keeps moving (blinks, sway), no frozen image.
    idle = [f for ts, f in images if ts > at[-1] + 0.5]
    assert len(idle) >= 20
    # (On a loaded box the renderer skips frames by deadline and the last one repeats: only a
    # frozen face shows a single image.)
    assert len({image_digest(f) for f in idle}) >= 4
    assert svc.stream is None  # closed at the EndFrame


@pytest.mark.slow  # real time: a few seconds of speech and idle each
async def test_interruption_stops_speech_and_keeps_idling(
    warm_engine: Engine, default_avatar: Avatar
) -> None:
    svc = TalkstreamVideoService(engine=warm_engine, avatar=default_avatar)
    frames: list[Frame] = [TTSStartedFrame(context_id="c1")]
    frames += tts_chunks(4.0, 16000, 1)
    frames += [TTSStoppedFrame(context_id="c1")]
    frames += [SleepFrame(sleep=1.2), InterruptionFrame(), SleepFrame(sleep=1.5)]
    log = await run(svc, frames)

    [(t_int, _)] = log.of(InterruptionFrame)
    audio_t = np.array([ts for ts, _ in log.of(OutputAudioRawFrame)])
    assert audio_t.size >= 10, "the avatar never started speaking"
    # Nothing is said after the interruption; the last block (40 ms) ends within 80 ms of it.
    assert (audio_t > t_int).sum() == 0, audio_t[audio_t > t_int] - t_int
    assert audio_t[-1] + FRAME_S - t_int <= 0.08, audio_t[-1] - t_int
    assert not log.of(TTSStoppedFrame), "the interrupted turn's stop frame was not dropped"
    # Images keep coming, every ~40 ms, and keep changing.
    after = [(ts, f) for ts, f in log.of(OutputImageRawFrame) if ts > t_int]
    t = np.array([ts for ts, _ in after])
    assert t.size >= 15, t.size
    assert t[0] - t_int <= 0.2
    assert t[-1] - t_int >= 1.3  # still coming at the end
    assert len({image_digest(f) for _, f in after}) >= 4


@pytest.mark.slow  # real time: a few seconds of speech and idle each
async def test_cancel_stops_everything(warm_engine: Engine, default_avatar: Avatar) -> None:
    svc = TalkstreamVideoService(engine=warm_engine, avatar=default_avatar)
    frames: list[Frame] = [*tts_chunks(2.0, 24000, 1), SleepFrame(sleep=0.5), CancelFrame()]
    log = await run(svc, frames, send_end_frame=False)
    assert log.of(OutputImageRawFrame)
    assert svc.stream is None
    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("talkstream")]
    assert not leftovers, leftovers


def test_options_are_checked(warm_engine: Engine, default_avatar: Avatar) -> None:
    with pytest.raises(TypeError, match="avatar"):
        TalkstreamVideoService(avatar=default_avatar, image="me.jpg")
    with pytest.raises(TypeError, match="engine"):
        TalkstreamVideoService(engine=warm_engine, preset="base")
    with pytest.raises(ValueError, match="uint8"):
        TalkstreamVideoService(image=np.zeros((4, 4), np.float32))
    svc = TalkstreamVideoService(framing="portrait", threads=1, backend="torch", idle=False)
    assert svc._engine_cfg.avatar.framing == "portrait"
    assert svc._engine_cfg.threads == 1 and not svc._engine_cfg.idle.enabled


async def test_steady_smallwebrtc_audio_takes_the_next_block_while_one_plays() -> None:
    pytest.importorskip("aiortc", reason="pipecat's webrtc extra is not installed")
    from pipecat.transports.smallwebrtc.transport import RawAudioTrack

    from talkstream.integrations.pipecat import steady_smallwebrtc_audio

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

    from talkstream.integrations.pipecat import skip_late_silence

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

    from talkstream.integrations.pipecat import prompt_live_video

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

    from talkstream.integrations.pipecat import tune_smallwebrtc

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
