"""talkstream.integrations.livekit: the avatar side of LiveKit Agents' avatar protocol.

No LiveKit server installs here, so everything up to the room connection is tested with the
SDK's own classes on both sides: the agent's ``DataStreamAudioOutput`` sends speech, the
worker's ``DataStreamAudioReceiver`` + ``AvatarRunner`` + talkstream's generator receive it and
publish through a real ``rtc.AVSynchronizer`` into real ``rtc.AudioSource`` /
``rtc.VideoSource`` objects (the SDK's native media sources, which pace audio in real time
without a room). Only the room transport is faked: :class:`InProcessRoom` carries byte streams,
RPCs, participant presence and track publications between two rooms in this process, and
implements nothing else. Tests that need a real server skip.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="the livekit extra is not installed")

from livekit import api, rtc
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from livekit.agents.voice.avatar import AudioSegmentEnd, DataStreamAudioOutput
from livekit.agents.voice.io import PlaybackFinishedEvent

from talkstream.engine.audio import StreamingResampler, to_mono_float32
from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from talkstream.integrations.livekit import cli as lk_cli
from talkstream.integrations.livekit.generator import (
    FRAME_S,
    GeneratorConfig,
    TalkstreamVideoGenerator,
)
from talkstream.integrations.livekit.session import (
    AvatarSession,
    LocalWorkerLauncher,
    WorkerConnectionInfo,
    worker_token,
)
from talkstream.integrations.livekit.worker import AvatarWorker, WorkerConfig
from talkstream.streaming.config import ANTICIPATION_FRAMES
from tests.conftest import speechlike

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

NO_SERVER = "no LiveKit server here (livekit-server is not installable)"
AGENT = "agent-1"
WORKER = "talkstream-avatar"
OUT_RATE = 48_000


# ----------------------------------------------------------------------------- fake transport
#
# The in-process stand-in for the room transport: what rtc.Room / rtc.LocalParticipant do over
# the network (byte streams, RPC, presence, publications), done by direct calls. The SDK's avatar
# classes run unchanged on top of it.


class InProcessByteStreamReader:
    """What ``rtc.ByteStreamReader`` offers the receiver: ``info`` and async chunks."""

    def __init__(self, info: rtc.ByteStreamInfo) -> None:
        self.info = info
        self._q: asyncio.Queue[bytes | None] = asyncio.Queue()

    def __aiter__(self) -> InProcessByteStreamReader:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._q.get()
        if chunk is None:
            self._q.put_nowait(None)
            raise StopAsyncIteration
        return chunk

    def close(self) -> None:
        self._q.put_nowait(None)

    async def aclose(self) -> None:
        self.close()


class InProcessByteStreamWriter:
    def __init__(self, readers: list[InProcessByteStreamReader]) -> None:
        self._readers = readers

    async def write(self, data: bytes) -> None:
        for r in self._readers:
            r._q.put_nowait(bytes(data))

    async def aclose(self, **_: Any) -> None:
        for r in self._readers:
            r._q.put_nowait(None)


@dataclass
class InProcessPublication:
    sid: str
    kind: int
    name: str
    subscribed: bool = True
    track: Any = None

    async def wait_for_subscription(self) -> None:
        return None


@dataclass
class InProcessRemoteParticipant:
    identity: str
    kind: int
    attributes: dict[str, str] = field(default_factory=dict)
    state: int = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
    track_publications: dict[str, InProcessPublication] = field(default_factory=dict)


class InProcessLocalParticipant:
    def __init__(self, room: InProcessRoom, identity: str, kind: int) -> None:
        self.room = room
        self.identity = identity
        self.kind = kind
        self.attributes: dict[str, str] = {}
        self._rpc_handlers: dict[str, Callable[[rtc.RpcInvocationData], Any]] = {}
        self.track_publications: dict[str, InProcessPublication] = {}
        self.published: list[tuple[Any, Any]] = []  # (track, options)

    def register_rpc_method(
        self, method: str, handler: Callable[[rtc.RpcInvocationData], Any] | None = None
    ) -> Any:
        if handler is None:  # decorator form

            def deco(fn: Callable[[rtc.RpcInvocationData], Any]) -> Any:
                self._rpc_handlers[method] = fn
                return fn

            return deco
        self._rpc_handlers[method] = handler
        return handler

    async def perform_rpc(
        self, *, destination_identity: str, method: str, payload: str, **_: Any
    ) -> str:
        peer = self.room.peer(destination_identity)
        handler = peer.local_participant._rpc_handlers.get(method)
        if handler is None:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD, "unsupported method")
        data = rtc.RpcInvocationData(
            request_id=uuid.uuid4().hex,
            caller_identity=self.identity,
            payload=payload,
            response_timeout=10.0,
            method=method,
        )
        out = handler(data)
        if asyncio.iscoroutine(out):
            out = await out
        return str(out)

    async def stream_bytes(
        self,
        name: str,
        *,
        topic: str = "",
        destination_identities: list[str] | None = None,
        attributes: dict[str, str] | None = None,
        **_: Any,
    ) -> InProcessByteStreamWriter:
        info = rtc.ByteStreamInfo(
            stream_id=uuid.uuid4().hex,
            mime_type="application/octet-stream",
            topic=topic,
            timestamp=int(time.time() * 1000),
            size=None,
            attributes=dict(attributes or {}),
            name=name,
        )
        readers = []
        for ident in destination_identities or []:
            peer = self.room.peer(ident)
            handler = peer.byte_stream_handlers.get(topic)
            reader = InProcessByteStreamReader(info)
            readers.append(reader)
            if handler is not None:
                handler(reader, self.identity)
        return InProcessByteStreamWriter(readers)

    async def publish_track(self, track: Any, options: Any = None) -> InProcessPublication:
        kind = (
            rtc.TrackKind.KIND_AUDIO
            if isinstance(track, rtc.LocalAudioTrack)
            else rtc.TrackKind.KIND_VIDEO
        )
        pub = InProcessPublication(sid=uuid.uuid4().hex, kind=kind, name=track.name, track=track)
        self.track_publications[pub.sid] = pub
        self.published.append((track, options))
        self.room.emit("local_track_published", pub, track)
        for peer in self.room.peers():
            me = peer.remote_participants[self.identity]
            me.track_publications[pub.sid] = pub
            peer.emit("track_published", pub, me)
        return pub


class InProcessRoom(rtc.EventEmitter[str]):
    """One participant's view of a room whose other members live in the same process."""

    def __init__(self, name: str, identity: str, kind: int) -> None:
        super().__init__()
        self.name = name
        self.local_participant = InProcessLocalParticipant(self, identity, kind)
        self.remote_participants: dict[str, InProcessRemoteParticipant] = {}
        self.byte_stream_handlers: dict[str, Callable[..., None]] = {}
        self._network: dict[str, InProcessRoom] = {}
        self.connected = True

    def isconnected(self) -> bool:
        return self.connected

    def register_byte_stream_handler(self, topic: str, handler: Callable[..., None]) -> None:
        self.byte_stream_handlers[topic] = handler

    def peer(self, identity: str) -> InProcessRoom:
        return self._network[identity]

    def peers(self) -> list[InProcessRoom]:
        return [r for ident, r in self._network.items() if r is not self]

    def join(self, other: InProcessRoom) -> None:
        """``other`` joins: each sees the other as an active remote participant."""
        net = self._network
        net[self.local_participant.identity] = self
        net[other.local_participant.identity] = other
        other._network = net
        for a, b in ((self, other), (other, self)):
            lp = b.local_participant
            rp = InProcessRemoteParticipant(lp.identity, lp.kind, dict(lp.attributes))
            rp.track_publications.update(lp.track_publications)
            a.remote_participants[lp.identity] = rp
            a.emit("participant_connected", rp)
            a.emit("participant_active", rp)

    def leave(self) -> None:
        """This participant leaves: the others see it disconnect."""
        me = self.local_participant.identity
        for peer in self.peers():
            rp = peer.remote_participants.pop(me, None)
            if rp is not None:
                peer.emit("participant_disconnected", rp)
        self.connected = False
        self.emit("disconnected", "client initiated")


def room_pair(name: str = "room-1") -> tuple[InProcessRoom, InProcessRoom]:
    agent = InProcessRoom(name, AGENT, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
    avatar = InProcessRoom(name, WORKER, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
    avatar.local_participant.attributes[ATTRIBUTE_PUBLISH_ON_BEHALF] = AGENT
    agent.join(avatar)
    return agent, avatar


# ----------------------------------------------------------------------------- measurement


@dataclass
class Published:
    """What the runner handed to the native media sources, with wall times."""

    # (wall time the frame starts playing, frame index, samples, pcm)
    audio: list[tuple[float, int, int, np.ndarray]] = field(default_factory=list)
    video: list[float] = field(default_factory=list)  # capture wall times, in yield order

    def speech(self) -> np.ndarray:
        if not self.audio:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate([a[3] for a in self.audio])


def instrument(worker: AvatarWorker) -> Published:
    """Record when the runner's real AudioSource / VideoSource take each frame (the calls go
    through unchanged)."""
    assert worker.runner is not None
    rec = Published()
    asrc = worker.runner._audio_source
    vsrc = worker.runner._video_source
    capture_audio, capture_video = asrc.capture_frame, vsrc.capture_frame

    async def audio(frame: rtc.AudioFrame) -> None:
        await capture_audio(frame)
        # What AudioSource itself reports: this frame finishes playing after queued_duration.
        start = time.monotonic() + asrc.queued_duration - frame.duration
        pcm = np.frombuffer(frame.data, dtype=np.int16).copy()
        rec.audio.append((start, int(frame.userdata["frame"]), frame.samples_per_channel, pcm))

    def video(frame: rtc.VideoFrame, **kw: Any) -> None:
        capture_video(frame, **kw)
        rec.video.append(time.monotonic())

    asrc.capture_frame = audio  # type: ignore[method-assign]
    vsrc.capture_frame = video  # type: ignore[method-assign]
    return rec


def av_offsets_ms(worker: AvatarWorker, rec: Published) -> np.ndarray:
    """Per published speech frame: when its audio starts playing minus when the video frame of
    the same slot was captured (ms; > 0: voice late)."""
    assert worker.generator is not None
    # The AVSynchronizer's video queue is FIFO and drops nothing: the k-th capture is the k-th
    # frame the generator yielded.
    yielded = [idx for idx, _, _ in worker.generator.trace]
    t_video = dict(zip(yielded, rec.video, strict=False))
    return np.array(
        [(t - t_video[i]) * 1000 for t, i, _, _ in rec.audio if i in t_video], dtype=np.float64
    )


def frames_of(pcm: np.ndarray, rate: int, frame_ms: int = 100) -> list[rtc.AudioFrame]:
    """(n,) or (n, ch) float speech as the TTS would hand it to the agent's audio output."""
    x = np.clip(np.rint(pcm * 32767), -32768, 32767).astype(np.int16)
    x = x.reshape(x.shape[0], -1)
    step = rate * frame_ms // 1000
    return [
        rtc.AudioFrame(
            data=x[i : i + step].tobytes(),
            sample_rate=rate,
            num_channels=x.shape[1],
            samples_per_channel=x[i : i + step].shape[0],
        )
        for i in range(0, x.shape[0], step)
    ]


def mono48(pcm: np.ndarray, rate: int) -> np.ndarray:
    r = StreamingResampler(rate, OUT_RATE)
    x = to_mono_float32(pcm.astype(np.float32))
    return np.concatenate([r.push(x), r.flush()])


@dataclass
class Rig:
    agent_room: InProcessRoom
    avatar_room: InProcessRoom
    worker: AvatarWorker
    output: DataStreamAudioOutput
    published: Published
    started: list[float]


async def make_rig(engine: Engine, avatar: Avatar) -> Rig:
    agent_room, avatar_room = room_pair()
    worker = AvatarWorker(
        avatar_room,  # type: ignore[arg-type]
        engine,
        avatar,
        WorkerConfig(agent_identity=AGENT),
    )
    await asyncio.wait_for(worker.setup(), 30)
    rec = instrument(worker)  # before the first frame
    await worker.start()
    out = DataStreamAudioOutput(
        agent_room,  # type: ignore[arg-type]
        destination_identity=WORKER,
        wait_remote_track=rtc.TrackKind.KIND_VIDEO,
        wait_playback_start=True,
    )
    started: list[float] = []
    out.on("playback_started", lambda ev: started.append(time.monotonic()))
    return Rig(agent_room, avatar_room, worker, out, rec, started)


async def close_rig(rig: Rig) -> None:
    await rig.worker.aclose()


async def speak(out: DataStreamAudioOutput, frames: list[rtc.AudioFrame]) -> None:
    for f in frames:
        await out.capture_frame(f)
    out.flush()


# ----------------------------------------------------------------------------- the protocol


@pytest.mark.parametrize(("rate", "channels"), [(16_000, 2), (24_000, 1), (44_100, 1)])
async def test_a_segment_at_any_rate_plays_whole_in_sync_and_reports_its_end(
    tiny_engine: Engine, default_avatar: Avatar, rate: int, channels: int
) -> None:
    rig = await make_rig(tiny_engine, default_avatar)
    try:
        dur = 0.8
        mono = speechlike(int(dur * rate), rate, seed=rate)
        pcm = mono if channels == 1 else np.stack([mono, 0.5 * mono], axis=1)
        await asyncio.wait_for(speak(rig.output, frames_of(pcm, rate)), 10)
        ev: PlaybackFinishedEvent = await asyncio.wait_for(rig.output.wait_for_playout(), 10)
        # Normal end: not interrupted, and the position is the segment's duration (to a frame).
        assert ev.interrupted is False
        assert abs(ev.playback_position - dur) < FRAME_S, ev
        assert len(rig.started) == 1  # lk.playback_started came once, before the end

        # What was published is that speech, whole, at 48 kHz mono.
        got = rig.published.speech().astype(np.float32) / 32768
        want = mono48(pcm, rate)
        assert abs(got.shape[0] - want.shape[0]) <= 1
        n = min(got.shape[0], want.shape[0])
        corr = np.corrcoef(got[:n], want[:n])[0, 1]
        assert corr > 0.99, corr

        # In sync: each slot's voice starts playing when its video frame is captured.
        await asyncio.sleep(0.1)  # the last frame through the AVSynchronizer's video queue
        off = av_offsets_ms(rig.worker, rig.published)
        # (A frame whose video came too late to send has no capture: none on an idle machine,
        # a quarter of them at a load of 13 on 2 cores; a stall puts the frames around it out
        # of step.)
        assert len(rig.published.audio) >= int(dur / FRAME_S)
        assert off.size >= 0.5 * len(rig.published.audio)
        assert np.percentile(np.abs(off), 90) < 40.0, off
        assert abs(float(np.median(off))) < 15.0, off
        # The segment's frames are consecutive slots, starting on a frame boundary.
        idx = [i for _, i, _, _ in rig.published.audio]
        assert idx == list(range(idx[0], idx[0] + len(idx)))
        # The face was published once each: one audio and one video track, camera and mic.
        kinds = sorted(type(t).__name__ for t, _ in rig.avatar_room.local_participant.published)
        assert kinds == ["LocalAudioTrack", "LocalVideoTrack"]
    finally:
        await close_rig(rig)


async def test_clear_buffer_drops_queued_speech_and_reports_the_interruption(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    rig = await make_rig(tiny_engine, default_avatar)
    try:
        rate, dur = 24_000, 3.0
        await asyncio.wait_for(
            speak(rig.output, frames_of(speechlike(int(dur * rate), rate), rate)), 10
        )
        await asyncio.wait_for(_until(lambda: bool(rig.started)), 10)
        await asyncio.sleep(0.6)
        t_clear = time.monotonic()
        played_before = t_clear - rig.started[0]
        rig.output.clear_buffer()  # the agent's lk.clear_buffer RPC
        ev = await asyncio.wait_for(rig.output.wait_for_playout(), 5)
        assert ev.interrupted is True
        # The position is what played: about the time since playback started, well short of
        # the segment (up to the two 40 ms slots LiveKit's AudioSource already held).
        assert played_before - 0.15 < ev.playback_position < played_before + 0.15, (
            ev,
            played_before,
        )
        gen = rig.worker.generator
        assert gen is not None and gen.stats.interrupts == 1
        assert gen.queued_speech_s == 0.0
        assert gen.stats.dropped_speech_s > dur - ev.playback_position - 0.3
        # The voice stops: after the clear, at most the slot the runner was handing to
        # AudioSource is published, and nothing after it.
        n_audio = len(rig.published.audio)
        await asyncio.sleep(0.3)
        assert len(rig.published.audio) <= n_audio + 1
        n_audio = len(rig.published.audio)
        await asyncio.sleep(0.3)
        assert len(rig.published.audio) == n_audio
        published_s = sum(a[2] for a in rig.published.audio) / OUT_RATE
        assert abs(published_s - ev.playback_position) < FRAME_S + 1e-6
        # (Each slot starts playing after the ones AudioSource already holds: 80 ms at most.)
        assert max(t for t, *_ in rig.published.audio) < t_clear + 2 * FRAME_S + 0.03

        # The next segment plays normally, whole.
        await asyncio.wait_for(speak(rig.output, frames_of(speechlike(12_000, rate), rate)), 10)
        ev2 = await asyncio.wait_for(rig.output.wait_for_playout(), 10)
        assert ev2.interrupted is False
        assert abs(ev2.playback_position - 0.5) < FRAME_S
    finally:
        await close_rig(rig)


async def _aiter(frames: list[rtc.AudioFrame]) -> AsyncIterator[rtc.AudioFrame]:
    for f in frames:
        yield f


async def _until(cond: Callable[[], bool], step: float = 0.01) -> None:
    while not cond():
        await asyncio.sleep(step)


# ----------------------------------------------------------------------------- the generator


async def test_generator_idles_at_25_fps_without_audio_then_speaks_on_frame_boundaries(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    """Driven directly with SDK frame types, as AvatarRunner drives it."""
    gen = TalkstreamVideoGenerator(tiny_engine.session(default_avatar), GeneratorConfig())
    out: list[tuple[float, Any]] = []
    stream = aiter(gen)

    async def pull(n: int) -> None:
        for _ in range(n):
            out.append((time.monotonic(), await anext(stream)))

    try:
        await pull(15)  # idle: video only
        assert all(isinstance(f, rtc.VideoFrame) for _, f in out)
        vf = out[0][1]
        assert (vf.width, vf.height) == (gen.width, gen.height) == (512, 512)
        t = [w for w, _ in out[3:]]
        assert 0.030 < float(np.median(np.diff(t))) < 0.050  # 25 fps, paced

        # 10 ms frames of 16 kHz stereo, as a receiver would push a short segment.
        x = speechlike(16_000 // 4, 16_000)  # 250 ms
        for f in frames_of(np.stack([x, x], axis=1), 16_000, frame_ms=10):
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        out.clear()
        while not any(isinstance(f, AudioSegmentEnd) for _, f in out[:-5]):
            await pull(1)
            assert len(out) < 3 * (gen.delay_frames + 30)
        kinds = [type(f).__name__ for _, f in out]
        audio = [f for _, f in out if isinstance(f, rtc.AudioFrame)]
        assert [a.sample_rate for a in audio] == [OUT_RATE] * len(audio)
        assert sum(a.samples_per_channel for a in audio) == 250 * 48
        # Whole slots but the last; each slot's audio precedes its video by at most one frame.
        assert [a.samples_per_channel for a in audio[:-1]] == [1920] * (len(audio) - 1)
        assert kinds.count("AudioSegmentEnd") == 1
        end = kinds.index("AudioSegmentEnd")
        assert all(k == "VideoFrame" for k in kinds[end + 1 :])  # idle again
        # Each slot's audio comes just before its video or one frame earlier (the lead).
        shown = iter([i for i, _, _ in gen.trace][-kinds.count("VideoFrame") :])
        last_video = None
        for _, f in out:
            if isinstance(f, rtc.VideoFrame):
                last_video = next(shown)
            elif isinstance(f, rtc.AudioFrame):
                assert last_video is not None
                assert f.userdata["frame"] - last_video in (1, 2), (f.userdata, last_video)
    finally:
        await gen.aclose()


@pytest.mark.parametrize("early", [True, False], ids=["early", "after-the-fed-silence"])
async def test_generator_starts_a_segment_after_silence_early(
    tiny_engine: Engine, default_avatar: Avatar, early: bool
) -> None:
    """A segment that arrives while the avatar idles replaces the silence already written for
    the latency budget (``GeneratorConfig.early_speech_start``), with every sample kept."""
    cfg = GeneratorConfig(early_speech_start=early)
    gen = TalkstreamVideoGenerator(tiny_engine.session(default_avatar), cfg)
    stream = aiter(gen)
    out: list[Any] = []
    try:
        for _ in range(12):  # idle
            await anext(stream)
        shown = gen.trace[-1][0]
        x = speechlike(16_000 // 2, 16_000)  # 500 ms, 10 ms frames pushed at once
        for f in frames_of(x, 16_000, frame_ms=10):
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        while not any(isinstance(f, AudioSegmentEnd) for f in out):
            out.append(await anext(stream))
            assert len(out) < 100
        audio = [f for f in out if isinstance(f, rtc.AudioFrame)]
        first = audio[0].userdata["frame"]
        if early:
            # ANTICIPATION_FRAMES after the next frame that can still change (+1 for a render
            # that would not finish in time), not after the whole latency budget.
            assert first <= shown + 2 + ANTICIPATION_FRAMES + 1
            assert first < shown + 1 + gen.delay_frames
            assert gen.stats.early_starts >= 1
        else:
            assert first >= shown + 1 + gen.delay_frames
            assert gen.stats.early_starts == 0
        # The whole segment, in order, no silence inserted: what the agent said.
        got = np.concatenate([np.frombuffer(a.data, np.int16) for a in audio])
        x16 = np.clip(np.rint(x * 32767), -32768, 32767).astype(np.int16)  # as frames_of sends
        r = StreamingResampler(16_000, OUT_RATE)
        y = np.concatenate([r.push(to_mono_float32(x16)), r.flush()])
        want = np.clip(np.rint(y * 32768.0), -32768, 32767).astype(np.int16)
        assert np.array_equal(got, want)
        # Slots in order, one frame each, video after its audio as before.
        assert [a.userdata["frame"] for a in audio] == list(range(first, first + len(audio)))
    finally:
        await gen.aclose()


def test_generator_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="compute_budget_ms"):
        GeneratorConfig(compute_budget_ms=-1)
    with pytest.raises(ValueError, match="frames_per_call"):
        GeneratorConfig(frames_per_call=0)


# ----------------------------------------------------------------------------- agent side


async def test_avatar_session_mints_a_worker_token_and_routes_the_agents_speech(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    from livekit.agents import Agent, AgentSession

    agent_room, avatar_room = room_pair()
    launched: list[WorkerConnectionInfo] = []
    workers: list[AvatarWorker] = []

    async def launch(info: WorkerConnectionInfo) -> None:
        # Stands in for the worker process: the same worker, on the other end of the fake
        # transport, serving the agent named in the connection info.
        launched.append(info)
        cfg = WorkerConfig(agent_identity=info.agent_identity)
        w = AvatarWorker(
            avatar_room,  # type: ignore[arg-type]
            tiny_engine,
            default_avatar,
            cfg,
        )
        workers.append(w)
        await w.start()

    session: AgentSession = AgentSession()
    avatar = AvatarSession(
        launcher=launch, livekit_url="ws://example:7880", api_key="devkey", api_secret="secret"
    )
    try:
        await asyncio.wait_for(
            avatar.start(session, room=agent_room),  # type: ignore[arg-type]
            30,
        )
        (info,) = launched
        assert (info.url, info.room, info.identity, info.agent_identity) == (
            "ws://example:7880",
            "room-1",
            WORKER,
            AGENT,
        )
        claims = api.TokenVerifier("devkey", "secret").verify(info.token)
        assert claims.identity == WORKER
        assert claims.kind == "agent"
        assert claims.video is not None and claims.video.room == "room-1"
        assert claims.video.room_join is True
        assert claims.attributes == {ATTRIBUTE_PUBLISH_ON_BEHALF: AGENT}
        # The agent's audio output now ends in a data stream to the worker.
        out = avatar.audio_output
        assert isinstance(out, DataStreamAudioOutput)
        assert session.output.audio is out
        await asyncio.wait_for(avatar.wait_for_join(timeout=10), 15)  # its video is published

        # The agent speaks through the session, as agents do (no room I/O: the fake room
        # carries only the avatar protocol).
        await session.start(agent=Agent(instructions="A talking face."))
        rate = 24_000
        handle = session.say("Hello.", audio=_aiter(frames_of(speechlike(rate // 2, rate), rate)))
        await asyncio.wait_for(handle.wait_for_playout(), 10)
        assert not handle.interrupted
        worker = workers[0]
        assert worker.generator is not None
        assert abs(worker.generator.stats.speech_s - 0.5) < 1e-3
        # The user barges in: the session interrupts its speech; the avatar stops it.
        handle = session.say(
            "A long one.", audio=_aiter(frames_of(speechlike(4 * rate, rate), rate))
        )
        await asyncio.sleep(1.0)
        handle.interrupt()
        await asyncio.wait_for(handle.wait_for_playout(), 5)
        assert handle.interrupted
        assert worker.generator.stats.interrupts == 1
        spoken = worker.generator.stats.speech_s - 0.5
        assert 0.1 < spoken < 1.2, spoken
    finally:
        await session.aclose()
        await avatar.aclose()
        for w in workers:
            await w.aclose()


async def test_worker_leaves_with_its_agent(tiny_engine: Engine, default_avatar: Avatar) -> None:
    agent_room, avatar_room = room_pair()
    worker = AvatarWorker(
        avatar_room,  # type: ignore[arg-type]
        tiny_engine,
        default_avatar,
    )  # the first agent
    try:
        await asyncio.wait_for(worker.start(), 30)
        assert worker.agent_identity == AGENT
        agent_room.leave()
        await asyncio.wait_for(worker.wait_done(), 2)
    finally:
        await worker.aclose()


def test_worker_token_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from talkstream.errors import TalkstreamError

    monkeypatch.delenv("LIVEKIT_API_KEY", raising=False)
    monkeypatch.delenv("LIVEKIT_API_SECRET", raising=False)
    with pytest.raises(TalkstreamError, match="LIVEKIT_API_KEY"):
        worker_token(room="r", identity="w", agent_identity="a")


def test_local_launcher_keeps_the_token_off_the_command_line() -> None:
    info = WorkerConnectionInfo("ws://h:7880", "SECRET.TOKEN", "r", WORKER, AGENT)
    cmd = LocalWorkerLauncher(image="me.jpg", extra_args=["--framing", "portrait"]).command(info)
    assert cmd[1:3] == ["-m", "talkstream.integrations.livekit"]
    assert "SECRET.TOKEN" not in " ".join(cmd)
    assert cmd[cmd.index("--agent-identity") + 1] == AGENT
    assert cmd[cmd.index("--image") + 1] == "me.jpg" and cmd[-2:] == ["--framing", "portrait"]
    # Every flag it passes is one the worker's parser knows.
    lk_cli.build_parser().parse_args(cmd[3:])


# ----------------------------------------------------------------------------- the command


def test_cli_help_and_one_line_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as e:
        lk_cli.main(["--help"])
    assert e.value.code == 0
    assert "lk.audio_stream" in capsys.readouterr().out
    for var in ("LIVEKIT_URL", "LIVEKIT_TOKEN", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(var, raising=False)
    cases: list[tuple[list[str], str]] = [
        ([], "no server: pass --url or set LIVEKIT_URL"),
        (["--url", "ws://h:7880"], "no access token"),
        (["--url", "ws://h:7880", "--room", "r"], "LIVEKIT_API_KEY"),
        (["--url", "ws://h:7880", "--token", "x.y.z", "--room", "r"], "not a LiveKit access"),
    ]
    tok = worker_token(room="other", identity="w", agent_identity="a", api_key="k", api_secret="s")
    cases.append((["--url", "ws://h:7880", "--token", tok, "--room", "r"], "for room 'other'"))
    for argv, msg in cases:
        assert lk_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and err.startswith("talkstream: error:"), err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
async def test_launched_worker_says_in_one_line_that_the_server_is_unreachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No server: the worker gets as far as connecting (so it found its token in LIVEKIT_TOKEN,
    # with no --token or API key), then exits with one line, no traceback, no SDK log.
    for var in ("LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", "LIVEKIT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    url = f"ws://127.0.0.1:{_free_port()}"
    tok = worker_token(room="r", identity=WORKER, agent_identity=AGENT, api_key="k", api_secret="s")
    launcher = LocalWorkerLauncher(stderr=asyncio.subprocess.PIPE)
    await launcher(WorkerConnectionInfo(url, tok, "r", WORKER, AGENT))
    proc = launcher.process
    assert proc is not None and proc.stderr is not None
    err = (await asyncio.wait_for(proc.stderr.read(), 120)).decode()
    assert await proc.wait() == 2
    (line,) = [ln for ln in err.splitlines() if ln.strip()]
    assert line.startswith(f"talkstream: error: cannot join a room at {url}"), err
    assert "Connection refused" in line and "livekit-server --dev" in line, line
    await launcher.aclose()  # a worker that already exited: nothing to do


# ----------------------------------------------------------------------------- a real server


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("livekit-server") is None, reason=NO_SERVER)
async def test_against_livekit_server_dev(tiny_engine: Engine, default_avatar: Avatar) -> None:
    """The same protocol through a real ``livekit-server --dev`` (real rooms, real WebRTC)."""
    port = _free_port()
    server = subprocess.Popen(
        ["livekit-server", "--dev", "--bind", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"ws://127.0.0.1:{port}"
    agent_room, avatar_room = rtc.Room(), rtc.Room()
    worker: AvatarWorker | None = None
    try:

        def token(identity: str, **attrs: str) -> str:
            return (
                api.AccessToken("devkey", "secret")
                .with_identity(identity)
                .with_kind("agent")
                .with_grants(api.VideoGrants(room_join=True, room="lk-test"))
                .with_attributes(attrs)
                .to_jwt()
            )

        for attempt in itertools.count():
            try:
                await agent_room.connect(url, token(AGENT))
                break
            except rtc.ConnectError:
                if attempt > 50:
                    raise
                await asyncio.sleep(0.2)
        await avatar_room.connect(url, token(WORKER, **{ATTRIBUTE_PUBLISH_ON_BEHALF: AGENT}))
        worker = AvatarWorker(avatar_room, tiny_engine, default_avatar, WorkerConfig(AGENT))
        await asyncio.wait_for(worker.start(), 30)
        out = DataStreamAudioOutput(
            agent_room, destination_identity=WORKER, wait_remote_track=rtc.TrackKind.KIND_VIDEO
        )
        rate = 24_000
        await speak(out, frames_of(speechlike(rate, rate), rate))
        ev = await asyncio.wait_for(out.wait_for_playout(), 20)
        assert ev.interrupted is False and abs(ev.playback_position - 1.0) < FRAME_S
    finally:
        if worker is not None:
            await worker.aclose()
        await avatar_room.disconnect()
        await agent_room.disconnect()
        server.terminate()
        server.wait(10)
