"""Microphone capture through a real PortAudio stream on an ALSA ``file`` device.

There is no sound card here. An ``.asoundrc`` in a temporary HOME defines a capture PCM of type
``file`` (slave ``null``) whose ``infile`` is raw 16-bit PCM written by the test: PortAudio lists
it and reads it like any microphone, but unclocked (as fast as it is read; silence after the end
of the file). ALSA reads its config when PortAudio initialises, so everything that captures runs
in a subprocess with that HOME.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from talkstream.engine.render import default_audio_path
from talkstream.errors import TalkstreamError
from talkstream.streaming.mic import InputDevice, choose_format, select_input_device

requires_pyaudio = pytest.mark.skipif(
    importlib.util.find_spec("pyaudio") is None,
    reason="pyaudio (the [live] extra) is not installed; it needs Debian's portaudio19-dev",
)

FILE_MIC = "talkstream_file_mic"
SUBPROCESS_TIMEOUT_S = 120


def file_mic_home(tmp_path: Path, seconds: float | None = None) -> tuple[Path, np.ndarray]:
    """A HOME whose ``.asoundrc`` defines ``FILE_MIC`` playing the bundled espeak-ng sentence.

    Returns (home, the int16 samples the device delivers before its silence).
    """
    speech, rate = sf.read(default_audio_path(), dtype="int16")
    assert rate == 16_000 and speech.ndim == 1
    if seconds is not None:
        speech = speech[: int(seconds * rate)]
    home = tmp_path / "home"
    home.mkdir()
    raw = home / "speech.raw"
    speech.astype("<i2").tofile(raw)
    (home / ".asoundrc").write_text(
        textwrap.dedent(
            f"""\
            pcm.{FILE_MIC} {{
                type file
                slave.pcm "null"
                file "/dev/null"
                infile "{raw}"
                format "raw"
            }}
            """
        )
    )
    return home, speech


def cli_env(home: Path) -> dict[str, str]:
    """This process's environment with ``HOME=home``; caches stay inside it too."""
    return dict(os.environ, HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))


def run_py(
    home: Path, *args: str, timeout: float = SUBPROCESS_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """``python *args`` with ``HOME=home`` (ALSA finds its config there)."""
    return subprocess.run(
        [sys.executable, *args],
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parent.parent,
    )


def run_cli(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``talkstream *argv`` in a subprocess with ``HOME=home``."""
    code = "import sys; from talkstream.cli import main; sys.exit(main(sys.argv[1:]))"
    return run_py(home, "-c", code, *argv)


CAPTURE_SCRIPT = """
import json, sys, time
import numpy as np
from talkstream.streaming.mic import AudioSystem, MicCapture, select_input_device

n, paced_n, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
result = {}
with AudioSystem() as system:
    device = select_input_device(system.input_devices(), sys.argv[4])
    for name, count, pace in (("unpaced", n, False), ("paced", paced_n, True)):
        chunks, rates = [], set()

        def on_audio(pcm, rate):
            chunks.append(pcm.copy())
            rates.add(rate)

        capture = MicCapture(system, device, on_audio, max_samples=count, pace=pace)
        t0 = time.monotonic()
        with capture:
            assert capture.wait(30), "capture did not finish"
        result[name] = {
            "wall_s": time.monotonic() - t0,
            "rates": sorted(rates),
            "sizes": [len(c) for c in chunks],
            "samples": capture.samples,
        }
        np.save(f"{out}_{name}.npy", np.concatenate(chunks))
print(json.dumps(result))
"""


@requires_pyaudio
def test_capture_equals_file_samples(tmp_path: Path) -> None:
    home, speech = file_mic_home(tmp_path)
    paced_n = 8_000  # 0.5 s
    out = tmp_path / "cap"
    proc = run_py(home, "-c", CAPTURE_SCRIPT, str(len(speech)), str(paced_n), str(out), FILE_MIC)
    assert proc.returncode == 0, proc.stderr
    assert "ALSA lib" not in proc.stderr  # PortAudio's probe noise is held back
    res = json.loads(proc.stdout.strip().splitlines()[-1])

    # Unpaced: all 9 s of the file arrive at once, exactly, in 20 ms chunks at 16 kHz.
    un = res["unpaced"]
    got = np.load(f"{out}_unpaced.npy")
    assert got.dtype == np.int16 and un["samples"] == len(speech)
    np.testing.assert_array_equal(got, speech)
    assert un["rates"] == [16_000]
    assert set(un["sizes"][:-1]) == {320} and 0 < un["sizes"][-1] <= 320
    assert un["wall_s"] < len(speech) / 16_000 / 2  # the file device is not clocked

    # Paced: the same device throttled to real time (the device was reopened: the file again).
    pa = res["paced"]
    np.testing.assert_array_equal(np.load(f"{out}_paced.npy"), speech[:paced_n])
    assert pa["wall_s"] >= 0.45


@requires_pyaudio
def test_list_devices_shows_file_device(tmp_path: Path) -> None:
    home, _ = file_mic_home(tmp_path, seconds=0.5)
    proc = run_cli(home, "live", "--list-devices")
    assert proc.returncode == 0, proc.stderr
    assert FILE_MIC in proc.stdout and "input devices" in proc.stdout
    assert "virtual cameras:" in proc.stdout
    assert "ALSA lib" not in proc.stderr and "Traceback" not in proc.stderr


@requires_pyaudio
def test_no_microphone(tmp_path: Path) -> None:
    home = tmp_path / "bare"  # no .asoundrc and no sound card: PortAudio lists no input
    home.mkdir()
    proc = run_cli(home, "live", "--out", str(tmp_path / "x.mp4"), "--duration", "1")
    assert proc.returncode == 2
    assert proc.stderr.startswith("talkstream: error: no microphone found")
    assert "arecord -l" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.mp4").exists()


@requires_pyaudio
def test_unknown_input_device_lists_devices(tmp_path: Path) -> None:
    home, _ = file_mic_home(tmp_path, seconds=0.5)
    proc = run_cli(home, "live", "--out", str(tmp_path / "x.mp4"), "--input-device", "nosuch")
    assert proc.returncode == 2
    assert "no input device named 'nosuch'" in proc.stderr and FILE_MIC in proc.stderr


def test_missing_pyaudio_names_the_extra(tmp_path: Path) -> None:
    # A None entry in sys.modules makes `import pyaudio` fail as if it were not installed.
    code = (
        "import sys; sys.modules['pyaudio'] = None; from talkstream.cli import main; "
        "sys.exit(main(['live', '--list-devices']))"
    )
    proc = run_py(tmp_path, "-c", code)
    assert proc.returncode == 2
    assert "pip install 'talkstream[live]'" in proc.stderr and "portaudio19-dev" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- device choice (pure functions; no PortAudio) -------------------------------------------------


def _dev(index: int, name: str, default: bool = False, rate: int = 48_000) -> InputDevice:
    return InputDevice(index, name, "ALSA", 2, rate, is_default=default)


DEVICES = [
    _dev(0, "HDA Intel PCH: ALC3246 Analog (hw:0,0)"),
    _dev(3, "USB Audio Device: - (hw:1,0)"),
    _dev(5, "pulse", default=True),
    _dev(7, "USB Audio Device: Mic 2 (hw:2,0)"),
]


@pytest.mark.parametrize(
    ("spec", "index"),
    [(None, 5), ("3", 3), ("Pulse", 5), ("hda", 0), ("mic 2", 7), (" 7 ", 7)],
)
def test_select_input_device(spec: str | None, index: int) -> None:
    assert select_input_device(DEVICES, spec).index == index


@pytest.mark.parametrize(
    ("spec", "message"),
    [("4", "input device 4 does not exist"), ("usb", "ambiguous"), ("webcam", "no input device")],
)
def test_select_input_device_errors(spec: str, message: str) -> None:
    with pytest.raises(TalkstreamError, match=message) as e:
        select_input_device(DEVICES, spec)
    assert "pulse" in str(e.value) or "USB" in str(e.value)  # says what there is


def test_select_without_devices_says_how_to_check() -> None:
    with pytest.raises(TalkstreamError, match=r"no microphone found.*arecord -l"):
        select_input_device([], None)
    # No default device: the first input is taken.
    assert select_input_device([_dev(2, "a"), _dev(4, "b")], None).index == 2


def test_choose_format_prefers_16k_mono() -> None:
    dev = _dev(1, "x", rate=44_100)
    assert choose_format(dev, lambda d, r, c: True) == (16_000, 1)
    # A device that only runs at its native rate, or only in stereo.
    assert choose_format(dev, lambda d, r, c: r == 44_100) == (44_100, 1)
    assert choose_format(dev, lambda d, r, c: c == 2 and r == 44_100) == (44_100, 2)
    with pytest.raises(TalkstreamError, match="accepts neither"):
        choose_format(dev, lambda d, r, c: False)
