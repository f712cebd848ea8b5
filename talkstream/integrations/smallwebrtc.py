"""pipecat's SmallWebRTC output, tuned for a paced talking face (and for any producer).

pipecat 1.14's ``SmallWebRTCTransport`` (aiortc underneath) loses lip sync on its way out: its
audio track pads with silence whenever a block comes late, bursts the silence it fell behind
on, keeps playing the cut sentence after a barge-in, holds live images on a schedule of its
own, and its RTCP sender reports time the voice by when aiortc sent it, not by what it says.
Each function here fixes one of those by patching one method of pipecat's (or aiortc's)
classes, for every connection of the process; :func:`tune_smallwebrtc` applies them all. Each
checks the shape it relies on first, and leaves the class alone (returning False, with a
warning) when the installed version no longer looks like that. They belong upstream.

Frames that :class:`~talkstream.integrations.pipecat.TalkstreamVideoService` emits carry
``metadata[META_KEY]``; the patches recognise its images by that, and its speech blocks by
their content (:data:`MEDIA_TIMES`), since pipecat re-chunks audio into new frames.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Metadata key on the service's frames: {"index": video frame, "media_s": its start on the
# timeline}; on a speech block, the frame whose voice it is.
META_KEY = "talkstream"


def _patch_pipecat(owner: Any, name: str, make: Any, what: str, usable: bool = True) -> bool:
    """Replace ``owner.name`` with ``make(original)``, once (a marked replacement is kept).
    False, changing nothing and saying so, when pipecat no longer has it (or not ``usable``)."""
    original = getattr(owner, name, None)
    done: frozenset[str] = getattr(original, "_talkstream_patches", frozenset())
    if what in done:
        return True
    if original is None or not usable:
        log.warning("pipecat's %s has changed: it is left as it is", what)
        return False
    patched = make(original)
    patched._talkstream_patches = done | {what}
    setattr(owner, name, patched)
    return True


def steady_smallwebrtc_audio() -> bool:
    """Let pipecat's SmallWebRTC audio track take the next block while the current one plays.

    pipecat 1.14's ``RawAudioTrack`` reports a block written once its *last* 10 ms chunk has
    been sent. The output transport writes one block at a time, so it must hand over the next
    within those 10 ms; when the event loop is busier than that (a frame conversion, another
    task), the track sends 10 ms of silence instead and never catches up. Over continuous
    speech the voice so falls further and further behind the service, and behind the lips,
    which Chromium shows on time: measured with ``benchmarks/experiments/pipecat_stages.py``,
    the voice's wait before the track went from 0.15 s to 1.6 s over 20 s of speech on a
    2-core CPU. With this, a write is reported when its *first* chunk goes out: the transport
    has a block's time to hand over the next one, and the track holds at most two blocks
    (up to 70 ms of voice after an interruption instead of 40 ms).

    Changes pipecat's class, for every connection of the process; idempotent. Returns False,
    changing nothing, when the installed pipecat's track does not look as expected.
    """
    return _patch_raw_audio_track(
        "add_audio_bytes",
        _early_write_report,
        "RawAudioTrack (audio handoff)",
        _chunk_queue=deque,
        _bytes_per_10ms=int,
    )


def _patch_raw_audio_track(name: str, make: Any, what: str, **attrs: type) -> bool:
    """:func:`_patch_pipecat` on SmallWebRTC's ``RawAudioTrack``, if a track made now has each
    of ``attrs`` (attribute name -> type) that the patch relies on."""
    try:
        from pipecat.transports.smallwebrtc.transport import RawAudioTrack
    except ImportError:  # pragma: no cover - the webrtc extra of pipecat is missing
        return False
    probe = RawAudioTrack(48_000)
    usable = all(isinstance(getattr(probe, a, None), kind) for a, kind in attrs.items())
    return _patch_pipecat(RawAudioTrack, name, make, what, usable)


def _early_write_report(original: Any) -> Any:
    def add_audio_bytes(self: Any, audio_bytes: bytes) -> Any:
        future = original(self, audio_bytes)
        queue = self._chunk_queue
        n = len(audio_bytes) // self._bytes_per_10ms
        if 1 < n <= len(queue) and queue[-1][1] is future:
            # Move the completion from the block's last chunk to its first.
            queue[-1] = (queue[-1][0], None)
            queue[-n] = (queue[-n][0], future)
        return future

    return add_audio_bytes


LATE_SILENCE_SKIP_S = 0.03  # skip_late_silence(): behind by more than this, silence is skipped


def skip_late_silence() -> bool:
    """Let pipecat's SmallWebRTC audio track skip silence it is late for, not burst it out.

    ``RawAudioTrack`` keeps a schedule of one 10 ms chunk per 10 ms from its creation. When
    aiortc's sender asks for chunks late (a connection's first second is busy: the DTLS
    handshake, the first keyframes, the renderer starting), the track hands out what it is
    behind on as fast as it is asked: silence, back to back, with RTP timestamps that say it
    belongs in the past. Chromium's jitter buffer takes that burst as network jitter and keeps
    it: measured with ``benchmarks/experiments/pipecat_stages.py``, the track fell 50-150 ms
    behind in the first 0.4 s of a connection, and the burst that followed kept Chromium's
    audio jitter buffer at 42-131 ms over the first 4 s (median 87 ms of 6 runs; 46 ms with
    this), the voice that much later than the face.
    With this, a track more than ``LATE_SILENCE_SKIP_S`` behind with nothing queued moves its
    timestamp to the present: the silence it is late for is never sent (the receiver sees a
    gap in the timestamps, as with DTX, and plays on); queued speech still goes out whole.

    Changes pipecat's class, for every connection of the process; idempotent. Returns False,
    changing nothing, when the installed pipecat's track does not look as expected.
    """
    return _patch_raw_audio_track(
        "recv",
        _skip_late_silence,
        "RawAudioTrack (pacing)",
        _chunk_queue=deque,
        _start=float,
        _timestamp=int,
        _sample_rate=int,
        _samples_per_10ms=int,
    )


def _skip_late_silence(original: Any) -> Any:
    async def recv(self: Any) -> Any:
        if self._timestamp > 0 and not self._chunk_queue:
            late = time.time() - (self._start + self._timestamp / self._sample_rate)
            if late > LATE_SILENCE_SKIP_S:
                step = self._samples_per_10ms
                self._timestamp += int(late * self._sample_rate) // step * step
        return await original(self)

    return recv


def drop_smallwebrtc_audio_on_interruption() -> bool:
    """On an interruption, also drop the voice already handed to SmallWebRTC's audio track.

    pipecat 1.14 clears its output transport's queues when the user barges in, but not the
    chunks its ``RawAudioTrack`` holds (one 40 ms block; two with
    :func:`steady_smallwebrtc_audio`), so up to 80 ms of the cut sentence still plays. With
    this, an ``InterruptionFrame`` empties the track too (the writers waiting on those
    chunks are released); the next chunk the track sends is silence. Audio that pipecat marks
    uninterruptible is dropped with it if it already sat in the track (at most those two
    blocks); pipecat's own queues keep theirs.

    Changes pipecat's class, for every output transport of the process; idempotent. Returns
    False, changing nothing, when the installed pipecat does not look as expected.
    """
    try:
        from pipecat.transports.base_output import BaseOutputTransport
        from pipecat.transports.smallwebrtc.transport import SmallWebRTCOutputTransport
    except ImportError:  # pragma: no cover - the webrtc extra of pipecat is missing
        return False

    def make(original: Any) -> Any:
        async def handle_interruptions(self: Any, frame: Any) -> None:
            await original(self, frame)
            transport = getattr(self, "_transport", None)
            if not isinstance(transport, SmallWebRTCOutputTransport):
                return
            track = getattr(getattr(transport, "_client", None), "_audio_output_track", None)
            queue = getattr(track, "_chunk_queue", None)
            if not isinstance(queue, deque):
                return
            while queue:
                _chunk, future = queue.popleft()
                if future is not None and not future.done():
                    future.set_result(True)

        return handle_interruptions

    return _patch_pipecat(
        getattr(BaseOutputTransport, "MediaSender", None),
        "handle_interruptions",
        make,
        "output transport (interruptions)",
    )


def tune_smallwebrtc() -> bool:
    """All of this module's fixes to pipecat's SmallWebRTC output, for every connection of the
    process (call once, before the transports are made): :func:`steady_smallwebrtc_audio`,
    :func:`skip_late_silence`, :func:`prompt_live_video`,
    :func:`drop_smallwebrtc_audio_on_interruption`, :func:`sender_reports_in_media_time` and
    :func:`catch_up_in_pauses`. True when all six took effect."""
    results = [
        steady_smallwebrtc_audio(),
        skip_late_silence(),
        prompt_live_video(),
        drop_smallwebrtc_audio_on_interruption(),
        sender_reports_in_media_time(),
        catch_up_in_pauses(),
    ]
    return all(results)


LIVE_VIDEO_RESET = 5  # frame periods off its schedule after which prompt_live_video() restarts it


def prompt_live_video() -> bool:
    """Send each live image when it arrives instead of one frame period later.

    pipecat 1.14's output transport paces live video (``video_out_is_live``) on a schedule
    fixed by the first image: every image waits for its slot, at least one frame period after
    the first. For a producer that already paces its images (this service does, at 25 fps,
    each image with its audio block), that holds every image by wherever the schedule's phase
    happens to fall (it moves when pipecat resets it) while the audio goes on: the mouth
    leaves later than the voice it belongs to, by an amount that differs per connection
    (measured with ``benchmarks/experiments/pipecat_stages.py``: 4-83 ms in 14
    connections; 2-8 ms with this). With this, this service's images are drawn as they come
    (it paces them), and other live images by a schedule without the extra period: one that
    keeps to the frame rate, or is late, is drawn at once; one early by more than half a
    period waits for its slot, so a producer faster than the frame rate is still slowed to it.

    Changes pipecat's class, for every output transport of the process; idempotent. Returns
    False, changing nothing, when the installed pipecat does not look as expected.
    """
    try:
        from pipecat.transports.base_output import BaseOutputTransport
    except ImportError:  # pragma: no cover - pipecat is a dependency of this module
        return False
    sender = getattr(BaseOutputTransport, "MediaSender", None)
    return _patch_pipecat(
        sender,
        "_video_is_live_handler",
        lambda _original: _prompt_video_is_live_handler,
        "output transport (live video pacing)",
        hasattr(sender, "_draw_image"),
    )


async def _prompt_video_is_live_handler(self: Any) -> None:
    """pipecat's ``MediaSender._video_is_live_handler`` as :func:`prompt_live_video` makes it."""
    image = await self._video_queue.get()
    if META_KEY in (getattr(image, "metadata", None) or {}):
        # TalkstreamVideoService paces its images itself, each beside its audio block.
        await self._draw_image(image)
        self._video_queue.task_done()
        return
    # Other producers: image k's slot is k periods after the first image's arrival
    # (pipecat's: k + 1). An image that is late, on time or early by less than half a
    # period goes at once, so a producer that keeps the frame rate is never held and one
    # that fell behind catches up; an image early by more waits for its slot (a faster
    # producer is slowed to the rate). Far off the schedule either way (a pause), the
    # schedule starts again from this image.
    period = 1.0 / self._params.video_out_framerate
    now = time.monotonic()
    k, start = getattr(self, "_talkstream_slots", (0, None))
    if start is None or abs(start + k * period - now) > LIVE_VIDEO_RESET * period:
        start = now - k * period
    slot = start + k * period
    if slot - now > period / 2:
        await asyncio.sleep(slot - now)
    self._talkstream_slots = (k + 1, start)
    await self._draw_image(image)
    self._video_queue.task_done()


# ----------------------------------------------------------------------------- sender reports


class MediaTimes:
    """When the content of each recent speech block is due: the wall time (``time.time()``)
    at which the service sends the image that shows it, and when the service sent the speech
    itself (``lead`` earlier), by the digest of each 10 ms of it.

    The service notes every speech block it emits (:meth:`note`); the audio track looks its
    chunks up as pipecat hands them over (:meth:`take`). Digests, because pipecat's output
    transport cuts the service's frames into new ones and their metadata is lost; 10 ms
    pieces, because that is the track's unit whatever chunk size the transport uses. Silent
    pieces are not noted (all alike). Bounded: the oldest go first.
    """

    PIECE_BYTES = 960  # 10 ms of 48 kHz mono int16

    def __init__(self, size: int = 1024) -> None:
        self._due: OrderedDict[bytes, tuple[float, float]] = OrderedDict()
        self._size = size

    @staticmethod
    def _key(piece: bytes) -> bytes:
        return hashlib.blake2b(piece, digest_size=12).digest()

    def note(self, pcm: bytes, due: float, *, lead: float = 0.0, rate: int = 48_000) -> None:
        """``pcm`` (48 kHz mono int16), sent ``lead`` s ahead of its image, is due at ``due``;
        each 10 ms of it 10 ms later."""
        n = self.PIECE_BYTES
        for i in range(0, len(pcm) - n + 1, n):
            piece = pcm[i : i + n]
            if not piece.strip(b"\0"):
                continue
            key = self._key(piece)
            at = due + (i // 2) / rate
            self._due[key] = (at, at - lead)
            self._due.move_to_end(key)
        while len(self._due) > self._size:
            self._due.popitem(last=False)

    def take(self, piece: bytes) -> tuple[float, float] | None:
        """(due, sent) of the 10 ms ``piece`` (and forget it), or None if never noted."""
        if not piece.strip(b"\0"):
            return None
        return self._due.pop(self._key(piece), None)


MEDIA_TIMES = MediaTimes()


def sender_reports_in_media_time() -> bool:
    """Let SmallWebRTC's RTCP sender reports tell when the media they time is due.

    A receiver lines voice and face up by the sender reports: each maps an RTP timestamp to
    a wall-clock time, and Chromium delays the video while the voice is behind. aiortc maps
    a packet to the time it *sent* it. For the images that is after the VP8 encoder; for the
    voice, after pipecat's output queue and audio track held each speech block 15-120 ms, a
    different amount per connection (measured with
    ``benchmarks/experiments/pipecat_stages.py``), and the service may send the voice ahead of
    its images on purpose (``TalkstreamVideoService(audio_lead_ms=...)``). With this, every
    report says when its media is due: for an image, when it was handed to the video track
    (the service sends each when it is due); for the voice, the wall time the service noted
    for that content in :data:`MEDIA_TIMES` (when the image that shows it goes out). Chromium
    then plays the voice with the images that show it, whatever the waits in between.

    Patches pipecat's ``RawAudioTrack`` and ``RawVideoTrack`` (where and when media enters
    and leaves them) and aiortc's ``RTCRtpSender`` (its reports). Reports of other tracks, and
    of audio with no speech noted yet, are left as they were. Idempotent. Returns False,
    changing nothing, when any of them no longer looks as expected.
    """
    global _REPORTS_IN_MEDIA_TIME
    try:
        import aiortc.rtcrtpsender as rtcrtpsender
        from aiortc.rtp import RtcpSrPacket
        from pipecat.transports.smallwebrtc.transport import RawVideoTrack
    except ImportError:  # pragma: no cover - the webrtc extra of pipecat is missing
        return False
    sender = rtcrtpsender.RTCRtpSender
    probe = RawVideoTrack(16, 16)
    video_ok = isinstance(getattr(probe, "_video_buffer", None), asyncio.Queue)
    ok = (
        _patch_raw_audio_track(
            "add_audio_bytes",
            _anchor_media_time,
            "RawAudioTrack (media time)",
            _chunk_queue=deque,
            _timestamp=int,
            _bytes_per_10ms=int,
        )
        and _patch_raw_audio_track(
            "recv", _note_audio_handout, "RawAudioTrack (hand-out time)", _timestamp=int
        )
        and _patch_pipecat(
            RawVideoTrack, "add_video_frame", _note_image_added, "RawVideoTrack (in)", video_ok
        )
        and _patch_pipecat(
            RawVideoTrack, "recv", _note_image_handout, "RawVideoTrack (out)", video_ok
        )
        and _patch_pipecat(
            sender,
            "_send_rtcp",
            lambda original: _media_time_reports(original, RtcpSrPacket),
            "aiortc sender (RTCRtpSender's reports)",
            "_RTCRtpSender__lsr" in sender._run_rtcp.__code__.co_names and hasattr(sender, "track"),
        )
    )
    _REPORTS_IN_MEDIA_TIME = _REPORTS_IN_MEDIA_TIME or ok
    return ok


_REPORTS_IN_MEDIA_TIME = False


def reports_in_media_time() -> bool:
    """Whether :func:`sender_reports_in_media_time` has taken effect in this process."""
    return _REPORTS_IN_MEDIA_TIME


def _anchor_media_time(original: Any) -> Any:
    def add_audio_bytes(self: Any, audio_bytes: bytes) -> Any:
        times = MEDIA_TIMES.take(audio_bytes[: self._bytes_per_10ms])
        if times is not None:
            # Where its first sample lands: after what the track already holds.
            queued = sum(len(chunk) for chunk, _ in self._chunk_queue) // 2
            self._talkstream_anchor = (self._timestamp + queued, *times)
        return original(self, audio_bytes)

    return add_audio_bytes


def _note_audio_handout(original: Any) -> Any:
    async def recv(self: Any) -> Any:
        frame = await original(self)
        self._talkstream_handout = (int(frame.pts), time.time())
        return frame

    return recv


def _note_image_added(original: Any) -> Any:
    def add_video_frame(self: Any, frame: Any) -> None:
        # One entry per queued image (unbounded as the track's queue is: they pair up by order).
        added = self.__dict__.setdefault("_talkstream_added", deque())
        added.append(time.time())
        original(self, frame)

    return add_video_frame


def _note_image_handout(original: Any) -> Any:
    async def recv(self: Any) -> Any:
        frame = await original(self)
        added = self.__dict__.get("_talkstream_added")
        if added:  # the track hands images out in the order they came
            out = self.__dict__.setdefault("_talkstream_handouts", deque(maxlen=8))
            out.append((time.time(), added.popleft()))
        return frame

    return recv


_NTP_UNIX_S = 2_208_988_800  # NTP's epoch (1900) to Unix time's (1970)


CATCH_UP_S = 0.02  # catch_up_in_pauses(): a voice held longer than this loses silent 10 ms
PAUSE_LEVEL = 100  # catch_up_in_pauses(): 10 ms whose samples all stay below this (-50 dBFS)


def catch_up_in_pauses() -> bool:
    """Let SmallWebRTC's audio track drop silence from a voice it holds too long.

    Whatever pipecat's output queue and audio track hold when a turn starts stays for the
    whole turn: the voice is then sent in real time, one block per block, and the backlog
    never drains (measured with ``benchmarks/experiments/pipecat_stages.py``: 15-120 ms per
    connection, set by the first blocks of the first turn). Reports in media time let
    Chromium delay the face to match, but only after seconds, and at the cost of latency.
    With this, when the next queued 10 ms is silence inside speech (a pause between words or
    sentences: every sample below ``PAUSE_LEVEL``, -50 dBFS) and the voice at the head of the
    queue was sent by the service more than ``CATCH_UP_S`` ago, that 10 ms is dropped: the
    pause is 10 ms shorter and the voice after it leaves 10 ms sooner, until it is on time.
    Speech is never dropped, nor silence the service did not send (the track's own, between
    turns).

    Needs :func:`sender_reports_in_media_time` (it knows when the service sent the voice);
    patches pipecat's ``RawAudioTrack``. Idempotent; False, changing nothing, when the track
    no longer looks as expected.
    """
    return sender_reports_in_media_time() and _patch_raw_audio_track(
        "recv",
        _catch_up,
        "RawAudioTrack (catch up)",
        _chunk_queue=deque,
        _timestamp=int,
        _sample_rate=int,
        _samples_per_10ms=int,
    )


def _is_pause(chunk: bytes) -> bool:
    """A silent 10 ms (a resampled pause is not all zeros: the filter rings at +-a few)."""
    return int(np.abs(np.frombuffer(chunk, dtype=np.int16)).max()) < PAUSE_LEVEL


def _catch_up(original: Any) -> Any:
    async def recv(self: Any) -> Any:
        queue = self._chunk_queue
        anchor = getattr(self, "_talkstream_anchor", None)
        if anchor is not None and len(queue) > 1:
            a_pts, a_due, a_sent = anchor
            dropped = False
            while len(queue) > 1 and _is_pause(queue[0][0]):
                # When the service sent the head of the queue (the voice goes out contiguous).
                sent = a_sent + (self._timestamp - a_pts) / self._sample_rate
                if time.time() - sent <= CATCH_UP_S:
                    break
                _chunk, future = queue.popleft()
                if future is not None and not future.done():
                    future.set_result(True)
                # What follows now goes out 10 ms sooner.
                a_pts -= self._samples_per_10ms
                dropped = True
                self._talkstream_dropped_s = getattr(self, "_talkstream_dropped_s", 0.0) + 0.01
            if dropped:
                self._talkstream_anchor = (a_pts, a_due, a_sent)
        return await original(self)

    return recv


def _report_shift(track: Any, ntp_timestamp: int) -> float | None:
    """Seconds to move a sender report of ``track`` by, or None to leave it."""
    anchor = getattr(track, "_talkstream_anchor", None)
    handout = getattr(track, "_talkstream_handout", None)
    if anchor is not None and handout is not None:  # audio
        # The content handed out last is due at its anchor's time + its distance in samples;
        # it left at its hand-out time: the report moves by the difference.
        (a_pts, a_due, _sent), (h_pts, h_time) = anchor, handout
        return float(a_due + (h_pts - a_pts) / track._sample_rate - h_time)
    handouts = getattr(track, "__dict__", {}).get("_talkstream_handouts")
    if handouts:  # video
        # The report's packet belongs to the last image handed out before it was sent (the
        # encoder takes less than a frame period): it is due when it came to the track.
        sent = ntp_timestamp / (1 << 32) - _NTP_UNIX_S
        before = [added for t, added in handouts if t <= sent]
        if before:
            return float(before[-1] - sent)
    return None


def _media_time_reports(original: Any, report_type: Any) -> Any:
    async def _send_rtcp(self: Any, packets: list[Any]) -> None:
        for p in packets:
            if isinstance(p, report_type) and p.ssrc == self._ssrc:
                shift = _report_shift(self.track, p.sender_info.ntp_timestamp)
                if shift is not None:
                    info = p.sender_info
                    info.ntp_timestamp = (info.ntp_timestamp + round(shift * (1 << 32))) % (1 << 64)
                    # aiortc matches the receiver's echo of the report against this (RTT).
                    self._RTCRtpSender__lsr = (info.ntp_timestamp >> 16) & 0xFFFFFFFF
        await original(self, packets)

    return _send_rtcp


__all__ = [
    "CATCH_UP_S",
    "MEDIA_TIMES",
    "META_KEY",
    "PAUSE_LEVEL",
    "MediaTimes",
    "catch_up_in_pauses",
    "drop_smallwebrtc_audio_on_interruption",
    "prompt_live_video",
    "reports_in_media_time",
    "sender_reports_in_media_time",
    "skip_late_silence",
    "steady_smallwebrtc_audio",
    "tune_smallwebrtc",
]
