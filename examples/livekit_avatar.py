"""A LiveKit agent with a talkstream face, speaking with espeak-ng: no API key needed.

    livekit-server --dev                                # in another terminal
    export LIVEKIT_URL=ws://localhost:7880 LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret
    python examples/livekit_avatar.py dev               # the agent; it joins every new room

Then join a room as a user (the LiveKit Agents playground pointed at the same server, or
``lk room join --identity me demo`` from the LiveKit CLI): the agent joins too, starts a
talkstream avatar worker for the room (a local ``python -m talkstream.integrations.livekit``
process that joins as ``talkstream-avatar`` and publishes on the agent's behalf), and says the
script; the room sees the agent as a talking face. ``--image`` is passed to the worker through
``TALKSTREAM_IMAGE`` (the agents CLI owns the command line).

Where an LLM and speech recognition plug in: give ``AgentSession`` an ``stt``, ``llm``, ``tts``
and ``vad`` as in any LiveKit agent; the avatar needs nothing else, since it takes whatever
audio the session speaks (TTS output included) and answers interruptions.

Needs the livekit extra (``pip install 'talkstream[livekit]'``) and espeak-ng.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

import numpy as np
from livekit import rtc
from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli

from talkstream.integrations.livekit import AvatarSession
from talkstream.training.espeak import synthesize

log = logging.getLogger("livekit_avatar")

SCRIPT = (
    "Hello! I am a talking face, rendered live by talkstream.",
    "My voice comes from the agent; my lips follow it, frame by frame.",
)
FRAME_MS = 100  # the size of the audio frames handed to the session


async def espeak_frames(text: str) -> AsyncIterator[rtc.AudioFrame]:
    """``text`` spoken by espeak-ng, as the audio frames a TTS would produce."""
    utt = await asyncio.to_thread(synthesize, text)
    pcm = np.asarray(utt.pcm, dtype=np.int16)  # (n,) at utt.sample_rate
    step = utt.sample_rate * FRAME_MS // 1000
    for i in range(0, pcm.shape[0], step):
        chunk = pcm[i : i + step]
        yield rtc.AudioFrame(
            data=chunk.tobytes(),
            sample_rate=utt.sample_rate,
            num_channels=1,
            samples_per_channel=chunk.shape[0],
        )


server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    session: AgentSession = AgentSession()
    avatar = AvatarSession(image=os.environ.get("TALKSTREAM_IMAGE"))
    # Before session.start: the session's speech goes to the avatar, which speaks for the agent.
    await avatar.start(session, room=ctx.room)
    await session.start(agent=Agent(instructions="A talking face."), room=ctx.room)
    await avatar.wait_for_join(timeout=120)  # the first start loads the model
    for line in SCRIPT:
        handle = session.say(line, audio=espeak_frames(line))
        await handle
        log.info("said %r (interrupted: %s)", line, handle.interrupted)


if __name__ == "__main__":
    cli.run_app(server)
