"""Paste-back and I420 conversion: numpy always, CuPy when a CUDA GPU is present."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from talkstream.config import AvatarConfig
from talkstream.engine import avatar as av
from talkstream.kernels import post

IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _box_mask(s: int, lo: int, hi: int) -> np.ndarray:
    """(S, S) mask: 1 on [lo, hi) x [lo, hi), 0 elsewhere."""
    m = np.zeros((s, s), dtype=np.float32)
    m[lo:hi, lo:hi] = 1.0
    return m


@pytest.fixture(scope="module")
def astronaut_avatar() -> av.Avatar:
    # The photo's own frame: the paste geometry is checked against the photo's landmarks.
    cfg = AvatarConfig(framing="full")
    return av.prepare_avatar(av.default_image(), cfg, landmarks=av.default_landmarks())


def test_get_array_module_numpy() -> None:
    assert post.get_array_module(np.zeros(3)) is np
    assert post.get_array_module([1, 2]) is np


def test_bilinear_taps() -> None:
    index, weight, inside = post.bilinear_taps(
        np.array([0.0, 1.25, 3.0, -2.0]), np.array([0.0, 0.5, 2.0, 1.0]), width=4, height=3
    )
    assert index.shape == (4, 4) and index.dtype == np.int32
    assert weight.dtype == np.float32
    np.testing.assert_allclose(weight.sum(0), 1.0, atol=1e-6)
    np.testing.assert_array_equal(inside, [True, True, True, False])
    grid = np.arange(12, dtype=np.float32)  # value = y * 4 + x: bilinear is exact on it
    values = (grid[index] * weight).sum(0)
    np.testing.assert_allclose(values, [0.0, 3.25, 11.0, 4.0], atol=1e-5)  # last: clamped x


def test_identity_paste() -> None:
    s = 16
    rng = _rng()
    face = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    background = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    mask = _box_mask(s, 4, 12)
    pmap = post.build_paste_map((s, s), IDENTITY, mask)
    assert pmap.bbox == (4, 12, 4, 12)  # trimmed to the non-zero mask
    assert pmap.alpha.shape == (8, 8, 1) and pmap.alpha.dtype == np.float32
    assert pmap.src_index.shape == (4, 64) and pmap.src_index.dtype == np.int32
    assert pmap.src_weight.shape == (4, 64) and pmap.src_weight.dtype == np.float32
    out = post.paste_back(background, face, pmap)
    assert out.dtype == np.uint8 and out.shape == background.shape
    inside = mask.astype(bool)
    np.testing.assert_array_equal(out[inside], face[inside])
    np.testing.assert_array_equal(out[~inside], background[~inside])
    assert out is not background


def test_translated_paste_and_partial_alpha() -> None:
    s = 16
    rng = _rng(1)
    face = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    background = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = _box_mask(s, 2, 14) * 0.25
    # crop pixel = frame pixel - (10, 5): the crop sits at rows 5..20, columns 10..25.
    frame_to_crop = np.array([[1.0, 0.0, -10.0], [0.0, 1.0, -5.0]])
    pmap = post.build_paste_map((40, 50), frame_to_crop, mask)
    assert pmap.bbox == (7, 19, 12, 24)
    out = post.paste_back(background, face, pmap)
    region_bg = background[7:19, 12:24].astype(np.float64)
    expected = np.rint(0.25 * face[2:14, 2:14] + 0.75 * region_bg)
    np.testing.assert_allclose(out[7:19, 12:24], expected, atol=1)
    outside = np.ones((40, 50), dtype=bool)
    outside[7:19, 12:24] = False
    np.testing.assert_array_equal(out[outside], background[outside])


def test_float_face_matches_uint8() -> None:
    s = 16
    rng = _rng(2)
    face = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    background = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    angle = 0.3
    m = np.array([[np.cos(angle), np.sin(angle), -2.0], [-np.sin(angle), np.cos(angle), 3.0]])
    pmap = post.build_paste_map((24, 24), m, av.face_mask(np.full((68, 2), 8.0), s, 0.2))
    a = post.paste_back(background, face, pmap)
    b = post.paste_back(background, face.astype(np.float32), pmap)
    np.testing.assert_array_equal(a, b)


def test_face_off_frame() -> None:
    background = np.zeros((10, 10, 3), dtype=np.uint8)
    far = np.array([[1.0, 0.0, 1000.0], [0.0, 1.0, 1000.0]])
    pmap = post.build_paste_map((10, 10), far, np.ones((8, 8), dtype=np.float32))
    assert pmap.bbox[0] == pmap.bbox[1]
    out = post.paste_back(background, np.full((8, 8, 3), 255, np.uint8), pmap)
    np.testing.assert_array_equal(out, background)


def test_round_trip_crop_and_paste(astronaut_avatar: av.Avatar) -> None:
    """Pasting the avatar's own crop back barely changes its photo (two bilinear resamplings)."""
    a = astronaut_avatar
    out = post.paste_back(a.image, a.crop, a.paste)
    y0, y1, x0, x1 = a.paste.bbox
    diff = np.abs(out.astype(np.int16) - a.image.astype(np.int16))  # (H, W, 3)
    inside = a.paste.alpha[..., 0] > 0.99  # (h, w)
    assert inside.sum() > 0.3 * inside.size
    assert diff[y0:y1, x0:x1][inside].mean() < 3.0
    outside = np.ones(a.image.shape[:2], dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert diff[outside].max() == 0
    # The face is pasted where it was: the bbox covers the parts that move (eyes, lips, jaw)
    # and, since the mask keeps the photo's own brows and forehead, not the brows.
    pts = av.default_landmarks()
    moving = pts[[*range(2, 15), *range(36, 68)]]
    assert y0 <= moving[:, 1].min() and moving[:, 1].max() < y1
    assert x0 <= moving[:, 0].min() and moving[:, 0].max() < x1
    assert pts[17:27, 1].min() < y0


def test_out_in_place(astronaut_avatar: av.Avatar) -> None:
    a = astronaut_avatar
    rng = _rng(3)
    face = rng.integers(0, 256, a.crop.shape, dtype=np.uint8)
    expected = post.paste_back(a.image, face, a.paste)

    out = np.zeros_like(a.image)
    result = post.paste_back(a.image, face, a.paste, out=out)
    assert result is out
    np.testing.assert_array_equal(out, expected)

    # A buffer that already holds the background: only the bbox is rewritten.
    reused = a.image.copy()
    post.paste_back(a.image, rng.integers(0, 256, a.crop.shape, dtype=np.uint8), a.paste, reused)
    post.paste_back(a.image, face, a.paste, out=reused, out_has_background=True)
    np.testing.assert_array_equal(reused, expected)

    # Pasting onto the background buffer itself.
    own = a.image.copy()
    post.paste_back(own, face, a.paste, out=own)
    np.testing.assert_array_equal(own, expected)


def test_paste_validation(astronaut_avatar: av.Avatar) -> None:
    a = astronaut_avatar
    with pytest.raises(TypeError, match="uint8"):
        post.paste_back(a.image.astype(np.float32), a.crop, a.paste)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        post.paste_back(a.image[..., 0], a.crop, a.paste)
    with pytest.raises(ValueError, match="128, 128, 3"):
        post.paste_back(a.image, a.crop[:64], a.paste)
    with pytest.raises(TypeError, match="float64"):
        post.paste_back(a.image, a.crop.astype(np.float64), a.paste)
    with pytest.raises(ValueError, match="built for 512x512"):
        post.paste_back(a.image[:256], a.crop, a.paste)
    with pytest.raises(ValueError, match="shape"):
        post.paste_back(a.image, a.crop, a.paste, out=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(TypeError, match="numpy or cupy"):
        post.paste_back([[0]], a.crop, a.paste)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        post.build_paste_map((10, 10), np.eye(3), a.mask)
    with pytest.raises(ValueError, match="singular"):
        post.build_paste_map((10, 10), np.zeros((2, 3)), a.mask)
    with pytest.raises(ValueError, match="square"):
        post.build_paste_map((10, 10), IDENTITY, a.mask[:10])


def test_paste_map_to_numpy_copies(astronaut_avatar: av.Avatar) -> None:
    pmap = astronaut_avatar.paste
    copy = pmap.to(np)
    assert copy.bbox == pmap.bbox and copy.frame_hw == pmap.frame_hw
    assert copy.alpha is not pmap.alpha
    np.testing.assert_array_equal(copy.src_weight, pmap.src_weight)


# ----------------------------------------------------------------------------- I420


def _pyav_i420(rgb: np.ndarray, interpolation: str | None = None) -> np.ndarray:
    pyav = pytest.importorskip("av", reason="PyAV (av) is not installed")
    frame = pyav.VideoFrame.from_ndarray(rgb, format="rgb24")
    if interpolation is None:
        out = frame.reformat(format="yuv420p")
    else:
        out = frame.reformat(format="yuv420p", interpolation=interpolation)
    return np.asarray(out.to_ndarray())


def test_i420_matches_pyav_random() -> None:
    rgb = _rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    ours = post.rgb_to_i420(rgb)
    assert ours.shape == (72, 64) and ours.dtype == np.uint8
    # swscale's "area" filter is the plain 2x2 chroma average we compute; its default filter
    # is wider, which on per-pixel noise gives a different (not wrong) chroma.
    ref = _pyav_i420(rgb, interpolation="AREA")
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2
    ref_default = _pyav_i420(rgb)
    assert np.abs(ours[:48].astype(int) - ref_default[:48].astype(int)).max() <= 2  # luma


def test_i420_matches_pyav_smooth_default_filter() -> None:
    y, x = np.mgrid[0:64, 0:96]
    rgb = np.stack([x * 2.5, y * 4, (x + y) * 1.5], axis=2).astype(np.uint8)
    diff = np.abs(post.rgb_to_i420(rgb).astype(int) - _pyav_i420(rgb).astype(int))
    assert diff.max() <= 2


def test_i420_range_and_out() -> None:
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[:2] = 255  # white top half, black bottom half
    out = np.full((6, 6), 7, dtype=np.uint8)
    result = post.rgb_to_i420(rgb, out=out)
    assert result is out
    np.testing.assert_array_equal(out[:2], 235)  # limited range white
    np.testing.assert_array_equal(out[2:4], 16)  # limited range black
    np.testing.assert_array_equal(out[4:], 128)  # neutral chroma
    np.testing.assert_array_equal(post.rgb_to_i420(rgb), out)


@pytest.mark.parametrize("shape", [(22, 2048, 3), (2, 2, 3), (130, 258, 3)])
def test_i420_matches_formula(shape: tuple[int, int, int]) -> None:
    """Against the BT.601 formula in float64; wide images exercise the CPU row bands."""
    rgb = _rng(7).integers(0, 256, shape, dtype=np.uint8)
    h, w = shape[:2]
    f = rgb.astype(np.float64)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    blocks = f.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    rb, gb, bb = blocks[..., 0], blocks[..., 1], blocks[..., 2]
    u = 128 + (-37.797 * rb - 74.203 * gb + 112.0 * bb) / 255
    v = 128 + (112.0 * rb - 93.786 * gb - 18.214 * bb) / 255
    expected = np.concatenate([np.rint(p).reshape(-1) for p in (y, u, v)]).reshape(h * 3 // 2, w)
    ours = post.rgb_to_i420(rgb)
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("shape", [(5, 6, 3), (6, 7, 3), (7, 7, 3)])
def test_i420_odd_sizes(shape: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        post.rgb_to_i420(np.zeros(shape, dtype=np.uint8))


def test_i420_validation() -> None:
    with pytest.raises(TypeError, match="uint8"):
        post.rgb_to_i420(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(6, 4\) uint8"):
        post.rgb_to_i420(np.zeros((4, 4, 3), np.uint8), out=np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="C-contiguous"):
        post.rgb_to_i420(np.zeros((4, 4, 3), np.uint8), out=np.zeros((4, 6), np.uint8).T)


# ----------------------------------------------------------------------------- CuPy


@pytest.fixture(scope="module")
def cupy() -> ModuleType:
    reason = "CuPy with a CUDA GPU is not available"
    try:
        import cupy
    except Exception:
        pytest.skip(reason)
    try:
        if not cupy.cuda.is_available():
            pytest.skip(reason)
    except Exception:
        pytest.skip(reason)
    return cupy


def test_cupy_paste_matches_numpy(cupy: ModuleType, astronaut_avatar: av.Avatar) -> None:
    a = astronaut_avatar
    face = _rng(5).integers(0, 256, a.crop.shape, dtype=np.uint8)
    expected = post.paste_back(a.image, face, a.paste)
    pmap_gpu = a.paste.to(cupy)
    assert post.get_array_module(pmap_gpu.alpha) is cupy
    bg_gpu = cupy.asarray(a.image)
    got = post.paste_back(bg_gpu, cupy.asarray(face), pmap_gpu)
    assert post.get_array_module(got) is cupy
    # float32 sums may round differently on the GPU (FMA): allow one level.
    assert np.abs(cupy.asnumpy(got).astype(int) - expected.astype(int)).max() <= 1
    out = cupy.zeros_like(bg_gpu)
    assert post.paste_back(bg_gpu, cupy.asarray(face), pmap_gpu, out=out) is out
    cupy.testing.assert_array_equal(out, got)
    back = pmap_gpu.to(np)
    np.testing.assert_array_equal(back.alpha, a.paste.alpha)
    with pytest.raises(TypeError, match=r"pmap\.to"):
        post.paste_back(bg_gpu, cupy.asarray(face), a.paste)


def test_cupy_i420_matches_numpy(cupy: ModuleType) -> None:
    rgb = _rng(6).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    expected = post.rgb_to_i420(rgb)
    got = post.rgb_to_i420(cupy.asarray(rgb))
    assert post.get_array_module(got) is cupy
    assert np.abs(cupy.asnumpy(got).astype(int) - expected.astype(int)).max() <= 1
    out = cupy.empty((72, 64), dtype=cupy.uint8)
    assert post.rgb_to_i420(cupy.asarray(rgb), out=out) is out
    cupy.testing.assert_array_equal(out, got)
