"""A stream's speech timeline and the presenter's queue that feeds it.

:class:`AudioTimeline` is the one record of what a stream says, in int16 mono 48 kHz samples
indexed by absolute position from the stream's start: every sample written goes on, in order,
to a sink (the engine session), and the last ``capacity`` samples are kept in a ring so any
number of readers (one audio track per viewer, each ``audio_lead_ms`` ahead of the display)
can read them again. Reads of positions not held (older than the ring, not yet written, or
cut by an interruption) are silence.

:class:`SpeechQueue` holds a presenter's pushed speech, converted to 48 kHz int16, until the
stream's tick feeds it into the timeline at real-time pace (silence when it runs dry).

Neither reads a clock: the stream decides when and how much; both are deterministic and their
tests drive them with plain arrays (tests/test_timeline.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from talkstream.engine.audio import StreamingResampler, to_mono_float32
from talkstream.streaming.clock import OUT_RATE_HZ

INT16_MAX = 32767
# Entries kept in a stream's trace (per rendered frame / per input chunk of 20 ms): 15 minutes
# of input, enough for a 10-minute benchmark session (15_000 covered only its last 5 minutes).
TRACE_LEN = 45_000


def to_int16(x: np.ndarray) -> np.ndarray:
    """Float samples (full scale 1) to int16, rounded and clipped."""
    return np.clip(np.rint(x * 32768.0), -32768, INT16_MAX).astype(np.int16)


def rms(pcm: np.ndarray) -> float:
    """RMS of int16 samples, full scale 1 (0 for none)."""
    if not pcm.size:
        return 0.0
    return float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) / 32768


class QueueFullError(ValueError):
    """Queued presenter speech would exceed the stream's limit."""


class AudioTimeline:
    """int16 mono 48 kHz samples by absolute position; the last ``capacity`` kept for reading.

    Args:
        capacity: samples kept for :meth:`read` (the replay ring), > 0.
        sink: called with each written chunk, after it is on the timeline (the session's
            ``push_audio`` at 48 kHz); None: nothing.
        trace_len: ``(position, RMS)`` entries kept in :attr:`trace`, one per written chunk.
    """

    def __init__(
        self,
        capacity: int,
        sink: Callable[[np.ndarray], None] | None = None,
        *,
        trace_len: int = TRACE_LEN,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0 samples, got {capacity}")
        self._ring = np.zeros(capacity, dtype=np.int16)
        self._sink = sink
        self.written = 0  # samples written so far: the next write's position
        # (position of the chunk's first sample, its RMS) per written chunk; bounded.
        self.trace: deque[tuple[int, float]] = deque(maxlen=trace_len)

    @property
    def capacity(self) -> int:
        return int(self._ring.shape[0])

    def write(self, pcm: np.ndarray) -> None:
        """Append int16 samples at :attr:`written` and pass them to the sink."""
        n = pcm.shape[0]
        if n == 0:
            return
        cap = self._ring.shape[0]
        if n > cap:  # only the tail can be replayed; the sink still gets everything
            self._put(pcm[-cap:], self.written + n - cap)
        else:
            self._put(pcm, self.written)
        self.trace.append((self.written, rms(pcm)))
        self.written += n
        if self._sink is not None:
            self._sink(pcm)

    def write_silence(self, n: int) -> None:
        """Append ``n`` samples of silence (nothing for ``n <= 0``)."""
        if n > 0:
            self.write(np.zeros(n, dtype=np.int16))

    def silence_from(self, start: int) -> None:
        """Cut: the held samples from ``start`` on read as silence from now on. The sink is not
        told (it already has them; the caller interrupts it) and :attr:`written` stays."""
        lo = max(start, self.written - self._ring.shape[0])
        if self.written > lo:
            self._put(np.zeros(self.written - lo, dtype=np.int16), lo)

    def rewind(self, start: int) -> None:
        """Take back the samples from ``start`` on: they read as silence and the next write
        goes at ``start``. The sink is not told (the caller rewinds it). ``start`` must lie
        within what was written and is still held."""
        if not self.written - self._ring.shape[0] <= start <= self.written:
            raise ValueError(
                f"cannot rewind to sample {start}: held are "
                f"{max(self.written - self._ring.shape[0], 0)}..{self.written}"
            )
        self.silence_from(start)
        self.written = start
        while self.trace and self.trace[-1][0] >= start:
            self.trace.pop()

    def last_sound(self, start: int, stop: int | None = None) -> int | None:
        """Position of the last non-zero sample held in ``[start, stop)`` (``stop`` defaults
        to :attr:`written`), None if all silent."""
        hi = self.written if stop is None else min(stop, self.written)
        lo = max(start, self.written - self._ring.shape[0], 0)
        if hi <= lo:
            return None
        nz = np.flatnonzero(self.read(lo, hi - lo))
        return lo + int(nz[-1]) if nz.size else None

    def read(self, start: int, n: int) -> np.ndarray:
        """Samples ``[start, start + n)``, int16; silence where none are held."""
        out = np.zeros(n, dtype=np.int16)
        cap = self._ring.shape[0]
        lo = max(start, self.written - cap, 0)
        hi = min(start + n, self.written)
        if hi > lo:
            i = lo % cap
            first = min(hi - lo, cap - i)
            out[lo - start : lo - start + first] = self._ring[i : i + first]
            rest = hi - lo - first
            if rest:
                out[lo - start + first : hi - start] = self._ring[:rest]
        return out

    def _put(self, pcm: np.ndarray, start: int) -> None:
        # pcm is at most capacity long: it wraps at most once.
        cap = self._ring.shape[0]
        i = start % cap
        first = min(pcm.shape[0], cap - i)
        self._ring[i : i + first] = pcm[:first]
        self._ring[: pcm.shape[0] - first] = pcm[first:]


class SpeechQueue:
    """Presenter speech waiting for the timeline: 48 kHz int16 chunks, at most ``limit_s``.

    Args:
        limit_s: seconds queued at most; a push that would exceed it raises.
        name: the presenter's name, for the error message.
    """

    def __init__(self, limit_s: float, *, name: str = "stream") -> None:
        self.limit_s = float(limit_s)
        self.name = name
        self._chunks: deque[np.ndarray] = deque()
        self.queued_samples = 0
        self._resampler: StreamingResampler | None = None

    def push(self, pcm: np.ndarray, sample_rate: int) -> tuple[np.ndarray, int]:
        """Queue int16/float PCM, (n,) or (n, ch), any rate, resampled to 48 kHz int16.

        Returns the chunk queued (possibly empty: the resampler holds a little back) and the
        number of input samples (per channel) taken.

        Raises:
            QueueFullError: the queue would exceed ``limit_s``.
            TypeError, ValueError: bad samples or rate.
        """
        x = to_mono_float32(pcm)
        if self._resampler is None or self._resampler.in_rate_hz != sample_rate:
            self._resampler = StreamingResampler(sample_rate, OUT_RATE_HZ)
        n_out = x.shape[0] * OUT_RATE_HZ // sample_rate
        limit = int(self.limit_s * OUT_RATE_HZ)
        if self.queued_samples + n_out > limit:
            raise QueueFullError(
                f"presenter {self.name!r} has {self.queued_samples / OUT_RATE_HZ:.1f} s of "
                f"speech queued; {n_out / OUT_RATE_HZ:.1f} s more would exceed the limit of "
                f"{self.limit_s:.0f} s"
            )
        y = to_int16(self._resampler.push(x))
        if y.shape[0]:
            self._chunks.append(y)
            self.queued_samples += y.shape[0]
        return y, int(x.shape[0])

    def push_front(self, pcm: np.ndarray) -> None:
        """Put int16 48 kHz samples back at the head of the queue (speech taken back from the
        timeline to be placed again; not counted against the limit a second time)."""
        if pcm.shape[0]:
            self._chunks.appendleft(np.asarray(pcm, dtype=np.int16))
            self.queued_samples += pcm.shape[0]

    def clear(self) -> int:
        """Drop the queued speech; returns the samples dropped."""
        dropped = self.queued_samples
        self._chunks.clear()
        self.queued_samples = 0
        return dropped

    def interrupt(self) -> int:
        """:meth:`clear`, and forget the resampler's history (it belongs to the speech cut):
        the next push starts afresh. Returns the samples dropped."""
        self._resampler = None
        return self.clear()

    def feed(self, timeline: AudioTimeline, n: int) -> None:
        """Write the next ``n`` samples to ``timeline``: queued chunks as they were pushed (a
        chunk split where ``n`` ends), silence for what the queue cannot cover."""
        while n > 0:
            if not self._chunks:
                timeline.write_silence(n)
                return
            head = self._chunks[0]
            if head.shape[0] <= n:
                self._chunks.popleft()
                take = head
            else:
                take, self._chunks[0] = head[:n], head[n:]
            self.queued_samples -= take.shape[0]
            timeline.write(take)
            n -= take.shape[0]
