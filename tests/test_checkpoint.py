"""Checkpoints: round trip, and every way a checkpoint can be broken gives a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from talkstream.engine.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Models,
    load_checkpoint,
    save_checkpoint,
)
from talkstream.errors import CheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Models]:
    models = Models.random_init("tiny", seed=3)
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", models)
    return path, models


def _copy(saved: tuple[Path, Models], tmp_path: Path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(saved[0], dst)
    return dst


def _rewrite_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))


def test_round_trip(saved: tuple[Path, Models]) -> None:
    path, models = saved
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = load_checkpoint(path)
    assert loaded.preset == "tiny"
    assert loaded.motion.cfg == models.motion.cfg
    assert loaded.denoiser.cfg == models.denoiser.cfg
    assert loaded.audio == models.audio and loaded.sampler == models.sampler
    for a, b in ((models.motion, loaded.motion), (models.denoiser, loaded.denoiser)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert not loaded.motion.training and not loaded.denoiser.training


def test_missing_and_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    f = tmp_path / "file.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_checkpoint(tmp_path / "empty")


def test_corrupt_config(saved: tuple[Path, Models], tmp_path: Path) -> None:
    path = _copy(saved, tmp_path)
    (path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


def test_newer_format_version(saved: tuple[Path, Models], tmp_path: Path) -> None:
    path = _copy(saved, tmp_path)
    _rewrite_config(path, format_version=99)
    with pytest.raises(CheckpointError, match="newer than this talkstream supports"):
        load_checkpoint(path)


def test_corrupt_weights(saved: tuple[Path, Models], tmp_path: Path) -> None:
    path = _copy(saved, tmp_path)
    data = bytearray((path / WEIGHTS_NAME).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the tensors
    (path / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_truncated_weights_with_matching_hash(saved: tuple[Path, Models], tmp_path: Path) -> None:
    # A truncated file whose hash was (wrongly) recomputed still fails cleanly in the parser.
    import hashlib

    path = _copy(saved, tmp_path)
    data = (path / WEIGHTS_NAME).read_bytes()[:1000]
    (path / WEIGHTS_NAME).write_bytes(data)
    _rewrite_config(path, weights_sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)


def _resave_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    import hashlib

    save_file(tensors, str(path / WEIGHTS_NAME))
    _rewrite_config(
        path, weights_sha256=hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()
    )


def test_missing_key(saved: tuple[Path, Models], tmp_path: Path) -> None:
    path = _copy(saved, tmp_path)
    tensors = load_file(str(path / WEIGHTS_NAME))
    dropped = sorted(k for k in tensors if k.startswith("denoiser."))[0]
    del tensors[dropped]
    _resave_weights(path, tensors)
    with pytest.raises(CheckpointError, match="missing") as e:
        load_checkpoint(path)
    assert dropped.split(".", 1)[1] in str(e.value)


def test_config_does_not_match_weights(saved: tuple[Path, Models], tmp_path: Path) -> None:
    path = _copy(saved, tmp_path)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    motion = dict(cfg["motion"], d_model=64, n_heads=4)
    _rewrite_config(path, motion=motion)
    with pytest.raises(CheckpointError, match="do not match the motion config"):
        load_checkpoint(path)


def test_unknown_config_key(saved: tuple[Path, Models], tmp_path: Path) -> None:
    path = _copy(saved, tmp_path)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    _rewrite_config(path, audio=dict(cfg["audio"], sample_rate=8000))
    unknown = r"bad 'audio' config: unknown audio keys \['sample_rate'\]"
    with pytest.raises(CheckpointError, match=unknown):
        load_checkpoint(path)


def test_nothing_is_unpickled(saved: tuple[Path, Models]) -> None:
    # The weights file is plain safetensors: a JSON header and raw tensor bytes, no pickle opcodes.
    raw = (saved[0] / WEIGHTS_NAME).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "talkstream.checkpoint"
