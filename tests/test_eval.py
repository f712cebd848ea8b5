"""``talkstream eval`` on a tiny corpus: every metric is produced; the metric helpers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from talkstream.cli import main
from talkstream.engine.checkpoint import save_checkpoint
from talkstream.training.evaluate import (
    EvalConfig,
    _flicker,
    _speech_mask,
    evaluate,
    format_table,
    pearson,
    psnr,
)
from tests.test_train_support import (
    one_thread,  # noqa: F401 (a fixture)
    shared_corpus,
    small_models_128,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random tiny networks, with a teacher beside the student, as training exports them."""
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(d, small_models_128(0))
    save_checkpoint(d / "teacher", small_models_128(1))
    return d


def test_metric_helpers() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 1) == pytest.approx(48.13, abs=0.01)
    assert pearson(np.arange(5.0), 2 * np.arange(5.0)) == pytest.approx(1.0)
    assert pearson(np.ones(5), np.arange(5.0)) is None
    times = (np.arange(10) + 0.5) * 0.04
    speech, silence = _speech_mask(
        times, np.array([0.0, 0.12]), np.array([0.12, 0.2]), np.array(["_", "a"])
    )
    assert speech.tolist() == [False] * 3 + [True] * 2 + [False] * 5
    assert silence.tolist() == [False] * 8 + [True] * 2  # > 0.1 s after the last phoneme
    frames = np.zeros((3, 2, 2, 3), np.uint8)
    frames[2] = 10
    mask = np.ones((2, 2), bool)
    assert _flicker(frames, mask, np.array([True, False])) == 0.0
    assert _flicker(frames, mask, np.array([False, True])) == 10.0
    assert _flicker(frames, mask, np.array([False, False])) is None


def test_eval_produces_every_metric(corpus: Path, checkpoint: Path) -> None:
    res = evaluate(
        EvalConfig(
            checkpoint=checkpoint,
            corpus=corpus,
            student_steps=(1, 2),
            teacher_steps=3,
            max_frames=12,
            progress=False,
        )
    )
    m = res.metrics
    for key in (
        "lmd_lips_px",
        "lmd_lips_px_la0",
        "lmd_jaw_lips_px_la2",
        "psnr_student_1step",
        "ssim_student_2step",
        "psnr_mouth_student_1step",
        "psnr_teacher_3step",
        "student_minus_teacher_psnr_db",
        "psnr_e2e_1step",
        "flicker_speech",
        "flicker_speech_corpus",
        "detector_hit_rate",
        "detector_hit_rate_corpus",
    ):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    # None only when the sample has no silence or no detected face; this corpus sample has
    # both (the detector finds every face), so each is a number, and the r's correlations.
    for key in ("flicker_silence", "flicker_silence_corpus"):
        assert isinstance(m[key], float) and m[key] >= 0.0, key
    for key in (
        "lipsync_r",
        "lipsync_r_corpus",
        "lipsync_r_motion_landmarks",
        "lipsync_r_student_gt_landmarks",
    ):
        assert isinstance(m[key], float) and -1.0 <= m[key] <= 1.0, key
    # The detector finds the face in the corpus frames, and its lip opening there follows the
    # phonemes (0.97 here): the ceiling of the lip-sync figure, which a random model's own r
    # cannot be tested against (the shipped model's r is: tests/test_lipsync.py).
    assert m["detector_hit_rate_corpus"] >= 0.9
    assert m["lipsync_r_corpus"] >= 0.8
    assert res.info["frames"] == 12 and res.info["split"] == "heldout"
    table = format_table(res)
    assert "lipsync_r" in table and "student_minus_teacher_psnr_db" in table
    json.loads(res.to_json())  # strict JSON (no NaN)


def test_eval_cli_writes_json(
    corpus: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "e.json"
    rc = main(
        [
            "eval", "--checkpoint", str(checkpoint), "--corpus", str(corpus),
            "--max-frames", "4", "--teacher-steps", "2", "--student-steps", "1",
            "--no-lip-sync", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert "psnr_student_1step" in data["metrics"] and "lipsync_r" not in data["metrics"]
    assert "psnr_teacher_2step" in capsys.readouterr().out


def test_corpus_loads_as_training_data(corpus: Path) -> None:
    from talkstream.engine.motion import MotionConfig
    from talkstream.training.dataset import load_dataset

    data = load_dataset(corpus, "train")
    assert data.crop_size == 128 and len(data.references) == 1
    clip = data.clips[0]
    # At rest the speech landmarks are the neutral ones: the motion target starts at zero.
    assert np.abs(clip.speech[0] - clip.neutral).max() < 1e-3
    b = data.frame_batch(np.random.default_rng(0), 2, MotionConfig())
    assert b.windows is not None and b.windows.shape[1:] == (11, 8, 80)
    assert b.idle is not None and b.idle.abs().max() < 0.1  # blinks and sway are small


def test_eval_rejects_missing_corpus(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="manifest"):
        evaluate(EvalConfig(checkpoint=checkpoint, corpus=tmp_path))
