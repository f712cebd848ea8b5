"""Engine.render is pure (plain items in, face crops out); the post stage pastes on the device.

On the CPU the post stage is today's numpy paste-back, bit for bit. The GPU paths (CuPy, torch)
are checked here up to the device: the torch implementation runs on CPU tensors and must equal
numpy; AvatarStream's device-frame branch runs on CPU tensors too. What needs a CUDA device is
at the end and skips without one.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from talkstream.engine import compose
from talkstream.engine.avatar import Avatar
from talkstream.engine.compose import Compositor, i420_host, to_host
from talkstream.engine.pipeline import Engine, Faces, Frame, RenderItem, Session
from talkstream.kernels import post
from tests.conftest import speechlike


def _items(engine: Engine, avatar: Avatar, seed: int = 0, n_samples: int = 6400) -> tuple:
    s = engine.session(avatar, seed=seed)
    s.max_batch = 64
    s.push_audio(speechlike(n_samples, seed=seed), 16000)
    s.end_audio()
    items = s.take_ready()
    assert len(items) >= 5
    return s, items


def _face(s: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (s, s, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- Engine.render


def test_render_items_are_plain_data_and_render_is_pure(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    s, items = _items(tiny_engine, default_avatar, seed=3, n_samples=4000)
    for it in items:
        assert isinstance(it, RenderItem)
        values = [getattr(it, f.name) for f in dataclasses.fields(it)]
        assert not any(isinstance(v, (Session, Engine)) or callable(v) for v in values)
        assert it.stream == s.id and it.features is s.features and it.noise is s.noise
    state = (s.streamer.next_frame, s.frames_skipped, s.interrupts, s.has_ready())
    noise = s.noise.clone()

    a = tiny_engine.render(items)
    b = tiny_engine.render(items)
    assert isinstance(a, Faces) and len(a) == len(items)
    size = tiny_engine.crop_size
    assert isinstance(a.crops, np.ndarray) and a.crops.shape == (len(items), size, size, 3)
    assert a.crops.dtype == np.uint8 and a.landmarks.shape == (len(items), 68, 2)
    np.testing.assert_array_equal(a.crops, b.crops)  # same items, same faces
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
    # Rendering touched no session: nothing claimed, skipped, or changed.
    assert (s.streamer.next_frame, s.frames_skipped, s.interrupts, s.has_ready()) == state
    assert torch.equal(s.noise, noise)
    # The session is not needed at all: its items render the same after it is gone.
    del s
    c = tiny_engine.render([dataclasses.replace(it) for it in items])
    np.testing.assert_array_equal(c.crops, a.crops)
    # Each item carries what differs per frame: another frame's idle offset changes its face.
    moved = dataclasses.replace(items[0], idle_offset=items[0].idle_offset + 0.05)
    assert not np.array_equal(tiny_engine.render([moved]).crops[0], a.crops[0])
    assert len(tiny_engine.render([])) == 0


def test_session_frames_are_render_then_todays_paste_back(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    s, items = _items(tiny_engine, default_avatar, seed=4)
    faces = tiny_engine.render(items)
    frames = s.compose(items, faces)
    assert [f.pts for f in frames] == [it.pts for it in items]
    for i, f in enumerate(frames):
        assert isinstance(f.image, np.ndarray) and not f.on_device and f.to_host() is f.image
        # The post stage on numpy is kernels.post.paste_back into a copy of the photo.
        want = post.paste_back(default_avatar.image, faces.crops[i], default_avatar.paste)
        np.testing.assert_array_equal(f.image, want)
        np.testing.assert_array_equal(f.landmarks, faces.landmarks[i])
    assert frames[0].image is not frames[1].image  # each frame its own buffer
    assert not np.shares_memory(frames[0].image, default_avatar.image)
    # render_ready is exactly take_ready, render, compose (a twin session: same seed and audio).
    twin = tiny_engine.session(default_avatar, seed=4)
    twin.max_batch = 64
    twin.push_audio(speechlike(6400, seed=4), 16000)
    twin.end_audio()
    ready = twin.render_ready()
    assert [f.pts for f in ready] == [f.pts for f in frames]
    for f, g in zip(ready, frames, strict=True):
        np.testing.assert_array_equal(f.image, g.image)
    with pytest.raises(ValueError, match="items but"):
        s.compose(items[:2], faces)


def test_submit_runs_the_post_stage_in_the_worker_per_request(
    tiny_engine: Engine, default_avatar: Avatar
) -> None:
    _, a = _items(tiny_engine, default_avatar, seed=5, n_samples=3200)
    _, b = _items(tiny_engine, default_avatar, seed=6, n_samples=3200)
    threads: list[str] = []

    def then(faces: Faces) -> int:
        threads.append(threading.current_thread().name)
        return len(faces)

    def broken(faces: Faces) -> int:
        raise RuntimeError("post stage failed")

    with tiny_engine._lock:  # both requests wait, then share one batch
        fa = tiny_engine.submit(a, then=broken)
        fb = tiny_engine.submit(b, then=then)
    assert fb.result(timeout=60) == len(b)  # the other request of the batch is unaffected
    with pytest.raises(RuntimeError, match="post stage failed"):
        fa.result(timeout=60)
    assert threads and threads[0].startswith("talkstream-infer")
    plain = tiny_engine.submit(b).result(timeout=60)  # without then: the Faces
    assert isinstance(plain, Faces) and len(plain) == len(b)


# ----------------------------------------------------------------------------- torch path


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_torch_paste_equals_numpy_bit_for_bit(default_avatar: Avatar, dtype: type) -> None:
    a = default_avatar
    face: np.ndarray = _face(a.crop_size, 1).astype(dtype)
    want = post.paste_back(a.image, face, a.paste)
    pmap = a.paste.to_torch("cpu")
    assert pmap.src_index.dtype == torch.int64 and pmap.alpha.dtype == torch.float32
    bg = torch.from_numpy(a.image)
    got = post.paste_back_torch(bg, torch.from_numpy(face), pmap)
    np.testing.assert_array_equal(got.numpy(), want)
    out = torch.zeros_like(bg)  # without the background flag the whole frame is written
    assert post.paste_back_torch(bg, torch.from_numpy(face), pmap, out=out) is out
    np.testing.assert_array_equal(out.numpy(), want)
    with pytest.raises(TypeError, match="to_torch"):
        post.paste_back_torch(bg, torch.from_numpy(face), a.paste)
    with pytest.raises(ValueError, match="shape"):
        post.paste_back_torch(bg, torch.from_numpy(face[:-1]), pmap)


def test_torch_i420_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    for shape in [(48, 64, 3), (2, 2, 3), (130, 258, 3)]:
        rgb = rng.integers(0, 256, shape, dtype=np.uint8)
        want = post.rgb_to_i420(rgb)
        got = post.rgb_to_i420_torch(torch.from_numpy(rgb)).numpy()
        diff = np.abs(got.astype(int) - want.astype(int))
        # float32 sums in another order may round a level differently, rarely.
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999
    solid = np.zeros((8, 8, 3), np.uint8)
    solid[:4] = 255
    planes = post.rgb_to_i420_torch(torch.from_numpy(solid)).numpy()
    assert (planes[:4] == 235).all() and (planes[4:8] == 16).all() and (planes[8:] == 128).all()
    with pytest.raises(ValueError, match="even"):
        post.rgb_to_i420_torch(torch.zeros(3, 4, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        post.rgb_to_i420_torch(torch.zeros(4, 4, 3, dtype=torch.uint8), out=torch.zeros(6, 5))


def test_compositor_dispatches_on_the_crop(default_avatar: Avatar) -> None:
    c = Compositor(default_avatar)
    face = _face(default_avatar.crop_size, 2)
    host = c.paste(face)
    assert isinstance(host, np.ndarray)
    dev = c.paste(torch.from_numpy(face))  # the tensor path (a GPU's, here on the CPU)
    assert isinstance(dev, torch.Tensor) and dev.dtype == torch.uint8
    np.testing.assert_array_equal(dev.numpy(), host)
    assert c._on_device["cpu"][0].data_ptr() != dev.data_ptr()  # a new frame, not the bg
    with pytest.raises(ValueError, match="CUDA tensor"):
        Compositor(default_avatar, gpu="cupy").paste(torch.from_numpy(face))
    with pytest.raises(ValueError, match="gpu must be"):
        Compositor(default_avatar, gpu="opencl")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        c.paste([[0]])


def test_i420_host_and_to_host() -> None:
    rgb = np.random.default_rng(3).integers(0, 256, (33, 50, 3), dtype=np.uint8)
    even = rgb[:32, :50]
    np.testing.assert_array_equal(i420_host(np.ascontiguousarray(even)), post.rgb_to_i420(even))
    t = torch.from_numpy(rgb)
    out = np.full((48, 50), 7, np.uint8)
    got = i420_host(t[:32, :50], out=out)  # a strided slice of an odd-sized frame
    assert got is out
    np.testing.assert_array_equal(out, post.rgb_to_i420_torch(t[:32, :50]).numpy())
    with pytest.raises(ValueError, match="out must be"):
        i420_host(t[:32, :50], out=np.empty((48, 51), np.uint8))
    assert to_host(rgb) is rgb
    np.testing.assert_array_equal(to_host(t), rgb)
    f = Frame(image=t, pts=0, landmarks=np.zeros((68, 2), np.float32))
    assert f.on_device and isinstance(f.to_host(), np.ndarray)


class _TensorCompositor(Compositor):
    """Hands the post stage torch tensors, as a GPU engine does (here on the CPU)."""

    def paste(self, crop: Any) -> Any:
        return super().paste(torch.from_numpy(np.ascontiguousarray(crop)))


async def test_avatar_stream_converts_device_frames_through_i420_host(
    tiny_engine: Engine, default_avatar: Avatar, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")
    from talkstream.streaming import tracks
    from talkstream.streaming.config import StreamConfig

    calls: list[tuple[Any, np.ndarray]] = []

    def spy(image: Any, out: np.ndarray | None = None) -> np.ndarray:
        planes = i420_host(image, out)
        calls.append((image, planes))
        return planes

    monkeypatch.setattr(tracks, "i420_host", spy)
    st = tracks.AvatarStream(tiny_engine, default_avatar, StreamConfig(), mode="presenter")
    st.session.compositor = _TensorCompositor(default_avatar)
    st.push_speech(speechlike(32000, rate=16000), 16000)
    st.start()
    video = tracks.AvatarVideoTrack(st)
    try:
        t_end = time.monotonic() + 60
        while not calls and time.monotonic() < t_end:
            vf = await video.recv()
    finally:
        await st.close()
    assert calls, "no rendered frame was shown"
    image, planes = calls[-1]
    assert isinstance(image, torch.Tensor)  # the frame reached the track as a device array
    np.testing.assert_array_equal(vf.to_ndarray(), planes)  # what the encoder gets
    host = image.numpy()
    np.testing.assert_array_equal(planes, post.rgb_to_i420_torch(image).numpy())
    assert np.abs(planes.astype(int) - post.rgb_to_i420(host).astype(int)).max() <= 1
    # The same frame through the CPU path (PyAV's swscale) differs by rounding only.
    from av import VideoFrame

    ref = VideoFrame.from_ndarray(np.ascontiguousarray(host), format="rgb24")
    ref_planes = ref.reformat(format="yuv420p").to_ndarray()
    h = host.shape[0]
    assert np.abs(planes[:h].astype(int) - ref_planes[:h].astype(int)).max() <= 2


# ----------------------------------------------------------------------------- CUDA


def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.fixture(scope="module")
def cuda_engine() -> Iterator[Engine]:
    _cuda()
    from talkstream.config import EngineConfig
    from talkstream.engine.checkpoint import Models
    from talkstream.runtime import load_engine

    eng = load_engine(
        EngineConfig(preset="tiny", device="cuda", backend="torch"),
        Models.random_init("tiny", seed=0),
    )
    yield eng
    eng.close()


@pytest.mark.parametrize("gpu", ["cupy", "torch"])
def test_cuda_frames_stay_on_the_device_until_i420(
    cuda_engine: Engine, default_avatar: Avatar, gpu: compose.GpuPath
) -> None:
    if gpu == "cupy" and compose._cupy() is None:
        pytest.skip("CuPy (the gpu extra) is not installed")
    s, items = _items(cuda_engine, default_avatar, seed=7)
    s.compositor = Compositor(default_avatar, gpu=gpu)
    faces = cuda_engine.render(items)
    assert isinstance(faces.crops, torch.Tensor) and faces.crops.is_cuda  # never copied back
    frames = s.compose(items, faces)
    crops = faces.crops.cpu().numpy()
    for i, f in enumerate(frames):
        assert f.on_device and f.image.is_cuda and f.image.dtype == torch.uint8
        want = post.paste_back(default_avatar.image, crops[i], default_avatar.paste)
        assert np.abs(f.to_host().astype(int) - want.astype(int)).max() <= 1
        h, w = (d - d % 2 for d in default_avatar.image.shape[:2])
        planes = i420_host(f.image[:h, :w], gpu=gpu)
        ref = post.rgb_to_i420(np.ascontiguousarray(f.to_host()[:h, :w]))
        assert np.abs(planes.astype(int) - ref.astype(int)).max() <= 1


async def test_cuda_session_frames_async(cuda_engine: Engine, default_avatar: Avatar) -> None:
    s = cuda_engine.session(default_avatar, seed=1)
    s.push_audio(speechlike(6400), 16000)
    s.end_audio()
    got = [f async for f in s.frames()]
    assert len(got) == 10 and all(f.image.is_cuda for f in got)
