"""Kernel ops: pure-torch references against explicit math, custom ops against references."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import talkstream.kernels as kernels
from talkstream.kernels import (
    landmark_attention,
    landmark_attention_op,
    landmark_attention_reference,
    reference_kernels,
    reference_kernels_enabled,
    warp_blend,
    warp_blend_op,
    warp_blend_reference,
)
from talkstream.kernels.warp import base_grid

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _attention_inputs(
    b: int, h: int, n: int, m: int, d: int, dv: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, m, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, m, dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _attention_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Softmax written out (max-shifted exp over sum), in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("bhnm,bhmv->bhnv", weights, v)


def _warp_inputs(b: int, c: int, h: int, w: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    ref = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    flow = 0.3 * torch.randn(b, 2, h, w, generator=g, dtype=torch.float64)
    mask = torch.rand(b, 1, h, w, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (x, ref, flow, mask))


# --- landmark attention ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1, 1, 1), (2, 3, 37, 11, 7, 5), (3, 2, 129, 68, 16, 16)]
)
def test_attention_reference_matches_explicit_math_fp64(shape):
    b, h, n, m, d, dv = shape
    q, k, v = _attention_inputs(b, h, n, m, d, dv, dtype=torch.float64)
    scale = d**-0.5
    out = landmark_attention_reference(q, k, v, scale)
    assert out.shape == (b, h, n, dv)
    torch.testing.assert_close(out, _attention_explicit(q, k, v, scale), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_attention_reference_low_precision_error(dtype):
    q, k, v = _attention_inputs(2, 3, 53, 68, 16, 16, dtype=dtype, seed=1)
    scale = 16**-0.5
    expected = _attention_explicit(q, k, v, scale)
    out = landmark_attention_reference(q, k, v, scale)
    assert out.dtype == dtype
    # Torch's own attention run entirely in this dtype is the yardstick; the reference computes in
    # fp32 and rounds once, so it must be at most about as wrong, plus a small absolute slack.
    naive = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v
    naive_err = (naive.double() - expected).abs().max().item()
    err = (out.double() - expected).abs().max().item()
    assert err <= 2 * naive_err + 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_custom_op_equals_reference(dtype):
    q, k, v = _attention_inputs(2, 4, 45, 68, 8, 8, dtype=dtype, seed=2)
    expected = landmark_attention_reference(q, k, v, 0.35)
    assert torch.equal(landmark_attention_op(q, k, v, 0.35), expected)
    assert torch.equal(torch.ops.talkstream.landmark_attention(q, k, v, 0.35), expected)
    assert torch.equal(landmark_attention(q, k, v, 0.35), expected)


def test_attention_gradients_match_numerical():
    q, k, v = (t.requires_grad_() for t in _attention_inputs(1, 2, 9, 5, 4, 3, torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: landmark_attention_op(a, b, c, 0.7), (q, k, v))


def test_attention_backward_low_precision_dtypes():
    q, k, v = (t.requires_grad_() for t in _attention_inputs(1, 2, 9, 5, 4, 3, torch.bfloat16))
    landmark_attention_op(q, k, v, 0.5).float().square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.dtype == torch.bfloat16
        assert torch.isfinite(t.grad).all()


def test_attention_opcheck():
    q, k, v = (t.requires_grad_() for t in _attention_inputs(2, 2, 13, 7, 4, 4, torch.float32))
    results = torch.library.opcheck(landmark_attention_op, (q, k, v, 0.5))
    assert set(results.values()) == {"SUCCESS"}


def test_attention_input_checks():
    q, k, v = _attention_inputs(2, 2, 13, 7, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="4-D"):
        landmark_attention(q[0], k, v, 0.5)
    with pytest.raises(ValueError, match="head dim"):
        landmark_attention(q, k[..., :3], v, 0.5)
    with pytest.raises(TypeError, match="dtype"):
        landmark_attention(q, k.double(), v, 0.5)
    with pytest.raises(ValueError, match="scale"):
        landmark_attention(q, k, v, 0.0)


# --- warp blend --------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(8, 16), (32, 32)])
def test_warp_zero_flow_full_mask_returns_ref_exactly(hw):
    # Power-of-two sizes: the pixel-centre grid (2i + 1) / W - 1 is exact in binary floating point,
    # so grid_sample lands exactly on the pixels.
    h, w = hw
    x, ref, _, _ = _warp_inputs(2, 3, h, w, dtype=torch.float32)
    out = warp_blend(x, ref, torch.zeros(2, 2, h, w), torch.ones(2, 1, h, w))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warp_zero_flow_full_mask_odd_sizes(dtype):
    # Odd sizes: the grid round-trips through float arithmetic, off by an ulp at most.
    x, ref, _, _ = _warp_inputs(2, 3, 9, 13, dtype=dtype)
    out = warp_blend(x, ref, torch.zeros_like(x[:, :2]), torch.ones_like(x[:, :1]))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)


def test_warp_zero_mask_returns_x_exactly():
    x, ref, flow, _ = _warp_inputs(2, 5, 9, 13, dtype=torch.float32)
    assert torch.equal(warp_blend(x, ref, flow, torch.zeros_like(x[:, :1])), x)


def test_base_grid_is_at_pixel_centres():
    grid = base_grid(4, 8, torch.float64, torch.device("cpu"))  # (1, 4, 8, 2)
    assert grid.shape == (1, 4, 8, 2)
    torch.testing.assert_close(grid[0, 0, :, 0], (torch.arange(8.0).double() + 0.5) / 8 * 2 - 1)
    torch.testing.assert_close(grid[0, :, 0, 1], (torch.arange(4.0).double() + 0.5) / 4 * 2 - 1)


@pytest.mark.parametrize("shift", [1, 3])
def test_warp_integer_pixel_shift_moves_content(shift):
    b, c, h, w = 1, 2, 8, 16
    _, ref, _, _ = _warp_inputs(b, c, h, w, dtype=torch.float32)
    ones = torch.ones(b, 1, h, w)
    # One pixel is 2 / W normalised units; sampling at x + s gives out[j] = ref[j + s].
    flow_x = torch.zeros(b, 2, h, w)
    flow_x[:, 0] = 2.0 * shift / w
    out = warp_blend(torch.zeros_like(ref), ref, flow_x, ones)
    assert torch.equal(out[..., : w - shift], ref[..., shift:])
    # Border padding: samples past the edge repeat the last column.
    assert torch.equal(out[..., w - shift :], ref[..., -1:].expand(-1, -1, -1, shift))

    flow_y = torch.zeros(b, 2, h, w)
    flow_y[:, 1] = -2.0 * shift / h
    out = warp_blend(torch.zeros_like(ref), ref, flow_y, ones)
    assert torch.equal(out[..., shift:, :], ref[..., : h - shift, :])
    assert torch.equal(out[..., :shift, :], ref[..., :1, :].expand(-1, -1, shift, -1))


def test_warp_custom_op_equals_reference():
    for dtype in (torch.float32, torch.bfloat16):
        args = _warp_inputs(2, 3, 11, 7, dtype=dtype, seed=3)
        expected = warp_blend_reference(*args)
        assert expected.dtype == dtype
        assert torch.equal(warp_blend_op(*args), expected)
        assert torch.equal(torch.ops.talkstream.warp_blend(*args), expected)


def test_warp_gradients_reach_every_input():
    args = [t.requires_grad_() for t in _warp_inputs(2, 3, 6, 10, dtype=torch.float32, seed=4)]
    weights = torch.randn(2, 3, 6, 10)
    (warp_blend(*args) * weights).sum().backward()
    for name, t in zip(("x", "ref", "flow", "mask"), args, strict=True):
        assert t.grad is not None, name
        assert t.grad.abs().sum() > 0, name


def test_warp_gradients_match_numerical():
    args = tuple(t.requires_grad_() for t in _warp_inputs(2, 2, 5, 7, dtype=torch.float64, seed=5))
    assert torch.autograd.gradcheck(warp_blend_op, args)


def test_warp_opcheck():
    args = tuple(t.requires_grad_() for t in _warp_inputs(2, 3, 6, 10, dtype=torch.float32))
    results = torch.library.opcheck(warp_blend_op, args)
    assert set(results.values()) == {"SUCCESS"}


def test_warp_input_checks():
    x, ref, flow, mask = _warp_inputs(2, 3, 6, 10, dtype=torch.float32)
    with pytest.raises(ValueError, match="flow"):
        warp_blend(x, ref, flow[:, :1], mask)
    with pytest.raises(ValueError, match="mask"):
        warp_blend(x, ref, flow, mask.expand(-1, 3, -1, -1))
    with pytest.raises(TypeError, match="dtype"):
        warp_blend(x, ref.double(), flow, mask)


# --- dispatch ----------------------------------------------------------------------------------


def _traced_targets(fn, *args) -> set[str]:
    gm = make_fx(fn)(*args)
    return {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}


def test_reference_kernels_context_switches_path():
    q, k, v = _attention_inputs(1, 2, 9, 5, 4, 4, torch.float32)
    wargs = _warp_inputs(1, 2, 4, 4, dtype=torch.float32)

    assert not reference_kernels_enabled()
    attn_ops = _traced_targets(lambda a, b, c: landmark_attention(a, b, c, 0.5), q, k, v)
    warp_ops = _traced_targets(warp_blend, *wargs)
    assert "talkstream.landmark_attention.default" in attn_ops
    assert "talkstream.warp_blend.default" in warp_ops

    with reference_kernels():
        assert reference_kernels_enabled()
        attn_ops = _traced_targets(lambda a, b, c: landmark_attention(a, b, c, 0.5), q, k, v)
        warp_ops = _traced_targets(warp_blend, *wargs)
    assert not reference_kernels_enabled()
    # Only standard aten ops: what ONNX export must see.
    assert all(not t.startswith("talkstream.") for t in attn_ops | warp_ops)
    assert "aten._softmax.default" in attn_ops
    assert "aten.grid_sampler_2d.default" in warp_ops


def test_reference_kernels_is_per_thread():
    seen: list[bool] = []
    with reference_kernels():
        worker = threading.Thread(target=lambda: seen.append(reference_kernels_enabled()))
        worker.start()
        worker.join()
    assert seen == [False]


def test_reference_kernels_spy_counts_calls(monkeypatch):
    calls: list[str] = []
    real = kernels.landmark_attention_op

    def spy(*args):
        calls.append("op")
        return real(*args)

    monkeypatch.setattr(kernels, "landmark_attention_op", spy)
    q, k, v = _attention_inputs(1, 1, 3, 2, 4, 4, torch.float32)
    landmark_attention(q, k, v, 0.5)
    with reference_kernels():
        landmark_attention(q, k, v, 0.5)
    assert calls == ["op"]


def test_torch_compile_keeps_custom_ops():
    captured: list[torch.fx.GraphModule] = []

    def backend(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    def fn(q, k, v, x, ref, flow, mask):
        return landmark_attention(q, k, v, 0.5).sum() + warp_blend(x, ref, flow, mask).sum()

    torch._dynamo.reset()
    args = (
        *_attention_inputs(1, 2, 9, 5, 4, 4, torch.float32),
        *_warp_inputs(1, 2, 4, 4, torch.float32),
    )
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    try:
        compiled(*args)
        # The mode is guarded: switching it recompiles into the reference decomposition.
        with reference_kernels():
            compiled(*args)
    finally:
        torch._dynamo.reset()
    assert len(captured) == 2
    assert "talkstream.landmark_attention" in captured[0].code
    assert "talkstream.warp_blend" in captured[0].code
    assert "talkstream" not in captured[1].code
    assert "grid_sample" in captured[1].code
