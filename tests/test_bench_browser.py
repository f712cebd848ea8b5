"""``talkstream bench --browser URL``: the glass-to-glass harness.

The end-to-end test serves a real talkstream server on 127.0.0.1 (in a thread of this process)
and points the harness at it: headless Chromium, a fake microphone looping espeak-ng phrases,
the web client's probe. Random weights get the landmark gain of tests/test_browser.py so the
mouth's motion survives VP8, and idle motion is off, so the mouth moves only with speech.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from talkstream.benchmarking import browser
from talkstream.benchmarking.browser import harness
from talkstream.errors import TalkstreamError

STREAM_S = 8.0
MIN_FPS = 15.0  # 25 nominal; the 2-core CI machine shares its cores with Chromium and others


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- no browser needed


def test_unreachable_url_is_a_clear_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TalkstreamError, match=r"cannot reach http://127\.0\.0\.1:\d+/.*serve"):
        browser.run_browser_bench(url, tmp_path / "out", duration_s=1)
    assert not (tmp_path / "out").exists()  # nothing launched, nothing written


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(TalkstreamError, match="http"):
        browser.run_browser_bench("ftp://example.org", tmp_path)
    with pytest.raises(TalkstreamError, match="presenter"):
        browser.client_urls("http://127.0.0.1:8080/?presenter=alice")
    with pytest.raises(TalkstreamError, match="duration"):
        browser.run_browser_bench("http://127.0.0.1:1", tmp_path, duration_s=0)
    assert browser.client_urls("localhost:8080/") == (
        "http://localhost:8080",
        "http://localhost:8080/?probe=1",
    )


def test_missing_chromium_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "find_chromium", lambda: None)
    monkeypatch.delenv(harness.CHROMIUM_ENV, raising=False)
    if importlib.util.find_spec("playwright") is None:
        with pytest.raises(TalkstreamError, match="pip install playwright"):
            harness.check_browser_tools()
    else:
        with pytest.raises(TalkstreamError, match="apt-get install chromium"):
            harness.check_browser_tools()


def test_cli_reports_an_unreachable_url(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from talkstream.cli import main

    url = f"http://127.0.0.1:{free_port()}"
    code = main(["bench", "--browser", url, "--duration", "2", "--out", str(tmp_path)])
    assert code == 2
    assert f"cannot reach {url}/" in capsys.readouterr().err


def synthetic_recording(latency_s: float, seconds: float = 12.0) -> dict[str, Any]:
    """What the page would record: 25 fps, speech bursts at the mic every 3 s from 1.5 s (1 s
    long), the mouth moving ``latency_s`` and the voice ``latency_s + 0.02`` later."""
    rng = np.random.default_rng(0)
    frames = np.arange(0.0, seconds, 0.04)
    bursts = np.arange(1.5, seconds - 1.5, 3.0)

    def speaking(t: np.ndarray, delay: float) -> np.ndarray:
        return np.any([(t >= b + delay) & (t < b + delay + 1.0) for b in bursts], axis=0)

    ticks = np.arange(0.0, seconds, 0.005)
    mic = np.where(speaking(ticks, 0.0), 0.1, 0.0005)
    voice = np.where(speaking(ticks, latency_s + 0.02), 0.1, 0.0005)
    mouth = np.where(speaking(frames, latency_s), 2.0, 0.01) + 0.005 * rng.random(frames.size)
    polls = [
        {"now": 1000 * t, "video": {"framesDecoded": 25 * t, "framesReceived": 25 * t}}
        for t in np.arange(0.0, seconds, 1.0)
    ]
    return {
        "window_ms": [0.0, 1000 * (seconds - browser.TAIL_S)],
        "presented": list(1000 * frames),
        "polls": polls,
        "probe": {
            "mic": np.c_[1000 * ticks, mic].tolist(),
            "voice": np.c_[1000 * ticks, voice].tolist(),
            "mouth": np.c_[1000 * frames, mouth, np.zeros_like(frames)].tolist(),
        },
        "trace": None,
        "stats": None,
    }


def test_analysis_of_a_synthetic_recording() -> None:
    res = browser.analyse(synthetic_recording(latency_s=0.3))
    lat = res["latency"]
    assert lat["bursts_at_mic"] == 3 and lat["matched"] == 3, lat  # at 1.5, 4.5 and 7.5 s
    assert abs(lat["mic_to_mouth_ms"]["p50"] - 300) <= 45, lat  # one 40 ms frame
    assert abs(lat["mic_to_voice_ms"]["p50"] - 320) <= 10, lat
    assert abs(res["fps"]["presented_mean"] - 25) < 0.1
    assert abs(res["fps"]["decoded_worst_5s"] - 25) < 0.1
    assert res["frames"]["freezes"] == 0
    assert res["server_side"] is None


# ----------------------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def gained_engine(default_avatar: Any) -> Iterator[Any]:
    """The engine ``--browser local`` uses: the shipped tiny model (random weights with the
    landmark gain when no checkpoint is shipped), idle motion off, warmed up.

    One torch thread while it serves: Chromium decodes and aiortc encodes on the same two
    cores, and two torch threads on busy cores spin-wait (rendering gets many times slower).
    """
    pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")
    import torch

    from talkstream.config import EngineConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = browser.local_engine(EngineConfig(preset="tiny"))
    try:
        eng.warmup(default_avatar)
        yield eng
    finally:
        eng.close()
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None,
    reason="Python playwright is not installed (pip install playwright)",
)
@pytest.mark.skipif(
    browser.find_chromium() is None,
    reason="no Chromium (apt-get install chromium, or set TALKSTREAM_CHROMIUM)",
)
@pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not installed (apt-get install espeak-ng)",
)
@pytest.mark.realtime
def test_browser_bench_against_a_running_server(
    gained_engine: Any, default_avatar: Any, tmp_path: Path
) -> None:
    with browser.serve_in_background(gained_engine, default_avatar) as url:
        res = browser.run_browser_bench(url, tmp_path, duration_s=STREAM_S)
    # The shipped checkpoint when present, else random weights (with the landmark gain).
    assert res["server"] and res["server"]["random_weights"] is gained_engine.random_init
    assert res["duration_s"] >= STREAM_S - 0.5
    fps = res["fps"]
    assert fps["presented_mean"] >= MIN_FPS, fps
    assert fps["decoded_mean"] is not None and fps["decoded_mean"] >= MIN_FPS, fps
    assert fps["presented_worst_5s"] > 0, fps
    lat = res["latency"]
    assert lat["matched"] >= 1, (lat, res["notes"])
    p50 = lat["mic_to_mouth_ms"]["p50"]
    assert np.isfinite(p50) and 0 < p50 < 1000 * browser.MAX_LATENCY_S, lat
    # The server is talkstream: its trace and budget split the latency. The budget read from
    # the trace is the stream's: the engine's algorithmic latency plus serve's default jitter
    # and compute budgets.
    ss = res["server_side"]
    assert ss is not None, res["notes"]
    from talkstream.streaming.config import StreamConfig

    sc = StreamConfig()
    want = gained_engine.session(default_avatar).latency_s * 1000
    want += sc.jitter_budget_ms + sc.compute_budget_ms
    assert ss["budget_ms"]["total"] == pytest.approx(want, abs=0.1), ss["budget_ms"]
    # The outputs.
    assert (tmp_path / "speech.wav").is_file()
    md = (tmp_path / "browser.md").read_text()
    assert "mic-to-mouth p50 / p90" in md and f"{p50:.0f} / " in md
    assert (tmp_path / "browser.json").is_file() and (tmp_path / "browser-raw.json").is_file()
