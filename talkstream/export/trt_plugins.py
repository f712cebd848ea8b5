"""The fused kernels as TensorRT plugins (``tensorrt.plugin``, TensorRT >= 10.7 and 11.x).

Two quickly-deployable plugins, ``talkstream::landmark_attention`` and ``talkstream::warp_blend``,
match the ONNX nodes that ``talkstream.export.onnx`` emits with ``plugins=True`` (op type = plugin
name, ``plugin_namespace`` attribute = ``talkstream``). Each has:

- a descriptor (``tensorrt.plugin.register``): the output's shape expression and dtype, from the
  inputs' symbolic shapes;
- an implementation (``tensorrt.plugin.impl``): wraps TensorRT's buffers as torch tensors
  (zero-copy) and launches the Triton kernel on TensorRT's stream, writing straight into the
  output buffer;
- an autotune declaration: FP32 or FP16 I/O, all tensors of one type.

The shape logic is plain functions over sequences of dimensions (ints or TensorRT shape
expressions, which support the same operators), so it is tested without TensorRT. The plugin
functions themselves are made by ``plugin_functions(trtp)`` from whatever module provides
``TensorDesc``/``Tensor``: the real ``tensorrt.plugin`` in ``register_plugins``, a stand-in in the
tests.
"""

from __future__ import annotations

import threading
import typing
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "ATTENTION_PLUGIN",
    "WARP_PLUGIN",
    "attention_output_shape",
    "plugin_functions",
    "register_plugins",
    "warp_output_shape",
]

NAMESPACE = "talkstream"
ATTENTION_PLUGIN = f"{NAMESPACE}::landmark_attention"
WARP_PLUGIN = f"{NAMESPACE}::warp_blend"

_registered = False
_lock = threading.Lock()


def _check_rank(name: str, shape: Sequence[Any], rank: int) -> None:
    if len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape of rank {len(shape)}")


def _check_equal(what: str, a: Any, b: Any) -> None:
    # Only concrete dims can be compared here; symbolic ones are TensorRT's to check at runtime.
    if isinstance(a, int) and isinstance(b, int) and a != b:
        raise ValueError(f"{what}: {a} != {b}")


def attention_output_shape(
    q: Sequence[Any], k: Sequence[Any], v: Sequence[Any]
) -> tuple[Any, Any, Any, Any]:
    """(B, H, N, Dv) from q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv)."""
    for name, s in (("q", q), ("k", k), ("v", v)):
        _check_rank(name, s, 4)
    for ax, what in ((0, "batch"), (1, "heads"), (3, "head dim")):
        _check_equal(f"landmark_attention: q and k differ in {what}", q[ax], k[ax])
    for ax, what in ((0, "batch"), (1, "heads"), (2, "tokens")):
        _check_equal(f"landmark_attention: k and v differ in {what}", k[ax], v[ax])
    return (q[0], q[1], q[2], v[3])


def warp_output_shape(
    x: Sequence[Any], ref: Sequence[Any], flow: Sequence[Any], mask: Sequence[Any]
) -> tuple[Any, Any, Any, Any]:
    """(B, C, H, W) = x's shape, after checking ref (B, C, H, W), flow (B, 2, H, W), mask."""
    for name, s in (("x", x), ("ref", ref), ("flow", flow), ("mask", mask)):
        _check_rank(name, s, 4)
    for ax in range(4):
        _check_equal(f"warp_blend: ref axis {ax}", ref[ax], x[ax])
    _check_equal("warp_blend: flow channels", flow[1], 2)
    _check_equal("warp_blend: mask channels", mask[1], 1)
    for name, s in (("flow", flow), ("mask", mask)):
        for ax in (0, 2, 3):
            _check_equal(f"warp_blend: {name} axis {ax}", s[ax], x[ax])
    return (x[0], x[1], x[2], x[3])


def plugin_functions(trtp: Any) -> dict[str, dict[str, Callable[..., Any]]]:
    """The descriptor, implementation and autotune functions of both plugins.

    Returns ``{plugin id: {"desc": f, "impl": f, "autotune": f}}``. ``tensorrt.plugin`` tells
    input tensors from attributes by the functions' annotations, so each function gets
    annotations naming ``trtp``'s own ``TensorDesc``/``Tensor`` objects (set after ``def``:
    they are runtime values, not types a checker knows).
    """
    desc_t, tensor_t = trtp.TensorDesc, trtp.Tensor
    # The schema documents the outputs as typing.Tuple[Tensor]; keep that exact spelling.
    tuple_of: Any = typing.Tuple  # noqa: UP006

    def attention_desc(q: Any, k: Any, v: Any, scale: float) -> Any:
        shape = attention_output_shape(q.shape_expr, k.shape_expr, v.shape_expr)
        return trtp.from_shape_expr(shape, dtype=q.dtype)  # (B, H, N, Dv)

    def warp_desc(x: Any, ref: Any, flow: Any, mask: Any) -> Any:
        warp_output_shape(x.shape_expr, ref.shape_expr, flow.shape_expr, mask.shape_expr)
        return x.like()  # (B, C, H, W)

    def attention_impl(
        q: Any, k: Any, v: Any, scale: float, outputs: tuple[Any, ...], stream: int
    ) -> None:
        import torch

        from talkstream.kernels import landmark_attention_triton

        tq, tk, tv, out = (torch.as_tensor(t, device="cuda") for t in (q, k, v, outputs[0]))
        # Triton launches on torch's current stream: make that TensorRT's stream.
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            landmark_attention_triton(tq, tk, tv, scale, out=out)

    def warp_impl(
        x: Any, ref: Any, flow: Any, mask: Any, outputs: tuple[Any, ...], stream: int
    ) -> None:
        import torch

        from talkstream.kernels import warp_blend_triton

        tensors = [torch.as_tensor(t, device="cuda") for t in (x, ref, flow, mask, outputs[0])]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            warp_blend_triton(*tensors[:4], out=tensors[4])

    def attention_autotune(
        q: Any, k: Any, v: Any, scale: float, outputs: tuple[Any, ...]
    ) -> list[Any]:
        # q, k, v and the output share one float type (the kernel's contract).
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16")]

    def warp_autotune(
        x: Any, ref: Any, flow: Any, mask: Any, outputs: tuple[Any, ...]
    ) -> list[Any]:
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16")]

    descs4 = {n: desc_t for n in ("x", "ref", "flow", "mask")}
    tensors4 = {n: tensor_t for n in ("x", "ref", "flow", "mask")}
    attention_desc.__annotations__ = {"q": desc_t, "k": desc_t, "v": desc_t, "scale": float,
                                      "return": desc_t}  # fmt: skip
    warp_desc.__annotations__ = {**descs4, "return": desc_t}
    attention_impl.__annotations__ = {
        "q": tensor_t, "k": tensor_t, "v": tensor_t, "scale": float,
        "outputs": tuple_of[tensor_t], "stream": int, "return": None,
    }  # fmt: skip
    warp_impl.__annotations__ = {
        **tensors4, "outputs": tuple_of[tensor_t], "stream": int, "return": None,
    }  # fmt: skip
    attention_autotune.__annotations__ = {
        "q": desc_t, "k": desc_t, "v": desc_t, "scale": float,
        "outputs": tuple_of[desc_t], "return": list[Any],
    }  # fmt: skip
    warp_autotune.__annotations__ = {**descs4, "outputs": tuple_of[desc_t], "return": list[Any]}
    return {
        ATTENTION_PLUGIN: {
            "desc": attention_desc,
            "impl": attention_impl,
            "autotune": attention_autotune,
        },
        WARP_PLUGIN: {"desc": warp_desc, "impl": warp_impl, "autotune": warp_autotune},
    }


def _require(module: str, what: str) -> Any:
    # Not backends._import: this module imports only talkstream.errors from the package.
    import importlib

    from talkstream.errors import MissingDependencyError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(what, module, "gpu") from None


def register_plugins() -> None:
    """Register both plugins with TensorRT (idempotent; needs tensorrt >= 10.7 and Triton)."""
    global _registered
    with _lock:
        if _registered:
            return
        _require("triton", "the TensorRT kernel plugins")
        trtp = _require("tensorrt.plugin", "the TensorRT kernel plugins (TensorRT >= 10.7 or 11)")
        for plugin_id, fns in plugin_functions(trtp).items():
            trtp.register(plugin_id)(fns["desc"])
            trtp.impl(plugin_id)(fns["impl"])
            trtp.autotune(plugin_id)(fns["autotune"])
        _registered = True
