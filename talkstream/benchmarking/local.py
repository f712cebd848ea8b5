"""A talkstream engine and server in this process: the one implementation that
``talkstream bench --browser local``, the benchmark scripts and the tests share.

- :func:`random_engine`: an engine on random weights of a preset (seeded), optionally with the
  landmark gain that lets random weights move the mouth visibly;
- :func:`local_engine`: the engine ``--browser local`` serves (the shipped or given checkpoint,
  else :func:`random_engine` with the gain), idle motion off;
- :func:`start_server`: ``create_app`` on a free 127.0.0.1 port, in the running event loop,
  torn down on exit (loopback-only ICE);
- :func:`serve_in_background`: the same server in a thread with its own event loop, for
  synchronous callers (the browser harness, scripts);
- :func:`local_server`: load, warm up and serve :func:`local_engine`;
- :func:`listen_on_loopback` / :func:`serve_app`: any aiohttp app (the pipecat example's) on a
  free 127.0.0.1 port;
- :func:`load_example`: a script of the repository's ``examples/`` as a module.

Light on import: torch, aiohttp and the server are imported when a function runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from talkstream.errors import TalkstreamError

if TYPE_CHECKING:
    from aiohttp import web

    from talkstream.config import EngineConfig
    from talkstream.engine.avatar import Avatar
    from talkstream.engine.checkpoint import Models
    from talkstream.engine.pipeline import Engine
    from talkstream.streaming.sessions import SessionManager

# Random weights barely let the landmarks into the image (about one grey level in the mouth
# region), which VP8 smooths away; this gain on the landmark cross-attention makes the mouth
# follow the speech visibly. Timing is unaffected.
LANDMARK_GAIN = 30.0
SERVER_START_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 30.0
# The repository's examples (a source checkout: tests and benchmark scripts load them).
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def gain_landmarks(models: Models, gain: float) -> Models:
    """Scale the denoiser's landmark cross-attention projections by ``gain``, in place."""
    import torch

    from talkstream.engine.denoiser import LandmarkCrossAttention

    with torch.no_grad():
        for mod in models.denoiser.modules():
            if isinstance(mod, LandmarkCrossAttention) and mod.proj.bias is not None:
                mod.proj.weight.mul_(gain)
                mod.proj.bias.mul_(gain)
    return models


def random_engine(
    cfg: EngineConfig | None = None, *, seed: int = 0, landmark_gain: float | None = None
) -> Engine:
    """An engine of ``cfg`` (default: tiny) on random weights drawn from ``seed``; with
    ``landmark_gain`` the landmark cross-attention is amplified (:func:`gain_landmarks`)."""
    from talkstream.config import EngineConfig
    from talkstream.engine.checkpoint import Models
    from talkstream.runtime import load_engine

    cfg = cfg or EngineConfig(preset="tiny")
    models = Models.random_init(cfg.preset, sampler=cfg.sampler, seed=seed)
    if landmark_gain is not None:
        gain_landmarks(models, landmark_gain)
    return load_engine(cfg, models)


def local_engine(cfg: EngineConfig | None = None, landmark_gain: float = LANDMARK_GAIN) -> Engine:
    """The engine ``--browser local`` serves: ``cfg`` (default: tiny) with idle motion off.

    The given or shipped checkpoint when there is one; else random weights with the landmark
    cross-attention amplified by ``landmark_gain`` (see :data:`LANDMARK_GAIN`).
    """
    from talkstream.config import EngineConfig, IdleConfig
    from talkstream.engine.pipeline import default_checkpoint
    from talkstream.runtime import load_engine

    cfg = dataclasses.replace(cfg or EngineConfig(), idle=IdleConfig(enabled=False))
    if cfg.checkpoint is not None or default_checkpoint(cfg.preset) is not None:
        return load_engine(cfg)
    return random_engine(cfg, landmark_gain=landmark_gain)


@dataclasses.dataclass
class LocalServer:
    """A running server: its URL, its aiohttp application and its session manager."""

    url: str
    app: web.Application
    manager: SessionManager


def load_example(name: str = "pipecat_agent") -> ModuleType:
    """``examples/<name>.py`` of this checkout, imported as module ``<name>_example``."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_example", path)
    if spec is None or spec.loader is None:
        raise TalkstreamError(f"{path} is not there: examples ship with the source checkout")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses of the example resolve their module
    spec.loader.exec_module(module)
    return module


async def listen_on_loopback(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on a free 127.0.0.1 port in the running loop: (its runner, to clean up
    when done, and its URL)."""
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, f"http://127.0.0.1:{int(runner.addresses[0][1])}"


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """:func:`listen_on_loopback` for the ``async with`` block; yields the URL."""
    runner, url = await listen_on_loopback(app)
    try:
        yield url
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def start_server(
    engine: Engine, avatar: Avatar, **overrides: Any
) -> AsyncIterator[LocalServer]:
    """``create_app`` on a free 127.0.0.1 port in the running loop, as ``serve`` runs it (its
    runner, its header timeout); loopback-only ICE (process-wide). ``overrides``:
    ``ServeConfig`` fields."""
    try:
        from aiohttp import web

        from talkstream.streaming.config import ServeConfig
        from talkstream.streaming.sdp import use_loopback_ice
        from talkstream.streaming.server import MANAGER_KEY, create_app, make_runner
    except ImportError as e:
        raise TalkstreamError(
            f"serving needs the serve extra ({e.name} is missing): pip install 'talkstream[serve]'"
        ) from None

    use_loopback_ice()
    overrides = {"host": "127.0.0.1", "port": 0, "ice_loopback_only": True, **overrides}
    app = create_app(ServeConfig(**overrides), engine, avatar)
    runner = make_runner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = int(runner.addresses[0][1])
        yield LocalServer(f"http://127.0.0.1:{port}", app, app[MANAGER_KEY])
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def serve_in_background(engine: Engine, avatar: Avatar, **overrides: Any) -> Iterator[str]:
    """:func:`start_server` in a thread with its own event loop; yields the server's URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="talkstream-local-server", daemon=True)
    thread.start()
    server = start_server(engine, avatar, **overrides)
    try:
        fut = asyncio.run_coroutine_threadsafe(server.__aenter__(), loop)
        srv = fut.result(timeout=SERVER_START_TIMEOUT_S)
        try:
            yield srv.url
        finally:
            stop = asyncio.run_coroutine_threadsafe(server.__aexit__(None, None, None), loop)
            with contextlib.suppress(concurrent.futures.TimeoutError):
                stop.result(timeout=SERVER_STOP_TIMEOUT_S)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()


@contextlib.contextmanager
def local_server(
    engine_config: EngineConfig | None = None, landmark_gain: float = LANDMARK_GAIN
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Load, warm up and serve :func:`local_engine` (``--browser local``); yields (URL, info)."""
    from talkstream.streaming.config import ServeConfig
    from talkstream.streaming.server import load_avatar

    engine = local_engine(engine_config, landmark_gain)
    try:
        avatar = load_avatar(ServeConfig(), engine)
        warm_s = engine.warmup(avatar)  # encodes the avatar and runs the per-frame path
        info = {
            "preset": engine.models.preset,
            "random_weights": engine.random_init,
            "landmark_gain": landmark_gain if engine.random_init else None,
            "device": engine.cfg.device,
            "idle": False,
            "warm_up_s": round(warm_s, 2),
            "backend": engine.backend.describe(),
        }
        with serve_in_background(engine, avatar) as url:
            yield url, info
    finally:
        engine.close()


__all__ = [
    "LANDMARK_GAIN",
    "LocalServer",
    "gain_landmarks",
    "local_engine",
    "local_server",
    "random_engine",
    "serve_in_background",
    "start_server",
]
