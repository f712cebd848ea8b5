"""Multi-process training: two CPU processes under gloo stay in lock-step (DDP)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from talkstream.training.loop import DistInfo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, out: str) -> None:
    # Imported in the child: spawn starts a fresh interpreter.
    from talkstream.training.trainer import train
    from tests.test_train_support import tiny_config, tiny_data

    torch.set_num_threads(1)
    cfg = tiny_config(Path(out) / "run", steps=2, stages=["motion", "teacher"])
    res = train(cfg, DistInfo(rank=rank, world_size=world, local_rank=rank), data=tiny_data())
    weights = {f"motion.{k}": v for k, v in res.nets.motion.state_dict().items()}
    weights.update({f"teacher.{k}": v for k, v in res.nets.teacher.state_dict().items()})
    save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(out) / f"rank{rank}.st"))


@pytest.mark.slow
def test_two_gloo_processes_train_identical_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    a = load_file(str(tmp_path / "rank0.st"))
    b = load_file(str(tmp_path / "rank1.st"))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the ranks"
    # Rank 0 alone wrote the run's files.
    run = tmp_path / "run"
    assert (run / "final" / "config.json").is_file()
    assert (run / "state" / "teacher" / "latest").is_file()
    # Both processes trained: the weights moved away from the initialisation.
    torch.manual_seed(0)
    from talkstream.training.trainer import initial_nets
    from tests.test_train_support import tiny_config

    init = initial_nets(tiny_config(tmp_path / "x")).motion.state_dict()
    assert any(not torch.equal(init[k], a[f"motion.{k}"]) for k in init)


def test_dist_info_from_env() -> None:
    d = DistInfo.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (d.rank, d.world_size, d.local_rank, d.is_main, d.enabled) == (3, 4, 1, False, True)
    assert d.local_batch(16) == 4
    with pytest.raises(ValueError, match="divisible"):
        d.local_batch(6)
    assert not DistInfo.from_env({}).enabled
