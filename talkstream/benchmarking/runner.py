"""Run one scenario: warm-up, then per-stage latency, fps and peak memory.

One iteration is one tick of a live server: every session receives the audio of its next
``batch`` frames in 20 ms chunks, then the due frames of all sessions go through motion and the
denoiser in one batched call, then each frame is pasted back, colour-converted and encoded.
The stages follow ``Engine.render`` step by step (the engine's own backend, same order, same
tensors), so that each can be timed on its own; ``Engine.render`` itself is then timed on the
same inputs as a cross-check (``engine_render``), so a reader can see that the breakdown adds up
to what the real path costs.

Stages (milliseconds per iteration, i.e. per ``sessions * batch`` frames):

- ``audio``: ``Session.push_audio`` of the iteration's audio (log-mel frontend, motion rows).
- ``motion``: token windows, AudioToMotion, displacement + idle motion.
- ``denoise_step{i}``: the i-th denoiser call of the sampler (``denoise_steps1-N`` when the
  backend runs the whole loop as one graph, as onnxruntime does).
- ``to_host``: x0 to uint8 crops and landmarks on the host (the copy from a GPU).
- ``paste_back``: the crop blended into the full frame (``kernels.post.paste_back``).
- ``rgb_to_i420``: colour conversion for the encoder (``kernels.post.rgb_to_i420``).
- ``encode``: libx264 (PyAV) encoding of the I420 frame, ``tune=zerolatency`` as for live video.

Derived: ``post`` = paste_back + rgb_to_i420; ``core`` = wall time from the start of motion to
the end of paste-back (issue 3's "motion + denoiser + paste-back" figure); ``frame`` = the whole
iteration's wall time; ``unattributed`` = frame minus the sum of the stages.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
from talkstream.kernels.post import paste_back, rgb_to_i420

log = logging.getLogger(__name__)

CHUNK_MS = 20  # audio arrives in 20 ms chunks, as from WebRTC or a microphone callback
CHUNK_SAMPLES = SAMPLE_RATE_HZ * CHUNK_MS // 1000
SAMPLES_PER_FRAME = SAMPLE_RATE_HZ // FPS
MIB = 1024 * 1024
# libx264 settings of a live stream: zerolatency turns off lookahead and B-frames, so every
# encode call returns that frame's packet and its time is the frame's real encoding cost.
X264_OPTIONS = {"preset": "veryfast", "tune": "zerolatency", "crf": "23"}
# Iterations of the Engine.render cross-check, at most.
ENGINE_RENDER_CHECK_ITERS = 20


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
    from talkstream.export.backends import LoadedModels

    return type(engine.backend).sample is not LoadedModels.sample


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
    """The due frames of all sessions, as items for one ``Engine.render`` call.

    ``Session.take_ready`` is the pipeline's way to collect a session's due
    frames; batching several sessions into one render call needs it until it is public.
    """
    items: list[Any] = []
    for f in feeders:
        items += f.session.take_ready()
    return items


def make_encoder(width: int, height: int) -> Any:
    import av

    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height = width, height
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = Fraction(1, FPS)
    ctx.framerate = Fraction(FPS, 1)
    ctx.options = dict(X264_OPTIONS)
    return ctx


def encode_i420(ctx: Any, i420: np.ndarray, pts: int) -> int:
    """Encode one I420 frame; returns the bytes of the packets it produced."""
    import av

    vf = av.VideoFrame.from_ndarray(i420, format="yuv420p")
    vf.pts = pts
    return sum(p.size for p in ctx.encode(vf))


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
    engine = Engine(cfg, models=models)
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
    """State of one scenario's measured loop (sessions, encoders, buffers)."""

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
        h, w = avatar.image.shape[:2]
        self.encoders = [make_encoder(w, h) for _ in self.feeders] if sc.encode else []
        self.i420 = [np.empty((h * 3 // 2, w), np.uint8) for _ in self.feeders]
        self.frames_encoded = 0
        self.bytes_encoded = 0

    def close(self) -> None:
        for ctx in self.encoders:
            for _ in ctx.encode(None):  # flush; not timed
                pass

    def iteration(self, rec: StageRecorder) -> float:
        """One tick: audio, motion, denoiser, readback, post, encode. Returns core seconds."""
        sc, eng = self.sc, self.engine
        dev = eng.device
        with rec.host("audio"):
            for f in self.feeders:
                f.feed(sc.batch)
        t_core = time.perf_counter()
        with rec.device("motion"):
            sessions, pts_list, windows = [], [], []
            for f in self.feeders:
                frames, win = f.session.streamer.ready_windows(sc.batch)
                assert len(frames) == sc.batch, (len(frames), sc.batch)
                sessions += [f.session] * len(frames)
                pts_list += frames
                windows.append(win)
            win_t = torch.from_numpy(np.concatenate(windows)).to(dev)  # (N, W, R, 80)
            neutral_np = np.stack([s.prepared.neutral for s in sessions])  # (N, 68, 2)
            neutral = torch.from_numpy(neutral_np).to(dev)
            disp = torch.empty(len(sessions), *eng.motion.head_shape, device=dev)  # (N, 37, 2)
            for la in sorted({s.lookahead for s in sessions}):
                sel = [i for i, s in enumerate(sessions) if s.lookahead == la]
                disp[sel] = eng.backend.motion(win_t[sel], neutral[sel], la)
            target = eng.motion.apply_displacement(neutral, disp)  # (N, 68, 2)
            idle = np.stack([s.idle.offset(p) for s, p in zip(sessions, pts_list, strict=True)])
            target = target + torch.from_numpy(idle).to(dev)  # (N, 68, 2)
        # All sessions share one avatar here, so the frames form one group and one denoiser call,
        # as Engine._denoise does.
        ref = sessions[0].prepared.ref
        noise = torch.cat([s.noise for s in sessions])  # (N, 3, S, S)
        lm = target.to(eng.dtype)  # (N, 68, 2)
        if self.fused:
            # The backend runs the whole loop as one graph, as Engine.render calls it: one stage.
            name = "denoise_step1" if sc.steps == 1 else f"denoise_steps1-{sc.steps}"
            with rec.device(name):
                x0 = eng.backend.sample(eng.sampler, noise, lm, ref)  # (N, 3, S, S)
        else:
            # The generic loop (LoadedModels.sample): the same sampler over the same denoiser
            # calls, each timed on its own.
            step = 0

            def timed_denoise(x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
                nonlocal step
                step += 1
                with rec.device(f"denoise_step{step}"):
                    return eng.backend.denoiser(x, t, cond["landmarks"], cond["ref"])

            x0 = eng.sampler.sample(timed_denoise, noise, landmarks=lm, ref=ref)
        with rec.device("to_host"):
            img = ((x0.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            crops = img.permute(0, 2, 3, 1).cpu().numpy()  # (N, S, S, 3)
            # Engine.render also hands each Frame its landmarks on the host.
            target.float().cpu().numpy()  # (N, 68, 2)
        images = []
        with rec.host("paste_back"):
            for i, s in enumerate(sessions):
                image = s.output_buffer()
                paste_back(
                    s.prepared.avatar.image, crops[i], s.pmap, out=image, out_has_background=True
                )
                images.append(image)
        core = time.perf_counter() - t_core
        if sc.encode:
            per_session = sc.batch
            with rec.host("rgb_to_i420"):
                outs = []
                for i, image in enumerate(images):
                    buf = self.i420[i // per_session]
                    rgb_to_i420(image, out=buf)
                    outs.append(buf.copy() if per_session > 1 else buf)
            with rec.host("encode"):
                for i, buf in enumerate(outs):
                    ctx = self.encoders[i // per_session]
                    self.bytes_encoded += encode_i420(ctx, buf, pts_list[i])
                    self.frames_encoded += 1
        return core


def run_scenario(
    sc: Scenario,
    base: EngineConfig,
    *,
    handle: EngineHandle | None = None,
    engine_render_check: bool = True,
) -> dict[str, Any]:
    """Measure one scenario; returns its JSON-ready result (see the module docstring).

    ``handle``: an engine already loaded for this scenario's model (its load time is then not
    this scenario's warm-up); the caller keeps ownership.

    Raises:
        BackendUnavailable: the scenario's backend cannot run here.
        TalkstreamError: the device is missing, or a checkpoint does not fit the scenario.
    """
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
            engine.prepare(avatar)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        ref_s = time.perf_counter() - t0

        n_iters = sc.warmup + sc.iters + ENGINE_RENDER_CHECK_ITERS + 2
        run = _ScenarioRun(sc, engine, avatar, n_iters * sc.batch / FPS + 1.0)
        rec = StageRecorder(dev)
        cores: list[float] = []
        frames_wall: list[float] = []
        warm_ms: list[float] = []
        first_ms = float("nan")
        with torch.inference_mode(), reference_kernels(sc.kernels == "reference"):
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
                    rec.samples.setdefault("unattributed", []).append(
                        max(wall - sum(stages.values()), 0.0)
                    )
                else:
                    warm_ms.append(wall * 1e3)
            render_samples: list[float] = []
            if engine_render_check:
                for _ in range(min(sc.iters, ENGINE_RENDER_CHECK_ITERS)):
                    for f in run.feeders:
                        f.feed(sc.batch)
                    items = take_ready(run.feeders)
                    t_r = time.perf_counter()
                    engine.render(items)
                    render_samples.append(time.perf_counter() - t_r)
        run.close()

        summaries = rec.summaries()
        stage_stats = {k: v.to_dict() for k, v in summaries.items() if k != "unattributed"}
        post = [
            a + b
            for a, b in zip(
                rec.samples.get("paste_back", []), rec.samples.get("rgb_to_i420", []), strict=False
            )
        ]
        derived: dict[str, Any] = {
            "core": summarize(cores).to_dict(),
            "frame": summarize(frames_wall).to_dict(),
            "unattributed": summarize(rec.samples["unattributed"]).to_dict(),
        }
        if post:
            derived["post"] = summarize(post).to_dict()
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
            "stage_order": [k for k in rec.order if k in stage_stats],
            "stages": stage_stats,
            "derived": derived,
            "engine_render": summarize(render_samples).to_dict() if render_samples else None,
            "fps": fps,
            "fps_per_session": fps / sc.sessions,
            "frames": frames,
            "wall_s": wall_total,
            "encoded": {"frames": run.frames_encoded, "bytes": run.bytes_encoded},
            "memory": memory,
            "samples_ms": {k: [round(x * 1e3, 4) for x in v] for k, v in rec.samples.items()}
            | {"core": [round(x * 1e3, 4) for x in cores]},
        }
    finally:
        if own:
            engine.close()
