"""``talkstream eval --faces``: the identity measure on real faces, the group and stylising
helpers, and a tiny end-to-end run on a few held-out portrait photos."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from talkstream.cli import main
from talkstream.engine.avatar import default_image, default_landmarks
from talkstream.training.face_eval import (
    colourfulness,
    contact_sheet,
    darker_skin,
    drawing,
    first_name,
    is_colour,
    is_female_name,
    lower_face_mask,
    outside_mouth_region,
    painting,
)
from tests.test_train_support import one_thread  # noqa: F401 (a fixture)

BIOGUIDE = Path("/work/shared/data/faces/bioguide")
BIOGUIDE_CSV = BIOGUIDE.parent / "bioguide.csv"
needs_bioguide = pytest.mark.skipif(
    not BIOGUIDE.is_dir(), reason=f"the portrait folder {BIOGUIDE} is not on this machine"
)


@pytest.fixture(scope="module")
def identity() -> Any:
    pytest.importorskip("dlib", reason="dlib (the 'detect' extra) is not installed")
    from talkstream.errors import MissingDependencyError
    from talkstream.training.identity import FaceIdentity

    try:
        return FaceIdentity()
    except MissingDependencyError as e:
        pytest.skip(str(e))


def _reencoded(img: np.ndarray, shift: tuple[int, int], quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.roll(img, shift, axis=(0, 1))).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _heldout_usable(n: int) -> list[Path]:
    """The first ``n`` held-out bioguide photos (identity-hash split) the engine accepts."""
    from talkstream.engine.landmarks import DlibDetector
    from talkstream.engine.quality import check_face
    from talkstream.training.faces import FaceSetConfig, identity_split

    cfg = FaceSetConfig()
    det = DlibDetector()
    out: list[Path] = []
    for p in sorted(BIOGUIDE.glob("*.jpg")):
        if identity_split(p.stem, cfg.heldout_fraction, cfg.split_salt) != "heldout":
            continue
        img = np.asarray(Image.open(p).convert("RGB"))
        faces = det.detect(img)
        if faces and check_face(faces[0].landmarks, faces[0].score).ok:
            out.append(p)
            if len(out) == n:
                break
    return out


# ----------------------------------------------------------------------------- identity


def test_identity_same_face_scores_about_zero(identity: Any) -> None:
    a = default_image()
    assert identity.distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Re-encoded as JPEG and shifted by a few pixels: still the same face.
    for shift, q in (((6, -4), 70), ((-3, 5), 90)):
        d = identity.distance(a, _reencoded(a, shift, q))
        assert d is not None and d < 0.2, (shift, q, d)


@needs_bioguide
def test_identity_different_person_scores_above_threshold(identity: Any) -> None:
    photos = _heldout_usable(2)
    assert len(photos) == 2
    astronaut = default_image()
    ims = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
    for im in ims:
        d = identity.distance(astronaut, im)
        assert d is not None and d > 0.5, d
    d = identity.distance(ims[0], ims[1])
    assert d is not None and d > 0.5, d


def test_compare_leaves_faceless_frames_out_of_the_distance(identity: Any) -> None:
    a = default_image()
    grey = np.full_like(a, 128)
    res = identity.compare(a, [a, grey, _reencoded(a, (2, 2), 80)])
    assert res.found.tolist() == [True, False, True]
    assert res.detection_rate == pytest.approx(2 / 3)
    assert len(res.distances) == 2 and res.distance is not None and res.distance < 0.2
    assert res.same_person_rate == 1.0
    none = identity.compare(a, [grey, grey])
    assert none.distance is None and none.detection_rate == 0.0


# ----------------------------------------------------------------------------- groups


def test_names_and_colour() -> None:
    assert first_name("PELOSI, Nancy") == "nancy"
    assert first_name("SMITH, J. William") == "william"
    assert first_name("BROWN-WAITE, Virginia (Ginny)") == "virginia"
    assert first_name("Ada Lovelace") == "ada"
    assert is_female_name("BUSTOS, Cheri") and is_female_name("CANTWELL, Maria E.")
    assert not is_female_name("GUINTA, Frank") and not is_female_name("")
    a = default_image()
    grey = np.repeat(np.asarray(Image.fromarray(a).convert("L"))[:, :, None], 3, axis=2)
    sepia = np.clip(grey * np.array([1.0, 0.85, 0.65]) + [20, 10, 0], 0, 255).astype(np.uint8)
    assert is_colour(a) and colourfulness(a) > 0.05
    assert not is_colour(grey) and colourfulness(grey) < 0.005
    assert not is_colour(sepia)  # a tint of the luminance is not colour


@needs_bioguide
def test_colour_split_on_real_photos() -> None:
    rows = {r["file"]: r for r in csv.DictReader(BIOGUIDE_CSV.open())}
    # A recent official portrait is in colour; an 18th-century one is an engraving.
    recent = [f for f, r in rows.items() if int(r["last_congress"] or 0) >= 118][:3]
    old = [f for f, r in rows.items() if int(r["last_congress"] or 999) <= 5][:3]
    assert len(recent) == len(old) == 3, (recent, old)  # empty lists would pass vacuously
    for f in recent:
        assert is_colour(np.asarray(Image.open(BIOGUIDE / f).convert("RGB"))), f
    for f in old:
        assert not is_colour(np.asarray(Image.open(BIOGUIDE / f).convert("RGB"))), f


def test_stylised_images_have_the_photos_shape() -> None:
    a, lm = default_image(), default_landmarks()
    from skimage.draw import polygon2mask

    face = polygon2mask(a.shape[:2], np.concatenate([lm[0:17], lm[26:16:-1]])[:, ::-1])
    for fn in (darker_skin, painting, drawing):
        out = fn(a, lm)
        assert out.shape == a.shape and out.dtype == np.uint8, fn.__name__
        assert np.abs(out.astype(int) - a).mean() > 2, fn.__name__
    dark = darker_skin(a, lm)
    assert dark[face].mean() < 0.75 * a[face].mean()  # the face is darker
    far = np.zeros(a.shape[:2], bool)
    far[:, :40] = True  # the flag at the image's left edge, far from the face: untouched
    assert np.abs(dark[far].astype(int) - a[far]).mean() < 2
    d = drawing(a, lm)
    assert (d[..., 0] == d[..., 1]).all() and (d[..., 1] == d[..., 2]).all()


def test_regions_and_contact_sheet() -> None:
    from talkstream.config import AvatarConfig
    from talkstream.engine.avatar import prepare_avatar

    av = prepare_avatar(default_image(), AvatarConfig(), landmarks=default_landmarks())
    s = av.crop_size
    lower = lower_face_mask(av.neutral, s)
    region = outside_mouth_region(av.neutral, s)
    assert lower.shape == region.shape == (s, s)
    mouth = np.round(av.neutral[[62, 66]].mean(axis=0)).astype(int)
    eye = np.round(av.neutral[36:42].mean(axis=0)).astype(int)
    assert lower[mouth[1], mouth[0]] and not region[mouth[1], mouth[0]]
    assert region[eye[1], eye[0]] and not (lower & region).any()
    frames = [np.zeros((60, 80, 3), np.uint8)] * 3
    crops = [av.crop] * 3
    sheet = contact_sheet(default_image(), av.crop, frames, crops, "title", cell=50)
    assert sheet.size == (4 * 50, 2 * 50 + 18)


# ----------------------------------------------------------------------------- CLI


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--faces", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such folder" in err and "\n" not in err
    assert main(["eval", "--faces", str(tmp_path), "--split", "bogus"]) == 2
    assert "--split" in capsys.readouterr().err
    # --corpus still goes to the corpus eval (which wants a corpus manifest).
    assert main(["eval", "--corpus", str(tmp_path), "--no-lip-sync"]) == 2
    assert "manifest" in capsys.readouterr().err
    for argv in (["eval"], ["eval", "--faces", str(tmp_path), "--corpus", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


@needs_bioguide
@pytest.mark.usefixtures("one_thread")
def test_eval_faces_end_to_end(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    identity: Any,
) -> None:
    from talkstream.training.espeak import espeak_available

    if not espeak_available():
        pytest.skip("libespeak-ng not installed")
    photos = _heldout_usable(3)
    faces = tmp_path / "faces"
    faces.mkdir()
    for p in photos:
        shutil.copy(p, faces / p.name)
    # The metadata CSV beside the folder, as bioguide.csv is beside bioguide/.
    if BIOGUIDE_CSV.is_file():
        with BIOGUIDE_CSV.open() as f:
            rows = [r for r in csv.DictReader(f) if r["file"] in {p.name for p in photos}]
        with (tmp_path / "faces.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    out, sheets = tmp_path / "report.json", tmp_path / "sheets"
    rc = main(
        [
            "eval", "--faces", str(faces), "--max-faces", "2", "--seconds", "2",
            "--sentences", "1", "--identity-frames", "4",
            "--out", str(out), "--out-dir", str(sheets), "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    assert "heldout" in table and "astronaut" in table and "PSNR" in table
    rep = json.loads(out.read_text())
    g = rep["groups"]
    assert g["heldout"]["n"] == 2 and g["astronaut"]["n"] == 1
    assert g["colour"]["n"] + g["bw"]["n"] == 2
    for name in ("darker", "painting", "drawing"):
        assert g[name]["n"] <= 1
    assert g["painting"]["n"] == 1 and g["drawing"]["n"] == 1
    ok = [f for f in rep["faces"] if "error" not in f]
    assert len(ok) == len(rep["faces"]) >= 5
    # The shipped model on faces it never saw, photos, a painting and a drawing alike: the
    # face is found, kept (same person, dlib's 0.6), left alone outside the mouth, and its lips
    # follow the speech. Measured: detection 100 %, id distance 0.16-0.26, 30-41 dB, r 0.88-0.92
    # (a broken motion head scores 0.05-0.6 on these faces: tests/test_lipsync.py).
    assert rep["info"]["random_init"] is False
    for f in ok:
        assert f["frames"] == 50
        assert Path(f["sheet"]).is_file()
        assert f["detection_rate"] >= 0.9, f
        assert f["psnr_outside_mouth_db"] > 25.0, f
        assert f["identity"] is not None and 0.0 <= f["identity"] < 0.6, f
        assert f["lipsync_r"] is not None and f["lipsync_r"] >= 0.6, f
    sheet = Image.open(next(f["sheet"] for f in ok if f["id"] == "astronaut"))
    assert sheet.width == 9 * 160
    assert sorted(p.name for p in (sheets / "inputs").iterdir()) == sorted(
        f"{f['id']}.png" for f in ok if f["groups"][0] in ("darker", "painting", "drawing")
    )
    assert "heuristic" in rep["info"]["notes"]["women"]
