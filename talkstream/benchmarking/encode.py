"""What ``serve`` does to a rendered frame before it leaves the machine, for the benchmark to time.

A frame goes out of ``talkstream serve`` as VP8 RTP payloads: the video track converts the RGB
frame to yuv420p planes once per displayed index (``AvatarStream.video_frame``: swscale through
PyAV for a host frame; for a GPU frame the conversion runs on the GPU and only the planes are
copied to the host, ``compose.i420_host``), wraps them in a PyAV ``VideoFrame`` and aiortc's
RTP sender encodes it with its ``Vp8Encoder`` (libvpx through PyAV, realtime, CBR 500 kbit/s)
and packetizes it. :class:`VideoSender` does exactly those calls with the same classes, so the
benchmark's ``i420`` + ``vp8`` stages are what one frame costs a live stream.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np

from talkstream.errors import TalkstreamError

VIDEO_CLOCK_HZ = 90_000  # RTP video clock (aiortc's VIDEO_TIME_BASE)
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK_HZ)


def serve_i420(image: Any) -> np.ndarray:
    """The yuv420p planes of an (H, W, 3) uint8 RGB frame, made by the video track's own
    function (``talkstream.streaming.tracks.video_planes``): odd sizes cropped to even,
    swscale on the host, the conversion on the GPU for a device frame.

    Returns a (3 H' / 2, W') uint8 array (H', W' = H, W rounded down to even).
    """
    from talkstream.streaming.tracks import video_planes

    return video_planes(image)


def vp8_available() -> tuple[bool, str]:
    """(True, "") when aiortc's VP8 encoder can be imported, else (False, what to install)."""
    try:
        from aiortc.codecs.vpx import Vp8Encoder  # noqa: F401
    except ImportError as e:
        return False, (
            f"timing the VP8 encode needs aiortc ({e.name} is missing): pip install "
            "'talkstream[serve]', or pass --no-encode"
        )
    return True, ""


class VideoSender:
    """One stream's video encoder, as ``serve``'s RTP sender runs it (aiortc ``Vp8Encoder``)."""

    def __init__(self, fps: int) -> None:
        ok, why = vp8_available()
        if not ok:
            raise TalkstreamError(why)
        from aiortc.codecs.vpx import Vp8Encoder

        self.encoder = Vp8Encoder()
        self.ticks_per_frame = VIDEO_CLOCK_HZ // fps
        self.frames = 0
        self.payload_bytes = 0

    def send(self, yuv: np.ndarray, pts: int) -> int:
        """Encode one frame's planes (frame ``pts``) into RTP payloads; returns their bytes."""
        from av import VideoFrame

        vf = VideoFrame.from_ndarray(yuv, format="yuv420p")
        vf.pts = pts * self.ticks_per_frame
        vf.time_base = VIDEO_TIME_BASE
        payloads, _timestamp = self.encoder.encode(vf, False)
        n = sum(len(p) for p in payloads)
        self.frames += 1
        self.payload_bytes += n
        return n


__all__ = ["VIDEO_TIME_BASE", "VideoSender", "serve_i420", "vp8_available"]
