"""``talkstream landmarks``: the detected landmarks of a photo, saved as what --landmarks takes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from talkstream.cli import main
from talkstream.config import AvatarConfig
from talkstream.engine import avatar as av
from talkstream.engine.landmarks import LANDMARKS_FORMAT, load_landmarks_json
from tests.conftest import speechlike

pytest.importorskip("dlib", reason="detection needs the [detect] extra (dlib)")


@pytest.mark.slow
def test_landmarks_round_trip_through_render(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = tmp_path / "me.png"
    Image.fromarray(av.default_image()).save(photo)
    out = tmp_path / "me.json"
    assert main(["landmarks", str(photo), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "--landmarks" in printed
    data = json.loads(out.read_text())
    assert data["format"] == LANDMARKS_FORMAT and data["scheme"] == "ibug68"
    points = load_landmarks_json(out)
    # dlib on the photo gives the packaged landmarks of the same face (made the same way).
    np.testing.assert_allclose(points, av.default_landmarks(), atol=1.0)
    # render takes the file and uses exactly its points.
    src = av.load_avatar_source(photo, out, AvatarConfig())
    assert src.face.detector is None
    np.testing.assert_array_equal(src.face.points, points)
    wav = tmp_path / "a.wav"
    sf.write(wav, speechlike(16000 // 4), 16000)
    video = tmp_path / "me.mp4"
    rc = main(
        [
            "render", "--image", str(photo), "--landmarks", str(out), "--audio", str(wav),
            "--out", str(video), "--no-progress", "--no-cache",
        ]
    )  # fmt: skip
    assert rc == 0 and video.stat().st_size > 0


@pytest.mark.slow
def test_landmarks_default_out_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = tmp_path / "me.jpg"
    Image.fromarray(av.default_image()).save(photo, quality=95)
    assert main(["landmarks", str(photo)]) == 0
    assert (tmp_path / "me.landmarks.json").is_file()
    capsys.readouterr()
    wall = tmp_path / "wall.png"
    Image.fromarray(np.full((200, 300, 3), 128, np.uint8)).save(wall)
    assert main(["landmarks", str(wall)]) == 2
    err = capsys.readouterr().err
    assert "no face found" in err and "Traceback" not in err
    assert main(["landmarks", str(photo), "--out", str(tmp_path / "no" / "f.json")]) == 2
    assert "cannot write" in capsys.readouterr().err
