"""The streaming pipeline: one loaded ``Engine`` shared by many ``Session``s.

Per session: audio chunks go in through ``Session.push_audio(pcm, sample_rate)``; frames come out,
with presentation timestamps, from ``Session.frames()`` (async) or ``Session.render_ready()``
(sync, for offline work). The heavy work (motion model, denoiser, paste-back) runs in the
engine's single inference worker thread, never on the caller's event loop; ``push_audio`` only
runs the audio frontend, which costs microseconds per 20 ms chunk.

For barge-in, ``Session.interrupt(at_frame)`` renders the frames from ``at_frame`` on as if the
audio fell silent there (the audio fed ahead of the display is cut, the face is at rest at once).

Frame ``pts`` counts video frames from the session's start (``time_base`` = 1/25 s): media time
comes from the audio sample counter, never from how fast compute ran.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from talkstream.config import FPS, SAMPLE_RATE_HZ, EngineConfig
from talkstream.engine.audio import MelFrontend
from talkstream.engine.avatar import Avatar
from talkstream.engine.checkpoint import Models, load_checkpoint
from talkstream.engine.denoiser import ReferenceFeatures
from talkstream.engine.idle import IdleMotion
from talkstream.engine.motion import MotionStreamer, latency_samples, silence_level
from talkstream.engine.sampler import FewStepSampler, NoiseSchedule, session_noise
from talkstream.export.backends import load_backend
from talkstream.kernels.post import paste_back

log = logging.getLogger(__name__)

TIME_BASE = Fraction(1, FPS)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_checkpoint(preset: str) -> Path | None:
    """The trained checkpoint shipped in the package for ``preset``, if there is one."""
    path = Path(str(resources.files("talkstream") / "assets" / "models" / preset))
    return path if (path / "config.json").is_file() else None


@dataclass(frozen=True)
class Frame:
    """One output video frame."""

    image: np.ndarray  # (H, W, 3) uint8 RGB, the full frame
    pts: int  # frame index from the session's start
    landmarks: np.ndarray  # (68, 2) target landmarks in normalised crop coords
    time_base: Fraction = TIME_BASE

    @property
    def time_s(self) -> float:
        return float(self.pts * self.time_base)


@dataclass
class PreparedAvatar:
    """An avatar plus what the denoiser reuses every frame (computed once)."""

    avatar: Avatar
    ref: ReferenceFeatures
    neutral: np.ndarray  # (68, 2) normalised crop coords


class Engine:
    """Loaded networks, shared by every session. Thread-safe; one inference worker."""

    def __init__(self, cfg: EngineConfig | None = None, models: Models | None = None) -> None:
        self.cfg = cfg = cfg or EngineConfig()
        if cfg.dtype not in _DTYPES:
            raise ValueError(f"dtype {cfg.dtype!r} is not one of {sorted(_DTYPES)}")
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        self.dtype = _DTYPES[cfg.dtype]
        if models is None:
            models = self._load_models(cfg)
        self.models = models
        self.random_init = bool(models.meta.get("random_init"))
        self.motion = models.motion.to(self.device).eval()
        self.denoiser = models.denoiser.to(self.device, self.dtype).eval()
        self.audio_cfg = models.audio
        self.schedule = NoiseSchedule(models.sampler)
        self.sampler = FewStepSampler(self.schedule, cfg.sampler.steps)
        # Motion and denoiser calls go through the backend (eager for "torch"); the modules
        # above stay for their configs and the once-per-avatar reference encoding. Artifacts
        # (ONNX graphs, engines) are cached under the same root as prepared avatars.
        self.backend = load_backend(
            cfg.backend,
            models,
            cfg.device,
            dtype=cfg.dtype,
            cache_dir=cfg.avatar.cache_dir,
            threads=cfg.threads,
            sampler=self.sampler,
            lookaheads=() if cfg.lookahead_frames is None else (cfg.lookahead_frames,),
            # Artifacts must take every batch the engine coalesces (Engine.submit).
            max_batch=cfg.max_batch_frames,
            precision=cfg.tensorrt_precision,
        )
        self.crop_size = self.denoiser.cfg.image_size
        self._lock = threading.Lock()  # one model call at a time
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="talkstream-infer")
        # Requests of Engine.submit waiting for the worker; it drains them in batches.
        self._pending: list[tuple[list[RenderItem], Future[list[Frame]]]] = []
        self._pending_lock = threading.Lock()
        self._draining = False
        self.batches_rendered = 0  # engine calls made by submit()
        self._prepared: dict[str, PreparedAvatar] = {}
        self.warmup_s = self.warmup() if cfg.warmup else 0.0

    def warmup(self) -> float:
        """Run every per-frame network once on dummy inputs; returns the seconds it took.

        First calls pay for lazy imports (the custom ops pull in sympy), kernel selection and,
        for compiled backends, compilation: a start-up phase of its own, never charged to a
        user's first frame.
        """
        t0 = time.perf_counter()
        mcfg = self.motion.cfg
        s = self.crop_size
        with self._lock, torch.inference_mode():
            windows = torch.full(
                (1, mcfg.window, mcfg.mel_rows, mcfg.n_mels),
                silence_level(self.audio_cfg),
                device=self.device,
            )  # (1, W, R, 80)
            neutral = torch.zeros(1, 68, 2, device=self.device)
            self.backend.motion(windows, neutral, mcfg.lookahead_frames)
            ref = self.denoiser.encode_reference(
                torch.zeros(1, 3, s, s, device=self.device, dtype=self.dtype)
            )
            noise = torch.zeros(1, 3, s, s, device=self.device, dtype=self.dtype)
            self.backend.sample(self.sampler, noise, neutral.to(self.dtype), ref)
        return time.perf_counter() - t0

    @staticmethod
    def _load_models(cfg: EngineConfig) -> Models:
        path = cfg.checkpoint or default_checkpoint(cfg.preset)
        if path is not None:
            models = load_checkpoint(path, cfg.device)
            if cfg.checkpoint is not None and models.preset != cfg.preset:
                log.info("checkpoint %s is preset %r", path, models.preset)
            return models
        log.warning(
            "no trained checkpoint for preset %r: using randomly initialised weights, "
            "so the face region will be noise. Pass --checkpoint to use a trained model.",
            cfg.preset,
        )
        return Models.random_init(cfg.preset, sampler=cfg.sampler)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- avatars -------------------------------------------------------------------------------

    def prepare(self, avatar: Avatar) -> PreparedAvatar:
        """Reference features of ``avatar``, computed once and cached by its content key."""
        if avatar.crop_size != self.crop_size:
            raise ValueError(
                f"avatar crop is {avatar.crop_size}px but the {self.models.preset!r} model "
                f"renders {self.crop_size}px; prepare the avatar with crop_size={self.crop_size}"
            )
        hit = self._prepared.get(avatar.key)
        if hit is not None:
            return hit
        crop = torch.from_numpy(avatar.crop).to(self.device).permute(2, 0, 1)[None]  # (1,3,S,S)
        crop = crop.to(self.dtype) / 127.5 - 1.0
        with self._lock, torch.inference_mode():
            ref = self.denoiser.encode_reference(crop)
        prepared = PreparedAvatar(avatar, ref, avatar.neutral_normalized())
        self._prepared[avatar.key] = prepared
        return prepared

    def session(
        self, avatar: Avatar, *, seed: int | None = None, lookahead: int | None = None
    ) -> Session:
        """A new streaming session speaking with ``avatar``."""
        return Session(self, self.prepare(avatar), seed=seed, lookahead=lookahead)

    # -- inference -----------------------------------------------------------------------------

    @torch.inference_mode()
    def render(self, items: Sequence[RenderItem]) -> list[Frame]:
        """Motion, denoiser and paste-back for a batch of frames (of one or more sessions)."""
        if not items:
            return []
        dev = self.device
        windows = torch.from_numpy(np.stack([it.window for it in items])).to(dev)  # (N,W,R,80)
        neutral_np = np.stack([it.session.prepared.neutral for it in items])  # (N, 68, 2)
        neutral = torch.from_numpy(neutral_np).to(dev)
        with self._lock:
            disp = torch.empty(len(items), *self.motion.head_shape, device=dev)  # (N, 37, 2)
            for la in sorted({it.session.lookahead for it in items}):
                sel = [i for i, it in enumerate(items) if it.session.lookahead == la]
                disp[sel] = self.backend.motion(windows[sel], neutral[sel], la)
            target = self.motion.apply_displacement(neutral, disp)  # (N, 68, 2)
            idle = np.stack([it.session.idle.offset(it.pts) for it in items])  # (N, 68, 2)
            target = target + torch.from_numpy(idle).to(dev)
            crops = self._denoise(items, target)  # (N, S, S, 3) uint8
        landmarks = target.float().cpu().numpy()
        frames = []
        for i, it in enumerate(items):
            image = it.session.output_buffer()
            paste_back(
                it.session.prepared.avatar.image,
                crops[i],
                it.session.pmap,
                out=image,
                out_has_background=True,
            )
            frames.append(Frame(image=image, pts=it.pts, landmarks=landmarks[i]))
        return frames

    def submit(self, items: Sequence[RenderItem]) -> Future[list[Frame]]:
        """Render ``items`` in the worker, coalesced with whatever other callers submitted.

        Every request that is waiting when the worker becomes free goes into one
        :meth:`render` call (up to ``cfg.max_batch_frames`` frames): concurrent streams share
        a batch instead of queueing one engine call each, and nothing waits for a batch to
        fill. The future gets exactly this request's frames, in order; a request cancelled
        before the worker takes it is never rendered.
        """
        fut: Future[list[Frame]] = Future()
        with self._pending_lock:
            self._pending.append((list(items), fut))
            start = not self._draining
            self._draining = True
        if start:
            try:
                self.executor.submit(self._drain)
            except RuntimeError:  # shut down
                with self._pending_lock:
                    self._draining = False
                raise
        return fut

    def _take_pending(self) -> list[tuple[list[RenderItem], Future[list[Frame]]]]:
        """The next batch of requests (within max_batch_frames, at least one request); [] when
        none is left, and then the worker counts as idle (the next submit schedules it)."""
        with self._pending_lock:
            taken: list[tuple[list[RenderItem], Future[list[Frame]]]] = []
            n = 0
            while self._pending:
                items, fut = self._pending[0]
                if taken and n + len(items) > self.cfg.max_batch_frames:
                    break
                self._pending.pop(0)
                if fut.set_running_or_notify_cancel():
                    taken.append((items, fut))
                    n += len(items)
            if not taken:
                self._draining = False  # nothing left (every waiting request was cancelled)
            return taken

    def _drain(self) -> None:
        while True:
            taken = self._take_pending()
            if not taken:
                return
            items = [it for req, _ in taken for it in req]
            try:
                frames = self.render(items)
            except BaseException as e:  # every waiter hears about it; the worker goes on
                for _, fut in taken:
                    fut.set_exception(e)
                continue
            self.batches_rendered += 1
            k = 0
            for req, fut in taken:
                fut.set_result(frames[k : k + len(req)])
                k += len(req)

    def _denoise(self, items: Sequence[RenderItem], target: torch.Tensor) -> np.ndarray:
        # Group by avatar: one reference batch broadcast over the group's frames.
        out = np.empty((len(items), self.crop_size, self.crop_size, 3), dtype=np.uint8)
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.session.prepared.avatar.key, []).append(i)
        for idx in groups.values():
            ref = items[idx[0]].session.prepared.ref
            noise = torch.cat([items[i].session.noise for i in idx])  # (n, 3, S, S)
            lm = target[idx].to(self.dtype)  # (n, 68, 2)
            x0 = self.backend.sample(self.sampler, noise, lm, ref)  # (n, 3, S, S)
            if x0.device.type == "cpu":
                # numpy, single-threaded: a torch op this size would wake torch's OpenMP pool,
                # whose threads then spin and contend with the backend's own next call.
                a = x0.float().numpy().transpose(0, 2, 3, 1)  # (n, S, S, 3)
                out[idx] = np.rint((np.clip(a, -1.0, 1.0) + 1.0) * 127.5)
            else:  # on the GPU, convert there and copy back a quarter of the bytes
                img = ((x0.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                out[idx] = img.permute(0, 2, 3, 1).cpu().numpy()  # (n, S, S, 3)
        return out


@dataclass
class RenderItem:
    session: Session
    pts: int
    window: np.ndarray  # (W, R, n_mels)


class Session:
    """One stream: audio in, frames with timestamps out.

    ``push_audio`` may be called from any thread (a pyaudio callback, an event loop); frames are
    produced in order, each exactly once, by either ``frames()`` or ``render_ready()``.
    """

    time_base = TIME_BASE

    def __init__(
        self,
        engine: Engine,
        prepared: PreparedAvatar,
        *,
        seed: int | None = None,
        lookahead: int | None = None,
        max_batch: int = 8,
    ) -> None:
        self.engine = engine
        self.prepared = prepared
        self.seed = engine.cfg.sampler.seed if seed is None else seed
        la = engine.cfg.lookahead_frames if lookahead is None else lookahead
        self.frontend = MelFrontend(engine.audio_cfg)
        self.streamer = MotionStreamer(engine.motion.cfg, silence_level(engine.audio_cfg), la)
        self.lookahead = self.streamer.lookahead
        self.idle = IdleMotion(prepared.neutral, engine.cfg.idle, self.seed)
        s = engine.crop_size
        # One noise tensor for the whole session: the same noise every frame, no flicker.
        self.noise = session_noise((1, 3, s, s), self.seed, engine.device, engine.dtype)
        self.pmap = prepared.avatar.paste
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._ended = False
        self.frames_skipped = 0  # frames never rendered: skip_until() passed them
        # Wall time per frame of the last batch frames() rendered, queueing in the shared
        # worker included: what a live caller must budget for the next one.
        self.render_wall_s = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        # Interruptions: how many so far, and (count after it, cut frame) of the recent ones,
        # so that frames() can drop frames rendered from windows taken before a cut.
        self.interrupts = 0
        self._cuts: deque[tuple[int, int]] = deque(maxlen=64)

    # -- input ---------------------------------------------------------------------------------

    def push_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Feed a chunk of any length: int16/int32/float PCM, (n,) or (n, channels)."""
        with self._lock:
            if self._ended:
                raise RuntimeError("push_audio() after end_audio(): the session's audio ended")
            self.streamer.push_mel(self.frontend.push(pcm, sample_rate))
        self._wake()

    def end_audio(self) -> None:
        """No more audio: the remaining frames (up to the audio's duration) become ready."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
            self.streamer.push_mel(self.frontend.flush())
            self.streamer.end(self.frontend.samples_received_16k)
        self._wake()

    def interrupt(self, at_frame: int, *, keep_past: bool = False) -> None:
        """Render every frame from ``at_frame`` on as if the audio fell silent at its start.

        For barge-in: the audio fed so far (the latency budget's worth ahead of the display)
        holds speech that will not be played. The mel rows computed from it after the cut, and
        the rows the frontend will still compute from it (its STFT window and resampler tail),
        become silence; frames from ``at_frame`` on also forget the speech before the cut
        (unless ``keep_past``), so the first of them already shows the face at rest (idle
        motion goes on). Frames from ``at_frame`` on that were already taken are taken again;
        ``frames()`` drops those rendered from the old windows, a caller of
        ``take_ready``/``render_ready`` discards them itself. Frame indices (``pts``) and the
        sample counters go on unchanged: the caller keeps pushing audio where it left off
        (silence, or the next speech). Thread-safe, like ``push_audio``.
        """
        acfg = self.engine.audio_cfg
        with self._lock:
            fe = self.frontend
            # Speech fed so far ends at samples_received_16k plus what the resampler still
            # holds; a resampled sample depends on input up to that lookahead on either side.
            resampler_lat = fe.latency_samples_16k - (acfg.n_fft - acfg.n_fft // 2)
            speech_end = fe.samples_received_16k + 2 * max(resampler_lat, 0)
            # The first mel row whose STFT window starts after the speech (one row of margin).
            clean_row = -(-(speech_end + acfg.n_fft // 2) // acfg.hop_samples) + 1
            self.streamer.interrupt(at_frame, clean_row, keep_past=keep_past)
            self.interrupts += 1
            self._cuts.append((self.interrupts, max(at_frame, 0)))
        self._wake()

    def _cut_since(self, interrupts: int) -> int | None:
        """The earliest frame cut by the interruptions after the first ``interrupts``."""
        with self._lock:
            cuts = [f for n, f in self._cuts if n > interrupts]
        return min(cuts) if cuts else None

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def latency_s(self) -> float:
        """Algorithmic latency: audio that must arrive after a frame starts before it can render.

        Lookahead, the motion token's future mel rows, half an STFT window and the resampler's
        delay; compute, encode and network come on top.
        """
        samples = latency_samples(self.engine.motion.cfg, self.engine.audio_cfg, self.lookahead)
        return (samples + self.frontend.latency_samples_16k - self.engine.audio_cfg.n_fft // 2) / (
            SAMPLE_RATE_HZ
        )

    # -- output --------------------------------------------------------------------------------

    def output_buffer(self) -> np.ndarray:
        """A frame buffer holding the avatar's background, for the next frame."""
        return self.prepared.avatar.image.copy()

    def take_ready(self) -> list[RenderItem]:
        """Claim up to ``max_batch`` ready frames, unrendered.

        Pass the items of one or more sessions to ``Engine.render`` (one batched call for all
        sessions that are due together); each frame is claimed exactly once.
        """
        return self._take_ready()[0]

    def _take_ready(self) -> tuple[list[RenderItem], int]:
        """take_ready() and the interruption count its windows were built after."""
        with self._lock:
            frames, windows = self.streamer.ready_windows(self.max_batch)
            interrupts = self.interrupts
        return [RenderItem(self, t, windows[i]) for i, t in enumerate(frames)], interrupts

    def has_ready(self) -> bool:
        with self._lock:
            return self.streamer.has_ready()

    @property
    def done(self) -> bool:
        """Audio ended and every frame was produced."""
        return self._ended and not self.has_ready()

    def skip_until(self, pts: int) -> int:
        """Skip, without rendering, the ready frames before frame ``pts``; returns how many.

        For live output: a frame whose display deadline has passed is worth nothing, and
        rendering it would only make the next one late too. Only frames whose audio has arrived
        are skipped, so frames still come out in order and each at most once.
        """
        skipped = 0
        with self._lock:
            while self.streamer.next_frame < pts and self.streamer.has_ready():
                self.streamer.next_frame += 1
                skipped += 1
            self.frames_skipped += skipped
        return skipped

    def render_ready(self) -> list[Frame]:
        """Render up to ``max_batch`` ready frames in the calling thread (offline use)."""
        return self.engine.render(self.take_ready())

    async def frames(self, skip_before: Callable[[], int] | None = None) -> AsyncIterator[Frame]:
        """Frames as their audio arrives, rendered in the engine's worker; ends after end_audio.

        Args:
            skip_before: for live output, called before each batch: ready frames before the
                frame index it returns are skipped (see :meth:`skip_until`), never rendered.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._wakeup = asyncio.Event()
        while True:
            self._wakeup.clear()
            if skip_before is not None:
                self.skip_until(skip_before())
            if self.has_ready():
                items, interrupts = self._take_ready()
                t0 = time.perf_counter()
                # Coalesced with other sessions' due frames into one engine call.
                rendered = await asyncio.wrap_future(self.engine.submit(items), loop=loop)
                self.render_wall_s = (time.perf_counter() - t0) / max(len(rendered), 1)
                if self.interrupts != interrupts:
                    # Interrupted meanwhile: frames from the cut on are rendered again.
                    cut = self._cut_since(interrupts)
                    if cut is not None:
                        rendered = [f for f in rendered if f.pts < cut]
                for frame in rendered:
                    yield frame
                continue
            if self._ended:
                return
            await self._wakeup.wait()

    def _wake(self) -> None:
        loop, ev = self._loop, self._wakeup
        if loop is None or ev is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            ev.set()
        else:
            loop.call_soon_threadsafe(ev.set)
