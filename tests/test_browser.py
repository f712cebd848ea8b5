"""End to end in a real browser: headless Chromium, its fake microphone playing espeak-ng speech,
the web client at ``/``, the server in this process.

Idle motion is off, so with random weights the avatar's mouth region changes only when the
landmarks do: it must move while the avatar speaks and rest while it is silent.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")
playwright_api = pytest.importorskip(
    "playwright.async_api", reason="Python playwright is not installed (pip install playwright)"
)

from talkstream.benchmarking.browser import CHROMIUM_FLAGS, speech_bursts  # noqa: E402
from talkstream.benchmarking.local import local_engine  # noqa: E402
from talkstream.engine.avatar import Avatar  # noqa: E402
from talkstream.engine.pipeline import Engine  # noqa: E402
from tests.test_server import running_server, wait_for  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
STREAM_S = 10.0  # at most: covers speech, silence, speech (and the start of the loop)
MARGIN = 2  # stop early once every count the checks need is this many times over
FPS_WINDOW_S = 5.0

pytestmark = [
    pytest.mark.realtime,  # run alone by `make test` (pyproject: markers)
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"Debian chromium ({CHROMIUM}) is not installed (apt-get install chromium)",
    ),
    pytest.mark.skipif(
        shutil.which("espeak-ng") is None,
        reason="espeak-ng is not installed (apt-get install espeak-ng)",
    ),
]


def speech_silence_speech(tmp: Path) -> Path:
    """espeak-ng speech, 2.5 s of silence, speech, silence: a 16-bit WAV for the fake mic."""
    sentence = "hello there, how are you doing today"
    return speech_bursts(tmp / "speech.wav", [sentence, sentence], lead_s=0.3, gap_s=2.5)


async def launch(p: Any, tmp: Path, wav: Path) -> Any:
    return await p.chromium.launch_persistent_context(
        str(tmp / "profile"),  # a fresh --user-data-dir
        executable_path=CHROMIUM,
        headless=True,
        args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}"],
    )


@pytest.fixture(scope="module")
def still_engine(default_avatar: Avatar) -> Iterator[Engine]:
    # The shipped trained model (idle motion off, so silence is still): random weights draw the
    # photo through the pixel warp and barely move the mouth, a trained model opens it.
    eng = local_engine()  # --browser local's engine: the shipped checkpoint, idle off
    assert not eng.models.meta.get("random_init"), "the shipped checkpoint is missing"
    eng.warmup(default_avatar)
    yield eng
    eng.close()


def mouth_motion_by_voice(probe: dict[str, list[list[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Mouth-region change of presented frames while the avatar's voice sounds, and while it
    has been silent for a while (the voice track is in sync with the video by design)."""
    mouth = np.asarray(probe["mouth"], dtype=np.float64)  # (N, 3): display ms, diff, rtp
    voice = np.asarray(probe["voice"], dtype=np.float64)  # (M, 2): ms, RMS
    speaking, silent = [], []
    for t, diff in mouth[:, :2]:
        near = voice[np.abs(voice[:, 0] - t) <= 100, 1]
        wide = voice[np.abs(voice[:, 0] - t) <= 700, 1]
        if near.size and near.mean() > 0.02:
            speaking.append(diff)
        elif wide.size and wide.max() < 0.003:
            silent.append(diff)
    return np.asarray(speaking), np.asarray(silent)


async def stream_until_enough(page: Any, h: Any) -> dict[str, Any]:
    """What the page recorded, once the checks below have enough to judge (MARGIN times the
    frames of speech and of silence they need, the whole fps window, the speech total the
    server must have heard) or after STREAM_S, whichever comes first. The checks themselves
    are unchanged: a stream that never gets there is judged on all STREAM_S of it."""
    loop = asyncio.get_running_loop()
    end = loop.time() + STREAM_S
    while True:
        await asyncio.sleep(0.5)
        ts = await page.evaluate(
            "({presented: talkstream.presented, probe: talkstream.probe,"
            " sessionId: talkstream.sessionId, error: talkstream.error})"
        )
        if ts["error"] or loop.time() >= end:
            return ts
        presented = ts["presented"]
        if not presented or presented[-1] - presented[0] < (FPS_WINDOW_S + 0.5) * 1000:
            continue
        speaking, silent = mouth_motion_by_voice(ts["probe"])
        if min(speaking.size, silent.size) < 10 * MARGIN:
            continue
        status, stats = await h.get_json(f"/sessions/{ts['sessionId']}/stats")
        if status == 200 and stats["speech_s"] > 1.5:  # a running total: no margin needed
            return ts


async def test_browser_end_to_end(
    still_engine: Engine, default_avatar: Avatar, tmp_path: Path
) -> None:
    wav = speech_silence_speech(tmp_path)
    async with (
        running_server(still_engine, default_avatar) as h,
        playwright_api.async_playwright() as p,
    ):
        browser = await launch(p, tmp_path, wav)
        try:
            page = browser.pages[0] if browser.pages else await browser.new_page()
            await page.goto(f"{h.url}/?probe=1&autostart=1")
            await page.wait_for_function(
                "window.talkstream && window.talkstream.state === 'connected'", timeout=20_000
            )
            ts = await stream_until_enough(page, h)
            assert not ts["error"], ts["error"]
            # Decoded video: at least 20 fps over the last 5 s.
            presented = np.asarray(ts["presented"])
            window = presented[presented >= presented[-1] - FPS_WINDOW_S * 1000]
            fps = (len(window) - 1) / ((window[-1] - window[0]) / 1000)
            assert window[-1] - window[0] >= (FPS_WINDOW_S - 0.2) * 1000
            assert fps >= 20, fps
            # The server received the speech (both sentences, minus the stream's start).
            status, stats = await h.get_json(f"/sessions/{ts['sessionId']}/stats")
            assert status == 200
            assert stats["speech_s"] > 1.5, stats
            # The mouth moves during speech and rests during silence.
            speaking, silent = mouth_motion_by_voice(ts["probe"])
            assert speaking.size >= 10 and silent.size >= 10, (speaking.size, silent.size)
            assert np.median(speaking) > 0.05, (np.median(speaking), stats)
            assert np.median(speaking) > 4 * np.median(silent), (
                np.median(speaking),
                np.median(silent),
            )
            # Hang up from the page: the server closes the session.
            await page.click("#stop")
            assert await wait_for(lambda: not h.manager.peers, 10)
        finally:
            await browser.close()
