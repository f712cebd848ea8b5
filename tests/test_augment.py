"""Augmentations: same draw for reference and target, geometry keeps landmarks on the face."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from talkstream.config import AvatarConfig
from talkstream.engine.avatar import default_image, default_landmarks, prepare_avatar
from talkstream.training.augment import (
    MIRROR_68,
    AugmentConfig,
    apply_appearance,
    apply_geometry,
    draw_appearance,
    draw_geometry,
    draw_mouth_style,
    tint_lips,
)
from talkstream.training.frames import MouthStyle


@pytest.fixture(scope="module")
def avatar():  # type: ignore[no-untyped-def]
    return prepare_avatar(default_image(), AvatarConfig(), landmarks=default_landmarks())


def test_mirror_table_is_an_involution() -> None:
    assert sorted(MIRROR_68.tolist()) == list(range(68))
    np.testing.assert_array_equal(MIRROR_68[MIRROR_68], np.arange(68))
    assert MIRROR_68[0] == 16 and MIRROR_68[48] == 54 and MIRROR_68[30] == 30


def test_disabled_is_identity(avatar) -> None:  # type: ignore[no-untyped-def]
    cfg = AugmentConfig(enabled=False)
    rng = np.random.default_rng(0)
    out = apply_appearance(avatar.crop, draw_appearance(rng, cfg))
    np.testing.assert_array_equal(out, avatar.crop)
    img, lm = apply_geometry(avatar.crop, avatar.neutral, draw_geometry(rng, cfg, 128))
    assert np.abs(img.astype(int) - avatar.crop).max() <= 1
    np.testing.assert_allclose(lm, avatar.neutral, atol=1e-4)


def test_appearance_varies_and_is_shared(avatar) -> None:  # type: ignore[no-untyped-def]
    cfg = AugmentConfig()
    means = []
    for seed in range(40):
        d = draw_appearance(np.random.default_rng(seed), cfg)
        a = apply_appearance(avatar.crop, d)
        b = apply_appearance(avatar.crop, d)
        np.testing.assert_array_equal(a, b)  # one draw, one result: reference == target
        assert a.shape == avatar.crop.shape and a.dtype == np.uint8
        means.append(a.reshape(-1, 3).mean(0))
    m = np.array(means)
    assert np.ptp(m.mean(1)) > 40  # light and skin tone vary a lot
    sat = np.abs(m - m.mean(1, keepdims=True)).max(1)
    assert sat.min() < 3  # some draws are greyscale


def test_each_kind_changes_the_image(avatar) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    base = draw_appearance(rng, AugmentConfig(enabled=False))
    for change in (
        {"gamma": 1.4},
        {"contrast": 0.8},
        {"blur_sigma": 1.0},
        {"jpeg_quality": 30},
        {"noise_sigma": 5.0, "noise_seed": 3},
        {"matrix": np.diag([1.2, 0.9, 0.8])},
    ):
        out = apply_appearance(avatar.crop, dataclasses.replace(base, **change))
        assert np.abs(out.astype(int) - avatar.crop).mean() > 0.5, change


def test_geometry_moves_landmarks_with_pixels(avatar) -> None:  # type: ignore[no-untyped-def]
    cfg = AugmentConfig(flip_p=1.0)
    g = draw_geometry(np.random.default_rng(2), cfg, 128)
    assert g.flip
    img, lm = apply_geometry(avatar.crop, avatar.neutral, g)
    assert lm is not None
    # After a mirror, point 36 (the image-left eye corner) is still on the image left.
    assert lm[36, 0] < lm[45, 0] and lm[48, 0] < lm[54, 0]
    # The dark pupil region follows: sample the image at the mapped eye centres.
    for eye in (slice(36, 42), slice(42, 48)):
        x, y = np.rint(lm[eye].mean(0)).astype(int)
        ox, oy = np.rint(avatar.neutral[eye].mean(0)).astype(int)
        assert abs(int(img[y, x].mean()) - int(avatar.crop[oy, ox].mean())) < 60


def test_mouth_style_and_lip_tint(avatar) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    base = MouthStyle()
    styles = [draw_mouth_style(rng, base) for _ in range(10)]
    assert len({s.teeth for s in styles}) == 10
    assert all(0.04 <= s.upper_teeth_w <= 0.14 for s in styles)
    tinted = tint_lips(avatar.crop, avatar.neutral.astype(np.float64), rng, 1.0)
    diff = np.abs(tinted.astype(int) - avatar.crop).sum(-1)
    ys, xs = np.nonzero(diff > 3)
    assert len(ys) > 20
    # Only around the lips.
    lips = avatar.neutral[48:60]
    assert xs.min() >= lips[:, 0].min() - 4 and xs.max() <= lips[:, 0].max() + 4
    assert ys.min() >= lips[:, 1].min() - 4 and ys.max() <= lips[:, 1].max() + 4
