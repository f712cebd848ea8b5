"""Per-stage timers and percentile summaries.

On the CPU every stage is timed with ``time.perf_counter``. On a GPU, stages whose work runs on
the device (motion, denoiser steps, readback) are timed with CUDA events recorded on the current
stream, so asynchronous launches are not mistaken for finished work and no stage adds a host
sync of its own; the events are read once per iteration, after the iteration's own sync
(the readback of the frames). Host stages (audio frontend, paste-back on numpy, encoding) keep
``perf_counter`` on both.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Summary:
    """Distribution of one timed quantity, in milliseconds."""

    n: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(samples_s: Sequence[float]) -> Summary:
    """Percentiles of durations given in seconds, reported in milliseconds.

    Linear interpolation between order statistics (numpy's default), so p50 <= p90 <= p99
    always holds; with few samples p99 is close to the maximum.
    """
    if len(samples_s) == 0:
        raise ValueError("cannot summarize an empty list of samples")
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return Summary(
        n=int(ms.size),
        mean=float(ms.mean()),
        p50=float(p50),
        p90=float(p90),
        p99=float(p99),
        min=float(ms.min()),
        max=float(ms.max()),
    )


class StageRecorder:
    """Collects per-iteration durations of named stages.

    Usage::

        rec = StageRecorder(device)
        with rec.host("audio"): ...
        with rec.device("motion"): ...     # CUDA events on a GPU, perf_counter on the CPU
        rec.end_iteration(record=True)     # False during warm-up

    A stage entered several times in one iteration (e.g. once per session) is summed, so every
    stage's sample is the cost of one whole iteration. ``samples`` maps stage -> seconds.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device_obj = device
        self.samples: dict[str, list[float]] = {}
        self.order: list[str] = []  # stages in first-seen order, for tables
        self._host: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []

    def _add(self, name: str, seconds: float) -> None:
        if name not in self.order:
            self.order.append(name)
        self._host[name] = self._host.get(name, 0.0) + seconds

    @contextmanager
    def host(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._add(name, time.perf_counter() - t0)

    @contextmanager
    def device(self, name: str) -> Iterator[None]:
        if not self.cuda:
            with self.host(name):
                yield
            return
        import torch

        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            if name not in self.order:
                self.order.append(name)
            self._events.append((name, start, end))

    def add(self, name: str, seconds: float) -> None:
        """Add a duration measured elsewhere to this iteration's ``name``."""
        self._add(name, seconds)

    def end_iteration(self, record: bool = True) -> dict[str, float]:
        """Close the iteration; return its per-stage seconds, kept in ``samples`` if ``record``."""
        if self._events:
            import torch

            torch.cuda.synchronize(self.device_obj)
            for name, start, end in self._events:
                # elapsed_time is in milliseconds.
                self._host[name] = self._host.get(name, 0.0) + start.elapsed_time(end) / 1e3
            self._events.clear()
        it = self._host
        self._host = {}
        if record:
            for name, sec in it.items():
                self.samples.setdefault(name, []).append(sec)
        return it

    def summaries(self) -> dict[str, Summary]:
        return {name: summarize(self.samples[name]) for name in self.order if name in self.samples}


def time_callable(
    fn: Any, *, iters: int, warmup: int, device: torch.device | None = None
) -> tuple[list[float], float]:
    """Run ``fn()`` ``warmup`` then ``iters`` times; returns (per-call seconds, first call seconds).

    On a GPU each call is bracketed by device syncs, so the time is that of the finished work
    (the anchors have no host stage to overlap with).
    """
    sync = _sync_fn(device)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    sync()
    out: list[float] = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out, first


def _sync_fn(device: torch.device | None) -> Any:
    if device is not None and device.type == "cuda":
        import torch

        return lambda: torch.cuda.synchronize(device)
    return lambda: None
