"""Training clips in memory, from a synthetic corpus or a preprocessed video cache, and batches.

Both sources become the same thing, a :class:`TrainData`: per clip the log-mel rows of its
16 kHz audio, the landmarks every frame shows, the speech-only landmarks (the motion model's
target), the neutral landmarks, the frames and which reference crop they belong to. All
landmarks are in normalised crop coordinates ([-1, 1], ``align_corners=False``), as the engine
uses them.

The batch builders take a ``numpy.random.Generator`` and build windows with
:func:`talkstream.engine.motion.build_windows`, the function streaming inference uses, so the
motion model sees exactly the numbers it will see live.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from talkstream.config import SAMPLE_RATE_HZ, AudioConfig
from talkstream.engine.audio import log_mel
from talkstream.engine.avatar import crop_px_to_norm
from talkstream.engine.landmarks import MOTION_POINTS
from talkstream.engine.motion import MotionConfig, build_windows, silence_level
from talkstream.errors import InputError

__all__ = [
    "CORPUS_FORMAT",
    "VIDEO_CACHE_FORMAT",
    "FrameBatch",
    "MotionBatch",
    "TrainClip",
    "TrainData",
    "dataset_format",
    "load_dataset",
    "to_image_tensor",
]

CORPUS_FORMAT = "talkstream.corpus"
VIDEO_CACHE_FORMAT = "talkstream.videocache"
_MOTION_IDX = np.asarray(MOTION_POINTS)


@dataclass
class TrainClip:
    """One clip, ready for batching. T frames at 25 fps; landmarks normalised."""

    name: str
    mel: np.ndarray  # (rows, n_mels) float32 log-mel of the whole clip
    landmarks: np.ndarray  # (T, 68, 2) float32: what each frame shows (speech + idle motion)
    speech: np.ndarray  # (T, 68, 2) float32: speech-only landmarks (the motion target)
    neutral: np.ndarray  # (68, 2) float32
    ref: int  # index into TrainData.references
    frames: np.ndarray | None  # (T, S, S, 3) uint8, None when frames were not loaded
    params: np.ndarray | None = None  # (T, 5) mouth parameters (synthetic corpus only)

    @property
    def n_frames(self) -> int:
        return int(self.landmarks.shape[0])


@dataclass
class MotionBatch:
    """``n`` sequences of ``seq_len`` consecutive frames, flattened sequence-major."""

    windows: torch.Tensor  # (n * L, W, R, n_mels) float32
    neutral: torch.Tensor  # (n * L, 68, 2)
    target: torch.Tensor  # (n * L, 37, 2) speech displacement of the motion points
    seq_len: int


@dataclass
class FrameBatch:
    """Single frames for the denoiser (and, with windows, for the end-to-end stage)."""

    x0: torch.Tensor  # (B, 3, S, S) float32 in [-1, 1]
    landmarks: torch.Tensor  # (B, 68, 2) what the frames show
    refs: torch.Tensor  # (R, 3, S, S) float32 in [-1, 1]: the distinct references of the batch
    ref_index: torch.Tensor | None  # (B,) int64 into refs; None when R == 1 (broadcast)
    clip_index: np.ndarray  # (B,) which clip
    frame_index: np.ndarray  # (B,) which frame of it
    windows: torch.Tensor | None = None  # (B, W, R, n_mels) for the end-to-end stage
    neutral: torch.Tensor | None = None  # (B, 68, 2)
    speech_target: torch.Tensor | None = None  # (B, 37, 2)
    idle: torch.Tensor | None = None  # (B, 68, 2): landmarks - speech (blinks, head motion)


def to_image_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 in [-1, 1]."""
    arr = np.ascontiguousarray(images)
    if not arr.flags.writeable:  # e.g. a PIL-backed reference; torch wants writable memory
        arr = arr.copy()
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class TrainData:
    """A set of clips and their reference crops, with batch builders."""

    def __init__(
        self,
        clips: list[TrainClip],
        references: np.ndarray,
        audio: AudioConfig | None = None,
    ) -> None:
        if not clips:
            raise ValueError("TrainData needs at least one clip")
        if references.ndim != 4 or references.shape[3] != 3 or references.dtype != np.uint8:
            raise ValueError(f"references must be (R, S, S, 3) uint8, got {references.shape}")
        self.clips = clips
        self.references = references
        self.audio = audio or AudioConfig()
        self.silence = silence_level(self.audio)
        self.crop_size = int(references.shape[1])
        lengths = np.array([c.n_frames for c in clips], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])  # global frame index bounds
        self.total_frames = int(self._starts[-1])
        self._ref_tensors = to_image_tensor(references)  # (R, 3, S, S)
        self._neutral = torch.from_numpy(np.stack([c.neutral for c in clips]))  # (C, 68, 2)

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def has_frames(self) -> bool:
        return all(c.frames is not None for c in self.clips)

    @property
    def duration_s(self) -> float:
        return self.total_frames / 25.0

    # -- sampling ------------------------------------------------------------------------------

    def sample_frames(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` frames uniformly over all frames: (clip indices, frame indices)."""
        g = rng.integers(0, self.total_frames, size=n)
        clip = np.searchsorted(self._starts, g, side="right") - 1
        return clip, g - self._starts[clip]

    def sample_sequences(
        self, rng: np.random.Generator, n: int, length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` starts of ``length`` consecutive frames (clips weighted by frame count)."""
        clip, frame = self.sample_frames(rng, n)
        lengths = self._starts[clip + 1] - self._starts[clip]
        # Shift starts that would run off the end; a clip shorter than `length` repeats its last
        # frame (the indices are clamped when the batch is built).
        start = np.minimum(frame, np.maximum(lengths - length, 0))
        return clip, start

    # -- batches -------------------------------------------------------------------------------

    def _frames(self, clip: int) -> np.ndarray:
        frames = self.clips[clip].frames
        if frames is None:
            raise ValueError(f"clip {self.clips[clip].name} was loaded without frames")
        return frames

    def _windows(
        self,
        clip: TrainClip,
        frames: list[int],
        mcfg: MotionConfig,
        gain_db: float,
    ) -> np.ndarray:
        mel = clip.mel
        if gain_db:
            # A level change scales the power spectrum: log-mel shifts by a constant; floored
            # rows stay at the floor (digital silence does not get louder).
            mel = np.maximum(mel + np.float32(gain_db * math.log(10.0) / 10.0), self.silence)
        return build_windows(mel, frames, mcfg, self.silence)

    def motion_batch(
        self,
        rng: np.random.Generator,
        n: int,
        seq_len: int,
        mcfg: MotionConfig,
        gain_jitter_db: float = 0.0,
    ) -> MotionBatch:
        """Sequences for the motion stage."""
        clips, starts = self.sample_sequences(rng, n, seq_len)
        gains = rng.uniform(-gain_jitter_db, gain_jitter_db, size=n) if gain_jitter_db else None
        wins, neutral, target = [], [], []
        for i, (c, s) in enumerate(zip(clips, starts, strict=True)):
            clip = self.clips[int(c)]
            idx = [min(int(s) + k, clip.n_frames - 1) for k in range(seq_len)]
            wins.append(self._windows(clip, idx, mcfg, float(gains[i]) if gains is not None else 0))
            neutral.append(np.broadcast_to(clip.neutral, (seq_len, 68, 2)))
            target.append(clip.speech[idx][:, _MOTION_IDX] - clip.neutral[_MOTION_IDX])
        return MotionBatch(
            windows=torch.from_numpy(np.concatenate(wins)),
            neutral=torch.from_numpy(np.ascontiguousarray(np.concatenate(neutral))),
            target=torch.from_numpy(np.concatenate(target).astype(np.float32)),
            seq_len=seq_len,
        )

    def frame_batch(
        self,
        rng: np.random.Generator,
        n: int,
        mcfg: MotionConfig | None = None,
        gain_jitter_db: float = 0.0,
        picks: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> FrameBatch:
        """Single frames; with ``mcfg`` also their motion windows (end-to-end stage).

        Args:
            picks: (clip indices, frame indices) to use instead of sampling.
        """
        if not self.has_frames:
            raise ValueError("this dataset was loaded without frames")
        clips, frames = picks if picks is not None else self.sample_frames(rng, n)
        x0 = np.stack([self._frames(int(c))[int(t)] for c, t in zip(clips, frames, strict=True)])
        lm = np.stack(
            [self.clips[int(c)].landmarks[int(t)] for c, t in zip(clips, frames, strict=True)]
        )
        ref_ids = np.array([self.clips[int(c)].ref for c in clips])
        uniq, inverse = np.unique(ref_ids, return_inverse=True)
        batch = FrameBatch(
            x0=to_image_tensor(x0),
            landmarks=torch.from_numpy(lm),
            refs=self._ref_tensors[torch.from_numpy(uniq)],
            ref_index=None if len(uniq) == 1 else torch.from_numpy(inverse.astype(np.int64)),
            clip_index=np.asarray(clips),
            frame_index=np.asarray(frames),
        )
        if mcfg is not None:
            gains = rng.uniform(-gain_jitter_db, gain_jitter_db, size=len(clips))
            wins, speech = [], []
            for i, (c, t) in enumerate(zip(clips, frames, strict=True)):
                clip = self.clips[int(c)]
                g = float(gains[i]) if gain_jitter_db else 0.0
                wins.append(self._windows(clip, [int(t)], mcfg, g))
                speech.append(clip.speech[int(t)])
            sp = np.stack(speech)  # (B, 68, 2)
            neutral = self._neutral[torch.from_numpy(np.asarray(clips, dtype=np.int64))]
            batch.windows = torch.from_numpy(np.concatenate(wins))
            batch.neutral = neutral
            batch.speech_target = torch.from_numpy(
                (sp[:, _MOTION_IDX] - neutral.numpy()[:, _MOTION_IDX]).astype(np.float32)
            )
            batch.idle = torch.from_numpy((lm - sp).astype(np.float32))
        return batch


# ----------------------------------------------------------------------------- loading


def dataset_format(path: str | Path) -> str:
    """The ``format`` of the manifest in folder ``path`` (a corpus or a video cache)."""
    p = Path(path) / "manifest.json"
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} is not a dataset folder: it has no manifest.json") from None
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{p} is not readable JSON: {e}") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt not in (CORPUS_FORMAT, VIDEO_CACHE_FORMAT):
        raise InputError(
            f"{p}: unknown dataset format {fmt!r}; expected {CORPUS_FORMAT!r} (talkstream "
            f"corpus) or {VIDEO_CACHE_FORMAT!r} (a preprocessed video folder)"
        )
    return str(fmt)


def read_wav_16k(path: str | Path) -> np.ndarray:
    """A mono 16 kHz WAV as float32 (the corpus and the video cache both write those)."""
    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr != SAMPLE_RATE_HZ:
        raise InputError(f"{path}: expected {SAMPLE_RATE_HZ} Hz audio, got {sr} Hz")
    return np.ascontiguousarray(audio.mean(axis=1), dtype=np.float32)


def _entries(manifest: dict[str, Any], split: str | None, max_clips: int | None) -> list[Any]:
    entries = [e for e in manifest["clips"] if split is None or e["split"] == split]
    return entries[:max_clips] if max_clips is not None else entries


def load_corpus(
    path: str | Path,
    split: str | None = "train",
    audio: AudioConfig | None = None,
    frames: bool = True,
    max_clips: int | None = None,
) -> TrainData:
    """Clips of a synthetic corpus (``training.synthetic``) as a :class:`TrainData`."""
    from talkstream.training.synthetic import read_clip

    audio = audio or AudioConfig()
    root = Path(path)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    size = int(manifest["crop_size"])
    reference = np.asarray(Image.open(root / manifest["reference"]).convert("RGB"))
    neutral = crop_px_to_norm(np.asarray(manifest["neutral"], dtype=np.float32), size)
    clips: list[TrainClip] = []
    for e in _entries(manifest, split, max_clips):
        arrays = read_clip(root / e["data"], reference)
        if frames and "frames" not in arrays:
            raise InputError(f"{root}: clip {e['id']} has no frames (built with render_frames off)")
        clips.append(
            TrainClip(
                name=f"{root.name}/{e['id']}",
                mel=log_mel(read_wav_16k(root / e["wav"]), audio),
                landmarks=crop_px_to_norm(arrays["landmarks"], size),
                speech=crop_px_to_norm(arrays["speech_landmarks"], size),
                neutral=neutral,
                ref=0,
                frames=arrays["frames"] if frames else None,
                params=np.asarray(arrays["params"], dtype=np.float32)
                if "params" in arrays
                else None,
            )
        )
    if not clips:
        raise InputError(f"corpus {root} has no clips in split {split!r}")
    return TrainData(clips, reference[None], audio)


def load_video_cache(
    path: str | Path,
    split: str | None = "train",
    audio: AudioConfig | None = None,
    frames: bool = True,
    max_clips: int | None = None,
) -> TrainData:
    """Clips of a preprocessed video folder (``training.video``) as a :class:`TrainData`."""
    audio = audio or AudioConfig()
    root = Path(path)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    size = int(manifest["crop_size"])
    clips: list[TrainClip] = []
    refs: list[np.ndarray] = []
    for e in _entries(manifest, split, max_clips):
        with np.load(root / e["data"], allow_pickle=False) as z:
            clips.append(
                TrainClip(
                    name=f"{root.name}/{e['id']}",
                    mel=log_mel(read_wav_16k(root / e["wav"]), audio),
                    landmarks=crop_px_to_norm(z["landmarks"], size),
                    speech=crop_px_to_norm(z["speech_landmarks"], size),
                    neutral=crop_px_to_norm(z["neutral"], size),
                    ref=len(refs),
                    frames=np.asarray(z["frames"]) if frames else None,
                )
            )
            refs.append(np.asarray(z["reference"]))
    if not clips:
        raise InputError(f"video cache {root} has no clips in split {split!r}")
    return TrainData(clips, np.stack(refs), audio)


def load_dataset(
    path: str | Path,
    split: str | None = "train",
    audio: AudioConfig | None = None,
    frames: bool = True,
    max_clips: int | None = None,
) -> TrainData:
    """A corpus or a video cache, whichever ``path`` holds."""
    if dataset_format(path) == CORPUS_FORMAT:
        return load_corpus(path, split, audio, frames, max_clips)
    return load_video_cache(path, split, audio, frames, max_clips)


def concat_datasets(parts: list[TrainData]) -> TrainData:
    """One :class:`TrainData` of several (reference indices renumbered)."""
    if len(parts) == 1:
        return parts[0]
    sizes = {p.crop_size for p in parts}
    if len(sizes) != 1:
        raise InputError(f"datasets have different crop sizes {sorted(sizes)}")
    clips: list[TrainClip] = []
    refs: list[np.ndarray] = []
    for p in parts:
        base = sum(len(r) for r in refs)
        for c in p.clips:
            clips.append(
                TrainClip(
                    c.name,
                    c.mel,
                    c.landmarks,
                    c.speech,
                    c.neutral,
                    c.ref + base,
                    c.frames,
                    c.params,
                )
            )
        refs.append(p.references)
    return TrainData(clips, np.concatenate(refs), parts[0].audio)
