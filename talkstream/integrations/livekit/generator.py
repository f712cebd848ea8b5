"""The talkstream side of LiveKit Agents' avatar protocol: speech in, face and voice out.

:class:`TalkstreamVideoGenerator` is a ``livekit.agents.voice.avatar.VideoGenerator``: the SDK's
``AvatarRunner`` pushes it the agent's speech (``rtc.AudioFrame``, any rate and channel count,
one ``AudioSegmentEnd`` after each segment) and forwards what it yields (``rtc.VideoFrame``,
``rtc.AudioFrame``, ``AudioSegmentEnd``) through an ``rtc.AVSynchronizer`` into the room.

One timeline, one schedule. The generator keeps a timeline of 40 ms slots at 48 kHz, frame ``i``
holding samples ``[1920 i, 1920 (i + 1))``, and feeds each slot to one engine ``Session`` when
it is written, ``delay_frames`` ahead of its display (the model's lookahead plus the render
budget), so the frame is rendered by then. Slots come from the queued speech or, with none
queued, silence (the face idles: blinks, sway). Frame ``i`` is yielded at ``t0 + i * 40 ms``;
a frame not rendered by then is replaced by the newest one that is (frames whose deadline has
passed are skipped, never rendered late). The timeline only advances as frames are yielded: if
the runner stops pulling (it waits for a subscriber before publishing), speech waits too, and
none is lost.

Audio is the master. Each slot's speech is yielded as one ``rtc.AudioFrame``, one frame ahead
of its video, so the runner's ``AudioSource`` (which plays what it is given back to back, in
real time) never runs dry between slots; the generator keeps the same account of that queue
that ``AudioSource`` keeps (when its queued audio will have played) and hands a slot over only
when it will start playing within ``SYNC_TOLERANCE_S`` of its video frame. Where the audio runs
late (an event-loop stall), the schedule of the video moves with it. The synchronizer's own
video pacing is bypassed (:meth:`TalkstreamVideoGenerator.set_av_sync`): each frame is captured
as it arrives, and a frame late by more than a frame is not sent at all. Lips and voice
therefore leave together, frame by frame (measured: median -2.6 ms, 90% within 6 ms); the
runner counts exactly the speech it was given, so the ``lk.playback_finished`` position is the
speech played (idle frames carry no audio).

A slot holds the speech of at most one segment, so every segment starts on a frame boundary;
``AudioSegmentEnd`` is yielded once the segment's last slot has played. ``clear_buffer`` (the
agent's ``lk.clear_buffer``: the user interrupted) drops the queued speech and mutes the slots
already on the timeline: the voice stops within what ``AudioSource`` already holds (at most two
frames, 80 ms), and the engine renders the frames from there on again as if the speech had
stopped there (``Session.interrupt``), so the face is at rest, still idling, from the frame
where the voice stops (a frame later when that frame's render was already under way).

Needs the ``livekit`` extra: ``pip install 'talkstream[livekit]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, VideoGenerator

from talkstream.config import FPS
from talkstream.engine.audio import StreamingResampler, to_mono_float32
from talkstream.engine.pipeline import Frame, Session
from talkstream.streaming.clock import OUT_RATE_HZ, SAMPLES_PER_FRAME_48K
from talkstream.streaming.config import ANTICIPATION_FRAMES, REWIND_FRAMES
from talkstream.streaming.pacing import FramePacer

log = logging.getLogger(__name__)

FRAME_S = 1.0 / FPS  # 40 ms per video frame and timeline slot
# Slots whose audio goes to LiveKit's AudioSource ahead of their video: rides out that much
# event-loop jitter without the voice breaking up. The runner's AudioSource holds 100 ms: one
# 40 ms slot of lead plus the one playing fit; two would make capture_frame block.
AUDIO_LEAD_FRAMES = 1
# Audio is handed over when it will start playing within this of its frame's display time.
SYNC_TOLERANCE_S = 0.010
# Audio that will start later than this after its frame moves the video schedule instead.
AUDIO_LATE_S = 0.020
# A schedule this far behind (an event-loop stall, the runner waiting to publish) restarts at
# the present instead of bursting frames.
MAX_LAG_S = 0.1
# Frame records kept for diagnosis and tests: 10 minutes.
TRACE_LEN = 15_000
_INT16_MAX = 32767


@dataclass(frozen=True)
class GeneratorConfig:
    """How the generator trades latency for smoothness.

    The agent's speech reaches the room ``delay_frames * 40 ms`` after the generator takes it
    on (the engine's lookahead plus ``compute_budget_ms``, rounded up to whole frames, plus
    one frame of audio lead): 240 ms for the ``tiny`` model.
    """

    # Time a frame may take to render (the engine's worker may be busy with other streams).
    compute_budget_ms: float = 40.0
    # Speech queued beyond this makes push_audio wait (the SDK's receiver buffers meanwhile).
    max_queued_speech_s: float = 120.0
    # Most frames of this stream one engine call renders (``Session.max_batch``): small, every
    # frame has a deadline (``StreamConfig.frames_per_call`` for serve's streams).
    frames_per_call: int = 2
    # A segment that begins after silence replaces the silence already on the timeline
    # instead of queueing behind it (``StreamConfig.early_speech_start`` for serve's streams):
    # its voice and lips start a few frames after the next frame that can still change.
    early_speech_start: bool = True

    def __post_init__(self) -> None:
        if not self.compute_budget_ms >= 0:
            raise ValueError(f"compute_budget_ms must be >= 0, got {self.compute_budget_ms!r}")
        if not self.max_queued_speech_s > 0:
            raise ValueError(f"max_queued_speech_s must be > 0, got {self.max_queued_speech_s!r}")
        if self.frames_per_call < 1:
            raise ValueError(f"frames_per_call must be >= 1, got {self.frames_per_call}")


@dataclass
class _Chunk:
    segment: int
    pcm: np.ndarray  # (n,) int16, 48 kHz mono


@dataclass
class _End:
    segment: int


@dataclass
class _Slot:
    """One 40 ms slot of the timeline: what frame ``index`` shows and says."""

    index: int
    pcm: np.ndarray  # (1920,) int16: what the session was fed
    segment: int | None  # the segment whose speech it holds
    speech: int  # leading samples that are speech (the rest is silence)
    last: bool  # the segment's final slot
    audio_sent: bool = False


@dataclass
class GeneratorStats:
    frames_emitted: int = 0
    frames_fresh: int = 0  # emitted showing a frame rendered for that very slot
    frames_dropped: int = 0  # video not sent: too late, or the synchronizer still held one
    frames_rendered: int = 0
    speech_s: float = 0.0  # speech yielded as audio
    segments_ended: int = 0
    interrupts: int = 0
    dropped_speech_s: float = 0.0  # queued or muted by interrupts
    schedule_shifts: int = 0  # stalls and late audio that moved the schedule
    early_starts: int = 0  # speech moved ahead of the silence fed before it
    early_start_s: float = 0.0  # the time those moves gained, in all


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 32768.0), -32768, _INT16_MAX).astype(np.int16)


def audio_frame_pcm(frame: rtc.AudioFrame) -> np.ndarray:
    """An ``rtc.AudioFrame``'s samples as an ``(n, channels)`` int16 array (no copy)."""
    pcm = np.frombuffer(frame.data, dtype=np.int16)
    return pcm.reshape(-1, frame.num_channels)


class TalkstreamVideoGenerator(VideoGenerator):
    """A ``VideoGenerator`` backed by one engine session (see the module docstring).

    Args:
        session: a fresh session of the loaded engine (``engine.session(avatar)``); the
            generator owns it from now on.
        cfg: latency budget and bounds.
        now: monotonic wall clock (tests may pass another).
    """

    def __init__(
        self,
        session: Session,
        cfg: GeneratorConfig | None = None,
        *,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg = cfg or GeneratorConfig()
        self.session = session
        session.max_batch = cfg.frames_per_call
        if cfg.early_speech_start:
            session.rewind_frames = REWIND_FRAMES
        self._now = now
        image = session.avatar.image
        h, w = image.shape[:2]
        self.width, self.height = w - w % 2, h - h % 2  # I420 wants even sizes
        budget_s = session.latency_s + cfg.compute_budget_ms / 1000
        # Slots on the timeline ahead of the frame being shown: the frame's audio plus the
        # model's lookahead must have been fed, and the frame rendered, by its display time.
        self.delay_frames = math.ceil(budget_s / FRAME_S - 1e-9) + AUDIO_LEAD_FRAMES
        self.stats = GeneratorStats()
        # (frame index, pts of the rendered frame shown or -1 for the photo, wall time) per
        # yielded video frame; audio frames carry their index in userdata["frame"].
        self.trace: deque[tuple[int, int, float]] = deque(maxlen=TRACE_LEN)

        self._pending: deque[_Chunk | _End] = deque()
        self._pending_samples = 0
        self._space = asyncio.Event()
        self._segment = 0  # id of the segment being received
        self._receiving = False
        self._resampler: StreamingResampler | None = None

        self._slots: deque[_Slot] = deque()  # frames self._next .. self._written - 1
        self._next = 0  # next frame to show
        self._written = 0  # slots on the timeline
        self._t0: float | None = None  # wall time of frame 0's display
        self._audio_end = 0.0  # when the audio handed over so far will have played
        self._segment_done = False  # the frame shown last ended its segment

        # Rendered frames waiting for their slot, and the drop-late rule (shared with
        # AvatarStream and LiveLoop): slot i falls due at self._t0 + i * FRAME_S.
        self.pacer: FramePacer[Frame] = FramePacer(
            self._position,
            budget_s=cfg.compute_budget_ms / 1000,
            keep=4 * self.delay_frames + 8,
            started_at=self._now(),
        )
        self._frame_cache: tuple[int, rtc.VideoFrame] | None = None
        self._still: rtc.VideoFrame | None = None
        self._shown_pts = -1  # pts of the rendered frame shown last; -1: the photo
        self._render_task: asyncio.Task[None] | None = None
        self._av_sync: rtc.AVSynchronizer | None = None
        self._closed = False

    def set_av_sync(self, av_sync: rtc.AVSynchronizer | None) -> None:
        """The runner's synchronizer (``AvatarRunner.av_sync``), as in the SDK's own example.

        Its video side paces frames again, on a grid of its own (an ``_FPSController``); with
        it known, each frame is captured on arrival (the grid is reset: the frames are paced
        already, by the same schedule as their audio), and a frame that would queue behind
        one it still holds is not sent, so the video never lags its audio by a backlog.
        """
        self._av_sync = av_sync

    # -- VideoGenerator: input ----------------------------------------------------------------

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        """Queue a frame of the agent's speech (any rate, any channels) or end its segment."""
        if self._closed:
            return
        if isinstance(frame, AudioSegmentEnd):
            if self._receiving:
                assert self._resampler is not None
                self._append(_to_int16(self._resampler.flush()))
                self._pending.append(_End(self._segment))
                self._segment += 1
                self._receiving = False
                self._resampler = None
            return
        rate = int(frame.sample_rate)
        x = to_mono_float32(audio_frame_pcm(frame))
        if self._resampler is not None and self._resampler.in_rate_hz != rate:
            # The rate changed inside a segment (the sender never does this): finish the old
            # stream's tail, then go on at the new rate.
            self._append(_to_int16(self._resampler.flush()))
            self._resampler = None
        if self._resampler is None:
            self._resampler = StreamingResampler(rate, OUT_RATE_HZ)
        self._receiving = True
        limit = int(self.cfg.max_queued_speech_s * OUT_RATE_HZ)
        while self._pending_samples > limit and not self._closed:
            self._space.clear()
            await self._space.wait()
        self._append(_to_int16(self._resampler.push(x)))
        if self.cfg.early_speech_start:
            self._start_early()

    def _start_early(self) -> None:
        """Move the speech that follows silence on the timeline back to ``ANTICIPATION_FRAMES``
        after the first slot that can still change (no slot from there on has its audio
        handed over, and it can still be rendered in time), while none of it has been handed
        over: the slots from that one on go back to the queue (their speech) and the session
        rewinds there (``Session.rewind``). The speech is never moved so far that the audio
        received so far would not reach the end of the timeline already written (no silence
        inside a segment), and never before another segment's speech."""
        if self._t0 is None or not self._slots:
            return
        spf = SAMPLES_PER_FRAME_48K
        first = max(self._next + 1, self._first_worth_rendering())
        for slot in self._slots:
            if slot.audio_sent:
                first = max(first, slot.index + 1)
        ahead = [slot for slot in self._slots if slot.index >= first]
        speech = [slot for slot in ahead if slot.segment is not None]
        if speech and speech[0].index <= first + ANTICIPATION_FRAMES:
            return  # already as early as it goes (called for every 10 ms frame pushed)
        # Segment ids only grow along the queue, and an end is followed by the next segment:
        # its first and last items tell whether it holds one segment and no end (O(1)).
        pending = self._pending
        if pending and (isinstance(pending[-1], _End) or pending[0].segment != pending[-1].segment):
            return  # a segment ends before the queued speech: keep the order simple
        segments = {slot.segment for slot in speech if slot.segment is not None}
        if pending:
            segments.add(pending[0].segment)
        if len(segments) != 1:
            return  # nothing queued, or more than one segment ahead
        run = speech[0].index if speech else self._written
        if any(slot.segment is None and slot.index > run for slot in ahead):
            return  # a gap inside the segment's slots: it is already playing out that way
        known = sum(slot.speech for slot in speech) + self._pending_samples
        start = max(first + ANTICIPATION_FRAMES, -(-(self._written * spf - known) // spf))
        if start >= run or not self.session.rewind(first):
            return
        (segment,) = segments
        back = [slot.pcm[: slot.speech] for slot in speech]
        ended = any(slot.last for slot in speech)
        written = self._written
        while self._slots and self._slots[-1].index >= first:
            self._slots.pop()
        self._written = first
        if ended:
            self._pending.appendleft(_End(segment))
        if back:
            pcm = np.concatenate(back)
            self._pending.appendleft(_Chunk(segment, pcm))
            self._pending_samples += pcm.shape[0]
        silence = np.zeros(spf, dtype=np.int16)
        for index in range(first, start):
            self._slots.append(_Slot(index, silence.copy(), None, 0, False))
            self.session.push_audio(silence, OUT_RATE_HZ)
        self._written = start
        self._fill(written)
        self.pacer.drop_from(first)
        if self._frame_cache is not None and self._frame_cache[0] >= first:
            self._frame_cache = None
        self.stats.early_starts += 1
        self.stats.early_start_s += (run - start) * FRAME_S

    def _append(self, pcm: np.ndarray) -> None:
        if pcm.shape[0]:
            self._pending.append(_Chunk(self._segment, pcm))
            self._pending_samples += pcm.shape[0]

    def clear_buffer(self) -> None:
        """The agent's ``lk.clear_buffer``: drop the queued speech and mute what is on the
        timeline but not yet handed to LiveKit; no ``AudioSegmentEnd`` follows for it (the
        runner reports the interrupted segment itself)."""
        dropped = self._pending_samples
        self._pending.clear()
        self._pending_samples = 0
        self._space.set()
        if self._receiving:
            self._segment += 1  # the receiver drops the rest of this segment
        self._receiving = False
        self._resampler = None
        # Slots whose audio was handed over play out (they form a prefix); from the first one
        # not handed over, voice and face stop together: the session renders those frames
        # again from silence, and frames rendered from the cut speech are dropped.
        cut = self._written
        for slot in self._slots:
            if not slot.audio_sent:
                cut = min(cut, slot.index)
                if slot.segment is not None:
                    dropped += slot.speech
                slot.speech = 0
                slot.segment = None
                slot.pcm[:] = 0
            slot.last = False
        self.session.interrupt(cut)
        self.pacer.drop_from(cut)
        if self._frame_cache is not None and self._frame_cache[0] >= cut:
            self._frame_cache = None
        self._segment_done = False
        self.stats.interrupts += 1
        self.stats.dropped_speech_s += dropped / OUT_RATE_HZ
        log.debug("interrupted: %.2f s of speech dropped", dropped / OUT_RATE_HZ)

    @property
    def queued_speech_s(self) -> float:
        """Speech received and not yet on the timeline."""
        return self._pending_samples / OUT_RATE_HZ

    # -- VideoGenerator: output ---------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        if self._render_task is None:
            self._render_task = asyncio.create_task(
                self._render_loop(), name="talkstream-livekit-render"
            )
        while not self._closed:
            i = self._next
            self._fill(i + self.delay_frames + 1)
            now = self._now()
            if self._t0 is None:
                self._t0 = now - i * FRAME_S
            due = self._t0 + i * FRAME_S
            if now - due > MAX_LAG_S:
                self._shift(now - due)
                due = now
            elif due > now:
                await asyncio.sleep(due - now)
                if self._closed:
                    return
            slot = self._slots[0]
            assert slot.index == i
            if self._segment_done:
                # The previous frame ended its segment, and its audio has now played.
                self._segment_done = False
                self.stats.segments_ended += 1
                yield AudioSegmentEnd()
            # This frame's audio, if the lead did not already send it, then the next ones'.
            # One at a time: a clear_buffer while the runner takes one mutes the next.
            while (audio := self._next_audio(i)) is not None:
                yield audio
            wait = self._t0 + i * FRAME_S - self._now()
            if wait > 0:  # the audio ran late and took the schedule with it
                await asyncio.sleep(wait)
            if self._send_video(-wait):
                video = self._video_frame(i)
                self.trace.append((i, self._shown_pts, self._now()))
                self.stats.frames_emitted += 1
                yield video
            else:
                self.stats.frames_dropped += 1
            self._slots.popleft()
            self._next = i + 1
            self._segment_done = slot.last

    def _send_video(self, late_s: float) -> bool:
        """Whether to send this frame's video (its audio goes regardless)."""
        if late_s > FRAME_S:
            return False  # the next frame is nearly due: never burst to catch up
        sync = self._av_sync
        if sync is not None:
            queue = getattr(sync, "_video_queue", None)
            if queue is not None and queue.qsize() > 0:
                return False  # it would wait behind a frame not yet captured
            sync.reset()  # capture on arrival, not on the synchronizer's own grid
        return True

    def _shift(self, by_s: float) -> None:
        assert self._t0 is not None
        self._t0 += by_s
        self.stats.schedule_shifts += 1
        log.debug("schedule moved by %.0f ms", by_s * 1000)

    def _next_audio(self, i: int) -> rtc.AudioFrame | None:
        """The next audio frame to hand over now, if any: slots from ``i`` on, each once it
        will start playing within ``SYNC_TOLERANCE_S`` of its frame (never more than
        ``AUDIO_LEAD_FRAMES`` ahead)."""
        assert self._t0 is not None
        prev: _Slot | None = None
        for slot in self._slots:
            if slot.index > i + AUDIO_LEAD_FRAMES:
                break
            if slot.index > i and (prev is None or prev.last or prev.segment != slot.segment):
                # Ahead of its frame only within a segment: the runner must see the previous
                # segment's AudioSegmentEnd before the next segment's first audio.
                break
            prev = slot
            if slot.audio_sent:
                continue
            if not slot.speech:
                slot.audio_sent = True
                continue
            now = self._now()
            start = max(self._audio_end, now)
            due = self._t0 + slot.index * FRAME_S
            if start < due - SYNC_TOLERANCE_S:
                break  # it would play early: hand it over later
            if slot.index == i and start - due > AUDIO_LATE_S:
                # The voice will start late (the loop stalled while the queue ran dry): show
                # this frame and the ones after it later, with their audio.
                self._shift(start - due)
            duration = slot.speech / OUT_RATE_HZ
            self._audio_end = start + duration
            slot.audio_sent = True
            self.stats.speech_s += duration
            return rtc.AudioFrame(
                data=slot.pcm[: slot.speech].tobytes(),
                sample_rate=OUT_RATE_HZ,
                num_channels=1,
                samples_per_channel=slot.speech,
                userdata={"frame": slot.index, "segment": slot.segment},
            )
        return None

    # -- the timeline -------------------------------------------------------------------------

    def _fill(self, upto: int) -> None:
        """Write slots (queued speech, else silence) up to frame ``upto`` (exclusive), feeding
        each to the session."""
        n_slot = SAMPLES_PER_FRAME_48K
        while self._written < upto:
            pcm = np.zeros(n_slot, dtype=np.int16)
            n = 0
            segment: int | None = None
            last = False
            pending = self._pending
            while pending:
                item = pending[0]
                if segment is not None and item.segment != segment:
                    break  # a slot holds one segment's speech: the next starts a new slot
                segment = item.segment
                if isinstance(item, _End):
                    pending.popleft()
                    last = True
                    break
                if n == n_slot:
                    break
                take = min(n_slot - n, item.pcm.shape[0])
                pcm[n : n + take] = item.pcm[:take]
                n += take
                self._pending_samples -= take
                if take == item.pcm.shape[0]:
                    pending.popleft()
                else:
                    item.pcm = item.pcm[take:]
            if self._pending_samples <= int(self.cfg.max_queued_speech_s * OUT_RATE_HZ):
                self._space.set()
            self._slots.append(_Slot(self._written, pcm, segment, n, last))
            self._written += 1
            self.session.push_audio(pcm, OUT_RATE_HZ)

    # -- rendering ----------------------------------------------------------------------------

    def _position(self, t: float) -> float:
        """Display position (frames) at wall time ``t``; before the first slot, none."""
        return -1.0 if self._t0 is None else (t - self._t0) / FRAME_S

    def _first_worth_rendering(self) -> int:
        # A frame that would finish rendering after its display time is worth nothing.
        return self.pacer.first_worth_rendering(self._now())

    async def _render_loop(self) -> None:
        try:
            async for frame in self.session.frames(skip_before=self._first_worth_rendering):
                self.stats.frames_rendered += 1
                self.pacer.add(frame.pts, frame, self._now(), self.session.render_wall_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("render task failed")
            raise

    def _video_frame(self, index: int) -> rtc.VideoFrame:
        """Frame ``index``: the newest rendered frame up to it (the photo before any)."""
        self.pacer.relax(self._now())
        frame, _ = self.pacer.show(index)
        if frame is not None:
            if frame.pts == index:
                self.stats.frames_fresh += 1
            self._shown_pts = frame.pts
            cache = self._frame_cache
            if cache is None or cache[0] != frame.pts:
                # A GPU frame comes to the host here, at LiveKit's encoder.
                cache = (frame.pts, self._to_video_frame(frame.to_host()))
                self._frame_cache = cache
            return cache[1]
        self._shown_pts = -1
        if self._still is None:
            self._still = self._to_video_frame(self.session.avatar.image)
        return self._still

    def _to_video_frame(self, image: np.ndarray) -> rtc.VideoFrame:
        rgb = np.ascontiguousarray(image[: self.height, : self.width])  # (H, W, 3) uint8
        return rtc.VideoFrame(self.width, self.height, rtc.VideoBufferType.RGB24, rgb.tobytes())

    # -- lifecycle ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop rendering and end the session. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._space.set()
        if self._render_task is not None:
            self._render_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._render_task
        self.session.end_audio()
        self.pacer.clear()
        self._pending.clear()


__all__ = [
    "AUDIO_LEAD_FRAMES",
    "FRAME_S",
    "GeneratorConfig",
    "GeneratorStats",
    "TalkstreamVideoGenerator",
    "audio_frame_pcm",
]
