"""Media clock, avatar streams and their tracks; the Session's deadline skipping.

No network: streams are driven directly (decoded-frame input, pushed speech) and their tracks'
``recv()`` is called as aiortc's senders would call it.
"""

from __future__ import annotations

import asyncio
import time
from fractions import Fraction

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")

import itertools

from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from talkstream.streaming.clock import (
    DRIFT_DEADBAND_S,
    SETTLE_S,
    MediaClock,
)
from talkstream.streaming.config import StreamConfig
from talkstream.streaming.tracks import (
    AvatarAudioTrack,
    AvatarStream,
    AvatarVideoTrack,
    QueueFullError,
    audio_frame_to_mono,
)
from tests.conftest import speechlike


class FakeTime:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _frame(pcm: np.ndarray, pts: int, rate: int = 48000, stereo: bool = True) -> AudioFrame:
    """A decoded frame as aiortc's Opus decoder delivers it: s16, interleaved."""
    x = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
    if stereo:
        x = np.repeat(x[:, None], 2, axis=1).reshape(1, -1)
        f = AudioFrame.from_ndarray(x, format="s16", layout="stereo")
    else:
        f = AudioFrame.from_ndarray(x[None], format="s16", layout="mono")
    f.sample_rate = rate
    f.pts = pts
    f.time_base = Fraction(1, rate)
    return f


# ----------------------------------------------------------------------------- Session


def test_skip_until_skips_only_ready_frames_in_order(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    s = tiny_engine.session(default_avatar)
    s.max_batch = 2
    s.push_audio(speechlike(8000), 16000)  # 0.5 s: frames 0..~8 ready (lookahead holds some)
    assert s.skip_until(5) == 5
    assert s.frames_skipped == 5
    assert s.skip_until(3) == 0  # never backwards
    assert [f.pts for f in s.render_ready()] == [5, 6]
    # Frames whose audio has not arrived are not skipped.
    skipped = s.skip_until(10_000)
    assert 0 < skipped < 13 - 7
    s.end_audio()
    rest = []
    while s.has_ready():
        rest += s.render_ready()
    assert [f.pts for f in rest] == list(range(7 + skipped, 13))


async def test_frames_skip_before(tiny_engine: Engine, default_avatar: Avatar) -> None:
    s = tiny_engine.session(default_avatar)
    s.push_audio(speechlike(8000), 16000)
    s.end_audio()
    got = [f.pts async for f in s.frames(skip_before=lambda: 7)]
    assert got == list(range(7, 13))
    assert s.frames_skipped == 7
    assert s.render_wall_s > 0


# ----------------------------------------------------------------------------- clock


def test_clock_maps_one_timeline_for_both_tracks() -> None:
    now = FakeTime(10.0)
    c = MediaClock(0.2, now=now)
    assert c.play_time(48000) == pytest.approx(10.0 + 1.0 + 0.2)
    assert c.frame_time(25) == c.play_time(48000)
    assert c.video_pts(25) == 90000  # 1 s at 90 kHz: the same instant as audio pts 48000
    now.t = 10.2 + 0.5
    assert c.frame_on_screen() == 12
    assert c.first_live_frame() == 13
    assert c.input_position() == pytest.approx(0.7 * 48000)
    with pytest.raises(ValueError, match="delay_s"):
        MediaClock(-1)


def test_clock_settles_at_once_then_slews_and_tracks_drift() -> None:
    now = FakeTime(0.0)
    c = MediaClock(0.2, now=now)
    # A startup burst: input arrives 80 ms earlier than the first packet implied.
    c.observe_input(960, at=0.1)
    c.observe_input(1920, at=0.1 - 0.08 + 0.02)
    assert c.t0 == pytest.approx(0.1 - 0.02 - 0.08, abs=1e-9)
    # After settling, a sender whose clock runs 0.1 % fast is followed smoothly: the clock
    # never steps, and the input stays within the deadband (plus the tracking lag).
    t0_before = c.t0
    steps = []
    pos = 1920
    t = 0.04
    while t < SETTLE_S + 60:
        pos += 960
        t += 0.02 / 1.001
        before = c.t0
        c.observe_input(pos, at=t)
        steps.append(abs(c.t0 - before))
    assert max(steps[int(SETTLE_S / 0.02) + 1 :]) <= 0.005 * 0.02 + 1e-12
    lateness = t - (c.t0 + pos / 48000)
    assert abs(lateness) < DRIFT_DEADBAND_S + 0.002
    assert c.t0 < t0_before  # the sender ran fast: our clock moved earlier


# ----------------------------------------------------------------------------- streams


def _stream(
    engine: Engine, avatar: Avatar, mode: str, now: FakeTime | None = None, **cfg: float
) -> AvatarStream:
    return AvatarStream(
        engine,
        avatar,
        StreamConfig(**cfg),  # type: ignore[arg-type]
        mode=mode,  # type: ignore[arg-type]
        now=now if now is not None else time.monotonic,
    )


def test_audio_frame_to_mono_formats() -> None:
    x = np.linspace(-0.5, 0.5, 960).astype(np.float32)
    for stereo in (True, False):
        y = audio_frame_to_mono(_frame(x, 0, stereo=stereo))
        np.testing.assert_allclose(y, x, atol=1 / 16000)
    planar = AudioFrame.from_ndarray(np.stack([x, x]), format="fltp", layout="stereo")
    np.testing.assert_allclose(audio_frame_to_mono(planar), x, atol=1e-6)


async def test_live_input_is_placed_by_timestamp(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    now = FakeTime(0.0)
    st = _stream(tiny_engine, default_avatar, "live", now, jitter_budget_ms=40)
    sig = speechlike(48000, rate=48000)
    now.t = 0.5
    st.push_frame(_frame(sig[:960], pts=123_000))
    first = st.written - 960
    assert first == pytest.approx(0.5 * 48000 - 960, abs=1)  # the first packet ends "now"
    # The packet's own samples, at its place on the timeline (int16 in, int16 out, 48 kHz).
    pushed = (np.clip(sig[:960], -1, 1) * 32767).astype(np.int16)
    np.testing.assert_allclose(st.read_audio(first, 960), pushed, atol=1)
    # A lost packet: the next one is 2 packets later; silence stands in for the gap.
    now.t = 0.56
    st.push_frame(_frame(sig[2880:3840], pts=123_000 + 2880))
    assert st.written == first + 3840
    assert not st.read_audio(first + 960, 1920).any()
    assert st.stats.silence_filled_s == pytest.approx(0.04)
    # A duplicate (or a packet already covered by silence) is dropped.
    st.push_frame(_frame(sig[960:1920], pts=123_000 + 960))
    assert st.written == first + 3840
    # The replayed audio is the received speech, sample for sample (int16 rounding).
    got = st.read_audio(first + 2880, 960).astype(np.float32) / 32768
    np.testing.assert_allclose(got, sig[2880:3840], atol=2 / 32768)
    # Flooding: input far ahead of the clock is dropped.
    st.push_frame(_frame(sig[:960], pts=123_000 + 10 * 48000))
    assert st.written == first + 3840
    # A stall of 2 s, then the sender resumes: re-anchored at the present, not dropped.
    now.t = 2.6
    st._top_up()  # the tick filled silence up to now - jitter
    assert st.written == pytest.approx(2.6 * 48000 - 0.04 * 48000, abs=2)
    w = st.written
    st.push_frame(_frame(sig[:960], pts=123_000 + 4800))  # continues the old timestamps
    assert st.written == w + 960
    await st.close()


def test_replay_ring_wraps(tiny_engine: Engine, default_avatar: Avatar) -> None:
    st = _stream(tiny_engine, default_avatar, "presenter", replay_buffer_s=1.0)
    x = (np.arange(70_000) % 30_000).astype(np.int16)
    st.timeline.write(x[:40_000])
    st.timeline.write(x[40_000:])
    np.testing.assert_array_equal(st.read_audio(50_000, 20_000), x[50_000:])
    # Older than the ring: silence; beyond what was written: silence.
    assert not st.read_audio(0, 100).any()
    assert not st.read_audio(70_000, 10).any()


async def test_presenter_queue_feed_interrupt_and_limit(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    now = FakeTime(0.0)
    st = _stream(tiny_engine, default_avatar, "presenter", now, max_queued_speech_s=3.0)
    queued = st.push_speech(speechlike(32000), 16000)  # 2 s at 16 kHz
    assert queued == pytest.approx(2.0, abs=0.01)
    with pytest.raises(QueueFullError, match="exceed the limit"):
        st.push_speech(speechlike(32000), 16000)
    now.t = 0.5
    st._top_up()  # fed up to the clock plus the lead
    assert st.written == pytest.approx((0.5 + 0.04) * 48000, abs=1)
    assert st.queued_samples / 48000 == pytest.approx(2.0 - 0.54, abs=0.01)
    dropped = st.interrupt()
    assert dropped == pytest.approx(1.46, abs=0.01)
    assert st.queued_samples == 0
    now.t = 1.0
    st._top_up()  # silence after the interrupt
    assert not st.read_audio(int(0.6 * 48000), 960 * 10).any()
    with pytest.raises(TypeError):
        st.push_speech(np.zeros(10, dtype=np.complex64), 16000)
    await st.close()


async def test_tracks_pace_25fps_in_sync_and_skip_late_frames(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    """The video track delivers 25 fps and the audio track 50 frames/s on one timeline, even
    with a zero compute budget, where every frame is late: those are skipped, not queued."""
    st = _stream(tiny_engine, default_avatar, "presenter", compute_budget_ms=0, presenter_lead_ms=0)
    st.push_speech(speechlike(48000 * 2, rate=48000), 48000)
    st.start()
    video, audio = AvatarVideoTrack(st), AvatarAudioTrack(st)
    t0 = time.monotonic()
    v_frames, a_frames = [], []

    async def pull_video() -> None:
        for _ in range(25):
            v_frames.append(await video.recv())

    async def pull_audio() -> None:
        for _ in range(50):
            a_frames.append(await audio.recv())

    await asyncio.gather(pull_video(), pull_audio())
    elapsed = time.monotonic() - t0
    await st.close()
    # 1 s of media in about 1 s of wall time (plus the latency budget before the first).
    assert 0.85 < elapsed < 1.0 + st.budget["total_s"] + 0.3
    vp = [int(f.pts or 0) for f in v_frames]
    assert all(b - a >= 3600 for a, b in itertools.pairwise(vp))
    ap = [int(f.pts or 0) for f in a_frames]
    assert all(b - a == 960 for a, b in itertools.pairwise(ap))
    # Both tracks start at the same media instant (90 kHz video vs 48 kHz audio).
    assert vp[0] / 90000 == pytest.approx(ap[0] / 48000, abs=0.04)
    assert all(f.width == 512 and f.height == 512 for f in v_frames)
    # Rendering can never beat a zero budget: frames were skipped by deadline, none queued.
    assert st.stats.frames_skipped > 0
    assert st.stats.frames_repeated > 0
    # The audio never stalled: the speech came out.
    pcm = np.concatenate([f.to_ndarray()[0] for f in a_frames])
    assert np.abs(pcm).max() > 1000
    with pytest.raises(MediaStreamError):
        await video.recv()  # a closed stream ends its tracks


async def test_a_slow_render_does_not_lock_the_stream_into_skipping(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    now = FakeTime(0.0)
    st = _stream(tiny_engine, default_avatar, "presenter", now, compute_budget_ms=50)
    st.pacer.render_s = 1.0  # one render took a second: every frame now looks late
    late = st._first_worth_rendering()
    assert late - st.clock.first_live_frame(0.0) >= 24  # a second's frames written off
    now.t = 0.1
    st._top_up()  # the timeline tick relaxes the estimate (the pacer's own rule: test_pacing)
    assert st.stats.render_ms_ema == 1000.0  # a short gap: the estimate stands
    now.t = 1.0
    for _ in range(40):  # 40 ticks without a rendered frame
        st._top_up()
    assert 50.0 < st.stats.render_ms_ema < 51.0
    # Frames are tried again: the first one worth rendering is within two of the display.
    assert st._first_worth_rendering() - st.clock.first_live_frame(1.0) <= 2
    await st.close()


@pytest.mark.parametrize("lead_ms", [0.0, 100.0])
async def test_audio_lead_sends_the_voice_ahead_of_its_media_time(
    tiny_engine: Engine, default_avatar: Avatar, lead_ms: float
) -> None:
    st = _stream(tiny_engine, default_avatar, "presenter", audio_lead_ms=lead_ms)
    st.push_speech(speechlike(48000, rate=48000), 48000)
    st.start()
    audio = AvatarAudioTrack(st)
    early = []
    for _ in range(15):
        f = await audio.recv()
        # When the frame left the track, against when its first sample is due to play.
        early.append(st.clock.play_time(int(f.pts or 0)) - st.clock.now())
    await st.close()
    got = float(np.median(early[3:]))  # after the first frames (start-up)
    assert got == pytest.approx(lead_ms / 1000, abs=0.015)
    with pytest.raises(ValueError, match="audio_lead_ms"):
        StreamConfig(audio_lead_ms=-5)
