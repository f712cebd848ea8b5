"""Early speech start: what it gains in the LiveKit generator, what its rewind points cost.

    .venv/bin/python benchmarks/experiments/early_start_costs.py

1. The LiveKit generator driven as ``AvatarRunner`` drives it (the shipped ``tiny`` model,
   torch, 2 threads): 1 s of idle, then a 500 ms segment pushed as 10 ms frames, 5 segments per
   run, runs with ``GeneratorConfig.early_speech_start`` off/on/off/on; per segment the time
   from the push to the first speech ``rtc.AudioFrame`` the generator yields.
2. A session with 16 rewind points (as a presenter stream keeps) against none: time per 20 ms
   push, frames taken as a stream takes them, and the bytes the points hold.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np


def _speechlike(n: int, rate: int) -> np.ndarray:
    """A voiced, syllable-modulated signal (the tests' ``speechlike``), float32 mono."""
    t = np.arange(n) / rate
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    noise = 0.05 * np.random.default_rng(0).standard_normal(n)
    return (env * (0.3 * np.sin(2 * np.pi * 180 * t) + noise)).astype(np.float32)


def _frames_10ms(x: np.ndarray, rate: int) -> list:
    from livekit import rtc

    pcm = np.clip(np.rint(x * 32767), -32768, 32767).astype(np.int16)
    step = rate // 100
    return [
        rtc.AudioFrame(pcm[i : i + step].tobytes(), rate, 1, pcm[i : i + step].shape[0])
        for i in range(0, pcm.shape[0], step)
    ]


async def generator_gain(engine, avatar, early: bool, segments: int = 5) -> list[float]:
    from livekit import rtc
    from livekit.agents.voice.avatar import AudioSegmentEnd

    from talkstream.integrations.livekit.generator import (
        GeneratorConfig,
        TalkstreamVideoGenerator,
    )

    gen = TalkstreamVideoGenerator(
        engine.session(avatar), GeneratorConfig(early_speech_start=early)
    )
    stream = aiter(gen)
    out = []
    try:
        for _ in range(segments):
            for _ in range(25):  # 1 s of idle
                await anext(stream)
            t = time.monotonic()
            for f in _frames_10ms(_speechlike(8000, 16000), 16000):
                await gen.push_audio(f)
            await gen.push_audio(AudioSegmentEnd())
            while not isinstance(await anext(stream), rtc.AudioFrame):
                pass
            out.append((time.monotonic() - t) * 1000)
            while not isinstance(await anext(stream), AudioSegmentEnd):
                pass
    finally:
        await gen.aclose()
    return out


def rewind_point_costs(engine, avatar) -> dict[int, tuple[float, float]]:
    res = {}
    x = np.zeros(960, np.int16)
    for frames in (0, 16):
        s = engine.session(avatar)
        s.rewind_frames = frames
        t = time.perf_counter()
        for _ in range(1000):
            s.push_audio(x, 48000)
            while s.has_ready():
                s.take_ready()
        us = (time.perf_counter() - t) / 1000 * 1e6
        held = sum(
            f._buffer._data.nbytes
            + (f._resampler._buffer._data.nbytes if f._resampler else 0)
            + m._rows.nbytes
            for _, f, m in s._rewind_points
        )
        res[frames] = (us, held / 1e6)
    return res


async def main() -> None:
    from talkstream.config import AvatarConfig, EngineConfig
    from talkstream.engine.avatar import default_image, default_landmarks, prepare_avatar
    from talkstream.runtime import load_engine

    engine = load_engine(EngineConfig(preset="tiny", backend="torch", threads=2))
    avatar = prepare_avatar(
        default_image(), AvatarConfig(framing="full"), landmarks=default_landmarks()
    )
    try:
        for early in (False, True, False, True):
            ms = await generator_gain(engine, avatar, early)
            print(
                f"{'early' if early else 'late '}: first speech audio after "
                f"{[round(v) for v in ms]} ms, median {np.median(ms):.0f}"
            )
        for frames, (us, mb) in rewind_point_costs(engine, avatar).items():
            print(
                f"rewind points {frames:2d}: {us:.0f} us per 20 ms push (with take_ready), "
                f"{mb:.2f} MB held"
            )
    finally:
        engine.close()


if __name__ == "__main__":
    asyncio.run(main())
