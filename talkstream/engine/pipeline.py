"""The streaming pipeline: one loaded ``Engine`` shared by many ``Session``s.

Per session: audio chunks go in through ``Session.push_audio(pcm, sample_rate)``; frames come out,
with presentation timestamps, from ``Session.frames()`` (async) or ``Session.render_ready()``
(sync, for offline work). The heavy work (motion model, denoiser, paste-back) runs in the
engine's single inference worker thread, never on the caller's event loop; ``push_audio`` only
runs the audio frontend, which costs microseconds per 20 ms chunk.

Two stages, two owners. ``Engine.render(items) -> Faces`` is pure: plain-data ``RenderItem``s in
(a session's mel window, landmarks, noise, its avatar's features), face crops and landmarks
out, on the engine's device. Pasting a crop into the avatar's frame is the caller's post stage
(``talkstream.engine.compose.Compositor``, one per session), run on the device the crop is on;
a ``Session`` builds the items and runs its compositor on what the engine returns. On a GPU the
frame stays on the device until the encoder converts it (``compose.i420_host``).

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
from functools import partial
from importlib import resources
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch

from talkstream.config import FPS, SAMPLE_RATE_HZ, EngineConfig
from talkstream.engine.audio import MelFrontend
from talkstream.engine.avatar import Avatar
from talkstream.engine.checkpoint import Models, load_checkpoint
from talkstream.engine.compose import Compositor, to_host
from talkstream.engine.denoiser import ReferenceFeatures
from talkstream.engine.idle import IdleMotion
from talkstream.engine.motion import MotionStreamer, latency_samples, silence_level
from talkstream.engine.runtime import LoadedModels, torch_dtype
from talkstream.engine.sampler import FewStepSampler, NoiseSchedule, session_noise

log = logging.getLogger(__name__)

TIME_BASE = Fraction(1, FPS)
WARMUP_AUDIO_S = 1.0  # Engine.warmup(avatar) renders this much speech-like noise


def default_checkpoint(preset: str) -> Path | None:
    """The trained checkpoint shipped in the package for ``preset``, if there is one."""
    path = Path(str(resources.files("talkstream") / "assets" / "models" / preset))
    return path if (path / "config.json").is_file() else None


def load_models(cfg: EngineConfig) -> Models:
    """The networks ``cfg`` names: its checkpoint, else the preset's shipped one, else random
    weights (with a warning: the face region will be noise)."""
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


def make_sampler(models: Models, cfg: EngineConfig) -> FewStepSampler:
    """The few-step sampler an engine runs: the models' noise schedule, ``cfg``'s step count."""
    return FewStepSampler(NoiseSchedule(models.sampler), cfg.sampler.steps)


@dataclass(frozen=True)
class Frame:
    """One output video frame.

    ``image`` is the full (H, W, 3) uint8 RGB frame on the device it was composed on: a numpy
    array from a CPU engine; a torch uint8 CUDA tensor from a GPU engine (it stays on the GPU:
    convert it for the encoder there with ``compose.i420_host``, or take :meth:`to_host`).
    """

    image: Any  # (H, W, 3) uint8 RGB: np.ndarray on the CPU, torch.Tensor on a GPU
    pts: int  # frame index from the session's start
    landmarks: np.ndarray  # (68, 2) target landmarks in normalised crop coords (host)
    time_base: Fraction = TIME_BASE

    @property
    def time_s(self) -> float:
        return float(self.pts * self.time_base)

    @property
    def on_device(self) -> bool:
        """True when ``image`` is a GPU tensor (not a host numpy array)."""
        return not isinstance(self.image, np.ndarray)

    def to_host(self) -> np.ndarray:
        """``image`` as a host numpy array (itself on the CPU; one copy from a GPU)."""
        return to_host(self.image)


@dataclass(frozen=True)
class AvatarFeatures:
    """What the denoiser reuses every frame of an avatar: ``Engine.encode_avatar``, once."""

    key: str  # the avatar's content key (Avatar.key)
    ref: ReferenceFeatures  # tensors on the engine's device, in its dtype
    neutral: np.ndarray  # (68, 2) float32 rest landmarks, normalised crop coords (host)


@dataclass(frozen=True, eq=False)
class RenderItem:
    """One frame to render: plain data, everything ``Engine.render`` reads.

    Built by ``Session.take_ready``; it holds no session and no callback, so rendering the same
    items twice gives the same faces, and the engine never touches a session.
    """

    stream: int  # Session.id of the stream it belongs to
    pts: int  # frame index from the stream's start
    window: np.ndarray  # (W, R, n_mels) float32 mel window of the frame
    lookahead: int  # the stream's lookahead in frames
    idle_offset: np.ndarray  # (68, 2) float32 idle motion (blinks, sway) of the frame
    features: AvatarFeatures  # the avatar's reference features
    noise: torch.Tensor  # (1, 3, S, S) the stream's fixed noise, engine device and dtype


@dataclass(frozen=True)
class Faces:
    """What ``Engine.render`` returns for N items: face crops and their landmarks."""

    crops: Any  # (N, S, S, 3) uint8 RGB: np.ndarray on a CPU engine, torch CUDA tensor on a GPU
    landmarks: np.ndarray  # (N, 68, 2) float32 target landmarks, normalised crop coords (host)

    def __len__(self) -> int:
        return len(self.landmarks)

    def __getitem__(self, index: slice) -> Faces:
        """A slice of the batch (views, no copies)."""
        if not isinstance(index, slice):
            raise TypeError("index Faces with a slice (faces.crops[i] is one crop)")
        return Faces(self.crops[index], self.landmarks[index])


@dataclass(frozen=True)
class SessionSpec:
    """What a ``Session`` needs from its engine (``Engine.session_spec``)."""

    audio: Any  # AudioConfig: the mel frontend's settings
    motion: Any  # MotionConfig: the motion model's window and lookahead
    idle: Any  # IdleConfig
    seed: int  # default noise / idle seed
    lookahead: int | None  # default lookahead in frames (None: the model's)
    crop_size: int  # S
    device: torch.device
    dtype: torch.dtype


_stream_ids = count(1)


class Engine:
    """Loaded networks, shared by every session. Thread-safe; one inference worker.

    Build one with ``talkstream.runtime.load_engine(cfg)``: it loads the checkpoint and the
    backend the config names and passes the loaded runtime here.
    """

    def __init__(
        self, cfg: EngineConfig, runtime: LoadedModels, models: Models | None = None
    ) -> None:
        """An engine over ``runtime`` (a loaded backend, see ``talkstream.engine.runtime``)
        running ``models`` (default: the runtime's own), as ``cfg`` says."""
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = torch_dtype(cfg.dtype)
        models = runtime.models if models is None else models
        if models is not runtime.models:
            raise ValueError("the runtime was loaded with other models than the engine's")
        if (runtime.device, runtime.dtype) != (self.device, self.dtype):
            raise ValueError(
                f"the runtime runs on {runtime.device} ({runtime.dtype}) but the config says "
                f"{self.device} ({self.dtype}); load it with LoadOptions.from_config(cfg)"
            )
        self.models = models
        self.random_init = bool(models.meta.get("random_init"))
        # The eager modules stay for their configs and the once-per-avatar reference encoding;
        # motion and denoiser calls per frame go through the runtime.
        self.motion = models.motion.to(self.device).eval()
        self.denoiser = models.denoiser.to(self.device, self.dtype).eval()
        self.audio_cfg = models.audio
        self.sampler = make_sampler(models, cfg)
        self.schedule = self.sampler.schedule
        self.backend = runtime
        self.crop_size = self.denoiser.cfg.image_size
        self._lock = threading.Lock()  # one model call at a time
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="talkstream-infer")
        # Requests of Engine.submit waiting for the worker; it drains them in batches.
        self._pending: list[_Request] = []
        self._pending_lock = threading.Lock()
        self._draining = False
        self.batches_rendered = 0  # engine calls made by submit()
        self._features: dict[str, AvatarFeatures] = {}  # Engine.encode_avatar, by avatar key
        self.warmup_s = self.warmup() if cfg.warmup else 0.0

    def warmup(self, avatar: Avatar | None = None, seconds: float = WARMUP_AUDIO_S) -> float:
        """Warm up; returns the seconds it took. The one warm-up every caller uses.

        Without ``avatar`` (at load, when ``cfg.warmup``): every per-frame network runs once on
        dummy inputs. With ``avatar`` (before serving it): ``seconds`` of speech-like noise are
        rendered through a session one frame at a time, as a live stream renders, so the whole
        per-frame path (motion, denoiser, paste-back, the avatar's reference features) has run.
        First calls pay for lazy imports (the custom ops pull in sympy), kernel selection and,
        for compiled backends, compilation: a start-up phase of its own, never charged to a
        user's first frame.
        """
        t0 = time.perf_counter()
        if avatar is not None:
            session = self.session(avatar)
            rng = np.random.default_rng(0)
            n_samples = int(seconds * SAMPLE_RATE_HZ)
            session.push_audio(
                (0.1 * rng.standard_normal(n_samples)).astype(np.float32), SAMPLE_RATE_HZ
            )
            session.end_audio()
            session.max_batch = 1  # live streams render one or two frames at a time
            n = 0
            while session.has_ready() and n < seconds * FPS:
                n += len(session.render_ready())
            return time.perf_counter() - t0
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

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- avatars -------------------------------------------------------------------------------

    def encode_avatar(self, avatar: Avatar) -> AvatarFeatures:
        """The denoiser's reference features of ``avatar`` on this engine's device.

        Computed once per avatar and cached by its content key. (``prepare_avatar`` turns a
        photo into an ``Avatar`` on the host; this encodes that avatar for the networks.)
        """
        if avatar.crop_size != self.crop_size:
            raise ValueError(
                f"avatar crop is {avatar.crop_size}px but the {self.models.preset!r} model "
                f"renders {self.crop_size}px; prepare the avatar with crop_size={self.crop_size}"
            )
        hit = self._features.get(avatar.key)
        if hit is not None:
            return hit
        crop = torch.from_numpy(avatar.crop).to(self.device).permute(2, 0, 1)[None]  # (1,3,S,S)
        crop = crop.to(self.dtype) / 127.5 - 1.0
        with self._lock, torch.inference_mode():
            ref = self.denoiser.encode_reference(crop)
        features = AvatarFeatures(avatar.key, ref, avatar.neutral_normalized())
        self._features[avatar.key] = features
        return features

    @property
    def session_spec(self) -> SessionSpec:
        """What a Session needs to build render items for this engine."""
        return SessionSpec(
            audio=self.audio_cfg,
            motion=self.motion.cfg,
            idle=self.cfg.idle,
            seed=self.cfg.sampler.seed,
            lookahead=self.cfg.lookahead_frames,
            crop_size=self.crop_size,
            device=self.device,
            dtype=self.dtype,
        )

    def session(
        self, avatar: Avatar, *, seed: int | None = None, lookahead: int | None = None
    ) -> Session:
        """A new streaming session speaking with ``avatar``."""
        return Session(self, avatar, seed=seed, lookahead=lookahead)

    # -- inference -----------------------------------------------------------------------------

    @torch.inference_mode()
    def render(self, items: Sequence[RenderItem]) -> Faces:
        """Motion and denoiser for a batch of frames (of one or more streams): face crops out.

        Pure: reads only ``items`` and the networks; the crops stay on the engine's device
        (numpy on the CPU, a torch tensor on a GPU). Pasting them into frames is the caller's
        post stage (``Session.compose``).
        """
        if not items:
            s = self.crop_size
            empty = np.empty((0, s, s, 3), np.uint8)
            return Faces(empty, np.empty((0, 68, 2), np.float32))
        dev = self.device
        windows = torch.from_numpy(np.stack([it.window for it in items])).to(dev)  # (N,W,R,80)
        neutral_np = np.stack([it.features.neutral for it in items])  # (N, 68, 2)
        neutral = torch.from_numpy(neutral_np).to(dev)
        with self._lock:
            disp = torch.empty(len(items), *self.motion.head_shape, device=dev)  # (N, 37, 2)
            for la in sorted({it.lookahead for it in items}):
                sel = [i for i, it in enumerate(items) if it.lookahead == la]
                disp[sel] = self.backend.motion(windows[sel], neutral[sel], la)
            target = self.motion.apply_displacement(neutral, disp)  # (N, 68, 2)
            idle = np.stack([it.idle_offset for it in items])  # (N, 68, 2)
            target = target + torch.from_numpy(idle).to(dev)
            crops = self._denoise(items, target)  # (N, S, S, 3) uint8, on the engine's device
        return Faces(crops, target.float().cpu().numpy())

    def submit(
        self, items: Sequence[RenderItem], then: Callable[[Faces], Any] | None = None
    ) -> Future[Any]:
        """Render ``items`` in the worker, coalesced with whatever other callers submitted.

        Every request that is waiting when the worker becomes free goes into one
        :meth:`render` call (up to ``cfg.max_batch_frames`` frames): concurrent streams share
        a batch instead of queueing one engine call each, and nothing waits for a batch to
        fill. The future gets exactly this request's ``Faces``, in order, or, with ``then``,
        what ``then(faces)`` returns: the worker calls it right after the batch (a session's
        post stage runs there, off the caller's event loop). A request cancelled before the
        worker takes it is never rendered.
        """
        fut: Future[Any] = Future()
        with self._pending_lock:
            self._pending.append(_Request(list(items), then, fut))
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

    def _take_pending(self) -> list[_Request]:
        """The next batch of requests (within max_batch_frames, at least one request); [] when
        none is left, and then the worker counts as idle (the next submit schedules it)."""
        with self._pending_lock:
            taken: list[_Request] = []
            n = 0
            while self._pending:
                req = self._pending[0]
                if taken and n + len(req.items) > self.cfg.max_batch_frames:
                    break
                self._pending.pop(0)
                if req.future.set_running_or_notify_cancel():
                    taken.append(req)
                    n += len(req.items)
            if not taken:
                self._draining = False  # nothing left (every waiting request was cancelled)
            return taken

    def _drain(self) -> None:
        while True:
            taken = self._take_pending()
            if not taken:
                return
            items = [it for req in taken for it in req.items]
            try:
                faces = self.render(items)
            except BaseException as e:  # every waiter hears about it; the worker goes on
                for req in taken:
                    req.future.set_exception(e)
                continue
            self.batches_rendered += 1
            k = 0
            for req in taken:
                mine = faces[k : k + len(req.items)]
                k += len(req.items)
                if req.then is None:
                    req.future.set_result(mine)
                    continue
                try:
                    result = req.then(mine)
                except BaseException as e:  # this request's post stage failed: only its waiter
                    req.future.set_exception(e)
                else:
                    req.future.set_result(result)

    def _denoise(self, items: Sequence[RenderItem], target: torch.Tensor) -> Any:
        """(N, S, S, 3) uint8 crops: numpy on the CPU; on a GPU a torch tensor that stays there."""
        n, s = len(items), self.crop_size
        on_cpu = self.device.type == "cpu"
        if on_cpu:
            out: Any = np.empty((n, s, s, 3), dtype=np.uint8)
        else:
            out = torch.empty((n, s, s, 3), dtype=torch.uint8, device=self.device)
        # Group by avatar: one reference batch broadcast over the group's frames.
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.features.key, []).append(i)
        for idx in groups.values():
            ref = items[idx[0]].features.ref
            noise = torch.cat([items[i].noise for i in idx])  # (n, 3, S, S)
            lm = target[idx].to(self.dtype)  # (n, 68, 2)
            x0 = self.backend.sample(self.sampler, noise, lm, ref)  # (n, 3, S, S)
            if on_cpu:
                # numpy, single-threaded: a torch op this size would wake torch's OpenMP pool,
                # whose threads then spin and contend with the backend's own next call.
                a = x0.float().numpy().transpose(0, 2, 3, 1)  # (n, S, S, 3)
                out[idx] = np.rint((np.clip(a, -1.0, 1.0) + 1.0) * 127.5)
            else:  # on the GPU, and there it stays: the post stage pastes it on the device
                img = ((x0.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                out[idx] = img.permute(0, 2, 3, 1)  # (n, S, S, 3)
        return out


@dataclass(frozen=True)
class _Request:
    """One ``Engine.submit`` call waiting for the worker."""

    items: list[RenderItem]
    then: Callable[[Faces], Any] | None
    future: Future[Any]


class Session:
    """One stream: audio in, frames with timestamps out.

    ``push_audio`` may be called from any thread (a pyaudio callback, an event loop); frames are
    produced in order, each exactly once, by either ``frames()`` or ``render_ready()``.

    A session builds plain ``RenderItem``s (``take_ready``), has the engine render them (its
    public ``render``/``submit``), and pastes the faces into frames with its own
    ``compositor``, the post stage (``compose``).
    """

    time_base = TIME_BASE

    def __init__(
        self,
        engine: Engine,
        avatar: Avatar,
        *,
        seed: int | None = None,
        lookahead: int | None = None,
        max_batch: int = 8,
        compositor: Compositor | None = None,
    ) -> None:
        spec = engine.session_spec
        self.engine = engine
        self.id = next(_stream_ids)  # RenderItem.stream of this session's items
        self.avatar = avatar
        self.features = engine.encode_avatar(avatar)
        self.compositor = compositor if compositor is not None else Compositor(avatar)
        self.seed = spec.seed if seed is None else seed
        la = spec.lookahead if lookahead is None else lookahead
        self._audio_cfg = spec.audio
        self._motion_cfg = spec.motion
        self.frontend = MelFrontend(spec.audio)
        self.streamer = MotionStreamer(spec.motion, silence_level(spec.audio), la)
        self.lookahead = self.streamer.lookahead
        self.idle = IdleMotion(self.features.neutral, spec.idle, self.seed)
        s = spec.crop_size
        # One noise tensor for the whole session: the same noise every frame, no flicker.
        self.noise = session_noise((1, 3, s, s), self.seed, spec.device, spec.dtype)
        # Most frames of this session one take_ready (one render call) claims; streams set it
        # (StreamConfig.frames_per_call), offline rendering keeps 8. The engine's own limit,
        # EngineConfig.max_batch_frames, caps what submit() coalesces across sessions.
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
        # Rewind points (see ``rewind``): the audio state at each of the last
        # ``rewind_frames`` frame starts, as (frame, frontend, streamer). Off (0) by default.
        self.rewind_frames = 0
        self._rewind_points: deque[tuple[int, MelFrontend, MotionStreamer]] = deque()
        self._samples_in = 0  # input samples pushed (at the first push's rate)
        self._samples_per_frame_in: int | None = None  # None: that rate has no whole frames

    # -- input ---------------------------------------------------------------------------------

    def push_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Feed a chunk of any length: int16/int32/float PCM, (n,) or (n, channels)."""
        with self._lock:
            if self._ended:
                raise RuntimeError("push_audio() after end_audio(): the session's audio ended")
            if self.rewind_frames <= 0:
                self._push(pcm, sample_rate)
            else:
                self._push_keeping_rewind_points(pcm, sample_rate)
        self._wake()

    def _push(self, pcm: np.ndarray, sample_rate: int) -> None:
        self.streamer.push_mel(self.frontend.push(pcm, sample_rate))
        self._samples_in += pcm.shape[0]

    def _push_keeping_rewind_points(self, pcm: np.ndarray, sample_rate: int) -> None:
        # Split the chunk at frame starts and keep the audio state at each (see rewind).
        if self._samples_in == 0:
            self._samples_per_frame_in = sample_rate // FPS if sample_rate % FPS == 0 else None
        spf = self._samples_per_frame_in
        if spf is None:
            self._push(pcm, sample_rate)
            return
        pos, n = 0, pcm.shape[0]
        while pos < n:
            if self._samples_in % spf == 0:
                self._keep_rewind_point(self._samples_in // spf)
            take = min(n - pos, spf - self._samples_in % spf)
            self._push(pcm[pos : pos + take], sample_rate)
            pos += take

    def _keep_rewind_point(self, frame: int) -> None:
        points = self._rewind_points
        if points and points[-1][0] >= frame:
            return
        points.append((frame, self.frontend.clone(compact=True), self.streamer.clone()))
        while len(points) > self.rewind_frames:
            points.popleft()

    def rewind(self, at_frame: int) -> bool:
        """Take back the audio pushed from frame ``at_frame``'s start on; the next push
        continues from there. Returns False (nothing changed) when that point is not held.

        For a presenter whose speech arrives while the avatar idles: the silence already fed
        ahead of the display (the latency budget's worth) is replaced by the speech, so the
        voice and lips start at the next frame that can still change instead of after that
        silence. Needs ``rewind_frames`` > 0 (the last that many frame starts are held) and a
        sample rate with a whole number of samples per frame. Frames from ``at_frame`` on that
        were already taken are taken again (``frames()`` drops the old renders, as after
        ``interrupt``); frames before it are not, and those not yet taken see the new audio
        in their lookahead. Frame indices go on unchanged. Thread-safe.
        """
        with self._lock:
            if self._ended:
                return False
            spf = self._samples_per_frame_in
            point = next((p for p in self._rewind_points if p[0] == at_frame), None)
            if spf is None or point is None or at_frame * spf > self._samples_in:
                return False
            _, frontend, streamer = point
            emitted = self.streamer.next_frame
            self.frontend = frontend.clone()
            self.streamer = streamer.clone()
            # Frames already taken before the cut stay taken; later ones are taken again.
            self.streamer.next_frame = max(self.streamer.next_frame, min(emitted, at_frame))
            self._samples_in = at_frame * spf
            while self._rewind_points and self._rewind_points[-1][0] > at_frame:
                self._rewind_points.pop()
            self.interrupts += 1
            self._cuts.append((self.interrupts, at_frame))
        self._wake()
        return True

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
        acfg = self._audio_cfg
        with self._lock:
            fe = self.frontend
            # Speech fed so far ends at samples_received_16k plus what the resampler still
            # holds; a resampled sample depends on input up to that lookahead on either side.
            resampler_lat = fe.latency_samples_16k - (acfg.n_fft - acfg.n_fft // 2)
            speech_end = fe.samples_received_16k + 2 * max(resampler_lat, 0)
            # The first mel row whose STFT window starts after the speech (one row of margin).
            clean_row = -(-(speech_end + acfg.n_fft // 2) // acfg.hop_samples) + 1
            self.streamer.interrupt(at_frame, clean_row, keep_past=keep_past)
            # A rewind past this cut would bring back the speech it silenced.
            self._rewind_points.clear()
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
        samples = latency_samples(self._motion_cfg, self._audio_cfg, self.lookahead)
        return (samples + self.frontend.latency_samples_16k - self._audio_cfg.n_fft // 2) / (
            SAMPLE_RATE_HZ
        )

    # -- output --------------------------------------------------------------------------------

    def take_ready(self) -> list[RenderItem]:
        """Claim up to ``max_batch`` ready frames, unrendered, as plain render items.

        Pass the items of one or more sessions to ``Engine.render`` (one batched call for all
        sessions that are due together), then each session's share of the faces to its
        :meth:`compose`; each frame is claimed exactly once.
        """
        return self._take_ready()[0]

    def _take_ready(self) -> tuple[list[RenderItem], int]:
        """take_ready() and the interruption count its windows were built after."""
        with self._lock:
            frames, windows = self.streamer.ready_windows(self.max_batch)
            interrupts = self.interrupts
            items = [
                RenderItem(
                    stream=self.id,
                    pts=t,
                    window=windows[i],
                    lookahead=self.lookahead,
                    idle_offset=self.idle.offset(t),
                    features=self.features,
                    noise=self.noise,
                )
                for i, t in enumerate(frames)
            ]
        return items, interrupts

    def compose(self, items: Sequence[RenderItem], faces: Faces) -> list[Frame]:
        """The post stage: paste ``faces`` (rendered from this session's ``items``) into frames,
        on the faces' device."""
        return self.compositor.frames(items, faces)

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
        items = self.take_ready()
        if not items:
            return []
        return self.compose(items, self.engine.render(items))

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
                # Coalesced with other sessions' due frames into one engine call; the post
                # stage (paste-back) runs in the engine's worker too, off this loop.
                fut = self.engine.submit(items, then=partial(self.compose, items))
                rendered = await asyncio.wrap_future(fut, loop=loop)
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
