"""Backends: parity with eager for each backend that runs here, auto selection, clear errors.

Parity runs on micro networks (a 32 px denoiser, a one-layer motion model): every op type of the
real ones, at a fraction of the export and compile time. The engine test runs the real tiny
preset through onnxruntime. TensorRT cannot be installed here (NVIDIA's index only): its run
tests skip with that reason; its profiles, cache key and plugin descriptors are checked anyway.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from talkstream.config import AudioConfig, AvatarConfig, EngineConfig, SamplerConfig
from talkstream.engine.avatar import Avatar, default_image, default_landmarks, prepare_avatar
from talkstream.engine.checkpoint import Models
from talkstream.engine.denoiser import DenoiserConfig, ReferenceFeatures, TalkFormerDenoiser
from talkstream.engine.motion import AudioToMotion, MotionConfig
from talkstream.engine.pipeline import Engine
from talkstream.engine.sampler import FewStepSampler
from talkstream.errors import MissingDependencyError
from talkstream.export.backends import (
    PREFERENCE,
    backend_names,
    get_backend,
    load_backend,
    select_backend,
)
from talkstream.export.common import bucket, pad_batch
from talkstream.runtime import load_engine
from tests.conftest import speechlike

HAS_ORT = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxscript"))
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="needs the export extra (onnxruntime)")
needs_trt_gpu = pytest.mark.skipif(
    not (HAS_TRT and torch.cuda.is_available()),
    reason="needs the tensorrt package (NVIDIA's index only, not installable here) and a CUDA GPU",
)

MICRO_DENOISER = DenoiserConfig(
    image_size=32,
    patch=4,
    widths=(8, 16),
    blocks=(1, 1),
    attn_levels=(1,),
    heads=2,
    token_dim=8,
    n_fourier_freqs=2,
    time_dim=8,
    flow_hidden=4,
    norm_groups=4,
    ref_blocks=1,
)
MICRO_MOTION = MotionConfig(d_model=16, n_layers=1, n_heads=2, context_frames=2)


def micro_models(seed: int = 0) -> Models:
    torch.manual_seed(seed)
    return Models(
        motion=AudioToMotion(MICRO_MOTION).eval(),
        denoiser=TalkFormerDenoiser(MICRO_DENOISER).eval(),
        audio=AudioConfig(),
        sampler=SamplerConfig(),
        preset="micro",
        meta={"random_init": True},
    )


def live_micro_models() -> Models:
    """``micro_models`` whose every denoiser weight has a value: zero-initialised heads would
    make the flows and the pixel warp trivial (sampling in place), so a backend that got them
    wrong would still match eager."""
    models = micro_models()
    with torch.no_grad():
        for p in models.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return models


@pytest.fixture(scope="module")
def micro() -> Models:
    return live_micro_models()


@pytest.fixture(scope="module")
def micro_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact cache for the micro graphs of this module: exported once (the first
    onnxruntime test), then found by the others."""
    return tmp_path_factory.mktemp("micro-cache")


def _inputs(models: Models, batch: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    mc, dc = models.motion.cfg, models.denoiser.cfg
    s = dc.image_size
    with torch.no_grad():
        ref = models.denoiser.encode_reference(torch.rand(1, 3, s, s, generator=g) * 2 - 1)
    return {
        "windows": torch.randn(batch, mc.window, mc.mel_rows, mc.n_mels, generator=g) * 3 - 6,
        "neutral": torch.rand(batch, 68, 2, generator=g) - 0.5,
        "x_t": torch.randn(batch, 3, s, s, generator=g),
        "t": torch.randint(0, 1000, (batch,), generator=g),
        "landmarks": torch.rand(batch, 68, 2, generator=g) - 0.5,
        "ref": ref,
    }


# --- parity ------------------------------------------------------------------------------------


def test_torch_backend_is_the_eager_modules(micro: Models) -> None:
    # Running the same module twice on the same inputs cannot differ, so no parity check here:
    # the backend must hold the very modules (no copy, no wrapper), in eval mode.
    loaded = get_backend("torch").load(micro, "cpu")
    assert loaded.motion_module is micro.motion  # type: ignore[attr-defined]
    assert loaded.denoiser_module is micro.denoiser  # type: ignore[attr-defined]
    assert not micro.motion.training and not micro.denoiser.training
    # bfloat16 converts the denoiser (a different module state), and says so.
    bf16 = get_backend("torch").load(micro_models(), "cpu", dtype="bfloat16")
    assert next(bf16.denoiser_module.parameters()).dtype == torch.bfloat16  # type: ignore[attr-defined]
    assert "bfloat16" in bf16.describe()


@needs_ort
def test_onnxruntime_matches_eager(micro: Models, micro_cache: Path) -> None:
    sampler = FewStepSampler.from_config(SamplerConfig(steps=2))  # the loop graph, two steps
    said: list[str] = []
    loaded = get_backend("onnxruntime").load(
        micro,
        "cpu",
        cache_dir=micro_cache,
        sampler=sampler,
        lookaheads=(0, 2),
        progress=said.append,
    )
    assert any("exporting motion_la0" in m for m in said)
    try:
        for batch in (1, 3):  # the batch axis is dynamic
            x = _inputs(micro, batch, seed=batch)
            with torch.inference_mode():
                for la in (0, 2):
                    got = loaded.motion(x["windows"], x["neutral"], la)
                    want = micro.motion(x["windows"], x["neutral"], la)
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
                got = loaded.denoiser(x["x_t"], x["t"], x["landmarks"], x["ref"])
                want = micro.denoiser(x["x_t"], x["t"], x["landmarks"], x["ref"])
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
                got = loaded.sample(sampler, x["x_t"], x["landmarks"], x["ref"])
                want = sampler.sample(
                    micro.denoiser, x["x_t"], landmarks=x["landmarks"], ref=x["ref"]
                )
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        assert got.dtype == torch.float32 and got.shape == (3, 3, 32, 32)
        with pytest.raises(ValueError, match="lookahead"):
            loaded.motion(x["windows"], x["neutral"], 7)
        per_frame = ReferenceFeatures(
            x["ref"].patches.expand(3, -1, -1, -1),
            tuple(r.expand(3, -1, -1, -1) for r in x["ref"].levels),
        )
        with pytest.raises(ValueError, match="batch 1"):
            loaded.denoiser(x["x_t"], x["t"], x["landmarks"], per_frame)
    finally:
        loaded.close()
    # A second load of the same models finds every graph in the cache.
    said.clear()
    again = get_backend("onnxruntime").load(
        micro,
        "cpu",
        cache_dir=micro_cache,
        sampler=sampler,
        lookaheads=(0, 2),
        progress=said.append,
    )
    again.close()
    assert said and all(m.startswith("cached") for m in said)


def test_onnxruntime_spinning_policies(micro: Models, micro_cache: Path) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (extra: export)")
    x = _inputs(micro, 2, seed=5)
    outs = []
    # What each policy sets in every session (onnxruntime's config keys; None: not set).
    allow_and_stop = {"run": ("1", "1"), "off": ("0", None), "on": ("1", None)}

    def entry(opts: Any, key: str) -> str | None:
        try:
            return str(opts.get_session_config_entry(key))
        except RuntimeError:  # onnxruntime: "does not have configuration with key"
            return None

    for spin, want in allow_and_stop.items():
        loaded = get_backend("onnxruntime").load(
            micro, "cpu", cache_dir=micro_cache, ort_spinning=spin
        )
        try:
            with torch.inference_mode():
                outs.append(loaded.denoiser(x["x_t"], x["t"], x["landmarks"], x["ref"]))
            sessions = [sess for sess, _ in loaded._sessions.values()]  # type: ignore[attr-defined]
            assert len(sessions) == 2  # the motion graph's and the denoiser step's
            for sess in sessions:
                opts = sess.get_session_options()
                got = (
                    entry(opts, "session.intra_op.allow_spinning"),
                    entry(opts, "session.force_spinning_stop"),
                )
                assert got == want, (spin, got)
        finally:
            loaded.close()
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="ort_spinning"):
        get_backend("onnxruntime").load(micro, "cpu", cache_dir=micro_cache, ort_spinning="fast")


def test_compiled_backend_matches_eager_on_cpu(micro: Models) -> None:
    ok, why = get_backend("compiled").available("cpu")
    if not ok:
        pytest.skip(why)
    # One compile only (CPU compiles take long): the one-step loop at batch 3, padded to the
    # batch-4 bucket, checks padding, slicing and the compiled loop at once.
    sampler = FewStepSampler.from_config(SamplerConfig(steps=1))
    loaded = get_backend("compiled").load(micro, "cpu")
    x = _inputs(micro, 3, seed=5)
    with torch.inference_mode():
        got = loaded.sample(sampler, x["x_t"], x["landmarks"], x["ref"])
        want = sampler.sample(micro.denoiser, x["x_t"], landmarks=x["landmarks"], ref=x["ref"])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert "compiled" in loaded.describe()


def test_batch_buckets() -> None:
    assert [bucket(n, 8) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]
    t = torch.arange(6.0).view(3, 2)
    padded = pad_batch(t, 4)
    assert padded.shape == (4, 2) and torch.equal(padded[3], t[2])


@needs_ort
def test_engine_renders_the_same_frames_with_onnxruntime(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # The shipped tiny model end to end: Engine -> backend.motion / backend.sample ->
    # paste-back. Trained weights, so the warps sample off the pixel grid (at random init every
    # flow is zero and the output is mostly the photo, whatever the backend does).
    avatar = prepare_avatar(default_image(), AvatarConfig(), landmarks=default_landmarks())
    audio = speechlike(6000)
    # The export tests' cache: same weights and versions, so the graphs are found there.
    shared = tmp_path_factory.getbasetemp() / "talkstream-shared-cache"
    frames = {}
    for name in ("torch", "onnxruntime"):
        cfg = EngineConfig(backend=name, avatar=AvatarConfig(cache_dir=shared))
        with load_engine(cfg) as eng:
            assert not eng.models.meta.get("random_init"), "the shipped checkpoint is missing"
            assert eng.backend.name == name
            frames[name] = _render(eng, avatar, audio)
    assert len(frames["torch"]) == len(frames["onnxruntime"]) == 10
    for a, b in zip(frames["torch"], frames["onnxruntime"], strict=True):
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-5)
        assert np.abs(a.image.astype(int) - b.image).max() <= 1


def _render(eng: Engine, avatar: Avatar, audio: np.ndarray) -> list[Any]:
    s = eng.session(avatar, seed=3)
    s.push_audio(audio, 16000)
    s.end_audio()
    out = []
    while s.has_ready():
        out += s.render_ready()
    return out


def test_engine_config_backend_defaults_to_torch(tiny_engine: Engine) -> None:
    assert EngineConfig().backend == "torch"
    assert tiny_engine.backend.name == "torch"


def test_the_config_reaches_the_backend(micro: Models, tmp_path: Path) -> None:
    # load_engine builds the backend's options from the config alone (LoadOptions.from_config):
    # the coalescing limit, the TensorRT precision, the cache and the sampler all arrive.
    from talkstream.engine.runtime import LoadOptions

    cfg = EngineConfig(
        max_batch_frames=12,
        tensorrt_precision="fp32",
        lookahead_frames=1,
        warmup=False,
        avatar=AvatarConfig(cache_dir=tmp_path),
    )
    with load_engine(cfg, micro, ort_spinning="off") as eng:
        opts = eng.backend.options
        assert (opts.max_batch, opts.precision, opts.cache_dir) == (12, "fp32", tmp_path)
        assert opts.lookaheads == (1,) and opts.ort_spinning == "off"
        assert opts.sampler is not None and opts.sampler.timesteps == eng.sampler.timesteps
    with pytest.raises(ValueError, match="precision"):
        LoadOptions.from_config(cfg, precision="int8")
    # An engine refuses a runtime loaded for another device or dtype than its config's.
    runtime = get_backend("torch").load(micro, options=LoadOptions.from_config(cfg))
    with pytest.raises(ValueError, match=r"LoadOptions\.from_config"):
        Engine(dataclasses.replace(cfg, dtype="bfloat16"), runtime)


# --- selection and errors -------------------------------------------------------------------------


def test_backend_names_and_cli_choices_agree() -> None:
    from talkstream.cli import build_parser

    assert backend_names() == ("auto", "torch", "compiled", "onnxruntime", "tensorrt")
    parser = build_parser()
    args = parser.parse_args(["render", "--backend", "onnxruntime"])
    from talkstream.cli import _engine_config

    assert _engine_config(args).backend == "onnxruntime"
    with pytest.raises(SystemExit):
        parser.parse_args(["render", "--backend", "fast"])
    sub = next(a for a in parser._actions if a.dest == "command")
    render = sub.choices["render"]  # type: ignore[index]
    flag = next(a for a in render._actions if a.dest == "engine_backend")
    assert tuple(sorted(flag.choices)) == tuple(sorted(backend_names()))


def test_auto_picks_the_first_available_in_preference_order() -> None:
    sel = select_backend("cpu", "float32")
    if HAS_ORT:
        assert sel.name == "onnxruntime" and "fastest" in sel.reason and sel.skipped == ()
    else:
        assert sel.name == "torch" and sel.skipped[0][0] == "onnxruntime"
    assert PREFERENCE["cpu"][-1] == "torch" and PREFERENCE["cuda"][0] == "tensorrt"
    # bfloat16: onnxruntime runs float32 graphs only, so auto says so and falls back to eager.
    sel = select_backend("cpu", "bfloat16")
    assert sel.name == "torch"
    assert dict(sel.skipped)["onnxruntime"].startswith(("the onnxruntime backend runs", "ONNX"))
    assert "skipped onnxruntime" in sel.explain()


def test_auto_skips_a_backend_whose_library_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import onnxruntime` raise ImportError, as if absent.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    sel = select_backend("cpu")
    assert sel.name == "torch"
    why = dict(sel.skipped)["onnxruntime"]
    assert "onnxruntime" in why and "pip install 'talkstream[export]'" in why


def test_missing_library_raises_missing_dependency_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, micro: Models
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # importing it raises ImportError
    with pytest.raises(MissingDependencyError) as info:
        load_backend("onnxruntime", micro, "cpu")
    assert info.value.extra == "export" and info.value.module == "onnxruntime"
    assert "talkstream[export]" in str(info.value)


def test_unknown_backend_and_bad_device_are_value_errors(micro: Models) -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*auto, torch"):
        load_backend("fast", micro)
    with pytest.raises(ValueError, match="TensorRT needs a CUDA device"):
        load_backend("tensorrt", micro, "cpu")
    if not torch.cuda.is_available():
        ok, why = get_backend("torch").available("cuda")
        assert not ok and "no CUDA" in why


def test_tensorrt_availability_names_what_is_missing() -> None:
    ok, why = get_backend("tensorrt").available("cpu")
    assert not ok and "CUDA device" in why
    if not HAS_TRT:
        assert "'tensorrt'" in why and "talkstream[gpu]" in why


def test_load_accepts_a_checkpoint_directory(micro: Models, tmp_path: Path) -> None:
    from talkstream.engine.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", micro)
    loaded = get_backend("torch").load(tmp_path / "ckpt", "cpu")
    assert loaded.models.denoiser.cfg == MICRO_DENOISER


# --- TensorRT: what can be checked without it -----------------------------------------------------


def test_tensorrt_profiles_cover_the_batch_axis_only() -> None:
    from talkstream.export.onnx import denoiser_loop_spec
    from talkstream.export.tensorrt import profile_shapes

    spec = denoiser_loop_spec(2, (999,))
    shapes = {
        "noise": (2, 3, 32, 32),
        "landmarks": (2, 68, 2),
        "ref_patches": (1, 48, 8, 8),
        "ref_level0": (1, 8, 8, 8),
        "ref_level1": (1, 16, 4, 4),
    }
    prof = profile_shapes(spec, shapes, max_batch=8, opt_batch=2)
    assert prof["noise"] == ((1, 3, 32, 32), (2, 3, 32, 32), (8, 3, 32, 32))
    assert prof["landmarks"] == ((1, 68, 2), (2, 68, 2), (8, 68, 2))
    # Reference features stay batch 1 (one avatar), whatever the frame batch.
    assert prof["ref_level1"] == ((1, 16, 4, 4),) * 3
    with pytest.raises(ValueError, match="opt_batch"):
        profile_shapes(spec, shapes, max_batch=4, opt_batch=5)


def test_tensorrt_engine_key_changes_with_every_part(tmp_path: Path) -> None:
    from talkstream.export.tensorrt import engine_fields

    onnx_path = tmp_path / "g.onnx"
    onnx_path.write_bytes(b"graph-a")
    prof = {"x": ((1, 3), (1, 3), (8, 3))}
    base = dict(
        onnx_path=onnx_path,
        profile=prof,
        precision="fp16",
        gpu_name="NVIDIA H100",
        capability=(9, 0),
        trt_version="10.7.0",
        plugins=False,
    )
    from talkstream.export.cache import ArtifactCache

    cache = ArtifactCache(tmp_path)

    def key(**change: Any) -> Path:
        return cache.entry("tensorrt", "g", engine_fields(**{**base, **change})).path

    k0 = key()
    assert key() == k0  # deterministic
    variants = [
        key(profile={"x": ((1, 3), (1, 3), (16, 3))}),
        key(precision="fp32"),
        key(gpu_name="NVIDIA H200"),
        key(capability=(8, 9)),
        key(trt_version="10.8.0"),
        key(plugins=True),
    ]
    onnx_path.write_bytes(b"graph-b")  # other weights or export settings
    variants.append(key())
    assert len({k0, *variants}) == len(variants) + 1
    with pytest.raises(ValueError, match="precision"):
        key(precision="int4")


class _Dim:
    """Stand-in for a TensorRT shape expression: symbolic, supports ==."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


class _Desc:
    def __init__(self, shape: tuple[Any, ...], dtype: str = "float32") -> None:
        self.shape_expr = shape
        self.dtype = dtype

    def like(self) -> _Desc:
        return _Desc(self.shape_expr, self.dtype)


def _fake_trtp() -> Any:
    return SimpleNamespace(
        TensorDesc=_Desc,
        Tensor=object,
        from_shape_expr=lambda shape, dtype: _Desc(tuple(shape), dtype),
        AutoTuneCombination=lambda spec: spec,
    )


def test_plugin_descriptors_compute_output_shapes() -> None:
    from talkstream.export import trt_plugins as tp

    fns = tp.plugin_functions(_fake_trtp())
    b, n = _Dim("B"), _Dim("N")
    out = fns[tp.ATTENTION_PLUGIN]["desc"](
        _Desc((b, 4, n, 16), "float16"), _Desc((b, 4, 68, 16)), _Desc((b, 4, 68, 24)), 0.25
    )
    assert out.shape_expr == (b, 4, n, 24) and out.dtype == "float16"
    out = fns[tp.WARP_PLUGIN]["desc"](
        _Desc((b, 32, 16, 16)), _Desc((b, 32, 16, 16)), _Desc((b, 2, 16, 16)), _Desc((b, 1, 16, 16))
    )
    assert out.shape_expr == (b, 32, 16, 16)
    # Annotations are the module's own types: how tensorrt.plugin tells tensors from attributes.
    ann = fns[tp.ATTENTION_PLUGIN]["desc"].__annotations__
    assert ann["q"] is _Desc and ann["scale"] is float and ann["return"] is _Desc
    assert fns[tp.ATTENTION_PLUGIN]["impl"].__annotations__["stream"] is int
    combos = fns[tp.WARP_PLUGIN]["autotune"](*(None,) * 5)
    assert combos == ["FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16"]


def test_plugin_shape_logic_rejects_mismatches() -> None:
    from talkstream.export.trt_plugins import attention_output_shape, warp_output_shape

    assert attention_output_shape((2, 4, 100, 16), (2, 4, 68, 16), (2, 4, 68, 8)) == (2, 4, 100, 8)
    with pytest.raises(ValueError, match="head dim"):
        attention_output_shape((2, 4, 100, 16), (2, 4, 68, 32), (2, 4, 68, 8))
    with pytest.raises(ValueError, match="tokens"):
        attention_output_shape((2, 4, 100, 16), (2, 4, 68, 16), (2, 4, 67, 8))
    with pytest.raises(ValueError, match="rank 4"):
        attention_output_shape((4, 100, 16), (2, 4, 68, 16), (2, 4, 68, 8))
    assert warp_output_shape((2, 8, 5, 7), (2, 8, 5, 7), (2, 2, 5, 7), (2, 1, 5, 7)) == (2, 8, 5, 7)
    with pytest.raises(ValueError, match="flow channels"):
        warp_output_shape((2, 8, 5, 7), (2, 8, 5, 7), (2, 3, 5, 7), (2, 1, 5, 7))
    with pytest.raises(ValueError, match="mask axis 3"):
        warp_output_shape((2, 8, 5, 7), (2, 8, 5, 7), (2, 2, 5, 7), (2, 1, 5, 6))


def test_plugin_registration_needs_tensorrt() -> None:
    from talkstream.export import trt_plugins

    if HAS_TRT:
        pytest.skip("tensorrt is installed: registration is exercised by the GPU tests")
    with pytest.raises(MissingDependencyError, match="tensorrt"):
        trt_plugins.register_plugins()


@needs_trt_gpu
def test_tensorrt_matches_eager(tmp_path: Path) -> None:
    gpu = live_micro_models()
    sampler = FewStepSampler.from_config(SamplerConfig(steps=2))
    loaded = get_backend("tensorrt").load(gpu, "cuda", cache_dir=tmp_path, sampler=sampler)
    x: dict[str, Any] = {
        k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _inputs(gpu, 2).items()
    }
    ref = ReferenceFeatures(x["ref"].patches.cuda(), tuple(r.cuda() for r in x["ref"].levels))
    with torch.inference_mode():
        got = loaded.sample(sampler, x["x_t"], x["landmarks"], ref)
        want = sampler.sample(gpu.denoiser.cuda(), x["x_t"], landmarks=x["landmarks"], ref=ref)
    # FP16 engine against fp32 eager: images in [-1, 1], about one 8-bit level.
    assert (got - want).abs().max().item() < 2e-2
