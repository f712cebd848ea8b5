"""``talkstream live``: a local microphone in, the avatar out on a virtual camera, into a file,
or published into an SFU (a Janus VideoRoom or any WHIP ingest).

Threads and clocks:

- PortAudio's callback thread (``mic.MicCapture``) hands each 20 ms chunk to
  ``Session.push_audio`` and to a queue for the file's audio track, then counts its samples.
  That sample counter is the media clock. The thread never waits for anything else.
- The calling thread (``LiveLoop.run``) renders and sends. Output slot ``k`` (25 per second)
  is due when the audio clock reaches ``k / 25 s + delay``, where ``delay`` is the session's
  algorithmic latency (lookahead, frontend) plus a compute budget. A due slot shows frame ``k``
  if it was rendered in time, else the last frame again. A frame whose slot has already gone is
  dropped before it is rendered, so a slow renderer falls back to a lower frame rate instead of
  an ever-growing delay, and the audio clock is never held up by compute.

The file output gets every slot (25 fps exactly, in sync with the captured audio from its first
sample); the virtual camera gets the same slots as they fall due. The publishing output
(``talkstream.publish.sink``) gets them as they fall due too, with the captured voice held back
by the same delay so that lips and voice leave together.
"""

from __future__ import annotations

import argparse
import collections
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Protocol

import numpy as np

from talkstream.busy import SlowdownHint
from talkstream.config import FPS, Config, EngineConfig
from talkstream.errors import TalkstreamError
from talkstream.streaming.pacing import FramePacer

if TYPE_CHECKING:  # the engine pulls in torch: imported only when a capture really runs
    from talkstream.engine.pipeline import Engine, Session
    from talkstream.publish.sink import PublishTarget
    from talkstream.streaming.mic import AudioSystem, InputDevice

log = logging.getLogger(__name__)

OUTPUTS = ("vcam", "file", "publish")  # publish: set by --janus / --whip, not by --output
DEFAULT_OUT = Path("live.mp4")
# Headroom for rendering beyond the session's algorithmic latency: covers the 20 ms capture
# granularity plus one render of the tiny model on a 2-core CPU with room to spare.
DEFAULT_COMPUTE_BUDGET_MS = 100.0
WAKE_INTERVAL_S = 0.05  # how often the loop looks at stop requests when no audio comes
INT16_FULL_SCALE = 32768.0
# Fresh frames a second under which the busy-machine hint may speak (25 are sent regardless).
LIVE_HINT_FPS = 20.0


@dataclass(frozen=True)
class LiveConfig:
    """What ``talkstream live`` does: where the audio comes from and where the avatar goes."""

    output: str = "vcam"  # "vcam", "file" or "publish"
    out: Path = DEFAULT_OUT  # with output == "file"
    publish: PublishTarget | None = None  # with output == "publish"
    duration_s: float | None = None  # None: until interrupted (Ctrl-C)
    input_device: str | None = None  # index or (part of) a name; None: the default input
    vcam_device: str | None = None  # e.g. /dev/video4; None: the first free one
    image: Path | None = None  # None: the bundled default face
    landmarks: Path | None = None
    pace_input: bool = False  # throttle an unclocked input device to real time
    compute_budget_ms: float = DEFAULT_COMPUTE_BUDGET_MS
    crf: int = 20

    @classmethod
    def _config_types(cls) -> dict[str, object]:
        """``PublishTarget``, for reading this section from a dict (talkstream._config_io); it
        needs aiortc (the serve extra): without it a ``publish`` entry stays a plain dict."""
        try:
            from talkstream.publish.sink import PublishTarget
        except ImportError:
            return {"PublishTarget": dict}
        return {"PublishTarget": PublishTarget}

    def validate(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"output {self.output!r} is not one of {OUTPUTS}")
        if (self.output == "publish") != (self.publish is not None):
            raise ValueError("output 'publish' goes with a PublishTarget, and only it")
        if self.duration_s is not None and not self.duration_s > 0:
            raise TalkstreamError(f"--duration must be > 0 seconds, got {self.duration_s}")
        if not self.compute_budget_ms >= 0:
            raise TalkstreamError(f"--compute-budget-ms must be >= 0, got {self.compute_budget_ms}")


# -- outputs ---------------------------------------------------------------------------------


class FrameSink(Protocol):
    """Where the live loop's frames (and, for a file, the captured audio) go."""

    description: str

    def audio(self, pcm: np.ndarray, rate_hz: int) -> None: ...

    def video(self, image: np.ndarray, pts: int) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...


class FileSink:
    """An H.264 mp4 at 25 fps with the captured audio muxed in (render.py's writer)."""

    def __init__(self, out: Path, width: int, height: int, rate_hz: int, crf: int) -> None:
        from talkstream.engine.render import Mp4Writer

        self.description = f"wrote {out}"
        self.writer = Mp4Writer(out, width, height, rate_hz, channels=1, crf=crf)

    def audio(self, pcm: np.ndarray, rate_hz: int) -> None:
        assert rate_hz == self.writer.sample_rate_hz, (rate_hz, self.writer.sample_rate_hz)
        self.writer.write_audio(pcm.astype(np.float32)[:, None] / INT16_FULL_SCALE)  # (n, 1)

    def video(self, image: np.ndarray, pts: int) -> None:
        self.writer.write_video(image, pts)

    def finish(self) -> None:
        self.writer.write_audio(None)
        self.writer.finish()
        self.writer.commit()

    def abort(self) -> None:
        self.writer.discard()


class VcamSink:
    """The virtual camera; the captured audio is not sent (the call app takes the mic itself)."""

    def __init__(self, width: int, height: int, device: str | None) -> None:
        from talkstream.streaming.vcam import VirtualCameraSink

        self.camera = VirtualCameraSink(width, height, device)
        self.description = f"sent to virtual camera {self.camera.device}"

    def audio(self, pcm: np.ndarray, rate_hz: int) -> None:
        pass

    def video(self, image: np.ndarray, pts: int) -> None:
        self.camera.send(image)

    def finish(self) -> None:
        self.camera.close()

    def abort(self) -> None:
        self.camera.close()


def open_sink(cfg: LiveConfig, width: int, height: int, rate_hz: int) -> FrameSink:
    if cfg.output == "file":
        return FileSink(cfg.out, width, height, rate_hz, cfg.crf)
    if cfg.output == "publish":
        from talkstream.publish.sink import PublishSink

        assert cfg.publish is not None
        return PublishSink(cfg.publish)  # connects now: before the capture starts
    return VcamSink(width, height, cfg.vcam_device)


# -- the loop --------------------------------------------------------------------------------


class AudioSource(Protocol):
    """What the loop needs of a capture (``mic.MicCapture``): it calls ``on_audio`` itself."""

    device: InputDevice
    rate_hz: int
    overflows: int
    error: BaseException | None

    @property
    def finished(self) -> bool: ...

    @property
    def active(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class LiveStats:
    """What a live run did. ``rendered + dropped == frames_out`` once it has finished."""

    samples: int = 0
    rate_hz: int = 0
    frames_out: int = 0  # slots sent: 25 per second of audio
    rendered: int = 0  # frames rendered, each shown in its own slot
    dropped: int = 0  # frames skipped because their slot had already gone
    delay_s: float = 0.0  # audio clock to slot: algorithmic latency + compute budget
    render_ms: list[float] = field(default_factory=list)
    overflows: int = 0
    interrupted: bool = False

    @property
    def audio_s(self) -> float:
        return self.samples / self.rate_hz if self.rate_hz else 0.0

    def render_ms_pct(self, q: float) -> float:
        return float(np.percentile(self.render_ms, q)) if self.render_ms else float("nan")


class LiveLoop:
    """Paces one session's frames by the microphone's sample counter (see the module doc)."""

    def __init__(self, session: Session, sink: FrameSink, delay_s: float) -> None:
        self.session = session
        # One frame per render call: the clock is checked again between frames, so a frame
        # is rendered only while it can still make its slot.
        session.max_batch = 1
        self.sink = sink
        self.delay_s = delay_s
        self.stats = LiveStats(delay_s=delay_s)
        self._samples = 0  # written by the capture thread only
        self._rate_hz = 0
        self._audio: collections.deque[np.ndarray] = collections.deque()
        self._wake = threading.Event()
        # Slot k is due when the audio clock reaches k / FPS + delay. This loop sends a slot
        # right after the render that finished its frame, so no render-time allowance.
        self.pacer: FramePacer[np.ndarray] = FramePacer(
            lambda clock_s: (clock_s - delay_s) * FPS, allow_for_render=False
        )
        self._next_slot = 0
        self._taken_until = 0  # frames handed out by the session so far
        self._still = session.avatar.image  # shown until the first frame is rendered
        # One line if fresh frames fall well under 25 a second while other programs hold the
        # CPU (the rest of the slots repeat the last frame: a newcomer sees a stutter).
        engine = session.engine
        self.hint = SlowdownHint(
            log.warning,
            threads=engine.cfg.threads if engine.device.type == "cpu" else 1,
            what="the live avatar renders",
            min_fps=LIVE_HINT_FPS,
        )

    # Runs in PortAudio's thread: push, queue and count, nothing that waits.
    def on_audio(self, pcm: np.ndarray, rate_hz: int) -> None:
        self.session.push_audio(pcm, rate_hz)
        # Drained by the loop after every render, so it holds at most one render's worth.
        self._audio.append(pcm)
        self._rate_hz = rate_hz
        self._samples += pcm.shape[0]  # last: the clock never runs ahead of pushed audio
        self._wake.set()

    def clock_s(self) -> float:
        return self._samples / self._rate_hz if self._rate_hz else 0.0

    def run(self, capture: AudioSource, stop: threading.Event) -> LiveStats:
        """Capture until ``capture`` finishes or ``stop`` is set; then send the remaining frames."""
        capture.start()
        try:
            while not capture.finished and not stop.is_set():
                self._wake.wait(WAKE_INTERVAL_S)
                self._wake.clear()
                self._service(final=False)
                if not capture.finished and not capture.active:
                    raise TalkstreamError(
                        f"the input device '{capture.device.name}' stopped delivering audio "
                        "(unplugged, or taken by another program?)"
                    )
        finally:
            capture.stop()
        if capture.error is not None:
            raise capture.error
        self.stats.interrupted = stop.is_set() and not capture.finished
        # Slots that fell due while the capture ended still go by the clock (and an unclocked
        # device may have delivered everything at once); only the tail after it is rendered
        # regardless.
        self._service(final=False)
        self.session.end_audio()
        self._service(final=True)
        st = self.stats
        st.samples, st.rate_hz, st.overflows = self._samples, capture.rate_hz, capture.overflows
        assert st.frames_out == self._taken_until == st.rendered + st.dropped, st
        return st

    def _service(self, final: bool) -> None:
        """Send due slots, render the frames that can still make their slot, send again.

        ``final``: the audio has ended, the clock stops; every remaining frame is rendered and
        every remaining slot sent (for a file that is the clip's tail).
        """
        self._drain_audio()
        if not final:
            self._send_due()
        while True:
            # A frame whose slot has gone is skipped unrendered: rendering it would only make
            # the next one late too.
            skipped = self.session.skip_until(self.pacer.first_worth_rendering(self.clock_s()))
            self.stats.dropped += skipped
            self._taken_until += skipped
            t0 = time.perf_counter()
            frames = self.session.render_ready()  # one frame (max_batch 1): see __init__
            if not frames:
                break
            render_s = time.perf_counter() - t0
            self.stats.render_ms.append(render_s * 1e3)
            for frame in frames:
                self.stats.rendered += 1
                self.pacer.add(frame.pts, frame.image, self.clock_s(), render_s)
                self._taken_until = frame.pts + 1
            self.hint.update(self.stats.rendered)
            if not final:
                self._drain_audio()
                self._send_due()
        if final:
            self._drain_audio()
            while self._next_slot < self._taken_until:
                self._send_slot()
        else:
            self._send_due()

    def _drain_audio(self) -> None:
        while self._audio:
            self.sink.audio(self._audio.popleft(), self._rate_hz)

    def _send_due(self) -> None:
        # A due slot's audio is in (delay >= the session's latency), so its frame is ready or
        # was skipped; either way the slot goes out now, never later.
        due = self.pacer.due(self.clock_s())
        while self._next_slot <= due:
            self._send_slot()

    def _send_slot(self) -> None:
        k = self._next_slot
        # A dropped frame's slot shows the previous image again.
        image, _ = self.pacer.show(k)
        if image is not None and not isinstance(image, np.ndarray):
            from talkstream.engine.compose import to_host  # torch is loaded by now

            image = to_host(image)  # a GPU frame comes to the host here, at the sink
        self.sink.video(self._still if image is None else image, k)
        self.stats.frames_out += 1
        self._next_slot = k + 1


@dataclass
class LiveResult:
    stats: LiveStats
    device: InputDevice
    sink: str
    warm_up_s: float
    random_init: bool


def run_live(
    root: Config,
    system: AudioSystem,
    device: InputDevice,
    stop: threading.Event,
    engine: Engine | None = None,
) -> LiveResult:
    """Capture ``device`` and send the avatar to ``root.live.output`` until done or ``stop`` is
    set; the engine is ``root.engine``'s (or ``engine``, left open)."""
    from talkstream.config import RenderConfig
    from talkstream.engine.render import (
        check_out_path,
        load_avatar_for_render,
        load_source_for_render,
    )
    from talkstream.runtime import load_engine
    from talkstream.streaming.mic import MicCapture

    cfg = root.live
    if cfg is None:
        raise ValueError("run_live needs a config with a live section")
    cfg.validate()
    if cfg.output == "file":
        check_out_path(cfg.out)
    rcfg = RenderConfig(out=cfg.out, image=cfg.image, landmarks=cfg.landmarks)
    avatar_cfg = root.engine.avatar
    # An unusable photo fails before the model loads.
    source = load_source_for_render(rcfg, avatar_cfg)
    own_engine = engine is None
    eng = engine if engine is not None else load_engine(root.engine)
    try:
        avatar = load_avatar_for_render(rcfg, avatar_cfg, eng.crop_size, source)
        warm_s = eng.warmup(avatar)
        log.info("warm-up %.2f s", warm_s)
        session = eng.session(avatar)
        delay_s = session.latency_s + cfg.compute_budget_ms / 1e3
        h, w = avatar.image.shape[:2]
        # The capture picks its rate, the sink needs it, and the loop needs the sink: the
        # loop's callback is attached last, before the stream starts.
        capture = MicCapture(system, device, pace=cfg.pace_input)
        if cfg.duration_s is not None:
            capture.max_samples = round(cfg.duration_s * capture.rate_hz)
        sink = open_sink(cfg, w, h, capture.rate_hz)
        try:
            loop = LiveLoop(session, sink, delay_s)
            capture.on_audio = loop.on_audio
            stats = loop.run(capture, stop)
            sink.finish()
        except BaseException:
            sink.abort()
            raise
        return LiveResult(stats, device, sink.description, warm_s, eng.random_init)
    finally:
        if own_engine:
            eng.close()


# -- command line ----------------------------------------------------------------------------

DESCRIPTION = """\
Capture a local microphone and render the avatar speaking it in real time: to a virtual
camera for video-call apps (Linux needs the v4l2loopback module), to an mp4 with the
captured audio, or published with the captured voice (VP8 + Opus, encoded once) into a Janus
VideoRoom (--janus) or any WHIP ingest (--whip) whose SFU serves the audience. Frames are
paced by the microphone's clock; when rendering falls behind, late frames are dropped. Stop
with Ctrl-C or --duration.
"""

EPILOG = """\
examples:
  talkstream live                               default mic -> virtual camera (v4l2loopback)
  talkstream live --out talk.mp4 --duration 10  10 s from the default mic into an mp4
  talkstream live --janus http://127.0.0.1:8088/janus --room 1234   into a Janus VideoRoom
  talkstream live --whip https://ingest.example/whip/abc --token T  into any WHIP ingest
  talkstream live --list-devices                what PortAudio sees (mics, virtual cameras)
  talkstream live --input-device "USB" --image me.jpg --landmarks me.json
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_engine_args: Callable[[argparse.ArgumentParser], None],
    engine_config: Callable[[argparse.Namespace], EngineConfig],
) -> None:
    """Register ``talkstream live`` (light: PyAudio and the engine load only when it runs)."""
    from talkstream.cli import add_photo_args

    p = sub.add_parser(
        "live",
        help="speak into a microphone; the avatar speaks on a virtual camera, into an mp4, or "
        "into an SFU (Janus / WHIP)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument(
        "--output",
        choices=OUTPUTS,
        default=None,
        help="vcam: a virtual camera; file: an mp4 (default: file when --out is given, else vcam)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help=f"mp4 to write with --output file ({DEFAULT_OUT})"
    )
    p.add_argument(
        "--duration",
        type=_positive_float,
        default=None,
        metavar="S",
        help="stop after S seconds of audio (default: run until Ctrl-C)",
    )
    p.add_argument(
        "--input-device",
        default=None,
        metavar="DEV",
        help="microphone: index or (part of) the name from --list-devices; default: the "
        "system's default input",
    )
    p.add_argument(
        "--list-devices", action="store_true", help="list input devices and virtual cameras"
    )
    p.add_argument(
        "--vcam-device", default=None, metavar="DEV", help="virtual camera, e.g. /dev/video4"
    )
    p.add_argument(
        "--image", type=Path, default=None, help="face photo; default: scikit-image's astronaut"
    )
    p.add_argument(
        "--landmarks", type=Path, default=None, help="JSON with the photo's 68 iBUG landmarks"
    )
    add_photo_args(p)
    p.add_argument(
        "--pace-input",
        action="store_true",
        help="throttle the input to real time: for unclocked devices such as an ALSA file "
        "plugin (a real microphone is clocked by its hardware)",
    )
    p.add_argument(
        "--compute-budget-ms",
        type=float,
        default=DEFAULT_COMPUTE_BUDGET_MS,
        help="time allowed for rendering a frame on top of the audio lookahead; frames later "
        f"than that are dropped (default {DEFAULT_COMPUTE_BUDGET_MS:g})",
    )
    p.add_argument("--crf", type=int, default=20, help="H.264 quality for --output file (20)")
    pub = p.add_argument_group(
        "publishing (instead of --output/--out: the avatar and the captured voice go to an SFU)"
    )
    target = pub.add_mutually_exclusive_group()
    target.add_argument(
        "--janus",
        metavar="URL",
        help="publish into a Janus VideoRoom through its HTTP API, e.g. "
        "http://127.0.0.1:8088/janus",
    )
    target.add_argument("--whip", metavar="URL", help="publish to this WHIP endpoint (RFC 9725)")
    pub.add_argument(
        "--room",
        type=int,
        default=None,
        metavar="N",
        help="Janus VideoRoom room (created if missing; 1234)",
    )
    pub.add_argument(
        "--display",
        default=None,
        metavar="NAME",
        help="publisher name shown in the Janus room (talkstream)",
    )
    pub.add_argument("--token", default=None, metavar="T", help="WHIP Bearer token")
    pub.add_argument(
        "--ice-local-only",
        action="store_true",
        help="gather ICE candidates on this machine's first IPv4 address only (an SFU on this "
        "machine, as in the tests)",
    )
    add_engine_args(p)
    p.set_defaults(func=lambda a: _cmd_live(a, engine_config))


def _publish_target(a: argparse.Namespace) -> PublishTarget | None:
    """--janus/--whip and their options; None without either (options alone are an error)."""
    if not (a.janus or a.whip):
        for flag, value in (
            ("--room", a.room),
            ("--display", a.display),
            ("--token", a.token),
            ("--ice-local-only", a.ice_local_only or None),
        ):
            if value is not None:
                raise TalkstreamError(f"{flag} is for publishing: add --janus URL or --whip URL")
        return None
    for flag, value in (("--output", a.output), ("--out", a.out), ("--vcam-device", a.vcam_device)):
        if value is not None:
            which = "--janus" if a.janus else "--whip"
            raise TalkstreamError(f"{flag} and {which} are different outputs: give one of them")
    if a.janus and a.token:
        raise TalkstreamError("--token is for --whip; Janus's HTTP API takes none here")
    if a.whip and (a.room is not None or a.display is not None):
        raise TalkstreamError("--room and --display are for --janus; a WHIP URL names its room")
    import importlib.util

    from talkstream.errors import MissingDependencyError

    for module in ("aiohttp", "aiortc"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError("talkstream live --janus/--whip", module, "serve")
    from talkstream.publish.sink import PublishTarget

    return PublishTarget(
        janus=a.janus,
        room=1234 if a.room is None else a.room,
        display=a.display or "talkstream",
        whip=a.whip,
        token=a.token,
        ice_local_only=a.ice_local_only,
    )


def _config_from_args(a: argparse.Namespace) -> LiveConfig:
    """The ``live`` section of the config tree from the flags."""
    publish = _publish_target(a)
    output = "publish" if publish else a.output or ("file" if a.out is not None else "vcam")
    if output == "vcam" and a.out is not None:
        raise TalkstreamError("--out is for --output file; the virtual camera writes no file")
    return LiveConfig(
        output=output,
        out=a.out or DEFAULT_OUT,
        publish=publish,
        duration_s=a.duration,
        input_device=a.input_device,
        vcam_device=a.vcam_device,
        image=a.image,
        landmarks=a.landmarks,
        pace_input=a.pace_input,
        compute_budget_ms=a.compute_budget_ms,
        crf=a.crf,
    )


def list_devices(system: AudioSystem) -> str:
    """A listing of input devices (default marked ``*``) and loopback video devices."""
    from talkstream.streaming.mic import NO_MICROPHONE_HELP
    from talkstream.streaming.vcam import loopback_devices, platform_help

    lines = ["input devices (* = default):"]
    devices = system.input_devices()
    lines += [d.describe() for d in devices] or [f"  none: {NO_MICROPHONE_HELP}"]
    lines.append("virtual cameras:")
    cams = loopback_devices()
    lines += [f"  {c}" for c in cams] or [f"  none found: {platform_help()}"]
    return "\n".join(lines)


@contextmanager
def _ctrl_c_stops(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C ends the capture cleanly (the file is finished); a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("stopping (Ctrl-C again to abort)")
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _cmd_live(
    a: argparse.Namespace, engine_config: Callable[[argparse.Namespace], EngineConfig]
) -> int:
    from talkstream.streaming.mic import AudioSystem, select_input_device

    if a.list_devices:
        with AudioSystem() as system:
            print(list_devices(system))
        return 0
    cfg = _config_from_args(a)
    cfg.validate()
    # Fail fast, before a model loads (and before the engine section imports torch), on what
    # can be checked without one.
    if cfg.output == "file":
        from talkstream.engine.render import check_out_path

        check_out_path(cfg.out)
    elif cfg.publish is not None:
        import asyncio

        from talkstream.publish.sink import check_target

        asyncio.run(check_target(cfg.publish))  # an unreachable SFU: one line, no mic opened
    else:
        import sys

        from talkstream.streaming.vcam import import_pyvirtualcam, loopback_devices, platform_help

        import_pyvirtualcam()
        # On Linux the kernel lists its v4l2loopback devices: with none, no camera can open,
        # so say so now rather than after the model has loaded and warmed up.
        if sys.platform.startswith("linux") and not loopback_devices():
            raise TalkstreamError(
                "no virtual camera device: the kernel lists no v4l2loopback device; "
                + platform_help()
            )
    # The config tree, built once: the engine section and this command's live section.
    root = Config(engine=engine_config(a), live=cfg).with_command_overrides(a.set, "live")
    stop = threading.Event()
    with AudioSystem() as system:
        device = select_input_device(system.input_devices(), cfg.input_device)
        with _ctrl_c_stops(stop):
            res = run_live(root, system, device, stop)
    st = res.stats
    note = " (random weights: no trained checkpoint)" if res.random_init else ""
    how = "stopped" if st.interrupted else "done"
    print(
        f"live {how}: {st.audio_s:.2f} s of audio from '{res.device.name}' at {st.rate_hz} Hz; "
        f"{st.frames_out} frames at {FPS} fps ({st.rendered} rendered, {st.dropped} dropped late, "
        f"render p50 {st.render_ms_pct(50):.0f} ms, p99 {st.render_ms_pct(99):.0f} ms); "
        f"video delay {st.delay_s * 1e3:.0f} ms; {res.sink}{note}"
    )
    if st.overflows:
        print(f"warning: the input overflowed {st.overflows} time(s): audio was lost")
    return 0
