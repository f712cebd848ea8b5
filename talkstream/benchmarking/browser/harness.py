"""Headless Chromium, driven by playwright: find the browser, run one session, keep the records.

:func:`record` opens the web client with ``?probe=1``, presses *Start*, polls the page (its
probe, presented frames and ``getStats()``) for the measured window plus :data:`TAIL_S`, fetches
the server's trace and stats, and hangs up. The page-side JavaScript lives in ``js/`` beside
this module (package data), loaded with :func:`page_script`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Any

from talkstream.benchmarking.browser.analysis import MAX_LATENCY_S
from talkstream.errors import TalkstreamError

CHROMIUM_ENV = "TALKSTREAM_CHROMIUM"
CHROMIUM_DEFAULT = "/usr/bin/chromium"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Fake media devices with no permission prompt, autoplay, and loopback ICE candidates allowed
# (a server on the same machine); no GPU, no background traffic.
CHROMIUM_FLAGS = [
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-loopback-in-peer-connection",
]

TAIL_S = MAX_LATENCY_S  # recorded after the measured window, for the last bursts' answers
CONNECT_TIMEOUT_S = 30.0
FIRST_FRAME_TIMEOUT_S = 30.0


def page_script(name: str) -> str:
    """The JavaScript ``js/<name>.js`` shipped with this package, less its leading comments."""
    text = (resources.files(__package__) / "js" / f"{name}.js").read_text(encoding="utf-8")
    lines = text.splitlines()
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith("//")):
        lines.pop(0)
    return "\n".join(lines) + "\n"


# Before the page's scripts: keep every RTCPeerConnection, to read its getStats() later.
INIT_JS = page_script("init")
# A function of the page's RTCPeerConnection: the voice at Chromium's playout, to
# window.__playout as [page ms, level, RTP timestamp] (js/playout.js).
PLAYOUT_JS = page_script("playout")
# One poll (a function of the last presented time collected): the page's state, new presented
# frames, and the inbound RTP statistics.
POLL_JS = page_script("poll")
# A same-origin JSON fetch from the page (a function of the path): {status, body}.
FETCH_JSON_JS = page_script("fetch_json")
# An older server sends no mouth_box: the lower middle of the video.
GUESS_MOUTH_BOX_JS = page_script("guess_mouth_box")


# ----------------------------------------------------------------------------- prerequisites


def find_chromium() -> str | None:
    """A Chromium or Chrome binary: ``$TALKSTREAM_CHROMIUM``, Debian's, or one on ``PATH``."""
    env = os.environ.get(CHROMIUM_ENV)
    if env:
        return env if Path(env).is_file() else None
    if Path(CHROMIUM_DEFAULT).is_file():
        return CHROMIUM_DEFAULT
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def check_browser_tools() -> str:
    """The Chromium binary to drive; :class:`TalkstreamError` naming what to install."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        raise TalkstreamError(
            "the browser benchmark needs the Python package 'playwright' (it drives the "
            "system Chromium; no browser download): pip install playwright"
        ) from None
    chromium = find_chromium()
    if chromium is None:
        where = os.environ.get(CHROMIUM_ENV)
        if where:
            raise TalkstreamError(f"${CHROMIUM_ENV} is {where!r}, which is not a file")
        raise TalkstreamError(
            "the browser benchmark needs Chromium: apt-get install chromium (or set "
            f"${CHROMIUM_ENV} to a Chromium or Chrome binary)"
        )
    return chromium


# ----------------------------------------------------------------------------- the browser


async def record(
    page_url: str, chromium: str, wav: Path, duration_s: float, profile: Path
) -> dict[str, Any]:
    """Drive Chromium through one session: press Start, measure ``duration_s`` from the first
    presented frame (plus :data:`TAIL_S` for the last bursts), hang up; the page's records."""
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        try:
            ctx = await p.chromium.launch_persistent_context(
                str(profile),  # a fresh --user-data-dir
                executable_path=chromium,
                headless=True,
                args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}"],
            )
        except PlaywrightError as e:
            raise TalkstreamError(
                f"Chromium ({chromium}) did not start: {str(e).splitlines()[0]}"
            ) from None
        try:
            await ctx.add_init_script(INIT_JS)
            page = ctx.pages[0] if ctx.pages else await ctx.new_page()
            try:
                resp = await page.goto(page_url, wait_until="load", timeout=20_000)
            except PlaywrightError as e:
                raise TalkstreamError(
                    f"Chromium cannot open {page_url}: {str(e).splitlines()[0]}"
                ) from None
            if resp is not None and resp.status >= 400:
                raise TalkstreamError(f"{page_url} answered HTTP {resp.status}")
            if not await page.evaluate("!!(window.talkstream && document.getElementById('start'))"):
                raise TalkstreamError(f"{page_url} is not the talkstream web client")
            user_agent = await page.evaluate("navigator.userAgent")
            t_click = await page.evaluate("performance.now()")
            await page.click("#start")
            try:
                await page.wait_for_function(
                    "talkstream.state === 'connected' || !!talkstream.error",
                    timeout=CONNECT_TIMEOUT_S * 1000,
                )
            except PlaywrightError:
                state = await page.evaluate("talkstream.state")
                raise TalkstreamError(
                    f"no WebRTC connection within {CONNECT_TIMEOUT_S:.0f} s (state {state}); "
                    "a server behind NAT needs ICE to reach this machine"
                ) from None
            err = await page.evaluate("talkstream.error")
            if err:
                raise TalkstreamError(f"the web client failed to start: {err}")
            t_connected = await page.evaluate("performance.now()")
            if not await page.evaluate("!!talkstream.mouthBox"):
                # An older server without mouth_box: the lower middle of the video.
                await page.evaluate(GUESS_MOUTH_BOX_JS)
                mouth_box_guessed = True
            else:
                mouth_box_guessed = False
            try:
                await page.wait_for_function(
                    "talkstream.presented.length > 0", timeout=FIRST_FRAME_TIMEOUT_S * 1000
                )
            except PlaywrightError:
                raise TalkstreamError(
                    f"connected, but no video frame within {FIRST_FRAME_TIMEOUT_S:.0f} s"
                ) from None
            t_first = float(await page.evaluate("talkstream.presented[0]"))
            polls: list[dict[str, Any]] = []
            presented: list[float] = []
            last = -1.0

            async def poll() -> dict[str, Any]:
                nonlocal last
                snap: dict[str, Any] = await page.evaluate(POLL_JS, last)
                presented.extend(snap.pop("presented"))
                if presented:
                    last = presented[-1]
                polls.append(snap)
                return snap

            await poll()
            t_window_end = t_first + 1000 * duration_s
            end_snap: dict[str, Any] | None = None
            while True:
                snap = await poll()
                if snap["error"]:
                    raise TalkstreamError(f"the web client reported: {snap['error']}")
                if snap["state"] in ("failed", "closed", "idle"):
                    raise TalkstreamError(f"the connection ended early (state {snap['state']})")
                if end_snap is None and snap["now"] >= t_window_end:
                    end_snap = snap
                if snap["now"] >= t_window_end + 1000 * TAIL_S:
                    break
                next_ms = t_window_end if end_snap is None else t_window_end + 1000 * TAIL_S
                await asyncio.sleep(min(1.0, max((next_ms - snap["now"]) / 1000, 0.02)))
            ts = await page.evaluate(
                "({probe: talkstream.probe, sessionId: talkstream.sessionId,"
                " budget: talkstream.budget, mouthBox: talkstream.mouthBox})"
            )
            trace = stats = None
            trace_status = 0
            if ts["sessionId"]:
                sid = urllib.parse.quote(str(ts["sessionId"]))
                got = await page.evaluate(FETCH_JSON_JS, f"/sessions/{sid}/trace")
                trace, trace_status = got["body"], got["status"]
                got = await page.evaluate(FETCH_JSON_JS, f"/sessions/{sid}/stats")
                stats = got["body"]
            # Hang up through the page: the server frees the session at once.
            with contextlib.suppress(PlaywrightError):
                await page.click("#stop", timeout=2_000)
                await asyncio.sleep(0.2)
        finally:
            await ctx.close()
    return {
        "user_agent": user_agent,
        "click_ms": t_click,
        "connected_ms": t_connected,
        "first_frame_ms": t_first,
        "window_ms": [t_first, float(end_snap["now"]) if end_snap else t_window_end],
        "presented": presented,
        "polls": polls,
        "probe": ts["probe"],
        "session_id": ts["sessionId"],
        "budget_ms": ts["budget"],
        "mouth_box": ts["mouthBox"],
        "mouth_box_guessed": mouth_box_guessed,
        "trace": trace,
        "trace_status": trace_status,
        "stats": stats,
    }
