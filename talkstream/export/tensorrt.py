"""The TensorRT backend: engines built from the exported ONNX graphs (TensorRT 10 and 11).

Precision (``fp16`` by default, ``fp32``) follows the TensorRT major version:

- TensorRT 11 removed the weak-typing builder flags (``BuilderFlag.FP16`` and friends): every
  network is strongly typed and takes its types from the graph. For fp16 the graphs are exported
  in float16 (weights, float inputs and outputs; the timestep stays int64) and the network is
  created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (accepted and ignored by 11).
- TensorRT 10 keeps the flag path: the float32 graph and ``BuilderFlag.FP16``, which lets the
  builder choose fp16 kernels where they are faster (and keep fp32 where it must).

``build_plan`` makes that choice from the version; ``talkstream doctor`` prints
``tensorrt_status()``, which says what is missing and where it comes from.

Build (once per key, cached): ``trt.Builder`` -> network (flags per the plan) from
``trt.OnnxParser.parse_from_file`` -> a ``BuilderConfig`` (workspace pool limit, the FP16 flag on
10, one optimisation profile over the batch axis: min 1, opt the usual per-frame batch, max
``LoadOptions.max_batch``, which should be the engine's coalescing limit
``EngineConfig.max_batch_frames``) and a timing cache shared by every build on this GPU and
TensorRT version -> ``build_serialized_network`` -> the serialized engine on disk. Every call
that reports failure through its return value (``None``, ``False``, ``-1``) is checked and
raises a one-line ``TensorRTBuildError`` naming the step.

Run: ``trt.Runtime.deserialize_cuda_engine`` -> an execution context; per call
``set_input_shape`` and ``set_tensor_address`` for every I/O tensor (torch CUDA tensors, so no
extra copies) and ``execute_async_v3`` on torch's current stream.

The engine cache key holds everything that makes an engine invalid: the ONNX graph's sha256
(which covers the model hash and the graph's dtype), the profile shapes, the precision, the GPU
name and compute capability, and the TensorRT version. What needs no TensorRT (plans, profiles,
keys, the status text) is plain functions, tested on machines without it.

With ``LoadOptions.trt_plugins`` the graphs keep the two kernels as ``talkstream::*`` nodes and
the engine runs them through the plugins of ``talkstream.export.trt_plugins``. Off by default:
those plugins are just-in-time ``tensorrt.plugin`` implementations, which call back into Python
for every launch; TensorRT's own attention and GridSample layers avoid that round trip.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from talkstream import __version__
from talkstream.engine.checkpoint import Models
from talkstream.engine.denoiser import ReferenceFeatures
from talkstream.engine.runtime import DTYPES, PRECISIONS, LoadedModels, LoadOptions
from talkstream.engine.sampler import FewStepSampler
from talkstream.errors import MissingDependencyError
from talkstream.export.cache import ArtifactCache
from talkstream.export.common import (
    BaseBackend,
    OnnxGraphs,
    device_type,
    import_optional,
    reject_ref_batch,
    sampler_key,
)
from talkstream.export.onnx import BATCH, GraphSpec, example_inputs

__all__ = [
    "PRECISIONS",
    "SUPPORTED_MAJORS",
    "BuildPlan",
    "TensorRTBackend",
    "TensorRTBuildError",
    "TensorRTModels",
    "TrtEngine",
    "build_engine",
    "build_plan",
    "engine_fields",
    "profile_shapes",
    "tensorrt_status",
]

log = logging.getLogger(__name__)

DEFAULT_PRECISION = "fp16"
SUPPORTED_MAJORS = (10, 11)
# Where TensorRT comes from: the tensorrt-cu12 / tensorrt-cu13 wheels (one per CUDA major), on
# PyPI and on NVIDIA's own index.
TRT_INSTALL = (
    "pip install tensorrt-cu12 (CUDA 12) or tensorrt-cu13 (CUDA 13), TensorRT 10.x or 11.x, "
    "from PyPI or NVIDIA's index (--extra-index-url https://pypi.nvidia.com)"
)
ENGINE_FILE = "model.engine"
WORKSPACE_BYTES = 4 << 30  # TensorRT may use up to 4 GiB of scratch while choosing tactics


class TensorRTBuildError(RuntimeError):
    """A TensorRT build or load step failed; the message names the step (one line)."""


def trt_major(version: str) -> int:
    """The major of a TensorRT version string (``"10.13.2.6"`` -> 10)."""
    try:
        return int(str(version).split(".", 1)[0])
    except ValueError:
        raise TensorRTBuildError(f"cannot read the TensorRT version {version!r}") from None


@dataclass(frozen=True)
class BuildPlan:
    """How one engine is built: the ONNX graph's float type, the network flags, the builder flag.

    ``graph_dtype``: ``"float32"`` or ``"float16"``, the type the ONNX graph is exported in;
    ``strongly_typed``: create the network with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``;
    ``fp16_flag``: set ``BuilderFlag.FP16`` (TensorRT 10 only; never with strong typing).
    """

    major: int
    precision: str
    graph_dtype: str
    strongly_typed: bool
    fp16_flag: bool

    def describe(self) -> str:
        how = "strongly typed" if self.strongly_typed else "weakly typed"
        flag = " + FP16 flag" if self.fp16_flag else ""
        return f"{self.precision}: {self.graph_dtype} graph, {how}{flag} (TensorRT {self.major})"


def build_plan(trt_version: str, precision: str = DEFAULT_PRECISION) -> BuildPlan:
    """The build for ``precision`` on this TensorRT version (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"TensorRT precision {precision!r} is not one of {PRECISIONS}")
    major = trt_major(trt_version)
    if major not in SUPPORTED_MAJORS:
        raise TensorRTBuildError(
            f"TensorRT {trt_version} is not supported (talkstream builds with 10.x and 11.x); "
            f"{TRT_INSTALL}"
        )
    if major >= 11:
        # No precision flags any more: fp16 is the graph's own type.
        graph = "float16" if precision == "fp16" else "float32"
        return BuildPlan(major, precision, graph, strongly_typed=True, fp16_flag=False)
    return BuildPlan(
        major, precision, "float32", strongly_typed=False, fp16_flag=precision == "fp16"
    )


def tensorrt_status() -> tuple[bool, str]:
    """(usable, one line) about TensorRT for ``talkstream doctor``.

    Says which TensorRT is installed and whether talkstream supports it, or what is missing
    and where it comes from. Does not import tensorrt unless it is installed, and never needs
    a GPU (whether there is one is the backend's own check).
    """
    if importlib.util.find_spec("tensorrt") is None:
        return False, f"TensorRT is not installed: {TRT_INSTALL}"
    try:
        import tensorrt as trt
    except Exception as e:  # a wheel without its libraries raises OSError/ImportError here
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        return False, f"TensorRT is installed but does not import ({why}); reinstall: {TRT_INSTALL}"
    version = str(getattr(trt, "__version__", "?"))
    try:
        plan = build_plan(version)
    except TensorRTBuildError as e:
        return False, str(e)
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        return False, (
            f"TensorRT {version} is installed, but the ONNX export needs "
            f"{' and '.join(missing)}: pip install 'talkstream[export]'"
        )
    return True, f"TensorRT {version} ({plan.describe()})"


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


def _need(value: Any, step: str, onnx_path: Path) -> Any:
    # TensorRT's Python API reports many failures as None / False instead of raising.
    if value is None or value is False:
        raise TensorRTBuildError(f"TensorRT {step} failed for {onnx_path.name}")
    return value


def build_engine(
    trt: Any,
    onnx_path: Path,
    profile: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
    precision: str | BuildPlan,
    timing_cache: Path | None,
) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine (``trt`` is the tensorrt module).

    ``precision`` is ``"fp16"``/``"fp32"`` (the plan then follows ``trt.__version__``) or a
    ``BuildPlan``; the graph at ``onnx_path`` must already be in the plan's ``graph_dtype``.
    The timing cache file is read if present and rewritten after the build, so the next build
    on this GPU skips the tactic timings it already made. Raises ``TensorRTBuildError`` naming
    the step that failed (parser errors listed).
    """
    plan = precision if isinstance(precision, BuildPlan) else build_plan(trt.__version__, precision)
    logger = _trt_logger(trt)
    builder = _need(trt.Builder(logger), "Builder()", onnx_path)
    flags = 0  # networks are always explicit-batch since 10 (EXPLICIT_BATCH is deprecated)
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = _need(builder.create_network(flags), "create_network", onnx_path)
    parser = _need(trt.OnnxParser(network, logger), "OnnxParser()", onnx_path)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(
            f"TensorRT could not parse {onnx_path}: {errors or 'no parser error reported'}"
        )
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = [n for n in names if n not in profile]
    if missing:
        raise TensorRTBuildError(
            f"the optimisation profile has no shapes for input(s) {', '.join(missing)} "
            f"of {onnx_path.name}"
        )
    config = _need(builder.create_builder_config(), "create_builder_config", onnx_path)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if plan.fp16_flag:
        # TensorRT 10 only (11 removed the flag): weak typing may pick fp16 kernels.
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = _need(
        builder.create_optimization_profile(), "create_optimization_profile", onnx_path
    )
    for name in names:
        lo, opt, hi = profile[name]
        opt_profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(opt_profile) < 0:
        raise TensorRTBuildError(
            f"TensorRT rejected the optimisation profile of {onnx_path.name} "
            f"({', '.join(f'{n} {profile[n][0]}..{profile[n][2]}' for n in names)})"
        )
    blob = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = _need(config.create_timing_cache(blob), "create_timing_cache", onnx_path)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise TensorRTBuildError(
            f"TensorRT refused the timing cache {timing_cache} (another TensorRT or GPU?); "
            "delete it to rebuild"
        )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(
            f"TensorRT failed to build an engine from {onnx_path} ({plan.describe()}, batch "
            f"up to {max(profile[n][2][0] for n in names) if names else '?'}); "
            "its log above says why"
        )
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
        if self.context is None:
            raise TensorRTBuildError(
                f"TensorRT could not create an execution context for the {spec.name} engine"
            )
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
                if not self.context.set_input_shape(name, tuple(buf.shape)):
                    raise RuntimeError(
                        f"the {self.spec.name} engine does not take {name} of shape "
                        f"{tuple(buf.shape)} (outside its optimisation profile?)"
                    )
                if not self.context.set_tensor_address(name, buf.data_ptr()):
                    raise RuntimeError(f"TensorRT could not bind {name} of {self.spec.name}")
            out_name = self.spec.outputs[0]
            shape = tuple(self.context.get_tensor_shape(out_name))
            out = torch.empty(shape, dtype=self.io_dtype[out_name], device=self.device)
            if not self.context.set_tensor_address(out_name, out.data_ptr()):
                raise RuntimeError(f"TensorRT could not bind {out_name} of {self.spec.name}")
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run the {self.spec.name} engine")
            # The inputs may be temporaries; tie their lifetime to the stream's work.
            for buf in keep:
                buf.record_stream(stream)
            return out


@dataclass
class TypedOnnxGraphs(OnnxGraphs):
    """``OnnxGraphs`` whose graphs are exported in ``graph_dtype`` (float16 for strongly typed
    fp16 engines). The motion graph stays float32: it is a tiny part of the frame's time and
    its landmark offsets are the precision-sensitive part of lip sync. The dtype is part of the
    cache key, so float32 and float16 graphs of one model live side by side."""

    graph_dtype: str = "float32"

    def _dtype(self) -> torch.dtype:
        return DTYPES[self.graph_dtype]

    def denoiser_step(self) -> tuple[Any, Path]:
        if self.graph_dtype == "float32":
            return super().denoiser_step()
        from talkstream.export import onnx as ox

        den = self.models.denoiser
        spec = ox.denoiser_step_spec(len(den.cfg.widths), self.plugins)
        return spec, self.get(
            spec,
            lambda p: ox.export_denoiser_step(den, p, plugins=self.plugins, dtype=self._dtype()),
            {"graph_dtype": self.graph_dtype},
        )

    def denoiser_loop(self, sampler: FewStepSampler) -> tuple[Any, Path]:
        if self.graph_dtype == "float32":
            return super().denoiser_loop(sampler)
        from talkstream.export import onnx as ox

        den = self.models.denoiser
        spec = ox.denoiser_loop_spec(len(den.cfg.widths), sampler.timesteps, self.plugins)
        extra = {
            "schedule": sampler.schedule.name,
            "T": sampler.schedule.num_timesteps,
            "graph_dtype": self.graph_dtype,
        }
        return spec, self.get(
            spec,
            lambda p: ox.export_denoiser_loop(
                den, sampler, p, plugins=self.plugins, dtype=self._dtype()
            ),
            extra,
        )


class TensorRTModels(LoadedModels):
    """The per-frame networks as TensorRT engines (built on first use, cached on disk)."""

    name = "tensorrt"

    def __init__(self, models: Models, options: LoadOptions, precision: str | None = None) -> None:
        super().__init__(models, options)
        self.trt = import_optional("tensorrt", "the tensorrt backend", "gpu")
        # The precision: the argument, else LoadOptions.precision when it has one (the config
        # is to carry it there), else fp16. LoadOptions.dtype is the eager modules' torch
        # dtype, not the engines' precision, so it is not read here.
        self.precision = precision or options.precision or DEFAULT_PRECISION
        self.plan = build_plan(self.trt.__version__, self.precision)
        if options.trt_plugins:
            from talkstream.export.trt_plugins import register_plugins

            register_plugins()
        self.cache = ArtifactCache(options.cache_dir)
        self.graphs = TypedOnnxGraphs(
            models, self.cache, options, plugins=options.trt_plugins,
            graph_dtype=self.plan.graph_dtype,
        )  # fmt: skip
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
            fields["plan"] = self.plan.describe()
            entry = self.cache.entry("tensorrt", spec.filename.removesuffix(".onnx"), fields)

            def build(tmp: Path) -> None:
                self.options.say(
                    f"building TensorRT engine {spec.name} ({self.plan.describe()}) for "
                    f"{self.gpu_name} (batch 1..{self.options.max_batch}) ..."
                )
                blob = build_engine(self.trt, onnx_path, profile, self.plan, self.timing_cache)
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
        return self._engine(sampler_key(sampler), lambda: self.graphs.denoiser_loop(sampler))

    def motion(self, windows: Tensor, neutral: Tensor, lookahead: int | None = None) -> Tensor:
        la = self.models.motion.cfg.lookahead_frames if lookahead is None else lookahead
        self.models.motion.key_padding_mask(la, torch.device("cpu"))  # validates the range
        return self._motion_engine(la).run((windows, neutral)).to(windows.dtype)

    def denoiser(self, x_t: Tensor, t: Tensor, landmarks: Tensor, ref: ReferenceFeatures) -> Tensor:
        reject_ref_batch(ref, self.name)
        engine = self._engine("step", self.graphs.denoiser_step)
        return engine.run((x_t, t, landmarks, ref.patches, *ref.levels)).to(x_t.dtype)

    def sample(
        self, sampler: FewStepSampler, noise: Tensor, landmarks: Tensor, ref: ReferenceFeatures
    ) -> Tensor:
        reject_ref_batch(ref, self.name)
        engine = self._loop_engine(sampler)
        return engine.run((noise, landmarks, ref.patches, *ref.levels)).to(noise.dtype)

    def describe(self) -> str:
        plugins = ", Triton plugins" if self.options.trt_plugins else ""
        return (
            f"tensorrt {self.trt.__version__} ({self.plan.describe()}, batch "
            f"1..{self.options.max_batch}{plugins}) on {self.gpu_name}"
        )

    def close(self) -> None:
        self._engines.clear()
        self.cache.close()


class TensorRTBackend(BaseBackend):
    name = "tensorrt"
    extra = "gpu"
    description = "TensorRT engines (fp16 or fp32) built from the ONNX graphs (NVIDIA GPUs)"
    loaded_class = TensorRTModels

    def check(self, device: str, dtype: str) -> None:
        missing: MissingDependencyError | None = None
        try:
            import_optional("tensorrt", "the tensorrt backend", "gpu")
        except MissingDependencyError as e:
            missing = e
        if device_type(device) != "cuda":
            # Both problems at once: on a CPU machine doctor should still say what to install.
            also = f"; and {missing}" if missing is not None else ""
            raise ValueError(f"TensorRT needs a CUDA device; device is {device!r}{also}")
        if missing is not None:
            raise missing
        super().check(device, dtype)
        for module in ("onnx", "onnxscript"):
            import_optional(module, "the tensorrt backend (ONNX export)", "export")
