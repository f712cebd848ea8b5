"""Avatar streams and their WebRTC tracks.

An :class:`AvatarStream` owns one engine ``Session``, one :class:`MediaClock` and one timeline of
48 kHz speech (see :mod:`talkstream.streaming.clock`). Its parts have their own modules: the
timeline and the presenter's speech queue (:mod:`talkstream.streaming.timeline`), the
drop-late pacing of rendered frames (:mod:`talkstream.streaming.pacing`); the stream keeps the
lifecycle, the tasks, the live input's placement and the output. Speech comes in one of two
ways:

- ``live``: decoded frames of a peer's microphone track (:meth:`AvatarStream.push_frame`), placed
  on the timeline by their RTP timestamps; where the input is late beyond the jitter budget
  (a stalled microphone, lost packets), silence stands in, so the avatar keeps moving (idly);
- ``presenter``: chunks pushed by a program (:meth:`AvatarStream.push_speech`), queued and fed to
  the timeline at real-time pace; silence when the queue is empty; :meth:`interrupt` clears it
  and cuts the speech already fed from the next frame on (voice and face stop together).

Every timeline sample goes to the session as it is written. The session's frames are rendered
in the engine's worker, one small batch at a time; frames whose display time will have passed
before they could be rendered are skipped, never queued. Any number of
:class:`AvatarVideoTrack` / :class:`AvatarAudioTrack` pairs (one per viewer) read the same
rendered frames and the same timeline through the same clock: the avatar renders once per
stream, not once per viewer. A track never waits for the engine: at a frame's display time it
shows the newest frame rendered so far, and the audio track plays the timeline (or silence).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, VideoFrame

from talkstream.engine.audio import StreamingResampler, to_mono_float32
from talkstream.engine.avatar import Avatar
from talkstream.engine.compose import i420_host, to_host
from talkstream.engine.pipeline import Engine, Frame
from talkstream.streaming.clock import (
    AUDIO_PTIME_SAMPLES,
    AUDIO_TIME_BASE,
    OUT_RATE_HZ,
    SAMPLES_PER_FRAME_48K,
    VIDEO_TIME_BASE,
    MediaClock,
)
from talkstream.streaming.config import ANTICIPATION_FRAMES, REWIND_FRAMES, StreamConfig
from talkstream.streaming.metrics import StreamMetrics
from talkstream.streaming.pacing import FramePacer
from talkstream.streaming.timeline import TRACE_LEN, AudioTimeline, SpeechQueue, rms, to_int16
from talkstream.streaming.timeline import QueueFullError as QueueFullError  # re-exported

log = logging.getLogger(__name__)

Mode = Literal["live", "presenter"]

TICK_S = AUDIO_PTIME_SAMPLES / OUT_RATE_HZ  # 20 ms: how often the timeline is topped up
# Rendered frames kept for display; they run ahead of the display by at most the input lead.
MAX_RENDERED_FRAMES = 16
# A track that wakes this late (an event-loop stall) jumps to the present instead of bursting.
MAX_TRACK_LAG_S = 0.1
# Live input this far behind the timeline is a stream resuming after a stall: re-anchored.
REANCHOR_BEHIND_S = 0.5
# Input louder than this (RMS, full scale 1) counts as speech in the stats.
SPEECH_RMS = 0.01


def audio_frame_to_mono(frame: AudioFrame) -> np.ndarray:
    """Mono float32 samples of a decoded audio frame, any sample format and layout."""
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    # Planar frames are (ch, n); interleaved ones (1, n * ch). Either way: (n, ch).
    pcm = arr.T if frame.format.is_planar else arr.reshape(-1, channels)
    if pcm.dtype == np.uint8:  # unsigned 8-bit PCM is centred on 128
        pcm = (pcm.astype(np.float32) - 128.0) / 128.0
    return to_mono_float32(np.ascontiguousarray(pcm))


def _inner_lip_opening(landmarks: np.ndarray) -> float:
    """Mean gap of the inner-lip pairs 61-67, 62-66, 63-65 of (68, 2) landmarks."""
    d = landmarks[[67, 66, 65]] - landmarks[[61, 62, 63]]
    return float(np.sqrt((d**2).sum(axis=-1)).mean())


@dataclass
class StreamStats:
    """Counters of one stream (also summed into the server's metrics)."""

    frames_rendered: int = 0
    frames_skipped: int = 0
    frames_repeated: int = 0
    frames_displayed: int = 0
    input_s: float = 0.0  # real audio received
    speech_s: float = 0.0  # of which louder than SPEECH_RMS
    silence_filled_s: float = 0.0  # live input that was late or missing
    render_ms_ema: float = 0.0
    slack_ms_ema: float = 0.0
    display_fps: float = 0.0  # fresh frames shown per second (EMA)
    early_starts: int = 0  # presenter speech started early (StreamConfig.early_speech_start)
    early_start_s: float = 0.0  # the time those starts gained, in all


def video_planes(image: Any) -> np.ndarray:
    """The yuv420p planes the video encoder gets for an (H, W, 3) uint8 RGB frame: odd sizes
    cropped to even; swscale (PyAV) for a host frame; a GPU frame is converted on the device
    and only its planes are copied to the host, right before the encoder. ``talkstream bench``
    times this same function."""
    h, w = int(image.shape[0]), int(image.shape[1])
    h, w = h - h % 2, w - w % 2
    if not isinstance(image, np.ndarray):
        return i420_host(image[:h, :w])
    rgb = VideoFrame.from_ndarray(np.ascontiguousarray(image[:h, :w]), format="rgb24")
    yuv: np.ndarray = rgb.reformat(format="yuv420p").to_ndarray()  # (3H/2, W) uint8
    return yuv


class AvatarStream:
    """One avatar, one session, one clock; speech in, frames and delayed speech out.

    Args:
        engine: the loaded engine (shared).
        avatar: the prepared avatar.
        cfg: latency budget and bounds.
        mode: ``"live"`` (a peer's microphone) or ``"presenter"`` (pushed speech).
        name: for logs and stats.
        seed, lookahead: passed to ``engine.session``.
        metrics: server-wide metrics to report into (optional).
        now: monotonic wall clock (tests pass a fake one).
    """

    def __init__(
        self,
        engine: Engine,
        avatar: Avatar,
        cfg: StreamConfig,
        *,
        mode: Mode,
        name: str = "stream",
        seed: int | None = None,
        lookahead: int | None = None,
        metrics: StreamMetrics | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in ("live", "presenter"):
            raise ValueError(f"mode must be 'live' or 'presenter', got {mode!r}")
        self.engine = engine
        self.avatar = avatar
        self.cfg = cfg
        self.mode: Mode = mode
        self.name = name
        self.metrics = metrics
        self.session = engine.session(avatar, seed=seed, lookahead=lookahead)
        self.session.max_batch = cfg.frames_per_call
        if mode == "presenter" and cfg.early_speech_start:
            self.session.rewind_frames = REWIND_FRAMES
        algorithmic = self.session.latency_s
        jitter = cfg.jitter_budget_ms / 1000 if mode == "live" else 0.0
        compute = cfg.compute_budget_ms / 1000
        self.budget = {
            "algorithmic_s": algorithmic,
            "jitter_s": jitter,
            "compute_s": compute,
            "total_s": algorithmic + jitter + compute,
        }
        self.clock = MediaClock(self.budget["total_s"], now=now)
        self.stats = StreamStats()
        if metrics is not None:
            metrics.latency_seconds.observe(self.budget["total_s"])

        # The timeline: int16 mono 48 kHz by absolute sample position, each chunk passed on
        # to the session as it is written; the last replay_buffer_s kept for the audio tracks.
        self.timeline = AudioTimeline(
            int(cfg.replay_buffer_s * OUT_RATE_HZ),
            lambda pcm: self.session.push_audio(pcm, OUT_RATE_HZ),
            trace_len=TRACE_LEN,
        )
        # Live input: source position (48 kHz) + offset = timeline position.
        self._src_offset: int | None = None
        self._in_resampler: StreamingResampler | None = None
        # Presenter input: pushed speech (48 kHz int16) waiting to be fed to the timeline.
        self.speech = SpeechQueue(cfg.max_queued_speech_s, name=name)

        h, w = avatar.image.shape[:2]
        self._even_hw = (h - h % 2, w - w % 2)  # yuv420p wants even sizes
        # Rendered frames waiting for their display slot, and the drop-late rule.
        self.pacer: FramePacer[Frame] = FramePacer(
            lambda t: self.clock.output_position(t) / SAMPLES_PER_FRAME_48K,
            budget_s=compute,
            keep=MAX_RENDERED_FRAMES,
            started_at=now(),
        )
        # The frame shown as the newest displayed index: (index, its image, its yuv420p planes
        # once an encoder asked for them). Bookkeeping and conversions happen once per index.
        self._display_cache: tuple[int, Any, np.ndarray | None] | None = None
        self._last_display_t: float | None = None
        self.last_input_at = now()
        self.created_at = now()
        # Early speech start: timeline position where the current run of speech (speech after
        # silence) begins, while it may still move; and the last move (see push_speech).
        self._run_start: int | None = None
        self.speech_moved: tuple[int, int] | None = None
        # Traces for benchmarks and diagnosis: (frame pts, landmark motion) per rendered frame
        # (and the timeline's (sample, RMS) per input chunk: input_trace); bounded.
        self.motion_trace: deque[tuple[int, float]] = deque(maxlen=TRACE_LEN)
        # (frame pts, inner-lip opening of the frame's landmarks, normalised crop units).
        self.mouth_trace: deque[tuple[int, float]] = deque(maxlen=TRACE_LEN)
        self._last_landmarks: np.ndarray | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.closed_event = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the render and timeline tasks on the running loop."""
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._render_loop(), name=f"talkstream-render-{self.name}"),
            asyncio.create_task(self._tick_loop(), name=f"talkstream-tick-{self.name}"),
        ]

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Stop the tasks and end the session. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        self.session.end_audio()
        self.pacer.clear()
        self.speech.clear()
        self.closed_event.set()

    # -- the timeline (talkstream.streaming.timeline) -----------------------------------------

    @property
    def written(self) -> int:
        """Timeline samples written so far (48 kHz): the next input's position."""
        return self.timeline.written

    @property
    def queued_samples(self) -> int:
        """Presenter speech queued, not yet on the timeline (48 kHz samples)."""
        return self.speech.queued_samples

    @property
    def input_trace(self) -> deque[tuple[int, float]]:
        """(timeline sample, RMS) per input chunk written; bounded."""
        return self.timeline.trace

    def read_audio(self, start: int, n: int) -> np.ndarray:
        """Timeline samples ``[start, start + n)``, int16; silence where none are held."""
        return self.timeline.read(start, n)

    # -- live input ---------------------------------------------------------------------------

    def push_frame(self, frame: AudioFrame) -> None:
        """A decoded frame of the peer's microphone (``live`` mode), placed by its timestamp."""
        if self._closed:
            return
        now = self.clock.now()
        x = audio_frame_to_mono(frame)
        rate = int(frame.sample_rate)
        if rate != OUT_RATE_HZ:
            if self._in_resampler is None or self._in_resampler.in_rate_hz != rate:
                self._in_resampler = StreamingResampler(rate, OUT_RATE_HZ)
            x = self._in_resampler.push(x)
        pcm = to_int16(x)
        n = pcm.shape[0]
        if frame.pts is not None and frame.time_base is not None:
            src = round(frame.pts * frame.time_base * OUT_RATE_HZ)
        else:
            src = self.written - (self._src_offset or 0)
        self.last_input_at = now
        self.stats.input_s += n / OUT_RATE_HZ
        if self.metrics is not None:
            self.metrics.input_audio.inc(n / OUT_RATE_HZ)
        first = self._src_offset is None
        if self._src_offset is None:
            # First input: it ends now. The timeline up to here was idle silence.
            due = math.floor(self.clock.input_position(now)) - n
            self._src_offset = max(self.written, due) - src
        pos = src + self._src_offset
        ahead = pos + n - self.clock.input_position(now)
        if ahead > self.cfg.max_input_ahead_ms / 1000 * OUT_RATE_HZ:
            log.debug("%s: input %.0f ms ahead of the clock: dropped", self.name, ahead / 48)
            return
        if pos < self.written:
            behind = self.written - pos
            if behind > REANCHOR_BEHIND_S * OUT_RATE_HZ:
                # The sender resumed after a long stall: its audio continues here and now.
                self._src_offset += behind
                pos = self.written
            elif behind >= n:
                return  # already covered (silence stood in for it): too late to use
            else:
                pcm = pcm[behind:]
                pos = self.written
        if pos > self.written:
            # Lost packets: silence in their place keeps timestamps and sync.
            gap = pos - self.written
            if not first:  # before the first input, silence is just the idle avatar
                self._count_filled(gap)
            self.timeline.write_silence(gap)
        if rms(pcm) > SPEECH_RMS:
            self.stats.speech_s += n / OUT_RATE_HZ
        self.timeline.write(pcm)
        self.clock.observe_input(self.written, now)

    def _count_filled(self, n: int) -> None:
        self.stats.silence_filled_s += n / OUT_RATE_HZ
        if self.metrics is not None:
            self.metrics.audio_underrun.inc(n / OUT_RATE_HZ)

    # -- presenter input ----------------------------------------------------------------------

    def push_speech(self, pcm: np.ndarray, sample_rate: int) -> float:
        """Queue speech (``presenter`` mode): int16/float PCM, (n,) or (n, ch), any rate.

        Returns the seconds of speech now queued. With ``StreamConfig.early_speech_start``,
        speech that begins after silence may be moved earlier on the timeline, as a whole run
        (already fed part included) while none of it is on screen or heard yet:
        :attr:`speech_moved` is then ``(old start, new start)`` of that run (None otherwise),
        for callers that keep their own positions of the speech (the pipecat service).

        Raises:
            QueueFullError: the queue would exceed ``max_queued_speech_s``.
            TypeError, ValueError: bad samples or rate.
        """
        was_idle = self.speech.queued_samples == 0
        y, n_in = self.speech.push(pcm, sample_rate)
        self.speech_moved = None
        if self.mode == "presenter" and self.cfg.early_speech_start and y.shape[0]:
            self._move_speech_run(was_idle)
        if y.shape[0] and rms(y) > SPEECH_RMS:
            self.stats.speech_s += y.shape[0] / OUT_RATE_HZ
        self.last_input_at = self.clock.now()
        self.stats.input_s += n_in / sample_rate
        if self.metrics is not None:
            self.metrics.input_audio.inc(n_in / sample_rate)
        return self.queued_samples / OUT_RATE_HZ

    def interrupt(self, at_frame: int | None = None) -> float:
        """Barge-in: drop the queued speech and cut what was already fed, from ``at_frame`` on.

        ``at_frame`` defaults to :meth:`interrupt_frame`: the next frame shown, or the one after
        it when its render could not finish in time. From it on the timeline is silence
        (``read_audio`` returns zeros for the cut speech, so every reader stops the voice
        there) and the session renders those frames again as if the speech had stopped
        (``Session.interrupt``): rendered frames from the cut on are dropped, and the first
        one shown is the face at rest, idling (blinks, breathing), never a frozen image. Lips
        and voice stay together: both stop at the same frame. Media time goes on without a
        jump.

        Returns the seconds of queued speech dropped (not counting the cut part already on
        the timeline, at most the lead plus the latency budget).
        """
        dropped = self.speech.interrupt() / OUT_RATE_HZ  # the resampler starts afresh too
        self._run_start = None
        if at_frame is None:
            at_frame = self.interrupt_frame()
        at_frame = max(at_frame, 0)
        self.timeline.silence_from(at_frame * SAMPLES_PER_FRAME_48K)
        self.session.interrupt(at_frame)
        self._forget_frames_from(at_frame)
        return dropped

    def _forget_frames_from(self, at_frame: int) -> None:
        """Rendered frames from ``at_frame`` on are stale (an interruption, a rewind)."""
        self.pacer.drop_from(at_frame)
        if self._display_cache is not None and self._display_cache[0] >= at_frame:
            self._display_cache = None
        for trace in (self.motion_trace, self.mouth_trace):
            while trace and trace[-1][0] >= at_frame:
                trace.pop()
        kept = self.pacer.newest()
        self._last_landmarks = kept.landmarks if kept is not None else None

    def _move_speech_run(self, was_idle: bool) -> None:
        """Start the current run of speech as early as it can (``early_speech_start``).

        Speech that follows silence queues behind the silence already fed ahead of the display
        (the latency budget plus the presenter lead). While none of that run is on screen or
        heard, it is taken back and placed again: ``ANTICIPATION_FRAMES`` after the first frame
        that can still change (those frames see the speech coming, so the mouth moves just
        before the voice, as it does when the speech queues), no earlier than its audio so far
        covers up to the end of the timeline (no silence inside the speech) and never over
        earlier sound. The session rewinds to that first frame (``Session.rewind``); the run's
        fed part goes back to the head of the queue.
        """
        spf = SAMPLES_PER_FRAME_48K
        written = self.timeline.written
        first = self.interrupt_frame()
        run = self._run_start
        if run is None or not first * spf <= run <= written:
            if not was_idle:
                self._run_start = None  # speech is going on: nothing to move
                return
            run = written  # a new run: it starts where the queue starts feeding
        self._run_start = run
        # Sound before the run is earlier speech: it stays, and the run stays after it.
        last = self.timeline.last_sound(first * spf, run)
        if last is not None:
            first = max(first, last // spf + 1)
        speech = (written - run) + self.speech.queued_samples
        start = max(first + ANTICIPATION_FRAMES, -(-(written - speech) // spf))
        if start * spf >= run or not self.session.rewind(first):
            return
        fed = self.timeline.read(run, written - run)
        self.timeline.rewind(first * spf)
        self.timeline.write_silence((start - first) * spf)
        self.speech.push_front(fed)
        self._forget_frames_from(first)
        self._top_up()
        self._run_start = start * spf
        self.speech_moved = (run, start * spf)
        self.stats.early_starts += 1
        self.stats.early_start_s += (run - start * spf) / OUT_RATE_HZ

    def interrupt_frame(self) -> int:
        """The first frame an interruption can still change: not yet on screen, its audio not
        yet read by an audio track (they read ``audio_lead_ms`` ahead), and renderable before
        its display time (by the render loop's own estimate, the rule that skips late frames).
        Cutting any earlier would repeat the last frame shown (a frozen image) or let the
        voice of a frame play without its lips."""
        clock = self.clock
        on_screen = clock.frame_on_screen() + 1
        read = clock.output_position() + self.cfg.audio_lead_ms / 1000 * OUT_RATE_HZ
        return max(
            on_screen, math.ceil(read / SAMPLES_PER_FRAME_48K), self._first_worth_rendering(), 0
        )

    # -- tasks --------------------------------------------------------------------------------

    def _top_up(self) -> None:
        """Bring the timeline up to the clock: silence for late live input, queued speech
        (or silence) for a presenter."""
        self._sync_skipped()
        self._relax_render_estimate()
        target = self.clock.input_position()
        if self.mode == "live":
            fill_to = math.floor(target - self.cfg.jitter_budget_ms / 1000 * OUT_RATE_HZ)
            if fill_to > self.written:
                if self._src_offset is not None:  # before any input, silence is just idle
                    self._count_filled(fill_to - self.written)
                self.timeline.write_silence(fill_to - self.written)
        else:
            feed_to = math.floor(target + self.cfg.presenter_lead_ms / 1000 * OUT_RATE_HZ)
            if feed_to > self.written:
                self.speech.feed(self.timeline, feed_to - self.written)

    async def _tick_loop(self) -> None:
        try:
            while True:
                self._top_up()
                await asyncio.sleep(TICK_S)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: timeline task failed", self.name)
            raise

    def _first_worth_rendering(self) -> int:
        # A frame that would finish rendering after its display time is worth nothing.
        return self.pacer.first_worth_rendering(self.clock.now())

    def _relax_render_estimate(self) -> None:
        self.pacer.relax(self.clock.now())
        self.stats.render_ms_ema = self.pacer.render_s * 1000

    def _sync_skipped(self) -> None:
        skipped = self.session.frames_skipped - self.stats.frames_skipped
        if skipped:
            self.stats.frames_skipped += skipped
            if self.metrics is not None:
                self.metrics.frames_skipped.inc(skipped)

    async def _render_loop(self) -> None:
        try:
            async for frame in self.session.frames(skip_before=self._first_worth_rendering):
                now = self.clock.now()
                st = self.stats
                st.frames_rendered += 1
                render_s = self.session.render_wall_s
                slack_s = self.clock.frame_time(frame.pts) - now
                self.pacer.add(frame.pts, frame, now, render_s)
                st.render_ms_ema = self.pacer.render_s * 1000
                st.slack_ms_ema += 0.1 * (slack_s * 1000 - st.slack_ms_ema)
                self._sync_skipped()
                if self.metrics is not None:
                    self.metrics.frames_rendered.inc()
                    self.metrics.render_seconds.observe(render_s)
                    self.metrics.slack_seconds.observe(slack_s)
                prev = self._last_landmarks
                motion = float(np.abs(frame.landmarks - prev).max()) if prev is not None else 0.0
                self._last_landmarks = frame.landmarks
                self.motion_trace.append((frame.pts, motion))
                self.mouth_trace.append((frame.pts, _inner_lip_opening(frame.landmarks)))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: render task failed", self.name)
            raise

    # -- output -------------------------------------------------------------------------------

    def video_frame(self, index: int) -> VideoFrame:
        """A new video frame to show as frame ``index``: the newest rendered one up to it.

        Each viewer gets its own ``VideoFrame`` (encoders run in worker threads, and a PyAV
        frame caches a scaler that must not be shared between threads), but the colour
        conversion to yuv420p is done once per displayed index and shared.
        """
        _, image, yuv = self._shown(index)
        if yuv is None:
            yuv = video_planes(image)
            self._display_cache = (index, image, yuv)
        vf = VideoFrame.from_ndarray(yuv, format="yuv420p")
        vf.pts = self.clock.video_pts(index)
        vf.time_base = VIDEO_TIME_BASE
        return vf

    def display_image(self, index: int) -> np.ndarray:
        """The (H, W, 3) uint8 RGB host image to show as frame ``index`` (the frame
        :meth:`video_frame` encodes, odd sizes cropped to even the same way), for outputs that
        take RGB (the pipecat service): no round trip through yuv420p."""
        image = self._shown(index)[1]
        h, w = int(image.shape[0]), int(image.shape[1])
        return to_host(image[: h - h % 2, : w - w % 2])

    def _shown(self, index: int) -> tuple[int, Any, np.ndarray | None]:
        """The display cache for ``index``: pick its frame (and count it) once per index."""
        cache = self._display_cache
        if cache is None or cache[0] != index:
            cache = (index, self._pick_display(index), None)
            self._display_cache = cache
        return cache

    def _pick_display(self, index: int) -> Any:
        frame, fresh = self.pacer.show(index)
        # Nothing rendered yet: the still photo.
        image = frame.image if frame is not None else self.avatar.image
        st = self.stats
        st.frames_displayed += 1
        now = self.clock.now()
        if fresh:
            if self._last_display_t is not None:
                dt = max(now - self._last_display_t, 1e-3)
                st.display_fps += 0.1 * (1.0 / dt - st.display_fps)
            self._last_display_t = now
        elif index >= 0 and self.written > 0:
            st.frames_repeated += 1
            if self.metrics is not None:
                self.metrics.frames_repeated.inc()
        return image

    def budget_ms(self) -> dict[str, float]:
        """The latency budget in milliseconds, JSON-ready: ``algorithmic_ms``, ``jitter_ms``,
        ``compute_ms`` and ``total_ms`` (``self.budget`` holds the same in seconds, ``*_s``)."""
        return {k.removesuffix("_s") + "_ms": round(v * 1000, 1) for k, v in self.budget.items()}

    def snapshot(self) -> dict[str, object]:
        """Stats and budget, JSON-ready (``/sessions/{id}/stats`` and the web client)."""
        st = self.stats
        return {
            "name": self.name,
            "mode": self.mode,
            "latency_budget_ms": self.budget_ms(),
            "frames_rendered": st.frames_rendered,
            "frames_skipped": st.frames_skipped,
            "frames_repeated": st.frames_repeated,
            "display_fps": round(st.display_fps, 2),
            "render_ms": round(st.render_ms_ema, 2),
            "slack_ms": round(st.slack_ms_ema, 2),
            "input_s": round(st.input_s, 3),
            "speech_s": round(st.speech_s, 3),
            "silence_filled_s": round(st.silence_filled_s, 3),
            "queued_s": round(self.queued_samples / OUT_RATE_HZ, 3),
            "clock_slew_ms": round(self.clock.slewed_s * 1000, 2),
        }

    def trace(self) -> dict[str, object]:
        """The stream's traces, in media seconds: landmark motion and inner-lip opening per
        rendered frame, input RMS per chunk (written position), and the latency budget."""
        return {
            "motion": [
                (pts * SAMPLES_PER_FRAME_48K / OUT_RATE_HZ, m) for pts, m in self.motion_trace
            ],
            "mouth": [
                (pts * SAMPLES_PER_FRAME_48K / OUT_RATE_HZ, m) for pts, m in self.mouth_trace
            ],
            "input": [(pos / OUT_RATE_HZ, rms) for pos, rms in self.input_trace],
            "budget_s": self.budget,
            "clock_slew_s": self.clock.slewed_s,
        }


class AvatarVideoTrack(MediaStreamTrack):
    """The avatar's video for one viewer, paced by the stream's clock (25 fps, 90 kHz pts)."""

    kind = "video"

    def __init__(self, stream: AvatarStream) -> None:
        super().__init__()
        self.stream = stream
        self._next: int | None = None

    async def recv(self) -> VideoFrame:
        stream = self.stream
        if self.readyState != "live" or stream.closed:
            raise MediaStreamError
        clock = stream.clock
        if self._next is None:
            self._next = max(clock.frame_on_screen(), 0)
        index = self._next
        late = await clock.sleep_until(clock.frame_time(index))
        if stream.closed:
            raise MediaStreamError
        if late > MAX_TRACK_LAG_S:
            index = clock.frame_on_screen()  # skip what we missed; never burst
        self._next = index + 1
        return stream.video_frame(index)


class AvatarAudioTrack(MediaStreamTrack):
    """The stream's speech for one viewer, delayed by the latency budget (20 ms, 48 kHz)."""

    kind = "audio"

    def __init__(self, stream: AvatarStream) -> None:
        super().__init__()
        self.stream = stream
        self._pos: int | None = None

    async def recv(self) -> AudioFrame:
        stream = self.stream
        if self.readyState != "live" or stream.closed:
            raise MediaStreamError
        clock = stream.clock
        if self._pos is None:
            now_pos = math.floor(clock.output_position())
            self._pos = max(now_pos - now_pos % AUDIO_PTIME_SAMPLES, 0)
        pos = self._pos
        late = await clock.sleep_until(clock.play_time(pos) - stream.cfg.audio_lead_ms / 1000)
        if stream.closed:
            raise MediaStreamError
        if late > MAX_TRACK_LAG_S:
            now_pos = math.floor(clock.output_position())
            pos = now_pos - now_pos % AUDIO_PTIME_SAMPLES
        self._pos = pos + AUDIO_PTIME_SAMPLES
        pcm = stream.read_audio(pos, AUDIO_PTIME_SAMPLES)
        frame = AudioFrame(format="s16", layout="mono", samples=AUDIO_PTIME_SAMPLES)
        frame.planes[0].update(pcm.tobytes())
        frame.pts = pos
        frame.sample_rate = OUT_RATE_HZ
        frame.time_base = AUDIO_TIME_BASE
        return frame


__all__ = [
    "SAMPLES_PER_FRAME_48K",
    "AvatarAudioTrack",
    "AvatarStream",
    "AvatarVideoTrack",
    "QueueFullError",
    "StreamStats",
    "audio_frame_to_mono",
]
