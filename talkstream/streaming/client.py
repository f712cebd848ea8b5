"""A Python WebRTC client for the server: tests, benchmarks, and programs that talk to an avatar.

:class:`SpeechTrack` plays a signal as a real-time microphone; :func:`connect` sends it to a
server (``/offer``) or watches a presenter (``/presenters/{name}/offer``), and
:class:`ReceivedMedia` keeps what came back: arrival times and timestamps of every video and
audio frame, and optionally the decoded images.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, VideoFrame

from talkstream.streaming.clock import AUDIO_PTIME_SAMPLES, OUT_RATE_HZ

log = logging.getLogger(__name__)


class SpeechTrack(MediaStreamTrack):
    """An audio track that plays ``signal`` (mono float, 48 kHz) in real time, then silence.

    Frames are 20 ms, timestamped by a sample counter and paced by the wall clock, as a
    microphone is.
    """

    kind = "audio"

    def __init__(self, signal: np.ndarray, *, loop: bool = False) -> None:
        super().__init__()
        self.signal = np.clip(np.asarray(signal, dtype=np.float32), -1.0, 1.0)
        self.loop = loop
        self.samples_sent = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        n = AUDIO_PTIME_SAMPLES
        if self._start is None:
            self._start = time.monotonic()
        else:
            wait = self._start + self.samples_sent / OUT_RATE_HZ - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        pos = self.samples_sent
        length = self.signal.shape[0]
        if self.loop and length:
            idx = (np.arange(pos, pos + n) % length).astype(np.int64)
            chunk = self.signal[idx]
        else:
            chunk = np.zeros(n, dtype=np.float32)
            if pos < length:
                part = self.signal[pos : pos + n]
                chunk[: part.shape[0]] = part
        pcm = (chunk * 32767).astype(np.int16)
        frame = AudioFrame(format="s16", layout="mono", samples=n)
        frame.planes[0].update(pcm.tobytes())
        frame.pts = pos
        frame.sample_rate = OUT_RATE_HZ
        frame.time_base = fractions.Fraction(1, OUT_RATE_HZ)
        self.samples_sent += n
        return frame


def arrival_rate(times: list[float], last_s: float | None = None) -> float:
    """Events per second from their arrival times (over the last ``last_s`` seconds)."""
    t = times
    if last_s is not None and t:
        t = [x for x in t if x >= t[-1] - last_s]
    if len(t) < 2:
        return 0.0
    return (len(t) - 1) / (t[-1] - t[0])


@dataclass
class ReceivedMedia:
    """What a client received."""

    keep_images: bool = False
    video_arrivals: list[float] = field(default_factory=list)  # monotonic seconds
    video_pts: list[int] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)  # (H, W, 3) RGB, if kept
    audio_arrivals: list[float] = field(default_factory=list)
    audio_rms: list[float] = field(default_factory=list)  # per received audio frame
    audio_pts: list[int] = field(default_factory=list)

    def fps(self, last_s: float | None = None) -> float:
        """Received video frames per second (over the last ``last_s`` seconds)."""
        return arrival_rate(self.video_arrivals, last_s)


@dataclass
class ClientPeer:
    """A connected client: its peer connection, what it receives, the server's answer."""

    pc: RTCPeerConnection
    received: ReceivedMedia
    answer: dict[str, Any]
    tasks: list[asyncio.Task[None]]

    @property
    def session_id(self) -> str:
        return str(self.answer["session_id"])

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.pc.close()


async def _collect(track: MediaStreamTrack, rec: ReceivedMedia) -> None:
    try:
        while True:
            frame = await track.recv()
            now = time.monotonic()
            if isinstance(frame, VideoFrame):
                rec.video_arrivals.append(now)
                rec.video_pts.append(int(frame.pts or 0))
                if rec.keep_images:
                    rec.images.append(frame.to_ndarray(format="rgb24"))
            elif isinstance(frame, AudioFrame):
                x = frame.to_ndarray().astype(np.float32) / 32768.0
                rec.audio_arrivals.append(now)
                rec.audio_rms.append(float(np.sqrt(np.mean(x * x))) if x.size else 0.0)
                rec.audio_pts.append(int(frame.pts or 0))
    except MediaStreamError:
        pass


async def connect(
    base_url: str,
    *,
    mic: MediaStreamTrack | None = None,
    presenter: str | None = None,
    keep_images: bool = False,
    session: Any = None,
) -> ClientPeer:
    """Open a live session (with ``mic``) or watch ``presenter``; returns once answered.

    Raises:
        RuntimeError: the server refused the offer (its status and reason in the message).
    """
    import aiohttp

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    rec = ReceivedMedia(keep_images=keep_images)
    tasks: list[asyncio.Task[None]] = []

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        tasks.append(asyncio.create_task(_collect(track, rec)))

    if mic is not None:
        pc.addTrack(mic)
    else:
        pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    url = base_url.rstrip("/") + (f"/presenters/{presenter}/offer" if presenter else "/offer")
    body = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
    own = session is None
    http = aiohttp.ClientSession() if own else session
    try:
        async with http.post(url, json=body) as resp:
            answer = await resp.json()
            if resp.status != 200:
                await pc.close()
                raise RuntimeError(f"offer refused: {resp.status} {answer}")
    finally:
        if own:
            await http.close()
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    return ClientPeer(pc, rec, answer, tasks)


__all__ = ["ClientPeer", "ReceivedMedia", "SpeechTrack", "connect"]
