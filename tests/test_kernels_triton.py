"""Triton kernels against their pure-torch references.

On CPU the kernels run under Triton's interpreter, which is chosen when ``@triton.jit`` runs, i.e.
when ``talkstream.kernels`` is first imported; this pytest process imported it long before (the
conftest), without the interpreter. So the interpreter cases run in one child process started with
``TRITON_INTERPRET=1`` (this module's ``_worker``) and report one JSON record per case; each case
is then one test here. Shapes are tiny and odd: the interpreter is ~10^4 times slower than torch.

Every run draws fresh inputs (the seed is printed in a failure), writes into a NaN-filled output
that sits inside a larger NaN-filled buffer, and checks that every output element was written
and nothing around it was. The error budget follows flash-attention's tests: at most twice the
error of torch computing the op natively in the same low precision, against an fp64 reference,
plus a small absolute tolerance.

GPU tests at real sizes are marked ``gpu`` and skip without CUDA.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from talkstream.kernels import (
    TRITON_AVAILABLE,
    kernel_implementation,
    landmark_attention_reference,
    landmark_attention_triton,
    warp_blend_reference,
    warp_blend_triton,
)
from talkstream.kernels.warp import base_grid

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Absolute floor of the error budget per dtype: about one output ulp at magnitude 1.
ATOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}

# (name, (B, H, N, M, D, Dv), kernel kwargs, q transposed view?)
ATTENTION_CASES: list[tuple[str, tuple[int, ...], dict[str, Any], bool]] = [
    ("odd", (2, 3, 37, 11, 7, 5), {"block_n": 16}, False),
    ("landmarks68", (1, 2, 45, 68, 16, 16), {"block_n": 32}, True),  # one pass over 68 keys
    ("key_blocks", (1, 1, 33, 37, 12, 9), {"block_n": 16, "block_m": 16}, False),  # online
    ("single", (1, 1, 1, 1, 1, 1), {"block_n": 16}, False),
]
# (name, (B, C, H, W), kernel kwargs, flow scale, layout) with layout "expand" (batch-1 ref
# expanded, stride 0: what the model passes), "contiguous" or "channels_last".
WARP_CASES: list[tuple[str, tuple[int, ...], dict[str, Any], float, str]] = [
    ("odd_expand", (2, 5, 7, 9), {"block_p": 16, "block_c": 4}, 0.3, "expand"),
    ("channel_tail", (1, 19, 4, 3), {"block_p": 8, "block_c": 8}, 0.3, "contiguous"),
    ("border_clamp", (1, 3, 6, 5), {"block_p": 16, "block_c": 2}, 1.5, "contiguous"),
    ("channels_last", (2, 6, 5, 3), {"block_p": 16, "block_c": 4}, 0.3, "channels_last"),
    ("one_pixel", (1, 3, 1, 1), {"block_p": 4, "block_c": 4}, 0.3, "contiguous"),
]

needs_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs the triton package")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --- inputs and error budgets (used by the interpreter worker and the GPU tests) ---------------


def _attention_inputs(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    transposed_q: bool,
    gen: torch.Generator,
    device: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, n, m, d, dv = shape
    if transposed_q:  # the model's q: a (B, nh, dh, N) tensor seen as (B, nh, N, dh)
        q = torch.randn(b, h, d, n, generator=gen, dtype=torch.float64).transpose(-1, -2)
    else:
        q = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, h, m, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, h, m, dv, generator=gen, dtype=torch.float64)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _attention_budget(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dtype_name: str
) -> tuple[torch.Tensor, float]:
    """(fp64 reference, allowed max error) for low-precision inputs q, k, v."""
    exact = landmark_attention_reference(q.double(), k.double(), v.double(), scale)
    if q.dtype == torch.float32:
        native = landmark_attention_reference(q, k, v, scale)
    else:  # torch at the same low precision: every op in q.dtype
        native = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v
    torch_err = (native.double() - exact).abs().max().item()
    return exact, 2 * torch_err + ATOL[dtype_name]


def _warp_inputs(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    flow_scale: float,
    layout: str,
    gen: torch.Generator,
    device: str,
) -> tuple[torch.Tensor, ...]:
    b, c, h, w = shape
    x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    ref = torch.randn(1 if layout == "expand" else b, c, h, w, generator=gen, dtype=torch.float64)
    flow = flow_scale * torch.randn(b, 2, h, w, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, 1, h, w, generator=gen, dtype=torch.float64)
    x, ref, flow, mask = (t.to(device, dtype) for t in (x, ref, flow, mask))
    if layout == "expand":
        ref = ref.expand(b, -1, -1, -1)  # batch stride 0
    elif layout == "channels_last":
        x, ref, flow, mask = (t.to(memory_format=torch.channels_last) for t in (x, ref, flow, mask))
    return x, ref, flow, mask


def _warp_budget(
    x: torch.Tensor, ref: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor, dtype_name: str
) -> tuple[torch.Tensor, float]:
    exact = warp_blend_reference(x.double(), ref.double(), flow.double(), mask.double())
    if x.dtype == torch.float32:
        native = warp_blend_reference(x, ref, flow, mask)
    else:  # grid_sample and the blend natively in the low precision
        _, _, h, w = x.shape
        grid = base_grid(h, w, x.dtype, x.device) + flow.permute(0, 2, 3, 1)
        warped = F.grid_sample(ref, grid, padding_mode="border", align_corners=False)
        native = (1 - mask) * x + mask * warped
    torch_err = (native.double() - exact).abs().max().item()
    return exact, 2 * torch_err + ATOL[dtype_name]


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: str, guard: int = 3):
    """A NaN-filled output view inside a NaN-filled buffer with ``guard`` extra rows/cols.

    The view is non-contiguous (the kernels take any output strides), and the guard band shows
    any write outside the output.
    """
    big = torch.full(
        (*shape[:-2], shape[-2] + guard, shape[-1] + guard),
        float("nan"),
        dtype=dtype,
        device=device,
    )
    return big, big[..., : shape[-2], : shape[-1]]


def _check_written(big: torch.Tensor, out: torch.Tensor) -> dict[str, int]:
    inside = int(torch.isnan(out).sum())
    outside = int((~torch.isnan(big)).sum()) - (out.numel() - inside)
    return {"unwritten": inside, "written_outside": outside}


def _run_cases(seed: int, device: str) -> dict[str, dict[str, Any]]:
    """Every case at every dtype; one JSON-able record per case."""
    gen = torch.Generator().manual_seed(seed)
    results: dict[str, dict[str, Any]] = {}
    for dname, dtype in DTYPES.items():
        for name, shape, kw, transposed in ATTENTION_CASES:
            q, k, v = _attention_inputs(shape, dtype, transposed, gen, device)
            scale = shape[4] ** -0.5
            big, out = _poisoned((*shape[:3], shape[5]), dtype, device)
            got = landmark_attention_triton(q, k, v, scale, out=out, **kw)
            exact, budget = _attention_budget(q, k, v, scale, dname)
            err = (out.double() - exact).abs().nan_to_num(nan=math.inf).max().item()
            results[f"attention-{name}-{dname}"] = {
                "err": err,
                "budget": budget,
                "returned_out": got is out,
                **_check_written(big, out),
            }
        for name, shape, kw, flow_scale, layout in WARP_CASES:
            x, ref, flow, mask = _warp_inputs(shape, dtype, flow_scale, layout, gen, device)
            big, out = _poisoned(shape, dtype, device)
            got = warp_blend_triton(x, ref, flow, mask, out=out, **kw)
            exact, budget = _warp_budget(x, ref, flow, mask, dname)
            err = (out.double() - exact).abs().nan_to_num(nan=math.inf).max().item()
            # Without out=, the result keeps x's memory layout (the op's fake promises it).
            layout_kept = warp_blend_triton(x, ref, flow, mask, **kw).stride() == x.stride()
            results[f"warp-{name}-{dname}"] = {
                "err": err,
                "budget": budget,
                "returned_out": got is out,
                "layout_kept": layout_kept,
                **_check_written(big, out),
            }
    return results


def _worker() -> None:
    """Entry point of the interpreter child process: ``argv[1]`` is the seed."""
    torch.set_num_threads(1)  # the interpreter is single-threaded numpy; leave cores to others
    print(json.dumps(_run_cases(int(sys.argv[1]), "cpu")))


# --- the interpreter run (one child process for all cases) --------------------------------------


@pytest.fixture(scope="module")
def interpreter_results() -> tuple[int, dict[str, dict[str, Any]]]:
    if not TRITON_AVAILABLE:
        pytest.skip("needs the triton package (pip install 'talkstream[gpu]') for its interpreter")
    seed = random.SystemRandom().randrange(2**31)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tests.test_kernels_triton import _worker; _worker()",
            str(seed),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker failed (seed {seed}):\n{proc.stderr[-4000:]}")
    return seed, json.loads(proc.stdout.strip().splitlines()[-1])


CASE_IDS = [f"attention-{c[0]}-{d}" for d in DTYPES for c in ATTENTION_CASES] + [
    f"warp-{c[0]}-{d}" for d in DTYPES for c in WARP_CASES
]


@needs_triton
@pytest.mark.parametrize("case", CASE_IDS)
def test_kernel_matches_reference_in_interpreter(
    interpreter_results: tuple[int, dict[str, dict[str, Any]]], case: str
) -> None:
    seed, results = interpreter_results
    r = results[case]
    where = f"{case} (seed {seed}): {r}"
    assert r["returned_out"], where
    assert r["unwritten"] == 0, f"output elements left unwritten: {where}"
    assert r["written_outside"] == 0, f"writes outside the output: {where}"
    assert r["err"] <= r["budget"], f"error above budget: {where}"
    if "layout_kept" in r:
        assert r["layout_kept"], where


# --- wrapper checks (no kernel launch) ----------------------------------------------------------


@needs_triton
def test_wrappers_reject_cpu_tensors_outside_interpreter() -> None:
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="CUDA"):
        landmark_attention_triton(q, q, q, 0.5)
    x = torch.randn(1, 2, 3, 3)
    flow, mask = torch.zeros(1, 2, 3, 3), torch.ones(1, 1, 3, 3)
    with pytest.raises(ValueError, match="CUDA"):
        warp_blend_triton(x, x, flow, mask)


@needs_triton
def test_wrappers_reject_unsupported_dtypes_and_blocks() -> None:
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        landmark_attention_triton(q, q, q, 0.5)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        warp_blend_triton(x, x, x[:, :2], x[:, :1])
    with pytest.raises(ValueError, match="must be 4-D"):
        landmark_attention_triton(torch.randn(1, 4, 8), q, q, 0.5)


def test_kernel_implementation_by_device() -> None:
    assert kernel_implementation("cpu") == "reference"
    assert kernel_implementation("cuda:0") == ("triton" if TRITON_AVAILABLE else "reference")


# --- real sizes on a GPU ------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_attention_kernel_real_sizes_gpu(dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    # base preset, level 1 at batch 8: 32x32 tokens, 8 heads of 32, the 68 landmarks.
    for shape in [(8, 8, 1024, 68, 32, 32), (8, 8, 256, 68, 48, 48), (3, 5, 1000, 67, 24, 40)]:
        q, k, v = _attention_inputs(shape, dtype, True, gen, "cuda")
        big, out = _poisoned((*shape[:3], shape[5]), dtype, "cuda")
        landmark_attention_triton(q, k, v, shape[4] ** -0.5, out=out)
        exact, budget = _attention_budget(q, k, v, shape[4] ** -0.5, dtype_name)
        assert _check_written(big, out) == {"unwritten": 0, "written_outside": 0}
        err = (out.double() - exact).abs().max().item()
        assert err <= budget, (shape, err, budget)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_warp_kernel_real_sizes_gpu(dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    for shape, layout in [((8, 128, 64, 64), "expand"), ((5, 257, 33, 17), "contiguous")]:
        x, ref, flow, mask = _warp_inputs(shape, dtype, 0.3, layout, gen, "cuda")
        big, out = _poisoned(shape, dtype, "cuda")
        warp_blend_triton(x, ref, flow, mask, out=out)
        exact, budget = _warp_budget(x, ref, flow, mask, dtype_name)
        assert _check_written(big, out) == {"unwritten": 0, "written_outside": 0}
        err = (out.double() - exact).abs().max().item()
        assert err <= budget, (shape, err, budget)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_custom_ops_dispatch_to_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import talkstream.kernels.attention as attention
    import talkstream.kernels.warp as warp

    calls: list[str] = []
    orig_a, orig_w = attention.landmark_attention_triton, warp.warp_blend_triton

    def spy_a(*a: Any, **kw: Any) -> torch.Tensor:
        calls.append("attention")
        return orig_a(*a, **kw)

    def spy_w(*a: Any, **kw: Any) -> torch.Tensor:
        calls.append("warp")
        return orig_w(*a, **kw)

    monkeypatch.setattr(attention, "landmark_attention_triton", spy_a)
    monkeypatch.setattr(warp, "warp_blend_triton", spy_w)
    q = torch.randn(1, 2, 40, 16, device="cuda")
    k = torch.randn(1, 2, 68, 16, device="cuda")
    attention.landmark_attention_op(q, k, k, 0.25)
    x = torch.randn(1, 4, 8, 8, device="cuda")
    warp.warp_blend_op(x, x, torch.zeros(1, 2, 8, 8, device="cuda"), x[:, :1].sigmoid())
    assert calls == ["attention", "warp"]
