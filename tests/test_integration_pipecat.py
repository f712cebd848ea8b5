"""TalkstreamVideoService in real pipecat pipelines (pipecat's own ``run_test``).

A cheap engine (tiny, random weights) and the default avatar: these tests check pacing, A/V
alignment, interruption and the frame flow, not what the face looks like. Times are the
pipeline clock's, taken when the service pushes each frame.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
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
        self.wall: dict[int, float] = {}  # id(frame) -> time.time() when it was pushed

    async def on_push_frame(self, data: FramePushed) -> None:
        if data.source is self.source and data.direction == FrameDirection.DOWNSTREAM:
            self.frames.append((data.timestamp / 1e9, data.frame))
            self.wall[id(data.frame)] = time.time()

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
    svc = TalkstreamVideoService(engine=warm_engine, avatar=default_avatar, audio_lead_ms=0)
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


@pytest.mark.slow  # real time: a few seconds of speech and idle
async def test_a_voice_lead_sends_each_block_ahead_of_the_image_that_shows_it(
    warm_engine: Engine, default_avatar: Avatar
) -> None:
    from talkstream.integrations.smallwebrtc import MEDIA_TIMES

    svc = TalkstreamVideoService(engine=warm_engine, avatar=default_avatar, audio_lead_ms=80)
    speech_s = 1.5
    frames: list[Frame] = [TTSStartedFrame(context_id="c1"), *tts_chunks(speech_s, 24000, 1)]
    frames += [TTSStoppedFrame(context_id="c1"), SleepFrame(sleep=1.5)]
    log = await run(svc, frames)

    audio = log.of(OutputAudioRawFrame)
    images = {f.metadata[META_KEY]["index"]: f for _, f in log.of(OutputImageRawFrame)}
    assert len(audio) >= 25, "no speech came out"
    # Each block goes out with the image of two frames before the one that shows it (80 ms).
    order = [f for _, f in log.frames if isinstance(f, OutputAudioRawFrame | OutputImageRawFrame)]
    for i, f in enumerate(order[:-1]):
        if isinstance(f, OutputAudioRawFrame):
            shown_with = next(g for g in order[i + 1 :] if isinstance(g, OutputImageRawFrame))
            k = f.metadata[META_KEY]["index"]
            assert shown_with.metadata[META_KEY]["index"] == k - 2
    # None of the speech is lost to the lead (an early start leaves room for it).
    lo, hi = (audio[i][1].metadata[META_KEY]["index"] for i in (0, -1))
    skipped_s = sum(k not in images for k in range(lo - 2, hi - 1)) * FRAME_S
    emitted_s = sum(f.num_frames for _, f in audio) / 48000
    assert abs(emitted_s + skipped_s - speech_s) <= 0.08, (emitted_s, skipped_s)
    # Each block's due time, noted for SmallWebRTC's sender reports, is when its image went.
    late = []
    for _, f in audio:
        taken = (MEDIA_TIMES.take(f.audio[i : i + 960]) for i in range(0, 3840, 960))
        due = next((t[0] for t in taken if t is not None), None)
        image = images.get(f.metadata[META_KEY]["index"])
        if due is not None and image is not None:
            late.append(log.wall[id(image)] - due)
    assert len(late) >= 20
    assert abs(float(np.median(late))) <= 0.02, np.median(late)


def test_the_voice_leads_once_sender_reports_carry_media_time(
    warm_engine: Engine, default_avatar: Avatar, monkeypatch: pytest.MonkeyPatch
) -> None:
    import talkstream.integrations.pipecat as tp
    from talkstream.streaming.config import StreamConfig

    def lead(**kw: Any) -> float:
        svc = TalkstreamVideoService(engine=warm_engine, avatar=default_avatar, **kw)
        return svc.resolved_stream_config().audio_lead_ms

    monkeypatch.setattr(tp, "reports_in_media_time", lambda: True)  # tune_smallwebrtc() ran
    assert lead() == tp.SMALLWEBRTC_AUDIO_LEAD_MS
    assert lead(audio_lead_ms=0) == 0
    assert lead(stream_config=StreamConfig(audio_lead_ms=20)) == 20
    monkeypatch.setattr(tp, "reports_in_media_time", lambda: False)
    assert lead() == 0  # a receiver's own lip sync would undo a lead its reports do not explain
    with pytest.raises(ValueError, match="audio_lead_ms"):
        lead(audio_lead_ms=500)


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
