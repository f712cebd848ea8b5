"""The busy-machine hint: other processes' CPU share, and one line when the frame rate falls."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import soundfile as sf

from talkstream import busy
from talkstream.config import Config, RenderConfig
from talkstream.engine import render as render_mod
from talkstream.engine.avatar import Avatar
from talkstream.engine.pipeline import Engine
from tests.conftest import speechlike

Times = namedtuple("Times", "user system children_user children_system elapsed")


def _stat(path: Path, busy_ticks: int, idle_ticks: int) -> None:
    # user nice system idle iowait irq softirq steal: busy split over user and system.
    path.write_text(
        f"cpu  {busy_ticks // 2} 0 {busy_ticks - busy_ticks // 2} {idle_ticks} 0 0 0 0 0 0\n"
        "cpu0 0 0 0 0 0 0 0 0 0 0\n"
    )


def test_cpu_share_subtracts_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stat = tmp_path / "stat"
    clock = iter([100.0, 102.0])
    own = iter([Times(1.0, 0.0, 0, 0, 0), Times(2.5, 0.5, 0, 0, 0)])
    monkeypatch.setattr(busy.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(busy.os, "times", lambda: next(own))
    monkeypatch.setattr(busy.os, "sysconf", lambda name: 100)
    _stat(stat, 1000, 5000)
    share = busy.CpuShare(stat)
    # 2 s later the machine was busy for 5 s of CPU (500 ticks); this process took 2 of them.
    _stat(stat, 1500, 5000)
    assert share.others_cores() == pytest.approx(1.5)


def test_cpu_share_without_proc_stat(tmp_path: Path) -> None:
    assert busy.CpuShare(tmp_path / "missing").others_cores() is None


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux's /proc/stat")
def test_cpu_share_sees_a_real_busy_process() -> None:
    share = busy.CpuShare()
    loop = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        time.sleep(1.5)
        others = share.others_cores()
    finally:
        loop.kill()
        loop.wait()
    assert others is not None and others >= 0.5, others


class FakeCpu:
    def __init__(self, cores: float | None) -> None:
        self.cores = cores

    def others_cores(self) -> float | None:
        return self.cores


def _hint(others: float | None, threads: int | None) -> tuple[busy.SlowdownHint, list[str]]:
    said: list[str] = []
    now = [0.0]
    hint = busy.SlowdownHint(
        said.append,
        threads=threads,
        cpu=FakeCpu(others),
        clock=lambda: now[0],  # type: ignore[arg-type]
    )
    hint.now = now  # type: ignore[attr-defined]
    return hint, said


def test_hint_speaks_once_when_slow_and_others_are_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(busy, "usable_cores", lambda: 2)
    hint, said = _hint(1.9, threads=2)
    hint.now[0] = 1.0  # type: ignore[attr-defined]
    assert hint.update(3) is None  # within the first window: no verdict yet
    hint.now[0] = 3.0  # type: ignore[attr-defined]
    line = hint.update(9)  # 3 fps
    assert line == said[0]
    assert line.startswith("rendering at 3.0 fps: other processes are using 1.9 of the 2 CPU")
    assert "speeds up when they finish" in line and line.endswith("--threads 1 may help")
    hint.now[0] = 6.0  # type: ignore[attr-defined]
    assert hint.update(12) is None and len(said) == 1  # once


def test_hint_advice_with_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(busy, "usable_cores", lambda: 2)
    hint, said = _hint(1.0, threads=1)
    hint.now[0] = 3.0  # type: ignore[attr-defined]
    assert hint.update(30) is not None
    assert "speeds up when they finish" in said[0] and "--threads" not in said[0]


@pytest.mark.parametrize(("others", "frames"), [(0.1, 9), (None, 9), (1.9, 90)])
def test_hint_stays_quiet(others: float | None, frames: int) -> None:
    # Slow but nobody else busy (a large model), no /proc/stat, or fast despite the others.
    hint, said = _hint(others, threads=2)
    hint.now[0] = 3.0  # type: ignore[attr-defined]
    assert hint.update(frames) is None and said == []


def test_render_prints_the_hint(
    tmp_path: Path,
    tiny_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The render loop feeds the hint: with a machine reported busy and a real-time bar no
    render reaches, the line is logged (once)."""

    class Busy(busy.SlowdownHint):
        def __init__(self, say, **kw):  # type: ignore[no-untyped-def]
            super().__init__(say, min_fps=1e9, window_s=0.0, cpu=FakeCpu(1.8), **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(render_mod, "SlowdownHint", Busy)
    wav = tmp_path / "a.wav"
    sf.write(wav, speechlike(16000 // 2), 16000)
    with caplog.at_level(logging.WARNING, logger="talkstream.engine.render"):
        render_mod.render_to_file(
            Config(render=RenderConfig(out=tmp_path / "o.mp4", audio=wav, progress=False)),
            tiny_engine,
        )
    lines = [r.getMessage() for r in caplog.records if "other processes" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("rendering at ")


def test_live_loop_feeds_the_hint(
    tiny_engine: Engine, default_avatar: Avatar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``talkstream live`` gives the same line from its frame loop."""
    from talkstream.streaming import live
    from tests.test_live import _run_loop, _speech

    said: list[str] = []

    class Busy(busy.SlowdownHint):
        def __init__(self, say, **kw):  # type: ignore[no-untyped-def]
            kw.pop("min_fps")
            super().__init__(said.append, min_fps=1e9, window_s=0.0, cpu=FakeCpu(1.8), **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(live, "SlowdownHint", Busy)
    _run_loop(tiny_engine, default_avatar, _speech(0.4), realtime=False)
    assert len(said) == 1 and said[0].startswith("the live avatar renders at ")
