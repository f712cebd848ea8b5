"""The on-disk format of a synthetic corpus clip: a WAV and an ``.npz`` of arrays.

A clip ``NNNNN`` of a corpus (:mod:`talkstream.training.synthetic`) is two files in
``OUT/clips/``::

    NNNNN.wav        16 kHz mono 16-bit PCM
    NNNNN.npz        compressed numpy arrays (no pickled objects), below

Arrays of a clip's ``.npz`` (T frames, crop pixels, times in seconds on the WAV's timeline):

    frames_delta      (T, S, S, 3) uint8   frames, temporally differenced (decode_frames)
    landmarks         (T, 68, 2) float32   what each frame shows (speech + blinks + sway)
    speech_landmarks  (T, 68, 2) float32   neutral + speech motion only (AudioToMotion target)
    params            (T, 5) float32       mouth parameters, columns param_names
    blink             (T,) float32         0 open .. 1 shut
    frame_time_s      (T,) float32         the instant frame i shows: (i + 0.5) * 40 ms
    phoneme           (N,) <U8             espeak mnemonics, with phoneme_start_s/_end_s (N,)
    phoneme_viseme    (N,) int16           first viseme of each phoneme (index in viseme_names)
    word, word_start_s (M,)                words and their start times
    spec, generator   0-d str              the ClipSpec as JSON; generator version + avatar key

Frames are stored losslessly in the ``.npz`` rather than as an mp4: the corpus frames are the
denoiser's targets and the reference for PSNR/SSIM, so a lossy codec would put its artefacts
into both, and one file per clip keeps frames, landmarks and phonemes aligned without a codec
dependency. They are stored as temporal differences (uint8, modulo 256; see
:func:`encode_frames`): consecutive frames differ little, so zlib packs them to about a quarter
of the raw size (about 16 MB per minute at 128 px; lossless H.264 would be about 1.5x smaller
again, at the price of a codec in the training loop). Frame 0 is stored relative to the
corpus's ``reference.png``, so decoding needs it (:func:`read_clip` finds it two folders up).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import soundfile as sf
from PIL import Image

from talkstream.config import FPS, SAMPLE_RATE_HZ
from talkstream.training.espeak import PhonemeSegment
from talkstream.training.visemes import PARAMS, VISEME_INDEX, VISEMES, visemes_for_phoneme

__all__ = [
    "FRAME_MS",
    "Clip",
    "ClipSpec",
    "decode_frames",
    "encode_frames",
    "frame_times",
    "read_clip",
]

FRAME_MS: Final = 1000 // FPS  # 40 ms


def frame_times(n_frames: int) -> np.ndarray:
    """The instant each frame shows: the centre of its 40 ms, in seconds; (T,) float64."""
    return (np.arange(n_frames, dtype=np.float64) + 0.5) * (FRAME_MS / 1000.0)


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip (a clip is a pure function of its spec + avatar)."""

    clip_id: str
    split: str  # "train" | "heldout"
    sentence_id: int
    language: str
    text: str
    voice: str  # espeak voice with variant, e.g. "en-us+m3"
    rate_wpm: int
    pitch: int
    articulation: float  # scale of the mouth movements (viseme_trajectory)
    gain_db: float  # peak level of the speech, dBFS
    lead_s: float  # silence before the speech
    tail_s: float  # silence after it
    sway_amplitude: float  # IdleConfig.sway_amplitude
    blink_interval_s: float  # IdleConfig.blink_interval_s
    seed: int  # idle-motion seed

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False)


@dataclass
class Clip:
    """A synthesised clip, in memory.

    Made by :func:`talkstream.training.synthetic.synthesize_clip`.
    """

    spec: ClipSpec
    audio: np.ndarray  # (N,) float32 16 kHz mono
    phonemes: list[PhonemeSegment]  # times on the clip's timeline (lead included)
    words: list[tuple[str, float]]
    params: np.ndarray  # (T, 5) float32
    speech_landmarks: np.ndarray  # (T, 68, 2) float32: neutral + speech motion
    landmarks: np.ndarray  # (T, 68, 2) float32: + blinks and head sway (what frames show)
    blink: np.ndarray  # (T,) float32, 0 open .. 1 shut
    frames: np.ndarray | None  # (T, S, S, 3) uint8, None if not rendered


def _write_clip(
    clip: Clip, reference: np.ndarray, wav_path: Path, npz_path: Path, generator: str
) -> None:
    """Write the WAV and the npz atomically (temporary names, then renames; npz last).

    ``generator`` is stored as the npz's ``generator`` string: what made the clip besides its
    spec (the corpus builder's generator version and avatar key).
    """
    pcm16 = np.clip(np.rint(clip.audio * 32767.0), -32768, 32767).astype(np.int16)
    tmp_wav = wav_path.with_name(wav_path.stem + ".tmp.wav")
    sf.write(tmp_wav, pcm16, SAMPLE_RATE_HZ, subtype="PCM_16")
    names = [p.name for p in clip.phonemes]
    arrays: dict[str, np.ndarray] = {
        "spec": np.array(clip.spec.to_json()),
        # What made the clip besides its spec: a resumed build reuses it only if both match.
        "generator": np.array(generator),
        "frame_time_s": frame_times(len(clip.params)).astype(np.float32),
        "params": clip.params,
        "param_names": np.array(PARAMS),
        "speech_landmarks": clip.speech_landmarks,
        "landmarks": clip.landmarks,
        "blink": clip.blink,
        "phoneme": np.array(names, dtype="<U8"),
        "phoneme_start_s": np.array([p.start_s for p in clip.phonemes], dtype=np.float32),
        "phoneme_end_s": np.array([p.end_s for p in clip.phonemes], dtype=np.float32),
        "phoneme_viseme": np.array(
            [
                VISEME_INDEX[(visemes_for_phoneme(n, clip.spec.language) or ("rest",))[0]]
                for n in names
            ],
            dtype=np.int16,
        ),
        "viseme_names": np.array([v.name for v in VISEMES]),
        "word": np.array([w for w, _ in clip.words], dtype=str),
        "word_start_s": np.array([t for _, t in clip.words], dtype=np.float32),
    }
    if clip.frames is not None:
        arrays["frames_delta"] = encode_frames(clip.frames, reference)
    tmp_npz = npz_path.with_name(npz_path.stem + ".tmp.npz")
    np.savez_compressed(tmp_npz, **arrays)  # type: ignore[arg-type]
    os.replace(tmp_wav, wav_path)
    os.replace(tmp_npz, npz_path)


def encode_frames(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Frames as temporal differences, uint8 modulo 256 (lossless).

    Element 0 is frame 0 minus the reference crop, element t frame t minus frame t-1. Most
    differences are 0 or +-1, so zlib packs them about 4x smaller than the raw frames.
    """
    f = np.asarray(frames, dtype=np.uint8)  # (T, S, S, 3)
    out = np.empty_like(f)
    if len(f):
        out[0] = f[0] - reference  # uint8 arithmetic wraps modulo 256: exactly invertible
        np.subtract(f[1:], f[:-1], out=out[1:])
    return out


def decode_frames(delta: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_frames`: (T, S, S, 3) uint8 frames."""
    out = np.cumsum(delta, axis=0, dtype=np.uint8)  # wraps modulo 256
    out += reference[None]
    return out


def read_clip(npz_path: str | Path, reference: np.ndarray | None = None) -> dict[str, Any]:
    """Load a clip's arrays (no pickle).

    Args:
        npz_path: the clip's ``.npz``.
        reference: the corpus reference crop (``reference.png``), needed to decode frames;
            if None, it is read from the corpus folder (two levels up).

    Returns:
        A dict with the arrays listed in the module docstring, with ``"frames_delta"``
        decoded to ``"frames"`` ((T, S, S, 3) uint8) and ``"spec"`` parsed into a dict of the
        :class:`ClipSpec` fields.
    """
    p = Path(npz_path)
    with np.load(p, allow_pickle=False) as z:
        out: dict[str, Any] = {k: z[k] for k in z.files}
    out["spec"] = json.loads(str(out["spec"]))
    if "frames_delta" in out:
        if reference is None:
            reference = np.asarray(Image.open(p.parent.parent / "reference.png").convert("RGB"))
        out["frames"] = decode_frames(out.pop("frames_delta"), reference)
    return out
