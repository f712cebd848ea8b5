"""ONNX export of the per-frame networks: AudioToMotion and the TalkFormer denoiser.

Each exported network declares its inputs, outputs and dynamic axes once, in a ``GraphSpec``;
backends (onnxruntime, TensorRT) read names and axes from it instead of guessing. Three graphs:

- ``motion``: ``(windows (B, W, R, 80), neutral (B, 68, 2)) -> displacement (B, 37, 2)``, one
  graph per lookahead (a smaller lookahead masks tokens out of attention; baking it in keeps the
  mask out of the graph's inputs);
- ``denoiser_step``: one denoiser call, ``(x_t, t, landmarks, ref_patches, ref_level0..) -> x0``;
- ``denoiser_loop``: the whole few-step DDIM loop as one graph, ``(noise, landmarks, ref_*) ->
  x0``, its timesteps and coefficients baked in as constants. For 2-4 steps this saves the
  per-step dispatch and the update arithmetic outside the runtime; for one step it is the step
  graph without the ``t`` input.

The batch axis is dynamic everywhere; the reference features keep batch 1 (one avatar's
features broadcast over its frames, as the engine calls the denoiser).

Graphs are traced inside ``reference_kernels()``, so they hold only standard ONNX ops
(MatMul, Softmax, GridSample) that any runtime runs. ``plugins=True`` instead keeps the two
kernels as ``talkstream::landmark_attention`` / ``talkstream::warp_blend`` nodes carrying a
``plugin_namespace`` attribute, which TensorRT's ONNX parser maps to the plugins registered in
``talkstream.export.trt_plugins``; onnxruntime cannot run those graphs.

Everything here needs the ``export`` extra (onnx, onnxscript); imports are checked when a
function is called, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from talkstream.engine.denoiser import ReferenceFeatures, TalkFormerDenoiser
from talkstream.engine.motion import AudioToMotion
from talkstream.engine.sampler import FewStepSampler
from talkstream.errors import MissingDependencyError
from talkstream.kernels import reference_kernels

__all__ = [
    "OPSET",
    "PLUGIN_DOMAIN",
    "DenoiserLoopGraph",
    "DenoiserStepGraph",
    "GraphSpec",
    "MotionGraph",
    "check_graph",
    "denoiser_loop_spec",
    "denoiser_step_spec",
    "example_inputs",
    "export_denoiser_loop",
    "export_denoiser_step",
    "export_motion",
    "model_hash",
    "motion_spec",
    "onnxruntime_max_error",
    "reference_inputs",
    "register_plugin_schemas",
    "require_export_deps",
]

# Opset 20: GridSample with the 2-D semantics every runtime here implements; TensorRT 10's ONNX
# parser reads it.
OPSET = 20
PLUGIN_DOMAIN = "talkstream"
BATCH = "batch"
# Example batch for tracing: not 0 or 1, which torch.export would specialise on.
_TRACE_BATCH = 2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphSpec:
    """Names and dynamic axes of one exported graph; backends bind tensors by these names."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    # {tensor name: {axis: symbol}}: every axis not listed is static.
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    plugins: bool = False  # kernels kept as talkstream::* plugin nodes (TensorRT only)

    @property
    def filename(self) -> str:
        return f"{self.name}{'.plugins' if self.plugins else ''}.onnx"


def _ref_names(n_levels: int) -> tuple[str, ...]:
    return ("ref_patches", *(f"ref_level{i}" for i in range(n_levels)))


def motion_spec(lookahead: int) -> GraphSpec:
    """The motion graph for one lookahead (frames of future audio in the window)."""
    return GraphSpec(
        name=f"motion_la{lookahead}",
        inputs=("windows", "neutral"),
        outputs=("displacement",),
        dynamic_axes={"windows": {0: BATCH}, "neutral": {0: BATCH}, "displacement": {0: BATCH}},
    )


def denoiser_step_spec(n_levels: int, plugins: bool = False) -> GraphSpec:
    """One denoiser call: ``(x_t, t, landmarks, ref_patches, ref_level*) -> x0``."""
    return GraphSpec(
        name="denoiser_step",
        inputs=("x_t", "t", "landmarks", *_ref_names(n_levels)),
        outputs=("x0",),
        dynamic_axes={
            "x_t": {0: BATCH},
            "t": {0: BATCH},
            "landmarks": {0: BATCH},
            "x0": {0: BATCH},
        },
        plugins=plugins,
    )


def denoiser_loop_spec(n_levels: int, timesteps: Sequence[int], plugins: bool = False) -> GraphSpec:
    """The whole few-step loop: ``(noise, landmarks, ref_patches, ref_level*) -> x0``."""
    return GraphSpec(
        name="denoiser_loop_" + "-".join(str(t) for t in timesteps),
        inputs=("noise", "landmarks", *_ref_names(n_levels)),
        outputs=("x0",),
        dynamic_axes={"noise": {0: BATCH}, "landmarks": {0: BATCH}, "x0": {0: BATCH}},
        plugins=plugins,
    )


# --- export wrappers: flat tensor signatures --------------------------------------------------


class MotionGraph(nn.Module):
    """``AudioToMotion`` with its lookahead fixed: ``(windows, neutral) -> displacement``."""

    def __init__(self, motion: AudioToMotion, lookahead: int) -> None:
        super().__init__()
        self.motion = motion
        self.lookahead = lookahead

    def forward(self, windows: Tensor, neutral: Tensor) -> Tensor:
        return self.motion(windows, neutral, self.lookahead)  # (B, 37, 2)


class DenoiserStepGraph(nn.Module):
    """``TalkFormerDenoiser.forward`` with the reference features as separate tensors."""

    def __init__(self, denoiser: TalkFormerDenoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t: Tensor, t: Tensor, landmarks: Tensor, *ref: Tensor) -> Tensor:
        feats = ReferenceFeatures(patches=ref[0], levels=tuple(ref[1:]))
        return self.denoiser(x_t, t, landmarks, feats)  # (B, 3, S, S)


class DenoiserLoopGraph(nn.Module):
    """The sampler's whole loop over the denoiser: ``(noise, landmarks, *ref) -> x0``."""

    def __init__(self, denoiser: TalkFormerDenoiser, sampler: FewStepSampler) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.sampler = sampler

    def forward(self, noise: Tensor, landmarks: Tensor, *ref: Tensor) -> Tensor:
        feats = ReferenceFeatures(patches=ref[0], levels=tuple(ref[1:]))
        # The timesteps are Python ints, so tracing unrolls the loop with constant t tensors.
        return self.sampler.sample(self.denoiser, noise, landmarks=landmarks, ref=feats)


# --- inputs -------------------------------------------------------------------------------------


def reference_inputs(denoiser: TalkFormerDenoiser, seed: int = 0) -> ReferenceFeatures:
    """Reference features of a random crop (batch 1), for tracing and parity checks."""
    s = denoiser.cfg.image_size
    gen = torch.Generator().manual_seed(seed)
    dev = next(denoiser.parameters()).device
    dtype = next(denoiser.parameters()).dtype
    crop = (torch.rand(1, 3, s, s, generator=gen) * 2 - 1).to(dev, dtype)
    with torch.no_grad():
        return denoiser.encode_reference(crop)


def example_inputs(
    spec: GraphSpec,
    *,
    motion: AudioToMotion | None = None,
    denoiser: TalkFormerDenoiser | None = None,
    batch: int = _TRACE_BATCH,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Random, realistic inputs of ``spec``'s graph by name (float32, CPU)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    if spec.name.startswith("motion"):
        assert motion is not None, "motion graphs need the motion model"
        c = motion.cfg
        # Log-mel around the model's normalisation (mean -6, std 3).
        out["windows"] = torch.randn(batch, c.window, c.mel_rows, c.n_mels, generator=gen) * 3 - 6
        out["neutral"] = torch.rand(batch, c.n_landmarks, 2, generator=gen) * 1.2 - 0.6
        return out
    assert denoiser is not None, "denoiser graphs need the denoiser"
    d = denoiser.cfg
    s = d.image_size
    first = "x_t" if "x_t" in spec.inputs else "noise"
    out[first] = torch.randn(batch, 3, s, s, generator=gen)
    if "t" in spec.inputs:
        out["t"] = torch.randint(0, 1000, (batch,), generator=gen)
    out["landmarks"] = torch.rand(batch, d.n_landmarks, 2, generator=gen) * 1.2 - 0.6
    ref = reference_inputs(_float_cpu(denoiser), seed)
    for name, tensor in zip(_ref_names(len(d.widths)), (ref.patches, *ref.levels), strict=True):
        out[name] = tensor
    return out


# --- export -------------------------------------------------------------------------------------


def require_export_deps() -> None:
    """Raise ``MissingDependencyError`` unless onnx and onnxscript (the exporter) import."""
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise MissingDependencyError("ONNX export", module, "export") from None


def _float_cpu(module: nn.Module, dtype: torch.dtype = torch.float32) -> Any:
    # Export traces a CPU copy in ``dtype`` (fp32 by default: the graph's precision is then the
    # runtime's decision; fp16 for TensorRT's strongly typed networks, which take their types
    # from the graph), and the caller's model stays where it is.
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"ONNX graphs are exported in float32 or float16, not {dtype}")
    p = next(module.parameters())
    if p.dtype == dtype and p.device.type == "cpu":
        return module
    return copy.deepcopy(module).to("cpu", dtype)


def _in_dtype(inputs: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    # Float inputs follow the graph's dtype; integer ones (the timestep ``t``) stay as they are.
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    # The exporter warns about things that do not apply here (torchvision ops it skips, axis
    # renames, deprecated pytree internals) and its graph optimiser logs every pass at INFO
    # (hundreds of lines); keep the CLI's progress readable.
    names = ("torch.onnx._internal.exporter._registration", "onnx_ir", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*")
            warnings.filterwarnings("ignore", message=".*training mode.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export(
    module: nn.Module,
    spec: GraphSpec,
    inputs: Mapping[str, Tensor],
    path: Path,
) -> Path:
    require_export_deps()
    module = module.eval()
    args = tuple(inputs[name] for name in spec.inputs)
    batch = torch.export.Dim(BATCH, min=1, max=4096)
    # dynamic_shapes mirrors forward's signature: the leading named tensors, then the
    # reference features as one ``*ref`` tuple (static: batch 1).
    axes = [{ax: batch for ax in spec.dynamic_axes.get(n, {})} or None for n in spec.inputs]
    n_ref = sum(n.startswith("ref_") for n in spec.inputs)
    lead = len(spec.inputs) - n_ref
    # ``{}`` (no dynamic axis) rather than None inside the tuple: the exporter would take a
    # tuple of Nones for one tensor's per-axis list and turn it into a list (checked on 2.13).
    ref_axes = tuple(a or {} for a in axes[lead:])
    dynamic: tuple[Any, ...] = (*axes[:lead], ref_axes) if n_ref else tuple(axes)
    path.parent.mkdir(parents=True, exist_ok=True)
    kernels = contextlib.nullcontext() if spec.plugins else reference_kernels()
    table = _plugin_translations() if spec.plugins else None
    with _quiet_export(), kernels, torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            external_data=False,
            custom_translation_table=table,
            dynamo=True,
            verbose=False,
        )
    return path


def export_motion(
    motion: AudioToMotion,
    path: str | Path,
    lookahead: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> GraphSpec:
    """Export the motion model for one lookahead (default: its trained maximum) to ``path``.

    ``dtype`` (float32 or float16) is the graph's weights, float inputs and output.
    """
    la = motion.cfg.lookahead_frames if lookahead is None else lookahead
    motion.key_padding_mask(la, torch.device("cpu"))  # validates the lookahead
    spec = motion_spec(la)
    model = _float_cpu(motion, dtype)
    inputs = _in_dtype(example_inputs(spec, motion=_float_cpu(motion)), dtype)
    _export(MotionGraph(model, la), spec, inputs, Path(path))
    return spec


def export_denoiser_step(
    denoiser: TalkFormerDenoiser,
    path: str | Path,
    *,
    plugins: bool = False,
    dtype: torch.dtype = torch.float32,
) -> GraphSpec:
    """Export one denoiser call to ``path`` (``dtype``: float32 or float16 graph)."""
    spec = denoiser_step_spec(len(denoiser.cfg.widths), plugins)
    model = _float_cpu(denoiser, dtype)
    inputs = _in_dtype(example_inputs(spec, denoiser=_float_cpu(denoiser)), dtype)
    _export(DenoiserStepGraph(model), spec, inputs, Path(path))
    return spec


def export_denoiser_loop(
    denoiser: TalkFormerDenoiser,
    sampler: FewStepSampler,
    path: str | Path,
    *,
    plugins: bool = False,
    dtype: torch.dtype = torch.float32,
) -> GraphSpec:
    """Export the sampler's whole few-step loop over the denoiser to ``path`` (``dtype``: the
    graph's float type, float32 or float16)."""
    spec = denoiser_loop_spec(len(denoiser.cfg.widths), sampler.timesteps, plugins)
    model = _float_cpu(denoiser, dtype)
    inputs = _in_dtype(example_inputs(spec, denoiser=_float_cpu(denoiser)), dtype)
    _export(DenoiserLoopGraph(model, sampler), spec, inputs, Path(path))
    return spec


# --- plugin path ---------------------------------------------------------------------------------


_SCHEMAS_REGISTERED = False


def register_plugin_schemas() -> None:
    """Register ONNX schemas of the ``talkstream::*`` kernel nodes (idempotent).

    With the schemas, onnxscript can emit the nodes and ``onnx.checker`` can check them; the
    ``plugin_namespace`` attribute is what TensorRT's parser uses to find the plugin.
    """
    global _SCHEMAS_REGISTERED
    if _SCHEMAS_REGISTERED:
        return
    from onnx.defs import OpSchema, register_schema

    floats = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors")]
    param = OpSchema.FormalParameter
    ns = OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT namespace")
    register_schema(
        OpSchema(
            "landmark_attention",
            PLUGIN_DOMAIN,
            1,
            doc="softmax(q k^T * scale) v; see talkstream.kernels.landmark_attention",
            inputs=[param("q", "T"), param("k", "T"), param("v", "T")],
            outputs=[param("out", "T")],
            type_constraints=floats,
            attributes=[OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "score scale"), ns],
        )
    )
    register_schema(
        OpSchema(
            "warp_blend",
            PLUGIN_DOMAIN,
            1,
            doc="(1 - mask) x + mask bilinear(ref, grid + flow); see talkstream.kernels",
            inputs=[param("x", "T"), param("ref", "T"), param("flow", "T"), param("mask", "T")],
            outputs=[param("out", "T")],
            type_constraints=floats,
            attributes=[ns],
        )
    )
    _SCHEMAS_REGISTERED = True


def _plugin_translations() -> dict[Any, Any]:
    import onnxscript

    register_plugin_schemas()
    opset = onnxscript.values.Opset(domain=PLUGIN_DOMAIN, version=1)

    def attention(q: Any, k: Any, v: Any, scale: float) -> Any:
        return opset.landmark_attention(q, k, v, scale=scale, plugin_namespace=PLUGIN_DOMAIN)

    def warp(x: Any, ref: Any, flow: Any, mask: Any) -> Any:
        return opset.warp_blend(x, ref, flow, mask, plugin_namespace=PLUGIN_DOMAIN)

    return {
        torch.ops.talkstream.landmark_attention.default: attention,
        torch.ops.talkstream.warp_blend.default: warp,
    }


# --- checks ---------------------------------------------------------------------------------------


def check_graph(path: str | Path, spec: GraphSpec) -> Any:
    """Run ``onnx.checker`` (full check) and verify the declared names and dynamic axes.

    Returns the loaded ``onnx.ModelProto``. Raises ``ValueError`` naming what differs.
    """
    require_export_deps()
    import onnx

    if spec.plugins:
        register_plugin_schemas()
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    got_in = tuple(i.name for i in model.graph.input)
    got_out = tuple(o.name for o in model.graph.output)
    if got_in != spec.inputs or got_out != spec.outputs:
        raise ValueError(
            f"{path}: graph has inputs {got_in} and outputs {got_out}, "
            f"expected {spec.inputs} and {spec.outputs}"
        )
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        want = spec.dynamic_axes.get(value.name, {})
        for ax, dim in enumerate(dims):
            if ax in want and dim.dim_param != want[ax]:
                raise ValueError(
                    f"{path}: axis {ax} of {value.name} should be dynamic {want[ax]!r}, "
                    f"got {dim.dim_param or dim.dim_value}"
                )
            if ax not in want and not dim.HasField("dim_value"):
                raise ValueError(f"{path}: axis {ax} of {value.name} should be static")
    return model


def onnxruntime_max_error(
    path: str | Path, inputs: Mapping[str, Tensor], expected: Tensor, threads: int = 1
) -> float:
    """Largest absolute difference between onnxruntime (CPU) on ``inputs`` and ``expected``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("ONNX Runtime", "onnxruntime", "export") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {k: v.detach().cpu().contiguous().numpy() for k, v in inputs.items()}
    (got,) = sess.run(None, feeds)
    return float((torch.from_numpy(got) - expected.detach().float().cpu()).abs().max())


# --- identity of a model --------------------------------------------------------------------------


def model_hash(*modules: nn.Module) -> str:
    """sha256 of the modules' classes, configs and weights (in fp32): the cache key's model part.

    Independent of the device and dtype the modules are in now, so an engine in bf16 on a GPU
    and the export CLI on a CPU agree on the key.
    """
    h = hashlib.sha256()
    for module in modules:
        h.update(type(module).__qualname__.encode())
        cfg = getattr(module, "cfg", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{name}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()
