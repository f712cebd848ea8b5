"""Session and Engine: frames with timestamps out of audio chunks in, sync and async alike."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine, Faces, Frame
from tests.conftest import speechlike


def _run_sync(
    engine: Engine, avatar: Avatar, audio: np.ndarray, rate: int, chunk: int, seed: int = 0
) -> list[Frame]:
    s = engine.session(avatar, seed=seed)
    out: list[Frame] = []
    for i in range(0, len(audio), chunk):
        s.push_audio(audio[i : i + chunk], rate)
        while s.has_ready():
            out += s.render_ready()
    s.end_audio()
    while s.has_ready():
        out += s.render_ready()
    assert s.done
    return out


def test_sync_frames_and_timestamps(tiny_engine: Engine, default_avatar: Avatar) -> None:
    audio = speechlike(16000 + 100)  # 1.006 s -> 26 frames
    frames = _run_sync(tiny_engine, default_avatar, audio, 16000, 320)
    assert [f.pts for f in frames] == list(range(26))
    assert frames[-1].time_s == pytest.approx(25 * 0.04)
    img = default_avatar.image
    for f in frames:
        assert f.image.shape == img.shape and f.image.dtype == np.uint8
        assert f.landmarks.shape == (68, 2)
    # Outside the paste region the frame is the untouched photo.
    y0, y1, x0, x1 = default_avatar.paste.bbox
    outside = np.ones(img.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(frames[3].image[outside], img[outside])
    # Inside, the denoiser's output was pasted.
    assert np.abs(frames[3].image[y0:y1, x0:x1].astype(int) - img[y0:y1, x0:x1]).mean() > 1


def test_chunking_and_rate_do_not_change_frames(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    audio = speechlike(8000)
    a = _run_sync(tiny_engine, default_avatar, audio, 16000, 160)
    b = _run_sync(tiny_engine, default_avatar, audio, 16000, 16 * 37)
    assert len(a) == len(b) == 13
    for fa, fb in zip(a, b, strict=True):
        np.testing.assert_allclose(fa.landmarks, fb.landmarks, atol=1e-6)
        assert np.abs(fa.image.astype(int) - fb.image).max() <= 1
    # 48 kHz stereo int16 input, as WebRTC delivers it, gives the same number of frames.
    t48 = np.repeat(speechlike(24000, rate=48000)[:, None], 2, axis=1)
    c = _run_sync(tiny_engine, default_avatar, (t48 * 32767).astype(np.int16), 48000, 960)
    assert len(c) == 13


def test_same_seed_same_frames_other_seed_differs(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    audio = speechlike(4000)
    a = _run_sync(tiny_engine, default_avatar, audio, 16000, 320, seed=5)
    b = _run_sync(tiny_engine, default_avatar, audio, 16000, 320, seed=5)
    c = _run_sync(tiny_engine, default_avatar, audio, 16000, 320, seed=6)
    np.testing.assert_array_equal(a[2].image, b[2].image)
    assert not np.array_equal(a[2].image, c[2].image)


async def test_async_frames_with_pushes_from_another_thread(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    audio = speechlike(16000 * 2)
    expected = _run_sync(tiny_engine, default_avatar, audio, 16000, 320)
    s = tiny_engine.session(default_avatar)

    def feed() -> None:  # a capture thread, as pyaudio's callback would be
        for i in range(0, len(audio), 320):
            s.push_audio(audio[i : i + 320], 16000)
        s.end_audio()

    got: list[Frame] = []
    consumer = asyncio.create_task(_collect(s, got))
    t = threading.Thread(target=feed)
    t.start()
    await asyncio.wait_for(consumer, timeout=120)
    t.join()
    assert [f.pts for f in got] == list(range(50))
    # Batches form differently when frames are rendered as they arrive, and a different batch
    # size may round a float differently: allow 1 grey level, nothing more.
    for fa, fb in zip(got, expected, strict=True):
        np.testing.assert_allclose(fa.landmarks, fb.landmarks, atol=1e-5)
        assert np.abs(fa.image.astype(int) - fb.image).max() <= 1


async def _collect(s: object, out: list[Frame]) -> None:
    async for f in s.frames():  # type: ignore[attr-defined]
        out.append(f)


async def test_two_sessions_share_one_engine(tiny_engine: Engine, default_avatar: Avatar) -> None:
    a, b = tiny_engine.session(default_avatar, seed=1), tiny_engine.session(default_avatar, seed=2)
    assert a.features is b.features  # reference features computed once per avatar
    audio = speechlike(6400)
    for s in (a, b):
        s.push_audio(audio, 16000)
        s.end_audio()
    got_a: list[Frame] = []
    got_b: list[Frame] = []
    await asyncio.gather(_collect(a, got_a), _collect(b, got_b))
    assert len(got_a) == len(got_b) == 10
    # Rendered together (batched), each session still gets its own frames: those it renders
    # alone. The two differ (seeded noise and idle motion), so a mix-up would show.
    assert any(not np.array_equal(fa.image, fb.image) for fa, fb in zip(got_a, got_b, strict=True))
    for got, seed in ((got_a, 1), (got_b, 2)):
        alone = _run_sync(tiny_engine, default_avatar, audio, 16000, 6400, seed=seed)
        assert [f.pts for f in got] == [f.pts for f in alone]
        for f, g in zip(got, alone, strict=True):
            np.testing.assert_allclose(f.landmarks, g.landmarks, atol=1e-5)
            assert np.abs(f.image.astype(int) - g.image).max() <= 1


def test_errors(tiny_engine: Engine, default_avatar: Avatar) -> None:
    s = tiny_engine.session(default_avatar)
    with pytest.raises(TypeError):
        s.push_audio(np.zeros(100, dtype=np.complex64), 16000)
    s.end_audio()
    with pytest.raises(RuntimeError, match="after end_audio"):
        s.push_audio(np.zeros(100, np.float32), 16000)
    with pytest.raises(ValueError, match="lookahead"):
        tiny_engine.session(default_avatar, lookahead=5)
    assert 0.08 < s.latency_s < 0.2  # 80 ms lookahead + token rows + half a window


def _claimed(engine: Engine, avatar: Avatar, seed: int, n_samples: int) -> list:
    s = engine.session(avatar, seed=seed)
    s.max_batch = 64
    s.push_audio(speechlike(n_samples, seed=seed), 16000)
    s.end_audio()
    items = s.take_ready()
    assert items
    return items


def test_submit_coalesces_waiting_requests_into_one_call(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    reqs = [_claimed(tiny_engine, default_avatar, seed, 3200) for seed in (1, 2, 3)]
    # Each request alone, for reference.
    alone = [tiny_engine.render(r) for r in reqs]
    before = tiny_engine.batches_rendered
    # Hold the model lock: the worker takes request 0 and blocks in it; 1 and 2 wait meanwhile.
    with tiny_engine._lock:
        futs = [tiny_engine.submit(reqs[0])]
        while tiny_engine._pending:  # until the worker has taken request 0
            threading.Event().wait(0.01)
        futs += [tiny_engine.submit(r) for r in reqs[1:]]
    got = [f.result(timeout=60) for f in futs]
    assert tiny_engine.batches_rendered - before == 2  # request 0, then 1 and 2 together
    for g, a, r in zip(got, alone, reqs, strict=True):
        assert len(g) == len(r)  # each caller gets its own faces, in order
        np.testing.assert_allclose(g.landmarks, a.landmarks, atol=1e-5)
        assert np.abs(g.crops.astype(int) - a.crops).max() <= 1


def test_submit_respects_max_batch_and_skips_cancelled(
    tiny_engine: Engine, default_avatar: Avatar, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    reqs = [_claimed(tiny_engine, default_avatar, seed, 1600) for seed in (4, 5, 6, 7)]
    n = len(reqs[1])
    monkeypatch.setattr(
        tiny_engine, "cfg", dataclasses.replace(tiny_engine.cfg, max_batch_frames=n + 1)
    )
    seen: list[int] = []
    real_render = tiny_engine.render

    def counting_render(items: list) -> Faces:
        seen.append(len(items))
        return real_render(items)

    monkeypatch.setattr(tiny_engine, "render", counting_render)
    with tiny_engine._lock:
        futs = [tiny_engine.submit(reqs[0])]
        while tiny_engine._pending:
            threading.Event().wait(0.01)
        futs += [tiny_engine.submit(r) for r in reqs[1:]]
        assert futs[2].cancel()  # cancelled while waiting: never rendered
    assert futs[1].result(timeout=60) and futs[3].result(timeout=60)
    # 1 and 3 do not fit one call of n + 1 frames together; 2 was dropped.
    assert seen == [len(reqs[0]), len(reqs[1]), len(reqs[3])]


def test_submit_reports_errors_and_keeps_working(
    tiny_engine: Engine, default_avatar: Avatar, monkeypatch: pytest.MonkeyPatch
) -> None:
    req = _claimed(tiny_engine, default_avatar, 8, 1600)
    real_render = tiny_engine.render
    monkeypatch.setattr(tiny_engine, "render", lambda items: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        tiny_engine.submit(req).result(timeout=60)
    monkeypatch.setattr(tiny_engine, "render", real_render)
    assert len(tiny_engine.submit(req).result(timeout=60)) == len(req)
