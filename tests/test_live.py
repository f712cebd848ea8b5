"""``talkstream live``: the audio-clocked loop, the file output, the virtual camera to its device.

The loop is tested in process with a small capture that delivers PCM from a thread (in real time,
or all at once like an unclocked device) and a sink that records what it is sent. The command is
tested end to end in a subprocess on the ALSA file device of ``test_mic``.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from talkstream.cli import main
from talkstream.config import FPS
from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from talkstream.errors import TalkstreamError
from talkstream.streaming.live import LiveLoop
from talkstream.streaming.mic import InputDevice
from talkstream.streaming.vcam import (
    VirtualCameraSink,
    loopback_devices,
    vcam_frame,
    vcam_size,
)
from tests.conftest import speechlike
from tests.test_mic import FILE_MIC, cli_env, file_mic_home, requires_pyaudio, run_cli

NO_V4L2LOOPBACK = "no v4l2loopback device (load it: sudo modprobe v4l2loopback devices=1)"
needs_vcam = pytest.mark.skipif(not loopback_devices(), reason=NO_V4L2LOOPBACK)
vcam_absent = pytest.mark.skipif(
    bool(loopback_devices()), reason="a v4l2loopback device exists: no error to check"
)
requires_pyvirtualcam = pytest.mark.skipif(
    importlib.util.find_spec("pyvirtualcam") is None,
    reason="pyvirtualcam (the [live] extra) is not installed",
)


# -- the loop, in process -------------------------------------------------------------------------


class ThreadCapture:
    """Delivers ``pcm`` in 20 ms chunks like PortAudio's callback thread.

    ``realtime``: one chunk per 20 ms of wall time, from a thread (a clocked microphone);
    otherwise all of it inside ``start()``, before the loop looks (an unclocked device at its
    most extreme).
    """

    def __init__(self, pcm: np.ndarray, loop: LiveLoop, rate_hz: int, realtime: bool) -> None:
        self.pcm, self.loop, self.rate_hz, self.realtime = pcm, loop, rate_hz, realtime
        self.device = InputDevice(0, "test capture", "none", 1, rate_hz)
        self.overflows = 0
        self.error: BaseException | None = None
        self.callback_s: list[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._deliver, daemon=True)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def active(self) -> bool:
        return not self._done.is_set()

    def start(self) -> None:
        if self.realtime:
            self._thread.start()
        else:
            self._deliver()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._thread.join()

    def _deliver(self) -> None:
        chunk = self.rate_hz // 50
        t0 = time.monotonic()
        for i in range(0, len(self.pcm), chunk):
            if self.realtime:
                time.sleep(max(0.0, t0 + i / self.rate_hz - time.monotonic()))
            c0 = time.perf_counter()
            self.loop.on_audio(self.pcm[i : i + chunk], self.rate_hz)
            self.callback_s.append(time.perf_counter() - c0)
        self._done.set()


class RecordingSink:
    """Keeps what the loop sends: slots with the audio clock at sending, and the audio."""

    description = "recorded"

    def __init__(self) -> None:
        self.loop: LiveLoop | None = None
        self.slots: list[tuple[int, float, np.ndarray]] = []
        self.audio_samples = 0
        self.finished = False

    def audio(self, pcm: np.ndarray, rate_hz: int) -> None:
        self.audio_samples += len(pcm)

    def video(self, image: np.ndarray, pts: int) -> None:
        assert self.loop is not None
        self.slots.append((pts, self.loop.clock_s(), image))

    def finish(self) -> None:
        self.finished = True

    def abort(self) -> None:
        pass


def _speech(seconds: float) -> np.ndarray:
    return (speechlike(int(16_000 * seconds)) * 20_000).astype(np.int16)


def _run_loop(
    engine: Engine, avatar: Avatar, pcm: np.ndarray, realtime: bool
) -> tuple[LiveLoop, RecordingSink, ThreadCapture]:
    engine.warmup(avatar)
    session = engine.session(avatar)
    sink = RecordingSink()
    loop = LiveLoop(session, sink, delay_s=session.latency_s + 0.1)
    sink.loop = loop
    capture = ThreadCapture(pcm, loop, 16_000, realtime)
    loop.run(capture, threading.Event())
    return loop, sink, capture


def test_loop_sends_each_slot_when_the_audio_clock_reaches_it(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    pcm = _speech(1.2)
    loop, sink, capture = _run_loop(tiny_engine, default_avatar, pcm, realtime=True)
    st = loop.stats
    assert [k for k, _, _ in sink.slots] == list(range(30))  # 25 fps of 1.2 s, in order
    assert st.frames_out == 30 == st.rendered + st.dropped and st.rendered >= 1
    audio_s = len(pcm) / 16_000
    for k, clock_s, _ in sink.slots:
        due_s = k / FPS + loop.delay_s
        # Sent once the audio clock reached its time; only the tail after the end is flushed.
        assert clock_s >= due_s or (clock_s == audio_s and due_s > audio_s), (k, clock_s)
    assert sink.audio_samples == len(pcm) and st.samples == len(pcm)
    # The capture thread only pushes audio (microseconds of work): it never waits for a render,
    # which would take it tens of milliseconds each time a frame is rendered.
    assert float(np.median(capture.callback_s)) < 0.01


def test_loop_drops_frames_whose_slot_has_gone(tiny_engine: Engine, default_avatar: Avatar) -> None:
    # All 2 s arrive before the loop first looks: the clock says 2 s, so every slot due by then
    # goes out at once (with the still image) and those frames are skipped, never rendered;
    # only the tail that falls due after the audio's end is rendered.
    pcm = _speech(2.0)
    loop, sink, _ = _run_loop(tiny_engine, default_avatar, pcm, realtime=False)
    st = loop.stats
    due_at_end = math.floor((2.0 - loop.delay_s) * FPS) + 1
    assert st.frames_out == 50 and [k for k, _, _ in sink.slots] == list(range(50))
    assert st.dropped == due_at_end and st.rendered == 50 - due_at_end
    assert all(img is default_avatar.image for _, _, img in sink.slots[:due_at_end])
    assert all(img is not default_avatar.image for _, _, img in sink.slots[due_at_end:])


# -- the command, end to end on the ALSA file device ---------------------------------------------


def _probe(path: Path) -> tuple[int, float, np.ndarray, int]:
    """(video frames, fps, decoded audio mono float, audio rate)."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        n = sum(1 for _ in c.decode(v))
        fps = float(v.average_rate)
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        audio = np.concatenate([f.to_ndarray().mean(axis=0) for f in c.decode(a)])
        rate = a.rate
    return n, fps, audio, rate


def _envelope(x: np.ndarray, hop: int = 640) -> np.ndarray:
    n = len(x) // hop
    return np.sqrt((x[: n * hop].astype(np.float64).reshape(n, hop) ** 2).mean(axis=1))


@requires_pyaudio
def test_cli_live_to_file(tmp_path: Path) -> None:
    home, speech = file_mic_home(tmp_path, seconds=2.0)
    out = tmp_path / "live.mp4"
    proc = run_cli(
        home, "live", "--out", str(out), "--duration", "1", "--input-device", FILE_MIC,
        "--pace-input", "--no-cache", "--threads", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ALSA lib" not in proc.stderr and "Traceback" not in proc.stderr
    assert "live done: 1.00 s of audio" in proc.stdout and "25 frames at 25 fps" in proc.stdout
    n, fps, audio, rate = _probe(out)
    assert n == 25 and fps == 25.0 and rate == 16_000
    assert len(audio) / rate == pytest.approx(1.0, abs=0.07)  # AAC priming/padding aside
    # The muxed audio is what the microphone said (AAC is lossy: compare loudness envelopes).
    ref, got = _envelope(speech[:16_000] / 32768.0), _envelope(audio)
    m = min(len(ref), len(got))
    assert np.corrcoef(ref[:m], got[:m])[0, 1] > 0.9
    assert not list(tmp_path.glob("tmp*.mp4"))


@requires_pyaudio
def test_cli_live_ctrl_c_finishes_the_file(tmp_path: Path) -> None:
    home, _ = file_mic_home(tmp_path, seconds=9.0)
    out = tmp_path / "stopped.mp4"
    code = "import sys; from talkstream.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["live", "--out", str(out), "--input-device", FILE_MIC, "--pace-input", "--no-cache"]
    # Not run_cli: this one must signal the process while it runs.
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv, "--threads", "1"],
        env=cli_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the INFO line that says the stream is open
            if "capturing" in line:
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "live stopped:" in stdout
    audio_s = float(stdout.split("live stopped: ")[1].split(" s of audio")[0])
    n, _, audio, rate = _probe(out)
    assert audio_s >= 0.8 and n == math.ceil(round(audio_s * 16_000) / 640)
    assert len(audio) / rate == pytest.approx(audio_s, abs=0.07)


@requires_pyaudio
@requires_pyvirtualcam
@vcam_absent
def test_cli_live_vcam_says_how_to_get_a_device(tmp_path: Path) -> None:
    home, _ = file_mic_home(tmp_path, seconds=1.0)
    proc = run_cli(home, "live", "--input-device", FILE_MIC, "--no-cache", "--threads", "1")
    assert proc.returncode == 2
    err = proc.stderr
    assert "talkstream: error: no virtual camera device" in err
    assert "sudo modprobe v4l2loopback devices=1 exclusive_caps=1" in err
    assert "Traceback" not in err and "Exception ignored" not in err


# -- the virtual camera, up to its device ---------------------------------------------------------


@requires_pyvirtualcam
@vcam_absent
@pytest.mark.parametrize("device", [None, "/dev/video63"])
def test_vcam_error_names_v4l2loopback(device: str | None) -> None:
    seen: list[Any] = []
    saved = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        with pytest.raises(TalkstreamError) as e:
            VirtualCameraSink(65, 49, device)
        gc.collect()
    finally:
        sys.unraisablehook = saved
    msg = str(e.value)
    assert "v4l2loopback" in msg and "sudo modprobe v4l2loopback" in msg
    if device is not None:
        assert device in msg
    assert not seen  # pyvirtualcam's half-built camera was cleaned up quietly


def _luma_of_device_frame(raw: bytes, fmt: str, w: int, h: int) -> np.ndarray:
    """The Y plane of one raw frame as v4l2loopback hands it to a reader (pyvirtualcam's
    native formats: planar I420 / NV12, packed YUYV / UYVY)."""
    buf = np.frombuffer(raw, np.uint8)
    if fmt in ("I420", "NV12"):
        return buf[: w * h].reshape(h, w)
    packed = buf[: w * h * 2].reshape(h, w * 2)
    return packed[:, 0::2] if fmt == "YUY2" else packed[:, 1::2]


def _luma_correlation(y: np.ndarray, rgb: np.ndarray) -> float:
    want = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # BT.601, any range
    return float(np.corrcoef(y.astype(np.float64).ravel(), want.ravel())[0, 1])


@requires_pyvirtualcam
@needs_vcam
def test_vcam_sends_frames(default_avatar: Avatar) -> None:
    """What the sink sends is what a video-call app reads from the device: the frame's size,
    its picture, and the newest frame (a second, inverted picture replaces the first)."""
    import os

    h, w = default_avatar.image.shape[:2]
    cam = VirtualCameraSink(w, h)
    pictures = [vcam_frame(default_avatar.image, cam.size)]
    pictures.append(255 - pictures[0])
    showing = [pictures[0]]
    stop = threading.Event()

    def feed() -> None:  # a steady 25 fps source, as the live loop is
        while not stop.is_set():
            cam.send(showing[0])
            time.sleep(1 / FPS)

    cam.send(showing[0])  # the first frame opens the device's capture side (exclusive_caps=1)
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        assert cam.device in loopback_devices()
        fmt = str(cam.camera.native_fmt.value)
        assert fmt in ("I420", "NV12", "YUY2", "UYVY"), f"device format {fmt}: not read here"
        fw, fh = cam.size
        size = fw * fh * 2 if fmt in ("YUY2", "UYVY") else fw * fh * 3 // 2
        fd = os.open(cam.device, os.O_RDONLY)  # v4l2loopback supports read() capture
        try:
            for picture in pictures:
                showing[0] = picture
                time.sleep(0.2)  # a few frames of the new picture
                raw = os.read(fd, size)
                assert len(raw) == size, (len(raw), size, fmt)
                y = _luma_of_device_frame(raw, fmt, fw, fh)
                assert y.shape == (fh, fw)
                assert _luma_correlation(y, picture) > 0.95
        finally:
            os.close(fd)
    finally:
        stop.set()
        feeder.join()
        cam.close()


def test_vcam_frame_is_even_contiguous_rgb() -> None:
    img = np.arange(49 * 65 * 3, dtype=np.uint8).reshape(49, 65, 3)
    size = vcam_size(65, 49)
    assert size == (64, 48)
    f = vcam_frame(img[:, :, :], size)
    assert f.shape == (48, 64, 3) and f.flags.c_contiguous
    np.testing.assert_array_equal(f, img[:48, :64])
    with pytest.raises(ValueError, match="uint8"):
        vcam_frame(img.astype(np.float32), size)


# -- arguments -------------------------------------------------------------------------------------


def test_live_help_lists_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["live", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--output", "--out", "--duration", "--input-device", "--list-devices", "--image"):
        assert opt in out
    assert "--landmarks" in out and "--checkpoint" in out and "v4l2loopback" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "clip.gif"], ".mp4"),
        (["--out", "no/such/dir/x.mp4"], "does not exist"),
        (["--output", "vcam", "--out", "x.mp4"], "--out is for --output file"),
        (["--compute-budget-ms", "-5", "--out", "x.mp4"], "--compute-budget-ms"),
    ],
)
def test_live_bad_arguments(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["live", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("talkstream: error:") and message in err


def test_live_duration_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["live", "--duration", "0", "--out", "x.mp4"])
    assert e.value.code == 2 and "positive" in capsys.readouterr().err
