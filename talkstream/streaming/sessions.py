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
from talkstream.streaming.config import ServeConfig, default_max_sessions
from talkstream.streaming.metrics import Registry, StreamMetrics
from talkstream.streaming.sdp import OfferError, keep_loopback_candidates, without_remb
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
    # Liveness, on the manager's clock: when the offer came, when ICE+DTLS connected, when the
    # connection went "disconnected" (None: it is not), the last RTCP packet from the client.
    created_at: float = 0.0
    connected_at: float | None = None
    disconnected_at: float | None = None
    last_rtcp_at: float | None = None


@dataclass(eq=False)
class Presenter:
    """A named avatar whose speech is pushed; rendered once, watched by ``viewers``."""

    name: str
    stream: AvatarStream
    viewers: set[Peer] = field(default_factory=set)
    # Open WebSocket pushers: a presenter with one is not idle (a pusher may pause).
    pushers: int = 0


def watch_rtcp(
    sender: RTCRtpSender, on_packet: Callable[[], None], *, drop_remb: bool = False
) -> bool:
    """Call ``on_packet`` for every RTCP packet the client sends about ``sender`` (its
    receiver reports: proof that the client is still there), and with ``drop_remb`` make the
    sender ignore receiver bitrate estimates (REMB).

    aiortc restarts its video encoder, with a keyframe at a new quality, whenever an estimate
    moves the target by more than 10 %; Chrome sends estimates every second or so (even when
    the answer negotiates none), so a steady face would pulse. The encoder keeps its default
    bitrate instead (VP8 500 kbit/s, H.264 1 Mbit/s). aiortc has no option for either, so the
    sender's RTCP handler is wrapped. Returns whether it could be.
    """
    original = getattr(sender, "_handle_rtcp_packet", None)
    if original is None:
        log.warning("this aiortc has no RTCRtpSender._handle_rtcp_packet: RTCP is not watched")
        return False

    async def handle(packet: object) -> None:
        on_packet()
        if drop_remb and isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            return
        await original(packet)

    sender._handle_rtcp_packet = handle  # type: ignore[method-assign]
    return True


def hold_video_bitrate(sender: RTCRtpSender) -> None:
    """Make an aiortc video sender ignore receiver bitrate estimates (see :func:`watch_rtcp`)."""
    watch_rtcp(sender, lambda: None, drop_remb=True)


class NegotiationError(OfferError):
    """aiortc could not answer an offer that passed the checks (HTTP 400)."""


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
        # Streams rendering at once: the config's, or (0) what the engine's device holds.
        self.max_sessions = cfg.max_sessions or default_max_sessions(engine.cfg.device)
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
            "talkstream_session_capacity", "max_sessions.", lambda: float(self.max_sessions)
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
        if self.stream_count >= self.max_sessions:
            self.rejected_total.inc()
            raise CapacityError(
                f"all {self.max_sessions} avatar sessions are in use; try again later"
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
        interval = min(
            REAP_INTERVAL_S,
            self.cfg.idle_timeout_s / 4,
            self.cfg.connect_timeout_s / 4,
            self.cfg.disconnect_grace_s / 2,
        )
        try:
            while True:
                await asyncio.sleep(interval)
                await self.reap_idle()
                await self.reap_abandoned()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("idle reaper failed")
            raise

    async def reap_idle(self) -> None:
        """Close live sessions without input and presenters without input, viewers or
        pushers."""
        now = self.now()
        timeout = self.cfg.idle_timeout_s
        for peer in list(self.peers.values()):
            if peer.kind == "live" and now - peer.stream.last_input_at > timeout:
                log.info("session %s: no audio for %.0f s: closing", peer.id, timeout)
                await self.close_peer(peer, "idle")
        for name, pres in list(self.presenters.items()):
            if not pres.viewers and not pres.pushers and now - pres.stream.last_input_at > timeout:
                log.info("presenter %s: idle for %.0f s: closing", name, timeout)
                await self.close_presenter(name)

    def abandoned_reason(self, peer: Peer, now: float) -> str | None:
        """Why ``peer`` should be closed as gone, or None while it is alive."""
        cfg = self.cfg
        if peer.connected_at is None:
            if now - peer.created_at > cfg.connect_timeout_s:
                return f"not connected {cfg.connect_timeout_s:g} s after its offer"
            return None
        if peer.disconnected_at is not None and now - peer.disconnected_at > cfg.disconnect_grace_s:
            return f"disconnected for {cfg.disconnect_grace_s:g} s"
        heard = peer.last_rtcp_at if peer.last_rtcp_at is not None else peer.connected_at
        if now - heard > cfg.peer_silence_timeout_s:
            return f"no RTCP from the client for {cfg.peer_silence_timeout_s:g} s"
        return None

    async def reap_abandoned(self) -> None:
        """Close peers (live sessions and viewers) that never connected, stayed disconnected,
        or went silent, so their slots are free again within seconds."""
        now = self.now()
        for peer in list(self.peers.values()):
            reason = self.abandoned_reason(peer, now)
            if reason is not None:
                log.info("%s %s: %s: closing", peer.kind, peer.id, reason)
                await self.close_peer(peer, "abandoned")

    # -- peers --------------------------------------------------------------------------------

    def _new_pc(self) -> RTCPeerConnection:
        # No STUN server: aiortc would otherwise contact a public one by default.
        return RTCPeerConnection(RTCConfiguration(iceServers=[]))

    def _offer_sdp(self, sdp: str) -> str:
        return keep_loopback_candidates(sdp) if self.cfg.ice_loopback_only else sdp

    def _add_tracks(self, peer: Peer, *, audio: bool) -> None:
        def heard() -> None:
            peer.last_rtcp_at = self.now()

        if audio:
            watch_rtcp(peer.pc.addTrack(AvatarAudioTrack(peer.stream)), heard)
        sender = peer.pc.addTrack(AvatarVideoTrack(peer.stream))
        watch_rtcp(sender, heard, drop_remb=self.cfg.steady_video_bitrate)

    def _answer(self, pc: RTCPeerConnection) -> RTCSessionDescription:
        desc = pc.localDescription
        sdp = without_remb(desc.sdp) if self.cfg.steady_video_bitrate else desc.sdp
        return RTCSessionDescription(sdp, desc.type)

    async def _negotiate(self, peer: Peer, sdp: str, *, audio: bool | None) -> None:
        """Answer the offer on ``peer.pc``; any failure of aiortc's is a
        :class:`NegotiationError` (the caller closes the peer). ``audio=None``: send audio
        only when the offer has an audio section."""
        pc = peer.pc
        try:
            await pc.setRemoteDescription(RTCSessionDescription(self._offer_sdp(sdp), "offer"))
            if audio is None:
                audio = "audio" in {t.kind for t in pc.getTransceivers()}
            self._add_tracks(peer, audio=audio)
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except (asyncio.CancelledError, OfferError, NotFoundError, CapacityError):
            raise
        except Exception as e:
            # aiortc raises ValueError, OperationError, AttributeError, KeyError ... for
            # offers it cannot answer; the client gets a 400, the log the details.
            log.info("%s %s: offer not negotiable: %r", peer.kind, peer.id, e)
            raise NegotiationError(
                "the offer cannot be negotiated: send the offer exactly as createOffer() made "
                "it, with audio/video sections the server can answer"
            ) from None

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
            peer = Peer(sid, "live", pc, stream, created_at=self.now())
            self._watch(peer)
            await self._negotiate(peer, sdp, audio=True)
            stream.start()
            self.peers[sid] = peer
            self.sessions_total.inc()
        except BaseException:
            if pc is not None:
                await _close_pc(pc)
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
            state = pc.connectionState
            log.debug("peer %s: connection %s", peer.id, state)
            if state == "connected":
                if peer.connected_at is None:
                    peer.connected_at = self.now()
                peer.disconnected_at = None
            elif state == "disconnected":
                # Often transient (a network change): closed by the reaper after a grace.
                if peer.disconnected_at is None:
                    peer.disconnected_at = self.now()
            elif state in ("failed", "closed"):
                await self.close_peer(peer, state)

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
            await _close_pc(peer.pc)
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
        peer = Peer(vid, "viewer", pc, pres.stream, presenter=pres, created_at=self.now())
        # Counted before the first await, so concurrent offers cannot overshoot the limit.
        self.peers[vid] = peer
        pres.viewers.add(peer)
        try:
            self._watch(peer)
            # Only the kinds the viewer asked to receive: an extra track has no m= line.
            await self._negotiate(peer, sdp, audio=None)
            if self.presenters.get(name) is not pres:
                raise NotFoundError(f"presenter {name!r} closed")
        except BaseException:
            await self.close_peer(peer, "setup failed")
            raise
        log.info("viewer %s: watching presenter %s", vid, name)
        return peer, self._answer(pc)


async def _close_pc(pc: RTCPeerConnection) -> None:
    """Close a peer connection; one that a failed negotiation left half set up may fail to
    close cleanly, which must not stop the rest of the teardown."""
    try:
        await pc.close()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.warning("closing a peer connection failed", exc_info=True)


__all__ = [
    "CapacityError",
    "NegotiationError",
    "NotFoundError",
    "Peer",
    "Presenter",
    "SessionManager",
    "watch_rtcp",
]
