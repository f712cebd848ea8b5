"""Run one scenario: warm-up, then per-stage latency, fps and peak memory.

One iteration is one tick of a live server: every session receives the audio of its next
``batch`` frames in 20 ms chunks, then the due frames of all sessions go through the engine's
own functions, the ones ``serve`` runs, in one batched call, and each frame is encoded the way
``serve`` sends it (VP8). Nothing is re-implemented here: the stages time the real calls.

Stages (milliseconds per iteration, i.e. per ``sessions * batch`` frames):

- ``audio``: ``Session.push_audio`` of the iteration's audio (log-mel frontend, motion rows).
- ``items``: ``Session.take_ready`` of every session (the plain render items).
- ``render``: ``Engine.render(items)``: motion and the denoiser for all sessions' frames in one
  call; face crops out (on a GPU they stay there). Inside it, observed without changing it
  (the engine's backend is wrapped by a timer for the measured iterations):
  ``render.motion`` (the motion model's calls) and ``render.denoise`` (the whole sampler loop
  of the denoiser); the rest of ``render`` is uploads and the crops' conversion to uint8.
- ``post``: ``Session.compose`` of every session: paste-back into the frame, on the crops'
  device (the caller-owned post stage).
- ``i420``: RGB to yuv420p by the video track's own function (``tracks.video_planes``: swscale
  on the host; on a GPU the conversion runs there and only the planes come to the host).
- ``vp8``: aiortc's ``Vp8Encoder``, what ``serve``'s RTP sender runs: libvpx realtime at its
  default 500 kbit/s, and the RTP packetization.

Derived: ``core`` = wall time of render + post (issue 3's "motion + denoiser + paste-back"
figure; on a GPU it waits for the device at its end); ``send`` = i420 + vp8; ``frame`` = the
whole iteration's wall time, audio in to VP8 packet out; ``unattributed`` = frame minus the sum
of the top-level stages.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from talkstream.benchmarking.encode import VideoSender, serve_i420, vp8_available
from talkstream.benchmarking.memory import (
    device_peak,
    host_peak,
    reset_device_peak,
    reset_host_peak,
)
from talkstream.benchmarking.scenario import Scenario
from talkstream.benchmarking.timing import StageRecorder, summarize
from talkstream.config import FPS, SAMPLE_RATE_HZ, AvatarConfig, EngineConfig
from talkstream.engine.avatar import Avatar, default_landmarks, prepare_avatar
from talkstream.engine.checkpoint import Models, load_checkpoint
from talkstream.engine.denoiser import DenoiserConfig, TalkFormerDenoiser
from talkstream.engine.motion import AudioToMotion, MotionConfig, rows_needed
from talkstream.engine.pipeline import Engine, Session, default_checkpoint
from talkstream.errors import TalkstreamError
from talkstream.kernels import reference_kernels
from talkstream.runtime import load_engine

log = logging.getLogger(__name__)

CHUNK_MS = 20  # audio arrives in 20 ms chunks, as from WebRTC or a microphone callback
CHUNK_SAMPLES = SAMPLE_RATE_HZ * CHUNK_MS // 1000
SAMPLES_PER_FRAME = SAMPLE_RATE_HZ // FPS
MIB = 1024 * 1024
# Stages observed inside another (``render.motion`` within ``render``): not summed again.
SUB_STAGE_SEP = "."


class BackendUnavailable(TalkstreamError):
    """A scenario's backend cannot run here; the message says why and what to install."""


def check_backend(name: str, device: str, dtype: str) -> None:
    """Raise ``BackendUnavailable`` with the export layer's reason unless ``name`` can run."""
    from talkstream.export.backends import AUTO, get_backend

    if name == AUTO:
        return  # the engine picks the fastest available one and logs which
    ok, why = get_backend(name).available(device, dtype)
    if not ok:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device} ({dtype}): {why}")


def fused_sampler(engine: Engine) -> bool:
    """Whether the engine's backend runs the whole few-step loop as one call (one graph)."""
    return engine.backend.fused_sample


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchFace:
    """The avatar photo and its 68 landmarks, fitted to the scenario's frame size."""

    image: np.ndarray  # (H, W, 3) uint8
    landmarks: np.ndarray  # (68, 2) pixels
    source: str


def bench_face(frame_size: tuple[int, int] | None) -> BenchFace:
    """The bundled default face (scikit-image's astronaut), scaled and padded to ``frame_size``.

    Without scikit-image (a bare GPU image) a synthetic photo of the same size is used with the
    same landmarks: with random weights the pixels do not change any timing, and the source is
    recorded in the results.
    """
    landmarks = default_landmarks().astype(np.float32)
    try:
        from talkstream.engine.avatar import default_image

        image = default_image()
        source = "astronaut"
    except ModuleNotFoundError:
        log.warning("scikit-image is not installed: benchmarking on a synthetic 512x512 photo")
        yy, xx = np.mgrid[0:512, 0:512]
        image = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
        source = "synthetic"
    if frame_size is None:
        return BenchFace(image, landmarks, source)
    from PIL import Image

    w, h = frame_size
    ih, iw = image.shape[:2]
    s = min(w / iw, h / ih)
    nw, nh = max(1, round(iw * s)), max(1, round(ih * s))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    canvas = np.full((h, w, 3), 128, dtype=np.uint8)
    ox, oy = (w - nw) // 2, (h - nh) // 2
    canvas[oy : oy + nh, ox : ox + nw] = resized
    # Pixel centres: x' = (x + 0.5) * s - 0.5, then the padding offset.
    lm = (landmarks + 0.5) * np.array([nw / iw, nh / ih], np.float32) - 0.5
    lm = lm + np.array([ox, oy], np.float32)
    return BenchFace(canvas, lm.astype(np.float32), f"{source} in {w}x{h}")


def speech_pcm(n_samples: int) -> np.ndarray:
    """``n_samples`` of the bundled sample sentence (16 kHz float32), repeated as needed."""
    import soundfile as sf

    path = Path(str(resources.files("talkstream") / "assets" / "sample_speech.wav"))
    pcm, rate = sf.read(str(path), dtype="float32", always_2d=False)
    assert rate == SAMPLE_RATE_HZ, rate
    if pcm.ndim == 2:
        pcm = pcm.mean(axis=1)
    reps = -(-n_samples // pcm.shape[0])
    return np.tile(pcm, reps)[:n_samples].astype(np.float32)


# Sessions start at different points of the sentence, as real users speak different words; the
# offsets stay below this (one repetition of the 9 s sample sentence).
MAX_START_OFFSET = 9 * SAMPLE_RATE_HZ


def start_offset(i: int) -> int:
    """Where session ``i`` starts in the shared speech buffer (a prime stride, 0.37 s)."""
    return (i * 5923) % MAX_START_OFFSET


class Feeder:
    """One session and its audio: pushes 20 ms chunks until enough frames are due.

    ``audio`` may be shared by many feeders (no copy per session); each reads it from ``start``.
    """

    def __init__(self, session: Session, audio: np.ndarray, start: int = 0) -> None:
        self.session = session
        self.audio = audio
        self.cursor = start

    def ready_count(self) -> int:
        """Frames the session could render now (without taking them)."""
        st = self.session.streamer
        n = 0
        while rows_needed(st.next_frame + n, st.cfg, st.lookahead) <= st.rows_received:
            n += 1
        return n

    def push_chunk(self) -> None:
        end = self.cursor + CHUNK_SAMPLES
        if end > self.audio.shape[0]:
            raise AssertionError("benchmark audio ran out: size it for the iterations")
        self.session.push_audio(self.audio[self.cursor : end], SAMPLE_RATE_HZ)
        self.cursor = end

    def feed(self, frames: int) -> None:
        """Push chunks until at least ``frames`` frames are due."""
        while self.ready_count() < frames:
            self.push_chunk()


def take_ready(feeders: list[Feeder]) -> list[Any]:
    """The due frames of all sessions (``Session.take_ready``), as items for one
    ``Engine.render`` call; each session's items are contiguous, in ``feeders`` order."""
    items: list[Any] = []
    for f in feeders:
        items += f.session.take_ready()
    return items


def compose_all(feeders: list[Feeder], items: list[Any], faces: Any) -> list[Any]:
    """The post stage of a batch of several sessions: each session composes its own share of
    ``faces`` (``Session.compose``), as each stream does in the engine's worker."""
    by_id = {f.session.id: f.session for f in feeders}
    frames: list[Any] = []
    i = 0
    while i < len(items):
        j = i + 1
        while j < len(items) and items[j].stream == items[i].stream:
            j += 1
        frames += by_id[items[i].stream].compose(items[i:j], faces[i:j])
        i = j
    return frames


class _TimedBackend:
    """The engine's loaded backend, its calls timed as sub-stages of ``render``.

    Forwards everything to the backend it wraps; only ``motion`` and ``sample`` (the calls
    ``Engine.render`` makes) are bracketed by the recorder. The engine's code runs unchanged.
    """

    def __init__(self, inner: Any, rec: StageRecorder) -> None:
        self._inner = inner
        self._rec = rec

    def motion(self, *args: Any, **kwargs: Any) -> Any:
        with self._rec.device(f"render{SUB_STAGE_SEP}motion"):
            return self._inner.motion(*args, **kwargs)

    def sample(self, *args: Any, **kwargs: Any) -> Any:
        with self._rec.device(f"render{SUB_STAGE_SEP}denoise"):
            return self._inner.sample(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextmanager
def observe_backend(engine: Engine, rec: StageRecorder) -> Iterator[None]:
    """Time the engine's backend calls (:class:`_TimedBackend`) while the block runs."""
    inner = engine.backend
    engine.backend = _TimedBackend(inner, rec)  # type: ignore[assignment]
    try:
        yield
    finally:
        engine.backend = inner


# -- engine ------------------------------------------------------------------------------------


@dataclass
class EngineHandle:
    """A loaded engine for one scenario, with what loading it cost."""

    engine: Engine
    model_load_s: float  # weights: checkpoint read or random init, on the host
    backend_load_s: float  # Engine init: to the device + the backend's load (export, compile)
    weights: str  # "random" or the checkpoint path


def random_models(preset: str, crop: int, base: EngineConfig, seed: int) -> Models:
    """Random-weight networks of ``preset`` rendering ``crop`` x ``crop`` faces."""
    sampler = base.sampler
    dcfg = DenoiserConfig.from_name(preset)
    if dcfg.image_size == crop:
        return Models.random_init(preset, audio=base.audio, sampler=sampler, seed=seed)
    torch.manual_seed(seed)
    return Models(
        motion=AudioToMotion(MotionConfig.from_name(preset)),
        denoiser=TalkFormerDenoiser(dataclasses.replace(dcfg, image_size=crop)),
        audio=base.audio,
        sampler=sampler,
        preset=preset,
        meta={"random_init": True, "seed": seed},
    )


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TalkstreamError(
            f"device {device!r} was asked for but torch sees no CUDA device "
            f"(torch {torch.__version__}); use --device cpu"
        )


def scenario_engine_config(sc: Scenario, base: EngineConfig) -> EngineConfig:
    return dataclasses.replace(
        base,
        preset=sc.preset,
        device=sc.device,
        dtype=sc.dtype,
        backend=sc.backend,
        sampler=dataclasses.replace(base.sampler, steps=sc.steps, seed=sc.seed),
        lookahead_frames=sc.lookahead if sc.lookahead is not None else base.lookahead_frames,
        # The avatar cache root doubles as the backends' artifact cache (ONNX graphs, engines):
        # keep the user's, so a second run reuses what the first one built.
        avatar=dataclasses.replace(base.avatar, crop_size=sc.crop_size()),
    )


def build_engine(sc: Scenario, base: EngineConfig) -> EngineHandle:
    """Load the scenario's networks (given or shipped checkpoint, else random) and backend.

    Raises:
        BackendUnavailable: the scenario's backend cannot run here.
        TalkstreamError: no CUDA device, or a checkpoint that does not fit the scenario.
    """
    check_device(sc.device)
    check_backend(sc.backend, sc.device, sc.dtype)
    cfg = scenario_engine_config(sc, base)
    crop = sc.crop_size()
    native = DenoiserConfig.from_name(sc.preset).image_size == crop
    ckpt = base.checkpoint or (default_checkpoint(sc.preset) if native else None)
    t0 = time.perf_counter()
    if ckpt is not None:
        models = load_checkpoint(ckpt, "cpu")
        if models.denoiser.cfg.image_size != crop:
            raise TalkstreamError(
                f"checkpoint {ckpt} renders {models.denoiser.cfg.image_size}px faces but the "
                f"scenario asks for {crop}px; drop --resolution or --checkpoint"
            )
        weights = str(ckpt)
    else:
        models = random_models(sc.preset, crop, cfg, sc.seed)
        weights = "random"
    t1 = time.perf_counter()
    engine = load_engine(cfg, models)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return EngineHandle(engine, t1 - t0, time.perf_counter() - t1, weights)


def prepare_bench_avatar(engine: Engine, frame_size: tuple[int, int] | None) -> Avatar:
    face = bench_face(frame_size)
    # The frame is the one bench_face built (--frame-size): no framing around the face.
    acfg = AvatarConfig(crop_size=engine.crop_size, cache_dir=None, framing="full")
    return prepare_avatar(face.image, acfg, landmarks=face.landmarks, source_name=face.source)


# -- one scenario ------------------------------------------------------------------------------


def skipped(sc: Scenario, reason: str, status: str = "skipped") -> dict[str, Any]:
    """The result of a scenario that did not run (``skipped``) or broke (``failed``)."""
    return {"name": sc.name, "scenario": sc.to_dict(), "status": status, "reason": reason}


class _ScenarioRun:
    """State of one scenario's measured loop (sessions, video senders)."""

    def __init__(self, sc: Scenario, engine: Engine, avatar: Avatar, seconds: float) -> None:
        self.sc = sc
        self.engine = engine
        self.fused = fused_sampler(engine)
        n_audio = int(seconds * SAMPLE_RATE_HZ) + 2 * SAMPLE_RATE_HZ + MAX_START_OFFSET
        speech = speech_pcm(n_audio)
        self.feeders = []
        for i in range(sc.sessions):
            session = engine.session(avatar, seed=sc.seed + i, lookahead=sc.lookahead)
            session.max_batch = sc.batch
            # Each session speaks from another point of the sentence, as real users would.
            self.feeders.append(Feeder(session, speech, start_offset(i)))
        # One VP8 encoder per stream, as every viewer's RTP sender has its own.
        self.senders = {f.session.id: VideoSender(FPS) for f in self.feeders} if sc.encode else {}

    @property
    def frames_encoded(self) -> int:
        return sum(v.frames for v in self.senders.values())

    @property
    def bytes_encoded(self) -> int:
        return sum(v.payload_bytes for v in self.senders.values())

    def iteration(self, rec: StageRecorder) -> float:
        """One tick: audio, items, render, post, i420, VP8. Returns core seconds."""
        sc, eng = self.sc, self.engine
        with rec.host("audio"):
            for f in self.feeders:
                f.feed(sc.batch)
        with rec.host("items"):
            items = take_ready(self.feeders)
        assert len(items) == sc.frames_per_iter, (len(items), sc.frames_per_iter)
        t_core = time.perf_counter()
        with rec.device("render"):
            faces = eng.render(items)
        with rec.device("post"):
            frames = compose_all(self.feeders, items, faces)
        if eng.device.type == "cuda":
            torch.cuda.synchronize(eng.device)  # core is the finished work
        core = time.perf_counter() - t_core
        if sc.encode:
            with rec.host("i420"):
                planes = [serve_i420(fr.image) for fr in frames]
            with rec.host("vp8"):
                for it, fr, yuv in zip(items, frames, planes, strict=True):
                    self.senders[it.stream].send(yuv, fr.pts)
        return core


def stage_order(names: list[str]) -> list[str]:
    """Top-level stages in the order they ran, each followed by its sub-stages
    (``render.motion`` after ``render``: a sub-stage is timed when it ends, before its parent)."""
    top = [n for n in names if SUB_STAGE_SEP not in n]
    out: list[str] = []
    for n in top:
        out.append(n)
        out += [m for m in names if m.startswith(n + SUB_STAGE_SEP)]
    return out + [n for n in names if n not in out]


def run_scenario(
    sc: Scenario,
    base: EngineConfig,
    *,
    handle: EngineHandle | None = None,
) -> dict[str, Any]:
    """Measure one scenario; returns its JSON-ready result (see the module docstring).

    ``handle``: an engine already loaded for this scenario's model (its load time is then not
    this scenario's warm-up); the caller keeps ownership.

    Raises:
        BackendUnavailable: the scenario's backend cannot run here, or it encodes and aiortc's
            VP8 encoder is not installed.
        TalkstreamError: the device is missing, or a checkpoint does not fit the scenario.
    """
    if sc.encode:
        ok, why = vp8_available()
        if not ok:
            raise BackendUnavailable(why)
    reset_ok = reset_host_peak()
    own = handle is None
    if handle is None:
        handle = build_engine(sc, base)
    engine = handle.engine
    dev = engine.device
    reset_device_peak(dev)
    try:
        t0 = time.perf_counter()
        avatar = prepare_bench_avatar(engine, sc.frame_size)
        avatar_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with reference_kernels(sc.kernels == "reference"):
            engine.encode_avatar(avatar)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        ref_s = time.perf_counter() - t0

        n_iters = sc.warmup + sc.iters + 2
        run = _ScenarioRun(sc, engine, avatar, n_iters * sc.batch / FPS + 1.0)
        rec = StageRecorder(dev)
        cores: list[float] = []
        frames_wall: list[float] = []
        warm_ms: list[float] = []
        first_ms = float("nan")
        with (
            torch.inference_mode(),
            reference_kernels(sc.kernels == "reference"),
            observe_backend(engine, rec),
        ):
            for i in range(sc.warmup + sc.iters):
                measured = i >= sc.warmup
                t_it = time.perf_counter()
                core = run.iteration(rec)
                wall = time.perf_counter() - t_it
                stages = rec.end_iteration(record=measured)
                if i == 0:
                    first_ms = wall * 1e3
                if measured:
                    cores.append(core)
                    frames_wall.append(wall)
                    top = sum(v for k, v in stages.items() if SUB_STAGE_SEP not in k)
                    rec.samples.setdefault("unattributed", []).append(max(wall - top, 0.0))
                else:
                    warm_ms.append(wall * 1e3)

        summaries = rec.summaries()
        stage_stats = {k: v.to_dict() for k, v in summaries.items() if k != "unattributed"}
        send = [
            a + b
            for a, b in zip(rec.samples.get("i420", []), rec.samples.get("vp8", []), strict=False)
        ]
        derived: dict[str, Any] = {
            "core": summarize(cores).to_dict(),
            "frame": summarize(frames_wall).to_dict(),
            "unattributed": summarize(rec.samples["unattributed"]).to_dict(),
        }
        if send:
            derived["send"] = summarize(send).to_dict()
        wall_total = float(sum(frames_wall))
        frames = sc.iters * sc.frames_per_iter
        fps = frames / wall_total
        peak = host_peak(reset_ok)
        dpeak = device_peak(dev)
        memory: dict[str, Any] = {
            "host_peak_mib": round(peak.bytes / MIB, 1),
            "host_peak_scope": peak.scope,
        }
        if dpeak is not None:
            memory["device_peak_allocated_mib"] = round(dpeak["allocated_bytes"] / MIB, 1)
            memory["device_peak_reserved_mib"] = round(dpeak["reserved_bytes"] / MIB, 1)
        return {
            "name": sc.name,
            "scenario": sc.to_dict(),
            "status": "ok",
            "weights": handle.weights,
            "backend": engine.backend.describe(),
            "backend_name": getattr(engine.backend, "name", sc.backend),  # auto resolved
            "sampler_fused": run.fused,
            "avatar": {
                "frame": [int(avatar.image.shape[1]), int(avatar.image.shape[0])],
                "crop": int(engine.crop_size),
            },
            "timing": "cuda events (device stages) + perf_counter"
            if dev.type == "cuda"
            else "perf_counter",
            "unit": "ms per iteration",
            "frames_per_iteration": sc.frames_per_iter,
            "warmup": {
                "model_load_s": round(handle.model_load_s, 4) if own else None,
                "backend_load_s": round(handle.backend_load_s, 4) if own else None,
                "avatar_prepare_s": round(avatar_s, 4),
                "reference_encode_s": round(ref_s, 4),
                "first_iteration_ms": round(first_ms, 3),
                "warmup_iterations": sc.warmup,
                "warmup_mean_ms": round(float(np.mean(warm_ms)), 3) if warm_ms else None,
            },
            "stage_order": stage_order([k for k in rec.order if k in stage_stats]),
            "stages": stage_stats,
            "derived": derived,
            "fps": fps,
            "fps_per_session": fps / sc.sessions,
            "frames": frames,
            "wall_s": wall_total,
            "encoded": {
                "codec": "vp8 (aiortc Vp8Encoder, as serve sends)",
                "frames": run.frames_encoded,
                "bytes": run.bytes_encoded,
            },
            "memory": memory,
            "samples_ms": {k: [round(x * 1e3, 4) for x in v] for k, v in rec.samples.items()}
            | {"core": [round(x * 1e3, 4) for x in cores]},
        }
    finally:
        if own:
            engine.close()
