"""Implicit feature warping: sample reference features along a flow and blend them in by a mask.

``out = (1 - mask) * x + mask * bilinear_sample(ref, base_grid + flow)``

The flow is an offset in normalised [-1, 1] grid units (channel 0 = x, channel 1 = y), so one
flow value means the same displacement at every U-Net level. Sampling follows
``grid_sample(mode="bilinear", padding_mode="border", align_corners=False)``: the base grid sits at
pixel centres, so zero flow reproduces ``ref``. A fused kernel (sample + blend in one pass, no
grid tensor in memory) arrives in a later change. This file holds:

- ``warp_blend_reference``: the pure-torch reference (the definition of the op);
- ``warp_blend_op``: the ``talkstream::warp_blend`` custom op with fake and autograd
  registrations;
- ``check_warp_blend_inputs``: the shape/dtype checks shared by every path.

Model code calls ``talkstream.kernels.warp_blend``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["base_grid", "check_warp_blend_inputs", "warp_blend_op", "warp_blend_reference"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
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


@torch.library.custom_op("talkstream::warp_blend", mutates_args=())
def warp_blend_op(x: Tensor, ref: Tensor, flow: Tensor, mask: Tensor) -> Tensor:
    """The ``talkstream::warp_blend`` custom op (same contract as the reference)."""
    # --- Accelerated implementations are dispatched here. ---------------------------------
    # The fused Triton kernel for CUDA tensors will be selected at this point (by x.device.type);
    # until it exists every device runs the reference.
    # ------------------------------------------------------------------------------------------
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
