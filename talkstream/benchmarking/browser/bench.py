"""``talkstream bench --browser URL``: check the server, record one session in Chromium,
analyse it, write the outputs. ``URL`` may be ``local`` (a server started in this process,
:func:`talkstream.benchmarking.local.local_server`)."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from talkstream.benchmarking.browser.analysis import analyse, rounded
from talkstream.benchmarking.browser.harness import check_browser_tools, record
from talkstream.benchmarking.browser.report import write_outputs
from talkstream.benchmarking.browser.speech import prepare_mic_wav
from talkstream.benchmarking.local import LANDMARK_GAIN, local_server
from talkstream.errors import TalkstreamError

if TYPE_CHECKING:
    from talkstream.config import EngineConfig

log = logging.getLogger("talkstream.bench.browser")

SCHEMA = "talkstream-browser-bench/1"
LOCAL = "local"  # the URL that asks for a server started in this process
DEFAULT_DURATION_S = 20.0
HTTP_TIMEOUT_S = 5.0


# ----------------------------------------------------------------------------- the server


def client_urls(url: str) -> tuple[str, str]:
    """``(base, page)``: the server's origin and the web client with the probe on."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TalkstreamError(f"--browser needs an http(s) URL of a talkstream server, got {url!r}")
    query = urllib.parse.parse_qs(parts.query)
    if "presenter" in query:
        raise TalkstreamError(
            "a presenter page has no microphone: point --browser at the live client "
            "(the server's root URL)"
        )
    base = f"{parts.scheme}://{parts.netloc}"
    return base, f"{base}/?probe=1"


def _get(url: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"User-Agent": "talkstream-bench"})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), b""


def check_server(base: str) -> dict[str, Any] | None:
    """Is a talkstream web client served at ``base``? Returns ``/health`` when it answers."""
    try:
        status, body = _get(base + "/")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TalkstreamError(
            f"cannot reach {base}/: {reason}. Is a talkstream server running there "
            "(talkstream serve), or use --browser local to start one"
        ) from None
    if status != 200 or b"talkstream" not in body or b'id="start"' not in body:
        raise TalkstreamError(
            f"{base}/ does not serve the talkstream web client (HTTP {status}); "
            "point --browser at the address `talkstream serve` prints"
        )
    try:
        status, body = _get(base + "/health")
        health = json.loads(body) if status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        health = None
    if isinstance(health, dict) and health.get("accepting") is False:
        raise TalkstreamError(
            f"the server at {base} is full ({health.get('sessions')} sessions of "
            f"{health.get('max_sessions')}): try again later"
        )
    return health if isinstance(health, dict) else None


# ----------------------------------------------------------------------------- the benchmark


def run_browser_bench(
    url: str,
    out_dir: Path,
    duration_s: float = DEFAULT_DURATION_S,
    speech_wav: Path | None = None,
    *,
    engine_config: EngineConfig | None = None,
    landmark_gain: float = LANDMARK_GAIN,
) -> dict[str, Any]:
    """Measure glass-to-glass latency and fps in headless Chromium against ``url``.

    Args:
        url: a talkstream server (its root, e.g. ``http://host:8080``), or ``"local"`` to
            start one in this process from ``engine_config`` (see
            :func:`talkstream.benchmarking.local.local_engine`).
        out_dir: gets ``speech.wav`` (the fake microphone), ``browser.json`` (this result),
            ``browser-raw.json`` (what the page recorded) and ``browser.md`` (the table).
        duration_s: seconds measured from the first presented frame.
        speech_wav: the fake microphone's loop (speech bursts separated by >= 0.4 s of
            silence); default: espeak-ng phrases.

    Returns:
        The JSON-ready result (also in ``browser.json``).
    """
    if not duration_s > 0:
        raise TalkstreamError(f"--duration must be positive, got {duration_s}")
    out_dir = Path(out_dir)
    local = url.strip().lower() == LOCAL
    if local:
        chromium = check_browser_tools()
        out_dir.mkdir(parents=True, exist_ok=True)
        wav, mic_info = prepare_mic_wav(speech_wav, out_dir)
        log.info("starting a local talkstream server")
        with local_server(engine_config, landmark_gain) as (served, info):
            health = check_server(served)
            result = _measure(served, chromium, wav, mic_info, duration_s, out_dir, health)
        result["url"] = LOCAL
        result["local_server"] = info
    else:
        base, _ = client_urls(url)
        health = check_server(base)  # the most likely mistake first, before any launch
        chromium = check_browser_tools()
        out_dir.mkdir(parents=True, exist_ok=True)
        wav, mic_info = prepare_mic_wav(speech_wav, out_dir)
        result = _measure(url, chromium, wav, mic_info, duration_s, out_dir, health)
    write_outputs(result, out_dir)
    return result


def _measure(
    url: str,
    chromium: str,
    wav: Path,
    mic_info: dict[str, Any],
    duration_s: float,
    out_dir: Path,
    health: dict[str, Any] | None,
) -> dict[str, Any]:
    """One recorded session against ``url``, analysed (the result less its outputs)."""
    _, page = client_urls(url)
    log.info("Chromium against %s for %.0f s", page, duration_s)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="talkstream-chromium-") as profile:
        raw = asyncio.run(record(page, chromium, wav, duration_s, Path(profile)))
    (out_dir / "browser-raw.json").write_text(json.dumps(raw))
    res = analyse(raw)
    if raw["mouth_box_guessed"]:
        res["notes"].append("the server sent no mouth_box: the lower middle of the video is used")
    if raw["trace"] is None and raw["session_id"]:
        res["notes"].append(
            f"no server trace (/sessions/{{id}}/trace answered HTTP {raw['trace_status']})"
        )
    window_s = (raw["window_ms"][1] - raw["window_ms"][0]) / 1000
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "url": url,
        "page": page,
        "server": health,
        "browser": {"chromium": chromium, "user_agent": raw["user_agent"]},
        "mic": mic_info,
        "duration_s": round(window_s, 2),
        "wall_s": round(time.perf_counter() - wall, 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "connect_ms": rounded(raw["connected_ms"] - raw["click_ms"], 1),
        "first_frame_ms": rounded(raw["first_frame_ms"] - raw["click_ms"], 1),
        "session_id": raw["session_id"],
        "latency_budget_ms": raw["budget_ms"],
        **res,
    }
