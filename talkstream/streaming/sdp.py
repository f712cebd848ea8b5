"""Checks on untrusted SDP offers, and loopback-only ICE.

An offer is checked before any peer connection is made for it, so a malformed one costs nothing
and its reason can be told to the client (400) instead of surfacing later as a failed
connection.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

# What aiortc can decode/encode, by SDP codec name (lower case).
AUDIO_CODECS = frozenset({"opus", "pcmu", "pcma", "g722"})
VIDEO_CODECS = frozenset({"vp8", "h264"})
_LOOPBACK_ADDRESSES = ("127.0.0.1",)
_FINGERPRINT_ALGORITHMS = frozenset({"sha-1", "sha-224", "sha-256", "sha-384", "sha-512"})
_FINGERPRINT_VALUE = re.compile(r"^(?:[0-9A-Fa-f]{2}:)+[0-9A-Fa-f]{2}$")


class OfferError(ValueError):
    """An SDP offer the server cannot answer; the message says why."""


@dataclass(frozen=True)
class OfferInfo:
    """What an offer asks for."""

    sends_audio: bool  # the peer will send us an audio track (a microphone)
    receives_audio: bool
    receives_video: bool


def check_offer(sdp: str, *, need_mic: bool, max_bytes: int) -> OfferInfo:
    """Parse and check an offer's SDP.

    Args:
        sdp: the offer's ``sdp`` text.
        need_mic: the offer must send audio (a live session); otherwise it must receive video
            (a viewer).
        max_bytes: size limit of the SDP text.

    Raises:
        OfferError: not SDP, too large, no usable media, or only codecs the server lacks.
    """
    from aiortc.sdp import SessionDescription

    if len(sdp.encode("utf-8", "replace")) > max_bytes:
        raise OfferError(f"the SDP offer is larger than {max_bytes} bytes")
    if not sdp.startswith("v=0"):
        raise OfferError("the offer's sdp is not an SDP session description (must start v=0)")
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as e:
        log.debug("unparsable SDP offer", exc_info=True)
        raise OfferError(f"the SDP offer cannot be parsed ({type(e).__name__}: {e})") from e
    if not desc.media:
        raise OfferError("the SDP offer has no media sections (m= lines)")
    sends_audio = receives_audio = receives_video = False
    for media in desc.media:
        _check_transport(media)
        names = {c.name.lower() for c in media.rtp.codecs}
        if media.kind == "audio":
            if not names & AUDIO_CODECS:
                raise OfferError(
                    f"no supported audio codec in the offer ({', '.join(sorted(names)) or 'none'}"
                    f"); the server speaks {', '.join(sorted(AUDIO_CODECS))}"
                )
            sends_audio |= media.direction in ("sendrecv", "sendonly")
            receives_audio |= media.direction in ("sendrecv", "recvonly")
        elif media.kind == "video":
            if not names & VIDEO_CODECS:
                raise OfferError(
                    f"no supported video codec in the offer ({', '.join(sorted(names)) or 'none'}"
                    f"); the server sends {', '.join(sorted(VIDEO_CODECS))}"
                )
            receives_video |= media.direction in ("sendrecv", "recvonly")
    if need_mic and not sends_audio:
        raise OfferError(
            "the offer sends no audio: a live session needs the microphone track "
            "(add it with addTrack before createOffer)"
        )
    if not receives_video:
        raise OfferError(
            "the offer receives no video: add a video transceiver "
            "(addTransceiver('video', {direction: 'recvonly'}))"
        )
    return OfferInfo(sends_audio, receives_audio, receives_video)


def _check_transport(media: object) -> None:
    """ICE credentials and a well-formed DTLS fingerprint: without them the connection could
    only fail later, after a session was set up for nothing."""
    ice = getattr(media, "ice", None)
    if ice is None or not ice.usernameFragment or not ice.password:
        raise OfferError("a media section of the offer has no ICE credentials (ice-ufrag/pwd)")
    dtls = getattr(media, "dtls", None)
    fingerprints = list(dtls.fingerprints) if dtls is not None else []
    if not fingerprints:
        raise OfferError("a media section of the offer has no DTLS fingerprint")
    for fp in fingerprints:
        if fp.algorithm.lower() not in _FINGERPRINT_ALGORITHMS or not _FINGERPRINT_VALUE.match(
            fp.value
        ):
            raise OfferError(f"malformed DTLS fingerprint {fp.algorithm} {fp.value[:40]!r}")


def without_remb(sdp: str) -> str:
    """The SDP without ``goog-remb`` feedback, so the peer sends no bitrate estimates.

    aiortc's video encoders restart (with a keyframe at a new quality) whenever a receiver's
    estimate moves their target by more than 10 %: a visible pulse every second or so on a
    steady stream. Without estimates the encoder keeps its default bitrate (VP8 500 kbit/s,
    H.264 1 Mbit/s), plenty for one face on loopback or a LAN.
    """
    return "".join(
        line
        for line in sdp.splitlines(keepends=True)
        if not (line.startswith("a=rtcp-fb:") and "goog-remb" in line)
    )


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # an mDNS name (xxx.local) or garbage


def keep_loopback_candidates(sdp: str) -> str:
    """The SDP with every ICE candidate that is not on a loopback address removed.

    With loopback-only ICE the server never sends a connectivity check anywhere else (nor an
    mDNS query for a ``.local`` candidate).
    """
    out = []
    for line in sdp.splitlines(keepends=True):
        if line.startswith("a=candidate:"):
            parts = line.split()
            if len(parts) < 6 or not _is_loopback(parts[4]):
                continue
        out.append(line)
    return "".join(out)


def use_loopback_ice() -> None:
    """Make aiortc gather only a 127.0.0.1 host candidate, process-wide and for good.

    aioice skips loopback interfaces and gathers every other address; for a server and clients
    on one machine (tests, benchmarks) traffic must stay on loopback. aioice has no option for
    this, so its address lookup is replaced; idempotent.
    """
    import aioice.ice

    def loopback_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return list(_LOOPBACK_ADDRESSES) if use_ipv4 else []

    aioice.ice.get_host_addresses = loopback_addresses


__all__ = [
    "OfferError",
    "OfferInfo",
    "check_offer",
    "keep_loopback_candidates",
    "use_loopback_ice",
    "without_remb",
]
