"""TalkFormer: the landmark-conditioned diffusion denoiser (x0-prediction).

Following Zhong et al. 2024 (arXiv 2408.05416), a U-Net renders the face crop conditioned on
68 target landmarks and a reference photo of the avatar:

- Pixel space with a pixel-unshuffle stem: a 128x128x3 crop becomes 32x32x48 before the first
  conv and a pixel-shuffle head undoes it, so there is no VAE to train or run and the U-Net works
  at low resolution. The noisy image and the reference image are concatenated at the input.
- Landmark tokens: each landmark is one token (Fourier features of its coordinates through a
  Linear layer, plus a learned embedding of the point's identity), so the coordinates stay
  differentiable and the audio-to-motion model can be trained through the renderer.
- TalkFormer cross-attention: at the attention levels, image tokens attend to the landmark tokens
  (pre-norm, timestep scale/shift, multi-head, via ``kernels.landmark_attention``).
- Implicit feature warping: at every level a small conv head predicts a flow (tanh-bounded) and a
  blend mask (sigmoid) from the current features and the reference features of that level; the
  reference features are warped and blended in by ``kernels.warp_blend``.

The reference photo is encoded once per avatar (``encode_reference``) and the result is reused
every frame; ``forward`` never recomputes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from talkstream import _config_io
from talkstream.kernels import landmark_attention, warp_blend

__all__ = [
    "PRESETS",
    "DenoiserConfig",
    "FeatureWarp",
    "LandmarkCrossAttention",
    "LandmarkTokens",
    "ReferenceFeatures",
    "TalkFormerDenoiser",
    "TalkFormerStage",
]


@dataclass(frozen=True)
class DenoiserConfig:
    """Architecture of the TalkFormer denoiser. Defaults are the ``tiny`` preset."""

    image_size: int = 128  # side of the square face crop, pixels
    patch: int = 4  # pixel-unshuffle factor of the stem (and pixel-shuffle of the head)
    image_channels: int = 3
    widths: tuple[int, ...] = (32, 64, 128)  # channels per U-Net level, finest first
    blocks: tuple[int, ...] = (1, 1, 2)  # residual (+ attention) blocks per level and path
    attn_levels: tuple[int, ...] = (1, 2)  # levels whose blocks cross-attend to landmarks
    heads: int = 4
    token_dim: int = 64  # landmark token width
    n_fourier_freqs: int = 6  # frequencies 2^k * pi, k < n: finest period = 2^(2-n) crop units
    n_landmarks: int = 68
    time_dim: int = 64  # timestep embedding width
    flow_hidden: int = 16  # hidden channels of each level's flow/mask head
    flow_limit: float = 0.25  # largest flow, normalised units (0.25 = 1/8 of the crop)
    norm_groups: int = 8
    ref_blocks: int = 1  # residual blocks per level of the reference encoder (runs once)
    # Pixel-space warp of the reference photo as the output's base: the head predicts a flow,
    # a blend mask and the generated image; the output is the warped photo where the mask is
    # 1 and the generated pixels elsewhere (the mouth interior). Identity comes from the photo.
    pixel_warp: bool = True
    pixel_flow_limit: float = 0.3  # largest pixel flow, normalised units

    def __post_init__(self) -> None:
        levels = len(self.widths)
        if levels < 1 or len(self.blocks) != levels:
            raise ValueError(
                f"widths {self.widths} and blocks {self.blocks} must be non-empty and equally long"
            )
        if any(b < 1 for b in self.blocks):
            raise ValueError(f"every level needs at least one block, got blocks={self.blocks}")
        if any(not 0 <= lvl < levels for lvl in self.attn_levels):
            raise ValueError(f"attn_levels {self.attn_levels} must lie in 0..{levels - 1}")
        stride = self.patch * 2 ** (levels - 1)
        if self.image_size % stride:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by patch * 2^(levels - 1) = "
                f"{stride}"
            )
        for w in self.widths:
            if w % self.norm_groups:
                raise ValueError(f"width {w} is not divisible by norm_groups={self.norm_groups}")
        for lvl in self.attn_levels:
            if self.widths[lvl] % self.heads:
                raise ValueError(
                    f"width {self.widths[lvl]} of attention level {lvl} is not divisible by "
                    f"heads={self.heads}"
                )
        if self.time_dim % 2:
            raise ValueError(f"time_dim must be even, got {self.time_dim}")

    @classmethod
    def from_name(cls, name: str) -> DenoiserConfig:
        """The named preset (see ``PRESETS``)."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(
                f"unknown denoiser preset {name!r}; expected one of {', '.join(sorted(PRESETS))}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists) for checkpoint configs."""
        return _config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DenoiserConfig:
        """Inverse of ``to_dict``. Unknown keys or wrong types raise ``ValueError``; missing
        keys take defaults."""
        # Checkpoints written before the pixel warp existed have no such head.
        return _config_io.from_dict(cls, {"pixel_warp": False, **data})


PRESETS: dict[str, DenoiserConfig] = {
    # CPU real time at 128x128: 32x32 -> 16x16 -> 8x8 after the 4x pixel-unshuffle stem.
    "tiny": DenoiserConfig(),
    # GPU at 256x256: 64x64 -> 32x32 -> 16x16; attention at the two lowest levels.
    "base": DenoiserConfig(
        image_size=256,
        patch=4,
        widths=(128, 256, 384),
        blocks=(2, 2, 2),
        attn_levels=(1, 2),
        heads=8,
        token_dim=256,
        n_fourier_freqs=7,
        time_dim=256,
        flow_hidden=64,
        norm_groups=32,
        ref_blocks=2,
    ),
}


class ReferenceFeatures(NamedTuple):
    """What the denoiser needs from the reference photo; computed once per avatar.

    A NamedTuple so that it is a pytree: ``torch.compile`` and ``torch.export`` see its tensors.
    The batch of every tensor is 1 (shared by all frames of the call) or the frame batch B.
    """

    patches: Tensor  # (Br, 3 * p^2, S / p, S / p): the pixel-unshuffled reference image
    levels: tuple[Tensor, ...]  # per level l: (Br, widths[l], S / p / 2^l, S / p / 2^l)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), in float32."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10_000.0) / half)
    )  # (dim / 2,)
    args = t.float()[:, None] * freqs[None, :]  # (B, dim / 2)
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)  # (B, dim)


class LandmarkTokens(nn.Module):
    """Landmarks (B, K, 2) in normalised [-1, 1] crop coordinates -> tokens (B, K, d).

    Each token is ``Linear(fourier(xy)) + point_embedding[k]``: the Fourier features make small
    coordinate changes visible to attention, the point embedding tells the network which landmark
    (lip corner, jaw) a token is. Everything is differentiable in the coordinates.
    """

    octaves: Tensor  # (F,) buffer: 2^k

    def __init__(self, n_landmarks: int, dim: int, n_freqs: int) -> None:
        super().__init__()
        self.n_landmarks = n_landmarks
        # Powers of two are exact in every float dtype, so the frequencies survive a cast of the
        # model to bf16; pi is applied in fp32 in forward.
        self.register_buffer(
            "octaves", 2.0 ** torch.arange(n_freqs, dtype=torch.float32), persistent=False
        )  # (F,)
        self.proj = nn.Linear(2 + 4 * n_freqs, dim)
        self.point_embedding = nn.Parameter(torch.randn(n_landmarks, dim) * 0.02)  # (K, d)

    def forward(self, landmarks: Tensor) -> Tensor:
        xy = landmarks.float()  # (B, K, 2); fp32: sin(2^k pi x) in bf16 would be noise
        args = xy[..., None] * (self.octaves.float() * math.pi)  # (B, K, 2, F)
        feats = torch.cat(
            (xy, torch.sin(args).flatten(2), torch.cos(args).flatten(2)), dim=-1
        )  # (B, K, 2 + 4F)
        tokens = self.proj(feats.to(self.proj.weight.dtype))  # (B, K, d)
        return tokens + self.point_embedding  # (B, K, d)


class ResBlock(nn.Module):
    """Two GroupNorm-SiLU-conv steps; the timestep embedding scales/shifts the second norm."""

    def __init__(self, cin: int, cout: int, groups: int, time_dim: int | None) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.time_mod = nn.Linear(time_dim, 2 * cout) if time_dim is not None else None
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        # Each block starts as the identity: deep residual stacks train stably from step one.
        _zero_init(self.conv2)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, H, W)
        h = self.norm2(h)
        if self.time_mod is not None:
            assert temb is not None
            scale, shift = self.time_mod(temb)[:, :, None, None].chunk(2, dim=1)  # (B, cout, 1, 1)
            h = h * (1 + scale) + shift
        h = self.conv2(F.silu(h))  # (B, cout, H, W)
        return self.skip(x) + h


class LandmarkCrossAttention(nn.Module):
    """TalkFormer cross-attention: image tokens attend to the landmark tokens."""

    def __init__(self, channels: int, heads: int, token_dim: int, time_dim: int, groups: int):
        super().__init__()
        self.heads = heads
        self.head_dim = channels // heads
        self.norm = nn.GroupNorm(groups, channels)
        self.time_mod = nn.Linear(time_dim, 2 * channels)
        # 1x1 convs act on every pixel-token without a (B, C, H, W) <-> (B, N, C) transpose.
        self.to_q = nn.Conv2d(channels, channels, 1)
        self.context_norm = nn.LayerNorm(token_dim)
        self.to_kv = nn.Linear(token_dim, 2 * channels)
        # Not zero-initialised: landmark gradients must flow from the first training step.
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, tokens: Tensor, temb: Tensor) -> Tensor:
        b, c, h, w = x.shape
        m = tokens.shape[1]
        scale, shift = self.time_mod(temb)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1)
        hx = self.norm(x) * (1 + scale) + shift  # (B, C, H, W)
        q = self.to_q(hx).view(b, self.heads, self.head_dim, h * w)  # (B, nh, dh, N)
        q = q.transpose(-1, -2)  # (B, nh, N, dh)
        kv = self.to_kv(self.context_norm(tokens))  # (B, M, 2C)
        k, v = kv.view(b, m, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, nh, M, dh)
        out = landmark_attention(q, k, v, self.head_dim**-0.5)  # (B, nh, N, dh)
        out = out.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj(out)


class FeatureWarp(nn.Module):
    """Implicit feature warping of one level: predict flow + mask, warp the reference, blend."""

    def __init__(self, channels: int, hidden: int, flow_limit: float) -> None:
        super().__init__()
        self.flow_limit = flow_limit
        self.head = nn.Sequential(
            nn.Conv2d(2 * channels, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, 3, 3, padding=1),
        )
        # Zero flow at init (the reference is sampled in place) and mask sigmoid(0) = 0.5.
        _zero_init(self.head[-1])

    def forward(self, x: Tensor, ref: Tensor) -> Tensor:
        # The current features already carry the target landmarks (cross-attention above), so
        # comparing them with the reference features says where each reference feature must move.
        raw = self.head(torch.cat((x, ref), dim=1))  # (B, 3, H, W)
        flow = torch.tanh(raw[:, :2]) * self.flow_limit  # (B, 2, H, W), normalised units
        mask = torch.sigmoid(raw[:, 2:])  # (B, 1, H, W)
        return warp_blend(x, ref, flow, mask)


class TalkFormerStage(nn.Module):
    """One U-Net level: residual blocks, each followed by cross-attention at attention levels."""

    def __init__(self, cfg: DenoiserConfig, lvl: int, cin: int) -> None:
        super().__init__()
        width, n = cfg.widths[lvl], cfg.blocks[lvl]
        groups, tdim = cfg.norm_groups, cfg.time_dim
        self.blocks = nn.ModuleList(
            ResBlock(cin if i == 0 else width, width, groups, tdim) for i in range(n)
        )
        self.attns = nn.ModuleList(
            LandmarkCrossAttention(width, cfg.heads, cfg.token_dim, tdim, groups)
            for _ in range(n if lvl in cfg.attn_levels else 0)
        )

    def forward(self, h: Tensor, tokens: Tensor, temb: Tensor) -> Tensor:
        for i, block in enumerate(self.blocks):
            h = block(h, temb)  # (B, width, H, W)
            if len(self.attns):
                h = self.attns[i](h, tokens, temb)  # (B, width, H, W)
        return h


class TalkFormerDenoiser(nn.Module):
    """The landmark-conditioned denoiser: ``forward(x_t, t, landmarks, ref) -> x0``.

    Args of ``forward``:
        x_t: (B, 3, S, S) noisy image in [-1, 1] units.
        t: (B,) integer timesteps.
        landmarks: (B, 68, 2) target landmarks in normalised [-1, 1] crop coordinates.
        ref: ``ReferenceFeatures`` from ``encode_reference`` (batch 1 or B).
    """

    def __init__(self, cfg: DenoiserConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p2c = cfg.image_channels * cfg.patch**2
        w0 = cfg.widths[0]
        groups, tdim = cfg.norm_groups, cfg.time_dim
        n_levels = len(cfg.widths)

        self.time_mlp = nn.Sequential(nn.Linear(tdim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.landmark_tokens = LandmarkTokens(cfg.n_landmarks, cfg.token_dim, cfg.n_fourier_freqs)

        # Reference encoder: runs once per avatar, so it may be heavier than the per-frame path.
        self.ref_stem = nn.Conv2d(p2c, w0, 3, padding=1)
        self.ref_levels = nn.ModuleList()
        self.ref_downs = nn.ModuleList()
        for lvl, width in enumerate(cfg.widths):
            self.ref_levels.append(
                nn.Sequential(
                    *[ResBlock(width, width, groups, None) for _ in range(cfg.ref_blocks)]
                )
            )
            if lvl + 1 < n_levels:
                self.ref_downs.append(_downsample(width, cfg.widths[lvl + 1]))

        # Per-frame U-Net. Input: noisy image and reference image, both pixel-unshuffled.
        self.stem = nn.Conv2d(2 * p2c, w0, 3, padding=1)
        self.enc_stages = nn.ModuleList()
        self.warps = nn.ModuleList()
        self.downs = nn.ModuleList()
        for lvl, width in enumerate(cfg.widths):
            self.enc_stages.append(TalkFormerStage(cfg, lvl, width))
            self.warps.append(FeatureWarp(width, cfg.flow_hidden, cfg.flow_limit))
            if lvl + 1 < n_levels:
                self.downs.append(_downsample(width, cfg.widths[lvl + 1]))

        # Decoder over levels n-2 .. 0 (the lowest level's encoder stage is the bottleneck); each
        # stage takes the upsampled features concatenated with the encoder's skip.
        self.ups = nn.ModuleList()
        self.dec_stages = nn.ModuleList()
        for lvl in reversed(range(n_levels - 1)):
            width = cfg.widths[lvl]
            self.ups.append(_upsample(cfg.widths[lvl + 1], width))
            self.dec_stages.append(TalkFormerStage(cfg, lvl, 2 * width))

        self.out_norm = nn.GroupNorm(groups, w0)
        self.out_conv = nn.Conv2d(w0, p2c, 3, padding=1)
        if cfg.pixel_warp:
            # Flow (2) and blend-mask logit (1) at S/p, upsampled bilinearly to S: a smooth
            # field, so the warped photo has no patch grid. Zero flow and a mask of
            # sigmoid(3) = 0.95 at init: training starts from "copy the photo".
            self.pixel_head = nn.Conv2d(w0, 3, 3, padding=1)
            nn.init.zeros_(self.pixel_head.weight)
            assert self.pixel_head.bias is not None
            with torch.no_grad():
                self.pixel_head.bias.copy_(torch.tensor([0.0, 0.0, 3.0]))

    def encode_reference(self, ref_image: Tensor) -> ReferenceFeatures:
        """Encode the avatar's reference crop (B, 3, S, S) in [-1, 1] (once per avatar)."""
        self._check_image("ref_image", ref_image)
        patches = F.pixel_unshuffle(ref_image, self.cfg.patch)  # (B, 3p^2, S/p, S/p)
        h = self.ref_stem(patches)  # (B, w0, S/p, S/p)
        levels: list[Tensor] = []
        for lvl, blocks in enumerate(self.ref_levels):
            h = blocks(h)  # (B, w_l, S/p/2^l, S/p/2^l)
            levels.append(h)
            if lvl < len(self.ref_downs):
                h = self.ref_downs[lvl](h)
        return ReferenceFeatures(patches=patches, levels=tuple(levels))

    def forward(self, x_t: Tensor, t: Tensor, landmarks: Tensor, ref: ReferenceFeatures) -> Tensor:
        cfg = self.cfg
        self._check_inputs(x_t, t, landmarks, ref)
        b = x_t.shape[0]
        temb = F.silu(self.time_mlp(timestep_embedding(t, cfg.time_dim).to(x_t.dtype)))  # (B, T)
        tokens = self.landmark_tokens(landmarks)  # (B, 68, d)
        # Batch-1 reference features broadcast over the frames of one avatar (expand: no copy).
        ref_levels = [r.expand(b, -1, -1, -1) for r in ref.levels]

        x = F.pixel_unshuffle(x_t, cfg.patch)  # (B, 3p^2, S/p, S/p)
        h = self.stem(torch.cat((x, ref.patches.expand(b, -1, -1, -1)), dim=1))  # (B, w0, S/p, S/p)
        skips: list[Tensor] = []
        for lvl in range(len(cfg.widths)):
            h = self.enc_stages[lvl](h, tokens, temb)  # (B, w_l, H_l, W_l)
            h = self.warps[lvl](h, ref_levels[lvl])  # (B, w_l, H_l, W_l)
            skips.append(h)
            if lvl < len(self.downs):
                h = self.downs[lvl](h)  # (B, w_{l+1}, H_l / 2, W_l / 2)

        for i, lvl in enumerate(reversed(range(len(cfg.widths) - 1))):
            h = self.ups[i](h)  # (B, w_l, H_l, W_l)
            h = torch.cat((h, skips[lvl]), dim=1)  # (B, 2 w_l, H_l, W_l)
            h = self.dec_stages[i](h, tokens, temb)  # (B, w_l, H_l, W_l)

        h = F.silu(self.out_norm(h))  # (B, w0, S/p, S/p)
        gen = F.pixel_shuffle(self.out_conv(h), cfg.patch)  # (B, 3, S, S)
        if not cfg.pixel_warp:
            return gen
        raw = F.interpolate(
            self.pixel_head(h), scale_factor=float(cfg.patch), mode="bilinear", align_corners=False
        )  # (B, 3, S, S)
        flow = torch.tanh(raw[:, :2]) * cfg.pixel_flow_limit  # (B, 2, S, S)
        mask = torch.sigmoid(raw[:, 2:])  # (B, 1, S, S)
        photo = F.pixel_shuffle(ref.patches, cfg.patch).expand(b, -1, -1, -1)  # (B, 3, S, S)
        return warp_blend(gen, photo, flow, mask)  # (B, 3, S, S)

    def _check_image(self, name: str, img: Tensor) -> None:
        s, c = self.cfg.image_size, self.cfg.image_channels
        if img.dim() != 4 or tuple(img.shape[1:]) != (c, s, s):
            raise ValueError(f"{name} must have shape (B, {c}, {s}, {s}), got {tuple(img.shape)}")

    def _check_inputs(
        self, x_t: Tensor, t: Tensor, landmarks: Tensor, ref: ReferenceFeatures
    ) -> None:
        # Shape checks only: static under tracing and free of host syncs.
        self._check_image("x_t", x_t)
        b, k = x_t.shape[0], self.cfg.n_landmarks
        if tuple(t.shape) != (b,):
            raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
        if tuple(landmarks.shape) != (b, k, 2):
            raise ValueError(
                f"landmarks must have shape ({b}, {k}, 2), got {tuple(landmarks.shape)}"
            )
        if len(ref.levels) != len(self.cfg.widths):
            raise ValueError(
                f"ref has {len(ref.levels)} levels, expected {len(self.cfg.widths)}: "
                "pass the output of encode_reference of this model"
            )
        for r in (ref.patches, *ref.levels):
            if r.shape[0] not in (1, b):
                raise ValueError(f"reference batch {r.shape[0]} must be 1 or the frame batch {b}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _zero_init(conv: nn.Module) -> None:
    assert isinstance(conv, nn.Conv2d) and conv.bias is not None
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)


def _downsample(cin: int, cout: int) -> nn.Module:
    return nn.Conv2d(cin, cout, 3, stride=2, padding=1)


def _upsample(cin: int, cout: int) -> nn.Module:
    # A 1x1 conv to 4x channels then pixel shuffle (a stride-2 2x2 transposed conv): the conv runs
    # at the low resolution, a quarter of the cost of nearest-upsample + conv.
    return nn.Sequential(nn.Conv2d(cin, 4 * cout, 1), nn.PixelShuffle(2))
