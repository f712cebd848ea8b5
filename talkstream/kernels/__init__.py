"""Fused kernels, each beside its pure-torch reference, and array-module-agnostic post-processing.

Model code calls ``landmark_attention`` and ``warp_blend`` from here. Each runs its registered
custom op (``talkstream::landmark_attention``, ``talkstream::warp_blend``), which
``torch.compile`` keeps as one node and which runs the fused Triton kernel on CUDA tensors when
Triton is installed (``TRITON_AVAILABLE``) and the reference elsewhere. Inside
``with reference_kernels():`` they call the plain pure-torch references instead, so a traced
graph (ONNX export) holds only standard ops.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import Tensor

from talkstream.kernels.attention import (
    TRITON_AVAILABLE,
    check_landmark_attention_inputs,
    landmark_attention_op,
    landmark_attention_reference,
    landmark_attention_triton,
)
from talkstream.kernels.warp import (
    check_warp_blend_inputs,
    warp_blend_op,
    warp_blend_reference,
    warp_blend_triton,
)

__all__ = [
    "TRITON_AVAILABLE",
    "kernel_implementation",
    "landmark_attention",
    "landmark_attention_op",
    "landmark_attention_reference",
    "landmark_attention_triton",
    "reference_kernels",
    "reference_kernels_enabled",
    "warp_blend",
    "warp_blend_op",
    "warp_blend_reference",
    "warp_blend_triton",
]


# Thread-local, not a module flag: an export running in one thread must not switch the kernels of
# a serving worker in another. Not a ContextVar either: torch.compile cannot trace
# ContextVar.get (graph break), while it traces this attribute and guards on its value, so a
# compiled model recompiles rather than silently keeping the other path (checked on 2.13).
class _KernelMode(threading.local):
    def __init__(self) -> None:
        # Set per instance (threading.local runs this once per thread): torch.compile guards an
        # instance attribute, but a class-level default would be baked in unguarded.
        self.reference = False


_MODE = _KernelMode()


@contextlib.contextmanager
def reference_kernels(enabled: bool = True) -> Iterator[None]:
    """Within this block, kernel calls run the plain pure-torch references, not the custom ops.

    Used by ONNX export so the exported graph holds standard ops (MatMul, Softmax, GridSample)
    instead of ``talkstream::*`` nodes. Applies to the current thread only.
    """
    previous = _MODE.reference
    _MODE.reference = enabled
    try:
        yield
    finally:
        _MODE.reference = previous


def reference_kernels_enabled() -> bool:
    """Whether the current context runs the pure-torch references (see ``reference_kernels``)."""
    return _MODE.reference


def kernel_implementation(device: str) -> str:
    """Which implementation the custom ops run on ``device``: ``"triton"`` or ``"reference"``.

    For ``talkstream doctor`` and benchmark reports; the ops decide per call from the tensors
    (CUDA and a float32/float16/bfloat16 dtype take the Triton kernel when it is installed).
    """
    if device.split(":", 1)[0] == "cuda" and TRITON_AVAILABLE:
        return "triton"
    return "reference"


def landmark_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Cross-attention of image tokens to landmark tokens: ``softmax(q k^T * scale) v``.

    Args:
        q: (B, H, N, D) image-token queries (N large).
        k: (B, H, M, D) landmark-token keys (M = 68).
        v: (B, H, M, Dv) landmark-token values.
        scale: score multiplier, usually ``D ** -0.5``.

    Returns:
        (B, H, N, Dv) in ``q.dtype``; low-precision inputs are computed in fp32.
    """
    check_landmark_attention_inputs(q, k, v, scale)
    if _MODE.reference:
        return landmark_attention_reference(q, k, v, scale)
    result: Tensor = landmark_attention_op(q, k, v, scale)
    return result


def warp_blend(x: Tensor, ref: Tensor, flow: Tensor, mask: Tensor) -> Tensor:
    """``(1 - mask) * x + mask * bilinear_sample(ref, base_grid + flow)``.

    Args:
        x: (B, C, H, W) current features.
        ref: (B, C, H, W) reference features.
        flow: (B, 2, H, W) grid offsets in normalised [-1, 1] units (channel 0 = x, 1 = y).
        mask: (B, 1, H, W) blend weight in [0, 1].

    Sampling is bilinear with border padding and ``align_corners=False``.

    Returns:
        (B, C, H, W) in ``x.dtype``.
    """
    check_warp_blend_inputs(x, ref, flow, mask)
    if _MODE.reference:
        return warp_blend_reference(x, ref, flow, mask)
    result: Tensor = warp_blend_op(x, ref, flow, mask)
    return result
