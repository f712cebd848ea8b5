"""The fake microphone's loop: espeak-ng speech bursts separated by silence, as a 16-bit WAV.

Chromium's fake capture device loops the file (``--use-file-for-fake-audio-capture``); the
burst pattern found here (speech onsets within one loop) is recorded beside the results.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from talkstream.benchmarking.browser.analysis import (
    QUIET_BEFORE_ONSET_S,
    QUIET_RMS,
    SPEECH_RMS,
    level_curve,
    onsets,
)
from talkstream.errors import TalkstreamError

# Each phrase, then silence. Two phrases of different lengths make the pattern aperiodic within
# a loop, so bursts cannot be matched one burst off.
PHRASES = ("hello there", "how are you doing today")
LEAD_S = 0.5
GAP_S = 1.6


def speech_bursts(
    out: Path, phrases: Sequence[str], lead_s: float = LEAD_S, gap_s: float = GAP_S
) -> Path:
    """``lead_s`` of silence, then each phrase spoken by espeak-ng followed by ``gap_s`` of
    silence, as a 16-bit mono WAV at ``out`` (espeak-ng's own rate)."""
    import soundfile

    if shutil.which("espeak-ng") is None:
        raise TalkstreamError(
            "generating the fake microphone's speech needs espeak-ng: apt-get install "
            "espeak-ng (or pass a WAV of speech bursts separated by silence)"
        )
    parts: list[np.ndarray] = []
    rate = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, phrase in enumerate(phrases):
            raw = Path(tmp) / f"phrase{i}.wav"
            subprocess.run(["espeak-ng", "-w", str(raw), phrase], check=True, capture_output=True)
            x, rate = soundfile.read(raw, dtype="float32", always_2d=True)
            parts.append(x.mean(axis=1))
    gap = np.zeros(int(gap_s * rate), np.float32)
    seq: list[np.ndarray] = [np.zeros(int(lead_s * rate), np.float32)]
    for p in parts:
        seq += [p, gap]
    soundfile.write(out, np.concatenate(seq), rate, subtype="PCM_16")
    return out


def make_speech_wav(out_dir: Path) -> Path:
    """Espeak-ng phrases and silences (:data:`PHRASES`, :data:`GAP_S`) as ``speech.wav``."""
    return speech_bursts(out_dir / "speech.wav", PHRASES)


def prepare_mic_wav(speech_wav: Path | None, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The WAV the fake microphone loops (16-bit mono, in ``out_dir``) and its burst pattern."""
    import soundfile

    if speech_wav is None:
        path = make_speech_wav(out_dir)
    else:
        try:
            x, rate = soundfile.read(speech_wav, dtype="float32", always_2d=True)
        except (OSError, RuntimeError) as e:  # soundfile raises LibsndfileError (RuntimeError)
            raise TalkstreamError(f"cannot read the speech WAV {speech_wav}: {e}") from None
        path = out_dir / "speech.wav"
        soundfile.write(path, x.mean(axis=1), rate, subtype="PCM_16")
    x, rate = soundfile.read(path, dtype="float32")
    loop_s = len(x) / rate
    # The fake device loops the file: its second pass has the end's silence before its start.
    t, rms = level_curve(np.concatenate([x, x]), rate)
    loop_on = [
        round(v - loop_s, 3)
        for v in onsets(t, rms, SPEECH_RMS, QUIET_RMS, QUIET_BEFORE_ONSET_S)
        if loop_s <= v < 2 * loop_s
    ]
    if not loop_on:
        raise TalkstreamError(
            f"{speech_wav or path}: no speech burst found (the level must rise above "
            f"{SPEECH_RMS} RMS after at least {QUIET_BEFORE_ONSET_S} s below {QUIET_RMS})"
        )
    return path, {
        "path": str(path),
        "phrases": list(PHRASES) if speech_wav is None else None,
        "loop_s": round(loop_s, 3),
        "onsets_in_loop_s": loop_on,
    }
