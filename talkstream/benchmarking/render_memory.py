"""Peak memory of ``talkstream render`` against clip length (issue 3: flat in clip length).

Each clip length is rendered by a fresh ``talkstream render`` child process, whose own peak RSS
is read when it is reaped (:func:`memory.run_child_measuring_rss`). A render that kept frames
for the whole clip would grow by about 0.75 MiB per frame at 512x512 (1,500 frames a minute);
a streaming render stays within a few MiB whatever the length.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import talkstream
from talkstream.benchmarking.memory import run_child_measuring_rss
from talkstream.benchmarking.runner import MIB, speech_pcm
from talkstream.config import SAMPLE_RATE_HZ

# Peak growth from the shortest to the longest clip still called flat: allocator noise and
# encoder state, not per-frame buffers (those would be hundreds of MiB over a minute).
FLAT_GROWTH_FRACTION = 0.10


def run_render_memory(
    clips_s: list[float], engine_args: list[str], work_dir: Path, *, timeout_s: float = 900.0
) -> dict[str, Any]:
    """Render each clip length in a child process; JSON-ready peak RSS per clip."""
    import soundfile as sf

    if not clips_s:
        raise ValueError("no clip lengths given")
    work_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The child must import this same talkstream, installed or not.
    pkg_root = str(Path(talkstream.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    runs = []
    for clip in sorted(clips_s):
        wav = work_dir / f"clip_{clip:g}s.wav"
        sf.write(str(wav), speech_pcm(int(clip * SAMPLE_RATE_HZ)), SAMPLE_RATE_HZ)
        out = work_dir / f"clip_{clip:g}s.mp4"
        cmd = [
            sys.executable,
            "-m",
            "talkstream.cli",
            "render",
            "--audio",
            str(wav),
            "--out",
            str(out),
            "--no-progress",
            "--no-cache",
            *engine_args,
        ]
        log = work_dir / f"render_{clip:g}s.log"
        entry: dict[str, Any] = {"clip_s": clip, "command": " ".join(cmd), "log": str(log)}
        try:
            child = run_child_measuring_rss(cmd, log, timeout_s, env=env)
        except subprocess.TimeoutExpired:
            entry.update(returncode=None, error=f"timed out after {timeout_s:.0f} s")
        else:
            entry.update(
                returncode=child.returncode,
                max_rss_mib=round(child.max_rss_bytes / MIB, 1),
                wall_s=round(child.wall_s, 2),
            )
        runs.append(entry)
        wav.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    ok = [r for r in runs if r.get("returncode") == 0]
    result: dict[str, Any] = {"runs": runs, "growth_mib": None, "flat": None}
    if len(ok) >= 2:
        lo, hi = ok[0]["max_rss_mib"], ok[-1]["max_rss_mib"]
        result["growth_mib"] = round(hi - lo, 1)
        result["growth_ratio"] = hi / lo
        result["flat"] = (hi - lo) <= FLAT_GROWTH_FRACTION * lo
    return result
