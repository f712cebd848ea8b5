"""The ``compiled`` backend: ``torch.compile``; on CUDA with CUDA graphs
(``mode="reduce-overhead"``) and the fused Triton kernels (the custom ops stay single nodes).

Batches are padded to power-of-two buckets up to ``LoadOptions.max_batch`` (the engine's
coalescing limit), so the engine's varying batch sizes compile a handful of shapes, not one each.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from talkstream.engine.checkpoint import Models
from talkstream.engine.denoiser import ReferenceFeatures
from talkstream.engine.runtime import LoadedModels, LoadOptions
from talkstream.engine.sampler import FewStepSampler
from talkstream.export.common import (
    BaseBackend,
    bucket,
    device_type,
    import_optional,
    pad_batch,
    reject_ref_batch,
    sampler_key,
)

__all__ = ["CompiledBackend", "CompiledModels"]


class CompiledModels(LoadedModels):
    """``torch.compile``d networks; the few-step loop compiles into one graph.

    Mode: ``reduce-overhead`` (CUDA graphs) on CUDA, inductor's default with freezing on CPU,
    unless ``LoadOptions.compile_mode`` says otherwise. Inputs are padded to power-of-two batch
    buckets (static shapes: each bucket compiles, and on CUDA records a graph, once).
    """

    name = "compiled"

    def __init__(self, models: Models, options: LoadOptions) -> None:
        super().__init__(models, options)
        self.motion_module = models.motion.to(self.device).eval()
        self.denoiser_module = models.denoiser.to(self.device, self.dtype).eval()
        cuda = self.device.type == "cuda"
        self.mode = options.compile_mode or ("reduce-overhead" if cuda else None)
        self._cudagraphs = cuda and self.mode == "reduce-overhead"
        compile_kw: dict[str, Any] = {"dynamic": False}
        if self.mode is not None:
            compile_kw["mode"] = self.mode
        else:
            # Freezing: weights become constants, so inductor folds them and pre-packs the
            # convolution weights for oneDNN (1.03x -> 1.28x over eager for the tiny denoiser on
            # the 2-core dev CPU, one thread: benchmarks/experiments/compile_freeze.py).
            # Inference only, which is all we do.
            compile_kw["options"] = {"freezing": True}
        self._motion = torch.compile(self.motion_module, **compile_kw)
        self._denoiser = torch.compile(self.denoiser_module, **compile_kw)
        self._compile_kw = compile_kw
        self._loops: dict[str, Callable[..., Tensor]] = {}
        self._lock = threading.Lock()

    def _call(self, fn: Callable[..., Tensor], n: int, *args: Any) -> Tensor:
        if self._cudagraphs:
            # One step per call: lets the CUDA-graph trees reuse their memory pool safely.
            torch.compiler.cudagraph_mark_step_begin()
        out = fn(*args)[:n]
        # CUDA-graph outputs live in a pool the next replay overwrites: hand out a copy.
        return out.clone() if self._cudagraphs else out

    def motion(self, windows: Tensor, neutral: Tensor, lookahead: int | None = None) -> Tensor:
        n = windows.shape[0]
        b = bucket(n, self.options.max_batch)
        return self._call(self._motion, n, pad_batch(windows, b), pad_batch(neutral, b), lookahead)

    def denoiser(self, x_t: Tensor, t: Tensor, landmarks: Tensor, ref: ReferenceFeatures) -> Tensor:
        n = x_t.shape[0]
        b = bucket(n, self.options.max_batch)
        if ref.patches.shape[0] != 1:  # per-frame features (batch n) are padded like x_t
            ref = ReferenceFeatures(
                pad_batch(ref.patches, b), tuple(pad_batch(r, b) for r in ref.levels)
            )
        args = (pad_batch(x_t, b), pad_batch(t, b), pad_batch(landmarks, b), ref)
        return self._call(self._denoiser, n, *args)

    def sample(
        self, sampler: FewStepSampler, noise: Tensor, landmarks: Tensor, ref: ReferenceFeatures
    ) -> Tensor:
        reject_ref_batch(ref, self.name)
        key = sampler_key(sampler)
        with self._lock:
            loop = self._loops.get(key)
            if loop is None:
                # Dynamo unrolls the Python loop (its timesteps are constants) into one graph.
                def run(x: Tensor, lm: Tensor, r: ReferenceFeatures) -> Tensor:
                    return sampler.sample(self.denoiser_module, x, landmarks=lm, ref=r)

                loop = torch.compile(run, **self._compile_kw)
                self._loops[key] = loop
        n = noise.shape[0]
        b = bucket(n, self.options.max_batch)
        return self._call(loop, n, pad_batch(noise, b), pad_batch(landmarks, b), ref)

    def describe(self) -> str:
        from talkstream.kernels import kernel_implementation

        kernels = kernel_implementation(str(self.device))
        return (
            f"compiled (torch.compile mode={self.mode or 'default'}, kernels={kernels}) "
            f"on {self.device} ({self.options.dtype})"
        )


class CompiledBackend(BaseBackend):
    name = "compiled"
    extra = None
    description = "torch.compile (inductor; CUDA graphs and Triton kernels on CUDA)"
    loaded_class = CompiledModels

    def check(self, device: str, dtype: str) -> None:
        super().check(device, dtype)
        if device_type(device) == "cuda":
            import_optional("triton", "torch.compile on CUDA", "gpu")
        elif not any(shutil.which(cc) for cc in ("g++", "clang++", "c++")):
            raise ValueError(
                "torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH; none found"
            )
