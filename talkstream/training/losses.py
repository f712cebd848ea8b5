"""Losses of the training stages.

Landmark losses are measured in pixels of the crop (normalised units times S/2), so their logged
values read directly as pixel errors. Image losses weight the mouth region more: it is a small
part of the crop, but the part that carries lip sync, and an unweighted loss is dominated by the
cheek and background pixels that the reference image already explains.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["image_loss", "motion_loss", "mouth_weight_map"]

# Lips: iBUG points 48-67.
_LIPS = slice(48, 68)


def motion_loss(
    pred: Tensor,  # (n * L, 37, 2) predicted displacement, normalised
    target: Tensor,  # (n * L, 37, 2)
    seq_len: int,
    crop_size: int,
    velocity_weight: float,
) -> dict[str, Tensor]:
    """L1 on positions plus L1 on frame-to-frame velocity, in crop pixels.

    The velocity term penalises jitter the position term tolerates: two predictions can each be
    0.3 px off, in opposite directions, and flicker.

    Returns:
        ``{"loss", "l1_px", "vel_px"}``.
    """
    scale = crop_size / 2.0
    l1 = (pred - target).abs().mean() * scale
    out = {"l1_px": l1}
    if seq_len > 1 and velocity_weight > 0:
        p = pred.reshape(-1, seq_len, *pred.shape[1:])  # (n, L, 37, 2)
        t = target.reshape(-1, seq_len, *target.shape[1:])
        vel = ((p[:, 1:] - p[:, :-1]) - (t[:, 1:] - t[:, :-1])).abs().mean() * scale
        out["vel_px"] = vel
        out["loss"] = l1 + velocity_weight * vel
    else:
        out["loss"] = l1
    return out


def mouth_weight_map(landmarks: Tensor, size: int, mouth_weight: float) -> Tensor | None:
    """Per-pixel loss weights: 1 + (w - 1) * a soft ellipse around the lips.

    The ellipse is centred on the lip points with radii of 0.9x the lips' extent plus 6% of the
    crop (covers lips, teeth and the chin's motion), a Gaussian profile so the weight has no
    edge. Computed from the (detached) landmarks of each sample.

    Args:
        landmarks: (B, 68, 2) normalised crop coordinates.
        size: S.
        mouth_weight: weight at the mouth centre; 1 or less disables (returns None).

    Returns:
        (B, 1, S, S) float32, or None.
    """
    if mouth_weight <= 1.0:
        return None
    lips = landmarks.detach()[:, _LIPS].float()  # (B, 20, 2)
    centre = lips.mean(dim=1)  # (B, 2)
    extent = lips.amax(dim=1) - lips.amin(dim=1)  # (B, 2)
    radius = 0.9 * extent + 0.12  # (B, 2) normalised units; 0.12 = 6% of the crop
    coords = (torch.arange(size, dtype=torch.float32, device=landmarks.device) + 0.5) / size * 2 - 1
    dx = (coords[None, :] - centre[:, 0:1]) / radius[:, 0:1]  # (B, S) along x
    dy = (coords[None, :] - centre[:, 1:2]) / radius[:, 1:2]  # (B, S) along y
    g = torch.exp(-(dy[:, :, None] ** 2 + dx[:, None, :] ** 2))  # (B, S, S)
    return (1.0 + (mouth_weight - 1.0) * g)[:, None]  # (B, 1, S, S)


def image_loss(
    pred: Tensor,  # (B, 3, S, S)
    target: Tensor,  # (B, 3, S, S)
    weight: Tensor | None,  # (B, 1, S, S) or None
    l1_weight: float = 0.0,
) -> dict[str, Tensor]:
    """Weighted MSE (+ weighted L1), each normalised by the weights' mean.

    Returns:
        ``{"loss", "mse", "l1"}`` (``l1`` only when ``l1_weight > 0``).
    """
    err = pred.float() - target.float()
    if weight is None:
        mse = err.pow(2).mean()
        l1 = err.abs().mean() if l1_weight > 0 else None
    else:
        # Weighted means: a larger mouth weight shifts emphasis, not the loss scale.
        norm = weight.mean()
        mse = (err.pow(2) * weight).mean() / norm
        l1 = (err.abs() * weight).mean() / norm if l1_weight > 0 else None
    out = {"mse": mse}
    if l1 is not None:
        out["l1"] = l1
        out["loss"] = mse + l1_weight * l1
    else:
        out["loss"] = mse
    return out
