"""Presenter speech that arrives while the avatar idles starts at the next frame that can still
change, not after the silence already fed ahead of the display (``Session.rewind``,
``StreamConfig.early_speech_start``; issue 12, first moving mouth)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")

from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine, RenderItem
from talkstream.streaming.clock import SAMPLES_PER_FRAME_48K
from talkstream.streaming.config import ANTICIPATION_FRAMES, StreamConfig
from talkstream.streaming.timeline import SpeechQueue
from talkstream.streaming.tracks import AvatarStream
from tests.conftest import speechlike
from tests.test_interrupt import _shown, _step, espeak_speech, shipped_engine  # noqa: F401
from tests.test_tracks import FakeTime

SPF = SAMPLES_PER_FRAME_48K


def _take_all(sess: Any) -> dict[int, RenderItem]:
    out: dict[int, RenderItem] = {}
    while sess.has_ready():
        for it in sess.take_ready():
            out[it.pts] = it
    return out


def _speech_48k(seconds: float = 1.0) -> np.ndarray:
    return (speechlike(int(48000 * seconds), 48000) * 32767).astype(np.int16)


def _push_in_chunks(sess: Any, x: np.ndarray, seed: int, take: dict[int, RenderItem] | None):
    rng = np.random.default_rng(seed)
    pos = 0
    while pos < x.shape[0]:
        n = min(int(rng.integers(50, 1500)), x.shape[0] - pos)
        sess.push_audio(x[pos : pos + n], 48000)
        pos += n
        if take is not None:
            take.update(_take_all(sess))


def _same(a: RenderItem, b: RenderItem) -> bool:
    return (
        a.pts == b.pts
        and np.array_equal(a.window, b.window)
        and np.array_equal(a.idle_offset, b.idle_offset)
    )


@pytest.mark.parametrize("take_before", [True, False], ids=["frames-taken", "none-taken"])
def test_rewind_gives_the_windows_of_a_stream_that_said_it_there(
    tiny_engine: Engine, default_avatar: Avatar, take_before: bool
) -> None:
    speech = _speech_48k()
    ref = tiny_engine.session(default_avatar)
    ref.push_audio(np.zeros(10 * SPF, np.int16), 48000)
    ref.push_audio(speech, 48000)
    ref.end_audio()
    want = _take_all(ref)

    sess = tiny_engine.session(default_avatar)
    sess.rewind_frames = 16
    before: dict[int, RenderItem] = {}
    _push_in_chunks(sess, np.zeros(16 * SPF, np.int16), 1, before if take_before else None)
    if take_before:
        assert max(before) >= 11  # frames past the rewind point were already taken
    assert sess.rewind(10)
    sess.push_audio(speech, 48000)
    sess.end_audio()
    after = _take_all(sess)
    # Frames from the rewind point on: exactly those of the stream that spoke there.
    assert min(after) == (10 if take_before else 0)
    assert all(_same(after[k], want[k]) for k in want if k >= 10)
    assert set(after) | set(before) == set(want)
    if not take_before:  # frames not yet taken before the point see the speech coming too
        assert all(_same(after[k], want[k]) for k in want)
    else:  # frames before it that were taken are not taken again
        assert all(k >= 10 for k in after)


def test_rewind_refuses_points_it_does_not_hold(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    off = tiny_engine.session(default_avatar)
    off.push_audio(np.zeros(8 * SPF, np.int16), 48000)
    assert not off.rewind(4)  # rewind_frames is 0 by default: nothing held

    sess = tiny_engine.session(default_avatar)
    sess.rewind_frames = 4
    _push_in_chunks(sess, np.zeros(12 * SPF, np.int16), 2, None)
    assert not sess.rewind(7)  # older than the last 4 frame starts
    assert not sess.rewind(13)  # not pushed yet
    n = sess.interrupts
    assert sess.rewind(9) and sess.interrupts == n + 1
    sess.interrupt(10)
    assert not sess.rewind(9)  # would bring back audio an interruption cut


@pytest.mark.slow
@pytest.mark.parametrize("early", [True, False], ids=["early", "after-the-fed-silence"])
async def test_idle_presenter_starts_speaking_at_the_next_changeable_frame(
    shipped_engine: Engine,  # noqa: F811
    default_avatar: Avatar,
    espeak_speech: tuple[np.ndarray, int],  # noqa: F811
    early: bool,
) -> None:
    pcm, rate = espeak_speech
    now = FakeTime(0.0)
    cfg = StreamConfig(compute_budget_ms=200, early_speech_start=early)
    st = AvatarStream(shipped_engine, default_avatar, cfg, mode="presenter", now=now)
    st.start()
    try:
        for _ in range(20):  # idle first
            index = await _step(st, now)
        written = st.written
        st.push_speech(pcm, rate)
        q = SpeechQueue(60.0)
        voice, _ = q.push(pcm, rate)  # exactly what the stream queued
        for _ in range(10):  # the speech goes onto the timeline as the clock moves
            await _step(st, now)
        heard = st.read_audio(index * SPF, written + 10 * SPF - index * SPF)
        # The voice starts on a frame boundary, where its first sound says it starts.
        at = index * SPF + int(np.flatnonzero(heard)[0]) - int(np.flatnonzero(voice)[0])
        first = at // SPF
        if early:
            assert at % SPF == 0
            # ANTICIPATION_FRAMES after the next frame that can still change (those frames
            # see it coming), not after the end of the fed silence.
            assert first <= index + 3 + ANTICIPATION_FRAMES
            assert st.speech_moved == (written, at) and st.stats.early_starts == 1
            assert at < written - 4 * SPF
        else:
            assert at >= written
        # The whole speech, with no gap, from its first frame on (what the voice plays).
        for _ in range(60):
            await _step(st, now)
        n = st.written - at
        assert n > 2 * 48000
        assert np.array_equal(st.read_audio(at, n), voice[:n])
        # And the lips move with it: the mouth opens within half a second of the voice, and
        # not before it (no frame before the voice's first shows the speech).
        mouth = dict(st.mouth_trace)
        rest = float(np.median([mouth[k] for k in range(index - 6, index)]))
        assert max(mouth[k] for k in range(first, first + 13)) - rest > 0.05
        assert all(abs(mouth[k] - rest) < 0.05 for k in range(index - 6, first - 3))
    finally:
        await st.close()
