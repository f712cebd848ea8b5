"""Landmark constants, the JSON format, and the dlib detector on the bundled astronaut."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from talkstream.engine import landmarks as lm
from talkstream.errors import InputError, MissingDependencyError


def _points(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((68, 2)) * 500).astype(np.float32)  # (68, 2)


def test_index_groups() -> None:
    assert list(lm.JAW) == list(range(17))
    assert list(lm.BROWS) == list(range(17, 27))
    assert list(lm.NOSE) == list(range(27, 36))
    assert list(lm.RIGHT_EYE) == list(range(36, 42))
    assert list(lm.LEFT_EYE) == list(range(42, 48))
    assert list(lm.LIPS) == list(range(48, 68))
    assert list(lm.OUTER_LIPS) + list(lm.INNER_LIPS) == list(lm.LIPS)
    assert len(lm.MOTION_POINTS) == 37
    assert list(lm.MOTION_POINTS) == sorted([*range(17), *range(48, 68)])


def test_face_detection_area() -> None:
    det = lm.FaceDetection(box=(10.0, 20.0, 30.0, 60.0), landmarks=_points(), score=1.0)
    assert det.area == 800.0
    assert lm.FaceDetection(box=(5.0, 5.0, 1.0, 9.0), landmarks=_points(), score=0.0).area == 0.0


def test_json_round_trip(tmp_path: Path) -> None:
    pts = _points()
    path = tmp_path / "face.landmarks.json"
    lm.save_landmarks_json(path, pts)
    doc = json.loads(path.read_text())
    assert doc["format"] == "talkstream.landmarks"
    assert doc["version"] == 1
    assert doc["scheme"] == "ibug68"
    assert len(doc["points"]) == 68
    back = lm.load_landmarks_json(path)
    assert back.dtype == np.float32 and back.shape == (68, 2)
    np.testing.assert_allclose(back, pts, atol=1e-3)  # the file keeps 3 decimals


def test_json_plain_list(tmp_path: Path) -> None:
    pts = np.arange(136, dtype=np.float32).reshape(68, 2)
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(pts.astype(int).tolist()))
    np.testing.assert_array_equal(lm.load_landmarks_json(path), pts)


def _valid_doc() -> dict[str, object]:
    return {
        "format": "talkstream.landmarks",
        "version": 1,
        "scheme": "ibug68",
        "points": [[1.0, 2.0]] * 68,
    }


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("not_json", "{this is not json", "not valid JSON"),
        ("empty", "", "not valid JSON"),
        ("wrong_count", json.dumps([[1, 2]] * 67), "expected 68 points, found 67"),
        ("too_many", json.dumps([[1, 2]] * 69), "found 69"),
        ("triples", json.dumps([[1, 2, 3]] * 68), "[x, y] number pairs"),
        ("strings", json.dumps([["1", "2"]] * 68), "[x, y] number pairs"),
        ("nan", json.dumps([[1, 2]] * 67 + [[float("nan"), 2]]), "finite"),
        ("infinity", "[" + ", ".join(["[1, 2]"] * 67 + ["[1e999, 2]"]) + "]", "finite"),
        ("scalar", "42", "expected a JSON object or a list"),
        ("wrong_format", json.dumps({**_valid_doc(), "format": "other"}), "unknown format"),
        ("wrong_version", json.dumps({**_valid_doc(), "version": 2}), "unsupported version"),
        ("wrong_scheme", json.dumps({**_valid_doc(), "scheme": "mp478"}), "unsupported scheme"),
        ("no_points", json.dumps({k: v for k, v in _valid_doc().items() if k != "points"}), "no"),
    ],
)
def test_json_bad_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / f"{name}.json"
    path.write_text(content)
    with pytest.raises(InputError) as info:
        lm.load_landmarks_json(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_json_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        lm.load_landmarks_json(tmp_path / "missing.json")
    with pytest.raises(InputError, match="directory"):
        lm.load_landmarks_json(tmp_path)


def test_json_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(InputError, match=r"binary\.json"):
        lm.load_landmarks_json(path)


def test_save_rejects_bad_points(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="shape"):
        lm.save_landmarks_json(tmp_path / "x.json", np.zeros((67, 2)))
    bad = _points()
    bad[3, 1] = np.inf
    with pytest.raises(InputError, match="point 3"):
        lm.save_landmarks_json(tmp_path / "x.json", bad)


# ----------------------------------------------------------------------------- dlib


@pytest.fixture(scope="module")
def detector() -> lm.DlibDetector:
    pytest.importorskip("dlib", reason="dlib (the 'detect' extra) is not installed")
    try:
        return lm.DlibDetector()
    except MissingDependencyError as e:
        pytest.skip(f"face_recognition_models is not installed: {e}")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()  # (512, 512, 3)


def test_dlib_is_a_landmark_detector(detector: lm.DlibDetector) -> None:
    assert isinstance(detector, lm.LandmarkDetector)
    assert detector.name


def test_dlib_astronaut(detector: lm.DlibDetector, astronaut: np.ndarray) -> None:
    faces = detector.detect(astronaut)
    assert len(faces) == 1
    face = faces[0]
    assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
    assert face.score > 0
    x0, y0, x1, y1 = face.box
    assert 60 < x1 - x0 < 150 and 0.8 < (x1 - x0) / (y1 - y0) < 1.25
    # dlib's box is tight on the inner face; the jaw line may extend a little beyond it.
    margin = 0.15 * (x1 - x0)
    pts = face.landmarks
    assert np.all(pts[:, 0] >= x0 - margin) and np.all(pts[:, 0] <= x1 + margin)
    assert np.all(pts[:, 1] >= y0 - margin) and np.all(pts[:, 1] <= y1 + margin)
    # Sanity of the iBUG layout: the subject's right eye is on the image's left, eyes above
    # the nose tip, nose tip above the mouth, mouth above the chin.
    right_eye = pts[list(lm.RIGHT_EYE)].mean(0)
    left_eye = pts[list(lm.LEFT_EYE)].mean(0)
    assert right_eye[0] < left_eye[0]
    assert max(right_eye[1], left_eye[1]) < pts[30, 1] < pts[list(lm.LIPS), 1].mean() < pts[8, 1]


def test_committed_asset_matches_detection(
    detector: lm.DlibDetector, astronaut: np.ndarray
) -> None:
    asset = Path(lm.__file__).resolve().parent.parent / "assets" / "astronaut.landmarks.json"
    committed = lm.load_landmarks_json(asset)
    fresh = detector.detect(astronaut)[0].landmarks
    assert np.abs(committed - fresh).max() <= 1.0


def test_dlib_rejects_bad_images(detector: lm.DlibDetector) -> None:
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        detector.detect(np.zeros((32, 32), dtype=np.uint8))


def test_dlib_no_face(detector: lm.DlibDetector) -> None:
    y, x = np.mgrid[0:120, 0:160]
    gradient = np.stack([x, y, (x + y) // 2], axis=2).astype(np.uint8)  # (120, 160, 3)
    assert detector.detect(gradient) == []
