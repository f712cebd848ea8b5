"""TalkFormer denoiser: shapes, conditioning gradients, reference reuse, config round trip."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from talkstream.engine.denoiser import (
    PRESETS,
    DenoiserConfig,
    FeatureWarp,
    LandmarkTokens,
    ReferenceFeatures,
    TalkFormerDenoiser,
)
from talkstream.kernels import reference_kernels


def _inputs(cfg: DenoiserConfig, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    x_t = torch.randn(batch, 3, s, s, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    landmarks = torch.rand(batch, cfg.n_landmarks, 2, generator=g) * 1.6 - 0.8
    ref_image = torch.rand(1, 3, s, s, generator=g) * 2 - 1
    return x_t, t, landmarks, ref_image


@pytest.fixture(scope="module")
def tiny() -> TalkFormerDenoiser:
    torch.manual_seed(0)
    return TalkFormerDenoiser(DenoiserConfig.from_name("tiny")).eval()


def test_tiny_shapes_batch_2(tiny):
    x_t, t, lm, ref_image = _inputs(tiny.cfg, 2)
    with torch.inference_mode():
        ref = tiny.encode_reference(ref_image)
        out = tiny(x_t, t, lm, ref)
    p, s = tiny.cfg.patch, tiny.cfg.image_size
    assert out.shape == (2, 3, s, s) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert ref.patches.shape == (1, 3 * p * p, s // p, s // p)
    for lvl, (feat, width) in enumerate(zip(ref.levels, tiny.cfg.widths, strict=True)):
        side = s // p // 2**lvl
        assert feat.shape == (1, width, side, side)


def test_base_shapes_batch_1():
    cfg = DenoiserConfig.from_name("base")
    assert cfg.image_size == 256 and len(cfg.attn_levels) >= 2
    model = TalkFormerDenoiser(cfg).eval()
    x_t, t, lm, ref_image = _inputs(cfg, 1)
    with torch.inference_mode():
        out = model(x_t, t, lm, model.encode_reference(ref_image))
    assert out.shape == (1, 3, 256, 256)
    assert torch.isfinite(out).all()


def test_gradients_reach_landmark_coordinates():
    torch.manual_seed(1)
    model = TalkFormerDenoiser(DenoiserConfig.from_name("tiny")).train()
    x_t, t, lm, ref_image = _inputs(model.cfg, 2)
    lm.requires_grad_(True)
    ref = model.encode_reference(ref_image)
    out = model(x_t, t, lm, ref)
    (out * torch.randn_like(out)).sum().backward()
    assert lm.grad is not None
    assert torch.isfinite(lm.grad).all()
    # Every landmark of every frame influences the render.
    assert (lm.grad.abs().sum(-1) > 0).all()


def test_landmark_tokens_differentiable():
    tokens = LandmarkTokens(68, 32, n_freqs=5)
    lm = (torch.rand(3, 68, 2) * 2 - 1).requires_grad_()
    out = tokens(lm)
    assert out.shape == (3, 68, 32)
    out.square().sum().backward()
    assert lm.grad is not None and (lm.grad.abs() > 0).all()
    # Same coordinates at different landmark indices give different tokens (point embedding).
    same = tokens(torch.zeros(1, 68, 2))
    assert not torch.allclose(same[0, 0], same[0, 1])


def test_feature_warp_starts_with_zero_flow():
    warp = FeatureWarp(8, hidden=4, flow_limit=0.25)
    x, ref = torch.randn(2, 8, 6, 10), torch.randn(2, 8, 6, 10)
    # Zero flow samples the reference in place (up to grid rounding); mask starts at 0.5.
    torch.testing.assert_close(warp(x, ref), 0.5 * x + 0.5 * ref, rtol=0, atol=1e-5)


def test_reference_features_broadcast_from_batch_1(tiny):
    x_t, t, lm, ref_image = _inputs(tiny.cfg, 3)
    with torch.inference_mode():
        ref1 = tiny.encode_reference(ref_image)  # batch 1
        ref3 = tiny.encode_reference(ref_image.expand(3, -1, -1, -1))  # batch 3
        out1 = tiny(x_t, t, lm, ref1)
        out3 = tiny(x_t, t, lm, ref3)
    torch.testing.assert_close(out1, out3, rtol=1e-5, atol=1e-5)


def test_reference_batch_must_be_1_or_b(tiny):
    x_t, t, lm, ref_image = _inputs(tiny.cfg, 3)
    ref2 = tiny.encode_reference(ref_image.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="reference batch"):
        tiny(x_t, t, lm, ref2)


def test_forward_reuses_reference_features(tiny, monkeypatch):
    x_t, t, lm, ref_image = _inputs(tiny.cfg, 2)
    with torch.inference_mode():
        ref = tiny.encode_reference(ref_image)
        expected = tiny(x_t, t, lm, ref)

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference encoder ran during forward")

    monkeypatch.setattr(tiny, "encode_reference", forbidden)
    handle = tiny.ref_stem.register_forward_hook(forbidden)
    try:
        with torch.inference_mode():
            out = tiny(x_t, t, lm, ref)
    finally:
        handle.remove()
    assert torch.equal(out, expected)


def test_eval_output_is_deterministic(tiny):
    x_t, t, lm, ref_image = _inputs(tiny.cfg, 2, seed=3)
    with torch.inference_mode():
        ref = tiny.encode_reference(ref_image)
        a = tiny(x_t, t, lm, ref)
        b = tiny(x_t, t, lm, ref)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_triton_kernels_match_the_references_in_the_model(tiny):
    # On CPU the custom ops run the pure-torch references with or without reference_kernels(),
    # so a comparison there cannot fail; the kernels themselves are compared with the
    # references on CPU under Triton's interpreter in tests/test_kernels_triton.py. Here: the
    # whole model on a GPU, the Triton kernels against the references.
    from talkstream.kernels import kernel_implementation

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (on CPU both sides run the same reference code)")
    if kernel_implementation("cuda") != "triton":
        pytest.skip("needs Triton (the gpu extra) for the fused kernels")
    model = copy.deepcopy(tiny).cuda()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # zero-initialised heads would make flow and attention trivial
        for prm in model.parameters():
            prm.add_(torch.randn(prm.shape, generator=g).cuda() * 0.05)
    x_t, t, lm, ref_image = (v.cuda() for v in _inputs(tiny.cfg, 2, seed=4))
    with torch.inference_mode():
        ref = model.encode_reference(ref_image)
        a = model(x_t, t, lm, ref)
        with reference_kernels():
            b = model(x_t, t, lm, ref)
            moved = model(x_t, t, lm + 0.1, ref)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # The landmarks reach the output through the two kernels: the check is not vacuous.
    assert (moved - b).abs().max() > 1e-3


def test_forward_traces_as_one_graph(tiny):
    # fullgraph=True fails on any graph break, e.g. a host sync (.item()) or data-dependent Python
    # control flow in forward; the kernels must appear as their custom ops.
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x_t, t, lm, ref_image = _inputs(tiny.cfg, 1)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            ref = tiny.encode_reference(ref_image)
            torch.compile(tiny, backend=backend, fullgraph=True)(x_t, t, lm, ref)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    code = graphs[0].code
    assert "talkstream.landmark_attention" in code and "talkstream.warp_blend" in code


def test_input_shape_errors(tiny):
    x_t, t, lm, ref_image = _inputs(tiny.cfg, 2)
    ref = tiny.encode_reference(ref_image)
    with pytest.raises(ValueError, match="landmarks"):
        tiny(x_t, t, lm[:, :60], ref)
    with pytest.raises(ValueError, match="x_t"):
        tiny(x_t[..., :64, :64], t, lm, ref)
    with pytest.raises(ValueError, match="t must"):
        tiny(x_t, t[:1], lm, ref)
    with pytest.raises(ValueError, match="levels"):
        tiny(x_t, t, lm, ReferenceFeatures(ref.patches, ref.levels[:1]))


def test_from_name_unknown_lists_presets():
    with pytest.raises(ValueError, match="base, tiny"):
        DenoiserConfig.from_name("huge")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_dict_round_trip(name):
    cfg = DenoiserConfig.from_name(name)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert DenoiserConfig.from_dict(data) == cfg


def test_config_from_dict_rejects_unknown_keys():
    data = DenoiserConfig().to_dict()
    data["widths_typo"] = [1, 2]
    with pytest.raises(ValueError, match="widths_typo"):
        DenoiserConfig.from_dict(data)


@pytest.mark.parametrize(
    "change",
    [
        {"blocks": (1, 1)},
        {"attn_levels": (3,)},
        {"image_size": 100},
        {"heads": 5},
    ],
)
def test_config_validation(change):
    with pytest.raises(ValueError):
        dataclasses.replace(DenoiserConfig(), **change)


def test_architecture_invariants_of_presets():
    for cfg in PRESETS.values():
        # Cross-attention at two levels or more; warping at every level (one FeatureWarp each).
        assert len(cfg.attn_levels) >= 2
        model = TalkFormerDenoiser(cfg)
        assert len(model.warps) == len(cfg.widths)
