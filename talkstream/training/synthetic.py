"""The synthetic talking corpus: real synthetic speech, ground-truth visemes, rendered faces.

No talking-face dataset can be downloaded here, so the default model learns from clips made
offline from one photo:

* speech: espeak-ng (several languages, voices, rates and pitches) through its C API, which
  also reports when each phoneme starts (:mod:`talkstream.training.espeak`);
* motion: phonemes -> visemes -> coarticulated jaw and lip landmarks
  (:mod:`talkstream.training.visemes`), plus blinks and a slight head sway from
  :class:`talkstream.engine.idle.IdleMotion` (the same idle motion the engine adds live);
* frames: the avatar's aligned reference crop warped onto each frame's landmarks, with a drawn
  mouth interior (:class:`talkstream.training.frames.FrameRenderer`).

This module plans the corpus (sentences, held-out split, per-clip voice and motion settings),
synthesises each clip and writes the corpus; the files of one clip and their arrays are
described in :mod:`talkstream.training.clipformat`. Everything is deterministic per seed.
``build_corpus`` writes::

    OUT/manifest.json          clip list, splits, settings (format "talkstream.corpus" v1)
    OUT/reference.png          the aligned reference crop (S x S RGB)
    OUT/clips/NNNNN.wav        16 kHz mono 16-bit PCM
    OUT/clips/NNNNN.npz        compressed numpy arrays (no pickled objects; see clipformat)

The renderer and the clip format used to live here; their names are still importable from
this module (``FrameRenderer``, ``ClipSpec``, ``read_clip``, ``frame_times``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

import numpy as np
import soundfile as sf
from PIL import Image

from talkstream.config import FPS, SAMPLE_RATE_HZ, AvatarConfig, IdleConfig
from talkstream.engine.audio import StreamingResampler
from talkstream.engine.avatar import crop_px_to_norm, prepare_avatar
from talkstream.engine.idle import IdleMotion
from talkstream.engine.landmarks import NUM_LANDMARKS
from talkstream.engine.motion import frames_for_samples
from talkstream.errors import InputError
from talkstream.training.clipformat import FRAME_MS as FRAME_MS
from talkstream.training.clipformat import (
    Clip,
    ClipSpec,
    _write_clip,
    decode_frames,
    encode_frames,
    frame_times,
    read_clip,
)
from talkstream.training.espeak import PhonemeSegment, Utterance, synthesize
from talkstream.training.frames import _CONSTRAINED_EDGES as _CONSTRAINED_EDGES
from talkstream.training.frames import FrameRenderer
from talkstream.training.frames import MouthStyle as MouthStyle
from talkstream.training.frames import (
    constrained_triangulation as constrained_triangulation,
)
from talkstream.training.visemes import (
    PARAMS,
    VISEMES,
    MouthGeometry,
    params_to_landmarks,
    viseme_segments,
    viseme_trajectory,
)

# The frame renderer and the clip format moved to talkstream.training.frames and
# talkstream.training.clipformat. Their names stay importable from here (the ``X as X`` imports
# above re-export the ones not listed below), so older imports keep working.
__all__ = [
    "CORPUS_FORMAT",
    "CORPUS_VERSION",
    "ClipSpec",
    "CorpusConfig",
    "CorpusResult",
    "FrameRenderer",
    "Sentence",
    "add_corpus_parser",
    "build_corpus",
    "corpus_digest",
    "decode_frames",
    "encode_frames",
    "frame_times",
    "load_sentences",
    "read_clip",
    "synthesize_clip",
]

CORPUS_FORMAT: Final = "talkstream.corpus"
CORPUS_VERSION: Final = 1
# Bump when the speech, motion or rendering (talkstream.training.frames) of a clip changes for
# the same spec: clips written by an older generator are then rebuilt instead of reused.
GENERATOR_VERSION: Final = 1
_SENTENCES_ASSET: Final = "corpus_sentences.txt"

# espeak-ng voices per language (``espeak-ng --voices``) and the voice variants that change
# the timbre (espeak-ng-data/voices/!v). A corpus voice is "<language voice>+<variant>".
LANGUAGE_VOICES: Final[dict[str, tuple[str, ...]]] = {
    # "en" and "fr" are British English and French (France): their files are gmw/en and
    # roa/fr, and espeak_SetVoiceByName does not accept "en-gb" or "fr-fr" for them.
    "en": ("en-us", "en", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc"),
    "de": ("de",),
    "fr": ("fr", "fr-be"),
    "es": ("es", "es-419"),
    "it": ("it",),
}
MALE_VARIANTS: Final = ("m1", "m2", "m3", "m4", "m5", "m6", "m7")
FEMALE_VARIANTS: Final = ("f1", "f2", "f3", "f4", "f5")


# --------------------------------------------------------------------------------- sentences


@dataclass(frozen=True)
class Sentence:
    """One corpus sentence: its index in the asset, language code and text."""

    id: int
    language: str
    text: str


def load_sentences() -> list[Sentence]:
    """The bundled sentence list (``assets/corpus_sentences.txt``: ``lang<TAB>text`` lines)."""
    ref = resources.files("talkstream").joinpath("assets", _SENTENCES_ASSET)
    out: list[Sentence] = []
    for line in ref.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        lang, sep, text = line.partition("\t")
        if not sep or lang not in LANGUAGE_VOICES or not text.strip():
            raise ValueError(f"{_SENTENCES_ASSET}: malformed line {line!r}")
        out.append(Sentence(len(out), lang, text.strip()))
    return out


# --------------------------------------------------------------------------------- clips


def _resample_to_16k(utt: Utterance) -> np.ndarray:
    x = utt.pcm.astype(np.float32) / 32768.0
    rs = StreamingResampler(utt.sample_rate, SAMPLE_RATE_HZ)
    return np.concatenate([rs.push(x), rs.flush()]).astype(np.float32)


def synthesize_clip(
    spec: ClipSpec,
    geometry: MouthGeometry,
    renderer: FrameRenderer | None,
) -> Clip:
    """Speech, motion and (if ``renderer`` is given) frames of one clip.

    The audio is espeak's speech resampled to 16 kHz, scaled to ``spec.gain_db`` peak and
    padded with ``lead_s``/``tail_s`` of silence; frame ``i`` shows the mouth at
    ``(i + 0.5) * 40 ms`` and there is one frame per started 40 ms of audio.
    """
    # A fresh espeak process per clip: the audio is then a function of the spec alone, not of
    # which clips this process synthesised before (a resumed build matches a fresh one).
    utt = synthesize(spec.text, spec.voice, spec.rate_wpm, spec.pitch, fresh_process=True)
    speech = _resample_to_16k(utt)
    peak = float(np.abs(speech).max()) if speech.size else 0.0
    if peak > 0:
        speech = speech * (10.0 ** (spec.gain_db / 20.0) / peak)
    lead = round(spec.lead_s * SAMPLE_RATE_HZ)
    tail = round(spec.tail_s * SAMPLE_RATE_HZ)
    audio = np.concatenate(
        [np.zeros(lead, np.float32), speech.astype(np.float32), np.zeros(tail, np.float32)]
    )
    offset = lead / SAMPLE_RATE_HZ
    phonemes = [
        PhonemeSegment(p.name, p.start_s + offset, p.end_s + offset) for p in utt.phonemes()
    ]
    words = [(w, t + offset) for w, t in utt.words()]
    n_frames = frames_for_samples(len(audio))
    times = frame_times(n_frames)
    segs = viseme_segments(phonemes, spec.language)
    params = viseme_trajectory(segs, times, articulation=spec.articulation)  # (T, 5)
    speech_lm = params_to_landmarks(geometry, params)  # (T, 68, 2)
    speech_lm = speech_lm.reshape(n_frames, NUM_LANDMARKS, 2)

    # Idle motion works in normalised crop coordinates, like the engine's.
    size = renderer.size if renderer is not None else 128
    idle = IdleMotion(
        crop_px_to_norm(geometry.neutral.astype(np.float32), size),
        IdleConfig(sway_amplitude=spec.sway_amplitude, blink_interval_s=spec.blink_interval_s),
        spec.seed,
    )
    offsets = (
        np.stack([idle.offset(t) for t in range(n_frames)])
        if n_frames
        else np.zeros((0, NUM_LANDMARKS, 2), np.float32)
    )  # (T, 68, 2) normalised
    landmarks = (speech_lm + offsets * (size / 2.0)).astype(np.float32)
    blink = np.array([idle.blink_amount(t) for t in range(n_frames)], dtype=np.float32)

    frames = None
    if renderer is not None:
        frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
        for t in range(n_frames):
            frames[t] = renderer.render(landmarks[t])
    return Clip(spec, audio, phonemes, words, params, speech_lm, landmarks, blink, frames)


# --------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class CorpusConfig:
    """Knobs of :func:`build_corpus` (ranges are sampled uniformly per clip)."""

    heldout_fraction: float = 0.1  # of the audio duration
    heldout_sentence_fraction: float = 0.1  # per language, at least 2 sentences
    rate_wpm: tuple[int, int] = (125, 225)
    pitch: tuple[int, int] = (30, 70)
    articulation: tuple[float, float] = (0.85, 1.15)
    gain_db: tuple[float, float] = (-9.0, -1.0)
    lead_s: tuple[float, float] = (0.15, 0.6)
    tail_s: tuple[float, float] = (0.15, 0.6)
    sway_amplitude: tuple[float, float] = (0.003, 0.012)
    blink_interval_s: tuple[float, float] = (2.5, 5.0)
    render_frames: bool = True
    avatar: AvatarConfig = field(default_factory=AvatarConfig)


@dataclass
class CorpusResult:
    """What :func:`build_corpus` made."""

    out_dir: Path
    manifest: dict[str, Any]
    clips: int
    duration_s: float
    wall_s: float
    reused: int  # clips already on disk from an interrupted run


def _split_plan(
    sentences: Sequence[Sentence], cfg: CorpusConfig, seed: int
) -> tuple[dict[str, list[Sentence]], dict[str, list[str]]]:
    """Held-out sentences (per language) and voice variants, chosen by ``seed``."""
    rng = np.random.default_rng([seed, 1])
    by_split: dict[str, list[Sentence]] = {"train": [], "heldout": []}
    for lang in LANGUAGE_VOICES:
        group = [s for s in sentences if s.language == lang]
        if not group:
            continue
        n_held = max(2, round(cfg.heldout_sentence_fraction * len(group)))
        order = rng.permutation(len(group))
        held = {int(i) for i in order[:n_held]}
        for i, s in enumerate(group):
            by_split["heldout" if i in held else "train"].append(s)
    male = list(MALE_VARIANTS)
    female = list(FEMALE_VARIANTS)
    held_m = male[int(rng.integers(len(male)))]
    held_f = female[int(rng.integers(len(female)))]
    variants = {
        "train": [v for v in male + female if v not in (held_m, held_f)],
        "heldout": [held_m, held_f],
    }
    return by_split, variants


def _plan_clip(
    k: int,
    split: str,
    sentence: Sentence,
    variants: Sequence[str],
    cfg: CorpusConfig,
    seed: int,
) -> ClipSpec:
    rng = np.random.default_rng([seed, 2, k])
    base = LANGUAGE_VOICES[sentence.language]
    voice = f"{base[int(rng.integers(len(base)))]}+{variants[int(rng.integers(len(variants)))]}"

    def uni(r: tuple[float, float]) -> float:
        return float(rng.uniform(r[0], r[1]))

    return ClipSpec(
        clip_id=f"{k:05d}",
        split=split,
        sentence_id=sentence.id,
        language=sentence.language,
        text=sentence.text,
        voice=voice,
        rate_wpm=int(rng.integers(cfg.rate_wpm[0], cfg.rate_wpm[1] + 1)),
        pitch=int(rng.integers(cfg.pitch[0], cfg.pitch[1] + 1)),
        articulation=round(uni(cfg.articulation), 4),
        gain_db=round(uni(cfg.gain_db), 2),
        lead_s=round(uni(cfg.lead_s), 3),
        tail_s=round(uni(cfg.tail_s), 3),
        sway_amplitude=round(uni(cfg.sway_amplitude), 5),
        blink_interval_s=round(uni(cfg.blink_interval_s), 3),
        seed=int(rng.integers(2**31 - 1)),
    )


def _generator_tag(avatar_key: str) -> str:
    """What made a clip besides its spec, stored in its npz: ``"<GENERATOR_VERSION>:<key>"``."""
    return f"{GENERATOR_VERSION}:{avatar_key}"


def _existing_clip(
    npz_path: Path, wav_path: Path, spec: ClipSpec, avatar_key: str
) -> dict[str, Any] | None:
    """Facts about an already written clip with this exact spec, or None."""
    if not (npz_path.is_file() and wav_path.is_file()):
        return None
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            if str(z["spec"]) != spec.to_json():
                return None
            if "generator" not in z.files or str(z["generator"]) != _generator_tag(avatar_key):
                return None
            n_frames = int(z["params"].shape[0])
        n_samples = int(sf.info(str(wav_path)).frames)
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    if frames_for_samples(n_samples) != n_frames:
        return None
    return {"n_samples": n_samples, "n_frames": n_frames}


def build_corpus(
    image: np.ndarray,
    landmarks: np.ndarray | None,
    out_dir: str | Path,
    minutes: float,
    seed: int = 0,
    progress: bool = True,
    cfg: CorpusConfig | None = None,
) -> CorpusResult:
    """Build a synthetic talking corpus for one face.

    Clips are planned one after another from ``seed`` until their audio adds up to
    ``minutes`` (and both splits have at least one clip). The held-out split uses sentences and
    voice variants that no training clip uses (chosen per seed), and gets about
    ``cfg.heldout_fraction`` of the audio. A rerun into the same folder with the same
    arguments reuses the clips already written (an interrupted build resumes).

    Args:
        image: (H, W, 3) uint8 RGB photo with one face.
        landmarks: its (68, 2) pixel landmarks, or None to detect them (needs dlib).
        out_dir: output folder (created).
        minutes: audio duration to generate, > 0.
        seed: everything random derives from it.
        progress: show a tqdm progress bar (seconds of audio).
        cfg: ranges and options (default :class:`CorpusConfig`).

    Returns:
        A :class:`CorpusResult`; the manifest is also written to ``out_dir/manifest.json``.

    Raises:
        ValueError: ``minutes`` not positive.
        InputError: no face, or bad landmarks.
        EspeakError: libespeak-ng is missing.
    """
    if not (isinstance(minutes, int | float) and math.isfinite(minutes) and minutes > 0):
        raise ValueError(f"minutes must be a positive number, got {minutes!r}")
    cfg = cfg if cfg is not None else CorpusConfig()
    t_start = time.perf_counter()
    out = Path(out_dir)
    clip_dir = out / "clips"
    clip_dir.mkdir(parents=True, exist_ok=True)

    avatar = prepare_avatar(image, cfg.avatar, landmarks=landmarks)
    crop = avatar.crop
    geometry = MouthGeometry.from_neutral(avatar.neutral)
    renderer = FrameRenderer(crop, avatar.neutral) if cfg.render_frames else None
    Image.fromarray(crop).save(out / "reference.png")

    sentences = load_sentences()
    by_split, variants = _split_plan(sentences, cfg, seed)
    orders = {
        s: list(np.random.default_rng([seed, 3, i]).permutation(len(by_split[s])))
        for i, s in enumerate(("train", "heldout"))
    }
    cursor = {"train": 0, "heldout": 0}

    target_s = 60.0 * float(minutes)
    done = {"train": 0.0, "heldout": 0.0}
    entries: list[dict[str, Any]] = []
    reused = 0
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=math.ceil(target_s), unit="s", desc="corpus", dynamic_ncols=True)
    try:
        k = 0
        while sum(done.values()) < target_s or not (done["train"] and done["heldout"]):
            total = sum(done.values())
            if k == 1 or (not done["heldout"] and total >= target_s):
                split = "heldout"  # a held-out clip early, so even a tiny corpus has one
            elif not done["train"]:
                split = "train"
            else:
                split = "heldout" if done["heldout"] < cfg.heldout_fraction * total else "train"
            pool = by_split[split]
            order = orders[split]
            sentence = pool[order[cursor[split] % len(pool)]]
            cursor[split] += 1
            spec = _plan_clip(k, split, sentence, variants[split], cfg, seed)
            wav_path = clip_dir / f"{spec.clip_id}.wav"
            npz_path = clip_dir / f"{spec.clip_id}.npz"
            facts = _existing_clip(npz_path, wav_path, spec, avatar.key)
            if facts is None:
                clip = synthesize_clip(spec, geometry, renderer)
                _write_clip(clip, crop, wav_path, npz_path, _generator_tag(avatar.key))
                facts = {"n_samples": len(clip.audio), "n_frames": len(clip.params)}
            else:
                reused += 1
            duration = facts["n_samples"] / SAMPLE_RATE_HZ
            done[split] += duration
            entries.append(
                {
                    "id": spec.clip_id,
                    "split": split,
                    "wav": f"clips/{wav_path.name}",
                    "data": f"clips/{npz_path.name}",
                    **{k2: v for k2, v in dataclasses.asdict(spec).items() if k2 != "clip_id"},
                    "n_samples": facts["n_samples"],
                    "n_frames": facts["n_frames"],
                    "duration_s": round(duration, 4),
                }
            )
            if bar is not None:  # whole seconds of audio done
                bar.update(int(sum(done.values())) - bar.n)
            k += 1
    finally:
        if bar is not None:
            bar.close()

    def used(split: str, key: str) -> list[Any]:
        return sorted({e[key] for e in entries if e["split"] == split})

    manifest: dict[str, Any] = {
        "format": CORPUS_FORMAT,
        "version": CORPUS_VERSION,
        "seed": seed,
        "minutes_requested": float(minutes),
        "duration_s": round(sum(done.values()), 3),
        "fps": FPS,
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "frame_time": "frame i shows the mouth at (i + 0.5) * 40 ms; one frame per started 40 ms",
        "crop_size": int(crop.shape[0]),
        "reference": "reference.png",
        "avatar_key": avatar.key,
        "neutral": [[round(float(x), 4), round(float(y), 4)] for x, y in avatar.neutral],
        "params": list(PARAMS),
        "visemes": [v.name for v in VISEMES],
        "frames": "frames_delta" if cfg.render_frames else None,
        "splits": {
            s: {
                "clips": sum(1 for e in entries if e["split"] == s),
                "duration_s": round(done[s], 3),
                "sentence_ids": used(s, "sentence_id"),
                "voices": used(s, "voice"),
                "voice_variants": sorted(variants[s]),
                "available_sentence_ids": sorted(x.id for x in by_split[s]),
            }
            for s in ("train", "heldout")
        },
        "config": _jsonable(dataclasses.asdict(cfg)),
        "clips": entries,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "manifest.json")
    wall = time.perf_counter() - t_start
    return CorpusResult(out, manifest, len(entries), sum(done.values()), wall, reused)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def corpus_digest(out_dir: str | Path) -> str:
    """sha256 over the manifest's clip list and every clip file's bytes."""
    out = Path(out_dir)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    h = hashlib.sha256(json.dumps(manifest["clips"], sort_keys=True).encode())
    for e in manifest["clips"]:
        h.update((out / e["wav"]).read_bytes())
        h.update((out / e["data"]).read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------- CLI


def add_corpus_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``talkstream corpus`` on the CLI's subparsers; returns the new parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "corpus",
        help="build a synthetic talking corpus (espeak-ng speech + rendered face) for training",
        description="Synthesise speech with espeak-ng (several languages, voices, rates), "
        "derive jaw and lip motion from its phoneme timings, and render 25 fps face crops of "
        "the photo. Writes WAV + npz clips and a manifest with a held-out split (sentences "
        "and voices never used in training). Needs libespeak-ng (Debian: libespeak-ng1).",
    )
    p.add_argument(
        "--image", type=Path, default=None, help="face photo; default: the bundled astronaut"
    )
    p.add_argument(
        "--landmarks",
        type=Path,
        default=None,
        help="JSON with the photo's 68 iBUG landmarks, instead of detecting them",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--minutes", type=float, default=1.0, help="minutes of speech to generate (1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_corpus)
    return p


def _cmd_corpus(a: argparse.Namespace) -> int:
    from talkstream.engine.avatar import default_image, default_landmarks, load_image
    from talkstream.engine.landmarks import load_landmarks_json

    cfg = CorpusConfig()
    points: np.ndarray | None
    if a.image is None:
        if a.landmarks is not None:
            raise InputError("--landmarks needs --image (they must belong to the same photo)")
        image, points = default_image(), default_landmarks()
    else:
        image = load_image(a.image, cfg.avatar)
        points = load_landmarks_json(a.landmarks) if a.landmarks is not None else None
    res = build_corpus(image, points, a.out, a.minutes, a.seed, not a.no_progress, cfg)
    splits = res.manifest["splits"]
    print(
        f"wrote {res.clips} clips ({res.duration_s / 60:.2f} min of speech; "
        f"{splits['train']['clips']} train, {splits['heldout']['clips']} held-out) to "
        f"{res.out_dir} in {res.wall_s:.1f} s"
        + (f"; {res.reused} reused from an earlier run" if res.reused else "")
    )
    return 0
