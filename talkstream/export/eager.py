"""The ``torch`` backend: the eager modules (CPU or GPU), the reference every other backend is
tested against."""

from __future__ import annotations

from torch import Tensor

from talkstream.engine.checkpoint import Models
from talkstream.engine.denoiser import ReferenceFeatures
from talkstream.engine.runtime import LoadedModels, LoadOptions
from talkstream.export.common import BaseBackend

__all__ = ["TorchBackend", "TorchModels"]


class TorchModels(LoadedModels):
    """The eager modules themselves: zero overhead, the reference for every parity test."""

    name = "torch"

    def __init__(self, models: Models, options: LoadOptions) -> None:
        super().__init__(models, options)
        self.motion_module = models.motion.to(self.device).eval()
        self.denoiser_module = models.denoiser.to(self.device, self.dtype).eval()

    def motion(self, windows: Tensor, neutral: Tensor, lookahead: int | None = None) -> Tensor:
        out: Tensor = self.motion_module(windows, neutral, lookahead)
        return out

    def denoiser(self, x_t: Tensor, t: Tensor, landmarks: Tensor, ref: ReferenceFeatures) -> Tensor:
        out: Tensor = self.denoiser_module(x_t, t, landmarks, ref)
        return out


class TorchBackend(BaseBackend):
    name = "torch"
    description = "PyTorch eager (CPU or CUDA)"
    loaded_class = TorchModels
