"""The media clock: one per avatar stream, shared by its audio and video tracks.

Media time is a sample counter on one timeline at 48 kHz (the WebRTC audio rate): timeline
sample ``s`` is the ``s``-th sample of speech (or of the silence filled in between) that the
stream's session was fed, and video frame ``i`` shows timeline samples
``[1920 i, 1920 (i + 1))``. The clock maps that timeline to wall time:

    input sample ``s`` is due to arrive at   ``t0 + s / 48000``
    output sample ``s`` (and the frame that holds it) plays at ``t0 + s / 48000 + delay_s``

so the avatar's audio track replays the speech exactly ``delay_s`` late, the video shows each
frame at the same delay, and lips and voice line up by construction: both tracks read one
timeline through one mapping, and neither counts anything of its own.

``delay_s`` is the latency budget: the pipeline's algorithmic latency (lookahead, the motion
token's future rows, half an STFT window), plus time for the input to arrive (jitter) and time
to render. When a sender's clock runs slightly fast or slow against ours, :meth:`observe_input`
moves ``t0`` slowly (a slew) so the budget stays what it was; both tracks follow the same ``t0``,
so A/V sync is unaffected, and only the latency breathes by a few milliseconds.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from fractions import Fraction

from talkstream.config import FPS

OUT_RATE_HZ = 48_000  # timeline and output audio rate (what Opus runs at)
AUDIO_PTIME_SAMPLES = 960  # 20 ms audio frames, as WebRTC packetises them
SAMPLES_PER_FRAME_48K = OUT_RATE_HZ // FPS  # 1920 = 40 ms
VIDEO_CLOCK_HZ = 90_000  # RTP video clock
VIDEO_PTS_PER_FRAME = VIDEO_CLOCK_HZ // FPS  # 3600
AUDIO_TIME_BASE = Fraction(1, OUT_RATE_HZ)
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK_HZ)

# Drift correction: how far the input may run early or late against the clock before t0 slews,
# and how fast it slews (seconds per second; 0.5 % is far below what a listener hears and far
# above any real clock drift, which is ~1e-4).
DRIFT_DEADBAND_S = 0.005
MAX_SLEW_S_PER_S = 0.005
# Window over which the earliest arrival is taken as the input's true position: network jitter
# only ever delays packets, so the minimum lateness is the clock offset.
DRIFT_WINDOW_S = 5.0
# For this long after the first input, t0 steps to the earliest arrival at once instead of
# slewing: a connection starts with a burst of queued packets (handshakes, the receiver's
# prefetch), and the first packet, which anchored the clock, was the latest of them.
SETTLE_S = 2.0


class MediaClock:
    """Timeline samples <-> wall time, for one stream.

    Args:
        delay_s: output delay behind the input (the latency budget), >= 0.
        now: the wall clock (monotonic seconds); tests pass a fake one.
        start: wall time of timeline sample 0 (default: now).
    """

    def __init__(
        self,
        delay_s: float,
        *,
        now: Callable[[], float] = time.monotonic,
        start: float | None = None,
    ) -> None:
        if not delay_s >= 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s!r}")
        self.delay_s = float(delay_s)
        self.now = now
        self.t0 = now() if start is None else float(start)
        self.slewed_s = 0.0  # total t0 correction so far (drift, anchoring)
        # (wall time, implied t0) of recent input, for the drift estimate.
        self._arrivals: deque[tuple[float, float]] = deque()
        self._last_slew_at: float | None = None
        self._first_input_at: float | None = None

    # -- mapping ------------------------------------------------------------------------------

    def input_position(self, at: float | None = None) -> float:
        """Timeline sample that is due to have arrived by wall time ``at`` (default now)."""
        t = self.now() if at is None else at
        return (t - self.t0) * OUT_RATE_HZ

    def play_time(self, sample: int) -> float:
        """Wall time at which timeline ``sample`` plays on the output tracks."""
        return self.t0 + sample / OUT_RATE_HZ + self.delay_s

    def frame_time(self, index: int) -> float:
        """Wall time at which video frame ``index`` is shown (its first sample plays)."""
        return self.play_time(index * SAMPLES_PER_FRAME_48K)

    def output_position(self, at: float | None = None) -> float:
        """Timeline sample playing on the output at wall time ``at`` (default now)."""
        t = self.now() if at is None else at
        return (t - self.t0 - self.delay_s) * OUT_RATE_HZ

    def frame_on_screen(self, at: float | None = None) -> int:
        """Index of the video frame whose display interval holds ``at`` (may be negative)."""
        return math.floor(self.output_position(at) / SAMPLES_PER_FRAME_48K)

    def first_live_frame(self, at: float | None = None) -> int:
        """The first frame whose display time has not passed: earlier ones are not worth
        rendering any more."""
        return math.ceil(self.output_position(at) / SAMPLES_PER_FRAME_48K)

    @staticmethod
    def video_pts(index: int) -> int:
        """RTP video timestamp (90 kHz) of frame ``index``: the same media time as its audio."""
        return index * VIDEO_PTS_PER_FRAME

    # -- waiting ------------------------------------------------------------------------------

    async def sleep_until(self, wall: float) -> float:
        """Sleep until wall time ``wall``; returns how late we woke (s, >= 0 if on time)."""
        delay = wall - self.now()
        if delay > 0:
            await asyncio.sleep(delay)
        return self.now() - wall

    # -- drift --------------------------------------------------------------------------------

    def observe_input(self, end_sample: int, at: float | None = None) -> None:
        """Input up to timeline ``end_sample`` (exclusive) arrived at wall time ``at``.

        Keeps the earliest lateness over the last few seconds; when it leaves the deadband,
        ``t0`` moves toward it: at once while the stream settles (``SETTLE_S``), then at a
        bounded rate.
        """
        t = self.now() if at is None else at
        # The t0 this arrival implies; lateness against the current t0 is ``implied - t0``.
        implied = t - end_sample / OUT_RATE_HZ
        arr = self._arrivals
        # A monotonic deque of minima: O(1) amortised sliding-window minimum.
        while arr and arr[-1][1] >= implied:
            arr.pop()
        arr.append((t, implied))
        while arr and arr[0][0] < t - DRIFT_WINDOW_S:
            arr.popleft()
        last = self._last_slew_at
        self._last_slew_at = t
        if self._first_input_at is None:
            self._first_input_at = t
        offset = arr[0][1] - self.t0
        if abs(offset) <= DRIFT_DEADBAND_S or last is None:
            return
        if t - self._first_input_at < SETTLE_S:
            step = offset
        else:
            step = math.copysign(min(abs(offset), MAX_SLEW_S_PER_S * max(t - last, 0.0)), offset)
        self.t0 += step
        self.slewed_s += step


__all__ = [
    "AUDIO_PTIME_SAMPLES",
    "AUDIO_TIME_BASE",
    "OUT_RATE_HZ",
    "SAMPLES_PER_FRAME_48K",
    "VIDEO_CLOCK_HZ",
    "VIDEO_PTS_PER_FRAME",
    "VIDEO_TIME_BASE",
    "MediaClock",
]
