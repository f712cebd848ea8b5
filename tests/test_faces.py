"""The face-photo dataset: detection, rejection with reasons, alignment, identity split, cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from talkstream.engine.avatar import default_image, default_landmarks
from talkstream.engine.quality import check_face
from talkstream.training.faces import (
    FaceSetConfig,
    build_face_set,
    identity_split,
    list_photos,
    load_face_set,
)

pytest.importorskip("dlib")

SHARED_FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces" / "bioguide"


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    face = default_image()  # 512x512, one frontal face
    _save(face, root / "alice.png")
    # The same person, mirrored and re-encoded: a second photo of one identity (sub-folder).
    _save(face[:, ::-1].copy(), root / "bob" / "1.jpg")
    _save(face, root / "bob" / "2.jpg")
    # Tiny (for the 90 px minimum the tests set): the face is about 60 px wide.
    small = np.asarray(Image.fromarray(face).resize((160, 160), Image.Resampling.LANCZOS))
    canvas = np.full((300, 300, 3), 128, np.uint8)
    canvas[70:230, 70:230] = small
    _save(canvas, root / "tiny.png")
    # No face at all.
    rng = np.random.default_rng(0)
    _save(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8), root / "noise.png")
    (root / "notes.txt").write_text("not a photo")
    return root


def test_list_photos_identity_from_file_or_folder(photo_dir: Path) -> None:
    items = dict(list_photos(photo_dir))
    assert items["alice.png"] == "alice"
    assert items["bob/1.jpg"] == "bob" and items["bob/2.jpg"] == "bob"
    assert "notes.txt" not in items


def test_build_detects_aligns_rejects_and_caches(photo_dir: Path, tmp_path: Path) -> None:
    cfg = FaceSetConfig(crop_size=64, heldout_fraction=0.0, min_face_px=90.0, workers=1)
    fs = build_face_set(photo_dir, tmp_path / "cache", cfg, progress=False)
    assert sorted(fs.files) == ["alice.png", "bob/1.jpg", "bob/2.jpg"]
    assert fs.crops.shape == (3, 64, 64, 3) and fs.crops.dtype == np.uint8
    assert fs.neutral.shape == (3, 68, 2)
    # Aligned: the eyes sit at the same place in every crop.
    eyes = fs.neutral[:, 36:48].mean(axis=1)
    assert np.ptp(eyes, axis=0).max() < 2.0
    m = fs.manifest
    assert m["photos"] == 5 and m["kept"] == 3
    reasons = {r["file"]: r["reason"] for r in m["rejected"]}
    assert reasons == {"tiny.png": "tiny", "noise.png": "no_face"}
    assert m["rejected_counts"] == {"tiny": 1, "no_face": 1}
    # Cached: the same settings and listing load without detecting again.
    stamp = (tmp_path / "cache" / "faceset.npz").stat().st_mtime_ns
    again = build_face_set(photo_dir, tmp_path / "cache", cfg, progress=False)
    assert (tmp_path / "cache" / "faceset.npz").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.crops, fs.crops)
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["kept"] == 3
    assert load_face_set(tmp_path / "cache").identities == fs.identities


def test_split_is_by_identity_and_stable() -> None:
    ids = [f"person{i}" for i in range(2000)]
    splits = [identity_split(i, 0.1, "salt") for i in ids]
    assert splits == [identity_split(i, 0.1, "salt") for i in ids]  # deterministic
    frac = splits.count("heldout") / len(ids)
    assert 0.07 < frac < 0.13
    assert [identity_split(i, 0.1, "other") for i in ids] != splits  # the salt matters


def test_photos_of_one_identity_land_on_one_side(photo_dir: Path, tmp_path: Path) -> None:
    for frac in (0.0, 1.0, 0.5):
        cfg = FaceSetConfig(crop_size=64, heldout_fraction=frac, min_face_px=90.0, workers=1)
        fs = build_face_set(photo_dir, tmp_path / f"c{frac}", cfg, progress=False)
        bob = {s for s, i in zip(fs.split, fs.identities, strict=True) if i == "bob"}
        assert len(bob) == 1
        if frac == 0.0:
            assert set(fs.split) == {"train"}
        if frac == 1.0:
            assert set(fs.split) == {"heldout"}
            assert len(fs.subset("train")) == 0


def test_check_face_reasons() -> None:
    pts = default_landmarks().astype(np.float64)
    assert check_face(pts).ok
    # Tiny: the same face scaled to 30 px.
    small = (pts - pts.mean(0)) * (30.0 / np.ptp(pts[:, 0])) + 100
    assert check_face(small).reason == "tiny"
    # Profile: the nose tip pushed to one jaw end.
    prof = pts.copy()
    prof[27:36, 0] += 0.45 * (pts[16, 0] - pts[0, 0])
    assert check_face(prof).reason == "profile"
    # Tilted 60 degrees.
    a = np.radians(60)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    c = pts.mean(0)
    assert check_face((pts - c) @ rot.T + c).reason == "tilted"
    # Mouth: lips squeezed to a point (what a covered mouth makes the predictor do).
    covered = pts.copy()
    covered[48:68] = covered[48:68].mean(0) + 0.1 * (covered[48:68] - covered[48:68].mean(0))
    assert check_face(covered).reason == "mouth"
    assert check_face(pts, score=-2.0).reason == "weak"
    with pytest.raises(ValueError):
        check_face(pts[:10])


@pytest.mark.skipif(not SHARED_FACES.is_dir(), reason="shared/data/faces/bioguide not present")
def test_real_portraits_mostly_usable(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    src.mkdir()
    for f in sorted(SHARED_FACES.iterdir())[-40:]:  # recent members: colour, frontal
        shutil.copy(f, src / f.name)
    fs = build_face_set(src, tmp_path / "cache", FaceSetConfig(workers=1), progress=False)
    m = fs.manifest
    assert m["kept"] >= 20, m["rejected_counts"]
    assert m["kept"] + len(m["rejected"]) == 40
