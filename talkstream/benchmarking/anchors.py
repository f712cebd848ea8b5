"""Anchor baselines timed beside our model, on the same machine, in the same run.

Per-frame network work of each system, with random weights (timing does not need trained
ones; the architectures are public):

- **MuseTalk-equivalent** at 256x256: one step of diffusers' ``UNet2DConditionModel`` built
  from Stable Diffusion 1.5's published UNet configuration on a 32x32 latent, with MuseTalk's
  two changes to it (8 input channels: the masked-face latent and the reference latent; a
  384-wide cross-attention context: 50 tokens of whisper-tiny audio features), then the SD 1.5
  ``AutoencoderKL`` decoder from the 32x32x4 latent to a 256x256 image. The avatar's latents
  and the whisper features are precomputed in MuseTalk's real-time mode, so they are not timed.
- **Wav2Lip-equivalent** at 96x96: the whole generator (audio encoder, face encoder, decoder),
  see :mod:`talkstream.benchmarking.wav2lip`.
- **ours** at the same output sizes: AudioToMotion + the TalkFormer denoiser's sampling steps
  (the ``tiny`` architecture at 96, 128 and 256 px, and ``base`` at 256 px).

Paste-back, colour conversion and encoding are the same for every system and left out. The
ratio is anchor time / our time at the same output size: above 1 means ours is faster.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from talkstream.benchmarking.timing import summarize, time_callable
from talkstream.benchmarking.wav2lip import Wav2LipEquivalent, Wav2LipShapes
from talkstream.config import SamplerConfig
from talkstream.engine.denoiser import DenoiserConfig, TalkFormerDenoiser
from talkstream.engine.motion import AudioToMotion, MotionConfig
from talkstream.engine.runtime import torch_dtype
from talkstream.engine.sampler import FewStepSampler, NoiseSchedule
from talkstream.errors import MissingDependencyError

log = logging.getLogger(__name__)

# Stable Diffusion 1.5's UNet configuration as published with its weights (unet/config.json).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# MuseTalk's changes to it: masked + reference latents in, whisper-tiny features as context.
MUSETALK_UNET_OVERRIDES: dict[str, Any] = {"in_channels": 8, "cross_attention_dim": 384}
MUSETALK_AUDIO_TOKENS = 50  # whisper-tiny features per video frame (10 frames x 5 layers)
# Stable Diffusion 1.5's VAE configuration (vae/config.json).
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
SD15_VAE_SCALING = 0.18215
MUSETALK_LATENT = 32  # 256 px / the VAE's factor 8


@dataclasses.dataclass
class AnchorModel:
    """A per-frame function to time, with what it is."""

    name: str
    system: str  # "ours" or the anchor's name
    size: int  # output side, pixels
    params: int
    build_s: float
    fn: Callable[[], Any]


def build_musetalk_equivalent(device: torch.device, dtype: torch.dtype) -> AnchorModel:
    """UNet (SD 1.5 config + MuseTalk's input/context widths) + SD 1.5 VAE decoder."""
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
    except ModuleNotFoundError as e:
        raise MissingDependencyError("the MuseTalk-equivalent anchor", "diffusers", "bench") from e
    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet: Any = UNet2DConditionModel(**(SD15_UNET_CONFIG | MUSETALK_UNET_OVERRIDES))
    vae: Any = AutoencoderKL(**SD15_VAE_CONFIG)
    # .to(dtype) only when it changes something: diffusers warns on every dtype cast.
    unet = (unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)).eval()
    vae = (vae.to(device) if dtype == torch.float32 else vae.to(device, dtype)).eval()
    latent = torch.randn(1, 8, MUSETALK_LATENT, MUSETALK_LATENT, device=device, dtype=dtype)
    context = torch.randn(1, MUSETALK_AUDIO_TOKENS, 384, device=device, dtype=dtype)
    t = torch.zeros(1, device=device, dtype=torch.long)  # MuseTalk runs one step at t = 0
    build_s = time.perf_counter() - t0

    def step() -> torch.Tensor:
        out = unet(latent, t, encoder_hidden_states=context).sample  # (1, 4, 32, 32)
        image: torch.Tensor = vae.decode(out / SD15_VAE_SCALING).sample  # (1, 3, 256, 256)
        return image

    params = sum(p.numel() for p in unet.parameters()) + sum(
        p.numel() for p in vae.decoder.parameters()
    )
    return AnchorModel(
        "MuseTalk-equivalent (SD1.5 UNet + VAE decoder)", "MuseTalk", 256, params, build_s, step
    )


def build_wav2lip_equivalent(device: torch.device, dtype: torch.dtype) -> AnchorModel:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = Wav2LipEquivalent().to(device, dtype).eval()
    shapes = Wav2LipShapes(1)
    mel = torch.randn(shapes.mel, device=device, dtype=dtype)
    face = torch.randn(shapes.face, device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    return AnchorModel(
        "Wav2Lip-equivalent generator",
        "Wav2Lip",
        96,
        model.num_parameters(),
        build_s,
        lambda: model(mel, face),
    )


def build_ours(
    preset: str, size: int, steps: int, device: torch.device, dtype: torch.dtype
) -> AnchorModel:
    """AudioToMotion + ``steps`` denoiser calls of ``preset``'s architecture at ``size`` px."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    mcfg = MotionConfig.from_name(preset)
    motion = AudioToMotion(mcfg).to(device).eval()  # fp32, as the Engine keeps it
    dcfg = dataclasses.replace(DenoiserConfig.from_name(preset), image_size=size)
    denoiser = TalkFormerDenoiser(dcfg).to(device, dtype).eval()
    sampler = FewStepSampler(NoiseSchedule(SamplerConfig()), steps)
    windows = torch.randn(1, mcfg.window, mcfg.mel_rows, mcfg.n_mels, device=device) * 3 - 6
    neutral = (torch.rand(1, 68, 2, device=device) - 0.5) * 0.8
    noise = torch.randn(1, 3, size, size, device=device, dtype=dtype)
    with torch.inference_mode():
        ref = denoiser.encode_reference(torch.rand(1, 3, size, size, device=device, dtype=dtype))
    build_s = time.perf_counter() - t0

    def step() -> torch.Tensor:
        disp = motion(windows, neutral)  # (1, 37, 2)
        lm = motion.apply_displacement(neutral, disp).to(dtype)  # (1, 68, 2)
        return sampler.sample(denoiser, noise, landmarks=lm, ref=ref)  # (1, 3, S, S)

    params = sum(p.numel() for p in motion.parameters()) + denoiser.num_parameters()
    return AnchorModel(
        f"ours {preset} @{size}px ({steps} step)", "ours", size, params, build_s, step
    )


def _time(model: AnchorModel, iters: int, warmup: int, device: torch.device) -> dict[str, Any]:
    with torch.inference_mode():
        samples, first = time_callable(model.fn, iters=iters, warmup=warmup, device=device)
    return {
        "name": model.name,
        "system": model.system,
        "size": model.size,
        "params_m": round(model.params / 1e6, 2),
        "build_s": round(model.build_s, 3),
        "first_call_ms": round(first * 1e3, 3),
        "status": "ok",
        "time": summarize(samples).to_dict(),
    }


def run_anchors(
    *,
    device: str,
    dtype: str,
    steps: int,
    iters: int,
    warmup: int = 1,
    include_musetalk: bool = True,
) -> dict[str, Any]:
    """Time ours and the anchors at matching output sizes; JSON-ready, with ratios."""
    dev = torch.device(device)
    dt = torch_dtype(dtype)
    entries: list[dict[str, Any]] = []
    builders: list[tuple[str, Callable[[], AnchorModel]]] = [
        ("ours tiny @96", lambda: build_ours("tiny", 96, steps, dev, dt)),
        ("Wav2Lip-equivalent", lambda: build_wav2lip_equivalent(dev, dt)),
        ("ours tiny @128", lambda: build_ours("tiny", 128, steps, dev, dt)),
        ("ours tiny @256", lambda: build_ours("tiny", 256, steps, dev, dt)),
        ("ours base @256", lambda: build_ours("base", 256, steps, dev, dt)),
    ]
    if include_musetalk:
        builders.append(("MuseTalk-equivalent", lambda: build_musetalk_equivalent(dev, dt)))
    for label, build in builders:
        try:
            model = build()
        except MissingDependencyError as e:
            log.warning("anchor %s skipped: %s", label, e)
            entries.append({"name": label, "status": "skipped", "reason": str(e)})
            continue
        log.info("timing %s (%d iterations)", model.name, iters)
        entries.append(_time(model, iters, warmup, dev))
        # The MuseTalk-equivalent holds ~3.5 GB in fp32: free each model before the next.
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    by_name = {e["name"]: e for e in entries if e.get("status") == "ok"}

    def p50(prefix: str) -> tuple[str, float] | None:
        for name, e in by_name.items():
            if name.startswith(prefix):
                return name, float(e["time"]["p50"])
        return None

    ratios = []
    for anchor, ours, size in (
        ("Wav2Lip", "ours tiny @96", 96),
        ("MuseTalk", "ours tiny @256", 256),
        ("MuseTalk", "ours base @256", 256),
    ):
        a, o = p50(anchor), p50(ours)
        if a and o:
            ratios.append(
                {
                    "size": size,
                    "anchor": a[0],
                    "ours": o[0],
                    "anchor_p50_ms": a[1],
                    "ours_p50_ms": o[1],
                    "ratio": a[1] / o[1],
                }
            )
    return {
        "device": device,
        "dtype": dtype,
        "steps": steps,
        "iters": iters,
        "warmup": warmup,
        "entries": entries,
        "ratios": ratios,
    }
