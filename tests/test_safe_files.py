"""Files a render leaves: permissions from the umask, no temp file after SIGTERM, large photos
reduced instead of refused (issue 14)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from talkstream.config import AvatarConfig, Config, RenderConfig
from talkstream.engine import avatar as av
from talkstream.engine.pipeline import Engine
from talkstream.engine.render import render_to_file
from tests.conftest import speechlike

REPO = Path(__file__).resolve().parent.parent


def _wav(path: Path, seconds: float) -> Path:
    sf.write(path, speechlike(int(16000 * seconds)), 16000)
    return path


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_follows_the_umask(tmp_path: Path, tiny_engine: Engine, umask: int) -> None:
    wav = _wav(tmp_path / "a.wav", 0.2)
    out = tmp_path / "out.mp4"
    old = os.umask(umask)
    try:
        render_to_file(Config(render=RenderConfig(out=out, audio=wav, progress=False)), tiny_engine)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_output_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path, tiny_engine: Engine) -> None:
    wav = _wav(tmp_path / "a.wav", 0.2)
    out = tmp_path / "out.mp4"
    out.write_bytes(b"old")
    out.chmod(0o640)
    render_to_file(Config(render=RenderConfig(out=out, audio=wav, progress=False)), tiny_engine)
    assert out.stat().st_mode & 0o777 == 0o640 and out.stat().st_size > 100


def _unblock_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _signal_state(pid: int) -> str:
    """The child's signal masks as the kernel reports them (for a failure message)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as e:
        return f"(no /proc status: {e})"
    return " ".join(x.replace("\t", "") for x in lines if x.startswith(("State", "Sig", "Shd")))


@pytest.mark.slow
def test_sigterm_mid_render_removes_the_temp_file(tmp_path: Path) -> None:
    """A real ``talkstream render`` process, terminated once its temp file exists."""
    wav = _wav(tmp_path / "long.wav", 60.0)  # far longer than the test waits
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "talkstream.cli",
            "render",
            "--audio",
            str(wav),
            "--out",
            str(out_dir / "x.mp4"),
            "--no-progress",
            "--no-cache",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A signal mask inherited from whatever started pytest must not hold SIGTERM pending
        # (a CI run once saw the render finish with exit 0 after SIGTERM).
        preexec_fn=_unblock_sigterm,
    )
    state = ""
    try:
        deadline = time.monotonic() + 120
        while not list(out_dir.glob("tmp*.mp4")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the render never started writing"
            time.sleep(0.05)
        time.sleep(0.5)  # frames are being encoded into it now
        state = _signal_state(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, f"{state}\n{err}"
    assert "terminated" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []  # neither the temp file nor a partial x.mp4


def _phone_photo(path: Path, size: tuple[int, int] = (8200, 6150)) -> np.ndarray:
    """A ~50 MP JPEG with the astronaut's face in it; returns its 68 landmarks (photo px)."""
    import skimage.data

    scale = 8
    face = Image.fromarray(skimage.data.astronaut()).resize(
        (512 * scale, 512 * scale), Image.Resampling.BILINEAR
    )
    canvas = Image.new("RGB", size, (90, 110, 130))
    ox, oy = 2000, 1000
    canvas.paste(face, (ox, oy))
    canvas.save(path, quality=85)
    # Resizing maps pixel centres: x_big = (x + 0.5) * scale - 0.5.
    return (av.default_landmarks().astype(np.float64) + 0.5) * scale - 0.5 + (ox, oy)


@pytest.fixture(scope="module")
def phone_photo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The 50 MP photo (made once: ~2 s) and its landmarks; the tests only read it."""
    photo = tmp_path_factory.mktemp("phone") / "phone.jpg"
    return photo, _phone_photo(photo)


@pytest.mark.slow
def test_phone_photo_is_reduced_not_refused(
    tmp_path: Path, phone_photo: tuple[Path, np.ndarray]
) -> None:
    photo, points = phone_photo
    image, k = av.load_photo(photo, AvatarConfig())
    assert k == 2 and image.shape == (3075, 4100, 3)
    # `talkstream landmarks` saves them in the photo's own pixels (what --landmarks files
    # hold), though it detected them on the reduced photo.
    pytest.importorskip("dlib", reason="detection needs the [detect] extra (dlib)")
    from talkstream.cli import main
    from talkstream.engine.landmarks import load_landmarks_json

    lm = tmp_path / "phone.json"
    assert main(["landmarks", str(photo), "--out", str(lm)]) == 0
    saved = load_landmarks_json(lm)
    # dlib's points on an 8x enlarged face: within a few of its pixels at 512 px.
    assert np.abs(saved - points).max() < 8 * 4, np.abs(saved - points).max()
    src = av.load_avatar_source(photo, lm, AvatarConfig())
    np.testing.assert_allclose(src.face.points, (saved + 0.5) / 2 - 0.5, atol=1e-2)
    avatar = av.prepare_avatar_source(src, AvatarConfig())
    assert avatar.image.shape == (480, 640, 3) and avatar.crop.shape == (128, 128, 3)
    # The crop shows the face: close to the crop made from the small original.
    small = av.prepare_avatar(av.default_image(), AvatarConfig(), landmarks=av.default_landmarks())
    diff = np.abs(avatar.crop.astype(float) - small.crop.astype(float)).mean()
    assert diff < 20, diff


@pytest.mark.slow
def test_phone_photo_costs_the_memory_of_its_reduced_size(
    tmp_path: Path, phone_photo: tuple[Path, np.ndarray]
) -> None:
    """JPEG is decoded at half size: the 50 MP photo's peak is the 12.5 MP photo's."""
    photo, _ = phone_photo
    half = tmp_path / "half.jpg"
    with Image.open(photo) as im:
        im.reduce(2).save(half, quality=85)
    script = textwrap.dedent(
        f"""
        import resource
        from talkstream.config import AvatarConfig
        from talkstream.engine.avatar import load_photo

        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        load_photo({str(half)!r}, AvatarConfig())
        after_half = peak()
        load_photo({str(photo)!r}, AvatarConfig())
        print(after_half, peak())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    after_half, after_full = map(float, out.split())
    # A full-size decode would add ~150 MiB (8200 x 6150 x 3 bytes) at least.
    assert after_full - after_half < 60, (after_half, after_full)


def test_reduction_factor_and_point_mapping() -> None:
    assert av.reduction_factor(8200, 6150, 40_000_000) == 2
    assert av.reduction_factor(6000, 4000, 40_000_000) == 1
    assert av.reduction_factor(16000, 12000, 40_000_000) == 4  # 48 MP at half size
    pts = np.array([[0.0, 0.0], [101.0, 37.5]], dtype=np.float32)
    there = av.scale_points_to_reduced(pts, 4)
    np.testing.assert_allclose(there, [[-0.375, -0.375], [24.875, 8.999999]], atol=1e-5)
    np.testing.assert_allclose(av.scale_points_from_reduced(there, 4), pts, atol=1e-4)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "1", "RGBA"])
def test_every_mode_reduces(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(0)
    rgb = (rng.random((61, 83, 3)) * 255).astype(np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).convert(mode).save(path)
    img, k = av.load_photo(path, replace(AvatarConfig(), max_image_pixels=21 * 16))
    assert k == 4 and img.shape == (16, 21, 3) and img.dtype == np.uint8
