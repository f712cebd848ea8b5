"""AudioTimeline (the replay ring) and SpeechQueue (presenter input), without an engine."""

from __future__ import annotations

import numpy as np
import pytest

from talkstream.streaming.timeline import AudioTimeline, QueueFullError, SpeechQueue, rms
from tests.conftest import speechlike


def _ramp(n: int, start: int = 1) -> np.ndarray:
    # Distinct non-zero samples, so any misplaced or zeroed sample shows.
    return ((np.arange(start, start + n) % 30_000) + 1).astype(np.int16)


def test_write_read_across_the_wrap_and_sink_gets_every_chunk() -> None:
    got: list[np.ndarray] = []
    tl = AudioTimeline(1000, got.append)
    x = _ramp(2500)
    for a, b in [(0, 700), (700, 700), (700, 1300), (1300, 1950), (1950, 2500)]:
        tl.write(x[a:b])  # includes an empty write: no trace entry, nothing to the sink
    assert tl.written == 2500
    np.testing.assert_array_equal(np.concatenate(got), x)
    assert [len(c) for c in got] == [700, 600, 650, 550]
    assert [p for p, _ in tl.trace] == [0, 700, 1300, 1950]
    assert tl.trace[1][1] == pytest.approx(rms(x[700:1300]))
    # The last 1000 samples, read whole, across the ring's end (2000 % 1000 == 0 is the seam
    # at 2000; 1500..2500 crosses it), and piecewise.
    np.testing.assert_array_equal(tl.read(1500, 1000), x[1500:2500])
    np.testing.assert_array_equal(tl.read(1990, 20), x[1990:2010])
    pieces = [tl.read(p, 37) for p in range(1500, 2500, 37)]
    np.testing.assert_array_equal(np.concatenate(pieces)[:1000], x[1500:2500])


def test_reads_of_the_past_and_future_are_silence() -> None:
    tl = AudioTimeline(1000)
    x = _ramp(2500)
    tl.write(x)  # longer than the ring: only the tail is kept
    assert tl.written == 2500
    # Straddling the oldest held sample: silence, then the samples.
    out = tl.read(1400, 200)
    assert not out[:100].any()
    np.testing.assert_array_equal(out[100:], x[1500:1600])
    # Straddling the newest: the samples, then silence.
    out = tl.read(2450, 100)
    np.testing.assert_array_equal(out[:50], x[2450:])
    assert not out[50:].any()
    assert not tl.read(0, 1000).any()  # long gone
    assert not tl.read(-300, 200).any()  # before the start
    assert not tl.read(2500, 480).any()  # not yet written
    assert tl.read(2000, 0).shape == (0,)
    assert tl.read(2000, 10).dtype == np.int16


def test_silence_fill_and_cut() -> None:
    got: list[np.ndarray] = []
    tl = AudioTimeline(1000, got.append)
    tl.write(_ramp(300))
    tl.write_silence(0)
    tl.write_silence(-5)
    assert tl.written == 300 and len(got) == 1
    tl.write_silence(250)
    assert tl.written == 550
    assert not tl.read(300, 250).any() and tl.read(0, 300).all()
    assert got[-1].shape == (250,) and not got[-1].any()  # the sink hears the silence too
    tl.write(_ramp(900))  # 1450 written: ring holds 450..1450, wrapping
    # Cut from 1200: held samples from there read as silence; written and the sink unchanged.
    n_sunk = len(got)
    tl.silence_from(1200)
    assert tl.written == 1450 and len(got) == n_sunk
    assert not tl.read(1200, 250).any()
    np.testing.assert_array_equal(tl.read(550, 650), _ramp(900)[:650])
    # A cut older than the ring clears all it holds (and no more); one in the future: nothing.
    tl.silence_from(-2000)  # more than twice the ring back: still one pass over what is held
    assert not tl.read(0, 1450).any()
    tl.write(_ramp(10))
    tl.silence_from(5000)
    np.testing.assert_array_equal(tl.read(1450, 10), _ramp(10))
    with pytest.raises(ValueError, match="capacity"):
        AudioTimeline(0)


def test_trace_is_bounded() -> None:
    tl = AudioTimeline(100, trace_len=3)
    for _ in range(5):
        tl.write(np.full(10, 1000, dtype=np.int16))
    assert [p for p, _ in tl.trace] == [20, 30, 40]
    assert tl.trace[0][1] == pytest.approx(1000 / 32768)


def test_speech_queue_feeds_chunks_then_silence() -> None:
    q = SpeechQueue(10.0, name="p")
    tl = AudioTimeline(48_000)
    a, n_in = q.push(np.full(960, 0.25, dtype=np.float32), 48_000)  # same rate: 960 out
    assert n_in == 960 and a.dtype == np.int16
    b, _ = q.push(np.full((480, 2), 8192, dtype=np.int16), 48_000)  # stereo int16
    assert q.queued_samples == a.shape[0] + b.shape[0]
    total = q.queued_samples
    q.feed(tl, 500)  # splits the first chunk
    assert tl.written == 500 and q.queued_samples == total - 500
    q.feed(tl, total - 500 + 300)  # the rest, then 300 samples of silence
    assert q.queued_samples == 0 and tl.written == total + 300
    assert [p for p, _ in tl.trace] == [0, 500, a.shape[0], total]  # chunk boundaries kept
    fed = tl.read(0, total + 300)
    np.testing.assert_array_equal(fed[:total], np.concatenate([a, b]))
    assert not fed[total:].any()
    q.feed(tl, 0)
    assert tl.written == total + 300


def test_speech_queue_resamples_and_limits() -> None:
    q = SpeechQueue(1.0, name="bob")
    x = speechlike(16_000)  # 1 s at 16 kHz
    y, n_in = q.push(x[:8000], 16_000)
    assert n_in == 8000
    assert abs(y.shape[0] - 24_000) < 200  # the resampler holds back a few samples
    assert rms(y) == pytest.approx(float(np.sqrt(np.mean(x[:8000] ** 2))), rel=0.1)
    before = q.queued_samples
    with pytest.raises(QueueFullError, match=r"presenter 'bob' .* exceed the limit of 1 s"):
        q.push(x[: 8000 + 1000], 16_000)  # 0.56 s more than 0.5 s: over
    assert q.queued_samples == before  # nothing queued by the refused push
    with pytest.raises(TypeError):
        q.push(np.zeros(10, dtype=np.complex64), 16_000)
    assert q.clear() == before and q.queued_samples == 0


def test_speech_queue_interrupt_forgets_the_resampler_clear_keeps_it() -> None:
    x = speechlike(3200)

    def after(reset: bool) -> np.ndarray:
        q = SpeechQueue(10.0)
        q.push(x, 16_000)
        dropped = q.interrupt() if reset else q.clear()
        assert dropped > 0 and q.queued_samples == 0
        return q.push(x, 16_000)[0]

    fresh = SpeechQueue(10.0).push(x, 16_000)[0]
    np.testing.assert_array_equal(after(reset=True), fresh)  # starts afresh
    kept = after(reset=False)  # continues the old stream: the held-back tail comes first
    assert kept.shape[0] > fresh.shape[0] or not np.array_equal(kept, fresh)


def test_rewind_takes_samples_back_and_last_sound_finds_the_end_of_speech() -> None:
    got: list[np.ndarray] = []
    tl = AudioTimeline(1000, got.append)
    tl.write(_ramp(300))
    tl.write_silence(400)
    assert tl.last_sound(0) == 299 and tl.last_sound(300) is None
    assert tl.last_sound(0, 200) == 199  # only [start, stop)
    tl.rewind(500)
    assert tl.written == 500 and [p for p, _ in tl.trace] == [0, 300]
    tl.write(_ramp(50, start=7))
    assert np.array_equal(tl.read(500, 50), _ramp(50, start=7))
    assert tl.last_sound(300) == 549
    assert sum(c.shape[0] for c in got) == 750  # the sink saw every write, the taken back too
    with pytest.raises(ValueError, match="cannot rewind"):
        tl.rewind(600)  # beyond what was written
    tl.write_silence(2000)
    with pytest.raises(ValueError, match="cannot rewind"):
        tl.rewind(100)  # no longer held


def test_push_front_puts_speech_back_at_the_head() -> None:
    q = SpeechQueue(10.0)
    q.push(np.full(480, 1000, np.int16), 48000)
    q.push_front(np.full(96, 5, np.int16))
    assert q.queued_samples == 576
    tl = AudioTimeline(2000)
    q.feed(tl, 100)
    assert np.array_equal(tl.read(0, 100), np.r_[np.full(96, 5), np.full(4, 1000)].astype(np.int16))
