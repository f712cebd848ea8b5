"""Offline render: a face image and a speech file in, an H.264 mp4 with the speech muxed out.

The audio is read in blocks and fed to a ``Session`` exactly as a live source would feed it;
frames are encoded as soon as they are rendered, so memory stays flat in the clip's length.
The output is written to a temporary file and renamed at the end: a failed or interrupted render
never leaves a half-written mp4 under the requested name.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

import av
import numpy as np
from tqdm import tqdm

from talkstream.busy import SlowdownHint
from talkstream.config import FPS, SAMPLE_RATE_HZ, AvatarConfig, Config, EngineConfig, RenderConfig
from talkstream.engine.audio import AudioFileReader
from talkstream.engine.avatar import (
    Avatar,
    AvatarSource,
    load_avatar_source,
    prepare_avatar_source,
)
from talkstream.engine.compose import i420_host
from talkstream.engine.motion import frames_for_samples
from talkstream.engine.pipeline import Engine, Frame
from talkstream.errors import InputError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")
# AAC encodes only these rates; anything else is resampled to 48 kHz for the muxed track.
AAC_RATES_HZ = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)


def default_audio_path() -> Path:
    """The bundled sample sentence (espeak-ng, 16 kHz mono)."""
    return Path(str(resources.files("talkstream") / "assets" / "sample_speech.wav"))


@dataclass
class RenderResult:
    out: Path
    frames: int
    audio_duration_s: float
    wall_s: float
    random_init: bool

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else float("inf")


def load_source_for_render(cfg: RenderConfig, avatar: AvatarConfig) -> AvatarSource:
    """The photo the render config names (the bundled astronaut by default), its face found and
    judged by the engine section's ``avatar`` settings: an unusable photo fails here, before
    any model loads."""
    return load_avatar_source(cfg.image, cfg.landmarks, avatar)


def load_avatar_for_render(
    cfg: RenderConfig, avatar: AvatarConfig, crop_size: int, source: AvatarSource | None = None
) -> Avatar:
    """The avatar the render config names, framed by ``avatar.framing``."""
    acfg = dataclasses.replace(avatar, crop_size=crop_size)
    if source is None:
        source = load_source_for_render(cfg, avatar)
    return prepare_avatar_source(source, acfg)


def check_out_path(out: Path) -> None:
    """Raise ``InputError`` unless ``out`` is a writable video file name."""
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise InputError(
            f"output {out} must end in one of {', '.join(VIDEO_SUFFIXES)} (got {out.suffix!r})"
        )
    if out.is_dir():
        raise InputError(f"output {out} is a directory; give a file name such as {out}/out.mp4")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder {parent} is not writable; choose another --out")
    # Try it: os.access says yes for root in /proc, a read-only mount, a full disk.
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".talkstream-", suffix=out.suffix)
    except OSError as e:
        raise InputError(
            f"cannot write {out}: no file can be created in {parent} ({e.strerror or e}); "
            "choose --out in a folder you can write to"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (a brief window, before any thread)
    os.umask(mask)
    return mask


def output_mode(out: Path) -> int:
    """The permissions a new file ``out`` would get from ``open()``: 0o666 less the umask, or
    those of the file it replaces (a temp file is created 0600 and renamed over ``out``)."""
    try:
        return out.stat().st_mode & 0o777
    except OSError:
        return 0o666 & ~_umask()


class Mp4Writer:
    """H.264 video at 25 fps plus the speech as AAC, written to a temp file renamed on commit.

    ``write_audio`` takes float PCM (n, channels) at the rate given here, ``write_video`` RGB
    frames with their 25 fps ``pts``. ``finish()`` flushes the encoders and closes the file,
    ``commit()`` renames it to ``out``; ``discard()`` removes it (a failed or interrupted
    write never leaves a half-written file under the requested name).
    """

    def __init__(
        self, out: Path, width: int, height: int, sample_rate_hz: int, channels: int, crf: int
    ) -> None:
        self.out = out
        self.sample_rate_hz = sample_rate_hz
        # H.264 in yuv420p needs even sizes: drop a last odd row/column.
        self.size = (height - height % 2, width - width % 2)
        self.channels = 1 if channels != 2 else 2
        self.layout = "mono" if self.channels == 1 else "stereo"
        try:
            fd, tmp_name = tempfile.mkstemp(
                dir=out.parent if str(out.parent) else ".", suffix=out.suffix
            )
        except OSError as e:
            raise InputError(
                f"cannot write {out}: {e.strerror or e}; choose --out in a folder you can write to"
            ) from None
        self.tmp = Path(tmp_name)
        try:
            # mkstemp makes the file 0600: give it what a plain open() would, before it is
            # renamed into place.
            os.fchmod(fd, output_mode(out))
        finally:
            os.close(fd)
        self.frames_written = 0
        self._a_pts = 0
        self._closed = False
        try:
            self.container = av.open(str(self.tmp), mode="w")
            h2, w2 = self.size
            self.vstream = self.container.add_stream("libx264", rate=FPS)
            self.vstream.width, self.vstream.height = w2, h2
            self.vstream.pix_fmt = "yuv420p"
            self.vstream.options = {"crf": str(crf), "preset": "veryfast"}
            self.vstream.codec_context.time_base = Fraction(1, FPS)
            a_rate = sample_rate_hz if sample_rate_hz in AAC_RATES_HZ else 48_000
            self.astream = self.container.add_stream("aac", rate=a_rate, layout=self.layout)
            self.resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=a_rate)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def write_audio(self, pcm: np.ndarray | None) -> None:
        """Encode float PCM (n, channels); ``None`` flushes the resampler (end of audio)."""
        if pcm is None:
            frames = self.resampler.resample(None)
        else:
            if self.channels == 1 and pcm.shape[1] != 1:
                pcm = pcm.mean(axis=1, keepdims=True)
            af = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(pcm.T, dtype=np.float32), format="fltp", layout=self.layout
            )
            af.sample_rate = self.sample_rate_hz
            af.pts = self._a_pts
            af.time_base = Fraction(1, self.sample_rate_hz)
            self._a_pts += pcm.shape[0]
            frames = self.resampler.resample(af)
        for f in frames:
            self.container.mux(self.astream.encode(f))

    def write_video(self, image: Any, pts: int) -> None:
        """Encode one (H, W, 3) uint8 RGB frame shown at ``pts`` / 25 s.

        ``image`` is a numpy array, or a GPU tensor (``Frame.image`` of a GPU engine): that one
        is converted to yuv420p on its device and only the planes come to the host.
        """
        h2, w2 = self.size
        img = image if tuple(image.shape[:2]) == (h2, w2) else image[:h2, :w2]
        if isinstance(img, np.ndarray):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        else:
            vf = av.VideoFrame.from_ndarray(i420_host(img), format="yuv420p")
        vf.pts = pts
        vf.time_base = Fraction(1, FPS)
        self.container.mux(self.vstream.encode(vf))
        self.frames_written += 1

    def finish(self) -> None:
        """Flush both encoders and close the file (still under its temporary name)."""
        self.container.mux(self.astream.encode(None))
        self.container.mux(self.vstream.encode(None))
        self._close_container()

    def commit(self) -> None:
        """Give the finished file its requested name."""
        os.replace(self.tmp, self.out)

    def discard(self) -> None:
        """Close and delete the temporary file (after an error or an interrupt)."""
        self._close_container()
        self.tmp.unlink(missing_ok=True)

    def _close_container(self) -> None:
        if not self._closed:
            self._closed = True
            self.container.close()


def render_to_file(
    root: Config,
    engine: Engine | Callable[[EngineConfig], Engine],
    on_frame: Callable[[Frame], None] | None = None,
) -> RenderResult:
    """Render ``root.render``: its ``audio`` spoken by its ``image`` into its ``out``; returns
    what was written. The photo is prepared with ``root.engine.avatar``.

    ``engine``: a loaded engine (left open), or a loader such as
    ``talkstream.runtime.load_engine``, called with ``root.engine`` once the inputs passed their
    checks (the engine it returns is closed at the end).
    """
    cfg = root.render
    if cfg is None:
        raise ValueError("render_to_file needs a config with a render section")
    out = Path(cfg.out)
    check_out_path(out)
    audio_path = cfg.audio if cfg.audio is not None else default_audio_path()
    # Open the inputs before loading any model: bad inputs fail fast.
    reader = AudioFileReader(audio_path)
    own_engine = not isinstance(engine, Engine)
    eng: Engine | None = None
    try:
        reader.check_finite()
        source = load_source_for_render(cfg, root.engine.avatar)
        eng = engine if isinstance(engine, Engine) else engine(root.engine)
        avatar = load_avatar_for_render(cfg, root.engine.avatar, eng.crop_size, source)
        return _render(cfg, eng, avatar, reader, out, on_frame)
    finally:
        reader.close()
        if own_engine and eng is not None:
            eng.close()


def _render(
    cfg: RenderConfig,
    engine: Engine,
    avatar: Avatar,
    reader: AudioFileReader,
    out: Path,
    on_frame: Callable[[Frame], None] | None,
) -> RenderResult:
    sr = reader.sample_rate_hz
    n16 = math.ceil(reader.num_frames * SAMPLE_RATE_HZ / sr)
    total_frames = frames_for_samples(n16)
    session = engine.session(avatar)
    h, w = avatar.image.shape[:2]
    t0 = time.perf_counter()
    done = 0
    writer = Mp4Writer(out, w, h, sr, reader.channels, cfg.crf)
    try:
        pbar = _progress(cfg.progress, total_frames)
        block = max(1, sr * cfg.chunk_ms // 1000)
        threads = engine.cfg.threads if engine.device.type == "cpu" else 1
        hint = SlowdownHint(lambda line: _say(pbar, line), threads=threads)

        def encode_video(frames: list[Frame]) -> None:
            nonlocal done
            for fr in frames:
                writer.write_video(fr.image, fr.pts)
                if on_frame is not None:
                    on_frame(fr)
                done += 1
                pbar.update(1)
            hint.update(done)

        for pcm in reader.blocks(block):
            session.push_audio(pcm, sr)
            writer.write_audio(pcm)
            while session.has_ready():
                encode_video(session.render_ready())
        session.end_audio()
        writer.write_audio(None)
        while session.has_ready():
            encode_video(session.render_ready())
        writer.finish()
        pbar.close()
        assert done == total_frames, (done, total_frames)
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    wall = time.perf_counter() - t0
    return RenderResult(out, done, reader.duration_s, wall, engine.random_init)


def _say(pbar: tqdm, line: str) -> None:
    # Above the progress bar when there is one; a log line otherwise.
    if pbar.disable:
        log.warning("%s", line)
    else:
        pbar.write(f"talkstream: {line}", file=sys.stderr)


def _progress(enabled: bool, total: int) -> tqdm:
    # disable=True keeps the same object and calls but prints nothing.
    return tqdm(total=total, unit="frame", desc="render", dynamic_ncols=True, disable=not enabled)
