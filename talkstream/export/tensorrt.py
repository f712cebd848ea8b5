"""The TensorRT backend: FP16 engines built from the exported ONNX graphs (TensorRT 10 API).

Build (once per key, cached): ``trt.Builder`` -> network from ``trt.OnnxParser`` -> a
``BuilderConfig`` with the FP16 flag, one optimisation profile over the batch axis (min 1, opt
the usual per-frame batch, max ``LoadOptions.max_batch``) and a timing cache shared by every build
on this GPU and TensorRT version -> ``build_serialized_network`` -> the serialized engine on disk.

Run: ``trt.Runtime.deserialize_cuda_engine`` -> an execution context; per call
``set_input_shape`` and ``set_tensor_address`` for every I/O tensor (torch CUDA tensors, so no
extra copies) and ``execute_async_v3`` on torch's current stream.

The engine cache key holds everything that makes an engine invalid: the ONNX graph's sha256
(which covers the model hash), the profile shapes, the precision, the GPU name and compute
capability, and the TensorRT version. What needs no TensorRT (profiles, keys) is plain
functions, tested on machines without it.

With ``LoadOptions.trt_plugins`` the graphs keep the two kernels as ``talkstream::*`` nodes and
the engine runs them through the plugins of ``talkstream.export.trt_plugins``. Off by default:
those plugins are just-in-time ``tensorrt.plugin`` implementations, which call back into Python
for every launch; TensorRT's own attention and GridSample layers avoid that round trip.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from talkstream import __version__
from talkstream.engine.checkpoint import Models
from talkstream.engine.denoiser import ReferenceFeatures
from talkstream.engine.sampler import FewStepSampler
from talkstream.export.backends import (
    LoadedModels,
    LoadOptions,
    OnnxGraphs,
    _import,
    _reject_ref_batch,
    _sampler_key,
)
from talkstream.export.cache import ArtifactCache
from talkstream.export.onnx import BATCH, GraphSpec, example_inputs

__all__ = [
    "PRECISIONS",
    "TensorRTModels",
    "TrtEngine",
    "build_engine",
    "engine_fields",
    "profile_shapes",
]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
ENGINE_FILE = "model.engine"
WORKSPACE_BYTES = 4 << 30  # TensorRT may use up to 4 GiB of scratch while choosing tactics


def profile_shapes(
    spec: GraphSpec,
    shapes: Mapping[str, Sequence[int]],
    max_batch: int,
    opt_batch: int = 1,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes of every input for one optimisation profile.

    ``shapes`` are example shapes by input name; the axes ``spec`` marks ``batch`` take
    1 / ``opt_batch`` / ``max_batch``, every other axis is static. The per-frame batch is 1 on a
    CPU-sized stream and grows with sessions on a GPU, so opt defaults to 1.
    """
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt_batch ({opt_batch}) <= max_batch ({max_batch})")
    out = {}
    for name in spec.inputs:
        dyn = {ax for ax, sym in spec.dynamic_axes.get(name, {}).items() if sym == BATCH}
        base = tuple(int(d) for d in shapes[name])

        def at(b: int, base: tuple[int, ...] = base, dyn: set[int] = dyn) -> tuple[int, ...]:
            return tuple(b if ax in dyn else d for ax, d in enumerate(base))

        out[name] = (at(1), at(opt_batch), at(max_batch))
    return out


def engine_fields(
    onnx_path: Path,
    profile: Mapping[str, Any],
    precision: str,
    gpu_name: str,
    capability: tuple[int, int],
    trt_version: str,
    plugins: bool,
) -> dict[str, Any]:
    """The engine cache key's fields: graph bytes, shapes, precision, GPU and TensorRT."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    return {
        "onnx_sha256": digest,  # covers the model weights and the export settings
        "profile": {k: [list(s) for s in v] for k, v in sorted(profile.items())},
        "precision": precision,
        "gpu": gpu_name,
        "capability": list(capability),
        "tensorrt": trt_version,
        "plugins": plugins,
        "talkstream": __version__,
    }


def _trt_logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.WARNING)


def build_engine(
    trt: Any,
    onnx_path: Path,
    profile: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
    precision: str,
    timing_cache: Path | None,
) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine (``trt`` is the tensorrt module).

    The timing cache file is read if present and rewritten after the build, so the next build
    on this GPU skips the tactic timings it already made.
    """
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: every network has an explicit batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        lo, opt, hi = profile[name]
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    blob = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = timing_cache.with_suffix(".tmp")
        tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
        tmp.replace(timing_cache)
    return bytes(memoryview(serialized))


class TrtEngine:
    """One deserialized engine and its execution context; ``run`` binds torch CUDA tensors."""

    def __init__(self, trt: Any, engine_bytes: bytes, spec: GraphSpec, device: torch.device):
        self.trt = trt
        self.spec = spec
        self.device = device
        self.runtime = trt.Runtime(_trt_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize the {spec.name} engine")
        self.context = self.engine.create_execution_context()
        dtypes = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT32: torch.int32,
            trt.DataType.INT64: torch.int64,
            trt.DataType.BOOL: torch.bool,
        }
        self.io_dtype = {
            self.engine.get_tensor_name(i): dtypes[
                self.engine.get_tensor_dtype(self.engine.get_tensor_name(i))
            ]
            for i in range(self.engine.num_io_tensors)
        }
        self._lock = threading.Lock()  # one context: one call at a time

    def run(self, inputs: Sequence[Tensor]) -> Tensor:
        """Run on ``inputs`` (in ``spec.inputs`` order); returns the single output."""
        with self._lock:
            keep = []  # bound buffers must live until the stream has consumed them
            for name, t in zip(self.spec.inputs, inputs, strict=True):
                buf = t.detach().to(self.device, self.io_dtype[name]).contiguous()
                keep.append(buf)
                self.context.set_input_shape(name, tuple(buf.shape))
                self.context.set_tensor_address(name, buf.data_ptr())
            out_name = self.spec.outputs[0]
            shape = tuple(self.context.get_tensor_shape(out_name))
            out = torch.empty(shape, dtype=self.io_dtype[out_name], device=self.device)
            self.context.set_tensor_address(out_name, out.data_ptr())
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run the {self.spec.name} engine")
            # The inputs may be temporaries; tie their lifetime to the stream's work.
            for buf in keep:
                buf.record_stream(stream)
            return out


class TensorRTModels(LoadedModels):
    """The per-frame networks as TensorRT engines (built on first use, cached on disk)."""

    name = "tensorrt"

    def __init__(self, models: Models, options: LoadOptions) -> None:
        super().__init__(models, options)
        self.trt = _import("tensorrt", "the tensorrt backend", "gpu")
        if options.trt_plugins:
            from talkstream.export.trt_plugins import register_plugins

            register_plugins()
        self.precision = "fp16"
        self.cache = ArtifactCache(options.cache_dir)
        self.graphs = OnnxGraphs(models, self.cache, options, plugins=options.trt_plugins)
        idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.gpu_name = torch.cuda.get_device_name(idx)
        self.capability = torch.cuda.get_device_capability(idx)
        self._engines: dict[str, TrtEngine] = {}
        self._lock = threading.Lock()
        default_la = models.motion.cfg.lookahead_frames
        for la in options.lookaheads or (default_la,):
            self._motion_engine(la)
        if options.sampler is not None:
            self._loop_engine(options.sampler)

    @property
    def timing_cache(self) -> Path:
        safe = "".join(c if c.isalnum() else "_" for c in self.gpu_name)
        return self.cache.root / "tensorrt" / f"timing-{safe}-{self.trt.__version__}.cache"

    def _engine(self, key: str, get: Any) -> TrtEngine:
        with self._lock:
            hit = self._engines.get(key)
            if hit is not None:
                return hit
            spec, onnx_path = get()
            shapes = {
                k: tuple(v.shape)
                for k, v in example_inputs(
                    spec, motion=self.models.motion, denoiser=self.models.denoiser
                ).items()
            }
            profile = profile_shapes(spec, shapes, self.options.max_batch)
            fields = engine_fields(
                onnx_path, profile, self.precision, self.gpu_name, self.capability,
                self.trt.__version__, spec.plugins,
            )  # fmt: skip
            entry = self.cache.entry("tensorrt", spec.filename.removesuffix(".onnx"), fields)

            def build(tmp: Path) -> None:
                self.options.say(
                    f"building TensorRT {self.precision} engine {spec.name} for "
                    f"{self.gpu_name} (batch 1..{self.options.max_batch}) ..."
                )
                blob = build_engine(self.trt, onnx_path, profile, self.precision, self.timing_cache)
                (tmp / ENGINE_FILE).write_bytes(blob)

            entry, built = self.cache.get_or_build(entry, build, rebuild=self.options.rebuild)
            if not built:
                self.options.say(f"cached TensorRT engine {spec.name}: {entry.path}")
            engine = TrtEngine(self.trt, entry.file(ENGINE_FILE).read_bytes(), spec, self.device)
            self._engines[key] = engine
            return engine

    def _motion_engine(self, la: int) -> TrtEngine:
        return self._engine(f"motion{la}", lambda: self.graphs.motion(la))

    def _loop_engine(self, sampler: FewStepSampler) -> TrtEngine:
        return self._engine(_sampler_key(sampler), lambda: self.graphs.denoiser_loop(sampler))

    def motion(self, windows: Tensor, neutral: Tensor, lookahead: int | None = None) -> Tensor:
        la = self.models.motion.cfg.lookahead_frames if lookahead is None else lookahead
        self.models.motion.key_padding_mask(la, torch.device("cpu"))  # validates the range
        return self._motion_engine(la).run((windows, neutral)).to(windows.dtype)

    def denoiser(self, x_t: Tensor, t: Tensor, landmarks: Tensor, ref: ReferenceFeatures) -> Tensor:
        _reject_ref_batch(ref, self.name)
        engine = self._engine("step", self.graphs.denoiser_step)
        return engine.run((x_t, t, landmarks, ref.patches, *ref.levels)).to(x_t.dtype)

    def sample(
        self, sampler: FewStepSampler, noise: Tensor, landmarks: Tensor, ref: ReferenceFeatures
    ) -> Tensor:
        _reject_ref_batch(ref, self.name)
        engine = self._loop_engine(sampler)
        return engine.run((noise, landmarks, ref.patches, *ref.levels)).to(noise.dtype)

    def describe(self) -> str:
        plugins = ", Triton plugins" if self.options.trt_plugins else ""
        return f"tensorrt {self.trt.__version__} ({self.precision}{plugins}) on {self.gpu_name}"

    def close(self) -> None:
        self._engines.clear()
        self.cache.close()
