"""What every backend module shares: the ``Backend`` protocol, ``BaseBackend``, batch padding,
optional imports and the cache of exported ONNX graphs (onnxruntime and TensorRT both run them).

A backend module (``eager``, ``compiled``, ``ort``, ``tensorrt``) defines a ``LoadedModels``
subclass (``talkstream.engine.runtime``: the protocol the engine calls) and a ``BaseBackend``
subclass that says whether it can run here and loads it. ``talkstream.export.backends`` holds
the registry and ``--backend auto``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from talkstream import __version__
from talkstream.engine.checkpoint import Models, load_checkpoint
from talkstream.engine.denoiser import ReferenceFeatures
from talkstream.engine.runtime import DTYPES, LoadedModels, LoadOptions
from talkstream.engine.sampler import FewStepSampler
from talkstream.errors import MissingDependencyError
from talkstream.export.cache import ArtifactCache

__all__ = [
    "Backend",
    "BaseBackend",
    "OnnxGraphs",
    "as_models",
    "bucket",
    "check_device",
    "device_type",
    "import_optional",
    "load_options",
    "pad_batch",
    "reject_ref_batch",
    "sampler_key",
]


class Backend(Protocol):
    """What every backend provides: a name, the extra to install, availability, and load."""

    name: str
    extra: str | None  # the talkstream extra that installs its libraries; None: core only
    description: str

    def available(self, device: str = "cpu", dtype: str = "float32") -> tuple[bool, str]:
        """Whether it can run here, and if not, exactly why (with what to install)."""
        ...

    def load(
        self,
        models: Models | str | Path,
        device: str | None = None,
        *,
        options: LoadOptions | None = None,
        **fields: Any,
    ) -> LoadedModels:
        """Load ``models`` (or a checkpoint directory); see ``load_options``."""
        ...


def device_type(device: str) -> str:
    return torch.device(device).type


def check_device(device: str) -> None:
    kind = device_type(device)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch build sees no CUDA GPU")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: talkstream backends run on cpu or cuda")


def import_optional(module: str, what: str, extra: str) -> Any:
    """Import ``module``; ``MissingDependencyError`` names ``what`` needs it and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(what, module, extra) from None


def as_models(models: Models | str | Path, device: str) -> Models:
    """``models`` itself, or the checkpoint directory it names loaded onto ``device``."""
    if isinstance(models, Models):
        return models
    return load_checkpoint(models, device)


def load_options(
    device: str | None = None, options: LoadOptions | None = None, **fields: Any
) -> LoadOptions:
    """``options`` (default ``LoadOptions()``) with ``device`` and ``fields`` replaced."""
    if device is not None:
        fields["device"] = device
    if options is None:
        return LoadOptions(**fields)
    return dataclasses.replace(options, **fields) if fields else options


def sampler_key(sampler: FewStepSampler) -> str:
    """What a compiled or exported loop bakes in: its timesteps and the schedule."""
    steps = "-".join(map(str, sampler.timesteps))
    return f"loop{steps}-{sampler.schedule.name}{sampler.schedule.num_timesteps}"


def reject_ref_batch(ref: ReferenceFeatures, backend: str) -> None:
    """Exported graphs take one avatar's features (batch 1), as the engine passes them."""
    if any(r.shape[0] != 1 for r in (ref.patches, *ref.levels)):
        raise ValueError(
            f"the {backend} backend takes reference features of batch 1 (one avatar), got "
            f"batch {ref.patches.shape[0]}; group frames by avatar, as Engine.render does"
        )


def bucket(n: int, max_batch: int) -> int:
    """The padded batch for ``n`` frames: the next power of two, or ``n`` beyond ``max_batch``."""
    if n > max_batch:
        return n
    return 1 << max(0, n - 1).bit_length()


def pad_batch(t: Tensor, size: int) -> Tensor:
    """``t`` grown to ``size`` rows by repeating its last one."""
    if t.shape[0] == size:
        return t
    # Repeat the last row: valid inputs, so padding can never produce NaNs or inf.
    return torch.cat((t, t[-1:].expand(size - t.shape[0], *t.shape[1:])), dim=0)


class BaseBackend:
    """Availability from ``check`` and a ``load`` that builds ``loaded_class``."""

    name = ""
    extra: str | None = None
    description = ""
    loaded_class: type[LoadedModels]

    def check(self, device: str, dtype: str) -> None:
        """Raise ``MissingDependencyError``/``ValueError`` unless this backend can run."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        check_device(device)

    def available(self, device: str = "cpu", dtype: str = "float32") -> tuple[bool, str]:
        try:
            self.check(device, dtype)
        except (MissingDependencyError, ValueError) as e:
            return False, str(e)
        return True, "available"

    def load(
        self,
        models: Models | str | Path,
        device: str | None = None,
        *,
        options: LoadOptions | None = None,
        **fields: Any,
    ) -> LoadedModels:
        """Load ``models`` with ``options`` (default ``LoadOptions()``), ``device`` and ``fields``
        replacing its fields."""
        opts = load_options(device, options, **fields)
        self.check(opts.device, opts.dtype)
        return self.loaded_class(as_models(models, opts.device), opts)


# --- the exported ONNX graphs (onnxruntime and TensorRT) ----------------------------------------


def _onnx_fields(model_hash: str, graph: str, plugins: bool) -> dict[str, Any]:
    import onnx

    from talkstream.export.onnx import OPSET

    return {
        "graph": graph,
        "plugins": plugins,
        "opset": OPSET,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "talkstream": __version__,
        "model": model_hash,
    }


@dataclass
class OnnxGraphs:
    """Builds (once, cached by key) and returns the ONNX graph files of one ``Models``."""

    models: Models
    cache: ArtifactCache
    options: LoadOptions
    plugins: bool = False
    _paths: dict[str, Path] = field(default_factory=dict)
    _hash: str | None = None

    @property
    def model_hash(self) -> str:
        # Hashing the weights costs ~0.1 s (tiny) to ~1 s (base): once per load.
        if self._hash is None:
            from talkstream.export.onnx import model_hash

            self._hash = model_hash(self.models.motion, self.models.denoiser)
        return self._hash

    def motion(self, lookahead: int) -> tuple[Any, Path]:
        from talkstream.export import onnx as ox

        spec = ox.motion_spec(lookahead)
        return spec, self.get(spec, lambda p: ox.export_motion(self.models.motion, p, lookahead))

    def denoiser_step(self) -> tuple[Any, Path]:
        from talkstream.export import onnx as ox

        den = self.models.denoiser
        spec = ox.denoiser_step_spec(len(den.cfg.widths), self.plugins)
        return spec, self.get(spec, lambda p: ox.export_denoiser_step(den, p, plugins=self.plugins))

    def denoiser_loop(self, sampler: FewStepSampler) -> tuple[Any, Path]:
        from talkstream.export import onnx as ox

        den = self.models.denoiser
        spec = ox.denoiser_loop_spec(len(den.cfg.widths), sampler.timesteps, self.plugins)
        extra = {"schedule": sampler.schedule.name, "T": sampler.schedule.num_timesteps}
        return spec, self.get(
            spec,
            lambda p: ox.export_denoiser_loop(den, sampler, p, plugins=self.plugins),
            extra,
        )

    def get(
        self, spec: Any, export: Callable[[Path], Any], extra: Mapping[str, Any] | None = None
    ) -> Path:
        """The graph file of ``spec``: from the cache, or made by ``export(path)`` and checked."""
        from talkstream.export import onnx as ox

        if spec.filename in self._paths:
            return self._paths[spec.filename]
        fields = {**_onnx_fields(self.model_hash, spec.name, spec.plugins), **(extra or {})}
        entry = self.cache.entry("onnx", spec.filename.removesuffix(".onnx"), fields)

        def build(tmp: Path) -> None:
            self.options.say(f"exporting {spec.filename} (ONNX opset {ox.OPSET}) ...")
            export(tmp / spec.filename)
            ox.check_graph(tmp / spec.filename, spec)

        entry, built = self.cache.get_or_build(entry, build, rebuild=self.options.rebuild)
        if not built:
            self.options.say(f"cached {spec.filename}: {entry.path}")
        path = entry.file(spec.filename)
        self._paths[spec.filename] = path
        return path
