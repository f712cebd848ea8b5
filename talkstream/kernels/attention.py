"""TalkFormer cross-attention: image-token queries attend to a few landmark tokens.

The shape is unusual for attention kernels: many queries (N = every image token of a U-Net level)
against very few keys (M = 68 landmarks). The whole score row fits in registers, so a fused
kernel needs no online softmax; that kernel arrives in a later change. This file holds:

- ``landmark_attention_reference``: the pure-torch reference (the definition of the op);
- ``landmark_attention_op``: the ``talkstream::landmark_attention`` custom op, so that
  ``torch.compile`` keeps it as one node and a TensorRT build can map it to a plugin;
- ``check_landmark_attention_inputs``: the shape/dtype checks shared by every path.

Model code calls ``talkstream.kernels.landmark_attention``, which picks the custom op or, inside
``talkstream.kernels.reference_kernels()``, the plain reference (ONNX export: standard ops).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_landmark_attention_inputs",
    "landmark_attention_op",
    "landmark_attention_reference",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax over half-precision scores loses the small weights that decide where a lip corner
    # is; accumulate in fp32 and round once at the end.
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def check_landmark_attention_inputs(q: Tensor, k: Tensor, v: Tensor, scale: float) -> None:
    """Raise ``ValueError``/``TypeError`` unless q, k, v have matching attention shapes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"landmark_attention: {name} must be 4-D (B, H, tokens, D), got {tuple(t.shape)}"
            )
        if not t.dtype.is_floating_point:
            raise TypeError(f"landmark_attention: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"landmark_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"landmark_attention: q, k, v must be on one device, "
            f"got {q.device}, {k.device}, {v.device}"
        )
    bq, hq, _, dq = q.shape
    bk, hk, mk, dk = k.shape
    if (bk, hk, dk) != (bq, hq, dq):
        raise ValueError(
            f"landmark_attention: k {tuple(k.shape)} does not match q {tuple(q.shape)} "
            "in batch, heads or head dim"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"landmark_attention: v {tuple(v.shape)} must match k {tuple(k.shape)} "
            "in batch, heads and tokens"
        )
    if mk == 0:
        raise ValueError("landmark_attention: k and v need at least one token")
    if not scale > 0.0:
        raise ValueError(f"landmark_attention: scale must be positive, got {scale}")


def landmark_attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax(q @ k^T * scale) @ v``, in fp32 for half inputs, returned in ``q.dtype``.

    Args:
        q: (B, H, N, D) image-token queries.
        k: (B, H, M, D) landmark-token keys.
        v: (B, H, M, Dv) landmark-token values.
        scale: multiplier of the scores, usually ``D ** -0.5``.

    Returns:
        (B, H, N, Dv) in ``q.dtype``.
    """
    cdt = _compute_dtype(q.dtype)
    scores = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale  # (B, H, N, M)
    probs = torch.softmax(scores, dim=-1)  # (B, H, N, M)
    out = torch.matmul(probs, v.to(cdt))  # (B, H, N, Dv)
    return out.to(q.dtype)


@torch.library.custom_op("talkstream::landmark_attention", mutates_args=())
def landmark_attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The ``talkstream::landmark_attention`` custom op (same contract as the reference)."""
    # --- Accelerated implementations are dispatched here. ---------------------------------
    # The fused Triton kernel for CUDA tensors will be selected at this point (by q.device.type);
    # until it exists every device runs the reference.
    # ------------------------------------------------------------------------------------------
    return landmark_attention_reference(q, k, v, scale)


@landmark_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))  # (B, H, N, Dv)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    q, k, v, scale = inputs
    # Recompute the (N, M) probabilities in backward instead of saving them: with M = 68 they are
    # as large as q itself, and the recompute is one small matmul.
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(
    ctx: Any, grad_out: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    q, k, v = ctx.saved_tensors
    scale: float = ctx.scale
    cdt = _compute_dtype(q.dtype)
    qf, kf, vf, gf = q.to(cdt), k.to(cdt), v.to(cdt), grad_out.to(cdt)
    probs = torch.softmax(torch.matmul(qf, kf.transpose(-1, -2)) * scale, dim=-1)  # (B, H, N, M)
    grad_probs = torch.matmul(gf, vf.transpose(-1, -2))  # (B, H, N, M)
    # Softmax Jacobian-vector product: dS = P * (dP - rowsum(dP * P)).
    grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))  # (B, H, N, M)
    grad_q = grad_k = grad_v = None
    if ctx.needs_input_grad[0]:
        grad_q = (torch.matmul(grad_scores, kf) * scale).to(q.dtype)  # (B, H, N, D)
    if ctx.needs_input_grad[1]:
        grad_k = (torch.matmul(grad_scores.transpose(-1, -2), qf) * scale).to(
            k.dtype
        )  # (B, H, M, D)
    if ctx.needs_input_grad[2]:
        grad_v = torch.matmul(probs.transpose(-1, -2), gf).to(v.dtype)  # (B, H, M, Dv)
    return grad_q, grad_k, grad_v, None


landmark_attention_op.register_autograd(_backward, setup_context=_setup_context)
