"""Benchmark scenarios: one frozen dataclass per measurement, validated when it is built.

A scenario names everything that changes the numbers (model preset, backend, face resolution,
sampling steps, batch, concurrent sessions, device, precision, kernel path, frame size) plus
how long to measure. Scenarios are plain data: they round-trip through JSON
(``Scenario.from_dict(s.to_dict()) == s``), so a result file says exactly what was run and a
scenario file (``talkstream bench --scenario-file``) can ask for any set of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from talkstream import _config_io

DTYPES = ("float32", "bfloat16", "float16")
# "ops": the registered custom ops (fused kernels where the device has them); "reference": the
# plain pure-torch references (``talkstream.kernels.reference_kernels``). Side by side, they show
# what the kernels buy.
KERNEL_PATHS = ("ops", "reference")
MAX_STEPS = 4  # the sampler's limit (a distilled few-step student)
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")
# The denoiser's stem (patch 4) and its two downsamplings need sides divisible by 16.
_RESOLUTION_MULTIPLE = 16


@dataclass(frozen=True)
class Scenario:
    """One benchmark measurement.

    Attributes:
        preset: model architecture preset (``tiny``, ``base``).
        backend: the engine's backend for motion and denoiser (``talkstream.export.backends``:
            ``torch`` eager, ``compiled``, ``onnxruntime``, ``tensorrt``, or ``auto``). Whether
            it can run here is checked when the scenario runs, not when it is built.
        resolution: side of the square face crop the denoiser renders, pixels; None: the
            preset's own (128 for ``tiny``, 256 for ``base``). Other sizes use the preset's
            architecture at that size with random weights (for like-for-like comparisons).
        steps: denoiser sampling steps per frame (1-4).
        batch: frames of each session per denoiser call (1 for live streaming; more when a
            session catches up, as ``Session.max_batch`` allows).
        sessions: concurrent sessions; the due frames of all of them go into one denoiser call.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: denoiser precision (``float32``, ``bfloat16``, ``float16``).
        kernels: ``ops`` (custom ops) or ``reference`` (plain torch references).
        frame_size: ``(width, height)`` of the output video frame; None: the avatar photo's own
            (512x512). Changes the cost of paste-back, colour conversion and encoding.
        encode: whether each frame is converted to yuv420p and VP8-encoded as ``serve``
            sends it (aiortc's ``Vp8Encoder``).
        iters: measured iterations (one iteration renders ``sessions * batch`` frames).
        warmup: iterations run first and reported separately, not in the percentiles.
        seed: noise seed of the first session (session ``i`` uses ``seed + i``).
        lookahead: audio lookahead in video frames; None: the motion model's default.
        name: a label for tables and file names; built from the fields when empty.
    """

    preset: str = "tiny"
    backend: str = "auto"  # what serve runs: the fastest backend available here
    resolution: int | None = None
    steps: int = 1
    batch: int = 1
    sessions: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    kernels: str = "ops"
    frame_size: tuple[int, int] | None = None
    encode: bool = True
    iters: int = 50
    warmup: int = 5
    seed: int = 0
    lookahead: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        _check_choice("preset", self.preset, _preset_names())
        _check_choice("backend", self.backend, _backend_names())
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("kernels", self.kernels, KERNEL_PATHS)
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.resolution is not None:
            _check_int("resolution", self.resolution, 16)
            if self.resolution % _RESOLUTION_MULTIPLE:
                raise ValueError(
                    f"resolution must be a multiple of {_RESOLUTION_MULTIPLE} (the denoiser's "
                    f"stem and downsamplings), got {self.resolution}"
                )
        _check_int("steps", self.steps, 1)
        if self.steps > MAX_STEPS:
            raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {self.steps}")
        _check_int("batch", self.batch, 1)
        _check_int("sessions", self.sessions, 1)
        _check_int("iters", self.iters, 1)
        _check_int("warmup", self.warmup, 0)
        _check_int("seed", self.seed, 0)
        if self.lookahead is not None:
            _check_int("lookahead", self.lookahead, 0)
        if not isinstance(self.encode, bool):
            raise TypeError(f"encode must be a bool, got {type(self.encode).__name__}")
        if self.frame_size is not None:
            fs = tuple(self.frame_size)
            if len(fs) != 2:
                raise ValueError(f"frame_size must be (width, height), got {self.frame_size!r}")
            for side in fs:
                _check_int("frame_size", side, 64)
                if side % 2:
                    # I420 and H.264 need even sides.
                    raise ValueError(f"frame_size sides must be even, got {self.frame_size!r}")
            object.__setattr__(self, "frame_size", (int(fs[0]), int(fs[1])))
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a string, got {type(self.name).__name__}")
        if not self.name:
            object.__setattr__(self, "name", self.default_name())

    @property
    def frames_per_iter(self) -> int:
        """Frames one iteration renders: the due frames of every session, in one call."""
        return self.batch * self.sessions

    def crop_size(self) -> int:
        """The face crop side this scenario renders (the preset's when ``resolution`` is None)."""
        if self.resolution is not None:
            return self.resolution
        from talkstream.engine.denoiser import PRESETS  # lazy: torch

        return PRESETS[self.preset].image_size

    def default_name(self) -> str:
        parts = [self.preset, self.backend]
        if self.resolution is not None:
            parts.append(f"{self.resolution}px")
        parts.append(f"{self.steps}step")
        if self.batch > 1:
            parts.append(f"b{self.batch}")
        parts.append(f"{self.sessions}sess")
        parts += [self.device.replace(":", ""), self.dtype]
        if self.kernels != "ops":
            parts.append(f"{self.kernels}-kernels")
        if self.frame_size is not None:
            parts.append(f"{self.frame_size[0]}x{self.frame_size[1]}")
        if not self.encode:
            parts.append("noenc")
        if self.lookahead is not None:
            parts.append(f"la{self.lookahead}")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``frame_size`` as a list)."""
        return _config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scenario:
        """Build from a dict such as ``to_dict`` makes; unknown keys are an error."""
        if not isinstance(data, dict):
            raise TypeError(f"a scenario must be a JSON object, got {type(data).__name__}")
        return _config_io.from_dict(cls, data, "scenario")


def _preset_names() -> tuple[str, ...]:
    from talkstream.engine.denoiser import PRESETS  # lazy: torch

    return tuple(sorted(PRESETS))


def _backend_names() -> tuple[str, ...]:
    from talkstream.export.backends import backend_names  # lazy: torch

    return backend_names()


def _check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")


def _check_int(field: str, value: object, minimum: int) -> None:
    # bool is an int subclass: reject it, True as a batch size is a mistake.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{field} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{field} must be at least {minimum}, got {value}")
