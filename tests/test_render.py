"""Offline render and the CLI: a real mp4 with muxed audio; bad inputs give one clear line."""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from talkstream.cli import main
from talkstream.config import Config, RenderConfig
from talkstream.engine.pipeline import Engine
from talkstream.engine.render import render_to_file
from tests.conftest import speechlike


def _probe(path: Path) -> tuple[int, float, float, int]:
    """(video frames, video fps, audio duration s, width)."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        a = c.streams.audio[0]
        n = sum(1 for _ in c.decode(v))
        fps = float(v.average_rate)
        width = v.codec_context.width
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        samples = sum(f.samples for f in c.decode(a))
        rate = a.rate
    return n, fps, samples / rate, width


def test_render_44k_stereo(tmp_path: Path, tiny_engine: Engine) -> None:
    wav = tmp_path / "speech.wav"
    x = speechlike(int(44100 * 1.3), rate=44100)
    sf.write(wav, np.stack([x, 0.5 * x], 1), 44100)
    out = tmp_path / "out.mp4"
    seen: list[int] = []
    res = render_to_file(
        Config(render=RenderConfig(out=out, audio=wav, progress=False)),
        tiny_engine,
        on_frame=lambda f: seen.append(f.pts),
    )
    expected = math.ceil(math.ceil(len(x) * 16000 / 44100) / 640)  # 33 frames for 1.3 s
    assert res.frames == expected == 33 and seen == list(range(33))
    n, fps, audio_s, width = _probe(out)
    assert n == expected and fps == 25.0 and width == 640  # the default framing, "call"
    assert audio_s == pytest.approx(1.3, abs=0.05)  # AAC priming/padding aside
    assert not list(tmp_path.glob("tmp*"))  # the temp file was renamed, nothing left over


def test_cli_render_default_face(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wav = tmp_path / "a.wav"
    sf.write(wav, speechlike(16000 // 2), 16000)
    out = tmp_path / "x.mp4"
    rc = main(["render", "--audio", str(wav), "--out", str(out), "--no-progress", "--no-cache"])
    assert rc == 0
    assert f"wrote {out}: 13 frames" in capsys.readouterr().out
    assert _probe(out)[0] == 13


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: ["--audio", str(d / "missing.wav")], "missing.wav"),
        (lambda d: ["--audio", str(_text(d / "notes.wav"))], "notes.wav"),
        (lambda d: ["--image", str(_text(d / "face.jpg"))], "face.jpg"),
        (lambda d: ["--image", str(d / "nope.png")], "nope.png"),
        (lambda d: ["--landmarks", str(_text(d / "lm.json"))], "lm.json"),
        (lambda d: ["--out", str(d / "video.gif")], ".mp4"),
        (lambda d: ["--out", str(d / "no" / "such" / "dir.mp4")], "does not exist"),
        (lambda d: ["--checkpoint", str(d)], "config.json"),
    ],
)
def test_cli_bad_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: object, message: str
) -> None:
    args = make(tmp_path)  # type: ignore[operator]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "o.mp4")]
    rc = main(["render", "--no-progress", "--no-cache", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("talkstream: error:") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "o.mp4").exists()


def test_cli_no_face(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("dlib", reason="dlib (the [detect] extra) is not installed")
    from PIL import Image

    img = tmp_path / "wall.png"
    ramp = np.linspace(0, 255, 200 * 300).reshape(200, 300).astype(np.uint8)
    Image.fromarray(np.stack([ramp] * 3, -1)).save(img)
    rc = main(
        [
            "render",
            "--image",
            str(img),
            "--out",
            str(tmp_path / "o.mp4"),
            "--no-progress",
            "--no-cache",
        ]
    )
    assert rc == 2 and "no face" in capsys.readouterr().err


def test_help_lists_render(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["render", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--image" in out and "--audio" in out and "--checkpoint" in out


def _text(p: Path) -> Path:
    p.write_text("this is not media\n")
    return p
