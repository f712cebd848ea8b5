"""Talking frames for many identities: rendering, determinism, prefetch, a training step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from talkstream.config import SamplerConfig
from talkstream.engine.avatar import crop_px_to_norm
from talkstream.engine.denoiser import DenoiserConfig, TalkFormerDenoiser
from talkstream.engine.motion import MotionConfig
from talkstream.engine.sampler import NoiseSchedule
from talkstream.training.augment import AugmentConfig
from talkstream.training.config import TeacherStageConfig
from talkstream.training.dataset import TrainData
from talkstream.training.faces import FaceSet
from talkstream.training.talking import (
    AnyFaceMotion,
    Prefetcher,
    TalkingFaces,
    checksum,
)
from talkstream.training.trainer import DiffusionTask
from talkstream.training.visemes import MouthGeometry, params_to_landmarks
from tests.test_train_support import (  # noqa: F401 (one_thread: a fixture)
    DENOISER_ARCH,
    MOTION_ARCH,
    default_crop,
    one_thread,
    tiny_data,
)

SIZE = 64
pytestmark = pytest.mark.usefixtures("one_thread")


def _faces() -> FaceSet:
    """Three 'people': the astronaut, her mirror image, and a darker, recoloured copy."""
    crop, neutral = default_crop(SIZE)
    from talkstream.training.augment import MIRROR_68

    mirrored = crop[:, ::-1].copy()
    mn = neutral.copy()
    mn[:, 0] = SIZE - 1 - mn[:, 0]
    mn = mn[MIRROR_68]
    dark = np.clip(crop.astype(float) * [0.55, 0.45, 0.4], 0, 255).astype(np.uint8)
    squeezed = neutral.copy()
    squeezed[48:68, 0] = squeezed[48:68, 0].mean() + 0.8 * (
        squeezed[48:68, 0] - squeezed[48:68, 0].mean()
    )
    return FaceSet(
        crops=np.stack([crop, mirrored, dark]),
        neutral=np.stack([neutral, mn, squeezed]).astype(np.float32),
        files=["a.png", "b.png", "c.png"],
        identities=["a", "b", "c"],
        split=np.array(["train"] * 3),
        manifest={},
    )


def _base() -> TrainData:
    data = tiny_data(n_clips=2, n_frames=30, size=SIZE)
    for c in data.clips:
        t = np.arange(c.n_frames) / 25.0
        params = np.zeros((c.n_frames, 5), np.float32)
        params[:, 0] = 0.5 - 0.5 * np.cos(2 * np.pi * 3 * t)  # jaw opens and closes
        c.params = params
    return data


@pytest.fixture(scope="module")
def talking() -> TalkingFaces:
    return TalkingFaces(_base(), _faces(), AugmentConfig(), seed=0)


def test_requires_params() -> None:
    with pytest.raises(ValueError, match="mouth parameters"):
        TalkingFaces(tiny_data(size=SIZE), _faces())


def test_batch_has_many_identities_and_moving_mouths(talking: TalkingFaces) -> None:
    b = talking.frame_batch(np.random.default_rng(0), 12)
    assert b.x0.shape == (12, 3, SIZE, SIZE) and b.refs.shape == (12, 3, SIZE, SIZE)
    assert b.ref_index is not None and b.ref_index.tolist() == list(range(12))
    assert b.landmarks.shape == (12, 68, 2)
    assert float(b.x0.min()) >= -1 and float(b.x0.max()) <= 1
    # Different references in one batch (identities and augmentation).
    flat = b.refs.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1e9).min() > 1.0


def test_frames_follow_the_mouth_parameters() -> None:
    """Without augmentation: the frame equals the reference where nothing moves, and the
    landmarks are the face's own neutral moved by the clip's parameters."""
    d = TalkingFaces(_base(), _faces(), AugmentConfig(enabled=False), seed=0)
    clip = 0
    t = int(np.argmax(d.clips[clip].params[:, 0]))  # jaw wide open
    for j in range(3):
        s = d.render_sample(clip, t, np.random.default_rng(1), identity=j)
        expect = params_to_landmarks(
            MouthGeometry.from_neutral(d.faces.neutral[j]), d.clips[clip].params[t]
        )
        idle = (d.clips[clip].landmarks[t] - d.clips[clip].speech[t]) * (SIZE / 2)
        np.testing.assert_allclose(s["landmarks"], expect + idle, atol=1e-3)
        np.testing.assert_array_equal(s["ref"], d.faces.crops[j])
        diff = np.abs(s["frame"].astype(int) - s["ref"]).sum(-1)
        top = int(d.faces.neutral[j][27:31, 1].min())  # above the nose: still
        assert diff[: top - 4].mean() < 3.0
        mouth = d.faces.neutral[j][48:68]
        x0, y0 = mouth.min(0).astype(int)
        x1, y1 = mouth.max(0).astype(int) + 4
        assert diff[y0:y1, x0:x1].mean() > 10.0  # the mouth opened


def test_fixed_picks_are_deterministic(talking: TalkingFaces) -> None:
    picks = (np.array([0, 1, 1]), np.array([3, 7, 20]))
    a = talking.frame_arrays(np.random.default_rng(0), 3, picks=picks)
    b = talking.frame_arrays(np.random.default_rng(99), 3, picks=picks)
    assert checksum(a) == checksum(b)
    c = talking.frame_arrays(np.random.default_rng(0), 3)
    d = talking.frame_arrays(np.random.default_rng(0), 3)
    e = talking.frame_arrays(np.random.default_rng(1), 3)
    assert checksum(c) == checksum(d) != checksum(e)


def test_prefetched_batches_equal_inline(talking: TalkingFaces) -> None:
    mcfg = MotionConfig.from_dict({**MotionConfig().to_dict(), **MOTION_ARCH})

    def job(step: int) -> dict[str, np.ndarray]:
        return talking.frame_arrays(np.random.default_rng([5, step]), 4, mcfg, 3.0)

    pre = Prefetcher(job, 0, 6, depth=2)
    try:
        got = [checksum(pre.get(s)) for s in (0, 1, 2, 4, 5)]  # 3 skipped: a resume jump
    finally:
        pre.close()
    assert got == [checksum(job(s)) for s in (0, 1, 2, 4, 5)]
    b = talking.batch_from_arrays(job(0))
    assert b.windows is not None and b.speech_target is not None and b.idle is not None
    assert b.speech_target.shape == (4, 37, 2)


def test_motion_batches_use_every_face_shape() -> None:
    base, faces = _base(), _faces()
    mcfg = MotionConfig.from_dict({**MotionConfig().to_dict(), **MOTION_ARCH})
    data = AnyFaceMotion(base, faces)
    b = data.motion_batch(np.random.default_rng(0), 16, 3, mcfg)
    neutrals = {tuple(np.round(n.numpy().ravel(), 4)) for n in b.neutral}
    assert len(neutrals) == 3
    # Targets are the parameters on that face: zero jaw -> zero displacement.
    known = [crop_px_to_norm(n, SIZE) for n in faces.neutral]
    for i in range(len(b.neutral)):
        assert any(np.allclose(b.neutral[i].numpy(), k, atol=1e-5) for k in known)
    assert b.target.abs().max() > 0.005


def test_one_training_step_on_several_identities(talking: TalkingFaces) -> None:
    arch = {**DENOISER_ARCH, "image_size": SIZE}
    torch.manual_seed(0)
    net = TalkFormerDenoiser(DenoiserConfig.from_dict({**DenoiserConfig().to_dict(), **arch}))
    assert net.cfg.pixel_warp
    task = DiffusionTask(net, NoiseSchedule(SamplerConfig()), TeacherStageConfig())
    b = talking.frame_batch(np.random.default_rng(0), 6)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn(b.x0.shape, generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = task(b.x0, b.landmarks, b.refs, b.ref_index, t, noise)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_pixel_warp_output_starts_as_the_photo() -> None:
    """At init the denoiser's output is (mostly) the reference photo, whatever the noise."""
    cfg = dataclasses.replace(
        DenoiserConfig(),
        image_size=SIZE,
        widths=(8, 16, 32),
        norm_groups=4,
        heads=2,
        token_dim=16,
        time_dim=16,
        flow_hidden=8,
    )
    torch.manual_seed(0)
    net = TalkFormerDenoiser(cfg).eval()
    crop, neutral = default_crop(SIZE)
    ref_img = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        ref = net.encode_reference(ref_img)
        out = net(
            torch.randn(2, 3, SIZE, SIZE),
            torch.tensor([999, 999]),
            torch.from_numpy(crop_px_to_norm(neutral, SIZE))[None].expand(2, -1, -1),
            ref,
        )
    err = (out - ref_img).abs().mean()
    assert err < 0.1
