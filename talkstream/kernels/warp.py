"""Implicit feature warping: sample reference features along a flow and blend them in by a mask.

``out = (1 - mask) * x + mask * bilinear_sample(ref, base_grid + flow)``

The flow is an offset in normalised [-1, 1] grid units (channel 0 = x, channel 1 = y), so one
flow value means the same displacement at every U-Net level. Sampling follows
``grid_sample(mode="bilinear", padding_mode="border", align_corners=False)``: the base grid sits at
pixel centres, so zero flow reproduces ``ref``. The fused Triton kernel does it in one pass over
memory: per pixel it reads the flow and the mask once, computes the four bilinear taps once, then
walks the channels reading x and the four reference taps and writing the blend; the sampling
grid and the warped reference never exist as tensors. This file holds:

- ``_warp_blend_kernel``: the ``@triton.jit`` kernel (defined when Triton is importable);
- ``warp_blend_triton``: its wrapper (checks shapes, strides and dtypes, allocates);
- ``warp_blend_reference``: the pure-torch reference (the definition of the op);
- ``warp_blend_op``: the ``talkstream::warp_blend`` custom op with fake and autograd
  registrations; it runs the Triton kernel on CUDA tensors when Triton is installed and the
  reference elsewhere;
- ``check_warp_blend_inputs``: the shape/dtype checks shared by every path.

Model code calls ``talkstream.kernels.warp_blend``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from talkstream.kernels.attention import (
    _check_out,
    _interpreting,
    _warn_no_triton_once,
    tl,
    triton,
)

__all__ = [
    "base_grid",
    "check_warp_blend_inputs",
    "warp_blend_op",
    "warp_blend_reference",
    "warp_blend_triton",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# aten::grid_sampler_2d enums: interpolation bilinear = 0; padding zeros 0, border 1, reflection 2.
_BILINEAR = 0
_BORDER = 1


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # A bf16 grid has 8 mantissa bits: at 256 px that rounds coordinates to whole pixels. Sample in
    # fp32 and round the blended result once.
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def base_grid(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The identity sampling grid at pixel centres (``align_corners=False``): (1, H, W, 2)."""
    xs = (torch.arange(width, dtype=dtype, device=device) * 2 + 1) / width - 1  # (W,)
    ys = (torch.arange(height, dtype=dtype, device=device) * 2 + 1) / height - 1  # (H,)
    gx = xs.view(1, width).expand(height, width)  # (H, W)
    gy = ys.view(height, 1).expand(height, width)  # (H, W)
    return torch.stack((gx, gy), dim=-1).unsqueeze(0)  # (1, H, W, 2)


def _sampling_grid(flow: Tensor) -> Tensor:
    _, _, h, w = flow.shape
    return base_grid(h, w, flow.dtype, flow.device) + flow.permute(0, 2, 3, 1)  # (B, H, W, 2)


def check_warp_blend_inputs(x: Tensor, ref: Tensor, flow: Tensor, mask: Tensor) -> None:
    """Raise ``ValueError``/``TypeError`` unless the four inputs have matching warp shapes."""
    for name, t in (("x", x), ("ref", ref), ("flow", flow), ("mask", mask)):
        if t.dim() != 4:
            raise ValueError(f"warp_blend: {name} must be 4-D (B, C, H, W), got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"warp_blend: {name} is {t.dtype}, expected x's dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"warp_blend: {name} is on {t.device}, expected x's device {x.device}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"warp_blend: inputs must be floating point, got {x.dtype}")
    b, c, h, w = x.shape
    expected = {"ref": (b, c, h, w), "flow": (b, 2, h, w), "mask": (b, 1, h, w)}
    for name, t in (("ref", ref), ("flow", flow), ("mask", mask)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(
                f"warp_blend: {name} has shape {tuple(t.shape)}, expected {expected[name]} "
                f"for x of shape {tuple(x.shape)}"
            )


def warp_blend_reference(x: Tensor, ref: Tensor, flow: Tensor, mask: Tensor) -> Tensor:
    """Blend ``ref`` warped by ``flow`` into ``x`` where ``mask`` is 1.

    Args:
        x: (B, C, H, W) current features.
        ref: (B, C, H, W) reference features to sample from.
        flow: (B, 2, H, W) offsets of the sampling grid in normalised units (x, y).
        mask: (B, 1, H, W) blend weight in [0, 1]; 1 takes the warped reference.

    Returns:
        (B, C, H, W) in ``x.dtype``.
    """
    cdt = _compute_dtype(x.dtype)
    xf, maskf = x.to(cdt), mask.to(cdt)
    grid = _sampling_grid(flow.to(cdt))  # (B, H, W, 2)
    warped = F.grid_sample(
        ref.to(cdt), grid, mode="bilinear", padding_mode="border", align_corners=False
    )  # (B, C, H, W)
    # (1 - m) * x + m * w rather than x + m * (w - x): mask 1 must give exactly the warped ref.
    return ((1 - maskf) * xf + maskf * warped).to(x.dtype)


# --- Triton kernel ------------------------------------------------------------------------------

if triton is not None:
    # H and W are used as floats below; Triton would otherwise turn a size of 1 into a
    # compile-time constant that has no .to().
    @triton.jit(do_not_specialize=["H", "W"])
    def _warp_blend_kernel(
        x_ptr, ref_ptr, flow_ptr, mask_ptr, out_ptr,
        C, H, W,
        sxb, sxc, sxh, sxw,
        srb, src, srh, srw,
        sfb, sfc, sfh, sfw,
        smb, smh, smw,
        sob, soc, soh, sow,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # Program (pixel block, batch): pixels are the fast axis so that loads of one channel row
        # are contiguous; channels are walked in blocks so the taps are computed once per pixel.
        b = tl.program_id(1)
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,) flat pixel
        p_ok = offs_p < H * W
        i = offs_p // W  # row
        j = offs_p % W  # column

        fx = tl.load(flow_ptr + b * sfb + i * sfh + j * sfw, mask=p_ok, other=0.0).to(tl.float32)
        fy = tl.load(flow_ptr + b * sfb + sfc + i * sfh + j * sfw, mask=p_ok, other=0.0)
        fy = fy.to(tl.float32)
        m = tl.load(mask_ptr + b * smb + i * smh + j * smw, mask=p_ok, other=0.0).to(tl.float32)

        # Same arithmetic as the reference: base grid at pixel centres plus flow, then
        # grid_sample's unnormalisation (align_corners=False) and border clamping.
        wf = W.to(tl.float32)
        hf = H.to(tl.float32)
        gx = (j * 2 + 1).to(tl.float32) / wf - 1.0 + fx
        gy = (i * 2 + 1).to(tl.float32) / hf - 1.0 + fy
        ix = tl.minimum(tl.maximum(((gx + 1.0) * wf - 1.0) * 0.5, 0.0), wf - 1.0)
        iy = tl.minimum(tl.maximum(((gy + 1.0) * hf - 1.0) * 0.5, 0.0), hf - 1.0)
        ix0f = tl.floor(ix)
        iy0f = tl.floor(iy)
        tx = ix - ix0f  # weight of the right column
        ty = iy - iy0f  # weight of the bottom row
        ix0 = ix0f.to(tl.int32)
        iy0 = iy0f.to(tl.int32)
        # At the last row/column the weight of the next one is exactly 0: clamp its index so the
        # load stays in bounds instead of masking it.
        ix1 = tl.minimum(ix0 + 1, W - 1)
        iy1 = tl.minimum(iy0 + 1, H - 1)
        w00 = (1.0 - tx) * (1.0 - ty)
        w01 = tx * (1.0 - ty)
        w10 = (1.0 - tx) * ty
        w11 = tx * ty
        t00 = iy0 * srh + ix0 * srw  # (BLOCK_P,) tap offsets inside one channel of ref
        t01 = iy0 * srh + ix1 * srw
        t10 = iy1 * srh + ix0 * srw
        t11 = iy1 * srh + ix1 * srw
        x_pix = i * sxh + j * sxw
        o_pix = i * soh + j * sow

        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            ok = (offs_c < C)[:, None] & p_ok[None, :]  # (BLOCK_C, BLOCK_P)
            r_base = ref_ptr + b * srb + offs_c[:, None] * src
            warped = tl.load(r_base + t00[None, :], mask=ok, other=0.0).to(tl.float32) * w00
            warped += tl.load(r_base + t01[None, :], mask=ok, other=0.0).to(tl.float32) * w01
            warped += tl.load(r_base + t10[None, :], mask=ok, other=0.0).to(tl.float32) * w10
            warped += tl.load(r_base + t11[None, :], mask=ok, other=0.0).to(tl.float32) * w11
            xv = tl.load(
                x_ptr + b * sxb + offs_c[:, None] * sxc + x_pix[None, :], mask=ok, other=0.0
            ).to(tl.float32)
            # (1 - m) x + m w, as the reference: mask 1 gives exactly the warped reference.
            blended = (1.0 - m[None, :]) * xv + m[None, :] * warped  # (BLOCK_C, BLOCK_P)
            tl.store(
                out_ptr + b * sob + offs_c[:, None] * soc + o_pix[None, :],
                blended.to(out_ptr.dtype.element_ty),
                mask=ok,
            )


def warp_blend_triton(
    x: Tensor,
    ref: Tensor,
    flow: Tensor,
    mask: Tensor,
    *,
    block_p: int = 128,
    block_c: int = 16,
    out: Tensor | None = None,
) -> Tensor:
    """The fused Triton kernel: same contract as ``warp_blend_reference``.

    Any strides are accepted, including a batch stride of 0 (the model passes a batch-1 reference
    expanded over the frames). Samples and blends in fp32; the output has ``x``'s dtype and
    memory layout (``torch.empty_like``, as the op's fake).

    Args:
        block_p: pixels per program (a power of two).
        block_c: channels per inner step (a power of two).
        out: optional (B, C, H, W) destination in ``x.dtype`` on x's device, any strides;
            written in place and returned (a pre-allocated buffer; tests pass a NaN-filled one).

    Raises:
        RuntimeError: Triton is not installed.
        ValueError/TypeError: inputs the kernel does not take (see the checks).
    """
    if triton is None:
        raise RuntimeError("warp_blend_triton needs Triton: pip install 'talkstream[gpu]'")
    check_warp_blend_inputs(x, ref, flow, mask)
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"warp_blend_triton: dtype {x.dtype} is not one of float32, float16, bfloat16"
        )
    if x.device.type != "cuda" and not _interpreting(_warp_blend_kernel):
        raise ValueError(
            f"warp_blend_triton: tensors must be on a CUDA device, got {x.device} "
            "(CPU runs only under the Triton interpreter)"
        )
    for name, v in (("block_p", block_p), ("block_c", block_c)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}")
    for name, t in (("x", x), ("ref", ref), ("flow", flow), ("mask", mask)):
        # Offsets are computed in int32 inside the kernel.
        extent = sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride(), strict=True))
        if extent >= 2**31:
            raise ValueError(f"warp_blend_triton: {name} spans more than 2^31 elements")
    b, c, h, w = x.shape
    if out is None:
        out = torch.empty_like(x)  # (B, C, H, W), x's layout: must match the op's fake
    else:
        _check_out(out, (b, c, h, w), x)
    if out.numel() == 0:
        return out
    sm = mask.stride()
    grid = (triton.cdiv(h * w, block_p), b)
    _warp_blend_kernel[grid](
        x, ref, flow, mask, out,
        c, h, w,
        *x.stride(), *ref.stride(), *flow.stride(),
        sm[0], sm[2], sm[3],
        *out.stride(),
        BLOCK_P=block_p,
        BLOCK_C=block_c,
    )  # fmt: skip
    return out


def _use_triton(t: Tensor) -> bool:
    if t.device.type != "cuda" or t.dtype not in _KERNEL_DTYPES:
        return False
    if triton is None:
        _warn_no_triton_once()
        return False
    return True


@torch.library.custom_op("talkstream::warp_blend", mutates_args=())
def warp_blend_op(x: Tensor, ref: Tensor, flow: Tensor, mask: Tensor) -> Tensor:
    """The ``talkstream::warp_blend`` custom op (same contract as the reference)."""
    # CUDA tensors in a kernel dtype run the fused Triton kernel; everything else (CPU, fp64
    # for gradcheck) runs the reference, which is the definition of the op.
    if _use_triton(x):
        return warp_blend_triton(x, ref, flow, mask)
    return warp_blend_reference(x, ref, flow, mask)


@warp_blend_op.register_fake
def _(x: Tensor, ref: Tensor, flow: Tensor, mask: Tensor) -> Tensor:
    return torch.empty_like(x)  # (B, C, H, W)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, ref, flow, mask = inputs
    # The warped reference is recomputed in backward rather than saved: one grid_sample is cheap
    # next to keeping a feature-map-sized tensor alive per level.
    ctx.save_for_backward(x, ref, flow, mask)


def _backward(
    ctx: Any, grad_out: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    x, ref, flow, mask = ctx.saved_tensors
    need_x, need_ref, need_flow, need_mask = ctx.needs_input_grad
    cdt = _compute_dtype(x.dtype)
    g, maskf, reff = grad_out.to(cdt), mask.to(cdt), ref.to(cdt)
    grid = _sampling_grid(flow.to(cdt))  # (B, H, W, 2)

    grad_x = grad_ref = grad_flow = grad_mask = None
    if need_x:
        grad_x = (g * (1 - maskf)).to(x.dtype)  # (B, C, H, W)
    if need_mask:
        warped = F.grid_sample(
            reff, grid, mode="bilinear", padding_mode="border", align_corners=False
        )  # (B, C, H, W)
        grad_mask = (g * (warped - x.to(cdt))).sum(1, keepdim=True).to(mask.dtype)  # (B, 1, H, W)
    if need_ref or need_flow:
        grad_ref_f, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            g * maskf, reff, grid, _BILINEAR, _BORDER, False, [need_ref, need_flow]
        )
        if need_ref:
            grad_ref = grad_ref_f.to(ref.dtype)  # (B, C, H, W)
        if need_flow:
            # The base grid is a constant, so d(grid)/d(flow) is the identity (up to layout).
            grad_flow = grad_grid.permute(0, 3, 1, 2).to(flow.dtype)  # (B, 2, H, W)
    return grad_x, grad_ref, grad_flow, grad_mask


warp_blend_op.register_autograd(_backward, setup_context=_setup_context)
