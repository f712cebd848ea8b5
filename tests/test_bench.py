"""The benchmark harness: scenarios, a tiny real run, reports, plots, the sessions search, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from talkstream.benchmarking import report
from talkstream.benchmarking.memory import host_peak, reset_host_peak, run_child_measuring_rss
from talkstream.benchmarking.runner import run_scenario
from talkstream.benchmarking.scenario import Scenario
from talkstream.benchmarking.throughput import Probe, confirm_sessions, search_max_sessions
from talkstream.benchmarking.wav2lip import Wav2LipEquivalent, Wav2LipShapes
from talkstream.cli import main
from talkstream.config import EngineConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_summary(s: dict[str, Any]) -> None:
    assert s["n"] >= 1
    assert 0 <= s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]


# -- scenarios ---------------------------------------------------------------------------------


def test_scenario_defaults_name_and_round_trip() -> None:
    sc = Scenario()
    assert sc.name == "tiny-auto-1step-1sess-cpu-float32"  # serve's backend choice
    assert sc.crop_size() == 128 and sc.frames_per_iter == 1
    other = Scenario(preset="base", sessions=4, batch=2, resolution=96, frame_size=(640, 360))
    assert other.crop_size() == 96 and other.frames_per_iter == 8
    assert "96px" in other.name and "640x360" in other.name
    again = Scenario.from_dict(json.loads(json.dumps(other.to_dict())))
    assert again == other


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"preset": "huge"}, ValueError, "preset must be one of"),
        ({"backend": "tvm"}, ValueError, "backend must be one of"),
        ({"dtype": "int8"}, ValueError, "dtype"),
        ({"device": "gpu"}, ValueError, "device must be"),
        ({"steps": 5}, ValueError, r"steps must be in 1\.\.4"),
        ({"steps": 0}, ValueError, "steps must be at least 1"),
        ({"batch": 0}, ValueError, "batch must be at least 1"),
        ({"sessions": True}, TypeError, "sessions must be an int"),
        ({"iters": 2.5}, TypeError, "iters must be an int"),
        ({"resolution": 100}, ValueError, "multiple of 16"),
        ({"frame_size": (641, 360)}, ValueError, "even"),
        ({"frame_size": (640,)}, ValueError, "width, height"),
        ({"kernels": "triton"}, ValueError, "kernels"),
        ({"encode": "yes"}, TypeError, "encode must be a bool"),
    ],
)
def test_scenario_rejects_bad_values(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Scenario(**kwargs)


def test_scenario_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown scenario keys"):
        Scenario.from_dict({"preset": "tiny", "batchsize": 2})


# -- a real run --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_result() -> dict[str, Any]:
    # Two steps and two sessions, every stage. torch: no ONNX export in a unit test (the
    # default, auto, is what serve runs; test_default_backend_is_serves covers it).
    sc = Scenario(steps=2, sessions=2, iters=3, warmup=1, backend="torch")
    return run_scenario(sc, EngineConfig())


def test_run_scenario_reports_every_stage(tiny_result: dict[str, Any]) -> None:
    r = tiny_result
    assert r["status"] == "ok" and r["frames_per_iteration"] == 2
    # The engine's own calls (render, with the backend's motion and sampler observed inside
    # it; each session's compose), then what serve sends: yuv420p and VP8.
    expected = [
        "audio",
        "items",
        "render",
        "render.motion",
        "render.denoise",
        "post",
        "i420",
        "vp8",
    ]
    assert r["stage_order"] == expected
    for name in expected:
        _check_summary(r["stages"][name])
        assert r["stages"][name]["n"] == 3
    for name in ("core", "frame", "send", "unattributed"):
        _check_summary(r["derived"][name])
    st = r["stages"]
    # Sub-stages are inside their stage (same iterations, so per-iteration sums hold).
    inside = np.add(r["samples_ms"]["render.motion"], r["samples_ms"]["render.denoise"])
    assert np.all(inside <= np.asarray(r["samples_ms"]["render"]) + 1e-3)
    # core = render + post, measured around both; frame = the whole iteration.
    core = np.asarray(r["samples_ms"]["core"])
    assert np.all(core >= np.add(r["samples_ms"]["render"], r["samples_ms"]["post"]) - 1e-3)
    assert r["derived"]["frame"]["max"] >= r["derived"]["core"]["min"]
    assert st["vp8"]["p50"] > 0 and st["i420"]["p50"] > 0
    assert r["backend_name"] == "torch" and r["backend"].startswith("torch")
    assert r["fps"] > 0 and r["frames"] == 6
    assert r["fps_per_session"] == pytest.approx(r["fps"] / 2)
    # VP8 RTP payloads, one encoder per session, every measured and warm-up frame.
    assert r["encoded"]["codec"].startswith("vp8") and r["encoded"]["frames"] == 8
    assert r["encoded"]["bytes"] > 0
    w = r["warmup"]
    assert w["model_load_s"] > 0 and w["first_iteration_ms"] > 0 and w["warmup_iterations"] == 1
    assert r["memory"]["host_peak_mib"] > 50
    assert len(r["samples_ms"]["render.denoise"]) == 3
    json.dumps(r)  # JSON-ready as is


def test_markdown_and_plots(tiny_result: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = {
        "schema": report.SCHEMA,
        "created": "2026-01-01T00:00:00+00:00",
        "command": "talkstream bench",
        "machine": report.machine_info(),
        "scenarios": [tiny_result],
        "throughput": {
            "budget_ms": 40.0,
            "predicted_sessions": 2,
            "sessions_per_device": 2,
            "fps": 50,
            "probes": [
                Probe(1, [0.01, 0.012]).to_dict(0.04),
                Probe(2, [0.02, 0.022]).to_dict(0.04),
            ],
            "confirmations": [
                {"sessions": 2, "seconds": 1.0, "frames_dropped": 0, "frames_late": 0}
            ],
        },
    }
    md = report.render_markdown(result)
    assert tiny_result["name"] in md
    assert "| stage | p50 ms | p90 ms | p99 ms | mean ms |" in md
    assert "| render.denoise |" in md and "Engine.render" in md
    assert "| tiny-torch-2step-2sess-cpu-float32 | torch |" in md  # the backend that ran
    assert "Sessions per device: 2" in md
    files = report.write_plots(result, tmp_path)
    names = {f.name for f in files}
    assert f"latency-{tiny_result['name']}.png" in names and "throughput.png" in names
    for f in files:
        assert f.read_bytes()[:8] == PNG_MAGIC


def test_target_scenario_detection() -> None:
    assert report.is_target_scenario(Scenario().to_dict())
    assert not report.is_target_scenario(Scenario(sessions=2).to_dict())
    assert not report.is_target_scenario(Scenario(steps=2).to_dict())


# -- throughput search -------------------------------------------------------------------------


def _linear_probe(per_session_s: float, calls: list[int] | None = None) -> Any:
    def probe(n: int) -> Probe:
        if calls is not None:
            calls.append(n)
        return Probe(n, [per_session_s * n] * 5)

    return probe


def test_search_max_sessions_trivial_cases() -> None:
    calls: list[int] = []
    res = search_max_sessions(_linear_probe(0.009, calls), budget_s=0.04, max_sessions=64)
    assert res.max_sessions == 4  # 4 x 9 ms fits 40 ms, 5 x 9 ms does not
    assert calls == [1, 2, 4, 8, 6, 5]  # doubling, then bisection; nothing probed twice
    assert search_max_sessions(_linear_probe(0.05), budget_s=0.04).max_sessions == 0
    capped = search_max_sessions(_linear_probe(0.001), budget_s=0.04, max_sessions=10)
    assert capped.max_sessions == 10
    with pytest.raises(ValueError, match="max_sessions"):
        search_max_sessions(_linear_probe(0.001), max_sessions=0)


def test_confirm_sessions_bisects_below_a_failed_candidate() -> None:
    tried: list[int] = []

    def sustained(n: int) -> bool:
        tried.append(n)
        return n <= 5

    assert confirm_sessions(sustained, 5) == 5 and tried == [5]
    tried.clear()
    assert confirm_sessions(sustained, 16) == 5
    assert tried[0] == 16 and len(tried) <= 6
    assert confirm_sessions(lambda n: False, 4) == 0
    assert confirm_sessions(sustained, 0) == 0


# -- memory, anchors ---------------------------------------------------------------------------


def test_child_peak_rss_and_host_peak(tmp_path: Path) -> None:
    code = "b = bytearray(150 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])"
    run = run_child_measuring_rss([sys.executable, "-c", code], tmp_path / "log", 60)
    assert run.returncode == 0
    assert run.max_rss_bytes > 150 * 1024 * 1024
    peak = host_peak(reset_host_peak())
    assert peak.bytes > 0 and peak.scope in ("scenario", "process")
    with pytest.raises(subprocess.TimeoutExpired):
        run_child_measuring_rss(
            [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "log2", 0.3
        )


def test_wav2lip_equivalent_shapes() -> None:
    model = Wav2LipEquivalent().eval()
    shapes = Wav2LipShapes(batch=1)
    with torch.inference_mode():
        out = model(torch.randn(shapes.mel), torch.randn(shapes.face))
    assert out.shape == (1, 3, 96, 96)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    # The published generator has about 36.3 M parameters.
    assert 36.0e6 < model.num_parameters() < 36.6e6


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--quick", "--anchors", "--memory", "--backend", "--sessions", "--preset"):
        assert flag in text


def test_cli_quick_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    plots = "--no-plots"
    try:
        import matplotlib  # noqa: F401

        plots = ""
    except ModuleNotFoundError:
        pass
    argv = [
        "bench",
        "--quick",
        "--backend",
        "torch",  # no ONNX export here; the default (auto) is checked without a run
        "--sessions",
        "1",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--e2e-seconds",
        "0.5",
        "--max-sessions",
        "1",
        "--confirm-seconds",
        "0.2",
        "--out",
        str(out),
    ] + ([plots] if plots else [])
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "## Scenarios" in printed and "Issue-3 target" in printed
    assert "## End-to-end latency" in printed and "## Throughput" in printed
    result = json.loads((out / "bench.json").read_text())
    assert result["schema"] == report.SCHEMA
    assert [s["name"] for s in result["scenarios"]] == ["tiny-torch-1step-1sess-cpu-float32"]
    e2e = result["e2e"]
    assert e2e["lookahead_ms"] == pytest.approx(80.0)
    assert e2e["frames_measured"] >= 1
    for key in ("total", "audio_wait", "compute", "encode", "total_encoded"):
        _check_summary(e2e[key])
    # Waiting for the lookahead's audio is part of the total and never longer than it.
    assert e2e["audio_wait"]["min"] <= e2e["total"]["max"]
    thr = result["throughput"]
    # Either figure may be 0 or 1 on a loaded machine; each must follow from what was measured.
    probe1 = thr["probes"][0]
    assert probe1["sessions"] == 1 and probe1["tick"]["n"] >= 1
    assert thr["predicted_sessions"] == int(probe1["fits_budget"])
    if thr["predicted_sessions"]:
        first = thr["confirmations"][0]  # the paced run of the one session the probe allowed
        assert first["sessions"] == 1 and first["frames_rendered"] > 0
        assert first["sustained"] == (first["frames_dropped"] == first["frames_late"] == 0)
    else:
        assert thr["confirmations"] == []  # nothing to confirm
    confirmed = any(c["sessions"] == 1 and c["sustained"] for c in thr["confirmations"])
    assert thr["sessions_per_device"] == int(confirmed)
    assert thr["fps"] == 25 * thr["sessions_per_device"]
    assert (out / "bench.md").read_text().startswith("# talkstream bench")
    if not plots:
        assert (out / "throughput.png").read_bytes()[:8] == PNG_MAGIC
        assert (out / "e2e.png").is_file()
    table = report.summarize_dir(tmp_path)
    assert "tiny-torch-1step-1sess-cpu-float32" in table and "e2e latency" in table


def test_cli_unavailable_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = [
        "bench",
        "--backend",
        "tensorrt",
        "--sessions",
        "1",
        "--iters",
        "1",
        "--e2e-seconds",
        "0",
        "--no-throughput",
        "--no-plots",
        "--out",
        str(tmp_path),
    ]
    assert main(common) == 2
    assert "backend 'tensorrt' cannot run on cpu" in capsys.readouterr().err
    assert main([*common, "--skip-unavailable"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["scenarios"][0]["status"] == "skipped"
    assert "skipped" in capsys.readouterr().out


def test_scenario_file_iteration_counts(tmp_path: Path) -> None:
    from talkstream.benchmarking.cli import build_scenarios
    from talkstream.cli import build_parser

    f = tmp_path / "s.json"
    f.write_text(json.dumps([{"sessions": 2}, {"preset": "base", "iters": 7}]))
    parse = build_parser().parse_args
    a, b = build_scenarios(parse(["bench", "--scenario-file", str(f)]))
    assert (a.sessions, a.iters, a.warmup) == (2, 50, 5)  # the run's defaults
    assert (b.preset, b.iters) == ("base", 7)  # the file's own
    a, b = build_scenarios(parse(["bench", "--scenario-file", str(f), "--quick"]))
    assert (a.iters, b.iters) == (6, 7)
    a, b = build_scenarios(parse(["bench", "--scenario-file", str(f), "--iters", "3"]))
    assert (a.iters, b.iters) == (3, 3)  # explicit flags win


def test_cli_bad_scenario_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "s.json"
    f.write_text(json.dumps([{"preset": "tiny", "batch": 0}]))
    assert main(["bench", "--scenario-file", str(f), "--out", str(tmp_path)]) == 2
    assert "batch must be at least 1" in capsys.readouterr().err


def test_cli_keep_going_records_a_failed_scenario(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from talkstream.benchmarking import runner

    def broken(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise RuntimeError("inductor cache race")

    monkeypatch.setattr(runner, "run_scenario", broken)
    argv = [
        "bench",
        "--sessions",
        "1,2",
        "--e2e-seconds",
        "0",
        "--no-throughput",
        "--no-plots",
        "--out",
        str(tmp_path),
    ]
    with pytest.raises(RuntimeError, match="inductor"):
        main(argv)  # without --keep-going the first failure ends the run, traceback and all
    assert main([*argv, "--keep-going"]) == 1
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [s["status"] for s in result["scenarios"]] == ["failed", "failed"]
    assert "RuntimeError: inductor cache race" in result["scenarios"][0]["reason"]
    assert "2 scenario(s) failed" in capsys.readouterr().out


def _throughput_table(md: str) -> list[dict[str, str]]:
    """The rows of the throughput section's table, as dicts by column name."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True))
        for ln in lines[2:]
    ]


@pytest.mark.parametrize(
    ("predicted", "confirmed", "confirmations"),
    [
        # Issues 14/15: "Sessions per device: 0" printed next to a row saying 1 fits.
        (1, 0, [{"sessions": 1, "seconds": 2.0, "frames_dropped": 3, "frames_late": 1}]),
        (
            4,
            2,
            [
                {"sessions": 4, "seconds": 2.0, "frames_dropped": 1, "frames_late": 0},
                {"sessions": 2, "seconds": 2.0, "frames_dropped": 0, "frames_late": 0},
            ],
        ),
        (2, 2, [{"sessions": 2, "seconds": 2.0, "frames_dropped": 0, "frames_late": 0}]),
        (0, 0, []),
    ],
)
def test_headline_agrees_with_the_table(
    predicted: int, confirmed: int, confirmations: list[dict[str, Any]]
) -> None:
    """No row of the table may say more sessions fit than the headline's figure."""
    budget = 0.04
    probes = [Probe(n, [0.01 * n, 0.011 * n]).to_dict(budget) for n in (1, 2, 4, 8)]
    for p in probes:  # the unpaced search's verdict, as search_max_sessions made it
        p["fits_budget"] = p["sessions"] <= predicted
    t = {
        "budget_ms": 40.0,
        "predicted_sessions": predicted,
        "sessions_per_device": confirmed,
        "fps": 25 * confirmed,
        "probes": probes,
        "confirmations": confirmations,
    }
    md = "\n".join(report._throughput_section(t))
    headline = report.throughput_headline(t)
    assert headline.startswith(f"**Sessions per device: {confirmed}** ({25 * confirmed} fps")
    rows = _throughput_table(md)
    sustained = [int(r["sessions"]) for r in rows if r["sustained"] == "yes"]
    assert max(sustained, default=0) == confirmed, (rows, headline)
    assert all(n <= confirmed for n in sustained)
    fits = [int(r["sessions"]) for r in rows if r["worker alone fits"] == "yes"]
    assert max(fits, default=0) == predicted
    if predicted > confirmed:
        assert f"the inference worker alone fits {predicted}" in headline
        failed = [r for r in rows if int(r["sessions"]) == confirmations[0]["sessions"]]
        assert failed[0]["sustained"].startswith(
            f"no ({confirmations[0]['frames_dropped']} dropped"
        )


def test_default_backend_is_serves() -> None:
    """bench times what serve runs: the default backend is serve's (auto)."""
    from talkstream.benchmarking.cli import build_scenarios
    from talkstream.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["serve"]).engine_backend == "auto"
    (sc,) = build_scenarios(parse(["bench", "--sessions", "1"]))
    assert sc.backend == "auto" and Scenario().backend == "auto"
