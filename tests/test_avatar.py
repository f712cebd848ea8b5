"""Avatar preparation on the real astronaut photo: loading, alignment, mask, several/no faces,
the on-disk cache."""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from talkstream.config import AvatarConfig
from talkstream.engine import avatar as av
from talkstream.engine.landmarks import DlibDetector, FaceDetection, save_landmarks_json
from talkstream.errors import InputError, MissingDependencyError

CFG = AvatarConfig()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return av.default_image()  # (512, 512, 3)


@pytest.fixture(scope="module")
def detector() -> DlibDetector:
    pytest.importorskip("dlib", reason="dlib (the 'detect' extra) is not installed")
    try:
        return DlibDetector()
    except MissingDependencyError as e:
        pytest.skip(f"face_recognition_models is not installed: {e}")


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _check_aligned(a: av.Avatar, cfg: AvatarConfig) -> None:
    s = cfg.crop_size
    assert a.crop.shape == (s, s, 3) and a.crop.dtype == np.uint8
    assert a.crop_size == s
    assert a.neutral.shape == (68, 2) and a.neutral.dtype == np.float32
    assert a.frame_to_crop.shape == (2, 3) and a.frame_to_crop.dtype == np.float64
    assert a.mask.shape == (s, s) and a.mask.dtype == np.float32
    # The whole face, chin included, is inside the crop with a margin.
    margin = 0.05 * s
    assert a.neutral.min() >= margin and a.neutral.max() <= s - 1 - margin
    # Eyes level, eye midpoint and mouth at the canonical positions.
    right_eye, left_eye, mouth = av.face_anchors(a.neutral)
    assert abs(right_eye[1] - left_eye[1]) < 0.02 * s
    canon = av.canonical_eye_mouth(s, cfg.face_scale)
    np.testing.assert_allclose(0.5 * (right_eye + left_eye), canon[0], atol=0.02 * s)
    np.testing.assert_allclose(mouth, canon[1], atol=0.02 * s)
    assert np.linalg.norm(mouth - 0.5 * (right_eye + left_eye)) == pytest.approx(
        cfg.face_scale * s, rel=1e-4
    )
    # Mask: 0 on the whole border, 1 around the mouth and on the eyes, in [0, 1].
    assert a.mask.min() >= 0.0 and a.mask.max() <= 1.0
    for edge in (a.mask[0], a.mask[-1], a.mask[:, 0], a.mask[:, -1]):
        assert np.all(edge == 0.0)
    mx, my = np.rint(mouth).astype(int)
    r = int(0.08 * s)
    assert np.all(a.mask[my - r : my + r, mx - r : mx + r] == 1.0)
    for eye in (right_eye, left_eye):
        assert a.mask[round(eye[1]), round(eye[0])] == 1.0
    # Normalised coordinates follow align_corners=False.
    norm = a.neutral_normalized()
    assert norm.dtype == np.float32 and np.all(np.abs(norm) < 1)
    np.testing.assert_allclose(av.norm_to_crop_px(norm, s), a.neutral, atol=1e-4)


def test_coordinate_conventions() -> None:
    s = 128
    px = np.array([[-0.5, -0.5], [s - 0.5, s - 0.5], [(s - 1) / 2, 0.0]], dtype=np.float32)
    norm = av.crop_px_to_norm(px, s)
    expected = np.array([[-1.0, -1.0], [1.0, 1.0], [0.0, -1.0 + 1.0 / s]])
    np.testing.assert_allclose(norm, expected, atol=1e-6)


def test_default_landmarks_asset(astronaut: np.ndarray) -> None:
    pts = av.default_landmarks()
    assert pts.shape == (68, 2) and pts.dtype == np.float32
    assert astronaut.shape == (512, 512, 3) and astronaut.dtype == np.uint8
    assert np.all((pts > 50) & (pts < 400))  # the astronaut's face is near the centre


def test_prepare_from_json_landmarks(astronaut: np.ndarray, tmp_path: Path) -> None:
    a = av.prepare_avatar(astronaut, CFG, landmarks=av.default_landmarks())
    _check_aligned(a, CFG)
    assert a.image.shape == (480, 640, 3)  # the default framing, "call"
    assert len(a.key) == 64
    # "full" keeps the photo itself as the frame.
    full = av.prepare_avatar(astronaut, replace(CFG, framing="full"), landmarks=a.photo_landmarks)
    assert full.image is astronaut
    # The same through the path API and a landmarks file.
    img_path = tmp_path / "astronaut.png"
    img_path.write_bytes(_png_bytes(astronaut))
    lm_path = tmp_path / "astronaut.json"
    save_landmarks_json(lm_path, av.default_landmarks())
    b = av.prepare_avatar_from_path(img_path, CFG, landmarks_path=lm_path)
    np.testing.assert_array_equal(b.crop, a.crop)
    assert b.key == a.key


@pytest.mark.parametrize("crop_size", [128, 256])
def test_prepare_with_detector(
    astronaut: np.ndarray, detector: DlibDetector, crop_size: int
) -> None:
    cfg = replace(CFG, crop_size=crop_size)
    a = av.prepare_avatar(astronaut, cfg, detector=detector)
    _check_aligned(a, cfg)
    from_json = av.prepare_avatar(astronaut, cfg, landmarks=av.default_landmarks())
    np.testing.assert_allclose(a.neutral, from_json.neutral, atol=1.0)


def test_alignment_undoes_rotation(astronaut: np.ndarray) -> None:
    """A rotated photo gives (nearly) the same crop geometry: alignment removes roll."""
    pts = av.default_landmarks().astype(np.float64)
    angle = np.deg2rad(20.0)
    c, s_ = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s_], [s_, c]])
    centre = np.array([255.5, 255.5])
    rotated_pts = (pts - centre) @ rot.T + centre
    a = av.prepare_avatar(astronaut, CFG, landmarks=pts)
    # Same pixels, rotated landmarks: only the geometry is compared.
    b = av.prepare_avatar(astronaut, CFG, landmarks=rotated_pts)
    np.testing.assert_allclose(b.neutral, a.neutral, atol=1e-3)


def test_two_faces_takes_largest(
    astronaut: np.ndarray, detector: DlibDetector, caplog: pytest.LogCaptureFixture
) -> None:
    head = Image.fromarray(astronaut[30:250, 110:330])  # (220, 220) head and shoulders
    big = np.asarray(head.resize((330, 330), Image.Resampling.BILINEAR))
    small = np.asarray(head.resize((198, 198), Image.Resampling.BILINEAR))  # 0.6x
    canvas = np.full((340, 560, 3), 120, dtype=np.uint8)
    canvas[5:335, 5:335] = big
    canvas[70:268, 350:548] = small
    with caplog.at_level(logging.WARNING, logger="talkstream.engine.avatar"):
        a = av.prepare_avatar(canvas, CFG, detector=detector, source_name="two.png")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("2 faces" in m and "two.png" in m and "largest" in m for m in messages), messages
    # The chosen face is the big one, on the left of the photo.
    assert a.photo_landmarks is not None and a.photo_to_frame is not None
    assert a.photo_landmarks[:, 0].max() < 340
    # ... and the frame geometry agrees: crop -> frame -> photo lands on it.
    inv = np.linalg.inv(np.vstack([a.frame_to_crop, [0, 0, 1]]))[:2]
    frame_pts = av.apply_affine(inv, a.neutral)
    np.testing.assert_allclose(
        frame_pts, av.apply_affine(a.photo_to_frame, a.photo_landmarks), atol=1e-3
    )
    _check_aligned(a, CFG)


class _FixedDetector:
    """A stand-in detector returning fixed faces (no dlib needed)."""

    name = "fixed-test-detector"

    def __init__(self, faces: list[FaceDetection]) -> None:
        self.faces = faces
        self.calls = 0

    def detect(self, image_rgb: np.ndarray) -> list[FaceDetection]:
        self.calls += 1
        return self.faces


def test_custom_detector_picks_largest(
    astronaut: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    pts = av.default_landmarks()
    tiny = FaceDetection(box=(0.0, 0.0, 10.0, 10.0), landmarks=pts * 0.1, score=3.0)
    real = FaceDetection(box=(179.0, 83.0, 267.0, 171.0), landmarks=pts, score=1.0)
    det = _FixedDetector([tiny, real])
    with caplog.at_level(logging.WARNING, logger="talkstream.engine.avatar"):
        a = av.prepare_avatar(astronaut, CFG, detector=det)
    assert "2 faces" in caplog.text
    b = av.prepare_avatar(astronaut, CFG, landmarks=pts)
    np.testing.assert_allclose(a.neutral, b.neutral, atol=1e-4)


def test_no_face(detector: DlibDetector) -> None:
    import skimage.data

    with pytest.raises(InputError, match=r"no face found in coffee\.png"):
        av.prepare_avatar(skimage.data.coffee(), CFG, detector=detector, source_name="coffee.png")
    y, x = np.mgrid[0:96, 0:128]
    gradient = np.stack([x * 2, y * 2, x + y], axis=2).astype(np.uint8)
    with pytest.raises(InputError, match="no face"):
        av.prepare_avatar(gradient, CFG, detector=detector)


def test_bad_landmarks(astronaut: np.ndarray) -> None:
    pts = av.default_landmarks()
    with pytest.raises(InputError, match="shape"):
        av.prepare_avatar(astronaut, CFG, landmarks=pts[:60])
    with pytest.raises(InputError, match="outside"):
        av.prepare_avatar(astronaut, CFG, landmarks=pts + 400)
    with pytest.raises(InputError, match="degenerate"):
        av.prepare_avatar(astronaut, CFG, landmarks=np.full((68, 2), 100.0))
    with pytest.raises(ValueError, match="uint8"):
        av.prepare_avatar(astronaut.astype(np.float32), CFG, landmarks=pts)


# ----------------------------------------------------------------------------- load_image


def test_load_image_ok(tmp_path: Path, astronaut: np.ndarray) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_png_bytes(astronaut))
    img = av.load_image(path, CFG)
    assert img.dtype == np.uint8 and img.flags.c_contiguous
    np.testing.assert_array_equal(img, astronaut)


def test_load_image_exif_orientation(tmp_path: Path) -> None:
    arr = np.zeros((20, 30, 3), dtype=np.uint8)  # 30 wide, 20 high
    arr[:, :5] = 255  # a white stripe on the left edge
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    im.save(path, format="JPEG", exif=exif, quality=95)
    img = av.load_image(path, CFG)
    assert img.shape == (30, 20, 3)
    assert img[:5].mean() > 200 and img[-5:].mean() < 50  # the left stripe is now on top


def test_load_image_modes(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    img = av.load_image(path, CFG)
    assert img.shape == (8, 8, 3)
    np.testing.assert_array_equal(img[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(img[7, 7], [255, 255, 255])

    grey16 = np.full((6, 6), 65535, dtype=np.uint16)
    grey16[:3] = 257 * 100
    path16 = tmp_path / "grey16.png"
    Image.fromarray(grey16).save(path16)
    img16 = av.load_image(path16, CFG)
    assert img16.shape == (6, 6, 3)
    assert img16[0, 0, 0] == 100 and img16[5, 5, 2] == 255


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with a tiny (bogus) body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_load_image_errors(tmp_path: Path, astronaut: np.ndarray) -> None:
    with pytest.raises(InputError, match="not found"):
        av.load_image(tmp_path / "missing.png", CFG)
    with pytest.raises(InputError, match="directory"):
        av.load_image(tmp_path, CFG)

    text = tmp_path / "notes.jpg"
    text.write_text("this is not a JPEG\n" * 10)
    with pytest.raises(InputError, match="not an image"):
        av.load_image(text, CFG)

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        av.load_image(empty, CFG)

    png = _png_bytes(astronaut)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png[: len(png) // 2])
    with pytest.raises(InputError, match="truncated"):
        av.load_image(truncated, CFG)

    big = tmp_path / "big.png"
    big.write_bytes(png)
    with pytest.raises(InputError, match="larger than 0 MB") as e:
        av.load_image(big, replace(CFG, max_file_bytes=len(png) - 1))
    assert "max_file_bytes" not in str(e.value)  # the user never sees an internal name
    assert av.load_image(big, replace(CFG, max_file_bytes=len(png))).shape == (512, 512, 3)

    # Over the pixel limit: reduced (by 2, 4, ...), not refused.
    assert av.load_image(big, replace(CFG, max_image_pixels=512 * 512 - 1)).shape == (256, 256, 3)


@pytest.mark.parametrize("limit", [CFG.max_image_pixels, 10**11])
def test_load_image_decompression_bomb(tmp_path: Path, limit: int) -> None:
    """Rejected from the header alone, by our limit or (with a huge limit) by Pillow's guard."""
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(100_000, 100_000))
    with pytest.raises(InputError, match="pixels"):
        av.load_image(path, replace(CFG, max_image_pixels=limit))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_load_image_unreadable(tmp_path: Path, astronaut: np.ndarray) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(_png_bytes(astronaut[:16, :16]))
    path.chmod(0)
    try:
        with pytest.raises(InputError, match="permission"):
            av.load_image(path, CFG)
    finally:
        path.chmod(0o600)


# ----------------------------------------------------------------------------- cache


def _assert_same(a: av.Avatar, b: av.Avatar) -> None:
    assert a.key == b.key
    for field in ("crop", "neutral", "frame_to_crop", "mask"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    assert a.paste.bbox == b.paste.bbox
    np.testing.assert_array_equal(a.paste.alpha, b.paste.alpha)
    np.testing.assert_array_equal(a.paste.src_index, b.paste.src_index)


def test_cache_round_trip(
    astronaut: np.ndarray,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = replace(CFG, cache_dir=tmp_path / "cache")
    det = _FixedDetector(
        [FaceDetection(box=(179.0, 83.0, 267.0, 171.0), landmarks=av.default_landmarks(), score=1)]
    )
    first = av.prepare_avatar(astronaut, cfg, detector=det)
    assert det.calls == 1
    files = list((tmp_path / "cache" / "avatars").glob("*.npz"))
    assert [f.name for f in files] == [f"{first.key}.npz"]
    assert not list((tmp_path / "cache" / "avatars").glob("*.tmp"))

    # Second call: from disk, without detection or alignment.
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed although cached")

    with monkeypatch.context() as m:
        m.setattr(av, "alignment_transform", boom)
        m.setattr(av, "warp_crop", boom)
        second = av.prepare_avatar(astronaut, cfg, detector=det)
    assert det.calls == 1
    _assert_same(first, second)

    # Different settings -> a different key and file.
    other = av.prepare_avatar(astronaut, replace(cfg, feather=0.1), detector=det)
    assert other.key != first.key

    # A corrupt cache file is logged, ignored and rewritten.
    files[0].write_bytes(b"PK\x03\x04 definitely not a zip")
    with caplog.at_level(logging.WARNING, logger="talkstream.engine.avatar"):
        third = av.prepare_avatar(astronaut, cfg, detector=det)
    assert "unreadable" in caplog.text and first.key in caplog.text
    assert det.calls == 3
    _assert_same(first, third)
    with np.load(files[0], allow_pickle=False) as z:
        np.testing.assert_array_equal(z["crop"], first.crop)


def test_cache_with_json_landmarks(astronaut: np.ndarray, tmp_path: Path) -> None:
    cfg = replace(CFG, cache_dir=tmp_path)
    a = av.prepare_avatar(astronaut, cfg, landmarks=av.default_landmarks())
    b = av.prepare_avatar(astronaut, cfg, landmarks=av.default_landmarks())
    _assert_same(a, b)
    # Landmarks are part of the key.
    shifted = av.prepare_avatar(astronaut, cfg, landmarks=av.default_landmarks() + 1.0)
    assert shifted.key != a.key


def test_load_image_permission_error_is_input_error(
    tmp_path: Path, astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same as above, simulated, so it also runs as root (CI containers)."""
    path = tmp_path / "secret.png"
    path.write_bytes(_png_bytes(astronaut[:16, :16]))

    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(InputError, match="permission denied"):
        av.load_image(path, CFG)


def test_weak_detection_beside_a_confident_face_is_ignored(
    astronaut: np.ndarray, detector: DlibDetector, caplog: pytest.LogCaptureFixture
) -> None:
    # Mirrored, cropped and scaled down, the photo gives dlib a second, larger but weak "face"
    # on the suit below the real one.
    img = Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1][20:480, 30:470]))
    photo = np.asarray(img.resize((384, 402), Image.Resampling.BILINEAR))
    faces = detector.detect(photo)
    if len(faces) < 2:
        pytest.skip("this dlib build finds only one face here; nothing to choose between")
    real = max(faces, key=lambda f: f.score)
    assert max(faces, key=lambda f: f.area) is not real  # "largest" alone would be wrong
    with caplog.at_level(logging.WARNING, logger="talkstream.engine.avatar"):
        a = av.prepare_avatar(photo, CFG, detector=detector, source_name="me.jpg")
    assert "1 weak, ignored" in caplog.text
    b = av.prepare_avatar(photo, CFG, landmarks=real.landmarks)
    np.testing.assert_allclose(a.neutral, b.neutral, atol=1e-4)
