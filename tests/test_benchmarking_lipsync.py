"""The played voice's envelope of the lip-sync benchmark (talkstream.benchmarking.lipsync):
the sent audio placed at the RTP time a browser reports playing, and the mouth shown per cell."""

from __future__ import annotations

import numpy as np
import pytest

from talkstream.benchmarking.lipsync import (
    FRAME_S,
    Playout,
    SentAudio,
    best_shift_r,
    cell_mean,
    envelope,
    match_playout,
    pearson,
    played_envelope,
)

RATE = 48_000
CHUNK = RATE // 100


def test_cell_mean_weights_each_value_by_how_long_it_was_shown() -> None:
    # Frames on the cell grid: each cell is its own frame's value.
    t = np.arange(10) * FRAME_S
    v = np.arange(10, dtype=float)
    assert np.allclose(cell_mean(t, v, 0.0, 10), v)
    # 2 at 0..30 ms, 6 at 30..80 ms (shown 50 ms): cell 0 = (2*30 + 6*10) / 40, cell 1 = 6.
    got = cell_mean(np.array([0.0, 0.030]), np.array([2.0, 6.0]), 0.0, 2)
    assert got == pytest.approx([3.0, 6.0])
    # A frame that no face was found in (NaN) is left out, not counted as 0; uncovered is NaN.
    got = cell_mean(np.array([0.0, 0.020, 0.040]), np.array([4.0, np.nan, 8.0]), 0.0, 4)
    assert got[0] == pytest.approx(4.0) and got[1] == pytest.approx(8.0)
    assert np.isnan(got[2:]).all()


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Bursts of noise with pauses, int16 (a syllable-like envelope, not periodic)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    env = np.zeros(n)
    i = 0
    while i < n:
        on, off = rng.integers(2_000, 12_000), rng.integers(1_000, 15_000)
        env[i : i + on] = rng.uniform(0.05, 0.6) * np.hanning(len(env[i : i + on]))
        i += on + off
    return (env * rng.standard_normal(n) * 32767 * 0.5).clip(-32767, 32767).astype(np.int16)


def chunks_of(x: np.ndarray, pts0: int = 0) -> list[tuple[int, np.ndarray]]:
    return [(pts0 + i, x[i : i + CHUNK]) for i in range(0, len(x) - CHUNK + 1, CHUNK)]


def browser_playout(
    sent: SentAudio, delay_s: float, origin: int, first_s: float, seconds: float, seed: int = 1
) -> list[list[float]]:
    """What js/playout.js records of a receiver that plays track time ``s`` at page time
    ``s + delay_s``: every 10 ms a hand-out (+-2 ms jitter), its RTP timestamp (random origin,
    wrapping) and the level the sender wrote (the chunk's dBov, as a 0..1 level)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(int(seconds * 100)):
        pts_s = first_s + k / 100
        db = float(sent.level_dbov(np.array([pts_s]))[0])
        rtp = (origin + round(pts_s * RATE)) % 2**32
        t_ms = 1000 * (pts_s + delay_s) + rng.uniform(-2, 2)
        rows.append([t_ms, 10 ** (db / 20), rtp])
    return rows


def test_the_played_voice_is_found_and_placed_where_the_browser_played_it() -> None:
    x = speech(20.0)
    sent = SentAudio.from_chunks(chunks_of(x), RATE)
    delay = 3.217  # page time - track time
    rows = browser_playout(sent, delay, origin=2**32 - 5 * RATE, first_s=4.0, seconds=12.0)
    playout = Playout.from_records(rows)
    assert playout is not None
    # The RTP clock wrapped inside the records; the map still comes out whole.
    assert np.all(np.diff(playout.rtp_s) > 0)
    match = match_playout(sent, playout)
    assert match is not None and match[1] > 0.99
    assert match[0] == pytest.approx(4.0, abs=0.011)  # rtp_s 0 is track time 4.0 s
    # The envelope of what played in each 40 ms from page time 6.0 s is the sent audio's from
    # track time 6.0 - delay: the offline measure of the same audio.
    t0, n = 6.0 + delay, 150
    got = played_envelope(sent, playout, match[0], t0, n)
    want = envelope(x.astype(np.float64) / 32768, RATE, n, offset_s=6.0)
    assert pearson(got, want) > 0.97
    # Nothing was played before the records start: NaN, not silence.
    assert np.isnan(played_envelope(sent, playout, match[0], delay + 1.0, 10)).all()


def test_levels_that_do_not_belong_to_the_sent_audio_do_not_match() -> None:
    sent = SentAudio.from_chunks(chunks_of(speech(20.0, seed=0)), RATE)
    other = SentAudio.from_chunks(chunks_of(speech(20.0, seed=5)), RATE)
    playout = Playout.from_records(browser_playout(other, 1.0, 0, 2.0, 12.0))
    assert playout is not None
    match = match_playout(sent, playout)
    assert match is None or match[1] < 0.5


def test_best_shift_finds_a_voice_played_late() -> None:
    rng = np.random.default_rng(3)
    env = np.abs(np.convolve(rng.standard_normal(600), np.ones(5) / 5, "same"))
    mouth = env[100:400]
    # The voice plays 120 ms (3 cells) after the mouth it belongs to.
    best = best_shift_r(mouth, lambda s: env[100 + s // 40 : 400 + s // 40], range(-200, 201, 40))
    assert best is not None and best[1] == 0 and best[0] == pytest.approx(1.0)
    late = np.concatenate([np.zeros(3), env])
    best = best_shift_r(mouth, lambda s: late[100 + s // 40 : 400 + s // 40], range(-200, 201, 40))
    assert best is not None and best[1] == 120
