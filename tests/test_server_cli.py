"""The ``talkstream serve`` command: registration, flags, and a clear message without the extra."""

from __future__ import annotations

import importlib.util

import pytest

from talkstream import cli


def test_serve_is_registered_with_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--host",
        "--port",
        "--max-sessions",
        "--idle-timeout",
        "--image",
        "--landmarks",
        "--compute-budget-ms",
        "--preset",
        "--viewer-token",
        "--control-token",
        "--generate-tokens",
        "--no-auth",
        "--allow-origin",
        "--allow-host",
        "--connect-timeout",
    ):
        assert flag in out


def test_serve_without_the_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "aiortc" else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "aiortc" in err and "talkstream[serve]" in err


def test_serve_rejects_bad_limits(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")
    assert cli.main(["serve", "--max-sessions", "0"]) == 2
    assert "max_sessions" in capsys.readouterr().err
