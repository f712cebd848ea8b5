"""Trainers: one short step of each stage, distillation on tiny shapes, exact resume, config."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from talkstream.config import SamplerConfig
from talkstream.engine.checkpoint import load_checkpoint
from talkstream.engine.denoiser import DenoiserConfig, TalkFormerDenoiser
from talkstream.engine.motion import AudioToMotion, MotionConfig
from talkstream.engine.sampler import FewStepSampler, NoiseSchedule
from talkstream.training.config import (
    DistillStageConfig,
    E2EStageConfig,
    MotionStageConfig,
    TeacherStageConfig,
    apply_overrides,
    load_train_config,
)
from talkstream.training.dataset import TrainData
from talkstream.training.distill import DDIMSampler, StudentTask
from talkstream.training.loop import StepRandom, lr_factor
from talkstream.training.trainer import (
    DiffusionTask,
    EndToEndTask,
    MotionTask,
    one_face_warning,
    train,
)
from tests.test_train_support import (
    DENOISER_ARCH,
    MOTION_ARCH,
    SIZE,
    one_thread,  # noqa: F401 (a fixture)
    tiny_config,
    tiny_data,
)

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> TrainData:
    return tiny_data()


def _motion() -> AudioToMotion:
    torch.manual_seed(0)
    return AudioToMotion(MotionConfig.from_dict({**MotionConfig().to_dict(), **MOTION_ARCH}))


def _denoiser() -> TalkFormerDenoiser:
    torch.manual_seed(0)
    return TalkFormerDenoiser(
        DenoiserConfig.from_dict({**DenoiserConfig().to_dict(), **DENOISER_ARCH})
    )


def _fit(
    task: torch.nn.Module, args: tuple[Any, ...], steps: int = 6, lr: float = 3e-3
) -> list[float]:
    """Losses of ``steps`` Adam steps on one fixed batch."""
    opt = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = task(*args)["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_motion_step_decreases_loss(data: TrainData) -> None:
    motion = _motion()
    cfg = MotionStageConfig()
    b = data.motion_batch(np.random.default_rng(0), 4, 3, motion.cfg, gain_jitter_db=3.0)
    assert b.windows.shape == (12, motion.cfg.window, motion.cfg.mel_rows, 80)
    assert b.target.shape == (12, 37, 2)
    losses = _fit(MotionTask(motion, cfg, SIZE), (b.windows, b.neutral, b.target, 1, 3))
    assert losses[-1] < losses[0]
    # A smaller lookahead (masked tokens) trains too.
    losses = _fit(MotionTask(motion, cfg, SIZE), (b.windows, b.neutral, b.target, 0, 3), steps=3)
    assert losses[-1] < losses[0]


def test_teacher_step_decreases_loss(data: TrainData) -> None:
    den = _denoiser()
    schedule = NoiseSchedule(SamplerConfig())
    b = data.frame_batch(np.random.default_rng(0), 4)
    g = torch.Generator().manual_seed(0)
    t = schedule.sample_timesteps(4, g)
    noise = torch.randn(b.x0.shape, generator=g)
    task = DiffusionTask(den, schedule, TeacherStageConfig())
    losses = _fit(task, (b.x0, b.landmarks, b.refs, b.ref_index, t, noise))
    assert losses[-1] < losses[0]


def test_ddim_sampler_matches_few_step_sampler() -> None:
    schedule = NoiseSchedule(SamplerConfig())
    den = _denoiser().eval()
    ref = den.encode_reference(torch.zeros(1, 3, SIZE, SIZE))
    lm = torch.rand(2, 68, 2) * 2 - 1
    noise = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        for k in (1, 2, 4):
            a = FewStepSampler(schedule, k).sample(den, noise, landmarks=lm, ref=ref)
            b = DDIMSampler(schedule, k).sample(den, noise, landmarks=lm, ref=ref)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert DDIMSampler(schedule, 25).timesteps[0] == 999


@pytest.mark.parametrize("steps", [1, 2])
def test_distill_step_decreases_loss(data: TrainData, steps: int) -> None:
    teacher = _denoiser().eval()
    schedule = NoiseSchedule(SamplerConfig())
    b = data.frame_batch(np.random.default_rng(1), 3)
    noise = torch.randn(b.x0.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = teacher.encode_reference(b.refs)
        target = DDIMSampler(schedule, 5).sample(teacher, noise, landmarks=b.landmarks, ref=ref)
    student = copy.deepcopy(teacher).train()
    task = StudentTask(student, schedule, DistillStageConfig(student_steps=(1, 2)))
    out = task(noise, b.landmarks, b.refs, b.ref_index, b.x0, target, steps)
    assert set(out) == {"loss", "gt_mse", "kd_mse"}
    # lr 1e-3: the pixel-warp head starts at "copy the photo"; 3e-3 overshoots it in 5 steps.
    args = (noise, b.landmarks, b.refs, b.ref_index, b.x0, target, steps)
    losses = _fit(task, args, steps=6, lr=1e-3)
    assert losses[-1] < losses[0]


def test_e2e_image_loss_reaches_the_motion_model(data: TrainData) -> None:
    motion, student = _motion(), _denoiser()
    schedule = NoiseSchedule(SamplerConfig())
    b = data.frame_batch(np.random.default_rng(2), 4, motion.cfg)
    noise = torch.randn(b.x0.shape, generator=torch.Generator().manual_seed(2))
    args = (
        b.windows, b.neutral, b.speech_target, b.idle, b.landmarks, b.x0, b.refs, b.ref_index,
        noise, 1, 1,
    )  # fmt: skip
    # Image loss only: any gradient on the motion model came through the landmark tokens.
    task = EndToEndTask(motion, student, schedule, E2EStageConfig(motion_weight=0.0))
    task(*args)["loss"].backward()
    grad = sum(float(p.grad.abs().sum()) for p in motion.parameters() if p.grad is not None)
    assert grad > 0
    task = EndToEndTask(motion, student, schedule, E2EStageConfig())
    losses = _fit(task, args, steps=5, lr=2e-3)
    assert losses[-1] < losses[0]


def test_lr_schedule_and_step_random_are_reproducible() -> None:
    cfg = MotionStageConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    a = StepRandom.for_step(0, "teacher", 7, 0)
    b = StepRandom.for_step(0, "teacher", 7, 0)
    c = StepRandom.for_step(0, "teacher", 7, 1)
    assert a.data.integers(1 << 30) == b.data.integers(1 << 30) != c.data.integers(1 << 30)
    assert torch.equal(torch.rand(3, generator=a.torch), torch.rand(3, generator=b.torch))
    assert a.shared.integers(1 << 30) == c.shared.integers(1 << 30)  # ranks agree


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


class _Kill(Exception):
    pass


def test_resume_after_kill_equals_uninterrupted_run(tmp_path: Path, data: TrainData) -> None:
    ref = train(tiny_config(tmp_path / "a", steps=5), data=data)
    assert set(ref.stages) == {"motion", "teacher", "distill", "e2e"}
    assert ref.final is not None and (ref.final / "teacher" / "config.json").is_file()

    killed: list[tuple[str, int]] = []

    def kill(stage: str, step: int) -> None:
        # Stop after steps that follow a checkpoint (2, 4): the resumed run redoes them.
        if (stage, step) in (("teacher", 3), ("distill", 3)) and (stage, step) not in killed:
            killed.append((stage, step))
            raise _Kill

    cfg = tiny_config(tmp_path / "b", steps=5)
    for _ in range(3):
        try:
            res = train(cfg, data=data, on_step=kill)
            break
        except _Kill:
            continue
    assert killed == [("teacher", 3), ("distill", 3)]
    assert res.final is not None
    for sub in ("", "teacher"):
        a, b = _weights(ref.final / sub), _weights(res.final / sub)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{sub}/{k} differs after resume"

    # The result is an engine checkpoint; the log has every stage.
    models = load_checkpoint(res.final)
    assert models.meta["denoiser"] == "student" and not models.meta["random_init"]
    stages = {json.loads(line)["stage"] for line in (tmp_path / "b" / "log.jsonl").open()}
    assert stages == {"motion", "teacher", "distill", "e2e"}
    # A finished run is not retrained: rerunning it only re-exports.
    again = train(cfg, data=data)
    assert again.stages == {}


def test_run_folder_refuses_other_data(tmp_path: Path, data: TrainData) -> None:
    cfg = tiny_config(tmp_path, steps=1, stages=["motion"])
    train(cfg, data=data)
    with pytest.raises(ValueError, match="seed"):
        train(apply_overrides(cfg, ["seed=5"]), data=data)


def test_distill_needs_a_teacher(tmp_path: Path, data: TrainData) -> None:
    with pytest.raises(ValueError, match="trained teacher"):
        train(tiny_config(tmp_path, steps=1, stages=["distill"]), data=data)


def test_config_files(tmp_path: Path) -> None:
    cfg = load_train_config(REPO / "configs" / "default_tiny.json")
    assert cfg.stages == ("motion", "teacher", "distill", "e2e")
    assert cfg.export == "talkstream/assets/models/tiny"
    toml = tmp_path / "c.toml"
    toml.write_text('out = "x"\nstages = ["motion"]\n[teacher]\nsteps = 7\n')
    c = load_train_config(toml, ["teacher.batch=8", "data.corpus=some/dir"])
    assert (c.out, c.stages, c.teacher.steps, c.teacher.batch) == ("x", ("motion",), 7, 8)
    assert c.data.corpus == "some/dir"
    bad = tmp_path / "bad.json"
    bad.write_text('{"teacher": {"stepz": 3}}')
    with pytest.raises(ValueError, match="stepz"):
        load_train_config(bad)
    bad.write_text('{"teacher": {"steps": "many"}}')
    with pytest.raises(ValueError, match=r"teacher\.steps"):
        load_train_config(bad)
    with pytest.raises(ValueError, match="unknown stages"):
        load_train_config(toml, ['stages=["warmup"]'])


def test_motion_stage_trains_on_its_own_landmark_corpus(tmp_path: Path) -> None:
    from talkstream.training.espeak import espeak_available

    if not espeak_available():
        pytest.skip("libespeak-ng is not installed (Debian: libespeak-ng1)")
    cfg = tiny_config(
        tmp_path,
        steps=2,
        stages=["motion"],
        data={"build": {"minutes": 0.05, "motion_minutes": 0.15, "seed": 3}},
    )
    res = train(cfg)
    main, motion = tmp_path / "corpus", tmp_path / "motion_corpus"
    m_main = json.loads((main / "manifest.json").read_text())
    m_motion = json.loads((motion / "manifest.json").read_text())
    # Frames only where the renderer needs them; more speech for the motion model.
    assert m_main["frames"] == "frames_delta" and m_motion["frames"] is None
    assert m_motion["duration_s"] > 2 * m_main["duration_s"]
    with np.load(motion / m_motion["clips"][0]["data"]) as z:
        assert "frames_delta" not in z.files and z["speech_landmarks"].ndim == 3
    # Same seed: the same held-out sentences and voices, and the same first clips.
    for key in ("available_sentence_ids", "voice_variants"):
        assert m_motion["splits"]["heldout"][key] == m_main["splits"]["heldout"][key]
    assert m_motion["clips"][0]["text"] == m_main["clips"][0]["text"]
    meta = load_checkpoint(res.final).meta
    assert meta["data"]["motion_corpus"]["duration_s"] == m_motion["duration_s"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": {"build": {"motion_minutes": 0}}}')
    with pytest.raises(ValueError, match="motion_minutes"):
        load_train_config(bad)


def test_one_face_training_is_warned_about(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    msg = one_face_warning(cfg)
    assert msg is not None and "--faces" in msg
    assert one_face_warning(apply_overrides(cfg, ['data.faces="photos"'])) is None
    assert one_face_warning(apply_overrides(cfg, ['data.videos="clips"'])) is None
    assert one_face_warning(apply_overrides(cfg, ['stages=["motion"]'])) is None
    assert one_face_warning(apply_overrides(cfg, ['init="ckpt"'])) is None  # enrolment
