"""talkstream as an avatar for LiveKit Agents, speaking the SDK's avatar data-stream protocol.

Two sides, each built on the SDK's own classes:

- the worker (:mod:`.worker`, :mod:`.generator`): a room participant that takes the agent's
  speech (byte streams on ``lk.audio_stream``, ``lk.clear_buffer`` RPC), renders the face and
  publishes face and voice in sync, reporting ``lk.playback_started`` /
  ``lk.playback_finished``. Run one with ``python -m talkstream.integrations.livekit --help``.
- the agent (:mod:`.session`): :class:`AvatarSession`, in the style of the provider plugins'
  ``AvatarSession``: ``await AvatarSession().start(agent_session, room=ctx.room)`` starts a
  worker and routes the agent's speech to it.

Needs the ``livekit`` extra: ``pip install 'talkstream[livekit]'``. Importing this package is
light; the names below load their module (and the LiveKit SDK) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from talkstream.integrations.livekit.generator import (
        GeneratorConfig,
        TalkstreamVideoGenerator,
    )
    from talkstream.integrations.livekit.session import (
        AvatarSession,
        LocalWorkerLauncher,
        WorkerConnectionInfo,
        worker_token,
    )
    from talkstream.integrations.livekit.worker import AvatarWorker, WorkerConfig, run_worker

# The worker's participant identity unless told otherwise (light: the agent side imports it).
DEFAULT_AVATAR_IDENTITY = "talkstream-avatar"

_EXPORTS = {
    "GeneratorConfig": "generator",
    "TalkstreamVideoGenerator": "generator",
    "AvatarWorker": "worker",
    "WorkerConfig": "worker",
    "run_worker": "worker",
    "AvatarSession": "session",
    "LocalWorkerLauncher": "session",
    "WorkerConnectionInfo": "session",
    "worker_token": "session",
}


def check_dependencies() -> None:
    """Raise ``MissingDependencyError`` (naming the extra) unless the LiveKit SDK imports."""
    from talkstream.errors import MissingDependencyError

    for module in ("livekit.rtc", "livekit.agents"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingDependencyError(
                "talkstream's LiveKit integration", module, "livekit"
            ) from None


def __getattr__(name: str) -> Any:
    sub = _EXPORTS.get(name)
    if sub is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    check_dependencies()
    return getattr(importlib.import_module(f"{__name__}.{sub}"), name)


__all__ = [
    "DEFAULT_AVATAR_IDENTITY",
    "AvatarSession",
    "AvatarWorker",
    "GeneratorConfig",
    "LocalWorkerLauncher",
    "TalkstreamVideoGenerator",
    "WorkerConfig",
    "WorkerConnectionInfo",
    "check_dependencies",
    "run_worker",
    "worker_token",
]
