"""AudioToMotion: audio to lip and jaw landmark motion.

A small transformer over a sliding window of video frames (25 fps). Each video frame ``s`` is one
token built from the log-mel rows around it; the window for output frame ``t`` holds
``context_frames`` past tokens, the current one and up to ``lookahead_frames`` future tokens. The
token at the current position predicts the displacement of the jaw (0-16) and lip (48-67)
landmarks from the avatar's neutral landmarks, in normalised crop coordinates ([-1, 1]).

Streaming and offline inference build exactly the same windows (``MotionStreamer`` emits frame
``t`` as soon as the mel rows its window needs exist), so they give the same landmarks.

The lookahead is trained at its maximum; a smaller one at inference masks the later tokens out of
attention, trading accuracy for latency without a new model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from talkstream import _config_io
from talkstream.config import FPS, HOP_SAMPLES, SAMPLE_RATE_HZ, AudioConfig
from talkstream.engine.landmarks import MOTION_POINTS

# Video frame t starts at mel row 3.2 t = (MEL_NUM * t) // MEL_DEN, in exact integers.
MEL_NUM = SAMPLE_RATE_HZ // HOP_SAMPLES  # 80 mel rows per second
MEL_DEN = FPS  # 25 video frames per second
N_MOTION_POINTS = len(MOTION_POINTS)  # 37: jaw + lips


@dataclass(frozen=True)
class MotionConfig:
    n_mels: int = 80
    mel_rows: int = 8  # mel rows per token (100 ms)
    mel_offset: int = -5  # first row of frame t's token, relative to row floor(3.2 t)
    context_frames: int = 8  # past frames in the window (320 ms)
    lookahead_frames: int = 2  # future frames in the window (80 ms), the trained maximum
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ff_mult: int = 2
    n_landmarks: int = 68
    # Output scale: displacements are a few percent of the crop; keeps early training stable.
    out_scale: float = 0.05
    # Fixed mel normalisation (log power); silence is log(log_floor).
    mel_mean: float = -6.0
    mel_std: float = 3.0

    @property
    def window(self) -> int:
        return self.context_frames + 1 + self.lookahead_frames

    @classmethod
    def from_name(cls, name: str) -> MotionConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown motion preset {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name]

    def to_dict(self) -> dict[str, Any]:
        return _config_io.to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MotionConfig:
        """Inverse of ``to_dict``; unknown keys or wrong types raise ``ValueError``."""
        return _config_io.from_dict(cls, d)


PRESETS: dict[str, MotionConfig] = {
    "tiny": MotionConfig(),
    "base": MotionConfig(d_model=256, n_layers=4, n_heads=8, context_frames=12),
}


def token_rows(frame: int, cfg: MotionConfig) -> tuple[int, int]:
    """Mel rows [start, stop) of video frame ``frame``'s token (may reach outside the audio)."""
    start = (MEL_NUM * frame) // MEL_DEN + cfg.mel_offset
    return start, start + cfg.mel_rows


def rows_needed(frame: int, cfg: MotionConfig, lookahead: int) -> int:
    """Number of mel rows that must exist before output frame ``frame`` can be computed."""
    return token_rows(frame + lookahead, cfg)[1]


def frames_for_samples(n_samples_16k: int) -> int:
    """Video frames covering ``n_samples_16k`` samples: one per started 40 ms."""
    spf = SAMPLE_RATE_HZ // FPS
    return -(-n_samples_16k // spf)


def latency_samples(cfg: MotionConfig, audio: AudioConfig, lookahead: int) -> int:
    """Audio (16 kHz samples) that must arrive after a frame's start before it can be computed.

    The algorithmic part of the latency budget: lookahead, the token's future mel rows and half
    an STFT window. Compute, encode and network come on top.
    """
    rows = rows_needed(0, cfg, lookahead)
    return (rows - 1) * audio.hop_samples + audio.n_fft // 2


def build_windows(
    rows: np.ndarray,
    frames: range | list[int],
    cfg: MotionConfig,
    silence: float,
    row_base: int = 0,
) -> np.ndarray:
    """Token windows for output ``frames``.

    ``rows`` holds mel rows ``[row_base, row_base + len(rows))``; any other row is silence (rows
    before the start and after the end of the audio). Streaming and offline both call this, so
    they see the same numbers. Returns (len(frames), window, mel_rows, n_mels) float32.
    """
    frames = list(frames)
    end = row_base + rows.shape[0]
    out = np.full(
        (len(frames), cfg.window, cfg.mel_rows, cfg.n_mels), silence, dtype=np.float32
    )  # (F, W, R, 80)
    for i, t in enumerate(frames):
        for w in range(cfg.window):
            start, stop = token_rows(t - cfg.context_frames + w, cfg)
            lo, hi = max(start, row_base), min(stop, end)
            if hi > lo:
                out[i, w, lo - start : hi - start] = rows[lo - row_base : hi - row_base]
    return out


class AudioToMotion(nn.Module):
    """Mel windows + neutral landmarks -> jaw and lip displacements of the current frame."""

    def __init__(self, cfg: MotionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.mel_proj = nn.Linear(cfg.mel_rows * cfg.n_mels, d)
        self.pos = nn.Parameter(torch.randn(cfg.window, d) * 0.02)
        # The avatar's face shape conditions every token: lip shapes depend on the face.
        self.neutral_proj = nn.Linear(cfg.n_landmarks * 2, d)
        layer = nn.TransformerEncoderLayer(
            d,
            cfg.n_heads,
            dim_feedforward=d * cfg.ff_mult,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, N_MOTION_POINTS * 2)

    @property
    def head_shape(self) -> tuple[int, int]:
        return (N_MOTION_POINTS, 2)

    def key_padding_mask(self, lookahead: int, device: torch.device) -> torch.Tensor | None:
        """Mask for tokens beyond ``lookahead`` (True = ignored); None when all are used."""
        cfg = self.cfg
        if not 0 <= lookahead <= cfg.lookahead_frames:
            raise ValueError(
                f"lookahead_frames={lookahead} is outside 0..{cfg.lookahead_frames}, "
                "the range this model was trained for"
            )
        if lookahead == cfg.lookahead_frames:
            return None
        mask = torch.zeros(cfg.window, dtype=torch.bool, device=device)
        mask[cfg.context_frames + 1 + lookahead :] = True
        return mask

    def forward(
        self,
        windows: torch.Tensor,  # (B, W, R, n_mels) log-mel
        neutral: torch.Tensor,  # (B, 68, 2) normalised crop coords
        lookahead: int | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        b = windows.shape[0]
        la = cfg.lookahead_frames if lookahead is None else lookahead
        x = (windows - cfg.mel_mean) / cfg.mel_std
        x = self.mel_proj(x.reshape(b, cfg.window, -1))  # (B, W, d)
        x = x + self.pos + self.neutral_proj(neutral.reshape(b, 1, -1))  # (B, W, d)
        mask = self.key_padding_mask(la, windows.device)
        if mask is not None:
            x = self.encoder(x, src_key_padding_mask=mask.expand(b, -1))
        else:
            x = self.encoder(x)
        h = self.norm(x[:, cfg.context_frames])  # (B, d): the current frame's token
        return self.head(h).reshape(b, N_MOTION_POINTS, 2) * cfg.out_scale  # (B, 37, 2)

    def apply_displacement(self, neutral: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        """Neutral (B, 68, 2) + displacement (B, 37, 2) on the motion points -> (B, 68, 2)."""
        idx = torch.as_tensor(MOTION_POINTS, device=neutral.device)
        out = neutral.clone()
        out[:, idx] = neutral[:, idx] + disp
        return out


@torch.inference_mode()
def predict_offline(
    model: AudioToMotion,
    mel: np.ndarray,  # (n_rows, n_mels): log_mel of the whole clip
    n_frames: int,
    neutral: np.ndarray,  # (68, 2) normalised
    silence: float,
    lookahead: int | None = None,
    batch: int = 256,
) -> np.ndarray:
    """Displacements (n_frames, 37, 2) for a whole clip: the reference for streaming."""
    out = np.empty((n_frames, N_MOTION_POINTS, 2), dtype=np.float32)
    device = next(model.parameters()).device
    neutral_t = torch.as_tensor(neutral, dtype=torch.float32, device=device)[None]
    for s in range(0, n_frames, batch):
        frames = range(s, min(s + batch, n_frames))
        win = torch.from_numpy(build_windows(mel, frames, model.cfg, silence)).to(device)
        disp = model(win, neutral_t.expand(len(frames), -1, -1), lookahead)
        out[s : s + len(frames)] = disp.float().cpu().numpy()
    return out


class MotionStreamer:
    """Streaming AudioToMotion for one session.

    Mel rows go in as they are produced; ``ready_windows()`` returns the windows of frames whose
    inputs are all present (the caller runs the model, possibly batched across sessions).
    Only the rows still needed are kept.
    """

    def __init__(self, cfg: MotionConfig, silence: float, lookahead: int | None = None) -> None:
        self.cfg = cfg
        self.silence = silence
        self.lookahead = cfg.lookahead_frames if lookahead is None else lookahead
        if not 0 <= self.lookahead <= cfg.lookahead_frames:
            raise ValueError(
                f"lookahead_frames={self.lookahead} is outside 0..{cfg.lookahead_frames}"
            )
        # Rows [row_base, row_base + len(rows)) are held; earlier ones are no longer needed.
        self._rows: np.ndarray = np.empty((0, cfg.n_mels), dtype=np.float32)
        self._row_base = 0
        self.next_frame = 0  # next output frame to emit
        self._end_frames: int | None = None  # total frames, known once the stream ended
        self._ended = False
        # Interruption (see ``interrupt``): mel rows [start, stop) are silence whenever they
        # arrive; and once frame ``_forget[0]`` is next, every row before ``_forget[1]`` is.
        self._mute: tuple[int, int] | None = None
        self._forget: tuple[int, int] | None = None

    @property
    def rows_received(self) -> int:
        return self._row_base + self._rows.shape[0]

    def clone(self) -> MotionStreamer:
        """An independent copy of the stream's state (rows are silenced in place)."""
        new = copy.copy(self)
        new._rows = self._rows.copy()
        return new

    def push_mel(self, rows: np.ndarray) -> None:
        if self._ended:
            raise RuntimeError("push_mel() after end(): the stream has ended")
        if rows.shape[0]:
            self._rows = np.concatenate([self._rows, rows.astype(np.float32, copy=False)])
            if self._mute is not None:
                self._apply_mute()

    def end(self, n_samples_16k: int) -> None:
        """The audio ended after ``n_samples_16k`` samples: the remaining frames become ready."""
        self._ended = True
        self._end_frames = frames_for_samples(n_samples_16k)

    def has_ready(self) -> bool:
        """Whether ``ready_windows()`` would return at least one frame."""
        return self._frame_ready(self.next_frame)

    def _frame_ready(self, t: int) -> bool:
        if self._end_frames is not None:
            return t < self._end_frames
        return rows_needed(t, self.cfg, self.lookahead) <= self.rows_received

    def ready_windows(self, max_frames: int | None = None) -> tuple[list[int], np.ndarray]:
        """(frame indices, windows (F, W, R, n_mels)) of every frame that is now computable."""
        frames: list[int] = []
        while max_frames is None or len(frames) < max_frames:
            if self._forget is not None and self.next_frame >= self._forget[0]:
                if frames:
                    break  # these frames' windows still see the past; the next ones' do not
                self._apply_forget()
            if not self._frame_ready(self.next_frame):
                break
            frames.append(self.next_frame)
            self.next_frame += 1
        if not frames:
            return frames, np.empty((0, self.cfg.window, self.cfg.mel_rows, self.cfg.n_mels))
        win = build_windows(self._rows, frames, self.cfg, self.silence, self._row_base)
        self._drop_unneeded()
        return frames, win

    # -- interruption ---------------------------------------------------------------------------

    def interrupt(self, at_frame: int, clean_row: int, *, keep_past: bool = False) -> None:
        """Frames from ``at_frame`` on are computed as if the audio fell silent there.

        Mel rows from the first one centred at or after frame ``at_frame``'s start up to
        ``clean_row`` (exclusive; the caller's first row computed from audio after the cut)
        become silence, held ones now and later ones as they arrive: no window, before the cut
        or after it, sees the cut speech in its future. Unless ``keep_past``, frames from
        ``at_frame`` on also see silence for every row before ``clean_row`` (their past
        context): their windows are those of a silent stream, so the mouth is at rest from
        the first of them, instead of closing over the context's length. Frames from
        ``at_frame`` that were already emitted are emitted again (the caller discards the old
        ones); frame indices, and so media time, go on without a jump. (With ``keep_past``, a
        rewound frame reads the rows already dropped, those before the context of the next
        frame that was due, as silence.)
        """
        at_frame = max(at_frame, 0)
        cut_row = -(-MEL_NUM * at_frame // MEL_DEN)  # first row centred at or after the cut
        clean_row = max(clean_row, cut_row)
        if self._end_frames is None or at_frame < self._end_frames:
            self.next_frame = min(self.next_frame, at_frame)
        if clean_row > cut_row:
            if self._mute is not None and self._mute[1] > self.rows_received:
                # A cut still waiting for some of its rows: the new one extends it.
                cut_row = min(cut_row, self._mute[0])
                clean_row = max(clean_row, self._mute[1])
            self._mute = (cut_row, clean_row)
            self._apply_mute()
        if not keep_past:
            if self._forget is not None and self._forget[0] < at_frame:
                # An earlier cut's frames are still to come: they keep forgetting from there.
                at_frame = self._forget[0]
                clean_row = max(clean_row, self._forget[1])
            self._forget = (at_frame, clean_row)
            if self.next_frame >= at_frame:
                self._apply_forget()

    def _silence_rows(self, start: int, stop: int) -> None:
        lo = max(start, self._row_base) - self._row_base
        hi = min(stop, self.rows_received) - self._row_base
        if hi > lo:
            if not self._rows.flags.writeable:
                self._rows = self._rows.copy()
            self._rows[lo:hi] = self.silence

    def _apply_mute(self) -> None:
        assert self._mute is not None
        start, stop = self._mute
        self._silence_rows(start, stop)
        if self.rows_received >= stop:
            self._mute = None  # every muted row has arrived and been silenced

    def _apply_forget(self) -> None:
        assert self._forget is not None
        _, stop = self._forget
        self._forget = None
        received = self.rows_received
        self._silence_rows(self._row_base, stop)
        if stop > received:  # rows not yet here: silenced as they arrive
            lo = received if self._mute is None else min(self._mute[0], received)
            self._mute = (lo, max(stop, self._mute[1] if self._mute is not None else stop))

    def _drop_unneeded(self) -> None:
        first_row = token_rows(self.next_frame - self.cfg.context_frames, self.cfg)[0]
        drop = min(max(first_row - self._row_base, 0), self._rows.shape[0])
        if drop:
            self._rows = self._rows[drop:]
            self._row_base += drop


def silence_level(audio: AudioConfig) -> float:
    """The log-mel value of digital silence."""
    return float(math.log(audio.log_floor))
