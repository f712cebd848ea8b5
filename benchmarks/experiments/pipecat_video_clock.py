"""Does pipecat's SmallWebRTC video clock cost lip sync? (issue 12; result in RESULTS.md)

    python benchmarks/experiments/pipecat_video_clock.py fix|orig

pipecat's ``RawVideoTrack`` stamps frames with aiortc's 30 fps clock while the service sends 25
fps. ``fix`` swaps in a track stamped 3600 ticks (40 ms) per frame, ``orig`` keeps pipecat's;
then runs the pipecat path of ``benchmarks/browser_lipsync.py`` (25 s to headless Chromium)
and prints dlib's mouth against the voice the page heard. Run the two alternately.
"""

from __future__ import annotations

import asyncio
import fractions
import sys
import tempfile
from pathlib import Path

import numpy as np
import pipecat.transports.smallwebrtc.transport as transport
from av import VideoFrame

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import browser_lipsync as bl

from talkstream.benchmarking.lipsync import MouthMeter


class FrameClockVideoTrack(transport.RawVideoTrack):  # type: ignore[misc]
    """pipecat's track, stamped 40 ms per frame (the service's own frame rate)."""

    async def recv(self) -> VideoFrame:
        raw = await self._video_buffer.get()
        rgb = np.frombuffer(raw.image, dtype=np.uint8).reshape((self._height, self._width, 3))
        frame = VideoFrame.from_ndarray(rgb, format="rgb24")
        n = getattr(self, "_n", 0)
        self._n = n + 1
        frame.pts, frame.time_base = n * 3600, fractions.Fraction(1, 90_000)
        return frame


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "orig"
    if variant == "fix":
        transport.RawVideoTrack = FrameClockVideoTrack
    with tempfile.TemporaryDirectory() as tmp:
        raw = asyncio.run(bl.pipecat_run(25, "/usr/bin/chromium", Path(tmp)))
    print(variant, bl.analyse_pipecat(raw, MouthMeter()))


if __name__ == "__main__":
    main()
