"""The runtime protocol: what the engine calls to run its per-frame networks.

The engine owns this protocol and ``talkstream.export`` implements it (one backend per module);
the composition root ``talkstream.runtime.load_engine`` picks and loads a backend and hands the
result to ``Engine``. So the engine never imports ``export``, and the imports run one way.

- ``LoadedModels``: the per-frame networks of one backend, behind the eager call signatures:
  ``motion(windows, neutral, lookahead)`` is ``AudioToMotion.forward``,
  ``denoiser(x_t, t, landmarks, ref)`` is ``TalkFormerDenoiser.forward`` and
  ``sample(sampler, noise, landmarks, ref)`` is the sampler's few-step loop (which a backend may
  run as one graph); ``describe()`` and ``close()``.
- ``LoadOptions``: what a backend needs to load (device, dtype, cache, threads, what to
  pre-build, batch limit, precision); ``LoadOptions.from_config`` is the one place the engine's
  config turns into load options, so every backend gets the same ``max_batch`` and precision.
- ``DTYPES``: the dtype names of the config and the CLI, and their torch dtypes (the one table).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from talkstream.config import EngineConfig
from talkstream.engine.checkpoint import Models
from talkstream.engine.denoiser import ReferenceFeatures
from talkstream.engine.sampler import FewStepSampler

__all__ = [
    "DTYPES",
    "ORT_SPINNING",
    "PRECISIONS",
    "LoadOptions",
    "LoadedModels",
    "torch_dtype",
]

log = logging.getLogger(__name__)

# Every dtype a config, a scenario or the CLI may name, and what it is in torch.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
PRECISIONS = ("fp32", "fp16")  # TensorRT engine precision
ORT_SPINNING = ("run", "off", "on")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name``; ``ValueError`` lists the names if there is none."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class LoadOptions:
    """How a backend loads: device, precision, where artifacts are cached, what to pre-build."""

    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: Path | None = None  # the cache root; None: a private temporary directory
    rebuild: bool = False  # rebuild cached artifacts even when their key matches
    # Largest batch a built artifact must take (TensorRT profiles, compiled buckets): the
    # engine's coalescing limit, EngineConfig.max_batch_frames (see from_config); the defaults
    # are the config's, so a backend loaded on its own builds what an engine would find.
    max_batch: int = EngineConfig.max_batch_frames
    precision: str = EngineConfig.tensorrt_precision  # TensorRT engines: fp16 or fp32
    threads: int | None = None  # CPU threads for onnxruntime; None: torch's setting
    sampler: FewStepSampler | None = None  # pre-build this sampler's loop graph at load
    lookaheads: tuple[int, ...] = ()  # pre-build these motion lookaheads (default: trained)
    trt_plugins: bool = False  # TensorRT: embed the Triton kernels as plugins
    compile_mode: str | None = None  # torch.compile mode; None: per device (see compiled)
    # onnxruntime CPU worker threads between parallel sections: "run" spins inside a call and
    # stops when it returns (fast hand-offs, no cores burnt between frames); "off" always
    # sleeps; "on" is onnxruntime's default (keeps spinning after a call, stealing the cores
    # that paste-back and the encoder need next).
    ort_spinning: str = "run"
    # onnxruntime runs AudioToMotion on one thread: its ops are too small to split, and waking a
    # second thread for each cost more than it saved (benchmarks/experiments/ort_spin_parts.py).
    ort_motion_one_thread: bool = True
    progress: Callable[[str], None] | None = None  # one line per build step; None: log.info

    def __post_init__(self) -> None:
        torch_dtype(self.dtype)  # raises for an unknown name
        if self.ort_spinning not in ORT_SPINNING:
            raise ValueError(
                f"ort_spinning must be one of {ORT_SPINNING}, got {self.ort_spinning!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")

    @classmethod
    def from_config(
        cls, cfg: EngineConfig, sampler: FewStepSampler | None = None, **overrides: object
    ) -> LoadOptions:
        """The options an engine with ``cfg`` loads its backend with.

        Artifacts are cached under the same root as prepared avatars, must take every batch the
        engine coalesces (``max_batch_frames``, see ``Engine.submit``) and are built at the
        configured TensorRT precision; ``sampler`` and the configured lookahead are pre-built.
        ``overrides`` replace single fields (``rebuild=True``, ``progress=print``, ...).
        """
        fields: dict[str, object] = {
            "device": cfg.device,
            "dtype": cfg.dtype,
            "cache_dir": cfg.avatar.cache_dir,
            "threads": cfg.threads,
            "sampler": sampler,
            "lookaheads": () if cfg.lookahead_frames is None else (cfg.lookahead_frames,),
            "max_batch": cfg.max_batch_frames,
            "precision": cfg.tensorrt_precision,
        }
        fields.update(overrides)
        return cls(**fields)  # type: ignore[arg-type]

    def say(self, msg: str) -> None:
        (self.progress or log.info)(msg)


class LoadedModels(ABC):
    """The per-frame networks of one backend, behind the eager call signatures."""

    name: str = ""

    def __init__(self, models: Models, options: LoadOptions) -> None:
        self.models = models
        self.options = options
        self.device = torch.device(options.device)
        self.dtype = torch_dtype(options.dtype)

    @abstractmethod
    def motion(self, windows: Tensor, neutral: Tensor, lookahead: int | None = None) -> Tensor:
        """(B, W, R, 80) mel windows, (B, 68, 2) neutral landmarks -> (B, 37, 2)."""

    @abstractmethod
    def denoiser(self, x_t: Tensor, t: Tensor, landmarks: Tensor, ref: ReferenceFeatures) -> Tensor:
        """(B, 3, S, S) x_t, (B,) t, (B, 68, 2) landmarks, batch-1 reference -> (B, 3, S, S)."""

    def sample(
        self, sampler: FewStepSampler, noise: Tensor, landmarks: Tensor, ref: ReferenceFeatures
    ) -> Tensor:
        """The sampler's few-step loop over ``denoiser``: (B, 3, S, S) noise -> x0."""
        return sampler.sample(self.denoiser, noise, landmarks=landmarks, ref=ref)

    @property
    def fused_sample(self) -> bool:
        """Whether ``sample`` runs the whole few-step loop as one call (one graph)."""
        return type(self).sample is not LoadedModels.sample

    def describe(self) -> str:
        """One line for logs and ``talkstream doctor``."""
        return f"{self.name} on {self.device} ({self.options.dtype})"

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing
        """Release sessions, engines and temporary artifacts."""
