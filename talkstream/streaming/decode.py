"""Bounded decoding of pushed speech: a small compressed file cannot become a huge array.

A 94 KB FLAC can declare 60 s of 8-channel 192 kHz audio (92 M samples, 370 MB as float32).
:func:`decode_audio_capped` reads the header first and refuses what it declares beyond the caps,
then decodes block by block, so even a file that lies about (or omits) its length stops at the
cap; NaN and infinite samples are refused. The caller runs it off the event loop
(:class:`PushDecoder`).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from talkstream.streaming.media import (
    MAX_CHANNELS,
    MAX_RATE_HZ,
    MIN_RATE_HZ,
    RAW_TYPES,
    WAV_TYPES,
    SpeechFormatError,
    UnsupportedMediaTypeError,
    decode_raw,
    raw_format,
)

# Compressed formats libsndfile decodes, accepted by their own content types too.
FILE_TYPES = WAV_TYPES | frozenset({"audio/flac", "audio/x-flac", "audio/ogg"})
BLOCK_FRAMES = 16384
# libsndfile reports the largest int64 as the length of a file that does not declare it.
UNKNOWN_FRAMES = 1 << 62


class DecodeBusyError(SpeechFormatError):
    """Too many pushes waiting to be decoded (HTTP 429)."""


@dataclass(frozen=True)
class DecodeLimits:
    """Caps on one push, checked before the samples are allocated."""

    max_seconds: float = 60.0
    # frames x channels; 4 Mi float32 samples is 16 MiB.
    max_samples: int = 4 * 1024 * 1024
    max_channels: int = MAX_CHANNELS
    min_rate_hz: int = MIN_RATE_HZ
    max_rate_hz: int = MAX_RATE_HZ

    def check(self, frames: int, channels: int, rate: int) -> None:
        """Refuse a format or a length beyond the caps (SpeechFormatError)."""
        if not 1 <= channels <= self.max_channels:
            raise SpeechFormatError(f"{channels} channels is outside 1..{self.max_channels}")
        if not self.min_rate_hz <= rate <= self.max_rate_hz:
            raise SpeechFormatError(
                f"sample rate {rate} Hz is outside {self.min_rate_hz}..{self.max_rate_hz} Hz"
            )
        if frames / rate > self.max_seconds:
            raise SpeechFormatError(
                f"the push holds {frames / rate:.1f} s of audio; at most {self.max_seconds:g} s "
                "per push (split it into several pushes)"
            )
        if frames * channels > self.max_samples:
            raise SpeechFormatError(
                f"the push decodes to {frames * channels} samples ({channels} channels at "
                f"{rate} Hz); at most {self.max_samples} per push"
            )


def decode_audio_capped(data: bytes, limits: DecodeLimits) -> tuple[np.ndarray, int]:
    """An audio file's bytes (WAV, FLAC, Ogg: whatever libsndfile reads) -> ((n, channels)
    float32 samples, sample rate), within ``limits``.

    Raises:
        SpeechFormatError: unreadable, over a cap (declared or actual), or NaN/Inf samples.
    """
    import soundfile

    try:
        f = soundfile.SoundFile(io.BytesIO(data))
    except (RuntimeError, TypeError, ValueError, OSError, EOFError) as e:
        raise SpeechFormatError(f"the body is not a readable audio file ({_reason(e)})") from None
    with f:
        channels, rate = int(f.channels), int(f.samplerate)
        declared = int(f.frames)
        if not 0 <= declared < UNKNOWN_FRAMES:  # a stream that did not say its length
            declared = 0
        limits.check(declared, channels, rate)  # refused before anything is decoded
        max_frames = min(int(limits.max_seconds * rate), limits.max_samples // channels)
        blocks: list[np.ndarray] = []
        total = 0
        while True:
            want = min(BLOCK_FRAMES, max_frames + 1 - total)
            try:
                block = f.read(want, dtype="float32", always_2d=True)
            except (RuntimeError, TypeError, ValueError, OSError, EOFError) as e:
                raise SpeechFormatError(
                    f"the audio file is damaged after {total} frames ({_reason(e)})"
                ) from None
            if not block.shape[0]:
                break
            total += block.shape[0]
            if total > max_frames:
                # The header understated the length: the same refusal as a declared one.
                limits.check(total, channels, rate)
                raise SpeechFormatError(f"the push decodes to more than {max_frames} frames")
            if not np.isfinite(block).all():
                raise SpeechFormatError("the audio holds NaN or infinite samples")
            blocks.append(block)
    if not blocks:
        return np.zeros((0, channels), np.float32), rate
    return np.concatenate(blocks), rate


def _reason(e: BaseException) -> str:
    """libsndfile's own words for what is wrong (never the exception's class or repr)."""
    reason = getattr(e, "error_string", None)
    if isinstance(reason, str) and reason:
        return reason.rstrip(".")[:200]
    return "not a format libsndfile reads"


def clip_float(pcm: np.ndarray) -> np.ndarray:
    """Float samples clipped to [-1, 1] (full scale); integer samples as they are. Random
    bytes sent as f32le are finite but huge, and would overflow the int16 conversion."""
    return np.clip(pcm, -1.0, 1.0) if pcm.dtype.kind == "f" else pcm


def decode_push(
    content_type: str, data: bytes, params: Mapping[str, str], limits: DecodeLimits
) -> tuple[np.ndarray, int]:
    """Decode a push by its content type: an audio file, or raw PCM described by ``params``."""
    if content_type in FILE_TYPES:
        pcm, rate = decode_audio_capped(data, limits)
        return clip_float(pcm), rate
    if content_type in RAW_TYPES:
        fmt = raw_format(params)
        limits.check(len(data) // fmt.frame_bytes, fmt.channels, fmt.rate_hz)
        return clip_float(decode_raw(data, fmt)), fmt.rate_hz
    raise UnsupportedMediaTypeError(
        f"Content-Type {content_type or '(none)'!r} is not speech: send audio/wav (or "
        "audio/flac, audio/ogg), or raw PCM as application/octet-stream with "
        "?rate=...&channels=...&format=s16le|f32le"
    )


class PushDecoder:
    """Decodes pushes on one thread of its own, never on the event loop nor in the loop's
    default executor (aiortc's encoders use that one); at most ``max_waiting`` pushes wait,
    beyond that :class:`DecodeBusyError`."""

    def __init__(self, limits: DecodeLimits, max_waiting: int = 4) -> None:
        self.limits = limits
        self.max_waiting = max_waiting
        self._pending = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="talkstream-decode")

    async def decode(
        self, content_type: str, data: bytes, params: Mapping[str, str]
    ) -> tuple[np.ndarray, int]:
        if self._pending >= self.max_waiting:
            raise DecodeBusyError(
                f"{self._pending} pushes are already being decoded; retry in a moment"
            )
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._pool, decode_push, content_type, data, dict(params), self.limits
            )
        finally:
            self._pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = [
    "FILE_TYPES",
    "DecodeBusyError",
    "DecodeLimits",
    "PushDecoder",
    "clip_float",
    "decode_audio_capped",
    "decode_push",
]
