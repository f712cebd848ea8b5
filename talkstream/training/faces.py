"""A face-photo dataset from any folder of photos: detect, fit 68 landmarks, reject, align, cache.

The renderer learns identity from the reference photo only if it sees thousands of people, so
the trainer takes a folder of portraits (``--faces DIR``: ours is ``shared/data/faces/bioguide``;
an FFHQ- or CelebA-style folder works the same). For every photo this module

* detects the face and fits the 68 iBUG landmarks (dlib, as the engine does);
* rejects photos that cannot be animated well, with the reason (no face, tiny, profile, tilted,
  mouth covered, weak detection: :func:`talkstream.engine.quality.check_face`, the same check
  that refuses such a photo at run time);
* aligns the face into the engine's crop (same transform as :func:`prepare_avatar`);
* assigns the photo's identity to ``train`` or ``heldout`` by a hash of the identity, so a
  person's photos are all on one side and held-out people are never trained on.

Identity: a photo directly in ``DIR`` is its own identity (its file stem; one person per file,
as in FFHQ and our portrait folder); photos in sub-folders take the sub-folder's name (one
folder per person, as in CelebA-style layouts).

The result is cached in ``OUT`` (``faceset.npz`` with the crops and landmarks, ``manifest.json``
with settings, counts and every rejection). The photos themselves are never copied anywhere but
into that cache, which lives in the run folder, not in the repository.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from talkstream.config import AvatarConfig
from talkstream.engine.avatar import alignment_transform, apply_affine, load_image, warp_crop
from talkstream.engine.quality import QualityConfig, check_face
from talkstream.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["FACESET_FORMAT", "FaceSet", "FaceSetConfig", "build_face_set", "identity_split"]

FACESET_FORMAT = "talkstream.faceset"
FACESET_VERSION = 1
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class FaceSetConfig:
    crop_size: int = 128
    face_scale: float = 0.32  # as AvatarConfig.face_scale: the engine's alignment
    heldout_fraction: float = 0.05
    min_face_px: float = 40.0  # smaller faces are rejected as "tiny" (jaw width, photo px)
    split_salt: str = "talkstream-faces-v1"
    max_photos: int | None = None  # first N photos (sorted), for quick runs and tests
    workers: int = 2


@dataclass
class FaceSet:
    """Aligned face crops of many identities. N faces, crops S x S."""

    crops: np.ndarray  # (N, S, S, 3) uint8
    neutral: np.ndarray  # (N, 68, 2) float32 crop pixels
    files: list[str]  # (N,) photo paths relative to the source folder
    identities: list[str]  # (N,)
    split: np.ndarray  # (N,) "train" | "heldout"
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def crop_size(self) -> int:
        return int(self.crops.shape[1])

    def subset(self, split: str) -> FaceSet:
        idx = np.flatnonzero(self.split == split)
        return FaceSet(
            crops=self.crops[idx],
            neutral=self.neutral[idx],
            files=[self.files[i] for i in idx],
            identities=[self.identities[i] for i in idx],
            split=self.split[idx],
            manifest=self.manifest,
        )


def identity_split(identity: str, fraction: float, salt: str) -> str:
    """``heldout`` for a stable ``fraction`` of identities (by hash), else ``train``."""
    h = hashlib.sha256(f"{salt}:{identity}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64
    return "heldout" if u < fraction else "train"


def list_photos(root: Path) -> list[tuple[str, str]]:
    """(relative path, identity) of every photo under ``root`` (one sub-folder level)."""
    out: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        if len(rel_dir.parts) > 1:
            continue
        for f in sorted(filenames):
            if f.lower().endswith(PHOTO_SUFFIXES) and not f.startswith("."):
                rel = str(rel_dir / f) if rel_dir.parts else f
                ident = rel_dir.parts[0] if rel_dir.parts else Path(f).stem
                out.append((rel, ident))
    return out


# Per-process detector (the pool's initializer builds it once per worker).
_DETECTOR: Any = None


def _init_worker() -> None:
    global _DETECTOR
    import torch

    torch.set_num_threads(1)
    from talkstream.engine.landmarks import DlibDetector

    _DETECTOR = DlibDetector()


def _process(args: tuple[str, str, int, float, float]) -> dict[str, Any]:
    path, rel, size, face_scale, min_face_px = args
    acfg = AvatarConfig(crop_size=size, face_scale=face_scale)
    try:
        image = load_image(path, acfg)
    except InputError as e:
        return {"file": rel, "reason": "unreadable", "detail": str(e)}
    faces = _DETECTOR.detect(image)
    if not faces:
        return {"file": rel, "reason": "no_face", "detail": "no face found"}
    best = max(faces, key=lambda f: f.area)
    verdict = check_face(best.landmarks, best.score, QualityConfig(min_face_px=min_face_px))
    if not verdict.ok:
        return {"file": rel, "reason": verdict.reason, "detail": verdict.message}
    m = alignment_transform(best.landmarks, size, face_scale)
    crop = warp_crop(image, m, size)
    neutral = apply_affine(m, best.landmarks).astype(np.float32)
    return {"file": rel, "reason": "", "crop": crop, "neutral": neutral, "face_px": verdict.face_px}


def _settings(cfg: FaceSetConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("workers")
    return d


def _load_cached(out: Path, settings: dict[str, Any], listing: str) -> FaceSet | None:
    mpath, apath = out / "manifest.json", out / "faceset.npz"
    if not (mpath.is_file() and apath.is_file()):
        return None
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        manifest.get("format") != FACESET_FORMAT
        or manifest.get("settings") != settings
        or manifest.get("listing") != listing
    ):
        return None
    return load_face_set(out)


def load_face_set(out: str | Path) -> FaceSet:
    """A face set cached by :func:`build_face_set`."""
    out = Path(out)
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{out} holds no face set (manifest.json unreadable: {e})") from None
    if manifest.get("format") != FACESET_FORMAT:
        raise InputError(f"{out} is not a face set (format {manifest.get('format')!r})")
    with np.load(out / "faceset.npz", allow_pickle=False) as z:
        return FaceSet(
            crops=np.asarray(z["crops"]),
            neutral=np.asarray(z["neutral"]),
            files=[str(x) for x in z["files"]],
            identities=[str(x) for x in z["identities"]],
            split=np.asarray(z["split"]).astype(str),
            manifest=manifest,
        )


def build_face_set(
    photos: str | Path, out: str | Path, cfg: FaceSetConfig | None = None, progress: bool = True
) -> FaceSet:
    """Detect, check, align and split every photo of ``photos``; cache in ``out``.

    A cache made with the same settings from the same file listing is reused. Says how many
    photos were rejected and why (log, and ``manifest["rejected"]``).

    Raises:
        InputError: the folder does not exist or holds no usable photo.
    """
    cfg = cfg or FaceSetConfig()
    root, out = Path(photos), Path(out)
    if not root.is_dir():
        raise InputError(f"face photo folder {root} does not exist")
    items = list_photos(root)
    if cfg.max_photos is not None:
        items = items[: cfg.max_photos]
    if not items:
        raise InputError(f"{root} holds no photos ({', '.join(PHOTO_SUFFIXES)})")
    listing = hashlib.sha256("\n".join(r for r, _ in items).encode()).hexdigest()
    settings = _settings(cfg)
    cached = _load_cached(out, settings, listing)
    if cached is not None:
        log.info("face set: %d faces from cache %s", len(cached), out)
        return cached

    from tqdm import tqdm

    jobs = [
        (str(root / rel), rel, cfg.crop_size, cfg.face_scale, cfg.min_face_px) for rel, _ in items
    ]
    ident_of = dict(items)
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), desc="face photos", unit="photo", disable=not progress)
    workers = max(1, cfg.workers)
    if workers == 1:
        _init_worker()
        for j in jobs:
            results.append(_process(j))
            bar.update(1)
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
            for r in pool.map(_process, jobs, chunksize=16):
                results.append(r)
                bar.update(1)
    bar.close()

    kept = [r for r in results if not r["reason"]]
    rejected = [{k: r[k] for k in ("file", "reason", "detail")} for r in results if r["reason"]]
    counts = Counter(r["reason"] for r in rejected)
    if not kept:
        raise InputError(
            f"none of the {len(results)} photos in {root} is usable: "
            + ", ".join(f"{n} {k}" for k, n in counts.most_common())
        )
    idents = [ident_of[r["file"]] for r in kept]
    split = np.array(
        [identity_split(i, cfg.heldout_fraction, cfg.split_salt) for i in idents], dtype="<U8"
    )
    fs = FaceSet(
        crops=np.stack([r["crop"] for r in kept]),
        neutral=np.stack([r["neutral"] for r in kept]).astype(np.float32),
        files=[r["file"] for r in kept],
        identities=idents,
        split=split,
        manifest={},
    )
    manifest = {
        "format": FACESET_FORMAT,
        "format_version": FACESET_VERSION,
        "source": str(root.resolve()),
        "settings": settings,
        "listing": listing,
        "photos": len(results),
        "kept": len(kept),
        "train": int((split == "train").sum()),
        "heldout": int((split == "heldout").sum()),
        "train_identities": len({i for i, s in zip(idents, split, strict=True) if s == "train"}),
        "heldout_identities": len(
            {i for i, s in zip(idents, split, strict=True) if s == "heldout"}
        ),
        "rejected_counts": dict(counts),
        "rejected": rejected,
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "faceset.tmp.npz"
    np.savez(
        tmp,
        crops=fs.crops,
        neutral=fs.neutral,
        files=np.array(fs.files),
        identities=np.array(fs.identities),
        split=split,
    )
    tmp.replace(out / "faceset.npz")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    fs.manifest = manifest
    log.info(
        "face set: kept %d of %d photos (%d train, %d held out); rejected %d: %s",
        len(kept),
        len(results),
        manifest["train"],
        manifest["heldout"],
        len(rejected),
        ", ".join(f"{n} {k}" for k, n in counts.most_common()) or "none",
    )
    return fs


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m talkstream.training.faces",
        description="Build (or load) the face-photo dataset of a folder of portraits.",
    )
    ap.add_argument("photos", help="folder of photos (one person per file or per sub-folder)")
    ap.add_argument("--out", required=True, help="cache folder (outside the repository)")
    ap.add_argument("--crop-size", type=int, default=128)
    ap.add_argument("--heldout", type=float, default=0.05, help="held-out identity fraction")
    ap.add_argument("--max-photos", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        fs = build_face_set(
            a.photos,
            a.out,
            FaceSetConfig(
                crop_size=a.crop_size,
                heldout_fraction=a.heldout,
                max_photos=a.max_photos,
                workers=a.workers,
            ),
        )
    except InputError as e:
        print(f"error: {e}")
        return 2
    m = fs.manifest
    print(
        f"{m['kept']} of {m['photos']} photos usable ({m['train']} train, {m['heldout']} held "
        f"out); rejected: {m['rejected_counts'] or 'none'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
