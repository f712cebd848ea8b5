"""``talkstream live``'s publishing output: the live avatar and the captured voice into an SFU.

:class:`PublishSink` is a ``FrameSink`` of :mod:`talkstream.streaming.live`. It owns one aiortc
peer, published into a Janus VideoRoom or to a WHIP endpoint with the same codecs and bitrate
policy as ``talkstream publish`` (VP8 held at a steady bitrate, Opus), and runs it on an
asyncio loop in a thread of its own. The live loop's thread only hands frames over:

- ``video(image, k)``: slot ``k`` becomes a VP8 input frame stamped ``k * 3600`` (90 kHz);
- ``audio(pcm, rate)``: the captured int16 mono is resampled to 48 kHz and cut into 20 ms Opus
  frames stamped by their sample count, continuous from the first captured sample.

A/V alignment is the file output's: slot ``k`` shows the face for audio time ``k / 25 s``, so
both timelines start at the first captured sample. The live loop sends slot ``k`` only once the
clock has passed ``k / 25 s + delay``; the captured audio arrives ``delay`` earlier. The sink
therefore holds the audio back and releases it in step with the slots (audio up to the end of
slot ``k`` when slot ``k`` is handed over), so the voice leaves delayed by exactly the video's
delay. Both tracks then leave at the pace of their timestamps against one shared wall-clock
anchor: a receiver's lip sync (RTCP sender reports map each stream's timestamps to the send
time) lines them up, and a burst (the clip's tail, an unclocked input) goes out in real time.

Nothing here blocks the live loop: each track has a bounded queue that drops its oldest frame
when the peer stalls (counted in :class:`PublishStats`). If the SFU ends the publication, the
next hand-over raises a one-line :class:`PublishError` and the live run stops.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeVar

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, AudioResampler, VideoFrame

from talkstream.config import FPS
from talkstream.errors import TalkstreamError
from talkstream.publish.publisher import (
    CONNECT_TIMEOUT_S,
    JanusPublication,
    PublishError,
    WhipPublication,
    publish_to_janus,
    publish_to_whip,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

VIDEO_CLOCK_HZ = 90_000
OPUS_RATE_HZ = 48_000
OPUS_FRAME = OPUS_RATE_HZ // 50  # 20 ms
SAMPLES_PER_SLOT = OPUS_RATE_HZ // FPS  # 1920 at 25 fps
# Queues: about half a second each. A peer that takes nothing for longer loses the oldest.
VIDEO_QUEUE = 12
AUDIO_QUEUE = 25
# A frame later than this against the anchor re-anchors (a stall); a backlog longer than this
# is sent at once and re-anchors too (the capture clock ran ahead of the wall clock).
LATE_S = 0.25
BACKLOG_S = 0.3
DRAIN_TIMEOUT_S = 1.5  # finish(): how long the queued tail may take to leave
CLOSE_TIMEOUT_S = 3.0  # leaving the room / DELETE of the WHIP resource


@dataclass(frozen=True)
class PublishTarget:
    """Where ``talkstream live --janus/--whip`` publishes."""

    janus: str | None = None  # Janus HTTP API URL (.../janus)
    room: int = 1234
    display: str = "talkstream"
    whip: str | None = None  # WHIP endpoint URL
    token: str | None = None
    ice_local_only: bool = False  # gather ICE on this machine's first IPv4 only (local SFU)

    def __post_init__(self) -> None:
        if (self.janus is None) == (self.whip is None):
            raise ValueError("a PublishTarget needs exactly one of janus and whip")

    @property
    def where(self) -> str:
        if self.janus:
            return f"Janus room {self.room} at {self.janus}"
        return f"WHIP endpoint {self.whip}"


async def check_target(target: PublishTarget) -> None:
    """Fail fast, in one line, when the destination does not answer (before a mic opens)."""
    from talkstream.publish.cli import PublishConfig, check_destination

    await check_destination(PublishConfig(whip=target.whip, token=target.token, janus=target.janus))


@dataclass
class PublishStats:
    video_queued: int = 0
    video_sent: int = 0
    video_dropped: int = 0  # oldest frames dropped because the peer did not take them
    audio_queued: int = 0
    audio_sent: int = 0
    audio_dropped: int = 0


class _Pacer:
    """One wall-clock anchor for both tracks: media time ``t`` leaves at ``anchor + t``."""

    def __init__(self) -> None:
        self.anchor: float | None = None
        self.reanchored = 0

    async def wait(self, t_s: float, backlog_s: float) -> None:
        now = time.monotonic()
        if self.anchor is None:
            self.anchor = now - t_s
        elif now > self.anchor + t_s + LATE_S or backlog_s > BACKLOG_S:
            self.anchor = now - t_s
            self.reanchored += 1
        delay = self.anchor + t_s - now
        if delay > 0:
            await asyncio.sleep(delay)


class QueueTrack(MediaStreamTrack):
    """A track fed from another thread through a bounded queue (oldest dropped when full)."""

    def __init__(
        self,
        kind: str,
        loop: asyncio.AbstractEventLoop,
        pacer: _Pacer,
        maxlen: int,
        frame_s: float,
    ) -> None:
        super().__init__()
        self.kind = kind
        self._feed_loop = loop  # pyee's emitter has a _loop of its own
        self._pacer = pacer
        self._frame_s = frame_s
        self._queue: collections.deque[AudioFrame | VideoFrame] = collections.deque(maxlen=maxlen)
        self._ready = asyncio.Event()
        self._ended = False
        self._pacing = False  # a frame taken from the queue waits for its time
        self.queued = self.sent = self.dropped = 0

    # Any thread; never waits.
    def put(self, frame: AudioFrame | VideoFrame) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1  # the append below pushes the oldest out
        self._queue.append(frame)
        self.queued += 1
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nothing waits
            self._feed_loop.call_soon_threadsafe(self._ready.set)

    @property
    def backlog(self) -> int:
        """Frames not yet handed to the encoder."""
        return len(self._queue) + self._pacing

    def end(self) -> None:
        """No more frames: recv() raises once the queue is empty (call on the loop)."""
        self._ended = True
        self._ready.set()

    async def recv(self) -> AudioFrame | VideoFrame:
        while not self._queue:
            if self._ended or self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        frame = self._queue.popleft()
        assert frame.pts is not None and frame.time_base is not None
        self._pacing = True
        try:
            await self._pacer.wait(
                float(frame.pts * frame.time_base), len(self._queue) * self._frame_s
            )
        finally:
            self._pacing = False
        self.sent += 1
        return frame


class PublishSink:
    """A live output that publishes the avatar and the captured voice (see the module doc).

    Connects in the constructor (raises a one-line :class:`TalkstreamError` if it cannot);
    ``video``/``audio`` are called from the live loop's thread and never wait.
    """

    def __init__(self, target: PublishTarget, *, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.target = target
        self.stats = PublishStats()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="talkstream-publish", daemon=True
        )
        self._thread.start()
        self._pacer = _Pacer()
        self._resampler: AudioResampler | None = None
        self._resampler_rate = 0
        self._audio_buf = np.zeros(0, np.int16)  # 48 kHz, not yet cut into frames
        self._audio_pts = 0  # next Opus frame's first sample (48 kHz, from the first capture)
        self._audio_until = 0  # released up to here: the end of the last slot handed over
        self._closed = False
        try:
            self.video_track, self.audio_track, self.pub = self._call(
                self._connect(timeout_s), timeout_s + 15.0
            )
        except BaseException:
            self._stop_loop()
            raise
        self.description = self._describe()

    def _describe(self) -> str:
        s = self.stats
        feed = f" (feed {self.pub.feed})" if isinstance(self.pub, JanusPublication) else ""
        dropped = (
            f", {s.video_dropped} video / {s.audio_dropped} audio frames dropped (peer stalled)"
            if s.video_dropped or s.audio_dropped
            else ""
        )
        return (
            f"published to {self.target.where}{feed}: {s.video_sent} video frames, "
            f"{s.audio_sent * OPUS_FRAME / OPUS_RATE_HZ:.2f} s of audio{dropped}"
        )

    # -- the loop thread -----------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise PublishError(
                f"{self.target.where} did not answer within {timeout:.0f} s"
            ) from None

    async def _connect(
        self, timeout: float
    ) -> tuple[QueueTrack, QueueTrack, JanusPublication | WhipPublication]:
        loop = asyncio.get_running_loop()
        video = QueueTrack("video", loop, self._pacer, VIDEO_QUEUE, 1 / FPS)
        audio = QueueTrack("audio", loop, self._pacer, AUDIO_QUEUE, OPUS_FRAME / OPUS_RATE_HZ)
        ice: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if self.target.ice_local_only:
            from talkstream.publish import local

            address = local.local_ice_address()
            if address is None:
                raise TalkstreamError(
                    "--ice-local-only: this machine has no IPv4 address but loopback"
                )
            ice = local.use_local_ice(address)
        with ice:
            pub: JanusPublication | WhipPublication
            if self.target.janus:
                pub = await publish_to_janus(
                    (audio, video),
                    self.target.janus,
                    self.target.room,
                    display=self.target.display,
                    timeout=timeout,
                )
            else:
                assert self.target.whip is not None
                pub = await publish_to_whip(
                    (audio, video), self.target.whip, token=self.target.token, timeout=timeout
                )
        log.info("publishing to %s", self.target.where)
        return video, audio, pub

    async def _drain_and_close(self, drain_s: float) -> None:
        self.video_track.end()
        self.audio_track.end()
        deadline = time.monotonic() + drain_s
        while (self.video_track.backlog or self.audio_track.backlog) and (
            time.monotonic() < deadline and not self.pub.ended.is_set()
        ):
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # the last frames' packets leave the encoder
        await self._close_pub()

    async def _close_pub(self) -> None:
        try:
            await asyncio.wait_for(self.pub.close(), CLOSE_TIMEOUT_S)
        except (TimeoutError, TalkstreamError) as e:
            log.warning("leaving %s: %s", self.target.where, e or type(e).__name__)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def _update_stats(self) -> None:
        v, a, s = self.video_track, self.audio_track, self.stats
        s.video_queued, s.video_sent, s.video_dropped = v.queued, v.sent, v.dropped
        s.audio_queued, s.audio_sent, s.audio_dropped = a.queued, a.sent, a.dropped
        self.description = self._describe()

    # -- FrameSink (the live loop's thread) ------------------------------------------------------

    def _check(self) -> None:
        if self.pub.ended.is_set():
            raise PublishError(f"the stream to {self.target.where} ended: {self.pub.end_reason}")

    def video(self, image: np.ndarray, pts: int) -> None:
        self._check()
        frame = VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = pts * (VIDEO_CLOCK_HZ // FPS)
        frame.time_base = Fraction(1, VIDEO_CLOCK_HZ)
        self.video_track.put(frame)
        # The voice of slot k goes with it (see the module doc).
        self._audio_until = (pts + 1) * SAMPLES_PER_SLOT
        self._release_audio()

    def audio(self, pcm: np.ndarray, rate_hz: int) -> None:
        self._check()
        x = self._resample(np.asarray(pcm, np.int16).reshape(-1), rate_hz)
        self._audio_buf = np.concatenate([self._audio_buf, x])
        self._release_audio()

    def _resample(self, pcm: np.ndarray, rate_hz: int) -> np.ndarray:
        if rate_hz == OPUS_RATE_HZ:
            return pcm
        if self._resampler is None or rate_hz != self._resampler_rate:
            self._resampler = AudioResampler(format="s16", layout="mono", rate=OPUS_RATE_HZ)
            self._resampler_rate = rate_hz
        frame = AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = rate_hz
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.int16)

    def _release_audio(self, flush: bool = False) -> None:
        while self._audio_buf.size >= OPUS_FRAME and (
            flush or self._audio_pts + OPUS_FRAME <= self._audio_until
        ):
            self._put_audio(self._audio_buf[:OPUS_FRAME])
            self._audio_buf = self._audio_buf[OPUS_FRAME:]
        if flush and self._audio_buf.size:
            tail = np.zeros(OPUS_FRAME, np.int16)
            tail[: self._audio_buf.size] = self._audio_buf
            self._put_audio(tail)
            self._audio_buf = np.zeros(0, np.int16)

    def _put_audio(self, samples: np.ndarray) -> None:
        frame = AudioFrame.from_ndarray(samples[None, :].copy(), format="s16", layout="mono")
        frame.sample_rate = OPUS_RATE_HZ
        frame.pts = self._audio_pts
        frame.time_base = Fraction(1, OPUS_RATE_HZ)
        self._audio_pts += OPUS_FRAME
        self.audio_track.put(frame)

    def finish(self) -> None:
        """Send what is queued (at most ~``DRAIN_TIMEOUT_S``), then leave the room / DELETE."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._resampler is not None:  # the resampler's last samples
                rest = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(None)]
                self._audio_buf = np.concatenate([self._audio_buf, *rest])
            self._release_audio(flush=True)
            self._call(
                self._drain_and_close(DRAIN_TIMEOUT_S), DRAIN_TIMEOUT_S + CLOSE_TIMEOUT_S + 2
            )
        finally:
            self._update_stats()
            self._stop_loop()
        if self.stats.video_dropped or self.stats.audio_dropped:
            log.warning(
                "the peer stalled: %d video and %d audio frames were dropped",
                self.stats.video_dropped,
                self.stats.audio_dropped,
            )

    def abort(self) -> None:
        """Leave at once (what is queued is lost)."""
        if self._closed:
            return
        self._closed = True
        try:
            with contextlib.suppress(TalkstreamError):
                self._call(self._close_pub(), CLOSE_TIMEOUT_S + 2)
        finally:
            self._update_stats()
            self._stop_loop()


__all__ = ["PublishSink", "PublishStats", "PublishTarget", "QueueTrack", "check_target"]
