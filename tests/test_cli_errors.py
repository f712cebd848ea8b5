"""One-line errors (cause and fix, no traceback) for what a newcomer gets wrong (issue 14)."""

from __future__ import annotations

import errno
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from talkstream.cli import build_parser, default_threads, main
from talkstream.errors import TalkstreamError
from talkstream.streaming.bind import bind_error, check_bind
from tests.conftest import speechlike

REPO = Path(__file__).resolve().parent.parent


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


def _render(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    argv = ["render", "--no-progress", "--no-cache", *args]
    if "--out" not in args:
        argv += ["--out", str(tmp_path / "o.mp4")]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--threads", "0"], ["--threads", "1 or more"]),
        (["--threads", "-1"], ["--threads", "1 or more"]),
        (["--threads", "two"], ["--threads", "whole number"]),
        (["--crf", "99"], ["--crf", "0-51"]),
        (["--crf", "-1"], ["--crf", "0-51"]),
    ],
)
def test_bad_flag_values_are_one_argparse_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], words: list[str]
) -> None:
    rc, err = _render(flags, tmp_path, capsys)
    line = _one_line(err)
    assert rc == 2 and line.startswith("talkstream render: error:")
    assert all(w in line for w in words) and "--help" in line


def test_crf_range_is_accepted(tmp_path: Path) -> None:
    for crf in ("0", "51"):
        assert build_parser().parse_args(["render", "--crf", crf]).crf == int(crf)


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("render.crf=99", ["crf 99", "0-51"]),
        ("engine.sampler.nope=1", ["engine.sampler", "'nope'", "steps"]),
        ("serve.stream.compute_budget_ms=60", ["render does not use the 'serve' section"]),
        ("engine.threads=two", ["engine.threads"]),
        ("crf", ["section.key=value"]),
    ],
)
def test_set_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, words: list[str]
) -> None:
    rc, err = _render(["--set", setting], tmp_path, capsys)
    line = _one_line(err)
    assert rc == 2 and line.startswith("talkstream: error: --set")
    assert all(w in line for w in words), line
    assert not (tmp_path / "o.mp4").exists()


def test_set_reaches_the_config_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wav = tmp_path / "a.wav"
    sf.write(wav, speechlike(3200), 16000)
    moved = tmp_path / "elsewhere.mp4"
    rc, err = _render(["--audio", str(wav), "--set", f'render.out="{moved}"'], tmp_path, capsys)
    assert rc == 0, err
    assert moved.stat().st_size > 100 and not (tmp_path / "o.mp4").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_device_cuda_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _render(["--device", "cuda"], tmp_path, capsys)
    line = _one_line(err)
    assert rc == 2 and "--device cuda" in line and "--device cpu" in line
    rc, err = _render(["--device", "gpu0"], tmp_path, capsys)
    assert rc == 2 and "not a device name" in _one_line(err)


@pytest.mark.skipif(
    torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None,
    reason="TensorRT can run here",
)
def test_backend_tensorrt_on_a_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _render(["--backend", "tensorrt"], tmp_path, capsys)
    line = _one_line(err)
    assert rc == 2 and "--backend tensorrt cannot run here" in line
    assert "CUDA" in line and "--backend auto" in line


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_out_in_an_unwritable_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _render(["--out", "/proc/x.mp4"], tmp_path, capsys)
    line = _one_line(err)
    assert rc == 2 and "/proc/x.mp4" in line and "choose --out" in line


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_wav_with_nan_or_inf_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: float
) -> None:
    x = speechlike(16000)
    x[12000] = bad
    wav = tmp_path / "bad.wav"
    sf.write(wav, x, 16000, subtype="FLOAT")
    rc, err = _render(["--audio", str(wav)], tmp_path, capsys)
    line = _one_line(err)
    assert rc == 2 and "bad.wav" in line and "NaN or infinity" in line and "0.75 s" in line
    assert not (tmp_path / "o.mp4").exists()


def test_audio_reader_refuses_non_finite_blocks(tmp_path: Path) -> None:
    from talkstream.engine.audio import AudioFileReader, load_audio
    from talkstream.errors import InputError

    x = np.stack([speechlike(8000), speechlike(8000, seed=1)], 1)
    x[7000, 1] = np.nan
    wav = tmp_path / "s.wav"
    sf.write(wav, x, 16000, subtype="DOUBLE")
    with AudioFileReader(wav) as r:
        assert r.is_float
        blocks = r.blocks(1000)
        for _ in range(7):  # the blocks before the bad sample come out
            next(blocks)
        with pytest.raises(InputError, match=r"from 0\.44 s"):
            next(blocks)
    with pytest.raises(InputError, match="NaN"):
        load_audio(wav)
    # Integer PCM cannot hold NaN: nothing to scan.
    sf.write(wav, speechlike(8000), 16000, subtype="PCM_16")
    with AudioFileReader(wav) as r:
        assert not r.is_float
        r.check_finite()


# -- serve: where it listens -----------------------------------------------------------------


def test_serve_on_a_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("aiortc", reason="serve needs the [serve] extra")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = main(["serve", "--port", str(port), "--no-cache"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and f"port {port} is already in use" in line and "--port" in line


def test_check_bind_names_cause_and_fix() -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never an address of this machine.
    with pytest.raises(TalkstreamError, match="not an address of this machine") as e:
        check_bind("192.0.2.1", 0)
    assert "--host 127.0.0.1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TalkstreamError, match="not an address or a known name"):
        check_bind("no-such-host.invalid", 0)
    with pytest.raises(TalkstreamError, match="not a TCP port"):
        check_bind("127.0.0.1", 70000)
    check_bind("127.0.0.1", 0)  # a free port: no error


def test_bind_error_wording() -> None:
    taken = bind_error(OSError(errno.EADDRINUSE, "Address already in use"), "0.0.0.0", 8080)
    assert "port 8080 is already in use" in str(taken)
    priv = bind_error(OSError(errno.EACCES, "Permission denied"), "::1", 80)
    assert "[::1]:80" in str(priv) and "1024" in str(priv)


def test_serve_entry_point_prints_no_traceback() -> None:
    """The installed entry point, in a process of its own: the user's view exactly."""
    pytest.importorskip("aiortc", reason="serve needs the [serve] extra")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "talkstream.cli", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
    assert proc.returncode == 2
    assert "already in use" in _one_line(proc.stderr)


# -- a busy machine ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "env", "preload", "want"),
    [
        ("landmarks", {}, False, "PASSIVE"),  # idle OpenMP threads sleep
        ("landmarks", {"OMP_WAIT_POLICY": "ACTIVE"}, False, "ACTIVE"),  # the user's choice wins
        ("landmarks", {}, True, None),  # torch already loaded: too late to matter, not set
        ("bench", {}, False, None),  # bench keeps OpenMP's default: comparable figures
    ],
)
def test_omp_wait_policy(
    command: str, env: dict[str, str], preload: bool, want: str | None
) -> None:
    args = (
        ["landmarks", "/nonexistent.jpg"]
        if command == "landmarks"
        else ["bench", "--summarize", "/nonexistent"]
    )
    script = (
        ("import torch\n" if preload else "")
        + "import os\nfrom talkstream.cli import main\n"
        + "try:\n    main("
        + repr(args)
        + ")\nexcept SystemExit:\n    pass\n"
        + "print('POLICY', os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=environ
    ).stdout
    assert f"POLICY {want}" in out, out


def test_default_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_threads("cpu") == 1
    assert default_threads("cuda") is None
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_threads("cpu") is None  # torch's own count


def test_render_config_gets_the_default_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from talkstream.cli import _engine_config

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert _engine_config(build_parser().parse_args(["render"])).threads == 1
    assert _engine_config(build_parser().parse_args(["serve"])).threads == 1
    a = build_parser().parse_args(["render", "--threads", "3"])
    assert _engine_config(a).threads == 3
    # bench keeps torch's own count: its figures stay comparable with earlier runs.
    assert _engine_config(build_parser().parse_args(["bench"])).threads is None
