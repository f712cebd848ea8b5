"""The post stage: paste the engine's face crops into the avatar's frame, on the crops' device.

``Engine.render`` stops at the face crop (and its landmarks); what a frame looks like around the
face is the caller's business. A :class:`Compositor` per avatar holds the background and the
paste-back geometry and pastes each crop where it lives:

- a numpy crop (a CPU engine): ``kernels.post.paste_back`` on the host, into a copy of the
  background (the path every CPU frame took before the stage was split out);
- a torch CUDA crop (a GPU engine): CuPy's kernels, through DLPack without a copy, when CuPy is
  installed (the ``gpu`` extra); otherwise the same arithmetic in torch. The frame stays a torch
  CUDA tensor on the GPU;
- a torch CPU crop: the torch path (what the tests use to check it without a GPU).

A GPU frame leaves the device only at the encoder: :func:`i420_host` converts it to I420 on the
GPU and copies the planes (half the bytes of RGB) to the host once.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from talkstream.kernels.post import (
    PasteMap,
    paste_back,
    paste_back_torch,
    rgb_to_i420,
    rgb_to_i420_torch,
)

if TYPE_CHECKING:
    import torch

    from talkstream.engine.avatar import Avatar
    from talkstream.engine.pipeline import Faces, Frame, RenderItem

GpuPath = Literal["auto", "cupy", "torch"]
GPU_PATHS: tuple[str, ...] = ("auto", "cupy", "torch")


def _cupy() -> Any:
    """CuPy if it is installed, else None (imported only when a GPU frame needs it)."""
    if importlib.util.find_spec("cupy") is None:
        return None
    import cupy

    return cupy


def _is_tensor(a: Any) -> bool:
    return type(a).__module__.split(".", 1)[0] == "torch"


def on_host(image: Any) -> bool:
    """True for a numpy image, False for a device array (a torch CUDA tensor)."""
    if isinstance(image, np.ndarray):
        return True
    return _is_tensor(image) and image.device.type == "cpu"


def to_host(image: Any) -> np.ndarray:
    """``image`` as a host numpy array: itself if it is one, else one device-to-host copy."""
    if isinstance(image, np.ndarray):
        return image
    if _is_tensor(image):
        return image.detach().cpu().numpy()
    if type(image).__module__.split(".", 1)[0] == "cupy":
        return image.get()
    raise TypeError(f"expected a numpy array or a torch tensor, got {type(image).__name__}")


def _cupy_stream(cupy: Any, device: torch.device) -> Any:
    """A CuPy context for torch's current stream on ``device``: work queued in it runs after
    the torch kernels that produced the crop, and torch's next kernels run after it."""
    import torch

    ptr = torch.cuda.current_stream(device).cuda_stream
    return cupy.cuda.ExternalStream(ptr, device.index if device.index is not None else 0)


def i420_host(image: Any, out: np.ndarray | None = None, *, gpu: GpuPath = "auto") -> np.ndarray:
    """RGB -> I420 (BT.601 limited) on the image's device; the planes end up on the host.

    For the video encoder: the (H * 3 // 2, W) uint8 planes in PyAV's ``yuv420p`` layout. A
    numpy image converts on the host (``kernels.post.rgb_to_i420``); a torch CUDA tensor
    converts on the GPU (CuPy if installed and ``gpu`` allows, else torch) and the planes are
    copied to the host once, into ``out`` if given.

    Args:
        image: (H, W, 3) uint8 RGB, H and W even (slice an odd-sized frame first).
        out: optional (H * 3 // 2, W) uint8 C-contiguous host array.
        gpu: which GPU path converts a tensor: "auto" (CuPy when installed), "cupy", "torch".
    """
    if gpu not in GPU_PATHS:
        raise ValueError(f"gpu must be one of {GPU_PATHS}, got {gpu!r}")
    if isinstance(image, np.ndarray):
        return rgb_to_i420(image, out=out)
    if not _is_tensor(image):
        raise TypeError(f"expected a numpy array or a torch tensor, got {type(image).__name__}")
    h, w = int(image.shape[0]), int(image.shape[1])
    if out is None:
        out = np.empty((h * 3 // 2, w), dtype=np.uint8)
    elif out.shape != (h * 3 // 2, w) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous ({h * 3 // 2}, {w}) uint8 array")
    cupy = _gpu_module(gpu, image.device)
    if cupy is not None:
        with cupy.cuda.Device(image.device.index or 0), _cupy_stream(cupy, image.device):
            planes = rgb_to_i420(cupy.from_dlpack(image))  # (3H/2, W) on the GPU
            planes.get(out=out)  # the one copy to the host (synchronises the stream)
        return out
    import torch

    planes_t = rgb_to_i420_torch(image)  # (3H/2, W) on the image's device
    torch.from_numpy(out).copy_(planes_t)  # the one copy to the host
    return out


def _gpu_module(gpu: GpuPath, device: torch.device) -> Any:
    """CuPy for work on ``device`` (a torch device), or None for the torch path."""
    if device.type != "cuda" or gpu == "torch":
        if gpu == "cupy" and device.type != "cuda":
            raise ValueError(f"gpu='cupy' needs a CUDA tensor, got one on {device}")
        return None
    cupy = _cupy()
    if cupy is None and gpu == "cupy":
        raise RuntimeError(
            "gpu='cupy' but CuPy is not installed: pip install 'talkstream[gpu]' "
            "(or use gpu='torch')"
        )
    return cupy


class Compositor:
    """Pastes face crops into one avatar's frame: the caller-owned post stage of rendering.

    ``paste(crop)`` returns a new (H, W, 3) uint8 RGB frame on the crop's device (numpy for a
    numpy crop, a torch tensor for a tensor crop). The background and paste map are copied to
    a device once, on the first crop from it. Not thread-safe for the first crop of a new
    device; a Session calls it from one thread at a time (the engine's worker or its caller).

    Args:
        avatar: the avatar whose frame the crops go into (``image`` and ``paste``).
        gpu: the GPU path for CUDA crops: "auto" (CuPy when installed, else torch), "cupy",
            "torch".
    """

    def __init__(self, avatar: Avatar, *, gpu: GpuPath = "auto") -> None:
        if gpu not in GPU_PATHS:
            raise ValueError(f"gpu must be one of {GPU_PATHS}, got {gpu!r}")
        self.background: np.ndarray = avatar.image  # (H, W, 3) uint8, host
        self.pmap: PasteMap = avatar.paste
        self.gpu: GpuPath = gpu
        # Per device (str): (background, paste map, CuPy or None) on that device.
        self._on_device: dict[str, tuple[Any, PasteMap, Any]] = {}

    @property
    def frame_hw(self) -> tuple[int, int]:
        return int(self.background.shape[0]), int(self.background.shape[1])

    def _device_state(self, device: torch.device) -> tuple[Any, PasteMap, Any]:
        key = str(device)
        hit = self._on_device.get(key)
        if hit is not None:
            return hit
        cupy = _gpu_module(self.gpu, device)
        if cupy is not None:
            with cupy.cuda.Device(device.index or 0):
                state = (cupy.asarray(self.background), self.pmap.to(cupy), cupy)
        else:
            import torch

            bg = torch.from_numpy(self.background).to(device)
            state = (bg, self.pmap.to_torch(device), None)
        self._on_device[key] = state
        return state

    def paste(self, crop: Any) -> Any:
        """One (S, S, 3) uint8 crop -> a new (H, W, 3) uint8 frame on the crop's device."""
        if isinstance(crop, np.ndarray):
            # Fill the buffer with the background first (one memcpy), then write the bbox.
            image = self.background.copy()
            return paste_back(self.background, crop, self.pmap, out=image, out_has_background=True)
        if not _is_tensor(crop):
            raise TypeError(f"crop must be a numpy array or a torch tensor, got {type(crop)}")
        bg, pmap, cupy = self._device_state(crop.device)
        if cupy is None:
            return paste_back_torch(bg, crop, pmap, out=bg.clone(), out_has_background=True)
        import torch

        with cupy.cuda.Device(crop.device.index or 0), _cupy_stream(cupy, crop.device):
            image = bg.copy()
            paste_back(bg, cupy.from_dlpack(crop), pmap, out=image, out_has_background=True)
            return torch.from_dlpack(image)  # the same memory, as a torch CUDA tensor

    def frames(self, items: Sequence[RenderItem], faces: Faces) -> list[Frame]:
        """Paste every crop of ``faces`` (rendered from ``items``, in order) into a Frame."""
        from talkstream.engine.pipeline import Frame

        if len(items) != len(faces):
            raise ValueError(f"{len(items)} items but {len(faces)} rendered faces")
        return [
            Frame(image=self.paste(faces.crops[i]), pts=it.pts, landmarks=faces.landmarks[i])
            for i, it in enumerate(items)
        ]


__all__ = ["GPU_PATHS", "Compositor", "GpuPath", "i420_host", "on_host", "to_host"]
