"""The sessions manager: peer connections, presenters, limits, idle timeouts, teardown.

Two kinds of avatar stream render frames: a *live* session (one peer whose microphone drives the
avatar it watches) and a *presenter* (speech pushed by a program, watched by any number of
*viewers*). Streams count against ``max_sessions``, viewers against ``max_viewers``; beyond
either, a request gets :class:`CapacityError` (503). Every peer is closed, and its stream's tasks
stopped, when its connection fails or closes, when it goes idle, or when the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket

from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from talkstream.streaming.config import ServeConfig
from talkstream.streaming.metrics import Registry, StreamMetrics
from talkstream.streaming.sdp import keep_loopback_candidates, without_remb
from talkstream.streaming.tracks import AvatarAudioTrack, AvatarStream, AvatarVideoTrack

log = logging.getLogger(__name__)

PRESENTER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# How often idle streams are looked for, at most (seconds).
REAP_INTERVAL_S = 1.0


class CapacityError(RuntimeError):
    """No room for another stream or viewer (HTTP 503)."""


class NotFoundError(KeyError):
    """No such session or presenter (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


@dataclass(eq=False)
class Peer:
    """One RTCPeerConnection and what it is attached to."""

    id: str
    kind: Literal["live", "viewer"]
    pc: RTCPeerConnection
    stream: AvatarStream
    presenter: Presenter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closing: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class Presenter:
    """A named avatar whose speech is pushed; rendered once, watched by ``viewers``."""

    name: str
    stream: AvatarStream
    viewers: set[Peer] = field(default_factory=set)


def hold_video_bitrate(sender: RTCRtpSender) -> None:
    """Make an aiortc video sender ignore receiver bitrate estimates (REMB).

    aiortc restarts its video encoder, with a keyframe at a new quality, whenever an estimate
    moves the target by more than 10 %; Chrome sends estimates every second or so (even when
    the answer negotiates none), so a steady face would pulse. The encoder keeps its default
    bitrate instead (VP8 500 kbit/s, H.264 1 Mbit/s). aiortc has no option for this, so the
    sender's RTCP handler is wrapped to drop REMB (application-layer PSFB) packets.
    """
    original = getattr(sender, "_handle_rtcp_packet", None)
    if original is None:
        log.warning("this aiortc has no RTCRtpSender._handle_rtcp_packet: REMB is not held off")
        return

    async def handle(packet: object) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            return
        await original(packet)

    sender._handle_rtcp_packet = handle  # type: ignore[method-assign]


def shorten_audio_prefetch(receiver: RTCRtpReceiver, packets: int) -> bool:
    """Let an aiortc audio receiver hand over each packet after ``packets`` more arrived.

    aiortc holds 4 packets (80 ms of Opus) before it decodes the first, which is 80 ms added
    to every word's way to the avatar. The stream places input by its timestamps and fills in
    whatever comes late, so a shorter prefetch costs nothing but latency. aiortc has no option
    for this; its receiver's jitter buffer is replaced before the first packet. Returns whether
    it could be.
    """
    from aiortc.jitterbuffer import JitterBuffer

    attr = "_RTCRtpReceiver__jitter_buffer"
    old = getattr(receiver, attr, None)
    if not isinstance(old, JitterBuffer):
        log.warning("this aiortc's receiver has no jitter buffer to shorten: prefetch stays")
        return False
    setattr(receiver, attr, JitterBuffer(capacity=old.capacity, prefetch=packets))
    return True


class SessionManager:
    """Creates and tears down live sessions, presenters and viewers.

    Args:
        cfg: limits and the stream config.
        engine: the shared engine.
        avatar: the avatar every stream speaks with.
        registry: where the server's metrics live.
        now: monotonic clock (tests pass a fake one).
    """

    def __init__(
        self,
        cfg: ServeConfig,
        engine: Engine,
        avatar: Avatar,
        registry: Registry,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.avatar = avatar
        self.now = now
        self.metrics = StreamMetrics(registry)
        self.peers: dict[str, Peer] = {}
        self.presenters: dict[str, Presenter] = {}
        self._reserved = 0  # streams being set up (counted before their first await)
        self._reaper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False
        self.sessions_total = registry.counter(
            "talkstream_sessions_started_total", "Live sessions started."
        )
        self.rejected_total = registry.counter(
            "talkstream_requests_rejected_total", "Offers and pushes refused for capacity."
        )
        self.closed_total = registry.counter(
            "talkstream_sessions_closed_total", "Peers closed (any reason)."
        )
        registry.gauge(
            "talkstream_sessions", "Live sessions now open.", lambda: float(self.live_count)
        )
        registry.gauge(
            "talkstream_presenters", "Presenters now open.", lambda: float(len(self.presenters))
        )
        registry.gauge("talkstream_viewers", "Viewers now open.", lambda: float(self.viewer_count))
        registry.gauge(
            "talkstream_session_capacity", "max_sessions.", lambda: float(cfg.max_sessions)
        )
        registry.gauge("talkstream_fps", "Mean displayed fps over open streams.", self.mean_fps)

    # -- counts -------------------------------------------------------------------------------

    @property
    def live_count(self) -> int:
        return sum(1 for p in self.peers.values() if p.kind == "live")

    @property
    def viewer_count(self) -> int:
        return sum(1 for p in self.peers.values() if p.kind == "viewer")

    @property
    def stream_count(self) -> int:
        """Streams that render: live sessions, presenters and those being set up."""
        return self.live_count + len(self.presenters) + self._reserved

    def streams(self) -> list[AvatarStream]:
        live = [p.stream for p in self.peers.values() if p.kind == "live"]
        return live + [p.stream for p in self.presenters.values()]

    def mean_fps(self) -> float:
        fps = [s.stats.display_fps for s in self.streams()]
        return sum(fps) / len(fps) if fps else 0.0

    def _reserve(self) -> None:
        if self._closing:
            raise CapacityError("the server is shutting down")
        if self.stream_count >= self.cfg.max_sessions:
            self.rejected_total.inc()
            raise CapacityError(
                f"all {self.cfg.max_sessions} avatar sessions are in use; try again later"
            )
        self._reserved += 1

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_loop(), name="talkstream-reaper")

    async def close(self) -> None:
        """Close every peer and presenter and stop the reaper."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        await asyncio.gather(*(self.close_peer(p, "shutdown") for p in list(self.peers.values())))
        await asyncio.gather(*(self.close_presenter(n) for n in list(self.presenters)))

    async def _reap_loop(self) -> None:
        interval = min(REAP_INTERVAL_S, self.cfg.idle_timeout_s / 4)
        try:
            while True:
                await asyncio.sleep(interval)
                await self.reap_idle()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("idle reaper failed")
            raise

    async def reap_idle(self) -> None:
        """Close live sessions without input and presenters without input or viewers."""
        now = self.now()
        timeout = self.cfg.idle_timeout_s
        for peer in list(self.peers.values()):
            if peer.kind == "live" and now - peer.stream.last_input_at > timeout:
                log.info("session %s: no audio for %.0f s: closing", peer.id, timeout)
                await self.close_peer(peer, "idle")
        for name, pres in list(self.presenters.items()):
            if not pres.viewers and now - pres.stream.last_input_at > timeout:
                log.info("presenter %s: idle for %.0f s: closing", name, timeout)
                await self.close_presenter(name)

    # -- peers --------------------------------------------------------------------------------

    def _new_pc(self) -> RTCPeerConnection:
        # No STUN server: aiortc would otherwise contact a public one by default.
        return RTCPeerConnection(RTCConfiguration(iceServers=[]))

    def _offer_sdp(self, sdp: str) -> str:
        return keep_loopback_candidates(sdp) if self.cfg.ice_loopback_only else sdp

    def _add_video(self, pc: RTCPeerConnection, stream: AvatarStream) -> None:
        sender = pc.addTrack(AvatarVideoTrack(stream))
        if self.cfg.steady_video_bitrate:
            hold_video_bitrate(sender)

    def _answer(self, pc: RTCPeerConnection) -> RTCSessionDescription:
        desc = pc.localDescription
        sdp = without_remb(desc.sdp) if self.cfg.steady_video_bitrate else desc.sdp
        return RTCSessionDescription(sdp, desc.type)

    async def create_live(self, sdp: str) -> tuple[Peer, RTCSessionDescription]:
        """A live session for an offer whose microphone drives the avatar it receives."""
        self._reserve()
        pc: RTCPeerConnection | None = None
        stream: AvatarStream | None = None
        try:
            sid = uuid.uuid4().hex[:12]
            stream = AvatarStream(
                self.engine,
                self.avatar,
                self.cfg.stream,
                mode="live",
                name=sid,
                metrics=self.metrics,
                now=self.now,
            )
            pc = self._new_pc()
            peer = Peer(sid, "live", pc, stream)
            self._watch(peer)
            await pc.setRemoteDescription(RTCSessionDescription(self._offer_sdp(sdp), "offer"))
            pc.addTrack(AvatarAudioTrack(stream))
            self._add_video(pc, stream)
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
            stream.start()
            self.peers[sid] = peer
            self.sessions_total.inc()
        except BaseException:
            if pc is not None:
                await pc.close()
            if stream is not None:
                await stream.close()
            raise
        finally:
            self._reserved -= 1
        log.info("session %s: started (latency budget %s)", sid, stream.budget)
        return peer, self._answer(pc)

    def _watch(self, peer: Peer) -> None:
        pc = peer.pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio" and peer.kind == "live":
                # The track event comes from setRemoteDescription, before any packet.
                for t in pc.getTransceivers():
                    if t.receiver.track is track:
                        shorten_audio_prefetch(t.receiver, self.cfg.stream.input_prefetch_packets)
                peer.tasks.append(
                    asyncio.create_task(self._consume(peer, track), name=f"mic-{peer.id}")
                )

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.debug("peer %s: connection %s", peer.id, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self.close_peer(peer, pc.connectionState)

    async def _consume(self, peer: Peer, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                peer.stream.push_frame(frame)  # type: ignore[arg-type]
        except MediaStreamError:
            # The remote track ended: the peer went away; the state change closes it.
            log.debug("peer %s: microphone track ended", peer.id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("peer %s: microphone input failed", peer.id)
            task = asyncio.create_task(self.close_peer(peer, "error"))
            # Held until done: the loop keeps only weak references to tasks.
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def close_peer(self, peer: Peer, reason: str) -> None:
        """Close a peer connection and, for a live session, its stream. Idempotent."""
        if peer.closing:
            await peer.closed.wait()
            return
        peer.closing = True
        try:
            self.peers.pop(peer.id, None)
            if peer.presenter is not None:
                peer.presenter.viewers.discard(peer)
            current = asyncio.current_task()
            for t in peer.tasks:
                if t is not current:
                    t.cancel()
            for t in peer.tasks:
                if t is not current:
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
            await peer.pc.close()
            if peer.kind == "live":
                await peer.stream.close()
            self.closed_total.inc()
            log.info("%s %s: closed (%s)", peer.kind, peer.id, reason)
        finally:
            peer.closed.set()

    def get_peer(self, sid: str) -> Peer:
        peer = self.peers.get(sid)
        if peer is None:
            raise NotFoundError(f"no session {sid!r}")
        return peer

    # -- presenters ---------------------------------------------------------------------------

    @staticmethod
    def check_name(name: str) -> str:
        if not PRESENTER_NAME.match(name):
            raise ValueError(
                f"presenter name {name[:80]!r} must be 1-64 letters, digits, '-' or '_'"
            )
        return name

    def get_presenter(self, name: str) -> Presenter:
        pres = self.presenters.get(self.check_name(name))
        if pres is None:
            raise NotFoundError(f"no presenter {name!r}")
        return pres

    def presenter(self, name: str, *, create: bool = True) -> Presenter:
        """The named presenter; created (if ``create``) when it does not exist yet."""
        self.check_name(name)
        pres = self.presenters.get(name)
        if pres is not None:
            return pres
        if not create:
            raise NotFoundError(f"no presenter {name!r}")
        self._reserve()
        try:
            stream = AvatarStream(
                self.engine,
                self.avatar,
                self.cfg.stream,
                mode="presenter",
                name=name,
                metrics=self.metrics,
                now=self.now,
            )
            stream.start()
            pres = Presenter(name, stream)
            self.presenters[name] = pres
        finally:
            self._reserved -= 1
        log.info("presenter %s: created (latency budget %s)", name, stream.budget)
        return pres

    async def close_presenter(self, name: str) -> None:
        pres = self.presenters.pop(name, None)
        if pres is None:
            return
        await asyncio.gather(*(self.close_peer(v, "presenter closed") for v in list(pres.viewers)))
        await pres.stream.close()
        log.info("presenter %s: closed", name)

    async def create_viewer(self, name: str, sdp: str) -> tuple[Peer, RTCSessionDescription]:
        """A peer watching presenter ``name`` (its video and speech, no microphone)."""
        pres = self.get_presenter(name)
        if self._closing:
            raise CapacityError("the server is shutting down")
        if self.viewer_count >= self.cfg.max_viewers:
            self.rejected_total.inc()
            raise CapacityError(f"all {self.cfg.max_viewers} viewer slots are in use")
        pc = self._new_pc()
        vid = uuid.uuid4().hex[:12]
        peer = Peer(vid, "viewer", pc, pres.stream, presenter=pres)
        # Counted before the first await, so concurrent offers cannot overshoot the limit.
        self.peers[vid] = peer
        pres.viewers.add(peer)
        try:
            self._watch(peer)
            await pc.setRemoteDescription(RTCSessionDescription(self._offer_sdp(sdp), "offer"))
            if name not in self.presenters:
                raise NotFoundError(f"presenter {name!r} closed")
            # Only the kinds the viewer asked to receive: an extra track has no m= line.
            kinds = {t.kind for t in pc.getTransceivers()}
            if "audio" in kinds:
                pc.addTrack(AvatarAudioTrack(pres.stream))
            self._add_video(pc, pres.stream)
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except BaseException:
            await self.close_peer(peer, "setup failed")
            raise
        log.info("viewer %s: watching presenter %s", vid, name)
        return peer, self._answer(pc)


__all__ = ["CapacityError", "NotFoundError", "Peer", "Presenter", "SessionManager"]
