"""The web page in headless Chromium: the face is previewed before Start, a presenter's viewers
get a watch-only page that never asks for the microphone, and the page carries the viewer token
(issue 14)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")
playwright_api = pytest.importorskip(
    "playwright.async_api", reason="Python playwright is not installed (pip install playwright)"
)

import soundfile  # noqa: E402

from talkstream.benchmarking.browser import CHROMIUM_FLAGS  # noqa: E402
from talkstream.engine.avatar import Avatar  # noqa: E402
from talkstream.engine.pipeline import Engine  # noqa: E402
from tests.conftest import speechlike  # noqa: E402
from tests.test_server import running_server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
VIEWER = "viewer-secret-1"
CONTROL = "control-secret-2"

pytestmark = [
    pytest.mark.realtime,  # run alone by `make test` (pyproject: markers)
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"Debian chromium ({CHROMIUM}) is not installed (apt-get install chromium)",
    ),
]

# Counts microphone requests, whatever the page does with them.
COUNT_GUM = """
window.__gum = 0;
const real = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = (c) => { window.__gum += 1; return real(c); };
"""


@pytest.fixture(scope="module")
def warm_engine(tiny_engine: Engine, default_avatar: Avatar) -> Iterator[Engine]:
    tiny_engine.warmup(default_avatar)
    yield tiny_engine


def _wav(seconds: float, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, speechlike(int(rate * seconds), rate=rate) * 2, rate, format="WAV")
    return buf.getvalue()


async def test_preview_and_watch_only_page_with_token(
    warm_engine: Engine, default_avatar: Avatar, tmp_path: Path
) -> None:
    async with (
        running_server(
            warm_engine, default_avatar, viewer_token=VIEWER, control_token=CONTROL
        ) as h,
        playwright_api.async_playwright() as p,
    ):
        control = {"Authorization": f"Bearer {CONTROL}"}
        assert (await h.post("/presenters/anna", headers=control))[0] == 201
        status, _ = await h.post(
            "/presenters/anna/speech",
            data=_wav(8.0),
            headers=control | {"Content-Type": "audio/wav"},
        )
        assert status == 200
        browser = await p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.pages[0] if browser.pages else await browser.new_page()
            await page.add_init_script(COUNT_GUM)
            # The live page: the still face before Start, not a black box.
            await page.goto(f"{h.url}/?token={VIEWER}")
            poster = await page.evaluate("document.getElementById('video').poster")
            assert "/preview.jpg" in poster
            shown = await page.evaluate(
                "fetch(document.getElementById('video').poster)"
                ".then(r => [r.status, r.headers.get('content-type')])"
            )
            assert shown == [200, "image/jpeg"]
            async with h.http.get(poster) as r:
                from PIL import Image

                img = np.asarray(Image.open(io.BytesIO(await r.read())))
            # The avatar's own photo (to within JPEG's loss), not any picture.
            assert img.shape == default_avatar.image.shape
            assert np.abs(img.astype(int) - default_avatar.image).mean() < 4

            # A presenter's viewer: /?presenter= sends them to the watch-only page.
            await page.goto(f"{h.url}/?presenter=anna&token={VIEWER}")
            assert "/watch?" in page.url and "token=" in page.url
            assert await page.text_content("#start") == "Watch"
            assert "microphone" not in (await page.text_content("#intro") or "").lower().replace(
                "no microphone", ""
            )
            await page.click("#start")
            await page.wait_for_function(
                "window.talkstream && window.talkstream.state === 'connected'", timeout=20_000
            )
            # Up to 3 s for more than 25 frames (or an error): the same floor as a fixed 3 s
            # wait, without waiting out the 3 s when the frames come sooner.
            with contextlib.suppress(playwright_api.TimeoutError):
                await page.wait_for_function(
                    "talkstream.error || talkstream.presented.length > 25", timeout=3_000
                )
            ts = await page.evaluate(
                "({n: talkstream.presented.length, error: talkstream.error, gum: window.__gum})"
            )
            assert not ts["error"], ts["error"]
            assert ts["n"] > 25, ts  # frames arrived (25 fps, a lenient floor)
            assert ts["gum"] == 0, "the watch page asked for the microphone"
            assert h.manager.viewer_count == 1
        finally:
            await browser.close()
