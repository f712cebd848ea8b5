"""One avatar stream sent to an SFU, and aiortc viewers of it.

A :class:`Publication` is one aiortc peer connection carrying one :class:`AvatarStream`'s
video (VP8) and voice (Opus): the stream renders once and the peer encodes once, whatever the
audience; the SFU fans the packets out. The offer goes either to a Janus VideoRoom through the
HTTP API (:func:`publish_to_janus`) or to any WHIP endpoint (:func:`publish_to_whip`).

:func:`watch_janus` is an aiortc subscriber of a VideoRoom feed (tests, the benchmark): it
records what arrives, and optionally how much a region of the picture (the mouth) changes from
frame to frame, without keeping the frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, VideoFrame

from talkstream.errors import TalkstreamError
from talkstream.publish import janus
from talkstream.publish.whip import IceServer, WhipClient
from talkstream.streaming.tracks import AvatarAudioTrack, AvatarStream, AvatarVideoTrack

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 20.0
HANGUP_GRACE_S = 2.0  # a Janus connection that closed: how long its hangup event may take


class PublishError(TalkstreamError):
    """The stream could not be published (the message says where and why)."""


def _rtc_ice_servers(servers: Sequence[IceServer]) -> list[RTCIceServer]:
    return [
        RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in servers
    ]


def _prefer(transceiver: Any, kind: str, mime: str) -> None:
    caps = RTCRtpSender.getCapabilities(kind).codecs
    chosen = [c for c in caps if c.mimeType == mime]
    rtx = [c for c in caps if c.mimeType == f"{kind}/rtx"]
    if chosen:
        transceiver.setCodecPreferences(chosen + rtx)


Tracks = tuple[MediaStreamTrack, MediaStreamTrack]  # (voice, face)


def stream_tracks(stream: AvatarStream) -> Tracks:
    """An avatar stream's voice and face as aiortc tracks."""
    return AvatarAudioTrack(stream), AvatarVideoTrack(stream)


def publisher_peer(tracks: Tracks, ice_servers: Sequence[IceServer] = ()) -> RTCPeerConnection:
    """A send-only peer with a voice (Opus) and a face (VP8, bitrate held)."""
    from talkstream.streaming.sessions import hold_video_bitrate

    pc = RTCPeerConnection(RTCConfiguration(iceServers=_rtc_ice_servers(ice_servers)))
    audio = pc.addTransceiver(tracks[0], direction="sendonly")
    video = pc.addTransceiver(tracks[1], direction="sendonly")
    _prefer(audio, "audio", "audio/opus")
    # VP8: what a VideoRoom and every browser take; one codec, so no SFU ever transcodes.
    _prefer(video, "video", "video/VP8")
    # The SFU's bandwidth estimates (REMB) would restart the encoder at each step; one encode
    # at a steady quality serves every viewer.
    hold_video_bitrate(video.sender)
    return pc


def _tracks(stream: AvatarStream | Tracks) -> Tracks:
    return stream if isinstance(stream, tuple) else stream_tracks(stream)


def _stream(stream: AvatarStream | Tracks) -> AvatarStream | None:
    return None if isinstance(stream, tuple) else stream


async def _wait_connected(pc: RTCPeerConnection, timeout: float, where: str) -> None:
    done = asyncio.Event()

    def check() -> None:
        if pc.connectionState in ("connected", "failed", "closed"):
            done.set()

    pc.on("connectionstatechange", check)
    check()
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except TimeoutError:
        raise PublishError(
            f"no media connection to {where} within {timeout:.0f} s (ICE did not complete: "
            "is the SFU reachable over UDP from here, or does it need a TURN server?)"
        ) from None
    finally:
        pc.remove_listener("connectionstatechange", check)
    if pc.connectionState != "connected":
        raise PublishError(f"the media connection to {where} {pc.connectionState}")


@dataclass(eq=False)
class Publication:
    """A stream being sent to an SFU. ``ended`` is set when the connection goes away."""

    pc: RTCPeerConnection
    stream: AvatarStream | None  # None: tracks fed by someone else (talkstream live)
    target: str
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str = ""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _closed: bool = False

    def _watch(self) -> None:
        @self.pc.on("connectionstatechange")
        def on_state() -> None:
            if self.pc.connectionState in ("failed", "closed") and not self._closed:
                self._connection_lost(f"connection {self.pc.connectionState}")

    def _connection_lost(self, reason: str) -> None:
        """The peer connection went away (not by :meth:`close`); subclasses may wait for the
        SFU's own word on why."""
        self._end(reason)

    def _end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()

    async def _release(self) -> None:
        """Tell the SFU we are gone (subclasses)."""

    async def close(self) -> None:
        """Stop sending and release the SFU's resource. Idempotent; the stream stays open."""
        if self._closed:
            return
        self._closed = True
        for t in self.tasks:
            t.cancel()
        try:
            await self._release()
        finally:
            await self.pc.close()
            self._end("closed")


@dataclass(eq=False)
class JanusPublication(Publication):
    session: janus.JanusSession | None = None
    handle: janus.JanusHandle | None = None
    room: int = 0
    feed: int = 0

    async def _release(self) -> None:
        if self.session is not None:
            await self.session.close()  # destroys the handle: the feed leaves the room

    def _connection_lost(self, reason: str) -> None:
        # Janus closes the DTLS connection as it hangs up, and its hangup event (which says
        # why) may come a moment later over the API: wait for it briefly.
        handle = self.handle
        if handle is None:
            self._end(reason)
            return

        async def prefer_hangup() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(handle.closed.wait(), HANGUP_GRACE_S)
            if handle.closed.is_set():
                self._hung_up()
            else:
                self._end(reason)

        self.tasks.append(asyncio.create_task(prefer_hangup()))

    def _hung_up(self) -> None:
        said = self.handle.hangup_reason if self.handle is not None else ""
        close_reason = self.session.close_reason if self.session is not None else ""
        self._end(f"Janus hung up: {said or close_reason}")


@dataclass(eq=False)
class WhipPublication(Publication):
    client: WhipClient | None = None

    async def _release(self) -> None:
        if self.client is not None:
            try:
                await self.client.delete()
            finally:
                await self.client.close()


async def publish_to_janus(
    stream: AvatarStream | Tracks,
    url: str,
    room: int,
    *,
    display: str = "talkstream",
    create_room: bool = True,
    ice_servers: Sequence[IceServer] = (),
    http: aiohttp.ClientSession | None = None,
    timeout: float = CONNECT_TIMEOUT_S,
    keepalive_s: float = janus.KEEPALIVE_S,
) -> JanusPublication:
    """Publish ``stream`` (or a voice and face track) into VideoRoom ``room`` of the Janus at
    ``url`` (``.../janus``).

    Creates the room if needed (``create_room``); returns once media flows (Janus's
    ``webrtcup``). The stream must be started by the caller. ``keepalive_s`` must stay under
    the Janus's ``session_timeout`` (60 s by default).
    """
    session = await janus.JanusSession.open(url, http=http, keepalive_s=keepalive_s)
    pc: RTCPeerConnection | None = None
    try:
        handle = await session.attach(janus.VIDEOROOM)
        if create_room:
            await janus.ensure_room(handle, room)
        pc = publisher_peer(_tracks(stream), ice_servers)
        await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate
        feed, answer = await janus.publish(handle, room, pc.localDescription.sdp, display=display)
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        where = f"Janus room {room} at {url}"
        await _wait_connected(pc, timeout, where)
        try:
            await asyncio.wait_for(handle.webrtc_up.wait(), timeout)
        except TimeoutError:
            raise PublishError(f"{where} never reported the publisher's media up") from None
    except BaseException:
        if pc is not None:
            await pc.close()
        await session.close()
        raise
    pub = JanusPublication(
        pc, _stream(stream), where, session=session, handle=handle, room=room, feed=feed
    )
    pub._watch()

    async def watch_session() -> None:
        await handle.closed.wait()
        pub._hung_up()

    pub.tasks.append(asyncio.create_task(watch_session()))
    return pub


async def publish_to_whip(
    stream: AvatarStream | Tracks,
    endpoint: str,
    *,
    token: str | None = None,
    ice_servers: Sequence[IceServer] | None = None,
    http: aiohttp.ClientSession | None = None,
    timeout: float = CONNECT_TIMEOUT_S,
) -> WhipPublication:
    """Publish ``stream`` to the WHIP ``endpoint``; returns once media flows.

    ICE servers: ``ice_servers`` if given, else those the endpoint lists in ``Link`` headers
    of an ``OPTIONS`` reply (a server that does not answer OPTIONS gives none). aiortc does not
    trickle, so servers first named in the 201 reply are recorded (``client.ice_servers``) but
    this connection cannot use them.
    """
    client = WhipClient(endpoint, token=token, http=http)
    pc: RTCPeerConnection | None = None
    try:
        servers = list(ice_servers) if ice_servers is not None else await client.discover()
        pc = publisher_peer(_tracks(stream), servers)
        await pc.setLocalDescription(await pc.createOffer())
        answer = await client.publish(pc.localDescription.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await _wait_connected(pc, timeout, f"WHIP endpoint {endpoint}")
    except BaseException:
        if pc is not None:
            await pc.close()
        with contextlib.suppress(TalkstreamError):
            await client.delete()
        await client.close()
        raise
    pub = WhipPublication(pc, _stream(stream), endpoint, client=client)
    pub._watch()
    return pub


# -- viewers ----------------------------------------------------------------------------------


@dataclass
class ViewerStats:
    """What an aiortc viewer received (times are ``time.monotonic()``)."""

    video_arrivals: list[float] = field(default_factory=list)
    video_pts: list[int] = field(default_factory=list)
    audio_arrivals: list[float] = field(default_factory=list)
    audio_rms: list[float] = field(default_factory=list)
    # Per video frame from the second on: mean absolute change of the watched region.
    region_change: list[float] = field(default_factory=list)
    frame_size: tuple[int, int] | None = None

    def fps(self, last_s: float | None = None) -> float:
        """Received video frames per second (over the last ``last_s`` seconds)."""
        from talkstream.streaming.client import arrival_rate

        return arrival_rate(self.video_arrivals, last_s)


async def collect(
    track: MediaStreamTrack, st: ViewerStats, box: tuple[int, int, int, int] | None
) -> None:
    """Record what ``track`` delivers into ``st`` until it ends (and the change of ``box``)."""
    prev: np.ndarray | None = None
    try:
        while True:
            frame = await track.recv()
            now = time.monotonic()
            if isinstance(frame, VideoFrame):
                st.video_arrivals.append(now)
                st.video_pts.append(int(frame.pts or 0))
                st.frame_size = (frame.width, frame.height)
                if box is not None:
                    x0, y0, x1, y1 = box
                    gray = frame.to_ndarray(format="gray")[y0:y1, x0:x1].astype(np.float32)
                    if prev is not None and prev.shape == gray.shape:
                        st.region_change.append(float(np.abs(gray - prev).mean()))
                    prev = gray
            elif isinstance(frame, AudioFrame):
                x = frame.to_ndarray().astype(np.float32) / 32768.0
                st.audio_arrivals.append(now)
                st.audio_rms.append(float(np.sqrt(np.mean(x * x))) if x.size else 0.0)
    except MediaStreamError:
        pass


@dataclass(eq=False)
class JanusViewer:
    """An aiortc subscriber of one VideoRoom feed."""

    pc: RTCPeerConnection
    session: janus.JanusSession
    stats: ViewerStats
    tasks: list[asyncio.Task[None]]

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.pc.close()
        await self.session.close()


async def wait_for_feed(handle: janus.JanusHandle, room: int, timeout: float = 10.0) -> int:
    """The id of the first publisher in ``room``, waiting for one to appear."""
    deadline = time.monotonic() + timeout
    while True:
        pubs = await janus.list_publishers(handle, room)
        if pubs:
            return int(pubs[0]["id"])
        if time.monotonic() > deadline:
            raise PublishError(f"no publisher in Janus room {room} after {timeout:.0f} s")
        await asyncio.sleep(0.2)


async def watch_janus(
    url: str,
    room: int,
    feed: int | None = None,
    *,
    region: tuple[int, int, int, int] | None = None,
    http: aiohttp.ClientSession | None = None,
    timeout: float = CONNECT_TIMEOUT_S,
) -> JanusViewer:
    """Subscribe to ``feed`` (default: the room's first publisher) of VideoRoom ``room``.

    ``region`` (x0, y0, x1, y1): record how much that part of each frame changes.
    """
    session = await janus.JanusSession.open(url, http=http)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    st = ViewerStats()
    tasks: list[asyncio.Task[None]] = []

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        tasks.append(asyncio.create_task(collect(track, st, region)))

    try:
        handle = await session.attach(janus.VIDEOROOM)
        if feed is None:
            feed = await wait_for_feed(handle, room, timeout)
        offer = await janus.subscribe(handle, room, feed)
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        await janus.start_subscription(handle, pc.localDescription.sdp)
        await _wait_connected(pc, timeout, f"Janus room {room} (viewer)")
    except BaseException:
        await pc.close()
        await session.close()
        raise
    return JanusViewer(pc, session, st, tasks)


__all__ = [
    "JanusPublication",
    "JanusViewer",
    "Publication",
    "PublishError",
    "ViewerStats",
    "WhipPublication",
    "collect",
    "publish_to_janus",
    "publish_to_whip",
    "publisher_peer",
    "stream_tracks",
    "wait_for_feed",
    "watch_janus",
]
