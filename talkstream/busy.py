"""Tell the user, once, when other processes are what makes rendering slow.

A newcomer with a browser and a build running beside ``talkstream render`` saw a frame a second
and thought it broken. :class:`SlowdownHint` watches the frame rate in windows of a few seconds
and, with :class:`CpuShare`, how much of the CPU other processes took meanwhile; when the rate
falls under the real-time rate while others hold at least half a core, it says so in one line
with what to try. It never changes what runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from talkstream.config import FPS

# Other processes must hold at least this many cores (on average over a window) to be blamed.
MIN_OTHERS_CORES = 0.5
WINDOW_S = 3.0


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class CpuShare:
    """CPU time taken by other processes, from ``/proc/stat`` (the whole machine's busy time)
    less this process's own CPU time. Linux only; elsewhere :meth:`others_cores` is None."""

    def __init__(self, stat_path: Path = Path("/proc/stat")) -> None:
        self.stat_path = stat_path
        try:
            self._tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
        except (AttributeError, ValueError, OSError):
            self._tick_s = 0.01
        self._last = self._sample()

    def _machine_busy_s(self) -> float | None:
        try:
            with self.stat_path.open() as f:
                fields = f.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu":
            return None
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy
        # (steal too: a hypervisor's other guests took that time from this machine).
        values = [int(v) for v in fields[1:9]]
        values += [0] * (8 - len(values))
        busy = sum(values) - values[3] - values[4]
        return busy * self._tick_s

    def _sample(self) -> tuple[float, float, float] | None:
        busy = self._machine_busy_s()
        if busy is None:
            return None
        t = os.times()
        return time.monotonic(), busy, t.user + t.system

    def others_cores(self) -> float | None:
        """Cores other processes used on average since the previous call (or construction)."""
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        wall = now[0] - last[0]
        others = (now[1] - last[1]) - (now[2] - last[2])
        return max(0.0, others / wall)


class SlowdownHint:
    """Feed it the running count of frames; it calls ``say`` once when the rate collapses.

    Args:
        say: where the one line goes (a logger's ``warning``, ``print``...).
        threads: the compute threads in use (None: unknown); the advice depends on it.
        what: how the line names the rate ("rendering", "the live avatar shows").
        min_fps: the rate under which it speaks (default: real time, 25 fps).
        cpu: the CPU-share probe (tests pass one that reads a fake ``/proc/stat``).
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        say: Callable[[str], None],
        *,
        threads: int | None,
        what: str = "rendering",
        min_fps: float = FPS,
        window_s: float = WINDOW_S,
        cpu: CpuShare | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.say = say
        self.threads = threads
        self.what = what
        self.min_fps = min_fps
        self.window_s = window_s
        self.cpu = cpu if cpu is not None else CpuShare()
        self.clock = clock
        self.said: str | None = None
        self._t0 = clock()
        self._n0 = 0

    def update(self, frames: int) -> str | None:
        """``frames``: the total so far. Returns the hint if it was given by this call."""
        if self.said is not None:
            return None
        now = self.clock()
        if now - self._t0 < self.window_s:
            return None
        fps = (frames - self._n0) / (now - self._t0)
        self._t0, self._n0 = now, frames
        others = self.cpu.others_cores()
        if fps >= self.min_fps or others is None or others < MIN_OTHERS_CORES:
            return None
        cores = usable_cores()
        line = (
            f"{self.what} at {fps:.1f} fps: other processes are using {min(others, cores):.1f} "
            f"of the {cores} CPU cores; it speeds up when they finish (close them, or start "
            "them with `nice`)"
        )
        if self.threads is None or self.threads > 1:
            # Threads that wait on each other at every operator suffer most from a busy CPU.
            line += "; --threads 1 may help"
        self.said = line
        self.say(line)
        return line


__all__ = ["CpuShare", "SlowdownHint", "usable_cores"]
