"""The backends registry: four ways to run the per-frame networks, and ``--backend auto``.

Each backend lives in its own module and implements the engine's runtime protocol
(``talkstream.engine.runtime.LoadedModels``: the networks behind their eager call signatures):

- ``torch`` (``export.eager``): the eager modules (CPU or GPU), the reference every other backend
  is tested against.
- ``compiled`` (``export.compiled``): ``torch.compile``; on CUDA with CUDA graphs and the fused
  Triton kernels; batches padded to power-of-two buckets.
- ``onnxruntime`` (``export.ort``): the exported ONNX graphs (``talkstream.export.onnx``) on the
  CPU execution provider, or the CUDA one when ``onnxruntime-gpu`` provides it.
- ``tensorrt`` (``export.tensorrt``): engines built from the same ONNX graphs.

A backend (``export.common.Backend``) has a ``name``, the ``extra`` that installs what it needs,
``available(device, dtype) -> (bool, reason)`` and ``load(models, device, options=...)``.
``select_backend`` implements ``--backend auto``: the first available backend in a documented
order per device (fastest first, from the measurements in ``docs/decisions.md``), with the
reason each one before it was skipped. ``load_backend`` is what the composition root
(``talkstream.runtime.load_engine``) calls.

No backend's library is imported here: onnxruntime and tensorrt are imported inside the backend
that needs them, and a missing one raises ``MissingDependencyError`` naming the extra to install.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from talkstream.engine.checkpoint import Models
from talkstream.engine.runtime import LoadedModels, LoadOptions
from talkstream.export.common import Backend, BaseBackend, device_type, load_options
from talkstream.export.compiled import CompiledBackend
from talkstream.export.eager import TorchBackend
from talkstream.export.ort import OnnxRuntimeBackend
from talkstream.export.tensorrt import TensorRTBackend

__all__ = [
    "AUTO",
    "BACKENDS",
    "PREFERENCE",
    "Selection",
    "backend_names",
    "get_backend",
    "load_backend",
    "select_backend",
]

log = logging.getLogger(__name__)

AUTO = "auto"
# --backend auto: fastest first, per device type. CPU: onnxruntime ran the tiny per-frame step
# fastest here (benchmarks/backends_cpu.py); compiled is left out of auto on CPU because it
# compiles for minutes per batch shape at start-up and was not faster. CUDA: TensorRT FP16
# engines, then CUDA graphs + Triton kernels, then onnxruntime's CUDA provider.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("onnxruntime", "torch"),
    "cuda": ("tensorrt", "compiled", "onnxruntime", "torch"),
}

BACKENDS: dict[str, BaseBackend] = {
    b.name: b for b in (TorchBackend(), CompiledBackend(), OnnxRuntimeBackend(), TensorRTBackend())
}


def backend_names() -> tuple[str, ...]:
    """Every backend name plus ``auto``: the choices of ``--backend``."""
    return (AUTO, *BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` lists the names if there is none."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; expected one of {', '.join(backend_names())}"
        ) from None


@dataclass(frozen=True)
class Selection:
    """The outcome of ``--backend auto``: the chosen backend and why."""

    name: str
    reason: str
    skipped: tuple[tuple[str, str], ...] = ()  # (backend, why not) for each one tried first

    def explain(self) -> str:
        lines = [f"backend {self.name}: {self.reason}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def select_backend(device: str = "cpu", dtype: str = "float32") -> Selection:
    """The fastest backend available for ``device`` and ``dtype`` (``--backend auto``).

    Walks ``PREFERENCE[device type]`` (fastest first) and takes the first available one; the
    reasons of those skipped come back in the ``Selection``. ``torch`` is always last and always
    available, so this always picks something.
    """
    kind = device_type(device)
    order = PREFERENCE.get(kind, ("torch",))
    skipped: list[tuple[str, str]] = []
    for position, name in enumerate(order):
        ok, why = BACKENDS[name].available(device, dtype)
        if ok:
            if position == 0:
                reason = f"the fastest backend on {kind} (preference {' > '.join(order)})"
            else:
                reason = f"the fastest available on {kind} (preference {' > '.join(order)})"
            return Selection(name, reason, tuple(skipped))
        skipped.append((name, why))
    raise ValueError(
        f"no backend can run on {device} with {dtype}: "
        + "; ".join(f"{n}: {w}" for n, w in skipped)
    )


def load_backend(
    name: str,
    models: Models | str | Path,
    device: str | None = None,
    *,
    options: LoadOptions | None = None,
    **fields: Any,
) -> LoadedModels:
    """Load ``models`` with the backend ``name`` (or ``auto``), logging which and why.

    ``options`` (default ``LoadOptions()``; the engine's come from ``LoadOptions.from_config``)
    with ``device`` and ``fields`` replacing its fields.
    """
    opts = load_options(device, options, **fields)
    if name == AUTO:
        sel = select_backend(opts.device, opts.dtype)
        log.info("%s", sel.explain())
        name = sel.name
    loaded = get_backend(name).load(models, options=opts)
    log.info("running the per-frame networks with %s", loaded.describe())
    return loaded
