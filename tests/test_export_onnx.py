"""ONNX export of the shipped tiny model: checker, declared names and axes, ONNX Runtime parity.

Exports are slow (seconds each on 2 cores), so every graph is exported once per test session
through the artifact cache, in a directory the backend and doctor tests share: whichever module
runs first builds, the others hit the cache (the key is the same: same weights, same versions).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from talkstream.config import SamplerConfig
from talkstream.engine.checkpoint import Models, load_checkpoint
from talkstream.engine.denoiser import ReferenceFeatures
from talkstream.engine.pipeline import default_checkpoint
from talkstream.engine.runtime import LoadOptions
from talkstream.engine.sampler import FewStepSampler
from talkstream.export.cache import ArtifactCache, cache_key
from talkstream.export.common import OnnxGraphs

onnx = pytest.importorskip("onnx", reason="needs the export extra (onnx)")
ort = pytest.importorskip("onnxruntime", reason="needs the export extra (onnxruntime)")

from talkstream.export import onnx as ox  # noqa: E402 - after the importorskip guards


def shared_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact cache for the whole session (see the module docstring)."""
    return tmp_path_factory.getbasetemp() / "talkstream-shared-cache"


@pytest.fixture(scope="module")
def tiny() -> Models:
    # The shipped trained weights: at random init every flow head is zero, so each GridSample
    # would sample in place and the warps' parity would hold whatever the graph did with flows.
    path = default_checkpoint("tiny")
    assert path is not None, "the shipped tiny checkpoint is missing"
    return load_checkpoint(path, "cpu")


@pytest.fixture(scope="module")
def graphs(tiny: Models, tmp_path_factory: pytest.TempPathFactory) -> OnnxGraphs:
    cache = ArtifactCache(shared_cache_root(tmp_path_factory))
    return OnnxGraphs(tiny, cache, LoadOptions())


@pytest.fixture(scope="module")
def sampler1() -> FewStepSampler:
    return FewStepSampler.from_config(SamplerConfig(steps=1))


def _ort_run(path: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
    return torch.from_numpy(out)


@pytest.mark.parametrize("batch", [1, 3])
def test_motion_graph_checks_and_matches_eager(
    graphs: OnnxGraphs, tiny: Models, batch: int
) -> None:
    la = tiny.motion.cfg.lookahead_frames
    spec, path = graphs.motion(la)
    model = ox.check_graph(path, spec)
    assert [i.name for i in model.graph.input] == ["windows", "neutral"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    inputs = ox.example_inputs(spec, motion=tiny.motion, batch=batch, seed=batch)
    with torch.no_grad():
        want = tiny.motion(inputs["windows"], inputs["neutral"], la)
    got = _ort_run(path, inputs)
    assert got.shape == (batch, 37, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_denoiser_loop_graph_checks_and_matches_eager(
    graphs: OnnxGraphs, tiny: Models, sampler1: FewStepSampler, batch: int
) -> None:
    spec, path = graphs.denoiser_loop(sampler1)
    model = ox.check_graph(path, spec)
    assert spec.inputs == ("noise", "landmarks", "ref_patches", "ref_level0", "ref_level1",
                           "ref_level2")  # fmt: skip
    # Only standard ops: the kernels were traced through their references.
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert {"GridSample", "Softmax"} <= {n.op_type for n in model.graph.node}
    inputs = ox.example_inputs(spec, denoiser=tiny.denoiser, batch=batch, seed=7)
    ref = ReferenceFeatures(inputs["ref_patches"], tuple(inputs[f"ref_level{i}"] for i in range(3)))
    with torch.no_grad():
        want = sampler1.sample(
            tiny.denoiser, inputs["noise"], landmarks=inputs["landmarks"], ref=ref
        )
    got = _ort_run(path, inputs)
    assert got.shape == (batch, 3, 128, 128)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_plugin_graph_keeps_kernels_as_tensorrt_plugin_nodes(graphs: OnnxGraphs) -> None:
    plug = OnnxGraphs(graphs.models, graphs.cache, graphs.options, plugins=True)
    spec, path = plug.denoiser_step()
    assert spec.plugins and path.name == "denoiser_step.plugins.onnx"
    model = ox.check_graph(path, spec)
    nodes = [n for n in model.graph.node if n.domain == ox.PLUGIN_DOMAIN]
    kinds = [n.op_type for n in nodes]
    cfg = graphs.models.denoiser.cfg
    # One attention node per attention block, one warp per level (encoder only).
    n_attn = sum(cfg.blocks[lvl] for lvl in cfg.attn_levels) + sum(
        cfg.blocks[lvl] for lvl in cfg.attn_levels if lvl < len(cfg.widths) - 1
    )
    assert kinds.count("landmark_attention") == n_attn
    # One per U-Net level, plus the pixel-space warp of the photo at the output.
    assert kinds.count("warp_blend") == len(cfg.widths) + int(cfg.pixel_warp)
    assert "GridSample" not in {n.op_type for n in model.graph.node}
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"talkstream"  # what TensorRT's parser looks up
        if node.op_type == "landmark_attention":
            assert attrs["scale"] > 0
    assert any(o.domain == ox.PLUGIN_DOMAIN for o in model.opset_import)


def test_cache_hits_rebuilds_and_keys_follow_the_weights(
    graphs: OnnxGraphs, tiny: Models, tmp_path_factory: pytest.TempPathFactory
) -> None:
    la = tiny.motion.cfg.lookahead_frames
    _, path = graphs.motion(la)
    built = path.stat().st_mtime_ns
    # A second OnnxGraphs on the same cache finds the entry without exporting.
    said: list[str] = []
    again = OnnxGraphs(tiny, graphs.cache, LoadOptions(progress=said.append))
    _, path2 = again.motion(la)
    assert path2 == path and path.stat().st_mtime_ns == built
    assert said and said[0].startswith("cached")
    # Different weights: a different key, so a different entry.
    other = Models.random_init("tiny", seed=1)
    e1 = graphs.cache.entry("onnx", "motion_la2", {"model": ox.model_hash(tiny.motion)})
    e2 = graphs.cache.entry("onnx", "motion_la2", {"model": ox.model_hash(other.motion)})
    assert e1.path != e2.path
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    listed = [e.path for e in graphs.cache.entries()]
    assert path.parent in listed
    assert (path.parent / "key.json").is_file()


def test_failed_build_leaves_no_entry(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    entry = cache.entry("onnx", "broken", {"x": 1})

    def build(tmp: Path) -> None:
        (tmp / "half.onnx").write_bytes(b"x")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        cache.get_or_build(entry, build)
    assert not entry.ready and not entry.path.exists()
    assert list((tmp_path / "artifacts" / "onnx").iterdir()) == []


def test_check_graph_names_what_differs(graphs: OnnxGraphs, tiny: Models) -> None:
    spec, path = graphs.motion(tiny.motion.cfg.lookahead_frames)
    wrong = ox.GraphSpec(spec.name, ("mel", "neutral"), spec.outputs, spec.dynamic_axes)
    with pytest.raises(ValueError, match="inputs"):
        ox.check_graph(path, wrong)
    static = ox.GraphSpec(spec.name, spec.inputs, spec.outputs, {})
    with pytest.raises(ValueError, match="should be static"):
        ox.check_graph(path, static)


def test_model_hash_ignores_device_and_dtype(tiny: Models) -> None:
    h = ox.model_hash(tiny.motion)
    wide = copy.deepcopy(tiny.motion).to(torch.float64)
    assert ox.model_hash(wide) == h
    with torch.no_grad():
        wide.head.bias.add_(1.0)
    assert ox.model_hash(wide) != h
