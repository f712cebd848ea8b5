"""``talkstream doctor`` and ``talkstream export``: what they report and build."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from talkstream.cli import SUBCOMMAND_MODULES, main
from talkstream.export.cli import doctor_report

HAS_ORT = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxscript"))


def test_export_cli_is_registered() -> None:
    assert "talkstream.export.cli" in SUBCOMMAND_MODULES


def test_doctor_report_lists_every_backend_with_a_reason() -> None:
    report = doctor_report("cpu", "float32")
    assert report["cpu"]["cores"] >= 1 and "torch_capability" in report["cpu"]
    assert report["torch"]["version"]
    rows = report["backends"]["cpu"]
    assert set(rows) == {"torch", "compiled", "onnxruntime", "tensorrt"}
    assert rows["torch"]["available"] and rows["torch"]["extra"] is None
    trt = rows["tensorrt"]
    assert not trt["available"] and "CUDA" in trt["reason"] and trt["extra"] == "gpu"
    assert rows["onnxruntime"]["extra"] == "export"
    assert report["kernels"]["cpu"] == "reference"
    assert report["auto"]["backend"] == ("onnxruntime" if HAS_ORT else "torch")


def test_doctor_prints_a_readable_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "backends on cpu (float32):" in out
    assert "tensorrt" in out and "--backend auto on cpu:" in out
    # Where TensorRT comes from, in one line (it cannot be installed on the CI machines).
    assert "tensorrt: TensorRT is not installed: pip install tensorrt-cu12" in out
    assert main(["doctor", "--json", "--dtype", "bfloat16"]) == 0
    report = json.loads(capsys.readouterr().out)
    # onnxruntime runs float32 graphs only: doctor says so for bfloat16.
    assert not report["backends"]["cpu"]["onnxruntime"]["available"]


def test_export_torch_builds_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # The torch backend is eager itself: its parity is 0 by construction, so it is not the
    # check here (the onnxruntime test below measures a real one, and the next test shows
    # the gate fails a backend that differs).
    assert main(["export", "--backend", "torch", "--cache-dir", str(tmp_path)]) == 0
    assert "ready" in capsys.readouterr().out
    assert main(["export", "--list", "--cache-dir", str(tmp_path)]) == 0
    assert "0 artifacts" in capsys.readouterr().out


def test_export_fails_a_backend_that_differs_from_eager(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from talkstream.export.eager import TorchModels

    eager = TorchModels.denoiser

    def off_by_a_little(self: TorchModels, *args: object, **kw: object) -> object:
        return eager(self, *args, **kw) + 0.05  # type: ignore[arg-type]

    monkeypatch.setattr(TorchModels, "denoiser", off_by_a_little)
    assert main(["export", "--backend", "torch", "--no-cache"]) == 1
    out = capsys.readouterr().out
    assert "error: torch differs from eager by 5.00e-02" in out
    # The motion network was left alone: its parity line still reads 0.
    assert "parity vs eager, motion (lookahead 2): max abs error 0.00e+00" in out


@pytest.mark.skipif(not HAS_ORT, reason="needs the export extra (onnxruntime)")
def test_export_onnxruntime_builds_caches_and_lists(
    capsys: pytest.CaptureFixture[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The export and backend tests' shared cache: the tiny graphs are usually there already.
    cache = tmp_path_factory.getbasetemp() / "talkstream-shared-cache"
    args = ["export", "--backend", "onnxruntime", "--cache-dir", str(cache)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[export] backend onnxruntime, preset tiny" in out
    assert "motion_la2" in out and "denoiser_loop_999" in out
    assert "parity vs eager, denoiser (1 steps)" in out
    # onnxruntime runs its own kernels: small, non-zero differences from eager, all in budget.
    errs = [float(x) for x in re.findall(r"max abs error ([0-9.e+-]+)", out)]
    assert len(errs) == 2 and max(errs) < 1e-3 and max(errs) > 0, errs
    assert f"artifacts cached under {cache / 'artifacts'}" in out
    # Now every artifact is a cache hit.
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "cached motion_la2" in again and "[export] exporting" not in again
    assert main(["export", "--list", "--cache-dir", str(cache)]) == 0
    listed = capsys.readouterr().out
    assert "onnx/motion_la2-" in listed and "artifacts under" in listed


def test_export_list_without_cache(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["export", "--list", "--no-cache"]) == 0
    assert "nothing is cached" in capsys.readouterr().out
    assert main(["export", "--list", "--cache-dir", str(tmp_path)]) == 0
    assert "0 artifacts" in capsys.readouterr().out


def test_doctor_reports_the_optional_components(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from talkstream.export import cli as export_cli

    rows = export_cli.components_report()
    for name in ("dlib", "aiortc", "pyaudio", "espeak-ng", "pipecat", "livekit", "ray"):
        row = rows[name]
        assert row["for"] and isinstance(row["installed"], bool)
        assert row["installed"] == ("install" not in row)
    assert rows["dlib"]["extra"] == "detect" and rows["ray"]["extra"] == "cluster"
    # What is missing is named with its install line; pyaudio with its Debian package.
    real = importlib.util.find_spec

    def hide(name: str, *args: object) -> object:
        return None if name in ("ray", "pyaudio") else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", hide)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "components:" in out and "to install what is missing:" in out
    assert "ray: pip install 'talkstream[cluster]'" in out
    assert (
        "pyaudio: on Debian/Ubuntu first: sudo apt-get install portaudio19-dev, then "
        "pip install 'talkstream[live]'" in out
    )
    assert "espeak-ng" in out and "aiortc" in out
