"""The one config tree: the root ``Config``, its sections, and the generic loader every section
uses (``talkstream._config_io``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from talkstream import _config_io
from talkstream.benchmarking.scenario import Scenario
from talkstream.config import AvatarConfig, Config, EngineConfig, RenderConfig, SamplerConfig
from talkstream.streaming.config import ServeConfig, StreamConfig
from talkstream.streaming.live import LiveConfig
from talkstream.training.config import TrainConfig


def test_unknown_key_is_named_with_its_section_and_the_expected_keys() -> None:
    with pytest.raises(ValueError) as e:
        Config.from_dict({"serve": {"stream": {"jiter_budget_ms": 10}}})
    msg = str(e.value)
    assert "unknown serve.stream keys ['jiter_budget_ms']" in msg
    assert "'jitter_budget_ms'" in msg and "'compute_budget_ms'" in msg  # the expected ones
    with pytest.raises(ValueError, match=r"unknown Config keys \['sevre'\]"):
        Config.from_dict({"sevre": {}})


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"serve": {"stream": {"jitter_budget_ms": "40"}}}, r"serve\.stream\.jitter_budget_ms"),
        ({"engine": {"sampler": {"steps": 1.5}}}, r"engine\.sampler\.steps: expected an integer"),
        ({"engine": {"warmup": "yes"}}, r"engine\.warmup: expected true/false"),
        ({"engine": {"avatar": {"frame_size": [640]}}}, r"engine\.avatar\.frame_size"),
        ({"bench": [{"batch": "2"}]}, r"bench\[0\]\.batch: expected an integer"),
        ({"engine": {"audio": []}}, r"engine\.audio: expected an object"),
    ],
)
def test_wrong_type_is_named_by_its_dotted_key(data: dict, where: str) -> None:
    with pytest.raises(ValueError, match=where):
        Config.from_dict(data)


def test_nested_sections_convert_and_keep_defaults() -> None:
    cfg = Config.from_dict(
        {
            "engine": {"device": "cpu", "checkpoint": "ckpt/tiny", "sampler": {"steps": 2}},
            "serve": {
                "port": 9000,
                "allowed_hosts": ["a.example"],
                "stream": {"jitter_budget_ms": 30},
            },
            "live": {"output": "publish", "publish": {"whip": "http://h/w"}, "out": "x.mp4"},
            "bench": [{"preset": "tiny", "batch": 2, "frame_size": [640, 480]}],
            "train": {"stages": ["motion"], "teacher": {"steps": 7}},
        }
    )
    assert cfg.engine.checkpoint == Path("ckpt/tiny") and cfg.engine.sampler.steps == 2
    assert cfg.engine.sampler.seed == SamplerConfig().seed  # left out: the default
    assert isinstance(cfg.serve, ServeConfig) and cfg.serve.port == 9000
    assert cfg.serve.allowed_hosts == ("a.example",)  # a list becomes the field's tuple
    assert cfg.serve.stream == StreamConfig(jitter_budget_ms=30.0)
    assert isinstance(cfg.live, LiveConfig) and cfg.live.out == Path("x.mp4")
    assert cfg.live.publish is not None and cfg.live.publish.whip == "http://h/w"
    assert cfg.bench == (Scenario(batch=2, frame_size=(640, 480)),)
    assert isinstance(cfg.train, TrainConfig) and cfg.train.teacher.steps == 7
    assert cfg.render is None and cfg.publish is None  # sections a command leaves out
    # The whole tree round-trips through JSON.
    again = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_a_sections_own_checks_still_run() -> None:
    with pytest.raises(ValueError, match="frames_per_call must be >= 1"):
        Config.from_dict({"serve": {"stream": {"frames_per_call": 0}}})
    with pytest.raises(ValueError, match="framing must be one of"):
        Config.from_dict({"engine": {"avatar": {"framing": "wide"}}})


def test_overrides_reach_nested_sections_and_are_checked() -> None:
    cfg = Config(serve=ServeConfig())
    out = cfg.with_overrides(
        ["serve.stream.compute_budget_ms=60", "engine.avatar.framing=portrait"]
    )
    assert out.serve is not None and out.serve.stream.compute_budget_ms == 60.0
    assert out.engine.avatar.framing == "portrait"  # a bare word is taken as a string
    assert cfg.serve is not None and cfg.serve.stream.compute_budget_ms == 40.0  # unchanged
    with pytest.raises(ValueError, match=r"unknown serve\.stream keys \['compute_ms'\]"):
        cfg.with_overrides(["serve.stream.compute_ms=60"])
    with pytest.raises(ValueError, match=r"section\.key=value"):
        cfg.with_overrides(["serve.port"])
    with pytest.raises(ValueError, match="'port' is not a section"):
        cfg.with_overrides(["serve.port.x=1"])
    with pytest.raises(ValueError, match=r"engine\.max_batch_frames: expected an integer"):
        cfg.with_overrides(["engine.max_batch_frames=lots"])


def test_the_engine_section_appears_once() -> None:
    """The command sections hold no engine of their own: one tree, one engine section."""
    for section in (RenderConfig, ServeConfig, LiveConfig):
        assert "engine" not in {f.name for f in dataclasses.fields(section)}, section
    from talkstream.publish.cli import PublishConfig

    assert "engine" not in {f.name for f in dataclasses.fields(PublishConfig)}


def test_generic_loader_on_plain_sections() -> None:
    assert _config_io.from_dict(AvatarConfig, {"frame_size": [320, 240]}).frame_size == (320, 240)
    with pytest.raises(ValueError, match=r"frame_size: expected 2 items, got 3"):
        _config_io.from_dict(AvatarConfig, {"frame_size": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"EngineConfig: expected an object"):
        _config_io.from_dict(EngineConfig, ["cpu"])
    assert _config_io.to_dict(EngineConfig(checkpoint=Path("a/b")))["checkpoint"] == "a/b"
    with pytest.raises(ValueError, match=r"threads: expected an integer, got True"):
        _config_io.from_dict(EngineConfig, {"threads": True})  # bool is not an int here
    assert _config_io.from_dict(EngineConfig, {"threads": None}).threads is None


def test_read_config_file(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("[serve]\nport = 81\n[serve.stream]\njitter_budget_ms = 20\n")
    cfg = Config.from_dict(_config_io.read_config_file(toml))
    assert cfg.serve is not None and cfg.serve.port == 81
    bad = tmp_path / "c.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match=r"^config .*c\.json is not valid json"):
        _config_io.read_config_file(bad)
    bad.write_text('["a"]')
    with pytest.raises(ValueError, match="the top level must be an object"):
        _config_io.read_config_file(bad)
    with pytest.raises(ValueError, match="cannot read settings"):
        _config_io.read_config_file(tmp_path / "missing.json", "settings")
