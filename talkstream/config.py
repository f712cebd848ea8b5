"""The one config tree: :class:`Config`, its engine section and the engine's sub-sections.

Built once at the entry point (the CLI, a server, a test) and passed down as its sections; no
module below reads argv or environment variables. The command sections (serve, live, train,
bench...) are defined beside the code that uses them and held here by :class:`Config`.
Network architectures have their own config dataclasses beside their code
(``engine/motion.py``, ``engine/denoiser.py``), stored in checkpoints; the engine section
names the preset. Every section reads from and writes to dicts through one loader,
:mod:`talkstream._config_io`.

Media constants carry their units in their names.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from talkstream import _config_io
from talkstream.errors import TalkstreamError

if TYPE_CHECKING:  # the sections of higher layers; see Config._config_types
    from talkstream.benchmarking.scenario import Scenario
    from talkstream.cluster.worker import ClusterConfig
    from talkstream.integrations.livekit.worker import WorkerConfig
    from talkstream.publish.cli import PublishConfig
    from talkstream.streaming.config import ServeConfig
    from talkstream.streaming.live import LiveConfig
    from talkstream.training.config import TrainConfig

SAMPLE_RATE_HZ = 16_000
HOP_SAMPLES = 200  # 12.5 ms: 80 mel frames per second
FPS = 25
SAMPLES_PER_VIDEO_FRAME = SAMPLE_RATE_HZ // FPS  # 640 samples = 40 ms
MEL_FRAMES_PER_VIDEO_FRAME = SAMPLES_PER_VIDEO_FRAME / HOP_SAMPLES  # 3.2
N_MELS = 80


@dataclass(frozen=True)
class AudioConfig:
    """Log-mel frontend. Frame ``i`` is centred on sample ``i * hop_samples``."""

    sample_rate_hz: int = SAMPLE_RATE_HZ
    n_fft: int = 800  # 50 ms window
    hop_samples: int = HOP_SAMPLES
    n_mels: int = N_MELS
    fmin_hz: float = 55.0
    fmax_hz: float = 7600.0
    # Floor before the log, in power units; keeps silence finite and stable.
    log_floor: float = 1e-5


# Output frames (width, height) cut around the face, per ``AvatarConfig.framing``; "full" keeps
# the whole photo at its own size (the behaviour before framing existed).
FRAMINGS: dict[str, tuple[int, int] | None] = {
    "call": (640, 480),
    "portrait": (480, 640),
    "landscape": (1280, 720),
    "square": (512, 512),
    "full": None,
}


@dataclass(frozen=True)
class AvatarConfig:
    """Avatar preparation: detection, quality check, framing, alignment, crop, paste-back mask."""

    crop_size: int = 128
    # Face box (eye-to-mouth distance) as a fraction of the crop: leaves room for jaw and chin.
    face_scale: float = 0.32
    # Feather width of the paste-back mask, as a fraction of the crop size.
    feather: float = 0.08
    max_image_pixels: int = 40_000_000  # decompression-bomb guard
    max_file_bytes: int = 64 * 1024 * 1024
    cache_dir: Path | None = None  # None: no on-disk cache
    # The output frame: a key of FRAMINGS. Every framing but "full" cuts a frame of that size
    # around the face, scaling the photo so the face has frame_face_fraction of its height
    # (see talkstream.engine.avatar.frame_photo).
    framing: str = "call"
    frame_size: tuple[int, int] | None = None  # (width, height) instead of the preset's
    # Face height (hairline to chin, estimated from the landmarks) / frame height.
    frame_face_fraction: float = 0.4
    # A photo whose face is smaller than that is enlarged at most this much (the face then stays
    # smaller than asked): further enlargement only adds blur.
    max_upscale: float = 1.5
    # Faces are detected on a copy of the photo no larger than this (longest side, pixels);
    # the landmarks are scaled back to the photo's pixels.
    detect_max_side: int = 1024
    # Refuse (InputError) a face that cannot be animated well: turned, tilted, tiny, mouth
    # covered (talkstream.engine.quality). False (--force): log a warning and go on.
    check_quality: bool = True

    def __post_init__(self) -> None:
        if self.framing not in FRAMINGS:
            raise ValueError(
                f"AvatarConfig.framing must be one of {', '.join(FRAMINGS)}, got {self.framing!r}"
            )
        if self.frame_size is not None:
            if self.framing == "full":
                raise ValueError("AvatarConfig.frame_size needs a framing other than 'full'")
            if len(self.frame_size) != 2 or min(self.frame_size) < 16:
                raise ValueError(
                    f"AvatarConfig.frame_size must be (width, height), each >= 16, "
                    f"got {self.frame_size!r}"
                )
        if not 0.05 <= self.frame_face_fraction <= 1.0:
            raise ValueError(
                f"AvatarConfig.frame_face_fraction must be in [0.05, 1], "
                f"got {self.frame_face_fraction}"
            )
        if not self.max_upscale >= 1.0:
            raise ValueError(f"AvatarConfig.max_upscale must be >= 1, got {self.max_upscale}")
        if self.detect_max_side < 64:
            raise ValueError(
                f"AvatarConfig.detect_max_side must be >= 64, got {self.detect_max_side}"
            )

    def frame_wh(self) -> tuple[int, int] | None:
        """The output frame's (width, height), or None for the whole photo ("full")."""
        if self.framing == "full":
            return None
        if self.frame_size is not None:
            return (int(self.frame_size[0]), int(self.frame_size[1]))
        return FRAMINGS[self.framing]


@dataclass(frozen=True)
class IdleConfig:
    """Idle motion added on top of speech motion: blinks and a slight head sway."""

    enabled: bool = True
    blink_interval_s: float = 3.5  # mean time between blinks
    blink_duration_s: float = 0.2
    sway_amplitude: float = 0.006  # fraction of the crop size
    sway_period_s: float = 6.0


@dataclass(frozen=True)
class SamplerConfig:
    """Noise schedule (training) and the few-step sampler (inference)."""

    train_timesteps: int = 1000
    schedule: str = "cosine"
    steps: int = 1  # 1-4 for a distilled student
    seed: int = 0  # fixed per session: the same noise every frame, so frames do not flicker


@dataclass(frozen=True)
class EngineConfig:
    """Everything a loaded engine needs. ``preset`` picks both networks' architectures."""

    preset: str = "tiny"
    checkpoint: Path | None = None  # None: the shipped default if present, else random init
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    audio: AudioConfig = field(default_factory=AudioConfig)
    avatar: AvatarConfig = field(default_factory=AvatarConfig)
    idle: IdleConfig = field(default_factory=IdleConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    lookahead_frames: int | None = None  # None: the motion model's trained default
    warmup: bool = True  # run the networks once at load, so no user frame pays first-call costs
    # Runs motion + denoiser: torch, compiled, onnxruntime, tensorrt or auto (the fastest
    # available; see talkstream.export.backends).
    backend: str = "torch"
    # The engine's one batch limit: most frames one batched engine call renders, over all
    # streams. Concurrent streams' due frames are coalesced into one call (``Engine.submit``);
    # this bounds how long a call can keep the worker, and every backend is built for batches
    # up to it (``LoadOptions.from_config``: TensorRT profiles, compiled buckets). How many
    # frames ONE stream claims per call is the stream's own, smaller limit
    # (``StreamConfig.frames_per_call``).
    max_batch_frames: int = 32
    # TensorRT engines: "fp16" (fp16 graph types on TensorRT 11, the FP16 flag on 10) or "fp32".
    tensorrt_precision: str = "fp16"

    def __post_init__(self) -> None:
        if self.max_batch_frames < 1:
            raise ValueError(f"max_batch_frames must be >= 1, got {self.max_batch_frames}")
        if self.tensorrt_precision not in ("fp16", "fp32"):
            raise ValueError(
                f"tensorrt_precision must be fp16 or fp32, got {self.tensorrt_precision!r}"
            )


CRF_RANGE = (0, 51)  # H.264's quality scale (lower is better)


@dataclass(frozen=True)
class RenderConfig:
    """Offline render: image + audio file in, H.264 mp4 with muxed audio out."""

    out: Path
    image: Path | None = None  # None: the bundled default face
    audio: Path | None = None  # None: the bundled sample sentence
    landmarks: Path | None = None  # a JSON file of 68 (x, y) points instead of detection
    crf: int = 20
    chunk_ms: int = 20  # how the audio is fed to the session, as a live source would
    progress: bool = True

    def __post_init__(self) -> None:
        lo, hi = CRF_RANGE
        if not lo <= self.crf <= hi:
            raise ValueError(f"crf {self.crf} is outside H.264's range {lo}-{hi}")
        if self.chunk_ms <= 0:
            raise ValueError(f"chunk_ms must be > 0, got {self.chunk_ms}")


@dataclass(frozen=True)
class Config:
    """The root of the config tree: one per run, built by the entry point, passed down as its
    sections.

    ``engine`` is the one engine section every command shares; each command fills only the
    sections it uses (``talkstream serve`` the ``serve`` section, ``talkstream train`` the
    ``train`` one) and leaves the others None. A section's class lives beside the code that
    uses it; this module names them lazily (see ``_config_types``), so that the layers stay
    one-way: nothing here imports streaming, training or benchmarking at import time.

    ``Config.from_dict`` / ``to_dict`` / ``with_overrides`` read and write the whole tree
    (``talkstream._config_io``: unknown keys and wrong types are named by their dotted key).
    """

    engine: EngineConfig = field(default_factory=EngineConfig)
    render: RenderConfig | None = None  # talkstream render
    serve: ServeConfig | None = None  # talkstream serve (streaming/config.py), its .stream
    live: LiveConfig | None = None  # talkstream live (streaming/live.py)
    publish: PublishConfig | None = None  # talkstream publish (publish/cli.py)
    livekit: WorkerConfig | None = None  # talkstream-livekit (integrations/livekit/worker.py)
    cluster: ClusterConfig | None = None  # Ray Serve render workers (cluster/worker.py)
    train: TrainConfig | None = None  # talkstream train / enroll (training/config.py)
    bench: tuple[Scenario, ...] = ()  # talkstream bench (benchmarking/scenario.py)

    @classmethod
    def _config_types(cls) -> dict[str, Any]:
        """The section classes the annotations name, imported when a tree is read from a dict.

        A section whose module cannot be imported here (an optional extra that is not
        installed) is read as a plain dict.
        """
        names = {
            "ServeConfig": "talkstream.streaming.config",
            "LiveConfig": "talkstream.streaming.live",
            "PublishConfig": "talkstream.publish.cli",
            "WorkerConfig": "talkstream.integrations.livekit.worker",
            "ClusterConfig": "talkstream.cluster.worker",
            "TrainConfig": "talkstream.training.config",
            "Scenario": "talkstream.benchmarking.scenario",
        }
        out: dict[str, Any] = {}
        for name, module in names.items():
            try:
                out[name] = getattr(importlib.import_module(module), name)
            except ImportError:
                out[name] = dict
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """The tree from nested dicts (a JSON/TOML file); missing keys keep their defaults.

        Raises:
            ValueError: unknown keys or wrong types (named by their dotted key), or what a
                section's own checks refuse.
        """
        return _config_io.from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict; ``Config.from_dict(c.to_dict()) == c``."""
        return _config_io.to_dict(self)

    def with_command_overrides(self, overrides: Sequence[str], command: str) -> Config:
        """A command's ``--set`` values applied to the tree it built from its flags.

        Raises:
            TalkstreamError: one line naming the bad value: an unknown key, a wrong type, a
                value the section refuses, or a section the command does not use.
        """
        if not overrides:
            return self
        used = {f.name for f in fields(self) if getattr(self, f.name) not in (None, ())}
        for item in overrides:
            section = item.split("=", 1)[0].split(".", 1)[0].strip()
            if section in {f.name for f in fields(self)} and section not in used:
                raise TalkstreamError(
                    f"--set {item}: talkstream {command} does not use the {section!r} section "
                    f"(it uses {', '.join(sorted(used))})"
                )
        try:
            return self.with_overrides(list(overrides))
        except (TypeError, ValueError) as e:
            raise TalkstreamError(f"--set: {e}") from None

    def with_overrides(self, overrides: list[str]) -> Config:
        """This tree with ``section.key=value`` strings applied (``--set engine.device=cuda``;
        the value parsed as JSON, else taken as a string)."""
        return _config_io.apply_overrides(self, overrides)
