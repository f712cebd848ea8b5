"""Streaming log-mel audio frontend: any PCM in, 80-bin log-mel frames at 80 frames/s out.

The pipeline is ``to_mono_float32`` (dtype scaling, channel downmix) -> ``StreamingResampler``
(to 16 kHz) -> ``MelFrontend`` (periodic-Hann STFT, Slaney mel filterbank, natural log).

The central guarantee is that streaming changes nothing: the frames ``MelFrontend`` returns for
a stream cut into chunks of any size are bitwise equal to ``log_mel`` of the whole resampled
signal. That holds by construction rather than by tolerance:

* every sample is computed in float64 and cast to float32 only at the end;
* every computation is either elementwise or independent per row (one FFT per frame), and
  sums are accumulated in a fixed order by explicit loops over taps or filter bins, never by
  BLAS (whose blocking, and hence summation order, changes with the batch size) or by numpy
  reductions (whose pairwise order depends on the array length);
* resampling positions are exact rationals kept in integer arithmetic, so there is no float
  drift however long the stream runs.

Memory is bounded: the resampler and the frontend each keep only a fixed-capacity buffer of
recent samples, and large pushes are processed in fixed-size pieces.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Generator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Final

import numpy as np
import numpy.typing as npt
import soundfile as sf

from talkstream.config import AudioConfig
from talkstream.errors import InputError

__all__ = [
    "AudioFileReader",
    "MelFrontend",
    "StreamingResampler",
    "iter_audio_blocks",
    "load_audio",
    "log_mel",
    "mel_filterbank",
    "to_mono_float32",
]

Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]

# --- PCM conversion -------------------------------------------------------------------------

# Full-scale of signed integer PCM: int16 -32768..32767 maps to [-1, 1).
INT16_FULL_SCALE: Final = 32768.0
INT32_FULL_SCALE: Final = 2.0**31
# More channels than this in a (n, channels) array almost always means a channel-first array
# (e.g. shape (2, 960)) was passed by mistake; refuse it instead of averaging 960 "channels".
MAX_CHANNELS: Final = 64

# --- Resampler ------------------------------------------------------------------------------

# Zero crossings of the sinc on each side of the centre tap, counted at the lower of the two
# rates. 16 gives a transition band of about 1.9 kHz at a 16 kHz output rate.
RESAMPLER_ZERO_CROSSINGS: Final = 16
# Cutoff as a fraction of the lower Nyquist frequency: the margin leaves room for the
# transition band so that little energy above the output Nyquist aliases back.
RESAMPLER_ROLLOFF: Final = 0.94
# Kaiser window shape: about 65 dB of stopband attenuation with the settings above.
RESAMPLER_KAISER_BETA: Final = 6.5
# A (phases x taps) coefficient table is precomputed when it has at most this many entries
# (8 MiB of float64). Realistic rate pairs need far fewer (44.1 kHz -> 16 kHz: 160 x 94);
# larger ones (coprime rates) compute the coefficients of each output sample on the fly.
RESAMPLER_MAX_TABLE_ENTRIES: Final = 1 << 20
# Input samples appended to the history buffer per step: bounds memory for huge pushes.
RESAMPLER_SEGMENT_SAMPLES: Final = 16_384
# Upper bound on (output samples x taps) computed at once: bounds temporaries to ~2 MiB.
RESAMPLER_BLOCK_ENTRIES: Final = 1 << 18

# --- Mel frontend ---------------------------------------------------------------------------

# Frames transformed at once: bounds the FFT temporaries, and the frontend's buffer holds
# n_fft + MEL_BLOCK_FRAMES * hop samples.
MEL_BLOCK_FRAMES: Final = 64
# Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above it.
SLANEY_LINEAR_HZ_PER_MEL: Final = 200.0 / 3.0
SLANEY_BREAK_HZ: Final = 1000.0
SLANEY_BREAK_MEL: Final = SLANEY_BREAK_HZ / SLANEY_LINEAR_HZ_PER_MEL  # 15 mel
SLANEY_LOG_STEP: Final = math.log(6.4) / 27.0  # log(Hz) per mel above the break


# ============================================================================================
# PCM conversion
# ============================================================================================


def to_mono_float32(pcm: np.ndarray) -> Float32Array:
    """Convert PCM of a supported dtype and layout to mono float32 in [-1, 1].

    Args:
        pcm: ``int16`` (scaled by 1/32768), ``int32`` (scaled by 1/2**31), ``float32`` or
            ``float64`` (taken as is) samples, shape ``(n,)`` for mono or ``(n, channels)``
            channel-last (the interleaved order WebRTC, pyaudio and soundfile produce).

    Returns:
        A new float32 array of shape ``(n,)``: the mean over channels.

    Raises:
        TypeError: ``pcm`` is not a numpy array or has another dtype.
        ValueError: ``pcm`` is not 1-D or 2-D, has no channels, or has more than
            ``MAX_CHANNELS`` channels (almost certainly a channel-first array).
    """
    if not isinstance(pcm, np.ndarray):
        raise TypeError(
            f"to_mono_float32 expects a numpy array, got {type(pcm).__name__}; "
            "wrap the samples with numpy.asarray(...)"
        )
    dtype = pcm.dtype
    if dtype == np.int16:
        scale = 1.0 / INT16_FULL_SCALE
    elif dtype == np.int32:
        scale = 1.0 / INT32_FULL_SCALE
    elif dtype in (np.float32, np.float64):
        scale = 1.0
    else:
        raise TypeError(f"unsupported PCM dtype {dtype}; expected int16, int32, float32 or float64")

    if pcm.ndim == 1:
        # Scaling by a power of two is exact, so int16/int32 -> float64 -> float32 loses only
        # what float32 cannot represent.
        return (pcm.astype(np.float64) * scale).astype(np.float32)
    if pcm.ndim != 2:
        raise ValueError(
            f"PCM must have shape (n,) or (n, channels), got {pcm.ndim}-D shape {pcm.shape}"
        )
    channels = pcm.shape[1]
    if channels == 0:
        raise ValueError(
            f"PCM has shape {pcm.shape}: an empty channel dimension; expected (n, channels) "
            "with at least one channel"
        )
    if channels > MAX_CHANNELS:
        raise ValueError(
            f"PCM has shape {pcm.shape}: {channels} channels is more than {MAX_CHANNELS}; "
            "expected channel-last (n, channels). Transpose a channel-first array with .T"
        )
    # Sum channel by channel in a fixed order (an elementwise loop, not a reduction whose
    # order could depend on the array size), then scale once.
    acc = pcm[:, 0].astype(np.float64)
    for channel in range(1, channels):
        acc += pcm[:, channel]
    acc *= scale / channels
    return acc.astype(np.float32)


# ============================================================================================
# Bounded sample buffer
# ============================================================================================


class _SampleBuffer:
    """A fixed-capacity float64 buffer of recent samples, addressed by absolute sample index.

    It is a ring buffer in effect (fixed memory, old samples dropped as the stream advances),
    kept contiguous by compacting lazily: when an append does not fit, the live samples (fewer
    than one analysis window) move to the front. That costs a short memmove now and then and
    lets frames and filter taps be read as plain slices, with no wrap-around arithmetic.
    """

    def __init__(self, capacity: int, start_abs: int) -> None:
        self._data: Float64Array = np.zeros(capacity, dtype=np.float64)
        self._capacity = capacity
        self._head = 0  # index in _data of the sample with absolute index _start_abs
        self._fill = 0  # live samples from _head
        self._start_abs = start_abs
        self._skip = 0  # incoming samples to drop: discard_before() went past the end

    @property
    def end_abs(self) -> int:
        """Absolute index one past the last sample received (dropped ones included)."""
        return self._start_abs + self._fill + self._skip

    @property
    def space(self) -> int:
        """How many samples can be appended now (after compaction)."""
        return self._data.shape[0] - self._fill

    def append(self, samples: npt.NDArray[np.floating]) -> None:
        """Append samples; the caller keeps ``len(samples) <= space``."""
        n = samples.shape[0]
        if self._skip:
            dropped = min(self._skip, n)
            self._skip -= dropped
            self._start_abs += dropped
            samples = samples[dropped:]
            n -= dropped
        if n > self.space:
            raise AssertionError(f"_SampleBuffer overflow: {n} samples, {self.space} free")
        if self._head + self._fill + n > self._data.shape[0]:
            self._data[: self._fill] = self._data[self._head : self._head + self._fill]
            self._head = 0
        stop = self._head + self._fill
        self._data[stop : stop + n] = samples
        self._fill += n

    def view(self, start_abs: int, stop_abs: int) -> Float64Array:
        """Samples with absolute indices ``start_abs .. stop_abs - 1`` (a view, not a copy)."""
        lo = self._head + start_abs - self._start_abs
        hi = self._head + stop_abs - self._start_abs
        if lo < self._head or hi > self._head + self._fill:
            raise AssertionError(
                f"_SampleBuffer range [{start_abs}, {stop_abs}) outside "
                f"[{self._start_abs}, {self._start_abs + self._fill})"
            )
        return self._data[lo:hi]

    def clone(self, *, compact: bool = False) -> _SampleBuffer:
        """An independent copy (its own array). ``compact``: only the live samples are kept,
        for a copy that is stored, not appended to; cloning it again (not compact) gives a
        working buffer of the full capacity."""
        new = copy.copy(self)
        live = self._data[self._head : self._head + self._fill]
        if compact:
            new._data = live.copy()
        else:
            new._data = np.zeros(self._capacity, dtype=np.float64)
            new._data[: self._fill] = live
        new._head = 0
        return new

    def discard_before(self, start_abs: int) -> None:
        """Forget samples with absolute index below ``start_abs``."""
        drop = start_abs - self._start_abs
        if drop <= 0:
            return
        live_drop = min(drop, self._fill)
        self._head += live_drop
        self._fill -= live_drop
        self._start_abs += live_drop
        # Past the end: the next `drop - live_drop` incoming samples are not needed either.
        extra = drop - live_drop
        if extra > self._skip:
            self._skip = extra


# ============================================================================================
# Resampler
# ============================================================================================


def _check_rate(name: str, value: object) -> int:
    """Return ``value`` as an int if it is a positive integer sample rate, else raise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer in Hz, got {value!r}")
    try:
        rate = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a positive integer in Hz, got {value!r}") from None
    if rate <= 0:
        raise ValueError(f"{name} must be a positive integer in Hz, got {rate}")
    return rate


def _as_float_samples(x: np.ndarray, who: str) -> npt.NDArray[np.floating]:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{who} expects a numpy array, got {type(x).__name__}")
    if x.ndim != 1:
        raise ValueError(f"{who} expects mono samples of shape (n,), got shape {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"{who} expects float32 (or float64) samples, got {x.dtype}; "
            "convert PCM with to_mono_float32 first"
        )
    return x


class StreamingResampler:
    """Band-limited sample-rate conversion of a stream, independent of how it is chunked.

    Output sample ``k`` sits at input position ``k * in / out``, kept as the exact rational
    ``n0 + phase / L`` (``n0 = k*M // L``, ``phase = k*M % L`` with ``L/M = out/in`` in lowest
    terms), and is a Kaiser-windowed sinc interpolation of the input around it. The low-pass
    cutoff is ``RESAMPLER_ROLLOFF`` times the lower of the two Nyquist frequencies, with
    ``RESAMPLER_ZERO_CROSSINGS`` zero crossings on each side. Input before the start of the
    stream counts as zeros, and ``flush`` acts as if zeros followed the end.

    Pushing the stream in any chunking produces the same output samples, bitwise. Equal rates
    are a pass-through copy (no filtering, no latency).

    Args:
        in_rate_hz: input sample rate, a positive integer.
        out_rate_hz: output sample rate, a positive integer.

    Raises:
        ValueError: a rate is not a positive integer.
    """

    def __init__(self, in_rate_hz: int, out_rate_hz: int) -> None:
        self.in_rate_hz = _check_rate("in_rate_hz", in_rate_hz)
        self.out_rate_hz = _check_rate("out_rate_hz", out_rate_hz)
        divisor = math.gcd(self.in_rate_hz, self.out_rate_hz)
        self._up = self.out_rate_hz // divisor  # L: output samples per period
        self._down = self.in_rate_hz // divisor  # M: input samples per period
        self._identity = self.in_rate_hz == self.out_rate_hz
        self._n_in = 0  # input samples received
        self._k_next = 0  # index of the next output sample to produce
        self._flushed = False

        if self._identity:
            self._half_taps = 0
            self._n_taps = 0
            self._table_t: Float64Array | None = None
            self._buffer = _SampleBuffer(0, 0)
            return

        # The sinc's argument is in input samples scaled by `_scale`, so that its first zero
        # crossing falls at the cutoff period: downsampling widens the filter by in/out.
        self._scale = min(1.0, self._up / self._down) * RESAMPLER_ROLLOFF
        self._half_width = RESAMPLER_ZERO_CROSSINGS / self._scale  # in input samples
        # Output k at n0 + frac (0 <= frac < 1) uses inputs n0 - (W - 1) .. n0 + W: every
        # input within the window's half-width on either side.
        self._half_taps = math.ceil(self._half_width)
        self._n_taps = 2 * self._half_taps
        if self._up * self._n_taps <= RESAMPLER_MAX_TABLE_ENTRIES:
            # Row t holds tap t of every phase, contiguous for the per-tap gather by phase.
            self._table_t = np.ascontiguousarray(
                self._coefficients(np.arange(self._up, dtype=np.int64)).T
            )
        else:
            self._table_t = None
        # The history starts W - 1 zeros before the stream, so output 0 finds all its taps.
        self._buffer = _SampleBuffer(
            RESAMPLER_SEGMENT_SAMPLES + 2 * self._n_taps, start_abs=-(self._half_taps - 1)
        )
        self._buffer.append(np.zeros(self._half_taps - 1))

    def clone(self, *, compact: bool = False) -> StreamingResampler:
        """An independent copy of the stream's state (the filter table is shared: read-only);
        ``compact`` as for ``_SampleBuffer.clone``."""
        new = copy.copy(self)
        new._buffer = self._buffer.clone(compact=compact)
        return new

    @property
    def latency_samples(self) -> int:
        """Input samples of lookahead: output at input position ``t`` needs input up to
        ``floor(t) + latency_samples``. Zero for equal rates."""
        return self._half_taps

    def _coefficients(self, phases: npt.NDArray[np.int64]) -> Float64Array:
        """Filter taps, shape ``(len(phases), n_taps)``, for output positions with these phases.

        Tap ``t`` (offset ``t - (W - 1)`` from ``n0``) weighs input ``n0 + t - (W - 1)``, at
        distance ``phase / L - (t - (W - 1))`` from the output position. Each row is normalised
        to sum to one, so DC passes exactly at every phase (no gain ripple at the phase
        period). All operations are elementwise, so a row's values do not depend on which other
        rows are computed with it.
        """
        offsets = np.arange(-(self._half_taps - 1), self._half_taps + 1, dtype=np.int64)
        # Exact integer numerator, one rounding in the division.
        distance = (phases[:, None] - offsets[None, :] * self._up) / self._up
        u = distance / self._half_width
        inside = np.abs(u) < 1.0
        window = np.i0(RESAMPLER_KAISER_BETA * np.sqrt(np.clip(1.0 - u * u, 0.0, None)))
        window /= np.i0(RESAMPLER_KAISER_BETA)
        taps = self._scale * np.sinc(self._scale * distance) * window
        taps[~inside] = 0.0
        total = taps[:, 0].copy()
        for t in range(1, self._n_taps):  # fixed summation order, see module docstring
            total += taps[:, t]
        taps /= total[:, None]
        return taps

    def _ready_outputs(self, n_in: int) -> int:
        """How many output samples are determined by the first ``n_in`` input samples."""
        # Output k needs input index k*M // L + W, i.e. k*M // L <= n_in - 1 - W.
        available = n_in - self._half_taps
        if available <= 0:
            return 0
        return -((-available * self._up) // self._down)

    def _produce(self, k_stop: int, out: Float32Array) -> None:
        """Compute outputs ``_k_next .. k_stop - 1`` into ``out`` and advance."""
        k0 = self._k_next
        n_total = k_stop - k0
        block = max(1, RESAMPLER_BLOCK_ENTRIES // self._n_taps)
        for start in range(0, n_total, block):
            n = min(block, n_total - start)
            k_first = k0 + start
            # Positions relative to k_first in int64; the large part stays a Python int so
            # nothing overflows however long the stream.
            base_q, base_r = divmod(k_first * self._down, self._up)
            num = np.arange(n, dtype=np.int64) * self._down + base_r
            n0_rel = num // self._up
            phases = num % self._up
            # Absolute index of each output's first tap is base_q + n0_rel - (W - 1).
            first_abs = base_q - (self._half_taps - 1)
            last_abs = base_q + int(n0_rel[-1]) + self._half_taps + 1
            history = self._buffer.view(first_abs, last_abs)
            # Coefficients tap by tap from the table (no (taps x n) temporary), or computed
            # for this block when the table would be too large.
            coef_t = self._table_t
            if coef_t is None:
                coef_t = np.ascontiguousarray(self._coefficients(phases).T)
                phases = np.arange(n, dtype=np.int64)  # row j of coef_t is output j
            acc = np.zeros(n, dtype=np.float64)
            for t in range(self._n_taps):  # fixed order: the same sum for any chunking
                acc += history[n0_rel + t] * coef_t[t][phases]
            out[start : start + n] = acc
        self._k_next = k_stop
        # Keep only what the next output needs: from its first tap on.
        self._buffer.discard_before((k_stop * self._down) // self._up - (self._half_taps - 1))

    def _run(self, samples: npt.NDArray[np.floating], n_real: int, k_final: int) -> Float32Array:
        """Append ``samples`` (the first ``n_real`` of them real input, the rest flush zeros)
        piece by piece and produce every output up to ``k_final``."""
        out = np.empty(k_final - self._k_next, dtype=np.float32)
        k_begin = self._k_next
        pos = 0
        while pos < samples.shape[0]:
            take = min(self._buffer.space, samples.shape[0] - pos)
            self._buffer.append(samples[pos : pos + take])
            pos += take
            # Flush zeros count as input here; k_final caps what they may complete.
            k_stop = min(k_final, self._ready_outputs(self._n_in + pos))
            if k_stop > self._k_next:
                self._produce(k_stop, out[self._k_next - k_begin : k_stop - k_begin])
        self._n_in += n_real
        return out

    def push(self, x: np.ndarray) -> Float32Array:
        """Feed input samples; return the output samples they complete.

        Args:
            x: float32 (or float64) mono samples, shape ``(n,)``; any ``n``, including 0.

        Returns:
            float32 output samples, shape ``(m,)``: every output whose filter taps have now
            all arrived. Over a stream, the concatenation is the same for any chunking.

        Raises:
            RuntimeError: called after ``flush``.
            TypeError, ValueError: ``x`` is not a 1-D float array.
        """
        if self._flushed:
            raise RuntimeError("StreamingResampler.push called after flush(); create a new one")
        x = _as_float_samples(x, "StreamingResampler.push")
        if self._identity:
            self._n_in += x.shape[0]
            return x.astype(np.float32, copy=True)
        return self._run(x, x.shape[0], self._ready_outputs(self._n_in + x.shape[0]))

    def flush(self) -> Float32Array:
        """End the stream and return the remaining output samples, as if zeros followed.

        After it, the total output length is ``ceil(n_in * out_rate_hz / in_rate_hz)``.
        Calling it again returns an empty array.
        """
        if self._flushed:
            return np.zeros(0, dtype=np.float32)
        self._flushed = True
        if self._identity:
            return np.zeros(0, dtype=np.float32)
        k_final = -((-self._n_in * self._up) // self._down)
        # The last output sits before input n_in, so W zeros complete every tap it needs.
        return self._run(np.zeros(self._half_taps), 0, k_final)


# ============================================================================================
# Mel spectrogram
# ============================================================================================


def _hz_to_mel(hz: Float64Array) -> Float64Array:
    """Slaney mel scale (as in the Auditory Toolbox): linear to 1 kHz, then logarithmic."""
    linear = hz / SLANEY_LINEAR_HZ_PER_MEL
    log_part = SLANEY_BREAK_MEL + np.log(np.maximum(hz, SLANEY_BREAK_HZ) / SLANEY_BREAK_HZ) / (
        SLANEY_LOG_STEP
    )
    return np.where(hz < SLANEY_BREAK_HZ, linear, log_part)


def _mel_to_hz(mel: Float64Array) -> Float64Array:
    """Inverse of ``_hz_to_mel``."""
    linear = mel * SLANEY_LINEAR_HZ_PER_MEL
    log_part = SLANEY_BREAK_HZ * np.exp(SLANEY_LOG_STEP * (mel - SLANEY_BREAK_MEL))
    return np.where(mel < SLANEY_BREAK_MEL, linear, log_part)


def _validate_config(cfg: AudioConfig) -> None:
    problems = []
    for name in ("sample_rate_hz", "n_fft", "hop_samples", "n_mels"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    nyquist_hz = cfg.sample_rate_hz / 2
    if not 0.0 <= cfg.fmin_hz < cfg.fmax_hz <= nyquist_hz:
        problems.append(
            f"need 0 <= fmin_hz < fmax_hz <= sample_rate_hz / 2 = {nyquist_hz}, "
            f"got fmin_hz={cfg.fmin_hz}, fmax_hz={cfg.fmax_hz}"
        )
    if not cfg.log_floor > 0.0:
        problems.append(f"log_floor must be > 0, got {cfg.log_floor}")
    if problems:
        raise ValueError("invalid AudioConfig: " + "; ".join(problems))


def mel_filterbank(cfg: AudioConfig) -> Float64Array:
    """Slaney-style triangular mel filterbank with area normalisation.

    ``n_mels`` triangles with centres equally spaced on the Slaney mel scale between
    ``fmin_hz`` and ``fmax_hz`` (edges included as the outer feet), applied to the
    ``n_fft // 2 + 1`` power-spectrum bins. Each triangle is scaled by ``2 / (upper edge -
    lower edge)`` in Hz so that every filter has the same area: a flat spectrum gives the
    same energy per band, whatever the band's width.

    Args:
        cfg: ``sample_rate_hz``, ``n_fft``, ``n_mels``, ``fmin_hz``, ``fmax_hz`` are used.

    Returns:
        float64 weights, shape ``(n_mels, n_fft // 2 + 1)``.

    Raises:
        ValueError: the config is inconsistent (see ``AudioConfig``).
    """
    _validate_config(cfg)
    n_bins = cfg.n_fft // 2 + 1
    bin_hz = np.arange(n_bins, dtype=np.float64) * (cfg.sample_rate_hz / cfg.n_fft)
    mel_edges = np.linspace(
        _hz_to_mel(np.array(cfg.fmin_hz, dtype=np.float64)),
        _hz_to_mel(np.array(cfg.fmax_hz, dtype=np.float64)),
        cfg.n_mels + 2,
    )
    hz_edges = _mel_to_hz(mel_edges)
    lower, centre, upper = hz_edges[:-2, None], hz_edges[1:-1, None], hz_edges[2:, None]
    rising = (bin_hz[None, :] - lower) / (centre - lower)
    falling = (upper - bin_hz[None, :]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= 2.0 / (upper - lower)
    return weights


class _LogMelKernel:
    """Windowed frames -> log-mel rows, computed independently per row.

    One FFT per frame (numpy's pocketfft transforms the rows of a 2-D array one by one), and
    the filterbank applied as a fixed-order sum over each filter's few nonzero bins instead of
    a matrix product, so a frame's result does not depend on how many frames share a call.
    """

    def __init__(self, cfg: AudioConfig) -> None:
        self.cfg = cfg
        n = np.arange(cfg.n_fft, dtype=np.float64)
        # Periodic Hann: the DFT-even window (period n_fft), as STFT libraries use.
        self.window: Float64Array = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / cfg.n_fft)
        weights = mel_filterbank(cfg)
        # Each triangle is nonzero on a contiguous run of bins: store, per filter, the first
        # bin and the weights of the run (zero-padded to the widest run).
        nonzero = weights > 0.0
        first = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), 0)
        last = np.where(
            nonzero.any(axis=1), weights.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1), 0
        )
        width = int(max(1, (last - first + 1).max()))
        n_bins = weights.shape[1]
        self._bin_index = np.minimum(first[None, :] + np.arange(width)[:, None], n_bins - 1)
        # (width, n_mels): weight of bin first + j for filter m (zero beyond the run, so the
        # clamped indices above contribute nothing).
        self._bin_weight = np.take_along_axis(weights.T, self._bin_index, axis=0)
        self._bin_weight[np.arange(width)[:, None] > (last - first)[None, :]] = 0.0
        self._width = width

    def __call__(self, frames: Float64Array, out: Float32Array) -> None:
        """Write log-mel rows of ``frames`` (shape ``(k, n_fft)``) into ``out`` ``(k, n_mels)``."""
        for start in range(0, frames.shape[0], MEL_BLOCK_FRAMES):
            stop = min(start + MEL_BLOCK_FRAMES, frames.shape[0])
            spectrum = np.fft.rfft(frames[start:stop] * self.window, axis=1)
            power = spectrum.real * spectrum.real + spectrum.imag * spectrum.imag
            mel = power[:, self._bin_index[0]] * self._bin_weight[0]
            for j in range(1, self._width):  # fixed summation order per filter
                mel += power[:, self._bin_index[j]] * self._bin_weight[j]
            np.maximum(mel, self.cfg.log_floor, out=mel)
            np.log(mel, out=mel)
            out[start:stop] = mel


def _num_frames(n_samples: int, hop_samples: int) -> int:
    """Frames of a finished signal: ``ceil(n / hop)``, frame ``i`` centred on ``i * hop``."""
    return -(-n_samples // hop_samples)


def log_mel(samples_16k: np.ndarray, cfg: AudioConfig = AudioConfig()) -> Float32Array:  # noqa: B008
    """Log-mel spectrogram of a whole signal: the reference that ``MelFrontend`` reproduces.

    Frame ``i`` covers samples ``i*hop - n_fft//2 .. i*hop - n_fft//2 + n_fft - 1`` (centred on
    sample ``i*hop``), with zeros before the start and after the end. There are
    ``ceil(n / hop)`` frames (none for an empty signal). Each frame is multiplied by a periodic
    Hann window, its power spectrum passed through ``mel_filterbank(cfg)``, and the natural log
    taken of ``max(mel power, cfg.log_floor)``. Computed in float64, returned as float32.

    Args:
        samples_16k: mono float32/float64 samples at ``cfg.sample_rate_hz``, shape ``(n,)``.
        cfg: frontend parameters.

    Returns:
        float32 array, shape ``(ceil(n / hop), n_mels)``.

    Raises:
        TypeError, ValueError: not a 1-D float array, or an invalid config.
    """
    samples = _as_float_samples(samples_16k, "log_mel")
    kernel = _LogMelKernel(cfg)
    n = samples.shape[0]
    n_frames = _num_frames(n, cfg.hop_samples)
    out = np.empty((n_frames, cfg.n_mels), dtype=np.float32)
    if n_frames == 0:
        return out
    left = cfg.n_fft // 2
    padded = np.zeros((n_frames - 1) * cfg.hop_samples + cfg.n_fft, dtype=np.float64)
    # With n_fft < hop the last frame can end before the signal does: the rest is unused.
    used = min(n, padded.shape[0] - left)
    padded[left : left + used] = samples[:used]
    frames = np.lib.stride_tricks.sliding_window_view(padded, cfg.n_fft)[:: cfg.hop_samples]
    kernel(frames, out)
    return out


class MelFrontend:
    """Incremental log-mel frontend: push PCM chunks of any size, get finished frames.

    Input of any supported dtype, layout and sample rate is downmixed (``to_mono_float32``)
    and resampled to ``cfg.sample_rate_hz`` by a ``StreamingResampler`` created on the first
    push. Frame ``i`` is returned as soon as its last sample, ``i*hop + n_fft - n_fft//2 - 1``
    in the 16 kHz domain, has arrived; earlier frames are never recomputed. After ``flush``,
    the concatenation of every returned frame is bitwise equal to
    ``log_mel(resampled)``, where ``resampled`` is ``StreamingResampler.push(all audio)``
    followed by its ``flush()``.

    Only a bounded buffer of recent samples (``n_fft + MEL_BLOCK_FRAMES * hop``) is kept.

    Attributes:
        frames_emitted: mel frames returned so far.
        samples_received_16k: samples received so far after resampling.
    """

    def __init__(self, cfg: AudioConfig = AudioConfig()) -> None:  # noqa: B008
        self.cfg = cfg
        self._kernel = _LogMelKernel(cfg)  # validates cfg
        self._left = cfg.n_fft // 2
        self._right = cfg.n_fft - self._left  # samples from a frame's centre to its end
        self._resampler: StreamingResampler | None = None
        self._buffer = _SampleBuffer(
            cfg.n_fft + MEL_BLOCK_FRAMES * cfg.hop_samples, start_abs=-self._left
        )
        self._buffer.append(np.zeros(self._left))  # the zero padding before the stream
        self._frame_limit: int | None = None  # set by flush: ceil(n / hop)
        self._flushed = False
        self.frames_emitted = 0
        self.samples_received_16k = 0

    def clone(self, *, compact: bool = False) -> MelFrontend:
        """An independent copy of the stream's state: pushing the same audio into the copy
        and into the original gives the same frames (the mel kernel is shared: read-only).

        ``compact``: a copy to store (only the live samples, about a tenth of the buffers'
        size), not to push into; its own ``clone()`` is a working frontend again.
        """
        new = copy.copy(self)
        new._buffer = self._buffer.clone(compact=compact)
        r = self._resampler
        new._resampler = None if r is None else r.clone(compact=compact)
        return new

    @property
    def sample_rate_hz(self) -> int | None:
        """Input sample rate fixed by the first push; None before it."""
        return None if self._resampler is None else self._resampler.in_rate_hz

    @property
    def latency_samples_16k(self) -> int:
        """Algorithmic delay of a frame in output-rate samples: from the arrival of the sample
        a frame is centred on to the frame's completion (``n_fft - n_fft//2``, i.e.
        ``n_fft//2`` for an even window) plus the resampler's lookahead converted to the
        output rate (rounded up). Before the first push only the window part is known."""
        latency = self._right
        if self._resampler is not None:
            latency += -(
                (-self._resampler.latency_samples * self.cfg.sample_rate_hz)
                // self._resampler.in_rate_hz
            )
        return latency

    def _complete_frames(self, end_abs: int) -> int:
        """Frames whose samples all lie before absolute index ``end_abs``."""
        # Frame i ends at i*hop + right, so frames 0 .. (end_abs - right) // hop are complete.
        count = max(0, (end_abs - self._right) // self.cfg.hop_samples + 1)
        if self._frame_limit is not None:
            count = min(count, self._frame_limit)
        return count

    def _ingest(self, samples: Float32Array | Float64Array, out: Float32Array) -> int:
        """Append samples piece by piece, writing completed frames into ``out``; returns the
        number of frames written."""
        hop = self.cfg.hop_samples
        written = 0
        pos = 0
        while pos < samples.shape[0]:
            take = min(self._buffer.space, samples.shape[0] - pos)
            self._buffer.append(samples[pos : pos + take])
            pos += take
            ready = self._complete_frames(self._buffer.end_abs)
            k = ready - self.frames_emitted
            if k <= 0:
                continue
            first_start = self.frames_emitted * hop - self._left
            region = self._buffer.view(first_start, first_start + (k - 1) * hop + self.cfg.n_fft)
            frames = np.lib.stride_tricks.sliding_window_view(region, self.cfg.n_fft)[::hop]
            self._kernel(frames, out[written : written + k])
            written += k
            self.frames_emitted = ready
            self._buffer.discard_before(ready * hop - self._left)
        return written

    def push(self, pcm: np.ndarray, sample_rate_hz: int) -> Float32Array:
        """Feed a chunk of PCM; return the mel frames it completes.

        Args:
            pcm: samples accepted by ``to_mono_float32``: int16/int32/float32/float64, shape
                ``(n,)`` or ``(n, channels)`` channel-last; any ``n``.
            sample_rate_hz: the chunk's sample rate. Fixed by the first push.

        Returns:
            float32 array ``(k, n_mels)`` of newly completed frames (``k`` may be 0).

        Raises:
            RuntimeError: called after ``flush``.
            ValueError: the rate is not a positive integer or differs from the first push's;
                or the PCM has a bad shape.
            TypeError: the PCM has an unsupported dtype.
        """
        if self._flushed:
            raise RuntimeError("MelFrontend.push called after flush(); create a new frontend")
        mono = to_mono_float32(pcm)
        rate = _check_rate("sample_rate_hz", sample_rate_hz)
        if self._resampler is None:
            self._resampler = StreamingResampler(rate, self.cfg.sample_rate_hz)
        elif rate != self._resampler.in_rate_hz:
            raise ValueError(
                f"sample rate changed mid-stream: this stream started at "
                f"{self._resampler.in_rate_hz} Hz and a chunk arrived at {rate} Hz; "
                "use a new MelFrontend for a new stream"
            )
        resampled = self._resampler.push(mono)
        self.samples_received_16k += resampled.shape[0]
        total = self._complete_frames(self.samples_received_16k)
        out = np.empty((total - self.frames_emitted, self.cfg.n_mels), dtype=np.float32)
        written = self._ingest(resampled, out)
        if written != out.shape[0]:
            raise AssertionError(f"MelFrontend emitted {written} frames, expected {out.shape[0]}")
        return out

    def flush(self) -> Float32Array:
        """End the stream: flush the resampler, zero-pad the end, return the last frames.

        After it the stream holds ``ceil(samples_received_16k / hop)`` frames in all. Calling
        it again returns an empty array; ``push`` raises ``RuntimeError``.
        """
        n_mels = self.cfg.n_mels
        if self._flushed:
            return np.zeros((0, n_mels), dtype=np.float32)
        self._flushed = True
        tail = (
            self._resampler.flush()
            if self._resampler is not None
            else np.zeros(0, dtype=np.float32)
        )
        self.samples_received_16k += tail.shape[0]
        total = _num_frames(self.samples_received_16k, self.cfg.hop_samples)
        self._frame_limit = total
        out = np.empty((total - self.frames_emitted, n_mels), dtype=np.float32)
        written = self._ingest(tail, out)
        if total > 0:
            # Zeros up to the end of the last frame (fewer than n_fft - n_fft//2 of them).
            last_end = (total - 1) * self.cfg.hop_samples + self._right
            pad = max(0, last_end - self._buffer.end_abs)
            written += self._ingest(np.zeros(pad), out[written:])
        if written != out.shape[0]:
            raise AssertionError(f"MelFrontend flushed {written} frames, expected {out.shape[0]}")
        return out


# ============================================================================================
# Audio files
# ============================================================================================


# libsndfile subtypes that store float samples.
_FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})


def _check_block_frames(block_frames: int) -> int:
    if isinstance(block_frames, bool) or not isinstance(block_frames, int) or block_frames <= 0:
        raise ValueError(f"block_frames must be a positive integer, got {block_frames!r}")
    return block_frames


class AudioFileReader:
    """An audio file opened for block-wise reading (memory stays flat for long files).

    Anything libsndfile reads (WAV, FLAC, OGG/Vorbis, MP3 with libsndfile >= 1.1, ...).
    Use it as a context manager, or call ``close()``.

    Args:
        path: the file.

    Raises:
        InputError: the file is missing, a directory, unreadable, not a supported audio
            format, or holds no samples. The message names the path and the problem.

    Attributes:
        path: the file's path.
        sample_rate_hz: the file's sample rate.
        num_frames: samples per channel.
        channels: channel count.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"audio file not found: '{self.path}'")
        if self.path.is_dir():
            raise InputError(f"'{self.path}' is a directory, not an audio file")
        try:
            # A plain open first: permission problems get the OS's own words.
            with self.path.open("rb"):
                pass
        except OSError as exc:
            raise InputError(f"cannot open audio file '{self.path}': {exc.strerror}") from exc
        try:
            self._file = sf.SoundFile(str(self.path), mode="r")
        except (sf.LibsndfileError, RuntimeError) as exc:
            reason = getattr(exc, "error_string", None) or str(exc)
            raise InputError(
                f"cannot read '{self.path}' as audio: {reason} "
                "(expected an audio file such as WAV, FLAC or OGG)"
            ) from exc
        self.sample_rate_hz: int = int(self._file.samplerate)
        self.num_frames: int = int(self._file.frames)
        self.channels: int = int(self._file.channels)
        if self.num_frames <= 0 or self.channels <= 0:
            self._file.close()
            raise InputError(f"audio file '{self.path}' contains no audio samples")
        if self.sample_rate_hz <= 0:
            self._file.close()
            raise InputError(f"audio file '{self.path}' has an invalid sample rate")

    @property
    def duration_s(self) -> float:
        """Duration in seconds."""
        return self.num_frames / self.sample_rate_hz

    def _check_open(self) -> None:
        if self._file.closed:
            raise RuntimeError(f"AudioFileReader for '{self.path}' is closed")

    @property
    def is_float(self) -> bool:
        """Whether the file stores float samples (the only kind that can hold NaN or Inf)."""
        return str(self._file.subtype) in _FLOAT_SUBTYPES

    def _refuse_non_finite(self, block: np.ndarray, start_frame: int) -> None:
        finite = np.isfinite(block)
        if finite.all():
            return
        first = int(np.flatnonzero(~finite.all(axis=1))[0]) + start_frame
        raise InputError(
            f"audio file '{self.path}' holds invalid samples (NaN or infinity) from "
            f"{first / self.sample_rate_hz:.2f} s: it is a float file that a program wrote "
            "wrongly; export it again (e.g. as 16-bit PCM WAV)"
        )

    def check_finite(self, block_frames: int = 1 << 16) -> None:
        """Raise ``InputError`` if any sample is NaN or infinite (reads float files through
        once, in blocks; integer and compressed files cannot hold such samples)."""
        if not self.is_float:
            return
        for _ in self.blocks(block_frames):
            pass

    def read(self) -> Float32Array:
        """The whole file as float32, shape ``(num_frames, channels)``.

        Raises:
            InputError: unreadable, empty, or holding NaN or infinite samples.
        """
        self._check_open()
        try:
            self._file.seek(0)
            data = self._file.read(dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise InputError(f"error while reading audio file '{self.path}': {exc}") from exc
        if data.shape[0] == 0:
            raise InputError(f"audio file '{self.path}' contains no audio samples")
        self._refuse_non_finite(data, 0)
        return np.asarray(data, dtype=np.float32)

    def blocks(self, block_frames: int) -> Generator[Float32Array, None, None]:
        """Yield the file from the start in float32 blocks of shape ``(block_frames,
        channels)`` (the last one shorter). Each block is a new array.

        Raises:
            ValueError: ``block_frames`` is not a positive integer.
            InputError: the file turns out to be corrupt partway, or holds NaN or infinite
                samples (cast to integers, as encoders do, their values are undefined).
        """
        _check_block_frames(block_frames)
        self._check_open()
        self._file.seek(0)
        check = self.is_float
        start = 0
        while True:
            try:
                block = self._file.read(block_frames, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise InputError(f"error while reading audio file '{self.path}': {exc}") from exc
            if block.shape[0] == 0:
                return
            if check:
                self._refuse_non_finite(block, start)
            start += block.shape[0]
            yield np.asarray(block, dtype=np.float32)

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()

    def __enter__(self) -> AudioFileReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def load_audio(path: str | Path) -> tuple[Float32Array, int]:
    """Read a whole audio file.

    Returns:
        ``(samples, sample_rate_hz)``: float32 samples of shape ``(n, channels)``.

    Raises:
        InputError: see ``AudioFileReader``.
    """
    with AudioFileReader(path) as reader:
        return reader.read(), reader.sample_rate_hz


def iter_audio_blocks(path: str | Path, block_frames: int) -> Iterator[Float32Array]:
    """Iterate over a file in float32 blocks of shape ``(block_frames, channels)``.

    The file is opened (and any ``InputError`` raised) now, not at the first ``next``; it is
    closed when the iteration ends. For the sample rate and length up front, use
    ``AudioFileReader`` directly.
    """
    _check_block_frames(block_frames)
    reader = AudioFileReader(path)

    def generate() -> Generator[Float32Array, None, None]:
        with reader:
            yield from reader.blocks(block_frames)

    return generate()
