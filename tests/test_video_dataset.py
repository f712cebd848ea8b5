"""Real-video preprocessing on a clip the test makes: rendered face + voice, encoded to mp4."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from talkstream.config import AvatarConfig
from talkstream.engine.avatar import default_image, default_landmarks, prepare_avatar
from talkstream.engine.motion import frames_for_samples

pytest.importorskip("dlib")
av = pytest.importorskip("av")

SRC_FPS = 30  # not 25: the preprocessing must resample time
CANVAS = 320
OFFSET = 32  # where the 2x face crop sits in the canvas
AUDIO_RATE = 22050
DURATION_S = 1.2


def _openings(n: int) -> np.ndarray:
    t = np.arange(n) / SRC_FPS
    return 0.5 - 0.5 * np.cos(2 * np.pi * 2.5 * t)  # 0..1, a few open-close cycles


def _write_mp4(path: Path, with_audio: bool = True) -> np.ndarray:
    """Encode the test clip; returns the true inner-lip opening (crop px) per source frame."""
    from talkstream.training.frames import FrameRenderer
    from talkstream.training.visemes import MouthGeometry, params_to_landmarks

    avatar = prepare_avatar(default_image(), AvatarConfig(), landmarks=default_landmarks())
    renderer = FrameRenderer(avatar.crop, avatar.neutral)
    geometry = MouthGeometry.from_neutral(avatar.neutral)
    n = round(DURATION_S * SRC_FPS)
    params = np.zeros((n, 5), dtype=np.float32)
    params[:, 0] = 0.9 * _openings(n)  # jaw
    lms = params_to_landmarks(geometry, params)  # (n, 68, 2) crop px
    d = lms[:, [67, 66, 65]] - lms[:, [61, 62, 63]]
    truth = np.sqrt((d**2).sum(-1)).mean(-1)

    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=SRC_FPS)
        vs.width = vs.height = CANVAS
        vs.pix_fmt = "yuv420p"
        vs.options = {"crf": "16", "preset": "veryfast"}
        vs.codec_context.time_base = Fraction(1, SRC_FPS)
        astream = c.add_stream("aac", rate=AUDIO_RATE, layout="stereo") if with_audio else None
        for i in range(n):
            face = Image.fromarray(renderer.render(lms[i])).resize(
                (256, 256), Image.Resampling.BICUBIC
            )
            canvas = np.full((CANVAS, CANVAS, 3), 128, np.uint8)
            canvas[OFFSET : OFFSET + 256, OFFSET : OFFSET + 256] = np.asarray(face)
            vf = av.VideoFrame.from_ndarray(canvas, format="rgb24")
            vf.pts = i
            vf.time_base = Fraction(1, SRC_FPS)
            c.mux(vs.encode(vf))
        if astream is not None:
            t = np.arange(int(DURATION_S * AUDIO_RATE)) / AUDIO_RATE
            env = np.interp(t, np.arange(n) / SRC_FPS, _openings(n))
            tone = (0.3 * env * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
            pcm = np.stack([tone, 0.5 * tone])  # (2, N) stereo: the cache downmixes
            for s in range(0, pcm.shape[1], 1024):
                af = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(pcm[:, s : s + 1024]), format="fltp", layout="stereo"
                )
                af.sample_rate = AUDIO_RATE
                af.pts = s
                af.time_base = Fraction(1, AUDIO_RATE)
                c.mux(astream.encode(af))
            c.mux(astream.encode(None))
        c.mux(vs.encode(None))
    return truth


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    d = tmp_path_factory.mktemp("videos")
    truth = _write_mp4(d / "speaker_a.mp4")
    _write_mp4(d / "silent_film.mp4", with_audio=False)
    return d, truth


def test_preprocess_videos_extracts_audio_crops_and_landmarks(
    video_dir: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    from talkstream.training.dataset import load_dataset
    from talkstream.training.video import VideoPrepConfig, preprocess_videos

    src, truth = video_dir
    cfg = VideoPrepConfig(smooth_frames=3, heldout_fraction=0.0)
    res = preprocess_videos(src, tmp_path / "cache", cfg, progress=False)
    assert res.clips == 1 and res.reused == 0
    assert [name for name, _ in res.skipped] == ["silent_film.mp4"]
    assert "no audio" in res.skipped[0][1]

    with np.load(next((tmp_path / "cache" / "clips").glob("*.npz"))) as z:
        arrays = {k: z[k] for k in z.files}
    n = round(DURATION_S * 25)
    assert arrays["frames"].shape == (n, 128, 128, 3)
    assert arrays["detected"].all()
    for key in ("landmarks", "speech_landmarks"):
        assert arrays[key].shape == (n, 68, 2) and np.isfinite(arrays[key]).all()

    # Time resampling: output frame i shows the source frame at (i + 0.5) / 25 s, and the
    # detector sees the mouth open and close with it.
    src_idx = np.floor((np.arange(n) + 0.5) / 25 * SRC_FPS).astype(int)
    sp = arrays["speech_landmarks"]
    d = sp[:, [67, 66, 65]] - sp[:, [61, 62, 63]]
    measured = np.sqrt((d**2).sum(-1)).mean(-1)
    assert np.corrcoef(measured, truth[src_idx])[0, 1] > 0.85
    # The crop is the engine's alignment: eye-mouth distance = face_scale * 128.
    lm = arrays["landmarks"]
    eyes = 0.5 * (lm[:, 36:42].mean(1) + lm[:, 42:48].mean(1))
    mouth = 0.5 * (lm[:, 48] + lm[:, 54])
    em = np.linalg.norm(mouth - eyes, axis=1)
    np.testing.assert_allclose(em.mean(), 0.32 * 128, rtol=0.05)
    # The reference is the most closed mouth; the neutral landmarks are its own.
    r = int(np.argmin(np.abs(arrays["neutral"] - lm).sum(axis=(1, 2))))
    assert np.array_equal(arrays["reference"], arrays["frames"][r])
    assert truth[src_idx][r] - truth.min() < 0.2 * (truth.max() - truth.min())

    data = load_dataset(tmp_path / "cache", split="train")
    assert len(data) == 1 and data.crop_size == 128
    clip = data.clips[0]
    # 16 kHz audio covering exactly the frames: one mel row per 12.5 ms.
    assert frames_for_samples(len(clip.mel) * 200) == n
    assert clip.mel.max() > data.silence + 5  # the voice came through
    batch = data.frame_batch(np.random.default_rng(0), 3)
    assert batch.x0.shape == (3, 3, 128, 128) and batch.ref_index is None

    # A rerun reuses the cached clip.
    again = preprocess_videos(src, tmp_path / "cache", cfg, progress=False)
    assert again.reused == 1 and again.clips == 1
