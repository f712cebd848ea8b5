"""Decoding speech that a presenter's program pushes: WAV files or raw PCM.

Raw PCM carries its format in the request (``rate``, ``channels``, ``format``); a WAV chunk
carries it in its header. Anything malformed raises :class:`SpeechFormatError` with a reason
the server returns as a 4xx.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_RATE_HZ = 8_000
MAX_RATE_HZ = 192_000
MAX_CHANNELS = 8
WAV_TYPES = frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"})
RAW_TYPES = frozenset({"application/octet-stream", "audio/pcm"})
RAW_FORMATS: dict[str, np.dtype[Any]] = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}


class SpeechFormatError(ValueError):
    """Pushed speech that cannot be decoded; the message says why."""


class UnsupportedMediaTypeError(SpeechFormatError):
    """A content type that is neither WAV nor raw PCM (HTTP 415)."""


@dataclass(frozen=True)
class RawFormat:
    """The format of raw PCM chunks."""

    rate_hz: int
    channels: int = 1
    sample_format: str = "s16le"

    @property
    def frame_bytes(self) -> int:
        return RAW_FORMATS[self.sample_format].itemsize * self.channels


def check_rate(rate: object) -> int:
    """A sample rate from a request, as an int within ``MIN_RATE_HZ..MAX_RATE_HZ``."""
    try:
        value = int(str(rate))
    except ValueError:
        raise SpeechFormatError(f"sample rate {rate!r} is not an integer number of Hz") from None
    if not MIN_RATE_HZ <= value <= MAX_RATE_HZ:
        raise SpeechFormatError(
            f"sample rate {value} Hz is outside {MIN_RATE_HZ}..{MAX_RATE_HZ} Hz"
        )
    return value


def raw_format(params: Mapping[str, str]) -> RawFormat:
    """The raw PCM format from query parameters ``rate`` (required), ``channels``, ``format``."""
    if "rate" not in params:
        raise SpeechFormatError(
            "raw PCM needs its sample rate: add ?rate=16000 (and optionally "
            "&channels=1&format=s16le|f32le)"
        )
    rate = check_rate(params["rate"])
    try:
        channels = int(params.get("channels", "1"))
    except ValueError:
        raise SpeechFormatError(f"channels={params.get('channels')!r} is not an integer") from None
    if not 1 <= channels <= MAX_CHANNELS:
        raise SpeechFormatError(f"channels={channels} is outside 1..{MAX_CHANNELS}")
    fmt = params.get("format", "s16le")
    if fmt not in RAW_FORMATS:
        raise SpeechFormatError(f"format={fmt!r} is not one of {', '.join(sorted(RAW_FORMATS))}")
    return RawFormat(rate, channels, fmt)


def decode_raw(data: bytes, fmt: RawFormat) -> np.ndarray:
    """Raw PCM bytes -> (n, channels) int16 or float32 samples."""
    if len(data) % fmt.frame_bytes:
        raise SpeechFormatError(
            f"{len(data)} bytes is not a whole number of {fmt.channels}-channel "
            f"{fmt.sample_format} sample frames ({fmt.frame_bytes} bytes each)"
        )
    pcm = np.frombuffer(data, dtype=RAW_FORMATS[fmt.sample_format]).reshape(-1, fmt.channels)
    pcm = pcm.astype(pcm.dtype.newbyteorder("="), copy=False)
    if pcm.dtype.kind == "f" and not np.isfinite(pcm).all():
        raise SpeechFormatError("float PCM holds NaN or infinite samples")
    return pcm


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """A WAV file's bytes -> ((n, channels) float32 samples, sample rate)."""
    import soundfile

    try:
        pcm, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise SpeechFormatError(f"the body is not a readable WAV file: {e}") from e
    rate = check_rate(rate)
    if pcm.shape[1] > MAX_CHANNELS:
        raise SpeechFormatError(f"{pcm.shape[1]} channels is more than {MAX_CHANNELS}")
    return pcm, rate


def decode_speech(
    content_type: str, data: bytes, params: Mapping[str, str]
) -> tuple[np.ndarray, int]:
    """Decode a push by its content type: WAV, or raw PCM described by ``params``."""
    if content_type in WAV_TYPES:
        return decode_wav(data)
    if content_type in RAW_TYPES:
        fmt = raw_format(params)
        return decode_raw(data, fmt), fmt.rate_hz
    raise UnsupportedMediaTypeError(
        f"Content-Type {content_type or '(none)'!r} is not speech: send audio/wav, or raw PCM "
        "as application/octet-stream with ?rate=...&channels=...&format=s16le|f32le"
    )


__all__ = [
    "MAX_RATE_HZ",
    "MIN_RATE_HZ",
    "RawFormat",
    "SpeechFormatError",
    "UnsupportedMediaTypeError",
    "check_rate",
    "decode_raw",
    "decode_speech",
    "decode_wav",
    "raw_format",
]
