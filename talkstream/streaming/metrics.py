"""A small Prometheus metrics registry (text exposition format 0.0.4).

The server needs a handful of counters, gauges and histograms; writing the text format directly
keeps the ``serve`` extra free of another dependency and every registry local to its server
(tests run many servers in one process, and a process-global registry would mix them).
Everything here is touched from the event loop thread only.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

# Latency buckets in seconds: from a fast frame (5 ms) to a stalled one (2.5 s).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count."""

    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} can only increase, got {amount}")
        self.value += amount

    def samples(self) -> list[str]:
        return [f"{self.name} {_fmt(self.value)}"]


class Gauge(_Metric):
    """A value that goes up and down; either set, or read from a callback at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float] | None = None) -> None:
        super().__init__(name, help_text)
        self.value = 0.0
        self._read = read

    def set(self, value: float) -> None:
        self.value = float(value)

    def samples(self) -> list[str]:
        v = self._read() if self._read is not None else self.value
        return [f"{self.name} {_fmt(v)}"]


class Histogram(_Metric):
    """Cumulative buckets, a sum and a count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        self.bounds = sorted(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def samples(self) -> list[str]:
        out = []
        acc = 0
        for bound, n in zip([*self.bounds, math.inf], self.counts, strict=True):
            acc += n
            out.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {acc}')
        out.append(f"{self.name}_sum {_fmt(self.sum)}")
        out.append(f"{self.name}_count {self.count}")
        return out


class Registry:
    """The metrics of one server."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, m: _Metric) -> _Metric:
        if m.name in self._metrics:
            raise ValueError(f"metric {m.name} is already registered")
        self._metrics[m.name] = m
        return m

    def counter(self, name: str, help_text: str) -> Counter:
        c = Counter(name, help_text)
        self._add(c)
        return c

    def gauge(self, name: str, help_text: str, read: Callable[[], float] | None = None) -> Gauge:
        g = Gauge(name, help_text, read)
        self._add(g)
        return g

    def histogram(
        self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS_S
    ) -> Histogram:
        h = Histogram(name, help_text, buckets)
        self._add(h)
        return h

    def render(self) -> str:
        """The text exposition of every metric."""
        lines: list[str] = []
        for m in self._metrics.values():
            lines += m.header()
            lines += m.samples()
        return "\n".join(lines) + "\n"


class StreamMetrics:
    """The server-wide metrics that every avatar stream reports into."""

    def __init__(self, registry: Registry) -> None:
        r = registry
        self.frames_rendered = r.counter(
            "talkstream_frames_rendered_total", "Video frames rendered by the engine."
        )
        self.frames_skipped = r.counter(
            "talkstream_frames_skipped_total",
            "Frames not rendered because their display deadline had passed.",
        )
        self.frames_repeated = r.counter(
            "talkstream_frames_repeated_total",
            "Displayed frames that repeated an older frame because the new one was late.",
        )
        self.audio_underrun = r.counter(
            "talkstream_input_silence_filled_seconds_total",
            "Input audio that arrived too late or never and was replaced by silence.",
        )
        self.input_audio = r.counter(
            "talkstream_input_audio_seconds_total", "Speech audio received from clients."
        )
        self.render_seconds = r.histogram(
            "talkstream_frame_render_seconds",
            "Engine time per rendered frame (a batch's time divided by its frames).",
        )
        self.slack_seconds = r.histogram(
            "talkstream_frame_slack_seconds",
            "Time left before a frame's display deadline when its render finished.",
            (-0.1, -0.04, 0.0, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5),
        )
        self.latency_seconds = r.histogram(
            "talkstream_pipeline_latency_seconds",
            "Per-stream latency budget (input to output delay) at stream start.",
        )


__all__ = ["LATENCY_BUCKETS_S", "Counter", "Gauge", "Histogram", "Registry", "StreamMetrics"]
