"""Real talking-head videos as training data: a folder of mp4 files -> a preprocessed cache.

Each video (with an audio track) becomes one clip in the layout the trainer reads
(:func:`talkstream.training.dataset.load_video_cache`):

* audio: the first audio track, downmixed (channel mean, as the engine does) and resampled to
  16 kHz by the engine's own :class:`~talkstream.engine.audio.StreamingResampler`, so training
  sees the mel features live inference computes;
* frames: resampled in time to 25 fps by picking, for output frame ``i``, the source frame shown
  at ``(i + 0.5) * 40 ms`` (the synthetic corpus's timing convention), any source rate;
* landmarks: 68 points per frame from a :class:`~talkstream.engine.landmarks.LandmarkDetector`
  (dlib by default); frames where no face is found get landmarks interpolated from their
  neighbours and are flagged in ``detected``;
* crops: the engine's avatar alignment (:func:`~talkstream.engine.avatar.alignment_transform`)
  per frame, averaged over a few frames so detector jitter does not shake the crop (an average
  of similarity matrices is again a similarity), sampled by
  :func:`~talkstream.engine.avatar.warp_crop`;
* neutral landmarks and the reference crop: the frame whose mouth is most closed and whose head
  pose is closest to the median; ``speech_landmarks`` are every frame's landmarks mapped onto
  the reference's head pose (a similarity fitted to rigid points: nose and eye corners), so the
  motion model's target holds lip and jaw motion only, and the rest (head motion, blinks) is
  what the frame shows beyond speech, as in the synthetic corpus.

Cache layout::

    CACHE/manifest.json      {"format": "talkstream.videocache", "version": 1, "clips": [...]}
    CACHE/clips/<id>.wav     16 kHz mono PCM16
    CACHE/clips/<id>.npz     frames (T,S,S,3) uint8, landmarks / speech_landmarks (T,68,2),
                             neutral (68,2), reference (S,S,3), detected (T,), frame_to_crop
                             (T,2,3); crop pixels; no pickled objects

A rerun skips videos whose cached clip is up to date (same size, mtime and settings), so a long
preprocessing job resumes after a kill.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from talkstream.config import FPS, SAMPLE_RATE_HZ, AvatarConfig
from talkstream.engine.audio import StreamingResampler
from talkstream.engine.avatar import alignment_transform, apply_affine, warp_crop
from talkstream.engine.landmarks import LandmarkDetector, validate_landmarks
from talkstream.engine.motion import frames_for_samples
from talkstream.errors import InputError
from talkstream.training.frames import fit_similarity

log = logging.getLogger(__name__)

__all__ = [
    "VIDEO_CACHE_FORMAT",
    "VIDEO_EXTENSIONS",
    "VideoCacheResult",
    "VideoPrepConfig",
    "decode_audio_16k",
    "preprocess_video",
    "preprocess_videos",
    "sampled_frames",
]

VIDEO_CACHE_FORMAT = "talkstream.videocache"
VIDEO_CACHE_VERSION = 1
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
SAMPLES_PER_FRAME = SAMPLE_RATE_HZ // FPS
# Points that move only with the head (nose, eye corners): a similarity fitted to them
# separates head motion from lip and jaw motion.
RIGID_POINTS = np.array([27, 28, 29, 30, 31, 33, 35, 36, 39, 42, 45])


@dataclass(frozen=True)
class VideoPrepConfig:
    """Settings of :func:`preprocess_videos`."""

    avatar: AvatarConfig = field(default_factory=AvatarConfig)  # crop size and face scale
    smooth_frames: int = 5  # window of the crop-alignment moving average (odd)
    heldout_fraction: float = 0.1  # share of videos (by a hash of the name) held out
    min_detected: float = 0.8  # skip a video whose face is found in fewer of its frames
    detect_max_side: int = 640  # detect on a copy downscaled to this longest side
    max_seconds: float | None = None  # cut longer videos

    def key(self) -> str:
        """What decides the cached arrays (a changed key rebuilds a clip)."""
        d = asdict(self)
        d["avatar"] = {
            "crop_size": self.avatar.crop_size,
            "face_scale": self.avatar.face_scale,
        }
        return json.dumps(d, sort_keys=True, default=str)


@dataclass
class VideoCacheResult:
    """What :func:`preprocess_videos` did."""

    cache_dir: Path
    clips: int
    reused: int
    skipped: list[tuple[str, str]]  # (file name, reason)
    wall_s: float


# ----------------------------------------------------------------------------- decoding


def decode_audio_16k(path: str | Path) -> np.ndarray:
    """The first audio track of a media file as 16 kHz mono float32.

    Raises:
        InputError: no audio track or an unreadable file.
    """
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise InputError(f"cannot open {path}: {e}") from None
    with container:
        if not container.streams.audio:
            raise InputError(f"{path} has no audio track")
        stream = container.streams.audio[0]
        # Float planar at the source rate and layout; the downmix and the resampling are the
        # engine's, so the features match what inference computes from a live stream.
        conv = av.AudioResampler(format="fltp")
        resampler: StreamingResampler | None = None
        out: list[np.ndarray] = []
        for frame in container.decode(stream):
            for f in conv.resample(frame):
                pcm = f.to_ndarray()  # (channels, n) float32
                if resampler is None:
                    resampler = StreamingResampler(int(f.sample_rate), SAMPLE_RATE_HZ)
                out.append(resampler.push(pcm.mean(axis=0)))
        if resampler is None:
            raise InputError(f"{path}: the audio track holds no samples")
        out.append(resampler.flush())
    return np.concatenate(out).astype(np.float32)


def sampled_frames(path: str | Path, n_frames: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(i, rgb)`` for output frames ``i = 0 .. n_frames-1`` at 25 fps.

    Output frame ``i`` is the source frame on screen at ``(i + 0.5) / 25`` s. Stops early when
    the video ends (after the last source frame's duration).
    """
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise InputError(f"{path} has no video track")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        frame_s = 1.0 / float(rate) if rate else 1.0 / FPS
        i = 0
        prev: np.ndarray | None = None
        last_t = 0.0
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else last_t + frame_s
            rgb = frame.to_ndarray(format="rgb24")
            # Output frames whose instant comes before this frame show the previous one.
            while i < n_frames and (i + 0.5) / FPS < t:
                yield i, prev if prev is not None else rgb
                i += 1
            prev, last_t = rgb, t
            if i >= n_frames:
                return
        while prev is not None and i < n_frames and (i + 0.5) / FPS < last_t + frame_s:
            yield i, prev
            i += 1


# ----------------------------------------------------------------------------- geometry


def _interpolate_missing(points: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Fill frames without a detection by linear interpolation over time (edges: nearest)."""
    t = np.arange(len(points))
    good = np.flatnonzero(found)
    flat = points.reshape(len(points), -1).copy()
    for j in range(flat.shape[1]):
        flat[:, j] = np.interp(t, good, flat[good, j])
    return flat.reshape(points.shape)


def _smooth(transforms: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of (T, 2, 3) affines, edges clamped."""
    if window <= 1 or len(transforms) < 2:
        return transforms
    half = window // 2
    padded = np.concatenate(
        [np.repeat(transforms[:1], half, 0), transforms, np.repeat(transforms[-1:], half, 0)]
    )
    kernel = np.ones(2 * half + 1) / (2 * half + 1)
    flat = padded.reshape(len(padded), -1)
    out = np.stack([np.convolve(flat[:, j], kernel, mode="valid") for j in range(6)], axis=1)
    return out.reshape(-1, 2, 3)


def _inner_gap(lm: np.ndarray) -> np.ndarray:
    d = lm[..., [67, 66, 65], :] - lm[..., [61, 62, 63], :]
    return np.sqrt((d**2).sum(-1)).mean(-1)  # (...,)


def _detect(detector: LandmarkDetector, rgb: np.ndarray, max_side: int) -> np.ndarray | None:
    """Landmarks of the largest face, in ``rgb``'s pixels, or None."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    img = rgb
    if scale < 1.0:
        from PIL import Image

        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
    faces = detector.detect(img)
    if not faces:
        return None
    best = max(faces, key=lambda f: f.area)
    pts = validate_landmarks(best.landmarks, what="detected landmarks")
    # Pixel centres: x_full = (x_small + 0.5) / scale - 0.5.
    return ((pts + 0.5) / scale - 0.5).astype(np.float32) if scale < 1.0 else pts


# ----------------------------------------------------------------------------- one video


def preprocess_video(
    path: str | Path,
    cfg: VideoPrepConfig,
    detector: LandmarkDetector,
) -> dict[str, Any]:
    """Audio, crops and landmarks of one video (see the module docstring).

    Returns:
        A dict of arrays: ``audio`` (N,) float32 16 kHz, ``frames`` (T, S, S, 3) uint8,
        ``landmarks``, ``speech_landmarks`` (T, 68, 2) and ``neutral`` (68, 2) float32 crop
        pixels, ``reference`` (S, S, 3), ``detected`` (T,) bool, ``frame_to_crop`` (T, 2, 3).

    Raises:
        InputError: no audio or video, or the face is found in too few frames.
    """
    s = cfg.avatar.crop_size
    audio = decode_audio_16k(path)
    if cfg.max_seconds is not None:
        audio = audio[: int(cfg.max_seconds * SAMPLE_RATE_HZ)]
    n_target = frames_for_samples(len(audio))

    # Pass 1: landmarks of every output frame.
    points: list[np.ndarray | None] = []
    for _, rgb in sampled_frames(path, n_target):
        points.append(_detect(detector, rgb, cfg.detect_max_side))
    n = len(points)
    if n == 0:
        raise InputError(f"{path}: no video frames")
    found = np.array([p is not None for p in points])
    if found.mean() < cfg.min_detected:
        raise InputError(
            f"{path}: a face was found in only {found.mean():.0%} of the frames "
            f"(need {cfg.min_detected:.0%})"
        )
    raw = np.stack([p if p is not None else np.zeros((68, 2), np.float32) for p in points])
    lm_frame = _interpolate_missing(raw.astype(np.float64), found)  # (T, 68, 2) frame px

    # Crop alignment, smoothed over time.
    aff = np.stack([alignment_transform(p, s, cfg.avatar.face_scale) for p in lm_frame])
    aff = _smooth(aff, cfg.smooth_frames)  # (T, 2, 3)
    lm_crop = np.stack([apply_affine(a, p) for a, p in zip(aff, lm_frame, strict=True)])

    # Pass 2: the crops.
    frames = np.empty((n, s, s, 3), dtype=np.uint8)
    for i, rgb in sampled_frames(path, n):
        frames[i] = warp_crop(rgb, aff[i], s)

    # Reference: mouth closed, head pose near the median.
    med_rigid = np.median(lm_crop[:, RIGID_POINTS], axis=0)  # (11, 2)
    aligned = np.stack(
        [apply_affine(fit_similarity(p[RIGID_POINTS], med_rigid), p) for p in lm_crop]
    )
    gap = _inner_gap(aligned)
    pose = np.abs(lm_crop[:, RIGID_POINTS] - med_rigid).mean(axis=(1, 2))
    # Both in crop pixels: a pixel of head-pose difference costs as much as a pixel of mouth
    # opening (normalising each by its own spread would let detector noise win on a still head).
    score = gap + pose
    score[~found] = np.inf
    r = int(np.argmin(score))
    neutral = lm_crop[r]
    speech = np.stack(
        [apply_affine(fit_similarity(p[RIGID_POINTS], neutral[RIGID_POINTS]), p) for p in lm_crop]
    )
    audio = audio[: n * SAMPLES_PER_FRAME]
    if len(audio) < (n - 1) * SAMPLES_PER_FRAME + 1:  # video longer than its audio: pad
        audio = np.concatenate(
            [audio, np.zeros((n - 1) * SAMPLES_PER_FRAME + 1 - len(audio), np.float32)]
        )
    assert frames_for_samples(len(audio)) == n
    return {
        "audio": audio,
        "frames": frames,
        "landmarks": lm_crop.astype(np.float32),
        "speech_landmarks": speech.astype(np.float32),
        "neutral": neutral.astype(np.float32),
        "reference": frames[r].copy(),
        "detected": found,
        "frame_to_crop": aff.astype(np.float32),
    }


# ----------------------------------------------------------------------------- a folder


def _clip_id(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(rel))
    return f"{safe}_{hashlib.sha256(str(rel).encode()).hexdigest()[:8]}"


def _is_heldout(clip_id: str, fraction: float) -> bool:
    h = int(hashlib.sha256(clip_id.encode()).hexdigest()[:8], 16) / 2**32
    return h < fraction


def preprocess_videos(
    src: str | Path,
    cache_dir: str | Path,
    cfg: VideoPrepConfig | None = None,
    detector: LandmarkDetector | None = None,
    progress: bool = True,
) -> VideoCacheResult:
    """Preprocess every video under ``src`` (recursively) into ``cache_dir``.

    Videos that fail (no audio, face not found often enough) are skipped with a warning and
    listed in the result; the manifest is rewritten after every video, so a killed run keeps
    its work.

    Raises:
        InputError: ``src`` is not a folder or holds no video.
    """
    cfg = cfg or VideoPrepConfig()
    t0 = time.perf_counter()
    root = Path(src)
    if not root.is_dir():
        raise InputError(f"video folder {root} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
        raise InputError(f"{root} holds no video files ({', '.join(VIDEO_EXTENSIONS)})")
    cache = Path(cache_dir)
    (cache / "clips").mkdir(parents=True, exist_ok=True)
    manifest_path = cache / "manifest.json"
    old: dict[str, Any] = {}
    if manifest_path.is_file():
        try:
            old = {e["id"]: e for e in json.loads(manifest_path.read_text())["clips"]}
        except (OSError, ValueError, KeyError):
            old = {}
    if detector is None:
        from talkstream.engine.landmarks import DlibDetector

        detector = DlibDetector()
    key = cfg.key()
    entries: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    reused = 0
    from tqdm import tqdm

    bar = tqdm(files, desc="videos", unit="video", dynamic_ncols=True, disable=not progress)
    for path in bar:
        cid = _clip_id(path, root)
        st = path.stat()
        source = {"source": str(path.relative_to(root)), "size": st.st_size, "mtime": st.st_mtime}
        prev = old.get(cid)
        if (
            prev is not None
            and all(prev.get(k) == v for k, v in source.items())
            and prev.get("settings") == key
            and (cache / prev["data"]).is_file()
        ):
            entries.append(prev)
            reused += 1
            continue
        try:
            arrays = preprocess_video(path, cfg, detector)
        except InputError as e:
            log.warning("skipping %s: %s", path, e)
            skipped.append((path.name, str(e)))
            continue
        wav = cache / "clips" / f"{cid}.wav"
        npz = cache / "clips" / f"{cid}.npz"
        pcm = np.clip(np.rint(arrays.pop("audio") * 32767.0), -32768, 32767).astype(np.int16)
        tmp_wav = wav.with_name(wav.stem + ".tmp.wav")
        sf.write(tmp_wav, pcm, SAMPLE_RATE_HZ, subtype="PCM_16")
        tmp_npz = npz.with_name(npz.stem + ".tmp.npz")
        np.savez_compressed(tmp_npz, **arrays)
        os.replace(tmp_wav, wav)
        os.replace(tmp_npz, npz)
        n = int(arrays["frames"].shape[0])
        entries.append(
            {
                "id": cid,
                "split": "heldout" if _is_heldout(cid, cfg.heldout_fraction) else "train",
                "wav": f"clips/{wav.name}",
                "data": f"clips/{npz.name}",
                **source,
                "settings": key,
                "n_frames": n,
                "n_samples": len(pcm),
                "detected_fraction": round(float(arrays["detected"].mean()), 4),
            }
        )
        _write_manifest(manifest_path, cfg, entries)
    bar.close()
    # Every video held out (tiny folders): train on them all rather than on nothing.
    if entries and all(entry["split"] == "heldout" for entry in entries):
        for entry in entries:
            entry["split"] = "train"
    _write_manifest(manifest_path, cfg, entries)
    return VideoCacheResult(cache, len(entries), reused, skipped, time.perf_counter() - t0)


def _write_manifest(path: Path, cfg: VideoPrepConfig, entries: list[dict[str, Any]]) -> None:
    manifest = {
        "format": VIDEO_CACHE_FORMAT,
        "version": VIDEO_CACHE_VERSION,
        "fps": FPS,
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "crop_size": cfg.avatar.crop_size,
        "frame_time": "frame i shows the source at (i + 0.5) * 40 ms",
        "clips": entries,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
