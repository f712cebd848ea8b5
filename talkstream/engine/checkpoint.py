"""Checkpoints: safetensors weights plus a JSON config with a format version.

A checkpoint is a directory::

    config.json        {"format": "talkstream.checkpoint", "format_version": 1, "preset": ...,
                        "motion": {...}, "denoiser": {...}, "audio": {...}, "sampler": {...},
                        "weights_sha256": "...", "meta": {...}}
    model.safetensors  tensors named "motion.<param>" and "denoiser.<param>"

Nothing is ever unpickled. Every way a checkpoint can be wrong (missing file, corrupt JSON or
weights, a newer format, missing or unexpected tensors, shapes that do not match the config)
raises ``CheckpointError`` with a message that says which and where.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from talkstream import _config_io
from talkstream.config import AudioConfig, SamplerConfig
from talkstream.engine.denoiser import DenoiserConfig, TalkFormerDenoiser
from talkstream.engine.motion import AudioToMotion, MotionConfig
from talkstream.errors import CheckpointError

FORMAT = "talkstream.checkpoint"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class Models:
    """Both networks and the configs they were trained with."""

    motion: AudioToMotion
    denoiser: TalkFormerDenoiser
    audio: AudioConfig
    sampler: SamplerConfig
    preset: str
    meta: dict[str, Any]

    @classmethod
    def random_init(
        cls,
        preset: str,
        audio: AudioConfig | None = None,
        sampler: SamplerConfig | None = None,
        seed: int = 0,
    ) -> Models:
        """Randomly initialised networks of a preset (until a trained checkpoint exists)."""
        torch.manual_seed(seed)
        return cls(
            motion=AudioToMotion(MotionConfig.from_name(preset)),
            denoiser=TalkFormerDenoiser(DenoiserConfig.from_name(preset)),
            audio=audio or AudioConfig(),
            sampler=sampler or SamplerConfig(),
            preset=preset,
            meta={"random_init": True, "seed": seed},
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _section(cls: Any, config: dict[str, Any], what: str, path: Path) -> Any:
    """The checkpoint config's section ``what`` as ``cls`` (the generic loader's checks)."""
    try:
        return _config_io.from_dict(cls, config[what], what)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: bad '{what}' config: {e}") from None


def save_checkpoint(path: str | Path, models: Models) -> Path:
    """Write ``models`` to the directory ``path`` (created if needed); atomic per file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, net in (("motion", models.motion), ("denoiser", models.denoiser)):
        for name, t in net.state_dict().items():
            tensors[f"{prefix}.{name}"] = t.detach().to("cpu").contiguous()
    # Write to temp files then rename, so a kill mid-save never leaves a half checkpoint.
    fd, tmp_w = tempfile.mkstemp(dir=path, suffix=".safetensors.tmp")
    os.close(fd)
    save_file(tensors, tmp_w, metadata={"format": FORMAT})
    digest = _sha256(Path(tmp_w))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "preset": models.preset,
        "motion": models.motion.cfg.to_dict(),
        "denoiser": models.denoiser.cfg.to_dict(),
        "audio": asdict(models.audio),
        "sampler": asdict(models.sampler),
        "weights_sha256": digest,
        "meta": models.meta,
    }
    fd, tmp_c = tempfile.mkstemp(dir=path, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp_w, path / WEIGHTS_NAME)
    os.replace(tmp_c, path / CONFIG_NAME)
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """The validated JSON config of the checkpoint at ``path``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a file; a checkpoint is a directory holding "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    cpath = path / CONFIG_NAME
    try:
        config = json.loads(cpath.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {CONFIG_NAME}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cpath} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{cpath} is not a talkstream checkpoint config (format={FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{cpath}: missing or invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{cpath} has format_version {version}, newer than this talkstream supports "
            f"({FORMAT_VERSION}); upgrade talkstream"
        )
    for key in ("preset", "motion", "denoiser", "audio", "sampler", "weights_sha256"):
        if key not in config:
            raise CheckpointError(f"{cpath}: missing key {key!r}")
    return config


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Models:
    """Load and validate a checkpoint directory; the networks are returned in eval mode."""
    path = Path(path)
    config = read_config(path)
    try:
        motion_cfg = MotionConfig.from_dict(config["motion"])
        denoiser_cfg = DenoiserConfig.from_dict(config["denoiser"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: bad network config: {e}") from None
    audio = _section(AudioConfig, config, "audio", path)
    sampler = _section(SamplerConfig, config, "sampler", path)

    wpath = path / WEIGHTS_NAME
    if not wpath.is_file():
        raise CheckpointError(f"checkpoint {path} has no {WEIGHTS_NAME}")
    digest = _sha256(wpath)
    if digest != config["weights_sha256"]:
        raise CheckpointError(
            f"{wpath} is corrupt or was replaced: its sha256 {digest[:12]}... does not match "
            f"the config's {str(config['weights_sha256'])[:12]}..."
        )
    try:
        tensors = load_file(str(wpath), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wpath} is not a readable safetensors file: {e}") from None

    motion = AudioToMotion(motion_cfg)
    denoiser = TalkFormerDenoiser(denoiser_cfg)
    for prefix, net in (("motion", motion), ("denoiser", denoiser)):
        _load_into(net, prefix, tensors, wpath)
    unused = sorted(k for k in tensors if k.split(".", 1)[0] not in ("motion", "denoiser"))
    if unused:
        raise CheckpointError(f"{wpath}: unexpected tensors {unused[:5]}")
    motion.to(device).eval()
    denoiser.to(device).eval()
    return Models(
        motion=motion,
        denoiser=denoiser,
        audio=audio,
        sampler=sampler,
        preset=str(config["preset"]),
        meta=dict(config.get("meta") or {}),
    )


def _load_into(
    net: torch.nn.Module, prefix: str, tensors: dict[str, torch.Tensor], wpath: Path
) -> None:
    expected = net.state_dict()
    given = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{wpath}: weights do not match the {prefix} config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [
        f"{k}: weights {tuple(given[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(given[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise CheckpointError(
            f"{wpath}: weights do not match the {prefix} config: {'; '.join(bad[:3])}"
        )
    net.load_state_dict(given, strict=True)
