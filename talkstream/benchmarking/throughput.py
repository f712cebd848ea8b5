"""Throughput: how many concurrent 25 fps sessions one device sustains without dropping frames.

Every 40 ms tick each session receives 40 ms of audio and has one frame due; the due frames of
all sessions are rendered in one ``Engine.render`` call (one batched motion call and one batched
denoiser call, as the pipeline does for sessions that share an avatar). What a tick costs is
the engine worker's work: the audio pushes plus that render call. Colour conversion and encoding
are left out: a server runs them on other cores (or NVENC), not on the inference worker;
``talkstream bench`` reports their cost per frame separately.

The search has two parts:

1. ``search_max_sessions``: unpaced probes of the tick time at N sessions, doubling N while
   the tick's p90 fits the 40 ms budget, then bisecting. Cheap and deterministic given a probe.
2. ``paced_run``: the candidate N is run against the real clock for a few seconds with the
   server's drop rule (a frame not rendered by its deadline, the next tick, is dropped). If any
   frame drops, N - 1 is tried, a few times at most. ``sessions_per_device`` is the confirmed N.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from talkstream.benchmarking.runner import Feeder, speech_pcm, take_ready
from talkstream.benchmarking.timing import summarize
from talkstream.config import FPS
from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from talkstream.kernels import reference_kernels

FRAME_S = 1.0 / FPS
MAX_CONFIRM_ATTEMPTS = 3


@dataclass
class Probe:
    """Tick times measured at ``sessions`` concurrent sessions (seconds)."""

    sessions: int
    tick_s: list[float]

    @property
    def p50(self) -> float:
        return float(np.percentile(self.tick_s, 50))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.tick_s, 90))

    @property
    def capacity_fps(self) -> float:
        """Frames per second this batch size reaches when run back to back (unpaced)."""
        return self.sessions / self.p50

    def to_dict(self, budget_s: float) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "tick": summarize(self.tick_s).to_dict(),
            "capacity_fps": self.capacity_fps,
            "demand_fps": self.sessions * FPS,
            "fits_budget": self.p90 <= budget_s,
        }


@dataclass
class SearchResult:
    max_sessions: int  # largest N whose tick p90 fits the budget (0 if not even one)
    probes: dict[int, Probe] = field(default_factory=dict)


def search_max_sessions(
    probe: Callable[[int], Probe], *, budget_s: float = FRAME_S, max_sessions: int = 64
) -> SearchResult:
    """Largest N in 1..max_sessions with ``probe(N).p90 <= budget_s``, by doubling then bisection.

    Assumes tick time grows with N (more frames per call never makes a call faster).
    """
    if max_sessions < 1:
        raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
    if budget_s <= 0:
        raise ValueError(f"budget_s must be positive, got {budget_s}")
    probes: dict[int, Probe] = {}

    def fits(n: int) -> bool:
        if n not in probes:
            probes[n] = probe(n)
        return probes[n].p90 <= budget_s

    if not fits(1):
        return SearchResult(0, probes)
    good, bad = 1, None
    while bad is None:
        nxt = min(good * 2, max_sessions)
        if nxt == good:
            break
        if fits(nxt):
            good = nxt
        else:
            bad = nxt
    if bad is not None:
        while bad - good > 1:
            mid = (good + bad) // 2
            if fits(mid):
                good = mid
            else:
                bad = mid
    return SearchResult(good, probes)


class SessionPool:
    """Sessions on one engine and avatar, created on demand, each with its own audio."""

    def __init__(
        self,
        engine: Engine,
        avatar: Avatar,
        *,
        seconds_per_session: float,
        seed: int = 0,
        lookahead: int | None = None,
    ) -> None:
        self.engine = engine
        self.avatar = avatar
        self.seed = seed
        self.lookahead = lookahead
        self.speech = speech_pcm(int((seconds_per_session + 2) * 16_000))
        self.feeders: list[Feeder] = []

    def get(self, n: int) -> list[Feeder]:
        """``n`` sessions, each with exactly its next frame due."""
        while len(self.feeders) < n:
            i = len(self.feeders)
            s = self.engine.session(self.avatar, seed=self.seed + i, lookahead=self.lookahead)
            s.max_batch = 1
            offset = (i * 5923) % self.speech.shape[0]
            f = Feeder(s, np.roll(self.speech, -offset))
            # A new session's first frame needs the lookahead's audio first.
            f.feed(1)
            self.feeders.append(f)
        return self.feeders[:n]


def tick(engine: Engine, feeders: list[Feeder]) -> int:
    """One unpaced tick: 40 ms of audio per session, then one render of all due frames."""
    for f in feeders:
        f.feed(1)
    items = take_ready(feeders)
    engine.render(items)
    return len(items)


def make_probe(
    engine: Engine, pool: SessionPool, *, ticks: int, warmup: int = 2
) -> Callable[[int], Probe]:
    def probe(n: int) -> Probe:
        feeders = pool.get(n)
        for _ in range(warmup):
            tick(engine, feeders)
        times = []
        for _ in range(ticks):
            t0 = time.perf_counter()
            tick(engine, feeders)
            times.append(time.perf_counter() - t0)
        return Probe(n, times)

    return probe


def paced_run(engine: Engine, feeders: list[Feeder], *, seconds: float) -> dict[str, Any]:
    """Run ``len(feeders)`` sessions against the clock at 25 fps with drop-by-deadline.

    Tick ``k`` is due at ``t0 + k * 40 ms``; its frames' deadline is the next tick. A frame whose
    deadline has passed before its render starts is dropped unrendered (its session skips it, as
    a server behind real time does); one that finishes after its deadline is counted late, which
    a server also drops.
    """
    n_ticks = max(int(round(seconds * FPS)), 1)
    t0 = time.perf_counter() + 0.01
    rendered = dropped = late = 0
    render_s: list[float] = []
    for k in range(n_ticks):
        due = t0 + k * FRAME_S
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        for f in feeders:
            f.feed(1)
        items = take_ready(feeders)
        deadline = due + FRAME_S
        start = time.perf_counter()
        if start >= deadline:
            dropped += len(items)
            continue
        engine.render(items)
        end = time.perf_counter()
        render_s.append(end - start)
        rendered += len(items)
        if end > deadline:
            late += len(items)
    return {
        "sessions": len(feeders),
        "seconds": seconds,
        "ticks": n_ticks,
        "frames_rendered": rendered,
        "frames_dropped": dropped,
        "frames_late": late,
        "render": summarize(render_s).to_dict() if render_s else None,
        "sustained": dropped == 0 and late == 0,
    }


def run_throughput(
    engine: Engine,
    avatar: Avatar,
    *,
    max_sessions: int = 64,
    ticks: int = 8,
    confirm_seconds: float = 2.0,
    seed: int = 0,
    lookahead: int | None = None,
    reference: bool = False,
) -> dict[str, Any]:
    """Search, then confirm against the clock; JSON-ready result."""
    # Audio for every probe (warm-up + ticks each) and the confirmation runs.
    per_session_s = (
        (ticks + 2) * FRAME_S * 2 * max(max_sessions.bit_length(), 1)
        + MAX_CONFIRM_ATTEMPTS * (confirm_seconds + 0.5)
        + 2
    )
    pool = SessionPool(
        engine, avatar, seconds_per_session=per_session_s, seed=seed, lookahead=lookahead
    )
    with torch.inference_mode(), reference_kernels(reference):
        search = search_max_sessions(
            make_probe(engine, pool, ticks=ticks), budget_s=FRAME_S, max_sessions=max_sessions
        )
        confirmations = []
        n = search.max_sessions
        confirmed = 0
        for _ in range(MAX_CONFIRM_ATTEMPTS):
            if n < 1:
                break
            res = paced_run(engine, pool.get(n), seconds=confirm_seconds)
            confirmations.append(res)
            if res["sustained"]:
                confirmed = n
                break
            n -= 1
    best = search.probes.get(confirmed) if confirmed else None
    return {
        "budget_ms": FRAME_S * 1e3,
        "fps_target_per_session": FPS,
        "max_sessions_searched": max_sessions,
        "predicted_sessions": search.max_sessions,
        "sessions_per_device": confirmed,
        "fps": confirmed * FPS,
        "capacity_fps_at_best": best.capacity_fps if best else None,
        "probes": [search.probes[k].to_dict(FRAME_S) for k in sorted(search.probes)],
        "confirmations": confirmations,
    }
