"""Microphone capture with PyAudio (PortAudio), for ``talkstream live``.

The stream runs in callback mode: PortAudio's own thread hands us 20 ms of int16 PCM at a time
and we pass it straight on (to ``Session.push_audio``, which costs microseconds). Nothing on that
thread waits for rendering or encoding, so the microphone never blocks and never overflows
because the avatar is slow. The number of samples delivered so far is the media clock of a live
session: frames are paced by it, never by how fast compute runs.

This module imports no torch: ``talkstream live --list-devices`` and the capture tests stay fast.
PyAudio itself is imported only when a capture or a device listing is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from talkstream.config import SAMPLE_RATE_HZ
from talkstream.errors import MissingDependencyError, TalkstreamError

log = logging.getLogger(__name__)

CHUNK_MS = 20
# Preferred capture rate: the engine's own, so nothing is resampled. A device that cannot do it
# is captured at its native rate and the session's frontend resamples.
PREFERRED_RATE_HZ = SAMPLE_RATE_HZ

NO_MICROPHONE_HELP = (
    "no microphone found: PortAudio lists no audio input device. "
    "On Linux check that `arecord -l` lists a capture device, that your user may use it "
    "(the 'audio' group), and, with PulseAudio or PipeWire, that `pactl list short sources` "
    "shows a source; on macOS allow microphone access for your terminal (System Settings > "
    "Privacy & Security > Microphone). `talkstream live --list-devices` shows what PortAudio sees."
)

# pcm: int16 samples (n,), mono; rate: the capture rate in Hz.
AudioCallback = Callable[[np.ndarray, int], None]


def import_pyaudio() -> ModuleType:
    """The ``pyaudio`` module, or a ``MissingDependencyError`` that says how to install it."""
    try:
        import pyaudio
    except ImportError as e:
        err = MissingDependencyError("microphone capture (talkstream live)", "pyaudio", "live")
        # pyaudio has no wheels for Linux: it compiles against PortAudio's headers.
        err.args = (
            f"{err.args[0]} (pyaudio builds from source: on Debian/Ubuntu first run "
            "`sudo apt-get install portaudio19-dev`; on macOS `brew install portaudio`)",
        )
        raise err from e
    return pyaudio


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Hold back what C libraries print on file descriptor 2 while the block runs.

    ALSA and JACK print a line for every card, plugin and server they probe and do not find
    (dozens on a machine without a sound card); that noise would bury our own messages. It is
    kept and logged at debug level instead of being thrown away.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                log.debug("PortAudio/ALSA messages:\n%s", text)


@dataclass(frozen=True)
class InputDevice:
    """An audio input device as PortAudio lists it."""

    index: int
    name: str
    host_api: str
    channels: int  # maximum input channels
    default_rate_hz: int
    is_default: bool = False

    def describe(self) -> str:
        mark = "*" if self.is_default else " "
        return (
            f"{mark} {self.index:3d}  {self.name}  ({self.host_api}, {self.channels} ch, "
            f"{self.default_rate_hz} Hz)"
        )


class AudioSystem:
    """An initialised PortAudio; ``close()`` (or ``with``) terminates it."""

    def __init__(self) -> None:
        self.pyaudio = import_pyaudio()
        with quiet_native_stderr():
            self.pa: Any = self.pyaudio.PyAudio()

    def close(self) -> None:
        with quiet_native_stderr():
            self.pa.terminate()

    def __enter__(self) -> AudioSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def default_input_index(self) -> int | None:
        try:
            return int(self.pa.get_default_input_device_info()["index"])
        except OSError:  # PortAudio's "no default input device"
            return None

    def input_devices(self) -> list[InputDevice]:
        """Every device with at least one input channel, in PortAudio's order."""
        default = self.default_input_index()
        out = []
        for i in range(self.pa.get_device_count()):
            info = self.pa.get_device_info_by_index(i)
            if int(info["maxInputChannels"]) < 1:
                continue
            api = self.pa.get_host_api_info_by_index(info["hostApi"])["name"]
            out.append(
                InputDevice(
                    index=i,
                    name=str(info["name"]),
                    host_api=str(api),
                    channels=int(info["maxInputChannels"]),
                    default_rate_hz=int(info["defaultSampleRate"]),
                    is_default=i == default,
                )
            )
        return out

    def supports(self, device: InputDevice, rate_hz: int, channels: int) -> bool:
        try:
            with quiet_native_stderr():
                return bool(
                    self.pa.is_format_supported(
                        rate_hz,
                        input_device=device.index,
                        input_channels=channels,
                        input_format=self.pyaudio.paInt16,
                    )
                )
        except ValueError:  # pyaudio's way of saying "not supported"
            return False


def _device_list(devices: list[InputDevice]) -> str:
    return "; ".join(f"{d.index} '{d.name}'" for d in devices)


def select_input_device(devices: list[InputDevice], spec: str | None) -> InputDevice:
    """The device ``spec`` names: an index, a name, or a unique part of a name.

    ``None`` picks PortAudio's default input device (the first one if there is no default).
    """
    if not devices:
        raise TalkstreamError(NO_MICROPHONE_HELP)
    if spec is None:
        return next((d for d in devices if d.is_default), devices[0])
    spec = spec.strip()
    if spec.isdigit():
        for d in devices:
            if d.index == int(spec):
                return d
        raise TalkstreamError(
            f"input device {spec} does not exist or has no input channels; input devices: "
            f"{_device_list(devices)}"
        )
    exact = [d for d in devices if d.name.lower() == spec.lower()]
    if exact:
        return exact[0]
    partial = [d for d in devices if spec.lower() in d.name.lower()]
    if len(partial) == 1:
        return partial[0]
    if partial:
        raise TalkstreamError(
            f"input device name {spec!r} is ambiguous: it matches {_device_list(partial)}; "
            "give the index or more of the name"
        )
    raise TalkstreamError(
        f"no input device named {spec!r}; input devices: {_device_list(devices)} "
        "(`talkstream live --list-devices` shows details)"
    )


def choose_format(
    device: InputDevice, supports: Callable[[InputDevice, int, int], bool]
) -> tuple[int, int]:
    """(rate Hz, channels) to capture ``device`` with: 16 kHz mono if it can, else native rate.

    Some hardware devices only open in stereo; those are captured in stereo and mixed down.
    """
    rates = [PREFERRED_RATE_HZ]
    if device.default_rate_hz != PREFERRED_RATE_HZ:
        rates.append(device.default_rate_hz)
    channel_options = [1] + ([2] if device.channels >= 2 else [])
    for channels in channel_options:
        for rate in rates:
            if supports(device, rate, channels):
                return rate, channels
    raise TalkstreamError(
        f"input device {device.index} '{device.name}' accepts neither {PREFERRED_RATE_HZ} Hz nor "
        f"its default {device.default_rate_hz} Hz as 16-bit mono or stereo; pick another device "
        "(`talkstream live --list-devices`)"
    )


class MicCapture:
    """A running capture of one input device.

    ``on_audio(pcm, rate)`` is called in PortAudio's thread with each 20 ms chunk (int16, mono);
    it must return quickly. ``samples`` counts what was delivered: the live media clock.
    With ``max_samples`` the capture stops by itself after exactly that many samples.

    ``pace=True`` throttles the delivery to real time. A real microphone is clocked by its
    hardware; an unclocked source (an ALSA ``file`` device, a loopback fed from a file) delivers
    as fast as it is read, which would make the media clock race ahead of the wall clock.
    Sleeping in the callback is right there: it stands in for the hardware clock.
    """

    def __init__(
        self,
        system: AudioSystem,
        device: InputDevice,
        on_audio: AudioCallback | None = None,
        *,
        max_samples: int | None = None,
        pace: bool = False,
        chunk_ms: int = CHUNK_MS,
    ) -> None:
        self.system = system
        self.device = device
        self.on_audio = on_audio
        self.rate_hz, self.channels = choose_format(device, system.supports)
        self.chunk_samples = self.rate_hz * chunk_ms // 1000
        self.max_samples = max_samples
        self.pace = pace
        self.samples = 0  # written by PortAudio's thread only
        self.overflows = 0
        self.error: BaseException | None = None
        self._finished = threading.Event()
        self._t0: float | None = None
        self._stream: Any = None

    def start(self) -> None:
        if self.on_audio is None:
            raise ValueError("MicCapture.start() needs an on_audio callback")
        pa = self.system.pyaudio
        try:
            with quiet_native_stderr():
                self._stream = self.system.pa.open(
                    format=pa.paInt16,
                    channels=self.channels,
                    rate=self.rate_hz,
                    input=True,
                    input_device_index=self.device.index,
                    frames_per_buffer=self.chunk_samples,
                    stream_callback=self._callback,
                )
        except OSError as e:
            raise TalkstreamError(
                f"cannot open input device {self.device.index} '{self.device.name}' at "
                f"{self.rate_hz} Hz: {e}. Is another program holding it? "
                "(`talkstream live --list-devices` lists the others)"
            ) from e
        log.info(
            "capturing '%s' at %d Hz, %d channel(s), %d ms buffers",
            self.device.name,
            self.rate_hz,
            self.channels,
            self.chunk_samples * 1000 // self.rate_hz,
        )

    @property
    def finished(self) -> bool:
        """The capture reached ``max_samples`` or failed (see ``error``)."""
        return self._finished.is_set()

    @property
    def active(self) -> bool:
        return self._stream is not None and bool(self._stream.is_active())

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the capture has finished; False on timeout."""
        return self._finished.wait(timeout)

    def stop(self) -> None:
        """Stop and close the stream (idempotent)."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        with quiet_native_stderr():
            if not stream.is_stopped():
                stream.stop_stream()
            stream.close()

    def __enter__(self) -> MicCapture:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _callback(
        self, in_data: bytes | None, frame_count: int, time_info: object, status: int
    ) -> tuple[None, int]:
        pa = self.system.pyaudio
        try:
            if status & pa.paInputOverflow:
                self.overflows += 1
            pcm = np.frombuffer(in_data or b"", dtype=np.int16)
            if self.channels > 1:
                pcm = pcm.reshape(-1, self.channels).mean(axis=1).astype(np.int16)  # (n,)
            last = False
            if self.max_samples is not None and self.samples + pcm.shape[0] >= self.max_samples:
                pcm = pcm[: self.max_samples - self.samples]
                last = True
            if pcm.shape[0]:
                assert self.on_audio is not None
                self.on_audio(pcm, self.rate_hz)
            self.samples += pcm.shape[0]
            if self.pace:
                self._sleep_to_real_time()
            if last:
                self._finished.set()
                return None, pa.paComplete
            return None, pa.paContinue
        except Exception as e:  # an exception would die silently in PortAudio's thread
            log.exception("audio callback failed")
            self.error = e
            self._finished.set()
            return None, pa.paAbort

    def _sleep_to_real_time(self) -> None:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        ahead = self._t0 + self.samples / self.rate_hz - now
        if ahead > 0:
            time.sleep(ahead)
