"""``talkstream doctor`` and ``talkstream export``: what they report and build."""

from __future__ import annotations

import importlib.util
import json
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
    assert main(["doctor", "--json", "--dtype", "bfloat16"]) == 0
    report = json.loads(capsys.readouterr().out)
    # onnxruntime runs float32 graphs only: doctor says so for bfloat16.
    assert not report["backends"]["cpu"]["onnxruntime"]["available"]


def test_export_torch_builds_nothing_and_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--backend", "torch", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "ready" in out and "parity vs eager" in out
    assert "max abs error 0.00e+00" in out


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
