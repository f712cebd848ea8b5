"""Configuration of live streaming: the per-stream latency budget and the server's limits.

The ``serve`` section of the root :class:`talkstream.config.Config` (with ``serve.stream``):
built once at the entry point (``talkstream serve``, a test, a benchmark) and passed down. The
engine's settings are the root's ``engine`` section, not repeated here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Early speech start (StreamConfig.early_speech_start, the LiveKit generator's too): frame
# starts a presenter's session can rewind to, more than the latency budget plus the presenter
# lead ahead of the display (165 + 40 ms for tiny).
REWIND_FRAMES = 16
# Frames between the first frame an early speech start can change and the speech itself: they
# see the speech in their lookahead, so the mouth starts to move before the voice, as the
# model learned (with the speech queued behind the fed silence it moved ~70-80 ms before the
# voice at the service output: benchmarks/pipecat_latency.py, --late-start).
ANTICIPATION_FRAMES = 2


@dataclass(frozen=True)
class StreamConfig:
    """One avatar stream: its latency budget and its bounds.

    The output delay of a stream (its latency budget) is the pipeline's algorithmic latency
    (``Session.latency_s``) plus ``jitter_budget_ms`` (live input only) plus
    ``compute_budget_ms``.
    """

    # Live input may arrive this late (network jitter, 20 ms packets) before silence stands in.
    jitter_budget_ms: float = 40.0
    # Packets aiortc's audio receiver holds before decoding (its own default is 4 = 80 ms);
    # the stream tolerates late input itself (jitter budget, silence fill).
    input_prefetch_packets: int = 1
    # Time a frame may take to render (queueing in the shared worker included). 40 ms: one
    # frame period; on the 2-core dev CPU it skipped no more frames than 60 did (1.5% vs 1.7%,
    # Chromium on the same cores) and took mic-to-mouth from 154 to 142 ms (p50, 29 bursts).
    compute_budget_ms: float = 40.0
    # Most frames of this stream one engine call renders (``Session.max_batch``): small,
    # since every frame has a deadline. The engine's own limit over all streams coalesced
    # into one call is ``EngineConfig.max_batch_frames``.
    frames_per_call: int = 2
    # Presenter speech is fed to the session this far ahead of the clock: frames can render
    # early, and an interrupt still takes effect within about this much.
    presenter_lead_ms: float = 40.0
    # Presenter speech that arrives while the avatar idles replaces the silence already fed
    # ahead of the display (the latency budget's worth) instead of queueing behind it: voice
    # and lips start at the next frame that can still change (Session.rewind). False: the
    # speech starts after that silence, the latency budget later (the old behaviour).
    early_speech_start: bool = True
    # Queued presenter speech beyond this is refused (429), so memory stays bounded.
    max_queued_speech_s: float = 120.0
    # Live input that runs further ahead of the clock than this is dropped (a flooding sender).
    max_input_ahead_ms: float = 1000.0
    # Timeline kept for the delayed audio replay; must exceed the latency budget.
    replay_buffer_s: float = 4.0
    # The avatar's voice is sent this much ahead of its frames, for receivers whose audio path
    # is longer than their video path and that do not correct it themselves. Chromium does (its
    # lip sync reacts to differences over ~30 ms): on loopback a 25 ms lead left frames 17 ms
    # late, a 15 ms lead 23 ms late and 45 ms more frame delay, against 29 ms early with no lead
    # (benchmarks/RESULTS.md); so by default both tracks are sent in step.
    audio_lead_ms: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.audio_lead_ms <= 200:
            raise ValueError(f"audio_lead_ms must be in 0..200, got {self.audio_lead_ms!r}")
        for name in ("jitter_budget_ms", "compute_budget_ms", "presenter_lead_ms"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.input_prefetch_packets <= 8:
            raise ValueError(
                f"input_prefetch_packets must be in 0..8, got {self.input_prefetch_packets}"
            )
        if self.frames_per_call < 1:
            raise ValueError(f"frames_per_call must be >= 1, got {self.frames_per_call}")
        if not self.replay_buffer_s >= 1.0:
            raise ValueError(f"replay_buffer_s must be >= 1 s, got {self.replay_buffer_s}")


def default_max_sessions(device: str) -> int:
    """How many 25 fps streams ``serve`` admits by default on ``device``.

    A CPU: one per core (the 2-core dev box holds 2 live sessions at 25 fps, encoders
    included; at 4 every stream fell to a few frames a second: benchmarks/RESULTS.md). A GPU: 8
    (the engine batches the sessions' frames; not yet measured). ``--max-sessions`` overrides.
    """
    if device.split(":", 1)[0] == "cuda":
        return 8
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ServeConfig:
    """``talkstream serve``: where to listen, what to show, and the limits that keep it up."""

    host: str = "127.0.0.1"
    port: int = 8080
    # Avatar streams that render at once: live sessions plus presenters (503 beyond). 0: what
    # the engine's device holds at 25 fps (default_max_sessions, resolved by SessionManager).
    max_sessions: int = 0
    # Viewers of presenters, over all presenters (each costs a video encoder).
    max_viewers: int = 16
    # A live session with no input audio, or a presenter with neither pushes nor viewers, for
    # this long is closed.
    idle_timeout_s: float = 60.0
    max_offer_bytes: int = 64 * 1024  # an SDP offer is ~3-8 KB
    max_push_bytes: int = 8 * 1024 * 1024  # one speech push (HTTP body or WebSocket message)
    image: Path | None = None  # None: the bundled default face
    landmarks: Path | None = None
    # Gather and accept only loopback ICE candidates (tests, benchmarks, one-machine demos).
    ice_loopback_only: bool = False
    # Negotiate no receiver bitrate estimates (goog-remb): aiortc restarts its video encoder at
    # every estimate change, a visible quality pulse; see talkstream.streaming.sdp.without_remb.
    steady_video_bitrate: bool = True
    # Access (talkstream.streaming.security): the viewer token opens the page, offers and
    # stats; the control token presenters (create, delete, push, interrupt, WebSocket) and
    # /metrics. On loopback both are optional; on any other address both are required unless
    # no_auth says to serve anyone who can reach the port.
    viewer_token: str | None = None
    control_token: str | None = None
    no_auth: bool = False
    # Web origins besides the server's own that may call it (CORS, WebSocket); "*": any.
    allowed_origins: tuple[str, ...] = ()
    # Host header names to answer to besides the bound address, loopback and IP literals.
    allowed_hosts: tuple[str, ...] = ()
    # A peer that has not connected (ICE + DTLS) this long after its offer is closed and its
    # slot freed; a connected one that sends no RTCP for peer_silence_timeout_s, or stays
    # "disconnected" for disconnect_grace_s, too. Browsers and aiortc send RTCP every ~1 s.
    connect_timeout_s: float = 12.0
    peer_silence_timeout_s: float = 10.0
    disconnect_grace_s: float = 4.0
    # Slowloris: a connection must complete its request headers (and an idle keep-alive
    # connection its next request) within header_timeout_s; a body must arrive within
    # body_timeout_s.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # WebSocket pings; a pusher that stops answering is closed (its presenter stays).
    ws_heartbeat_s: float = 15.0
    # One push decodes to at most this much audio, checked before decoding allocates.
    max_push_s: float = 60.0
    max_push_samples: int = 4 * 1024 * 1024
    stream: StreamConfig = field(default_factory=StreamConfig)

    def __post_init__(self) -> None:
        for name in (
            "connect_timeout_s",
            "peer_silence_timeout_s",
            "disconnect_grace_s",
            "header_timeout_s",
            "body_timeout_s",
            "ws_heartbeat_s",
            "max_push_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_push_samples < 1:
            raise ValueError(f"max_push_samples must be >= 1, got {self.max_push_samples}")
        for name in ("viewer_token", "control_token"):
            token = getattr(self, name)
            if token is not None and (len(token) < 8 or not token.isprintable() or " " in token):
                raise ValueError(
                    f"the {name.replace('_', ' ')} must be at least 8 printable characters "
                    "without spaces"
                )
        if (
            not self.loopback
            and not self.no_auth
            and not (self.viewer_token and self.control_token)
        ):
            raise ValueError(
                f"serving on {self.host or '0.0.0.0'} (not loopback) needs access tokens: pass "
                "--viewer-token and --control-token (or set TALKSTREAM_VIEWER_TOKEN and "
                "TALKSTREAM_CONTROL_TOKEN, or --generate-tokens), or --no-auth to let anyone "
                "who reaches the port use it"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_sessions < 0:
            raise ValueError(
                f"max_sessions must be >= 1 (or 0: the device's default), got {self.max_sessions}"
            )
        if self.max_viewers < 0:
            raise ValueError(f"max_viewers must be >= 0, got {self.max_viewers}")
        if not self.idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s}")

    @property
    def loopback(self) -> bool:
        """Whether the server listens on this machine's loopback only."""
        from talkstream.streaming.security import is_loopback_host

        return is_loopback_host(self.host)


__all__ = ["ServeConfig", "StreamConfig", "default_max_sessions"]
