"""TalkFormer cross-attention: image-token queries attend to a few landmark tokens.

The shape is unusual for attention kernels: many queries (N = every image token of a U-Net level)
against very few keys (M = 68 landmarks). The fused Triton kernel gives each program a block of
queries of one (batch, head) and streams the keys and values through on-chip blocks with an online
softmax: with the default key block (128 >= 68) that is one pass, K and V are read once per query
block and the (N, M) score matrix never reaches memory. This file holds:

- ``_landmark_attention_kernel``: the ``@triton.jit`` kernel (defined when Triton is importable);
- ``landmark_attention_triton``: its wrapper (checks shapes, strides and dtypes, allocates);
- ``landmark_attention_reference``: the pure-torch reference (the definition of the op);
- ``landmark_attention_op``: the ``talkstream::landmark_attention`` custom op, so that
  ``torch.compile`` keeps it as one node and a TensorRT build can map it to a plugin; it runs the
  Triton kernel on CUDA tensors when Triton is installed and the reference elsewhere;
- ``check_landmark_attention_inputs``: the shape/dtype checks shared by every path.

Model code calls ``talkstream.kernels.landmark_attention``, which picks the custom op or, inside
``talkstream.kernels.reference_kernels()``, the plain reference (ONNX export: standard ops).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

try:  # Optional: the [gpu] extra. Without it every device runs the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = [
    "TRITON_AVAILABLE",
    "check_landmark_attention_inputs",
    "landmark_attention_op",
    "landmark_attention_reference",
    "landmark_attention_triton",
]

log = logging.getLogger(__name__)

TRITON_AVAILABLE = triton is not None
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Head dims above this would not fit a query block in registers; no preset comes close (<= 48).
_MAX_HEAD_DIM = 256
_LOG2_E = 1.4426950408889634


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


# --- Triton kernel ------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _landmark_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr,
        qk_scale,  # scale * log2(e): the softmax runs on exp2
        H, N, M, D, DV, n_blocks,
        sqb, sqh, sqn, sqd,
        skb, skh, skm, skd,
        svb, svh, svm, svd,
        sob, soh, son, sod,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        # One program = BLOCK_N queries of one (batch, head); a flat grid, so B * H is unbounded.
        pid = tl.program_id(0)
        bh = pid // n_blocks
        b = bh // H
        h = bh % H
        offs_n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        n_ok = offs_n < N
        d_ok = offs_d < D
        dv_ok = offs_dv < DV

        q = tl.load(
            q_ptr + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        if DOT_FP32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running row max (log2 units)
        l_i = tl.zeros([BLOCK_N], tl.float32)  # running row sum of exp2
        acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            kt = tl.load(
                k_base + offs_m[None, :] * skm + offs_d[:, None] * skd,
                mask=m_ok[None, :] & d_ok[:, None],
                other=0.0,
            )  # (BLOCK_D, BLOCK_M): K^T, loaded transposed instead of transposing in registers
            v = tl.load(
                v_base + offs_m[:, None] * svm + offs_dv[None, :] * svd,
                mask=m_ok[:, None] & dv_ok[None, :],
                other=0.0,
            )  # (BLOCK_M, BLOCK_DV)
            if DOT_FP32:
                kt = kt.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M) fp32
            s = tl.where(m_ok[None, :], s, float("-inf"))
            # The first block always holds key 0, so m_new is finite from the first step on and
            # exp2(-inf - m_new) = 0 rescales the empty accumulator without NaNs.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)  # (BLOCK_N,)
            p = tl.exp2(s - m_new[:, None])  # (BLOCK_N, BLOCK_M)
            l_i = l_i * alpha + tl.sum(p, 1)
            # P in V's precision for the tensor-core dot (flash-attention's choice); fp32
            # accumulation keeps the sum over 68 keys exact enough.
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]  # (BLOCK_N, BLOCK_DV)
        tl.store(
            o_ptr + b * sob + h * soh + offs_n[:, None] * son + offs_dv[None, :] * sod,
            out.to(o_ptr.dtype.element_ty),
            mask=n_ok[:, None] & dv_ok[None, :],
        )


def _pow2_at_least_16(n: int) -> int:
    # tl.dot needs every block dimension to be a power of two and at least 16.
    return max(16, 1 << max(0, n - 1).bit_length())


def _interpreting(kernel: object) -> bool:
    # Under TRITON_INTERPRET=1 triton.jit returns an InterpretedFunction (checked on 3.6/3.7).
    return type(kernel).__name__ == "InterpretedFunction"


def landmark_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    *,
    block_n: int = 64,
    block_m: int | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The fused Triton kernel: same contract as ``landmark_attention_reference``.

    Any strides are accepted (the model passes a transposed view of q). Computes in fp32 and
    returns a contiguous (B, H, N, Dv) tensor in ``q.dtype``.

    Args:
        block_n: queries per program (a power of two, >= 16).
        block_m: keys per on-chip block; default the next power of two >= M (capped at 128),
            so that the 68 landmarks go through in one pass.
        out: optional (B, H, N, Dv) destination in ``q.dtype`` on q's device, any strides;
            written in place and returned (a pre-allocated buffer; tests pass a NaN-filled one).

    Raises:
        RuntimeError: Triton is not installed.
        ValueError/TypeError: inputs the kernel does not take (see the checks).
    """
    if triton is None:
        raise RuntimeError("landmark_attention_triton needs Triton: pip install 'talkstream[gpu]'")
    check_landmark_attention_inputs(q, k, v, scale)
    if q.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"landmark_attention_triton: dtype {q.dtype} is not one of float32, float16, bfloat16"
        )
    interpret = _interpreting(_landmark_attention_kernel)
    if q.device.type != "cuda" and not interpret:
        raise ValueError(
            f"landmark_attention_triton: tensors must be on a CUDA device, got {q.device} "
            "(CPU runs only under the Triton interpreter)"
        )
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[3]
    if max(d, dv) > _MAX_HEAD_DIM:
        raise ValueError(
            f"landmark_attention_triton: head dims {d}, {dv} exceed {_MAX_HEAD_DIM}; use the "
            "reference"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        # Offsets are computed in int32 inside the kernel.
        extent = sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride(), strict=True))
        if extent >= 2**31:
            raise ValueError(f"landmark_attention_triton: {name} spans more than 2^31 elements")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    bm = min(_pow2_at_least_16(m), 128) if block_m is None else block_m
    if bm < 16 or bm & (bm - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {bm}")

    if out is None:
        out = torch.empty((b, h, n, dv), dtype=q.dtype, device=q.device)  # (B, H, N, Dv)
    else:
        _check_out(out, (b, h, n, dv), q)
    if out.numel() == 0:
        return out
    n_blocks = triton.cdiv(n, block_n)
    grid = (n_blocks * b * h,)
    _landmark_attention_kernel[grid](
        q, k, v, out,
        float(scale) * _LOG2_E,
        h, n, m, d, dv, n_blocks,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        BLOCK_N=block_n,
        BLOCK_M=bm,
        BLOCK_D=_pow2_at_least_16(d),
        BLOCK_DV=_pow2_at_least_16(dv),
        # Triton 3.7's interpreter computes tl.dot on bf16 operands wrongly (numpy has no
        # bfloat16); there the operands go up to fp32. Compiled kernels keep the native dot.
        DOT_FP32=interpret and q.dtype == torch.bfloat16,
        # fp32 inputs: IEEE products, as torch's fp32 matmul (TF32 is off by default there).
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out


def _check_out(out: Tensor, shape: tuple[int, ...], like: Tensor) -> None:
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out must be {shape} {like.dtype} on {like.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )


def _use_triton(t: Tensor) -> bool:
    if t.device.type != "cuda" or t.dtype not in _KERNEL_DTYPES:
        return False
    if triton is None:
        _warn_no_triton_once()
        return False
    return True


_warned = False


def _warn_no_triton_once() -> None:
    # Not silent: a CUDA user without Triton runs the slower reference and is told so once.
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "Triton is not installed: talkstream kernels run their pure-torch references on "
            "CUDA. Install it with: pip install 'talkstream[gpu]'"
        )


@torch.library.custom_op("talkstream::landmark_attention", mutates_args=())
def landmark_attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The ``talkstream::landmark_attention`` custom op (same contract as the reference)."""
    # CUDA tensors in a kernel dtype run the fused Triton kernel; everything else (CPU, fp64
    # for gradcheck) runs the reference, which is the definition of the op.
    if _use_triton(q):
        return landmark_attention_triton(q, k, v, scale)
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
