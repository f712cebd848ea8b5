"""The avatar as a virtual camera (pyvirtualcam), for video-call apps.

On Linux pyvirtualcam writes to a v4l2loopback device, a kernel module that most systems do not
load by default; on Windows and macOS it uses the OBS (or Unity Capture) virtual camera. When
none is there, the error says what is missing and how to get it. Frames are sent when the live
loop's audio clock says so; the camera's own ``sleep_until_next_frame`` is never used, because
pacing by wall clock would drift from the microphone.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from talkstream.config import FPS
from talkstream.errors import MissingDependencyError, TalkstreamError

log = logging.getLogger(__name__)

LINUX_HELP = (
    "a virtual camera on Linux is a v4l2loopback device: install the module "
    "(Debian/Ubuntu: `sudo apt-get install v4l2loopback-dkms`) and load it with "
    "`sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=talkstream`, "
    "then run this again (or use --output file)"
)
OTHER_HELP = (
    "a virtual camera on Windows and macOS comes from OBS Studio: install it and start its "
    "virtual camera once (Windows can also use Unity Capture); or use --output file"
)
# Where the kernel lists v4l2loopback's devices (they have no parent bus, so they are "virtual").
V4L2_VIRTUAL_SYSFS = Path("/sys/devices/virtual/video4linux")


def platform_help() -> str:
    return LINUX_HELP if sys.platform.startswith("linux") else OTHER_HELP


def import_pyvirtualcam() -> ModuleType:
    """The ``pyvirtualcam`` module, or a ``MissingDependencyError`` naming the extra."""
    try:
        import pyvirtualcam
    except ImportError as e:
        raise MissingDependencyError("the virtual camera output", "pyvirtualcam", "live") from e
    return pyvirtualcam


def loopback_devices(sysfs: Path = V4L2_VIRTUAL_SYSFS) -> list[str]:
    """``/dev/videoN`` of every loopback video device the kernel lists (Linux; else [])."""
    if not sysfs.is_dir():
        return []
    names = sorted(p.name for p in sysfs.iterdir() if p.name.startswith("video"))
    return [f"/dev/{n}" for n in names]


def vcam_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) sent to the camera: even, since the device side is YUV 4:2:0."""
    return width - width % 2, height - height % 2


def vcam_frame(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` (H, W, 3) uint8 RGB cropped to ``size`` (width, height), C-contiguous."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {image.dtype} {image.shape}")
    w, h = size
    if image.shape[0] < h or image.shape[1] < w:
        raise ValueError(f"frame {image.shape[1]}x{image.shape[0]} is smaller than {w}x{h}")
    return np.ascontiguousarray(image[:h, :w])


@contextlib.contextmanager
def _ignore_failed_camera_cleanup() -> Iterator[None]:
    # When pyvirtualcam's Camera() constructor fails, its __del__ later raises AttributeError
    # and Python prints "Exception ignored in ..." under our own clear message. Collect the
    # half-built object here, with that report turned into a debug log line.
    saved = sys.unraisablehook

    def hook(u: Any) -> None:
        log.debug("ignored during virtual camera cleanup: %r", u.exc_value)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = saved


class VirtualCameraSink:
    """Sends RGB frames to a virtual camera at 25 fps."""

    def __init__(self, width: int, height: int, device: str | None = None) -> None:
        pvc = import_pyvirtualcam()
        self.size = vcam_size(width, height)
        failure: str | None = None
        with _ignore_failed_camera_cleanup():
            try:
                self.camera: Any = pvc.Camera(
                    width=self.size[0],
                    height=self.size[1],
                    fps=FPS,
                    fmt=pvc.PixelFormat.RGB,
                    device=device,
                    print_fps=False,
                )
            except (RuntimeError, ValueError) as e:
                # Not chained: the traceback would keep the half-built camera alive.
                failure = str(e)
        if failure is not None:
            where = f" {device}" if device else ""
            raise TalkstreamError(
                f"no virtual camera device{where} could be opened ({failure}); {platform_help()}"
            )
        self.device = str(self.camera.device)
        log.info("virtual camera %s, %dx%d at %d fps", self.device, *self.size, FPS)

    def send(self, image: np.ndarray) -> None:
        self.camera.send(vcam_frame(image, self.size))

    def close(self) -> None:
        self.camera.close()
