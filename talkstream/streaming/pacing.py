"""Audio-clocked, drop-late pacing: one session's rendered frames to 25 output slots a second.

Both live paths show a session's frame ``k`` in output slot ``k`` and take their time from the
audio: ``talkstream live`` (:class:`~talkstream.streaming.live.LiveLoop`) from the microphone's
sample counter, a served stream (:class:`~talkstream.streaming.tracks.AvatarStream`) from its
:class:`~talkstream.streaming.clock.MediaClock`. The rule they share lives here:

- slot ``k`` falls due when the clock's display position reaches ``k``; a due slot shows the
  newest frame rendered up to ``k``, else the previous one again: a slot never waits;
- a frame that cannot be ready by its slot is skipped, never rendered, so a slow renderer falls
  back to a lower frame rate instead of an ever-growing delay, and the clock is never held up;
- "ready by its slot" may allow for the render itself: an estimate (EMA) of how long one takes.
  The estimate learns only from frames that render, so after a slow spell every frame could
  look hopeless and nothing would correct it: while none has rendered for a while, an estimate
  above the compute budget decays toward it and frames are tried again.

The pacer reads no clock itself. Callers pass a clock reading ``now`` (seconds, in the clock's
own domain: wall time for a ``MediaClock``, captured audio seconds for ``LiveLoop``) and, once,
a ``position`` mapping from a reading to the display position in frames (``k.0`` when slot
``k`` falls due). So it is deterministic, and its tests drive it with plain numbers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

F = TypeVar("F")

# Weight of the newest render time in the estimate.
RENDER_EMA_ALPHA = 0.1
# With no frame rendered for this long, an over-budget estimate decays by RELAX_FACTOR at each
# relax() call (the stream calls it every 20 ms tick: about halfway back in 60 ms).
RELAX_AFTER_S = 0.2
RELAX_FACTOR = 0.8


@dataclass
class PacerCounts:
    """What the pacer saw: frames added, slots shown, and of those, fresh or repeated."""

    added: int = 0
    shown: int = 0
    fresh: int = 0  # slots showing a frame for the first time
    repeated: int = 0  # slots showing an earlier frame again (or none rendered yet)


class FramePacer(Generic[F]):
    """Rendered frames waiting for their slots, and the rule that drops late ones.

    Args:
        position: clock reading -> display position in frames (slot ``k`` is due at ``k``).
        budget_s: the compute budget; an estimate above it decays while nothing renders.
        allow_for_render: count the render-time estimate when judging whether a frame can
            still make its slot. True where outputs send each slot on time without waiting
            (the WebRTC tracks); False where the loop that renders also sends, right after the
            render that finished a frame (``LiveLoop``: a frame whose slot is not yet due still
            goes out in it, at most one render late).
        keep: rendered frames held at most (the oldest go first); None: unbounded.
        started_at: clock reading at creation (the relax timer starts there).
    """

    def __init__(
        self,
        position: Callable[[float], float],
        *,
        budget_s: float = 0.0,
        allow_for_render: bool = True,
        keep: int | None = None,
        started_at: float = 0.0,
    ) -> None:
        if not budget_s >= 0:
            raise ValueError(f"budget_s must be >= 0, got {budget_s!r}")
        self.position = position
        self.budget_s = float(budget_s)
        self.allow_for_render = allow_for_render
        self.render_s = 0.0  # the estimate of one render, seconds (EMA)
        self.counts = PacerCounts()
        self._frames: deque[tuple[int, F]] = deque(maxlen=keep)  # ascending pts
        self._shown_until = 0  # slots before it have been shown: their frames are worthless
        self._last_fresh = -1  # pts of the newest frame shown so far
        self._last_render_at = started_at

    # -- the render side ----------------------------------------------------------------------

    def first_worth_rendering(self, now: float) -> int:
        """The first frame that can still make its slot: earlier ones are to be skipped."""
        eta = now + self.render_s if self.allow_for_render else now
        return max(self._shown_until, math.ceil(self.position(eta)))

    def add(self, pts: int, frame: F, now: float, render_s: float | None = None) -> None:
        """A frame rendered, at clock reading ``now``, taking ``render_s``."""
        while self._frames and self._frames[-1][0] >= pts:
            self._frames.pop()  # rendered again (after a cut): the new one replaces it
        self._frames.append((pts, frame))
        self.counts.added += 1
        self._last_render_at = now
        if render_s is not None:
            self.render_s += RENDER_EMA_ALPHA * (render_s - self.render_s)

    def relax(self, now: float) -> None:
        """Let an over-budget estimate decay while no frame renders (call it periodically)."""
        if self.render_s > self.budget_s and now - self._last_render_at > RELAX_AFTER_S:
            self.render_s = self.budget_s + RELAX_FACTOR * (self.render_s - self.budget_s)

    # -- the display side ---------------------------------------------------------------------

    def due(self, now: float) -> int:
        """The newest slot due at ``now`` (negative before slot 0)."""
        return math.floor(self.position(now))

    def show(self, index: int) -> tuple[F | None, bool]:
        """What slot ``index`` shows: the newest frame rendered up to it (None: nothing yet),
        and whether that frame is shown for the first time."""
        frames = self._frames
        while len(frames) >= 2 and frames[1][0] <= index:
            frames.popleft()  # older than the newest one due: never shown again
        self._shown_until = max(self._shown_until, index + 1)
        c = self.counts
        c.shown += 1
        if frames and frames[0][0] <= index:
            pts, frame = frames[0]
            fresh = pts > self._last_fresh
            if fresh:
                self._last_fresh = pts
                c.fresh += 1
            else:
                c.repeated += 1
            return frame, fresh
        c.repeated += 1
        return None, False

    # -- interruption and inspection ----------------------------------------------------------

    def drop_from(self, index: int) -> None:
        """Forget the frames from ``index`` on (they are rendered again after a cut)."""
        while self._frames and self._frames[-1][0] >= index:
            self._frames.pop()
        self._last_fresh = min(self._last_fresh, index - 1)

    def clear(self) -> None:
        self._frames.clear()

    @property
    def frames(self) -> list[F]:
        """The frames held, oldest first: the one on screen (if any), then those waiting."""
        return [f for _, f in self._frames]

    def newest(self) -> F | None:
        return self._frames[-1][1] if self._frames else None


__all__ = ["RELAX_AFTER_S", "RELAX_FACTOR", "RENDER_EMA_ALPHA", "FramePacer", "PacerCounts"]
