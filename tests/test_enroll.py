"""``talkstream enroll``: corpus for the photo, fine-tuning from a checkpoint, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from talkstream.cli import main
from talkstream.engine.avatar import default_image, default_landmarks
from talkstream.engine.checkpoint import load_checkpoint, save_checkpoint
from talkstream.engine.landmarks import save_landmarks_json
from talkstream.errors import TalkstreamError
from talkstream.training.enroll import EnrollConfig, enroll_train_config
from tests.test_train_support import (
    one_thread,  # noqa: F401 (a fixture)
    small_models_128,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_enroll_config_fine_tunes_the_student_without_a_teacher(tmp_path: Path) -> None:
    cfg = enroll_train_config(
        EnrollConfig(image=Path("me.jpg"), out=tmp_path, minutes=1.5, steps=40), tmp_path / "init"
    )
    assert cfg.stages == ("distill", "e2e")
    assert cfg.init == str(tmp_path / "init")
    assert cfg.distill.teacher_weight == 0 and cfg.distill.student_init == "init"
    assert cfg.e2e.steps == 20
    assert cfg.data.build is not None and cfg.data.build.minutes == 1.5
    with pytest.raises(TalkstreamError, match="default checkpoint"):
        enroll_train_config(EnrollConfig(image=Path("me.jpg"), out=tmp_path), None)


def test_enroll_command_runs_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from talkstream.training.espeak import espeak_available

    if not espeak_available():
        pytest.skip("libespeak-ng is not installed (Debian: libespeak-ng1)")
    init = tmp_path / "init"
    save_checkpoint(init, small_models_128(0))
    photo = tmp_path / "me.png"
    Image.fromarray(default_image()).save(photo)
    points = tmp_path / "me.json"
    save_landmarks_json(points, default_landmarks())
    argv = [
        "enroll", "--image", str(photo), "--landmarks", str(points), "--init", str(init),
        "--minutes", "0.05", "--steps", "2", "--batch", "2", "--out", str(tmp_path / "run"),
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    final = tmp_path / "run" / "final"
    models = load_checkpoint(final)
    assert not models.meta["random_init"] and set(models.meta["stages"]) == {"distill", "e2e"}
    assert not (final / "teacher").exists()  # no teacher was trained for this face
    assert "talkstream render --checkpoint" in capsys.readouterr().out
    # Rerunning finds every stage done: nothing is retrained.
    stamp = (final / "model.safetensors").read_bytes()
    assert main(argv) == 0
    assert (final / "model.safetensors").read_bytes() == stamp


def test_training_commands_have_help(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("train", "enroll", "eval", "prepare-videos", "corpus"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: talkstream " + cmd in capsys.readouterr().out
