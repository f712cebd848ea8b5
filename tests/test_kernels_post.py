"""Fused paste-back + I420: the numpy path here, the CuPy raw kernel on a GPU.

Without CuPy and a GPU the raw kernel cannot compile or run; what can be checked is checked: the
numpy path equals the two separate functions, the kernel source carries the BT.601 coefficients
of the numpy code, and the GPU test (skipped here) compares the kernel with the two-pass CuPy
path pixel by pixel.
"""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest

from talkstream.config import AvatarConfig
from talkstream.engine import avatar as av
from talkstream.kernels import post


@pytest.fixture(scope="module")
def astronaut() -> av.Avatar:
    return av.prepare_avatar(av.default_image(), AvatarConfig(), landmarks=av.default_landmarks())


def _face(s: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (s, s, 3), dtype=np.uint8)


def test_numpy_path_equals_paste_then_convert(astronaut: av.Avatar) -> None:
    face = _face(astronaut.crop_size)
    want = post.rgb_to_i420(post.paste_back(astronaut.image, face, astronaut.paste))
    rgb = np.empty_like(astronaut.image)
    out = np.full_like(want, 7)
    got = post.paste_back_i420(astronaut.image, face, astronaut.paste, out, rgb_out=rgb)
    assert got is out
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(rgb, post.paste_back(astronaut.image, face, astronaut.paste))


def test_kernel_source_carries_the_numpy_coefficients() -> None:
    src = post._PASTE_I420_SOURCE
    assert f'extern "C" __global__ void {post.PASTE_I420_KERNEL}(' in src
    assert not re.search(r"\bM[YUV][012]\b", src), "a coefficient placeholder was left in"
    m = post._BT601_LIMITED.astype(np.float32)
    for value in (m[0, 0], m[0, 1], m[0, 2], m[1, 0] * np.float32(0.25), m[2, 2] * 0.25):
        assert f"{float(np.float32(value))!r}f" in src
    # The float arithmetic is spelled with round-to-nearest intrinsics (no contraction into
    # fused multiply-adds, which would round differently from numpy): no bare operator may sit
    # in those expressions outside of index brackets.
    float_lines = [ln for ln in src.splitlines() if "__f" in ln]
    assert len(float_lines) >= 6
    for line in float_lines:
        outside_index = re.sub(r"\[[^\]]*\]", "", line.split("//")[0])
        assert not re.search(r" [-+*/] ", outside_index), line


def test_array_module_follows_the_array_type(monkeypatch: pytest.MonkeyPatch) -> None:
    # numpy arrays never import CuPy (slow, and needs a CUDA driver to be useful).
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    assert post.get_array_module(np.zeros(3)) is np
    assert "cupy" not in sys.modules
    # An array of CuPy's type selects the module called cupy. CuPy cannot run here (no GPU):
    # a module object registered under that name stands in for it, so the test sees which
    # module the dispatch imports; the GPU test below runs the real one.
    stand_in = types.ModuleType("cupy")
    monkeypatch.setitem(sys.modules, "cupy", stand_in)
    cupy_array = type("ndarray", (), {"__module__": "cupy._core.core"})()
    assert post.get_array_module(cupy_array) is stand_in
    # Only the top-level package name counts, not a prefix of it.
    lookalike = type("ndarray", (), {"__module__": "cupyx_like.core"})()
    assert post.get_array_module(lookalike) is np


@pytest.mark.gpu
def test_fused_kernel_matches_two_passes_on_gpu(astronaut: av.Avatar) -> None:
    cupy = pytest.importorskip("cupy", reason="needs CuPy (the gpu extra) and a CUDA GPU")
    if not cupy.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pmap = astronaut.paste.to(cupy)
    bg = cupy.asarray(astronaut.image)
    for seed, dtype in ((0, np.uint8), (1, np.float32)):
        face = cupy.asarray(_face(astronaut.crop_size, seed).astype(dtype))
        want_rgb = post.paste_back(bg, face, pmap)
        want = post.rgb_to_i420(want_rgb)
        rgb = cupy.full_like(bg, 3)
        got = post.paste_back_i420(bg, face, pmap, rgb_out=rgb)
        # Same float32 arithmetic without FMA: equal up to rare last-bit differences in the
        # colour matrix products (cuBLAS vs the kernel's order).
        diff = cupy.abs(got.astype(cupy.int16) - want.astype(cupy.int16))
        assert int(diff.max()) <= 1
        assert float((diff > 0).mean()) < 1e-3
        assert int(cupy.abs(rgb.astype(cupy.int16) - want_rgb.astype(cupy.int16)).max()) <= 1
        planes_only = post.paste_back_i420(bg, face, pmap)
        cupy.testing.assert_array_equal(planes_only, got)
