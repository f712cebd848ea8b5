"""talkstream as a pipecat video service: TTS audio in, a lip-synced face and its voice out.

:class:`TalkstreamVideoService` is a pipecat ``FrameProcessor`` that sits between a TTS service
and the transport output::

    Pipeline([..., llm, tts, TalkstreamVideoService(), transport.output()])

It consumes the TTS service's ``TTSAudioRawFrame`` (any sample rate, any channel count) and
re-emits that speech, paced in real time, together with the avatar's video: every 40 ms one
``OutputImageRawFrame`` (RGB, 25 fps) and, while the avatar speaks, the 40 ms of speech that
frame shows, as a 48 kHz mono ``TTSAudioRawFrame``. Both come from one
:class:`~talkstream.streaming.tracks.AvatarStream` in ``presenter`` mode and one media clock,
so lips and voice leave the service together (or the voice ``audio_lead_ms`` ahead, for a
transport whose sender reports say so: :mod:`talkstream.integrations.smallwebrtc`); the speech
is delayed by the stream's latency budget (the model's lookahead plus render time, ~165 ms
for ``tiny``). The TTS audio itself is not passed on: the transport would play it twice.
``TTSStartedFrame`` / ``TTSStoppedFrame`` are re-emitted where the paced speech they bracket
starts and ends, so the transport's "bot speaking" state follows what the user hears; every
other frame passes through at once, in order.

With no speech queued the face idles (blinks, breathes, sways): the engine renders silence as
idle motion. An ``InterruptionFrame`` (the user barges in) drops the queued speech and cuts the
speech already fed to the engine from the next 40 ms block on (``AvatarStream.interrupt``):
the voice stops there and the face is at rest from that frame (from the one after it when the
engine could not render that frame again in time: the image before it then stays for one more
frame); frames keep coming every 40 ms and the face keeps idling.

Set the output transport's ``video_out_width``/``video_out_height`` to :attr:`frame_size`
(640x480 for the default "call" framing) and its ``audio_out_sample_rate`` to 48000, so it
neither resizes frames nor resamples the voice. ``examples/pipecat_agent.py`` is a complete
agent.

:class:`EspeakTTSService` is a small local TTS (the ``espeak-ng`` binary) for demos and tests
that need no API key.

Needs the ``pipecat`` extra: ``pip install 'talkstream[pipecat]'``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from talkstream.errors import InputError, MissingDependencyError

try:
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        ErrorFrame,
        Frame,
        InterruptionFrame,
        OutputImageRawFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
    )
    from pipecat.processors.frame_processor import (
        FrameDirection,
        FrameProcessor,
        FrameProcessorSetup,
    )
    from pipecat.services.settings import TTSSettings
    from pipecat.services.tts_service import TTSService
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("talkstream.integrations.pipecat", "pipecat", "pipecat") from e

from talkstream.config import AvatarConfig, EngineConfig
from talkstream.engine.avatar import (
    Avatar,
    AvatarSource,
    load_avatar_source,
    locate_face,
    prepare_avatar_source,
)
from talkstream.engine.landmarks import load_landmarks_json
from talkstream.engine.pipeline import Engine
from talkstream.integrations.smallwebrtc import (
    MEDIA_TIMES,
    META_KEY,
    catch_up_in_pauses,
    drop_smallwebrtc_audio_on_interruption,
    prompt_live_video,
    reports_in_media_time,
    sender_reports_in_media_time,
    skip_late_silence,
    steady_smallwebrtc_audio,
    tune_smallwebrtc,
)
from talkstream.streaming.clock import OUT_RATE_HZ, SAMPLES_PER_FRAME_48K
from talkstream.streaming.config import StreamConfig
from talkstream.streaming.tracks import MAX_TRACK_LAG_S, AvatarStream, QueueFullError

log = logging.getLogger(__name__)

FRAME_S = SAMPLES_PER_FRAME_48K / OUT_RATE_HZ  # 40 ms: one video frame and its audio block
# EndFrame lets queued speech play out first, but never waits longer than this beyond it.
END_GRACE_S = 2.0
# The voice's lead over its images when SmallWebRTC's sender reports carry media time (see
# TalkstreamVideoService's audio_lead_ms). Chromium's audio jitter buffer starts a connection
# 35-60 ms deeper than its video's, and pipecat's output holds the voice another 15-120 ms;
# Chromium then delays the video until the voice catches up, but it never delays a voice
# that comes early: an 80 ms lead left it 45-50 ms early for whole runs, 120 ms 70-100 ms.
# So the lead stays below the least of those waits (RESULTS, seventh session).
SMALLWEBRTC_AUDIO_LEAD_MS = 40.0


@dataclass
class _Span:
    """Timeline samples [start, end) whose audio goes out as speech (silent gaps included)."""

    start: int
    end: int
    context_id: str | None


def _engine_config(
    base: EngineConfig | None, options: dict[str, Any], cache_dir: Path | None
) -> EngineConfig:
    """``base`` (default: what ``talkstream serve`` uses with no flags: the fastest available
    backend, as for every live stream) with the options given."""
    cfg = base or EngineConfig(backend="auto", avatar=AvatarConfig(cache_dir=cache_dir))
    top = {k: options[k] for k in ("preset", "checkpoint", "device", "dtype", "threads", "backend")}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in top.items() if v is not None})
    if options["framing"] is not None or options["force"] is not None or cache_dir is not None:
        avatar = cfg.avatar
        if options["framing"] is not None:
            avatar = dataclasses.replace(avatar, framing=options["framing"])
        if options["force"] is not None:
            avatar = dataclasses.replace(avatar, check_quality=not options["force"])
        if cache_dir is not None:
            avatar = dataclasses.replace(avatar, cache_dir=cache_dir)
        cfg = dataclasses.replace(cfg, avatar=avatar)
    if options["idle"] is not None:
        cfg = dataclasses.replace(
            cfg, idle=dataclasses.replace(cfg.idle, enabled=bool(options["idle"]))
        )
    if options["seed"] is not None:
        cfg = dataclasses.replace(
            cfg, sampler=dataclasses.replace(cfg.sampler, seed=int(options["seed"]))
        )
    return cfg


class TalkstreamVideoService(FrameProcessor):
    """A talking face for a pipecat pipeline: TTS audio in, 25 fps video and paced voice out.

    Args:
        image: the face photo (a path, or an (H, W, 3) uint8 RGB array); default: the bundled
            face, as ``talkstream render`` uses.
        landmarks: the photo's 68 iBUG landmarks (a JSON path or a (68, 2) array) instead of
            detecting them.
        engine: a loaded :class:`~talkstream.engine.pipeline.Engine` to share (not closed by the
            service); default: one loaded at setup from ``engine_config`` and the options below.
        avatar: a prepared avatar (then ``image``/``landmarks`` must be None).
        engine_config: the base engine configuration; default ``EngineConfig()`` (the shipped
            ``tiny`` model, idle motion on, "call" framing).
        preset, checkpoint, device, dtype, threads, backend, framing, idle, seed, force: override
            the matching ``engine_config`` fields (see ``talkstream render --help``).
        cache_dir: where prepared avatars and backend artifacts are cached (default: none).
        stream_config: latency budget and bounds of the avatar stream.
        audio_lead_ms: send each 40 ms of voice this much ahead of the image that shows it,
            for receivers whose audio path is longer than their video path (Chromium's audio
            jitter buffer starts at ~80 ms, its video's near 0). Only worth it when the
            transport's sender reports say when the voice is due, which
            :func:`tune_smallwebrtc` makes SmallWebRTC's do; otherwise the receiver's own lip
            sync undoes the lead (and adds delay). Default: ``stream_config.audio_lead_ms``
            when a ``stream_config`` is given; else ``SMALLWEBRTC_AUDIO_LEAD_MS`` (40) once
            :func:`sender_reports_in_media_time` has taken effect in the process, else 0.
        warmup: render a second of frames at setup, so the first user frame pays no warm-up
            (engines the service loads itself only).
        **kwargs: passed to ``FrameProcessor`` (``name``...).

    The engine and the avatar load in a worker thread during the processor's ``setup``, before
    the pipeline's ``StartFrame`` is let through. pipecat gives a setup 20 s
    (``PipelineWorker(setup_timeout_secs=...)``) and loading with warm-up takes 5-35 s on a
    2-core CPU, so ``await service.load()`` before running the pipeline (it also tells
    :attr:`frame_size`, for the transport's parameters).
    """

    def __init__(
        self,
        *,
        image: str | Path | np.ndarray | None = None,
        landmarks: str | Path | np.ndarray | None = None,
        engine: Engine | None = None,
        avatar: Avatar | None = None,
        engine_config: EngineConfig | None = None,
        preset: str | None = None,
        checkpoint: str | Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        threads: int | None = None,
        backend: str | None = None,
        framing: str | None = None,
        idle: bool | None = None,
        seed: int | None = None,
        force: bool | None = None,
        cache_dir: str | Path | None = None,
        stream_config: StreamConfig | None = None,
        audio_lead_ms: float | None = None,
        warmup: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if avatar is not None and (image is not None or landmarks is not None):
            raise TypeError("pass either avatar= (prepared) or image=/landmarks=, not both")
        if isinstance(image, np.ndarray) and (
            image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3
        ):
            raise ValueError(
                f"image must be an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}"
            )
        options = {
            "preset": preset,
            "checkpoint": Path(checkpoint) if checkpoint is not None else None,
            "device": device,
            "dtype": dtype,
            "threads": threads,
            "backend": backend,
            "framing": framing,
            "idle": idle,
            "seed": seed,
            "force": force,
        }
        engine_only = ("preset", "checkpoint", "device", "dtype", "backend", "idle", "seed")
        if engine is not None and any(options[k] is not None for k in engine_only):
            raise TypeError(
                f"engine options ({', '.join(engine_only)}) configure an engine the service "
                "loads; they cannot change the engine= passed in"
            )
        self._engine_cfg = _engine_config(
            engine_config, options, Path(cache_dir) if cache_dir is not None else None
        )
        self._image = image
        self._landmarks = landmarks
        self._engine = engine
        self._own_engine = engine is None
        self._avatar = avatar
        self._stream_cfg = stream_config or StreamConfig()
        if audio_lead_ms is not None:  # checked as the stream's own setting is
            self._stream_cfg = dataclasses.replace(self._stream_cfg, audio_lead_ms=audio_lead_ms)
        self._auto_lead = audio_lead_ms is None and stream_config is None
        self._lead = 0  # samples the voice leaves ahead of its image (set at start)
        self._warmup = warmup and engine is None
        self._load_lock = asyncio.Lock()

        self._stream: AvatarStream | None = None
        self._out_task: asyncio.Task[None] | None = None
        self._next_index = 0  # the next video frame (and audio block) to emit
        self._spans: deque[_Span] = deque()
        # Frames due when the output reaches a timeline position: (position, before-audio?, f).
        self._controls: deque[tuple[int, bool, Frame]] = deque()
        self._turn_open = False
        self._context_id: str | None = None
        # For tests and benchmarks: wall time (time.monotonic) of the last interruption, and
        # the last emitted speech block.
        self.last_interrupt_at: float | None = None
        self.last_speech_emitted_at: float | None = None
        self.frames_emitted = 0
        self.last_snapshot: dict[str, object] | None = None  # the stream's stats at its end

    # -- loading ------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the engine is not loaded yet: await service.load() first")
        return self._engine

    @property
    def avatar(self) -> Avatar:
        if self._avatar is None:
            raise RuntimeError("the avatar is not loaded yet: await service.load() first")
        return self._avatar

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the emitted frames (even sizes); known after :meth:`load`."""
        h, w = self.avatar.image.shape[:2]
        return (w - w % 2, h - h % 2)

    @property
    def stream(self) -> AvatarStream | None:
        """The running avatar stream (stats, traces), between StartFrame and the end."""
        return self._stream

    async def load(self) -> None:
        """Load the engine and the avatar (in a worker thread); idempotent."""
        async with self._load_lock:
            if self._engine is not None and self._avatar is not None and not self._warmup:
                return
            await asyncio.to_thread(self._load_blocking)

    def _load_blocking(self) -> None:
        if self._engine is None:
            from talkstream.runtime import load_engine

            self._engine = load_engine(self._engine_cfg)
        engine = self._engine
        if self._avatar is None:
            acfg = dataclasses.replace(self._engine_cfg.avatar, crop_size=engine.crop_size)
            self._avatar = prepare_avatar_source(self._avatar_source(acfg), acfg)
        engine.encode_avatar(self._avatar)  # reference features: once, never on the event loop
        if self._warmup:
            took = engine.warmup(self._avatar)
            log.info("talkstream: warm-up took %.1f s", took)
            self._warmup = False

    def _avatar_source(self, acfg: AvatarConfig) -> AvatarSource:
        lm = self._landmarks
        if isinstance(self._image, np.ndarray):
            points = load_landmarks_json(lm) if isinstance(lm, (str, Path)) else lm
            face = locate_face(self._image, acfg, landmarks=points, source_name="the image")
            return AvatarSource(image=self._image, face=face, name="the image")
        if isinstance(lm, np.ndarray):
            if self._image is None:
                raise InputError("landmarks given as an array need image= as well")
            from talkstream.engine.avatar import load_image

            image = load_image(self._image, acfg)
            face = locate_face(image, acfg, landmarks=lm, source_name=str(self._image))
            return AvatarSource(image=image, face=face, name=str(self._image))
        return load_avatar_source(self._image, lm, acfg)

    # -- pipecat lifecycle --------------------------------------------------------------------

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        await super().setup(setup)
        # Slow start-up work belongs here: pipecat holds the StartFrame until it is done. But
        # the pipeline gives every setup 20 s (PipelineWorker's setup_timeout_secs), and a
        # model load with warm-up can take longer on a busy CPU: load() before running is safer.
        if self._engine is None or self._avatar is None or self._warmup:
            log.info(
                "talkstream: loading the model in the pipeline's setup; await load() before "
                "running the pipeline to keep it out of pipecat's setup timeout"
            )
        await self.load()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._stop()
        if self._own_engine and self._engine is not None:
            engine, self._engine = self._engine, None
            await asyncio.to_thread(engine.close)

    def resolved_stream_config(self) -> StreamConfig:
        """The stream's settings as the next start uses them (``audio_lead_ms`` resolved)."""
        cfg = self._stream_cfg
        if self._auto_lead and reports_in_media_time():
            cfg = dataclasses.replace(cfg, audio_lead_ms=SMALLWEBRTC_AUDIO_LEAD_MS)
        return cfg

    async def _start(self) -> None:
        if self._stream is not None:
            return
        await self.load()
        cfg = self.resolved_stream_config()
        self._lead = round(cfg.audio_lead_ms / 1000 * OUT_RATE_HZ)
        # The stream knows the lead too: speech an early start places, and an interruption's
        # cut, stay after the voice already sent.
        self._stream = AvatarStream(self.engine, self.avatar, cfg, mode="presenter", name="pipecat")
        self._stream.start()
        self._next_index = 0
        self._out_task = self.create_task(self._output_loop(), "talkstream-output")

    async def _stop(self) -> None:
        """Stop emitting and close the stream (idempotent)."""
        if self._out_task is not None:
            task, self._out_task = self._out_task, None
            await self.cancel_task(task)
        if self._stream is not None:
            stream, self._stream = self._stream, None
            self.last_snapshot = stream.snapshot()
            await stream.close()
        self._spans.clear()
        self._controls.clear()

    async def _drain(self) -> None:
        """Wait until queued speech (and its stop frame) has gone out."""
        stream = self._stream
        if stream is None or self._out_task is None:
            return
        ahead = stream.written + stream.queued_samples - self._next_index * SAMPLES_PER_FRAME_48K
        deadline = time.monotonic() + max(ahead, 0) / OUT_RATE_HZ + stream.clock.delay_s
        deadline += END_GRACE_S
        while (self._spans or self._controls) and time.monotonic() < deadline:
            await asyncio.sleep(FRAME_S / 2)

    # -- frames in ----------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)

        if isinstance(frame, StartFrame):
            # StartFrame first, so everything downstream is started before our first frame.
            await self.push_frame(frame, direction)
            await self._start()
        elif isinstance(frame, EndFrame):
            await self._drain()
            await self._stop()
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._stop()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            self._interrupt()
            await self.push_frame(frame, direction)
        elif direction is FrameDirection.DOWNSTREAM and isinstance(frame, TTSAudioRawFrame):
            await self._queue_speech(frame)
        elif direction is FrameDirection.DOWNSTREAM and isinstance(frame, TTSStartedFrame):
            self._turn_open = True
            self._context_id = frame.context_id
            self._at_speech_head(frame, before_audio=True)
        elif direction is FrameDirection.DOWNSTREAM and isinstance(frame, TTSStoppedFrame):
            self._turn_open = False
            self._at_speech_head(frame, before_audio=False)
        else:
            await self.push_frame(frame, direction)

    def _at_speech_head(self, frame: Frame, *, before_audio: bool) -> None:
        """Emit ``frame`` when the output reaches the end of the speech queued so far."""
        stream = self._stream
        if stream is None:  # not started: nothing is paced yet
            self._controls.append((0, before_audio, frame))
            return
        self._controls.append((stream.written + stream.queued_samples, before_audio, frame))

    async def _queue_speech(self, frame: TTSAudioRawFrame) -> None:
        stream = self._stream
        if stream is None:
            return
        channels = max(int(frame.num_channels), 1)
        pcm = np.frombuffer(frame.audio, dtype=np.int16)
        pcm = pcm[: pcm.shape[0] - pcm.shape[0] % channels]
        if channels > 1:
            pcm = pcm.reshape(-1, channels)
        if not pcm.shape[0]:
            return
        start = stream.written + stream.queued_samples
        try:
            stream.push_speech(pcm, int(frame.sample_rate))
        except QueueFullError as e:
            await self.push_error(error_msg=str(e), exception=e)
            return
        if stream.speech_moved is not None:
            # The run of speech moved earlier (StreamConfig.early_speech_start): its spans and
            # the TTS frames queued with it move along; what came before it ends by then (the
            # silence it overwrote).
            old, new = stream.speech_moved
            start += new - old
            for span in self._spans:
                if span.start >= old:
                    span.start += new - old
                    span.end += new - old
                else:
                    span.end = min(span.end, new)
            self._controls = deque(
                (pos + new - old if pos >= old else min(pos, new), before, f)
                for pos, before, f in self._controls
            )
        end = stream.written + stream.queued_samples
        if end <= start:
            return  # all of it still inside the resampler; it comes with the next chunk
        context = frame.context_id or self._context_id
        last = self._spans[-1] if self._spans else None
        # One span per turn: the silence between chunks of a slow TTS goes out as audio too, so
        # the transport does not see the bot stop and start again mid-sentence.
        if (
            last is not None
            and (last.end >= start or self._turn_open)
            and last.context_id == (context)
        ):
            last.end = end
        else:
            self._spans.append(_Span(start, end, context))

    def _interrupt(self) -> None:
        """Drop queued speech; nothing from the next audio block on goes out as speech."""
        self.last_interrupt_at = time.monotonic()
        self._turn_open = False
        self._controls.clear()  # TTS start/stop frames are interruptible: dropped like data
        stream = self._stream
        if stream is None:
            return
        # Voice and face stop together at the next block: the engine renders the frames from
        # there on as if the speech had stopped, and rendered frames ahead of it are dropped.
        # (The voice comes first: when that frame cannot be rendered again in time, the image
        # before it stays one frame longer, and the face is at rest from the next one.)
        dropped = stream.interrupt(self._next_index)
        cut = self._next_index * SAMPLES_PER_FRAME_48K
        kept: deque[_Span] = deque()
        for span in self._spans:
            if span.start < cut:
                span.end = min(span.end, cut)
                kept.append(span)
        self._spans = kept
        log.debug("interrupted: %.2f s of queued speech dropped", dropped)

    # -- frames out ---------------------------------------------------------------------------

    async def _output_loop(self) -> None:
        stream = self._stream
        assert stream is not None
        clock = stream.clock
        self._next_index = max(clock.frame_on_screen(), 0)
        try:
            while True:
                index = self._next_index
                late = await clock.sleep_until(clock.frame_time(index))
                if stream.closed:
                    return
                if late > MAX_TRACK_LAG_S:
                    # An event-loop stall: jump to the present instead of bursting (the missed
                    # blocks' speech is lost, sync is kept).
                    index = max(clock.frame_on_screen(), index)
                self._next_index = index + 1
                await self._emit(stream, index)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("talkstream output task failed")
            raise

    async def _emit(self, stream: AvatarStream, index: int) -> None:
        a = index * SAMPLES_PER_FRAME_48K
        # The voice block that goes out with this image: the image's own, or with a lead the
        # one of a later frame (its image follows that much later).
        va = a + self._lead
        vb = va + SAMPLES_PER_FRAME_48K
        # The image first (its copy into the frame takes a little time), so that the audio block and
        # the image showing it leave back to back.
        rgb = stream.display_image(index)  # (H, W, 3) uint8, the frame pipecat encodes itself
        image = OutputImageRawFrame(
            image=rgb.tobytes(), size=(rgb.shape[1], rgb.shape[0]), format="RGB"
        )
        image.metadata[META_KEY] = {"index": index, "media_s": a / OUT_RATE_HZ}
        await self._emit_controls(vb, before_audio=True)
        audio = self._speech_block(stream, va, vb)
        if audio is not None:
            audio.metadata[META_KEY] = {
                "index": va // SAMPLES_PER_FRAME_48K,
                "media_s": va / OUT_RATE_HZ,
            }
            # When its content is due: when the image showing it goes out (for sender
            # reports in media time, see talkstream.integrations.smallwebrtc).
            lead = self._lead / OUT_RATE_HZ
            MEDIA_TIMES.note(audio.audio, time.time() + lead, lead=lead)
            await self.push_frame(audio)
            self.last_speech_emitted_at = time.monotonic()
        await self._emit_controls(vb, before_audio=False)
        await self.push_frame(image)
        self.frames_emitted += 1

    async def _emit_controls(self, b: int, *, before_audio: bool) -> None:
        while self._controls:
            pos, before, frame = self._controls[0]
            # Start frames go out before the block holding their first sample, stop frames after
            # the block holding the last one.
            due = pos < b if before else pos <= b and not before_audio
            if not due:
                return
            self._controls.popleft()
            await self.push_frame(frame)

    def _speech_block(self, stream: AvatarStream, a: int, b: int) -> TTSAudioRawFrame | None:
        """The 40 ms of timeline audio [a, b) if any of it is speech, else None (the transport
        plays silence by itself and the bot does not count as speaking)."""
        spans = self._spans
        while spans and spans[0].end <= a:
            spans.popleft()
        hits = [s for s in spans if s.start < b and s.end > a]
        if not hits:
            return None
        pcm = stream.read_audio(a, b - a)
        mask = np.zeros(b - a, dtype=bool)
        for s in hits:
            mask[max(s.start - a, 0) : min(s.end - a, b - a)] = True
        pcm[~mask] = 0
        return TTSAudioRawFrame(pcm.tobytes(), OUT_RATE_HZ, 1, context_id=hits[0].context_id)


# ----------------------------------------------------------------------------- local TTS


class EspeakTTSService(TTSService):
    """Text to speech with the local ``espeak-ng`` binary: no model download, no API key.

    Robotic, but instant and deterministic; for demos, tests and benchmarks.

    Args:
        voice: an espeak-ng voice (``espeak-ng --voices``), default ``en``.
        words_per_minute: speaking rate (80-450).
        **kwargs: passed to pipecat's ``TTSService`` (``sample_rate``...).
    """

    READ_BYTES = 4096

    def __init__(self, *, voice: str = "en", words_per_minute: int = 160, **kwargs: Any) -> None:
        if not 80 <= words_per_minute <= 450:
            raise ValueError(f"words_per_minute must be in 80..450, got {words_per_minute}")
        settings = TTSSettings(model=None, voice=voice, language=None)
        super().__init__(push_start_frame=True, push_stop_frames=True, settings=settings, **kwargs)
        binary = shutil.which("espeak-ng")
        if binary is None:
            raise InputError("EspeakTTSService needs espeak-ng: apt-get install espeak-ng")
        self._binary = binary
        self._voice = voice
        self._wpm = words_per_minute

    def can_generate_metrics(self) -> bool:
        return True

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame, None]:
        """Speak ``text``: espeak-ng's WAV on stdout, streamed as it is synthesised."""
        proc = await asyncio.create_subprocess_exec(
            self._binary,
            "-v",
            self._voice,
            "-s",
            str(self._wpm),
            "--stdout",
            text,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None

        async def chunks() -> AsyncIterator[bytes]:
            assert proc.stdout is not None
            while True:
                data = await proc.stdout.read(self.READ_BYTES)
                if not data:
                    return
                yield data

        try:
            await self.start_tts_usage_metrics(text)
            async for frame in self._stream_audio_frames_from_iterator(
                chunks(), strip_wav_header=True, context_id=context_id
            ):
                await self.stop_ttfb_metrics()
                yield frame
            rc = await proc.wait()
            if rc != 0:
                err = (
                    (await proc.stderr.read()).decode(errors="replace").strip()
                    if proc.stderr
                    else ""
                )
                yield ErrorFrame(error=f"espeak-ng failed (exit {rc}): {err}")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await self.stop_ttfb_metrics()


__all__ = [
    "META_KEY",
    "SMALLWEBRTC_AUDIO_LEAD_MS",
    "EspeakTTSService",
    "TalkstreamVideoService",
    # SmallWebRTC's fixes (talkstream.integrations.smallwebrtc), here too for convenience
    "catch_up_in_pauses",
    "drop_smallwebrtc_audio_on_interruption",
    "prompt_live_video",
    "sender_reports_in_media_time",
    "skip_late_silence",
    "steady_smallwebrtc_audio",
    "tune_smallwebrtc",
]
