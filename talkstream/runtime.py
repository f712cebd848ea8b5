"""The composition root: a config in, a running ``Engine`` out.

The engine defines the runtime protocol (``talkstream.engine.runtime``) and never imports a
backend; ``talkstream.export`` implements the protocol. This module is the one place that joins
them: it loads the networks, builds the sampler, loads the backend the config names with
``LoadOptions.from_config`` (so ``max_batch`` and the TensorRT precision reach every backend from
one place) and hands the loaded runtime to ``Engine``. Entry points (the CLI commands, servers,
integrations, benchmarks, tests) build engines here.
"""

from __future__ import annotations

from typing import Any

import torch

from talkstream.config import EngineConfig
from talkstream.engine.checkpoint import Models
from talkstream.engine.pipeline import Engine, load_models, make_sampler
from talkstream.engine.runtime import LoadOptions, torch_dtype
from talkstream.export.backends import load_backend

__all__ = ["load_engine"]


def load_engine(
    cfg: EngineConfig | None = None,
    models: Models | None = None,
    **load_options: Any,
) -> Engine:
    """An engine for ``cfg`` (default ``EngineConfig()``), warmed up when ``cfg.warmup``.

    ``models``: the networks to run; None loads what ``cfg`` names (its checkpoint, the
    preset's shipped one, or random weights). ``load_options``: ``LoadOptions`` fields the
    config does not carry (``ort_spinning="off"``, ``trt_plugins=True``, ``rebuild=True``).
    """
    cfg = cfg or EngineConfig()
    torch_dtype(cfg.dtype)  # an unknown dtype fails before anything loads
    if cfg.threads is not None:
        # Before anything runs: torch's pool, and onnxruntime's default, follow it.
        torch.set_num_threads(cfg.threads)
    if models is None:
        models = load_models(cfg)
    runtime = load_backend(
        cfg.backend,
        models,
        options=LoadOptions.from_config(cfg, make_sampler(models, cfg), **load_options),
    )
    try:
        return Engine(cfg, runtime, models)
    except BaseException:
        runtime.close()
        raise
