"""Backends: one small protocol, four ways to run the per-frame networks.

A backend has a ``name``, the ``extra`` that installs what it needs, ``available(device, dtype)
-> (bool, reason)`` and ``load(models, device, ...) -> LoadedModels``. What ``load`` returns runs
the networks behind their eager call signatures, so the engine never knows which backend it has:

- ``loaded.motion(windows, neutral, lookahead)``: ``AudioToMotion.forward``;
- ``loaded.denoiser(x_t, t, landmarks, ref)``: ``TalkFormerDenoiser.forward``;
- ``loaded.sample(sampler, noise, landmarks, ref)``: ``sampler.sample(denoiser, noise, ...)``,
  the few-step loop, which a backend may run as one graph.

Backends:

- ``torch``: the eager modules (CPU or GPU): the reference every other backend is tested against.
- ``compiled``: ``torch.compile``; on CUDA with CUDA graphs (``mode="reduce-overhead"``) and the
  fused Triton kernels (the custom ops stay single nodes). Batches are padded to power-of-two
  buckets so that the engine's varying batch sizes compile a handful of shapes, not one each.
- ``onnxruntime``: the exported ONNX graphs (``talkstream.export.onnx``) on the CPU execution
  provider, or the CUDA one when ``onnxruntime-gpu`` provides it.
- ``tensorrt``: engines built from the same ONNX graphs (``talkstream.export.tensorrt``).

``select_backend`` implements ``--backend auto``: the first available backend in a documented
order per device (fastest first, from the measurements in ``docs/decisions.md``), with the
reason each one before it was skipped.

The pipeline imports this module, never a backend's library: onnxruntime and tensorrt are imported
inside the backend that needs them, and a missing one raises ``MissingDependencyError`` naming the
extra to install.
"""

from __future__ import annotations

import logging
import shutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from talkstream import __version__
from talkstream.engine.checkpoint import Models, load_checkpoint
from talkstream.engine.denoiser import ReferenceFeatures
from talkstream.engine.sampler import FewStepSampler
from talkstream.errors import MissingDependencyError
from talkstream.export.cache import ArtifactCache

__all__ = [
    "AUTO",
    "BACKENDS",
    "PREFERENCE",
    "Backend",
    "LoadOptions",
    "LoadedModels",
    "Selection",
    "backend_names",
    "get_backend",
    "load_backend",
    "select_backend",
]

log = logging.getLogger(__name__)

AUTO = "auto"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --backend auto: fastest first, per device type. CPU: onnxruntime ran the tiny per-frame step
# fastest here (benchmarks/backends_cpu.py); compiled is left out of auto on CPU because it
# compiles for minutes per batch shape at start-up and was not faster. CUDA: TensorRT FP16
# engines, then CUDA graphs + Triton kernels, then onnxruntime's CUDA provider.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("onnxruntime", "torch"),
    "cuda": ("tensorrt", "compiled", "onnxruntime", "torch"),
}


ORT_SPINNING = ("run", "off", "on")


@dataclass(frozen=True)
class LoadOptions:
    """How a backend loads: device, precision, where artifacts are cached, what to pre-build."""

    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: Path | None = None  # the cache root; None: a private temporary directory
    rebuild: bool = False  # rebuild cached artifacts even when their key matches
    # Largest batch a built artifact must take (TensorRT profiles, compiled buckets): the
    # engine passes its coalescing limit, EngineConfig.max_batch_frames.
    max_batch: int = 8
    precision: str = "fp16"  # TensorRT engines: fp16 or fp32
    threads: int | None = None  # CPU threads for onnxruntime; None: torch's setting
    sampler: FewStepSampler | None = None  # pre-build this sampler's loop graph at load
    lookaheads: tuple[int, ...] = ()  # pre-build these motion lookaheads (default: trained)
    trt_plugins: bool = False  # TensorRT: embed the Triton kernels as plugins
    compile_mode: str | None = None  # torch.compile mode; None: per device (see Compiled)
    # onnxruntime CPU worker threads between parallel sections: "run" spins inside a call and
    # stops when it returns (fast hand-offs, no cores burnt between frames); "off" always
    # sleeps; "on" is onnxruntime's default (keeps spinning after a call, stealing the cores
    # that paste-back and the encoder need next).
    ort_spinning: str = "run"
    # onnxruntime runs AudioToMotion on one thread: its ops are too small to split, and waking a
    # second thread for each cost more than it saved (benchmarks/experiments/ort_spin_parts.py).
    ort_motion_one_thread: bool = True
    progress: Callable[[str], None] | None = None  # one line per build step; None: log.info

    def __post_init__(self) -> None:
        if self.ort_spinning not in ORT_SPINNING:
            raise ValueError(
                f"ort_spinning must be one of {ORT_SPINNING}, got {self.ort_spinning!r}"
            )

    def say(self, msg: str) -> None:
        (self.progress or log.info)(msg)


class LoadedModels(ABC):
    """The per-frame networks of one backend, behind the eager call signatures."""

    name: str = ""

    def __init__(self, models: Models, options: LoadOptions) -> None:
        self.models = models
        self.options = options
        self.device = torch.device(options.device)
        self.dtype = DTYPES[options.dtype]

    @abstractmethod
    def motion(self, windows: Tensor, neutral: Tensor, lookahead: int | None = None) -> Tensor:
        """(B, W, R, 80) mel windows, (B, 68, 2) neutral landmarks -> (B, 37, 2)."""

    @abstractmethod
    def denoiser(self, x_t: Tensor, t: Tensor, landmarks: Tensor, ref: ReferenceFeatures) -> Tensor:
        """(B, 3, S, S) x_t, (B,) t, (B, 68, 2) landmarks, batch-1 reference -> (B, 3, S, S)."""

    def sample(
        self, sampler: FewStepSampler, noise: Tensor, landmarks: Tensor, ref: ReferenceFeatures
    ) -> Tensor:
        """The sampler's few-step loop over ``denoiser``: (B, 3, S, S) noise -> x0."""
        return sampler.sample(self.denoiser, noise, landmarks=landmarks, ref=ref)

    def describe(self) -> str:
        """One line for logs and ``talkstream doctor``."""
        return f"{self.name} on {self.device} ({self.options.dtype})"

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing
        """Release sessions, engines and temporary artifacts."""


class Backend(Protocol):
    """What every backend provides (see the module docstring)."""

    name: str
    extra: str | None  # the talkstream extra that installs its libraries; None: core only
    description: str

    def available(self, device: str = "cpu", dtype: str = "float32") -> tuple[bool, str]:
        """Whether it can run here, and if not, exactly why (with what to install)."""
        ...

    def load(
        self, models: Models | str | Path, device: str = "cpu", **options: Any
    ) -> LoadedModels:
        """Load ``models`` (or a checkpoint directory) for ``device``; see ``LoadOptions``."""
        ...


# --- shared helpers ------------------------------------------------------------------------------


def _device_type(device: str) -> str:
    return torch.device(device).type


def _check_device(device: str) -> None:
    kind = _device_type(device)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch build sees no CUDA GPU")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: talkstream backends run on cpu or cuda")


def _import(module: str, what: str, extra: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise MissingDependencyError(what, module, extra) from None


def _as_models(models: Models | str | Path, device: str) -> Models:
    if isinstance(models, Models):
        return models
    return load_checkpoint(models, device)


def _sampler_key(sampler: FewStepSampler) -> str:
    # What a compiled or exported loop bakes in: its timesteps and the schedule's coefficients.
    steps = "-".join(map(str, sampler.timesteps))
    return f"loop{steps}-{sampler.schedule.name}{sampler.schedule.num_timesteps}"


def _reject_ref_batch(ref: ReferenceFeatures, backend: str) -> None:
    # Exported graphs take one avatar's features (batch 1), as the engine passes them.
    if any(r.shape[0] != 1 for r in (ref.patches, *ref.levels)):
        raise ValueError(
            f"the {backend} backend takes reference features of batch 1 (one avatar), got "
            f"batch {ref.patches.shape[0]}; group frames by avatar, as Engine.render does"
        )


class _BaseBackend:
    name = ""
    extra: str | None = None
    description = ""
    loaded_class: type[LoadedModels]

    def check(self, device: str, dtype: str) -> None:
        """Raise ``MissingDependencyError``/``ValueError`` unless this backend can run."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        _check_device(device)

    def available(self, device: str = "cpu", dtype: str = "float32") -> tuple[bool, str]:
        try:
            self.check(device, dtype)
        except (MissingDependencyError, ValueError) as e:
            return False, str(e)
        return True, "available"

    def load(
        self, models: Models | str | Path, device: str = "cpu", **options: Any
    ) -> LoadedModels:
        opts = LoadOptions(device=device, **options)
        self.check(opts.device, opts.dtype)
        return self.loaded_class(_as_models(models, opts.device), opts)


# --- torch (eager) -------------------------------------------------------------------------------


class TorchModels(LoadedModels):
    """The eager modules themselves: zero overhead, the reference for every parity test."""

    name = "torch"

    def __init__(self, models: Models, options: LoadOptions) -> None:
        super().__init__(models, options)
        self.motion_module = models.motion.to(self.device).eval()
        self.denoiser_module = models.denoiser.to(self.device, self.dtype).eval()

    def motion(self, windows: Tensor, neutral: Tensor, lookahead: int | None = None) -> Tensor:
        out: Tensor = self.motion_module(windows, neutral, lookahead)
        return out

    def denoiser(self, x_t: Tensor, t: Tensor, landmarks: Tensor, ref: ReferenceFeatures) -> Tensor:
        out: Tensor = self.denoiser_module(x_t, t, landmarks, ref)
        return out


class TorchBackend(_BaseBackend):
    name = "torch"
    description = "PyTorch eager (CPU or CUDA)"
    loaded_class = TorchModels


# --- torch.compile -------------------------------------------------------------------------------


def _bucket(n: int, max_batch: int) -> int:
    """The padded batch for ``n`` frames: the next power of two, or ``n`` beyond ``max_batch``."""
    if n > max_batch:
        return n
    return 1 << max(0, n - 1).bit_length()


def _pad_batch(t: Tensor, size: int) -> Tensor:
    if t.shape[0] == size:
        return t
    # Repeat the last row: valid inputs, so padding can never produce NaNs or inf.
    return torch.cat((t, t[-1:].expand(size - t.shape[0], *t.shape[1:])), dim=0)


class CompiledModels(LoadedModels):
    """``torch.compile``d networks; the few-step loop compiles into one graph.

    Mode: ``reduce-overhead`` (CUDA graphs) on CUDA, inductor's default with freezing on CPU,
    unless ``LoadOptions.compile_mode`` says otherwise. Inputs are padded to power-of-two batch
    buckets (static shapes: each bucket compiles, and on CUDA records a graph, once).
    """

    name = "compiled"

    def __init__(self, models: Models, options: LoadOptions) -> None:
        super().__init__(models, options)
        self.motion_module = models.motion.to(self.device).eval()
        self.denoiser_module = models.denoiser.to(self.device, self.dtype).eval()
        cuda = self.device.type == "cuda"
        self.mode = options.compile_mode or ("reduce-overhead" if cuda else None)
        self._cudagraphs = cuda and self.mode == "reduce-overhead"
        compile_kw: dict[str, Any] = {"dynamic": False}
        if self.mode is not None:
            compile_kw["mode"] = self.mode
        else:
            # Freezing: weights become constants, so inductor folds them and pre-packs the
            # convolution weights for oneDNN (1.03x -> 1.28x over eager for the tiny denoiser on
            # the 2-core dev CPU, one thread: benchmarks/experiments/compile_freeze.py).
            # Inference only, which is all we do.
            compile_kw["options"] = {"freezing": True}
        self._motion = torch.compile(self.motion_module, **compile_kw)
        self._denoiser = torch.compile(self.denoiser_module, **compile_kw)
        self._compile_kw = compile_kw
        self._loops: dict[str, Callable[..., Tensor]] = {}
        self._lock = threading.Lock()

    def _call(self, fn: Callable[..., Tensor], n: int, *args: Any) -> Tensor:
        if self._cudagraphs:
            # One step per call: lets the CUDA-graph trees reuse their memory pool safely.
            torch.compiler.cudagraph_mark_step_begin()
        out = fn(*args)[:n]
        # CUDA-graph outputs live in a pool the next replay overwrites: hand out a copy.
        return out.clone() if self._cudagraphs else out

    def motion(self, windows: Tensor, neutral: Tensor, lookahead: int | None = None) -> Tensor:
        n = windows.shape[0]
        b = _bucket(n, self.options.max_batch)
        return self._call(
            self._motion, n, _pad_batch(windows, b), _pad_batch(neutral, b), lookahead
        )

    def denoiser(self, x_t: Tensor, t: Tensor, landmarks: Tensor, ref: ReferenceFeatures) -> Tensor:
        n = x_t.shape[0]
        b = _bucket(n, self.options.max_batch)
        if ref.patches.shape[0] != 1:  # per-frame features (batch n) are padded like x_t
            ref = ReferenceFeatures(
                _pad_batch(ref.patches, b), tuple(_pad_batch(r, b) for r in ref.levels)
            )
        args = (_pad_batch(x_t, b), _pad_batch(t, b), _pad_batch(landmarks, b), ref)
        return self._call(self._denoiser, n, *args)

    def sample(
        self, sampler: FewStepSampler, noise: Tensor, landmarks: Tensor, ref: ReferenceFeatures
    ) -> Tensor:
        _reject_ref_batch(ref, self.name)
        key = _sampler_key(sampler)
        with self._lock:
            loop = self._loops.get(key)
            if loop is None:
                # Dynamo unrolls the Python loop (its timesteps are constants) into one graph.
                def run(x: Tensor, lm: Tensor, r: ReferenceFeatures) -> Tensor:
                    return sampler.sample(self.denoiser_module, x, landmarks=lm, ref=r)

                loop = torch.compile(run, **self._compile_kw)
                self._loops[key] = loop
        n = noise.shape[0]
        b = _bucket(n, self.options.max_batch)
        return self._call(loop, n, _pad_batch(noise, b), _pad_batch(landmarks, b), ref)

    def describe(self) -> str:
        from talkstream.kernels import kernel_implementation

        kernels = kernel_implementation(str(self.device))
        return (
            f"compiled (torch.compile mode={self.mode or 'default'}, kernels={kernels}) "
            f"on {self.device} ({self.options.dtype})"
        )


class CompiledBackend(_BaseBackend):
    name = "compiled"
    extra = None
    description = "torch.compile (inductor; CUDA graphs and Triton kernels on CUDA)"
    loaded_class = CompiledModels

    def check(self, device: str, dtype: str) -> None:
        super().check(device, dtype)
        if _device_type(device) == "cuda":
            _import("triton", "torch.compile on CUDA", "gpu")
        elif not any(shutil.which(cc) for cc in ("g++", "clang++", "c++")):
            raise ValueError(
                "torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH; none found"
            )


# --- onnxruntime ---------------------------------------------------------------------------------


def _onnx_fields(model_hash: str, graph: str, plugins: bool) -> dict[str, Any]:
    import onnx

    from talkstream.export.onnx import OPSET

    return {
        "graph": graph,
        "plugins": plugins,
        "opset": OPSET,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "talkstream": __version__,
        "model": model_hash,
    }


@dataclass
class OnnxGraphs:
    """Builds (once, cached by key) and returns the ONNX graph files of one ``Models``."""

    models: Models
    cache: ArtifactCache
    options: LoadOptions
    plugins: bool = False
    _paths: dict[str, Path] = field(default_factory=dict)
    _hash: str | None = None

    @property
    def model_hash(self) -> str:
        # Hashing the weights costs ~0.1 s (tiny) to ~1 s (base): once per load.
        if self._hash is None:
            from talkstream.export.onnx import model_hash

            self._hash = model_hash(self.models.motion, self.models.denoiser)
        return self._hash

    def motion(self, lookahead: int) -> tuple[Any, Path]:
        from talkstream.export import onnx as ox

        spec = ox.motion_spec(lookahead)
        return spec, self._get(spec, lambda p: ox.export_motion(self.models.motion, p, lookahead))

    def denoiser_step(self) -> tuple[Any, Path]:
        from talkstream.export import onnx as ox

        den = self.models.denoiser
        spec = ox.denoiser_step_spec(len(den.cfg.widths), self.plugins)
        return spec, self._get(
            spec, lambda p: ox.export_denoiser_step(den, p, plugins=self.plugins)
        )

    def denoiser_loop(self, sampler: FewStepSampler) -> tuple[Any, Path]:
        from talkstream.export import onnx as ox

        den = self.models.denoiser
        spec = ox.denoiser_loop_spec(len(den.cfg.widths), sampler.timesteps, self.plugins)
        extra = {"schedule": sampler.schedule.name, "T": sampler.schedule.num_timesteps}
        return spec, self._get(
            spec,
            lambda p: ox.export_denoiser_loop(den, sampler, p, plugins=self.plugins),
            extra,
        )

    def _get(
        self, spec: Any, export: Callable[[Path], Any], extra: Mapping[str, Any] | None = None
    ) -> Path:
        from talkstream.export import onnx as ox

        if spec.filename in self._paths:
            return self._paths[spec.filename]
        fields = {**_onnx_fields(self.model_hash, spec.name, spec.plugins), **(extra or {})}
        entry = self.cache.entry("onnx", spec.filename.removesuffix(".onnx"), fields)

        def build(tmp: Path) -> None:
            self.options.say(f"exporting {spec.filename} (ONNX opset {ox.OPSET}) ...")
            export(tmp / spec.filename)
            ox.check_graph(tmp / spec.filename, spec)

        entry, built = self.cache.get_or_build(entry, build, rebuild=self.options.rebuild)
        if not built:
            self.options.say(f"cached {spec.filename}: {entry.path}")
        path = entry.file(spec.filename)
        self._paths[spec.filename] = path
        return path


class OnnxRuntimeModels(LoadedModels):
    """The ONNX graphs in onnxruntime sessions (CPU provider, or CUDA with IO binding)."""

    name = "onnxruntime"

    def __init__(self, models: Models, options: LoadOptions) -> None:
        super().__init__(models, options)
        self.ort = _import("onnxruntime", "the onnxruntime backend", "export")
        self.cache = ArtifactCache(options.cache_dir)
        self.graphs = OnnxGraphs(models, self.cache, options)
        self._sessions: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        self.cuda = self.device.type == "cuda"
        self.provider = "CUDAExecutionProvider" if self.cuda else "CPUExecutionProvider"
        default_la = models.motion.cfg.lookahead_frames
        for la in options.lookaheads or (default_la,):
            self._motion_session(la)
        if options.sampler is not None:
            self._loop_session(options.sampler)

    def _session(self, key: str, get: Callable[[], tuple[Any, Path]]) -> tuple[Any, Any]:
        with self._lock:
            hit = self._sessions.get(key)
            if hit is not None:
                return hit
            spec, path = get()
            opts = self.ort.SessionOptions()
            threads = self.options.threads or torch.get_num_threads()
            if key.startswith("motion") and self.options.ort_motion_one_thread:
                threads = 1
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
            opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            spin = self.options.ort_spinning
            opts.add_session_config_entry(
                "session.intra_op.allow_spinning", "0" if spin == "off" else "1"
            )
            if spin == "run":
                # Spin while a call runs; stop when it returns (between frames the cores belong
                # to paste-back, colour conversion and the encoder).
                opts.add_session_config_entry("session.force_spinning_stop", "1")
            providers: list[Any] = ["CPUExecutionProvider"]
            if self.cuda:
                # Run on torch's current stream: no cross-stream sync around IO binding.
                stream = torch.cuda.current_stream(self.device).cuda_stream
                cuda_opts = {
                    "device_id": self.device.index or 0,
                    "user_compute_stream": str(stream),
                }
                providers = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
            sess = self.ort.InferenceSession(str(path), opts, providers=providers)
            self._sessions[key] = (sess, spec)
            return sess, spec

    def _motion_session(self, la: int) -> tuple[Any, Any]:
        return self._session(f"motion{la}", lambda: self.graphs.motion(la))

    def _loop_session(self, sampler: FewStepSampler) -> tuple[Any, Any]:
        key = _sampler_key(sampler)
        return self._session(key, lambda: self.graphs.denoiser_loop(sampler))

    def _run(self, sess: Any, spec: Any, inputs: Sequence[Tensor], like: Tensor) -> Tensor:
        if self.cuda:
            return self._run_cuda(sess, spec, inputs, like)
        feeds = {}
        for name, t in zip(spec.inputs, inputs, strict=True):
            dtype = torch.int64 if name == "t" else torch.float32
            feeds[name] = t.detach().to("cpu", dtype).contiguous().numpy()
        (out,) = sess.run(list(spec.outputs), feeds)
        return torch.from_numpy(out).to(like.device, like.dtype)

    def _run_cuda(self, sess: Any, spec: Any, inputs: Sequence[Tensor], like: Tensor) -> Tensor:
        import numpy as np

        binding = sess.io_binding()
        keep = []  # the bound buffers must outlive the run
        for name, t in zip(spec.inputs, inputs, strict=True):
            dtype = torch.int64 if name == "t" else torch.float32
            buf = t.detach().to(self.device, dtype).contiguous()
            keep.append(buf)
            binding.bind_input(
                name, "cuda", self.device.index or 0,
                np.int64 if name == "t" else np.float32, tuple(buf.shape), buf.data_ptr(),
            )  # fmt: skip
        out_shape = (inputs[0].shape[0], *like.shape[1:])
        out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        binding.bind_output(
            spec.outputs[0], "cuda", self.device.index or 0, np.float32, out_shape, out.data_ptr()
        )
        sess.run_with_iobinding(binding)
        return out.to(like.dtype)

    def motion(self, windows: Tensor, neutral: Tensor, lookahead: int | None = None) -> Tensor:
        cfg = self.models.motion.cfg
        la = cfg.lookahead_frames if lookahead is None else lookahead
        self.models.motion.key_padding_mask(la, torch.device("cpu"))  # validates the range
        sess, spec = self._motion_session(la)
        like = windows.new_empty((windows.shape[0], *self.models.motion.head_shape))
        return self._run(sess, spec, (windows, neutral), like)

    def denoiser(self, x_t: Tensor, t: Tensor, landmarks: Tensor, ref: ReferenceFeatures) -> Tensor:
        _reject_ref_batch(ref, self.name)
        sess, spec = self._session("step", self.graphs.denoiser_step)
        return self._run(sess, spec, (x_t, t, landmarks, ref.patches, *ref.levels), x_t)

    def sample(
        self, sampler: FewStepSampler, noise: Tensor, landmarks: Tensor, ref: ReferenceFeatures
    ) -> Tensor:
        _reject_ref_batch(ref, self.name)
        sess, spec = self._loop_session(sampler)
        return self._run(sess, spec, (noise, landmarks, ref.patches, *ref.levels), noise)

    def describe(self) -> str:
        threads = self.options.threads or torch.get_num_threads()
        return (
            f"onnxruntime {self.ort.__version__} ({self.provider}, {threads} threads, "
            f"spinning {self.options.ort_spinning})"
        )

    def close(self) -> None:
        self._sessions.clear()
        self.cache.close()


class OnnxRuntimeBackend(_BaseBackend):
    name = "onnxruntime"
    extra = "export"
    description = "ONNX Runtime on the exported graphs (CPU; CUDA with onnxruntime-gpu)"
    loaded_class = OnnxRuntimeModels

    def check(self, device: str, dtype: str) -> None:
        super().check(device, dtype)
        ort = _import("onnxruntime", "the onnxruntime backend", "export")
        for module in ("onnx", "onnxscript"):  # the exporter that makes the graphs
            _import(module, "the onnxruntime backend (ONNX export)", "export")
        if dtype != "float32":
            raise ValueError(
                f"the onnxruntime backend runs float32 graphs; dtype {dtype} was asked "
                "(use --dtype float32, or --backend compiled/tensorrt for lower precision)"
            )
        if _device_type(device) == "cuda" and (
            "CUDAExecutionProvider" not in ort.get_available_providers()
        ):
            raise ValueError(
                "this onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu "
                "(it replaces the onnxruntime package)"
            )


# --- TensorRT ------------------------------------------------------------------------------------


class TensorRTBackend(_BaseBackend):
    name = "tensorrt"
    extra = "gpu"
    description = "TensorRT FP16 engines built from the ONNX graphs (NVIDIA GPUs)"

    def check(self, device: str, dtype: str) -> None:
        missing: MissingDependencyError | None = None
        try:
            _import("tensorrt", "the tensorrt backend", "gpu")
        except MissingDependencyError as e:
            missing = e
        if _device_type(device) != "cuda":
            # Both problems at once: on a CPU machine doctor should still say what to install.
            also = f"; and {missing}" if missing is not None else ""
            raise ValueError(f"TensorRT needs a CUDA device; device is {device!r}{also}")
        if missing is not None:
            raise missing
        super().check(device, dtype)
        for module in ("onnx", "onnxscript"):
            _import(module, "the tensorrt backend (ONNX export)", "export")

    def load(
        self, models: Models | str | Path, device: str = "cpu", **options: Any
    ) -> LoadedModels:
        from talkstream.export.tensorrt import TensorRTModels

        opts = LoadOptions(device=device, **options)
        self.check(opts.device, opts.dtype)
        return TensorRTModels(_as_models(models, opts.device), opts)


# --- registry and selection ----------------------------------------------------------------------

BACKENDS: dict[str, _BaseBackend] = {
    b.name: b for b in (TorchBackend(), CompiledBackend(), OnnxRuntimeBackend(), TensorRTBackend())
}


def backend_names() -> tuple[str, ...]:
    """Every backend name plus ``auto``: the choices of ``--backend``."""
    return (AUTO, *BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` lists the names if there is none."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; expected one of {', '.join(backend_names())}"
        ) from None


@dataclass(frozen=True)
class Selection:
    """The outcome of ``--backend auto``: the chosen backend and why."""

    name: str
    reason: str
    skipped: tuple[tuple[str, str], ...] = ()  # (backend, why not) for each one tried first

    def explain(self) -> str:
        lines = [f"backend {self.name}: {self.reason}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def select_backend(device: str = "cpu", dtype: str = "float32") -> Selection:
    """The fastest backend available for ``device`` and ``dtype`` (``--backend auto``).

    Walks ``PREFERENCE[device type]`` (fastest first) and takes the first available one; the
    reasons of those skipped come back in the ``Selection``. ``torch`` is always last and always
    available, so this always picks something.
    """
    kind = _device_type(device)
    order = PREFERENCE.get(kind, ("torch",))
    skipped: list[tuple[str, str]] = []
    for position, name in enumerate(order):
        ok, why = BACKENDS[name].available(device, dtype)
        if ok:
            if position == 0:
                reason = f"the fastest backend on {kind} (preference {' > '.join(order)})"
            else:
                reason = f"the fastest available on {kind} (preference {' > '.join(order)})"
            return Selection(name, reason, tuple(skipped))
        skipped.append((name, why))
    raise ValueError(
        f"no backend can run on {device} with {dtype}: "
        + "; ".join(f"{n}: {w}" for n, w in skipped)
    )


def load_backend(
    name: str, models: Models | str | Path, device: str = "cpu", **options: Any
) -> LoadedModels:
    """Load ``models`` with the backend ``name`` (or ``auto``), logging which and why."""
    if name == AUTO:
        sel = select_backend(device, options.get("dtype", "float32"))
        log.info("%s", sel.explain())
        name = sel.name
    loaded = get_backend(name).load(models, device, **options)
    log.info("running the per-frame networks with %s", loaded.describe())
    return loaded
