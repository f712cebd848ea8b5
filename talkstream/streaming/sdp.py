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
# A browser offers one audio and one video section; a few more are tolerated, hundreds are not.
MAX_MEDIA_SECTIONS = 8
_MID = re.compile(r"^[A-Za-z0-9_.~-]{1,32}$")


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
    if sdp.count("\nm=") > MAX_MEDIA_SECTIONS:
        raise OfferError(f"the SDP offer has more than {MAX_MEDIA_SECTIONS} media sections")
    try:
        desc = SessionDescription.parse(sdp)
    except Exception:
        # aiortc's parser fails with whatever the broken line provokes; the client is told
        # what to fix, not which exception it raised.
        log.debug("unparsable SDP offer", exc_info=True)
        raise OfferError(
            "the SDP offer cannot be parsed: send the offer exactly as createOffer() made it"
        ) from None
    if not desc.media:
        raise OfferError("the SDP offer has no media sections (m= lines)")
    _check_bundle(desc)
    sends_audio = receives_audio = receives_video = False
    for media in desc.media:
        if media.kind not in ("audio", "video"):
            raise OfferError(
                f"the offer has a {media.kind!r} media section; the server negotiates audio "
                "and video only (no data channels)"
            )
        if not media.rtcp_mux:
            raise OfferError("a media section of the offer does not use rtcp-mux (a=rtcp-mux)")
        _check_transport(media)
        _check_negotiable(media)
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


def _check_bundle(desc: object) -> None:
    """Every media section has a distinct a=mid, and a BUNDLE group names only those.

    aiortc assumes both: a BUNDLE offer whose audio section lost its a=mid made its
    createAnswer fail with an internal error."""
    mids: list[str] = []
    for media in desc.media:  # type: ignore[attr-defined]
        mid = media.rtp.muxId
        if not mid:
            raise OfferError(f"the offer's {media.kind} section has no a=mid line")
        if not _MID.match(mid):
            raise OfferError(f"the offer's a=mid {mid[:40]!r} is not a short token")
        mids.append(mid)
    if len(set(mids)) != len(mids):
        raise OfferError("two media sections of the offer share one a=mid")
    for group in desc.group:  # type: ignore[attr-defined]
        if group.semantic == "BUNDLE":
            unknown = [str(m) for m in group.items if str(m) not in mids]
            if unknown:
                raise OfferError(
                    f"the offer's BUNDLE group names {', '.join(unknown)[:80]}, which no media "
                    "section has as its a=mid"
                )


def _check_negotiable(media: object) -> None:
    """The codecs aiortc would settle on (its own rule: name, clock rate, H.264 profile and
    packetization mode), so an offer it cannot answer is refused here, not mid-negotiation."""
    try:
        from aiortc.codecs import CODECS
        from aiortc.rtcpeerconnection import find_common_codecs
    except ImportError:  # another aiortc layout: negotiation errors are still caught later
        return
    kind = media.kind  # type: ignore[attr-defined]
    try:
        common = find_common_codecs(CODECS[kind], media.rtp.codecs)  # type: ignore[attr-defined]
    except Exception:
        log.debug("codec negotiation check failed", exc_info=True)
        raise OfferError(f"the offer's {kind} codec parameters are malformed") from None
    if not [c for c in common if c.name.lower() != "rtx"]:
        raise OfferError(
            f"no {kind} codec of the offer can be negotiated (name, clock rate or, for H.264, "
            "profile and packetization mode do not match what the server speaks)"
        )


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
