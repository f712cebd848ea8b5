"""Framing (the output frame cut around the face) and the photo check that refuses faces which
cannot be animated well. On the real astronaut photo, with dlib where detection is involved."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from talkstream.cli import _engine_config, build_parser
from talkstream.config import FRAMINGS, AvatarConfig, Config, EngineConfig, RenderConfig
from talkstream.engine import avatar as av
from talkstream.engine.landmarks import DlibDetector, FaceDetection, save_landmarks_json
from talkstream.engine.pipeline import Engine
from talkstream.engine.render import render_to_file
from talkstream.errors import InputError, MissingDependencyError
from tests.conftest import speechlike

CFG = AvatarConfig()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return av.default_image()  # (512, 512, 3)


@pytest.fixture(scope="module")
def landmarks() -> np.ndarray:
    return av.default_landmarks()  # (68, 2)


@pytest.fixture(scope="module")
def detector() -> DlibDetector:
    pytest.importorskip("dlib", reason="dlib (the 'detect' extra) is not installed")
    try:
        return DlibDetector()
    except MissingDependencyError as e:
        pytest.skip(f"face_recognition_models is not installed: {e}")


class _Recording:
    """The real detector, remembering the size of every image it was given."""

    def __init__(self, inner: DlibDetector) -> None:
        self.inner = inner
        self.name = inner.name
        self.shapes: list[tuple[int, ...]] = []

    def detect(self, image_rgb: np.ndarray) -> list[FaceDetection]:
        self.shapes.append(image_rgb.shape)
        return self.inner.detect(image_rgb)


# 12 MP: the astronaut enlarged to 3000x3000, edges repeated out to 4000x3000.
_BIG_SCALE = 3000 / 512
_BIG_PAD_X = 500


@pytest.fixture(scope="module")
def big_photo(astronaut: np.ndarray) -> np.ndarray:
    big = Image.fromarray(astronaut).resize((3000, 3000), Image.Resampling.BICUBIC)
    return np.pad(np.asarray(big), ((0, 0), (_BIG_PAD_X, _BIG_PAD_X), (0, 0)), mode="edge")


def _big_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """The astronaut's landmarks in :func:`big_photo`'s pixels (pixel centres)."""
    return ((landmarks + 0.5) * _BIG_SCALE - 0.5 + [_BIG_PAD_X, 0]).astype(np.float32)


def _frame_points(a: av.Avatar) -> np.ndarray:
    assert a.photo_to_frame is not None and a.photo_landmarks is not None
    return av.apply_affine(a.photo_to_frame, a.photo_landmarks)


# ----------------------------------------------------------------------------- framing


@pytest.mark.parametrize("framing", list(FRAMINGS))
def test_each_framing_size_face_placement_and_paste_geometry(
    astronaut: np.ndarray, landmarks: np.ndarray, framing: str
) -> None:
    cfg = replace(CFG, framing=framing)
    a = av.prepare_avatar(astronaut, cfg, landmarks=landmarks)
    size = FRAMINGS[framing]
    if size is None:
        assert a.image is astronaut
        np.testing.assert_array_equal(a.photo_to_frame, [[1, 0, 0], [0, 1, 0]])
    else:
        assert a.image.shape == (size[1], size[0], 3) and a.image.dtype == np.uint8
        assert a.image.flags.c_contiguous
    h, w = a.image.shape[:2]
    pts = _frame_points(a)
    # The whole face is inside the frame, with a margin.
    margin = 0.05 * min(h, w)
    assert pts[:, 0].min() > margin and pts[:, 0].max() < w - margin
    assert pts[:, 1].min() > margin and pts[:, 1].max() < h - margin
    if size is not None:
        # Centred horizontally, eyes above the middle (the frame slides a little towards the
        # inside of the photo to avoid padding: the astronaut's head is near the photo's top).
        right_eye, left_eye, mouth = av.face_anchors(pts)
        eye_mid = 0.5 * (right_eye + left_eye)
        assert abs(0.5 * (eye_mid[0] + mouth[0]) - (w - 1) / 2) <= 0.2 * w + 1
        assert 0.25 * h <= eye_mid[1] <= 0.5 * h
    # The paste geometry maps the face in the frame onto the crop's neutral landmarks, and the
    # frame's pixels there are the crop's (sampled from the photo): paste-back lands in place.
    np.testing.assert_allclose(av.apply_affine(a.frame_to_crop, pts), a.neutral, atol=1e-3)
    resampled = av.warp_crop(a.image, a.frame_to_crop, a.crop_size)
    inside = a.mask > 0.5
    assert np.abs(resampled.astype(int) - a.crop)[inside].mean() < 2.0
    assert a.paste.frame_hw == (h, w)


def test_call_face_has_the_target_height(astronaut: np.ndarray, landmarks: np.ndarray) -> None:
    a = av.prepare_avatar(astronaut, CFG, landmarks=landmarks)
    # The astronaut needs 1.48x for its face to be 40% of 480 px: within max_upscale (1.5).
    assert a.photo_to_frame is not None and 1.0 < a.photo_to_frame[0, 0] < CFG.max_upscale
    assert av.face_height(_frame_points(a)) == pytest.approx(0.4 * 480, rel=1e-3)
    # Not downscaled: crop, landmarks and mask are the photo's own, as without framing.
    full = av.prepare_avatar(astronaut, replace(CFG, framing="full"), landmarks=landmarks)
    np.testing.assert_array_equal(a.crop, full.crop)
    np.testing.assert_array_equal(a.neutral, full.neutral)
    np.testing.assert_array_equal(a.mask, full.mask)


def test_small_photo_is_enlarged_at_most_max_upscale(
    astronaut: np.ndarray, landmarks: np.ndarray
) -> None:
    small = np.asarray(Image.fromarray(astronaut).resize((256, 256), Image.Resampling.BOX))
    pts = (landmarks + 0.5) * 0.5 - 0.5
    a = av.prepare_avatar(small, CFG, landmarks=pts)
    assert a.image.shape == (480, 640, 3)
    assert a.photo_to_frame is not None and a.photo_to_frame[0, 0] == CFG.max_upscale
    # The face stays smaller than asked rather than being blown up 3x.
    assert av.face_height(_frame_points(a)) == pytest.approx(1.5 * av.face_height(pts), rel=1e-6)
    assert av.face_height(_frame_points(a)) < 0.4 * 480


def test_padding_is_a_blurred_backdrop(astronaut: np.ndarray, landmarks: np.ndarray) -> None:
    """A 1280x720 frame needs more width than the 512 px photo has: the sides show the photo
    again, blurred and dimmed, not streaks of its edge pixels; the photo itself stays sharp."""
    a = av.prepare_avatar(astronaut, replace(CFG, framing="landscape"), landmarks=landmarks)
    assert a.photo_to_frame is not None
    left = round(a.photo_to_frame[0, 2] + 0.5 - 0.5 * a.photo_to_frame[0, 0])  # photo x=0 edge
    assert left > 40  # the photo starts this far into the frame
    side = a.image[:, : left - 20].astype(np.float64)  # (H, w, 3) backdrop, past the fade
    streak = np.repeat(a.image[:, left : left + 1], left - 20, 1).astype(np.float64)
    assert np.abs(side - streak).mean() > 10  # not the edge pixels repeated
    # Blurred: neighbouring backdrop pixels differ far less than the photo's own do.
    photo = a.image[:, left + 20 : left + 200].astype(np.float64)
    assert np.abs(np.diff(side, axis=0)).mean() < 0.3 * np.abs(np.diff(photo, axis=0)).mean()
    # Dimmed: darker than the photo on average.
    assert side.mean() < photo.mean()
    # The photo's own pixels are untouched beyond the fade.
    inner = a.image[:, left + 40 : left + 400]
    assert inner.std() > 40


def test_custom_frame_size(astronaut: np.ndarray, landmarks: np.ndarray) -> None:
    a = av.prepare_avatar(astronaut, replace(CFG, frame_size=(320, 240)), landmarks=landmarks)
    assert a.image.shape == (240, 320, 3)
    with pytest.raises(ValueError, match="framing"):
        AvatarConfig(framing="cinema")
    with pytest.raises(ValueError, match="frame_size"):
        AvatarConfig(framing="full", frame_size=(320, 240))


def test_12mp_photo_gives_a_640x480_frame_detected_on_a_copy(
    big_photo: np.ndarray, landmarks: np.ndarray, detector: DlibDetector
) -> None:
    assert big_photo.shape == (3000, 4000, 3)
    det = _Recording(detector)
    a = av.prepare_avatar(big_photo, CFG, detector=det)
    assert a.image.shape == (480, 640, 3)
    # dlib saw a copy whose longest side is 1024 px, never the 12 MP photo.
    assert det.shapes and all(max(s[:2]) <= CFG.detect_max_side for s in det.shapes)
    # The landmarks came back in the photo's own pixels.
    expected = _big_landmarks(landmarks)
    jaw = float(np.hypot(*(expected[16] - expected[0])))
    assert a.photo_landmarks is not None
    err = np.hypot(*(a.photo_landmarks - expected).T)  # (68,) photo pixels
    assert err.mean() < 0.02 * jaw and err.max() < 0.06 * jaw
    # The face check saw the photo's pixels: a 540 px wide face.
    assert a.check is not None and a.check.ok
    assert a.check.face_px == pytest.approx(jaw, rel=0.05)
    # Downscaled 4x, the face has the target size and the crop matches the small photo's.
    assert a.photo_to_frame is not None and a.photo_to_frame[0, 0] == pytest.approx(0.25, abs=0.01)
    assert av.face_height(_frame_points(a)) == pytest.approx(0.4 * 480, rel=1e-3)
    given = av.prepare_avatar(big_photo, CFG, landmarks=expected)
    small = av.prepare_avatar(av.default_image(), CFG, landmarks=landmarks)
    assert np.abs(given.crop.astype(int) - small.crop).mean() < 2.0


def test_tiny_is_judged_on_the_photo_not_on_the_detection_copy(
    astronaut: np.ndarray, detector: DlibDetector
) -> None:
    """A 93 px face in a 3000x2250 photo is only 32 px wide on the 1024 px detection copy."""
    canvas = np.full((2250, 3000, 3), 120, dtype=np.uint8)
    canvas[800:1312, 1200:1712] = astronaut
    det = _Recording(detector)
    a = av.prepare_avatar(canvas, CFG, detector=det)
    assert all(max(s[:2]) <= 1024 for s in det.shapes)
    assert a.check is not None and a.check.ok and a.check.face_px > 80


def test_cache_key_has_the_framing(
    astronaut: np.ndarray, landmarks: np.ndarray, tmp_path: Path
) -> None:
    cfg = replace(CFG, cache_dir=tmp_path)
    variants = [
        cfg,
        replace(cfg, framing="portrait"),
        replace(cfg, framing="full"),
        replace(cfg, frame_size=(800, 600)),
        replace(cfg, frame_face_fraction=0.3),
        replace(cfg, max_upscale=1.2),
    ]
    avatars = [av.prepare_avatar(astronaut, c, landmarks=landmarks) for c in variants]
    keys = [a.key for a in avatars]
    assert len(set(keys)) == len(keys)
    assert sorted(p.stem for p in (tmp_path / "avatars").glob("*.npz")) == sorted(keys)
    # The quality switch does not change the arrays: same key, a cache hit.
    again = av.prepare_avatar(astronaut, replace(cfg, check_quality=False), landmarks=landmarks)
    assert again.key == keys[0]
    np.testing.assert_array_equal(again.image, avatars[0].image)
    np.testing.assert_array_equal(again.frame_to_crop, avatars[0].frame_to_crop)
    # A cached avatar is framed the same as a fresh one.
    fresh = av.prepare_avatar(astronaut, replace(CFG, framing="portrait"), landmarks=landmarks)
    np.testing.assert_array_equal(avatars[1].image, fresh.image)
    np.testing.assert_array_equal(avatars[1].frame_to_crop, fresh.frame_to_crop)


# ----------------------------------------------------------------------------- honest failure


def _half_squashed(astronaut: np.ndarray, landmarks: np.ndarray, k: float) -> np.ndarray:
    """The photo's right of the nose squeezed by ``k``: a face turned to its left."""
    w = astronaut.shape[1]
    nose_x = float(landmarks[30, 0])
    xs = np.arange(w, dtype=np.float64)
    src = np.clip(np.where(xs < nose_x, xs, nose_x + (xs - nose_x) / k), 0, w - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, w - 1)
    f = (src - i0)[None, :, None]
    return (astronaut[:, i0] * (1 - f) + astronaut[:, i1] * f).astype(np.uint8)


def _scaled(astronaut: np.ndarray, f: float) -> np.ndarray:
    n = round(512 * f)
    return np.asarray(Image.fromarray(astronaut).resize((n, n), Image.Resampling.BOX))


def test_default_face_passes(
    astronaut: np.ndarray, landmarks: np.ndarray, detector: DlibDetector
) -> None:
    for a in (
        av.prepare_avatar(astronaut, CFG, landmarks=landmarks),
        av.prepare_avatar(astronaut, CFG, detector=detector),
    ):
        assert a.check is not None and a.check.ok


def test_turned_face_photo_is_refused(
    astronaut: np.ndarray, landmarks: np.ndarray, detector: DlibDetector
) -> None:
    photo = _half_squashed(astronaut, landmarks, 0.3)
    with pytest.raises(InputError) as e:
        av.prepare_avatar(photo, CFG, detector=detector, source_name="me.jpg")
    msg = str(e.value)
    assert msg.startswith("me.jpg: the face is turned to the side (yaw ")
    assert "use a photo taken from the front, both eyes and both mouth corners visible" in msg
    assert "--force" in msg and "\n" not in msg


def test_tiny_face_photo_is_refused(astronaut: np.ndarray, detector: DlibDetector) -> None:
    with pytest.raises(InputError, match=r"^small\.png: the face is only 3\d px wide; .*80 px"):
        av.prepare_avatar(_scaled(astronaut, 0.36), CFG, detector=detector, source_name="small.png")


def test_covered_mouth_photo_is_refused(astronaut: np.ndarray, detector: DlibDetector) -> None:
    covered = astronaut.copy()
    covered[132:165, 195:255] = (210, 170, 150)  # a skin-coloured patch over the mouth
    with pytest.raises(InputError, match=r"mouth is covered.*uncovered"):
        av.prepare_avatar(covered, CFG, detector=detector)


def test_tilted_photo_with_its_landmarks_is_refused(
    astronaut: np.ndarray, landmarks: np.ndarray
) -> None:
    centre = landmarks.mean(axis=0)
    rotated = np.asarray(
        Image.fromarray(astronaut).rotate(
            50, resample=Image.Resampling.BICUBIC, center=tuple(centre)
        )
    )
    a = np.deg2rad(50.0)  # Pillow turns counter-clockwise on screen (y down)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    pts = (landmarks - centre) @ rot.T + centre
    with pytest.raises(InputError, match=r"head is tilted 4\d degrees; use an upright photo"):
        av.prepare_avatar(rotated, CFG, landmarks=pts)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("profile", "turned to the side"),
        ("narrow_mouth", "mouth is covered"),
    ],
)
def test_manipulated_landmarks_are_refused(
    astronaut: np.ndarray, landmarks: np.ndarray, edit: str, message: str
) -> None:
    pts = landmarks.astype(np.float64).copy()
    if edit == "profile":
        # Nose and mouth moved towards the left jaw end, as in a face turned away.
        shift = 0.7 * (pts[16, 0] - pts[30, 0])
        pts[27:36, 0] += shift
        pts[48:68, 0] += 0.5 * shift
    else:
        mouth = pts[48:68].mean(axis=0)
        pts[48:68] = mouth + 0.3 * (pts[48:68] - mouth)
    with pytest.raises(InputError, match=message):
        av.prepare_avatar(astronaut, CFG, landmarks=pts)


def test_force_animates_with_a_warning_and_the_cache_does_not_bypass_the_check(
    astronaut: np.ndarray, detector: DlibDetector, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tiny = _scaled(astronaut, 0.36)
    forced = replace(CFG, check_quality=False, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="talkstream.engine.avatar"):
        a = av.prepare_avatar(tiny, forced, detector=detector, source_name="small.png")
    assert a.check is not None and a.check.reason == "tiny"
    assert a.image.shape == (480, 640, 3)
    assert "small.png: the face is only" in caplog.text and "anyway" in caplog.text
    # The same photo from the cache, without --force: still refused.
    with pytest.raises(InputError, match=r"only 3\d px wide"):
        av.prepare_avatar(tiny, replace(forced, check_quality=True), detector=detector)


def test_cli_prints_one_line_for_a_photo_it_refuses(astronaut: np.ndarray, tmp_path: Path) -> None:
    pytest.importorskip("dlib", reason="dlib (the 'detect' extra) is not installed")
    photo = tmp_path / "small.png"
    Image.fromarray(_scaled(astronaut, 0.36)).save(photo)
    out = tmp_path / "o.mp4"
    argv = ["render", "--image", str(photo), "--out", str(out), "--no-progress", "--no-cache"]
    res = subprocess.run(
        [sys.executable, "-m", "talkstream.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"talkstream: error: {photo}: the face is only ")
    assert "use a photo where the face is at least 80 px wide" in lines[0]
    assert not out.exists()


def test_forced_render_of_a_refused_photo(
    astronaut: np.ndarray, tmp_path: Path, tiny_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """--force: the refused photo renders (framed to 640x480), and the log says why it may not
    look right."""
    pytest.importorskip("dlib", reason="dlib (the 'detect' extra) is not installed")
    photo = tmp_path / "small.png"
    Image.fromarray(_scaled(astronaut, 0.36)).save(photo)
    wav = tmp_path / "a.wav"
    sf.write(wav, speechlike(16000 // 5), 16000)
    forced = EngineConfig(avatar=AvatarConfig(check_quality=False))
    cfg = Config(
        engine=forced,
        render=RenderConfig(out=tmp_path / "o.mp4", image=photo, audio=wav, progress=False),
    )
    seen: list[tuple[int, ...]] = []
    with caplog.at_level(logging.WARNING, logger="talkstream.engine.avatar"):
        res = render_to_file(cfg, engine=tiny_engine, on_frame=lambda f: seen.append(f.image.shape))
    assert res.frames == 5 and set(seen) == {(480, 640, 3)}
    assert f"{photo}: the face is only" in caplog.text and "anyway" in caplog.text
    with pytest.raises(InputError, match=r"only 3\d px wide"):
        render_to_file(replace(cfg, engine=EngineConfig()), engine=tiny_engine)


def test_given_landmarks_json_are_checked_too(
    astronaut: np.ndarray, landmarks: np.ndarray, tmp_path: Path
) -> None:
    pts = landmarks.astype(np.float64).copy()
    pts[27:36, 0] += 0.7 * (pts[16, 0] - pts[30, 0])
    img_path, lm_path = tmp_path / "me.png", tmp_path / "me.json"
    Image.fromarray(astronaut).save(img_path)
    save_landmarks_json(lm_path, pts.astype(np.float32))
    with pytest.raises(InputError, match=r"me\.png: the face is turned to the side"):
        av.load_avatar_source(img_path, lm_path, CFG)


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("command", ["render", "serve", "live"])
def test_framing_and_force_flags(command: str) -> None:
    parser = build_parser()
    cfg = _engine_config(parser.parse_args([command]))
    assert cfg.avatar.framing == "call" and cfg.avatar.check_quality
    cfg = _engine_config(parser.parse_args([command, "--framing", "portrait", "--force"]))
    assert cfg.avatar.framing == "portrait" and not cfg.avatar.check_quality
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--framing", "cinema"])
