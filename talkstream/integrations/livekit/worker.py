"""The avatar worker: a room participant that gives a LiveKit agent a face.

:class:`AvatarWorker` joins the agent's room as its own participant (usually with a token that
lets it publish on the agent's behalf, ``lk.publish_on_behalf``) and speaks LiveKit Agents'
avatar data-stream protocol with the SDK's own classes: ``DataStreamAudioReceiver`` takes the
agent's speech from byte streams on topic ``lk.audio_stream`` (one stream per segment, with
``sample_rate`` and ``num_channels`` attributes) and answers the ``lk.clear_buffer`` RPC;
``AvatarRunner`` publishes the avatar's video and voice (``rtc.VideoSource`` /
``rtc.AudioSource`` through an ``rtc.AVSynchronizer``) and reports ``lk.playback_started`` and
``lk.playback_finished`` (``{playback_position, interrupted}``) back to the agent. talkstream
is the runner's ``VideoGenerator`` (:class:`TalkstreamVideoGenerator`).

``python -m talkstream.integrations.livekit`` runs one worker from the command line.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from livekit import rtc
from livekit.agents import utils
from livekit.agents.voice.avatar import AvatarOptions, AvatarRunner, DataStreamAudioReceiver

from talkstream.config import FPS
from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from talkstream.integrations.livekit import DEFAULT_AVATAR_IDENTITY
from talkstream.integrations.livekit.generator import GeneratorConfig, TalkstreamVideoGenerator
from talkstream.streaming.clock import OUT_RATE_HZ

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """One avatar worker."""

    # Whose speech to take: None takes the first agent participant in the room.
    agent_identity: str | None = None
    # Leave the room when that agent leaves it (a worker serves one agent session).
    exit_with_agent: bool = True
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


class AvatarWorker:
    """talkstream behind ``AvatarRunner`` in one room (see the module docstring).

    Args:
        room: the room, connected (or connecting: the runner waits for it).
        engine: the loaded engine (it may serve other workers too).
        avatar: the prepared avatar.
        cfg: which agent to serve, latency budget.
    """

    def __init__(
        self, room: rtc.Room, engine: Engine, avatar: Avatar, cfg: WorkerConfig | None = None
    ) -> None:
        self.room = room
        self.engine = engine
        self.avatar = avatar
        self.cfg = cfg or WorkerConfig()
        self.generator: TalkstreamVideoGenerator | None = None
        self.receiver: DataStreamAudioReceiver | None = None
        self.runner: AvatarRunner | None = None
        self.agent_identity: str | None = None
        self._done = asyncio.Event()
        self._closed = False

    async def start(self) -> None:
        """Wait for the agent, then receive its speech and publish the avatar."""
        if self.runner is None:
            await self.setup()
        assert self.runner is not None
        await self.runner.start()

    async def setup(self) -> None:
        """Wait for the agent and build the receiver, generator and runner, without starting
        them (:meth:`start` does both)."""
        # Preparing the avatar runs its reference encoder: off the event loop.
        session = await asyncio.to_thread(self.engine.session, self.avatar)
        self.generator = gen = TalkstreamVideoGenerator(session, self.cfg.generator)
        agent = await utils.wait_for_participant(
            room=self.room,
            identity=self.cfg.agent_identity,
            kind=None if self.cfg.agent_identity else rtc.ParticipantKind.PARTICIPANT_KIND_AGENT,
        )
        self.agent_identity = agent.identity
        log.info("serving agent %s in room %s", agent.identity, self.room.name)
        self.room.on("participant_disconnected", self._on_participant_disconnected)
        self.room.on("disconnected", self._on_disconnected)
        self.receiver = DataStreamAudioReceiver(self.room, sender_identity=agent.identity)
        options = AvatarOptions(
            video_width=gen.width,
            video_height=gen.height,
            video_fps=FPS,
            audio_sample_rate=OUT_RATE_HZ,
            audio_channels=1,
        )
        self.runner = AvatarRunner(
            self.room, audio_recv=self.receiver, video_gen=gen, options=options
        )
        gen.set_av_sync(self.runner.av_sync)

    def _on_participant_disconnected(self, participant: rtc.RemoteParticipant) -> None:
        if participant.identity == self.agent_identity and self.cfg.exit_with_agent:
            log.info("agent %s left the room", participant.identity)
            self._done.set()

    def _on_disconnected(self, *_: object) -> None:
        self._done.set()

    async def wait_done(self) -> None:
        """Until the agent leaves, the room disconnects or :meth:`aclose` is called."""
        await self._done.wait()

    async def aclose(self) -> None:
        """Stop publishing and release the session. Idempotent; leaves the room connected."""
        if self._closed:
            return
        self._closed = True
        self._done.set()
        self.room.off("participant_disconnected", self._on_participant_disconnected)
        self.room.off("disconnected", self._on_disconnected)
        if self.runner is not None:
            try:
                await self.runner.aclose()
            except Exception:  # the session below must still end
                log.exception("closing the avatar runner failed")
        if self.generator is not None:
            await self.generator.aclose()


async def run_worker(
    room: rtc.Room,
    engine: Engine,
    avatar: Avatar,
    cfg: WorkerConfig | None = None,
    *,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve the agent in ``room`` (connected) until it leaves, the room disconnects or
    ``stop`` is set; then stop publishing and leave the room."""
    worker = AvatarWorker(room, engine, avatar, cfg)

    async def serve() -> None:
        await worker.start()
        await worker.wait_done()

    stop = stop or asyncio.Event()
    serving = asyncio.ensure_future(serve())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # raise what failed
    finally:
        serving.cancel()
        stopping.cancel()
        # Collected, not raised again: a failure of serve() was raised above.
        await asyncio.gather(serving, stopping, return_exceptions=True)
        await worker.aclose()
        await room.disconnect()


__all__ = ["DEFAULT_AVATAR_IDENTITY", "AvatarWorker", "WorkerConfig", "run_worker"]
