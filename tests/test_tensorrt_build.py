"""The TensorRT build path, up to TensorRT itself, for TensorRT 10 and 11.

TensorRT cannot be installed on the machines that run this suite (no NVIDIA GPU, no wheels for
it), so ``build_engine`` is driven here by ``RecordingTrt``: a test double of the documented
TensorRT Python API (``tensorrt.Builder``, ``NetworkDefinitionCreationFlag``, ``OnnxParser``,
``IBuilderConfig``, ``IOptimizationProfile``) that records every call and fails on request. It
models the one difference between 10 and 11 that matters here: 11 has no ``BuilderFlag.FP16``
(reading it raises AttributeError, as the real 11.x bindings do). What the double cannot show,
whether TensorRT accepts the graphs and how fast the engines run, is the GPU test in
tests/test_backends.py (``test_tensorrt_matches_eager``), skipped without TensorRT and a GPU.

The ONNX graphs TensorRT would parse are checked for real: exported in float32 (the 10 flag
path) and float16 (the 11 strongly typed path), with onnx's full checker, the dtypes of their
inputs and outputs and the dynamic batch axis; the float16 graph also runs in onnxruntime and
stays within fp16 error of the eager model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from talkstream.export.tensorrt import (
    DEFAULT_PRECISION,
    TRT_INSTALL,
    BuildPlan,
    TensorRTBuildError,
    build_engine,
    build_plan,
    profile_shapes,
    tensorrt_status,
)

HAS_EXPORT = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
COALESCE = 32  # EngineConfig.max_batch_frames: what the engine batches at most


class RecordingTrt:
    """A stand-in for the ``tensorrt`` module (10.x or 11.x API) that records calls.

    ``fail`` names one step to fail the way TensorRT reports it: ``"parse"`` (parse_from_file
    returns False, two parser errors), ``"build"`` (build_serialized_network returns None),
    ``"profile"`` (add_optimization_profile returns -1), ``"network"`` (create_network returns
    None).
    """

    def __init__(
        self, version: str, inputs: tuple[str, ...] = ("x_t", "t"), fail: str = ""
    ) -> None:
        self.__version__ = version
        self.major = int(version.split(".")[0])
        self.calls: list[tuple[Any, ...]] = []
        self.input_names = inputs
        self.fail = fail
        outer = self

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None:
                self.level = level

        class NetworkDefinitionCreationFlag:
            EXPLICIT_BATCH = 0  # deprecated, ignored since 10
            STRONGLY_TYPED = 1  # ignored (always on) in 11

        class MemoryPoolType:
            WORKSPACE = 0

        class Flags:
            TF32 = "TF32"

        if self.major < 11:
            Flags.FP16 = "FP16"  # type: ignore[attr-defined]  # 11 removed it

        class Input:
            def __init__(self, name: str) -> None:
                self.name = name

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags = flags
                self.num_inputs = len(outer.input_names)

            def get_input(self, i: int) -> Input:
                return Input(outer.input_names[i])

        class Parser:
            num_errors = 2

            def __init__(self, network: Network, logger: Any) -> None:
                self.network = network

            def parse_from_file(self, path: str) -> bool:
                outer.calls.append(("parse_from_file", path))
                return outer.fail != "parse"

            def get_error(self, i: int) -> str:
                return f"node {i}: unsupported op"

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple[Any, ...]] = {}

            def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class TimingCache:
            def serialize(self) -> bytes:
                return b"timing"

        class Config:
            def set_memory_pool_limit(self, pool: int, size: int) -> None:
                outer.calls.append(("set_memory_pool_limit", pool, size))

            def set_flag(self, flag: str) -> None:
                outer.calls.append(("set_flag", flag))

            def add_optimization_profile(self, profile: Profile) -> int:
                outer.calls.append(("add_optimization_profile", profile.shapes))
                return -1 if outer.fail == "profile" else 0

            def create_timing_cache(self, blob: bytes) -> TimingCache:
                outer.calls.append(("create_timing_cache", blob))
                return TimingCache()

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                return True

            def get_timing_cache(self) -> TimingCache:
                return TimingCache()

        class Builder:
            def __init__(self, logger: Logger) -> None:
                pass

            def create_network(self, flags: int) -> Network | None:
                outer.calls.append(("create_network", flags))
                return None if outer.fail == "network" else Network(flags)

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> Any:
                outer.calls.append(("build_serialized_network",))
                return None if outer.fail == "build" else memoryview(b"engine-bytes")

        self.Logger = Logger
        self.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
        self.MemoryPoolType = MemoryPoolType
        self.BuilderFlag = Flags
        self.Builder = Builder
        self.OnnxParser = Parser

    def called(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]


def _profile(max_batch: int = COALESCE) -> dict[str, Any]:
    return {
        "x_t": ((1, 3, 8, 8), (1, 3, 8, 8), (max_batch, 3, 8, 8)),
        "t": ((1,), (1,), (max_batch,)),
    }


def _build(
    trt: RecordingTrt, tmp_path: Path, precision: str | BuildPlan = "fp16", **kw: Any
) -> bytes:
    onnx_path = tmp_path / "g.onnx"
    onnx_path.write_bytes(b"graph")
    return build_engine(trt, onnx_path, kw.get("profile", _profile()), precision, tmp_path / "tc")


# ---------------------------------------------------------------------------- the plan


def test_plan_per_version_and_precision() -> None:
    assert DEFAULT_PRECISION == "fp16"
    ten = build_plan("10.13.2.6", "fp16")
    assert (ten.graph_dtype, ten.strongly_typed, ten.fp16_flag) == ("float32", False, True)
    assert not build_plan("10.13.2.6", "fp32").fp16_flag
    eleven = build_plan("11.4.1", "fp16")
    assert (eleven.graph_dtype, eleven.strongly_typed, eleven.fp16_flag) == (
        "float16", True, False,
    )  # fmt: skip
    assert build_plan("11.0.0", "fp32").graph_dtype == "float32"
    assert "strongly typed" in eleven.describe() and "FP16 flag" in ten.describe()
    with pytest.raises(ValueError, match="precision 'int8'"):
        build_plan("11.0.0", "int8")
    for old in ("8.6.1", "12.0.0"):
        with pytest.raises(TensorRTBuildError, match=r"10\.x and 11\.x") as e:
            build_plan(old)
        assert "tensorrt-cu12" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------- the build


def test_tensorrt_10_builds_the_fp32_graph_with_the_fp16_flag(tmp_path: Path) -> None:
    trt = RecordingTrt("10.13.2.6")
    assert _build(trt, tmp_path) == b"engine-bytes"
    assert trt.called("create_network") == [("create_network", 0)]  # weakly typed
    assert trt.called("set_flag") == [("set_flag", "FP16")]
    assert (tmp_path / "tc").read_bytes() == b"timing"
    # The timing cache is read back by the next build.
    _build(trt, tmp_path)
    assert trt.called("create_timing_cache")[-1] == ("create_timing_cache", b"timing")


def test_tensorrt_10_fp32_sets_no_flag(tmp_path: Path) -> None:
    trt = RecordingTrt("10.8.0")
    _build(trt, tmp_path, "fp32")
    assert trt.called("set_flag") == [] and trt.called("create_network") == [("create_network", 0)]


def test_tensorrt_11_builds_strongly_typed_without_the_removed_flag(tmp_path: Path) -> None:
    trt = RecordingTrt("11.4.1")
    assert not hasattr(trt.BuilderFlag, "FP16")  # the double models 11's API
    assert _build(trt, tmp_path) == b"engine-bytes"
    flag = 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert trt.called("create_network") == [("create_network", flag)]
    assert trt.called("set_flag") == []
    # Forcing the 10 plan onto 11 fails on the flag 11 removed: the plan is what protects us.
    ten_on_eleven = BuildPlan(11, "fp16", "float32", strongly_typed=False, fp16_flag=True)
    with pytest.raises(AttributeError, match="FP16"):
        _build(trt, tmp_path, ten_on_eleven)


def test_profile_reaches_the_coalescing_limit(tmp_path: Path) -> None:
    from talkstream.config import EngineConfig
    from talkstream.export.onnx import denoiser_step_spec

    spec = denoiser_step_spec(3)
    shapes: dict[str, tuple[int, ...]] = {"x_t": (2, 3, 8, 8), "t": (2,), "landmarks": (2, 68, 2)}
    shapes.update({n: (1, 4, 4, 4) for n in spec.inputs if n.startswith("ref_")})
    limit = EngineConfig().max_batch_frames
    assert limit == COALESCE
    profile = profile_shapes(spec, shapes, limit)
    assert profile["x_t"] == ((1, 3, 8, 8), (1, 3, 8, 8), (limit, 3, 8, 8))
    assert profile["ref_patches"] == ((1, 4, 4, 4),) * 3  # one avatar: batch 1 always
    trt = RecordingTrt("11.1.0", inputs=spec.inputs)
    _build(trt, tmp_path, profile=profile)
    ((_, added),) = trt.called("add_optimization_profile")
    assert set(added) == set(spec.inputs)
    assert added["x_t"][2][0] == added["landmarks"][2][0] == added["t"][2][0] == limit


def test_build_returning_none_is_a_one_line_error(tmp_path: Path) -> None:
    for version in ("10.13.0", "11.4.1"):
        with pytest.raises(TensorRTBuildError, match="failed to build an engine") as e:
            _build(RecordingTrt(version, fail="build"), tmp_path)
        msg = str(e.value)
        assert "\n" not in msg and "g.onnx" in msg and f"batch up to {COALESCE}" in msg


def test_parse_failure_lists_the_parser_errors(tmp_path: Path) -> None:
    trt = RecordingTrt("11.4.1", fail="parse")
    with pytest.raises(TensorRTBuildError, match="could not parse") as e:
        _build(trt, tmp_path)
    assert "node 0: unsupported op; node 1: unsupported op" in str(e.value)
    assert trt.called("build_serialized_network") == []  # stopped at the parse


@pytest.mark.parametrize(
    ("fail", "match"),
    [("profile", "rejected the optimisation profile"), ("network", "create_network failed")],
)
def test_other_failed_steps_are_named(tmp_path: Path, fail: str, match: str) -> None:
    with pytest.raises(TensorRTBuildError, match=match):
        _build(RecordingTrt("10.13.0", fail=fail), tmp_path)


def test_a_profile_without_an_input_is_named(tmp_path: Path) -> None:
    trt = RecordingTrt("11.4.1", inputs=("x_t", "t", "landmarks"))
    with pytest.raises(TensorRTBuildError, match=r"no shapes for input\(s\) landmarks"):
        _build(trt, tmp_path)


# ---------------------------------------------------------------------------- doctor


def test_status_says_what_is_missing_and_where_it_comes_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec

    def without(name: str, *args: Any) -> Any:
        return None if name == "tensorrt" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without)
    ok, line = tensorrt_status()
    assert not ok and line == f"TensorRT is not installed: {TRT_INSTALL}"
    for part in ("tensorrt-cu12", "tensorrt-cu13", "10.x or 11.x", "pypi.nvidia.com"):
        assert part in line


@pytest.mark.parametrize(
    ("version", "usable"), [("10.13.2", True), ("11.4.1", True), ("8.6.1", False)]
)
def test_status_with_an_installed_tensorrt(
    monkeypatch: pytest.MonkeyPatch, version: str, usable: bool
) -> None:
    import sys
    import types

    fake = types.ModuleType("tensorrt")
    fake.__version__ = version  # type: ignore[attr-defined]
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    ok, line = tensorrt_status()
    has_onnx = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript"))
    assert ok is (usable and has_onnx), line
    assert version in line and "\n" not in line
    if ok:
        plan = "strongly typed" if version.startswith("11") else "FP16 flag"
        assert plan in line
    if not usable:
        assert "not supported" in line and "tensorrt-cu12" in line


# ---------------------------------------------------------------------------- the ONNX inputs


@pytest.fixture(scope="module")
def micro_models() -> Any:
    # The backend tests' micro networks, every head non-zero (flows and pixel warp not trivial).
    from tests.test_backends import live_micro_models

    return live_micro_models()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EXPORT, reason="needs the export extra (onnx, onnxscript, onnxruntime)")
@pytest.mark.parametrize(
    ("graph", "dtype"),
    # The float32 graphs (TensorRT 10's flag path) are the ones onnxruntime runs: the step and
    # loop graphs of these very micro networks are checked (onnx.checker, names, dynamic batch
    # axis) and run against eager at batch 1 and 3 in tests/test_backends.py, the tiny model's
    # in tests/test_export_onnx.py; a float32 export here would be a third (~10 s).
    [("step", torch.float16), ("loop", torch.float16)],
    ids=["step-fp16 (11)", "loop-fp16 (11)"],
)
def test_graphs_tensorrt_parses_have_its_types_and_a_batch_axis(
    tmp_path: Path, micro_models: Any, graph: str, dtype: torch.dtype
) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from talkstream.engine.sampler import FewStepSampler, NoiseSchedule
    from talkstream.export import onnx as ox

    den = micro_models.denoiser
    path = tmp_path / f"{graph}.onnx"
    if graph == "step":
        spec = ox.export_denoiser_step(den, path, dtype=dtype)
        module: torch.nn.Module = ox.DenoiserStepGraph(den)
    else:
        sampler = FewStepSampler(NoiseSchedule(micro_models.sampler), 2)
        spec = ox.export_denoiser_loop(den, sampler, path, dtype=dtype)
        module = ox.DenoiserLoopGraph(den, sampler)
    model = ox.check_graph(path, spec)  # onnx.checker (full) + names + dynamic batch axes
    onnx.checker.check_model(model, full_check=True)
    want = onnx.TensorProto.FLOAT16 if dtype == torch.float16 else onnx.TensorProto.FLOAT
    values = (*model.graph.input, *model.graph.output)
    elem = {v.name: v.type.tensor_type.elem_type for v in values}
    if graph == "step":
        assert elem.pop("t") == onnx.TensorProto.INT64
    assert set(elem.values()) == {want}, elem
    for v in values:
        batch = v.type.tensor_type.shape.dim[0]
        if v.name.startswith("ref_"):
            assert batch.dim_value == 1  # one avatar's features
        else:
            assert batch.dim_param == "batch"
    if dtype == torch.float16:  # the weights are fp16 too: the graph carries the precision
        floats = [i for i in model.graph.initializer if i.data_type in (1, 10)]
        half = sum(i.data_type == onnx.TensorProto.FLOAT16 for i in floats)
        assert half >= 0.8 * len(floats), (half, len(floats))
    # The graph runs (onnxruntime) at batch 3 and agrees with eager within its precision.
    inputs = ox.example_inputs(spec, denoiser=den, batch=3)
    with torch.no_grad():
        expected = module(*[inputs[n] for n in spec.inputs])
    feeds = {k: (v.to(dtype) if v.is_floating_point() else v).numpy() for k, v in inputs.items()}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, feeds)
    assert got.shape == tuple(expected.shape)
    assert got.dtype == np.dtype("float16" if dtype == torch.float16 else "float32")
    err = float((torch.from_numpy(got).float() - expected).abs().max())
    scale = float(expected.abs().max())
    assert err <= (2e-2 if dtype == torch.float16 else 1e-4) * max(scale, 1.0), err
