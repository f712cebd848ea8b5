"""Agent side: give a LiveKit agent talkstream's face, the way the provider plugins do.

Inside an agent's entrypoint::

    from talkstream.integrations.livekit import AvatarSession

    avatar = AvatarSession(image="me.jpg")
    await avatar.start(session, room=ctx.room)          # before session.start(...)
    await session.start(agent=agent, room=ctx.room)

:meth:`AvatarSession.start` mints a token for the avatar worker's identity (from the LiveKit
API key and secret, with ``lk.publish_on_behalf`` set to the agent, so the avatar's tracks
stand for the agent in the room), starts a worker with it, and routes the agent's speech to
that worker (``DataStreamAudioOutput``: byte streams on ``lk.audio_stream``). By default the
worker is a local process (:class:`LocalWorkerLauncher`: ``python -m
talkstream.integrations.livekit``), one per agent session; pass any other ``launcher`` (an
async callable taking :class:`WorkerConnectionInfo`) to start it elsewhere, e.g. by posting the
info to a render service on a GPU machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt  # PyJWT, a dependency of livekit-api
from livekit import api, rtc
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from livekit.agents.voice.avatar import AvatarSession as _SDKAvatarSession
from livekit.agents.voice.avatar import DataStreamAudioOutput

from talkstream.errors import TalkstreamError
from talkstream.integrations.livekit import DEFAULT_AVATAR_IDENTITY

if TYPE_CHECKING:
    from livekit.agents import AgentSession

log = logging.getLogger(__name__)

# Seconds a local worker gets to leave the room after SIGTERM before it is killed.
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class WorkerConnectionInfo:
    """What an avatar worker needs to join: the server, its token, the room, and whom to serve."""

    url: str
    token: str
    room: str
    identity: str  # the worker's own participant identity (in the token)
    agent_identity: str  # the agent participant whose speech it takes


Launcher = Callable[[WorkerConnectionInfo], Awaitable[None]]


class LocalWorkerLauncher:
    """Starts the worker as a process here: ``python -m talkstream.integrations.livekit``.

    The token goes through the environment (``LIVEKIT_TOKEN``), not the command line, where
    other users of the machine could read it.

    Args:
        image, landmarks: the avatar's photo and, optionally, its landmarks JSON.
        extra_args: more worker flags (``--framing portrait``, ``--backend auto`` ...).
        python: the interpreter to run it with (this one by default).
        stderr: where the worker's log goes (a file object or ``asyncio.subprocess.PIPE``;
            default: this process's stderr).
    """

    def __init__(
        self,
        *,
        image: str | Path | None = None,
        landmarks: str | Path | None = None,
        extra_args: Sequence[str] = (),
        python: str = sys.executable,
        stderr: Any = None,
    ) -> None:
        self.image = image
        self.landmarks = landmarks
        self.extra_args = list(extra_args)
        self.python = python
        self.stderr = stderr
        self.process: asyncio.subprocess.Process | None = None

    def command(self, info: WorkerConnectionInfo) -> list[str]:
        """The worker's command line (no secrets in it)."""
        cmd = [self.python, "-m", "talkstream.integrations.livekit", "--url", info.url]
        cmd += ["--room", info.room, "--agent-identity", info.agent_identity]
        if self.image is not None:
            cmd += ["--image", str(self.image)]
        if self.landmarks is not None:
            cmd += ["--landmarks", str(self.landmarks)]
        return cmd + self.extra_args

    async def __call__(self, info: WorkerConnectionInfo) -> None:
        if self.process is not None and self.process.returncode is None:
            raise RuntimeError("this launcher's worker is still running; use one per session")
        env = {**os.environ, "LIVEKIT_TOKEN": info.token}
        self.process = await asyncio.create_subprocess_exec(
            *self.command(info), env=env, stderr=self.stderr
        )
        log.info("avatar worker started (pid %d)", self.process.pid)

    async def aclose(self) -> None:
        """Stop the worker: SIGTERM (it leaves the room), SIGKILL after ``STOP_GRACE_S``."""
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def worker_token(
    *,
    room: str,
    identity: str,
    agent_identity: str | None,
    name: str = "talkstream avatar",
    api_key: str | None = None,
    api_secret: str | None = None,
) -> str:
    """A token for the avatar worker: joins ``room`` as ``identity``, an agent-kind participant
    that publishes on ``agent_identity``'s behalf (if one is named). Key and secret default to
    LiveKit's ``LIVEKIT_API_KEY`` / ``LIVEKIT_API_SECRET``, as in ``livekit.api``.

    Raises:
        TalkstreamError: no API key or secret.
    """
    try:
        token = api.AccessToken(api_key, api_secret)
    except ValueError:
        raise TalkstreamError(
            "the avatar worker's token needs the LiveKit API key and secret: set "
            "LIVEKIT_API_KEY and LIVEKIT_API_SECRET (livekit-server --dev: devkey / secret) "
            "or pass api_key= and api_secret="
        ) from None
    token = (
        token.with_kind("agent")
        .with_identity(identity)
        .with_name(name)
        .with_grants(api.VideoGrants(room_join=True, room=room))
    )
    if agent_identity:
        token = token.with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity})
    with warnings.catch_warnings():
        # PyJWT warns about every secret under 32 bytes, livekit-server --dev's "secret"
        # included; which secrets are acceptable is the server's call.
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return token.to_jwt()


class AvatarSession(_SDKAvatarSession):
    """A talkstream avatar for one agent session (see the module docstring).

    Built on the SDK's ``AvatarSession``: it waits for the avatar to join and publish (see
    ``wait_for_join``), reports avatar metrics to the agent session, and ``aclose`` removes
    the avatar participant (inside a job) and stops the worker.

    Args:
        image, landmarks: the avatar's photo (default: the bundled face), for the default
            launcher.
        launcher: starts the worker; default :class:`LocalWorkerLauncher`.
        avatar_identity, avatar_name: the worker's participant identity and display name.
        livekit_url: the server the worker joins (default ``LIVEKIT_URL``).
        api_key, api_secret: to mint the worker's token (default ``LIVEKIT_API_KEY`` /
            ``LIVEKIT_API_SECRET``).
    """

    def __init__(
        self,
        *,
        image: str | Path | None = None,
        landmarks: str | Path | None = None,
        launcher: Launcher | None = None,
        avatar_identity: str = DEFAULT_AVATAR_IDENTITY,
        avatar_name: str = "talkstream avatar",
        livekit_url: str | None = None,
        api_key: str | None = None,
        api_secret: str | None = None,
    ) -> None:
        super().__init__()
        self.launcher: Launcher = launcher or LocalWorkerLauncher(image=image, landmarks=landmarks)
        self._identity = avatar_identity
        self._name = avatar_name
        self._url = livekit_url
        self._api_key = api_key
        self._api_secret = api_secret
        self.audio_output: DataStreamAudioOutput | None = None

    @property
    def avatar_identity(self) -> str:
        return self._identity

    @property
    def provider(self) -> str:
        return "talkstream"

    async def start(self, agent_session: AgentSession, room: rtc.Room) -> None:
        """Start the worker and send the agent's speech to it; call before
        ``agent_session.start``.

        Raises:
            TalkstreamError: no server URL, or no API key and secret for the token.
        """
        # LiveKit's convention (the agents CLI and the provider plugins read it too).
        url = self._url or os.environ.get("LIVEKIT_URL")
        if not url:
            raise TalkstreamError(
                "the avatar worker needs the LiveKit server's URL: set LIVEKIT_URL "
                "(livekit-server --dev: ws://localhost:7880) or pass livekit_url="
            )
        agent_identity = _agent_identity(room)
        token = worker_token(
            room=room.name,
            identity=self._identity,
            agent_identity=agent_identity,
            name=self._name,
            api_key=self._api_key,
            api_secret=self._api_secret,
        )
        await super().start(agent_session, room)
        await self.launcher(
            WorkerConnectionInfo(
                url=url,
                token=token,
                room=room.name,
                identity=self._identity,
                agent_identity=agent_identity,
            )
        )
        self.audio_output = DataStreamAudioOutput(
            room,
            destination_identity=self._identity,
            # Speech waits until the avatar publishes its video: none is lost while the
            # worker loads, and the first words come with a face.
            wait_remote_track=rtc.TrackKind.KIND_VIDEO,
            # The worker's AvatarRunner sends lk.playback_started when the voice starts.
            wait_playback_start=True,
        )
        # Swap only the sink at the bottom of the chain: transcript sync and recording stay.
        agent_session.output.replace_audio_tail(self.audio_output)

    async def aclose(self) -> None:
        await super().aclose()
        close = getattr(self.launcher, "aclose", None)
        if close is not None:
            await close()


def _agent_identity(room: rtc.Room) -> str:
    if room.isconnected():
        return room.local_participant.identity
    from livekit.agents import get_job_context

    ctx = get_job_context(required=False)
    if ctx is None:
        raise TalkstreamError(
            "the agent's room is not connected yet: call `await ctx.connect()` before "
            "AvatarSession.start"
        )
    return ctx.local_participant_identity


__all__ = [
    "AvatarSession",
    "Launcher",
    "LocalWorkerLauncher",
    "WorkerConnectionInfo",
    "worker_token",
]
