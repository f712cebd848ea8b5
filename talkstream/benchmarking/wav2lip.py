"""A Wav2Lip-equivalent generator at 96x96, for timing only.

This is an architecture-equivalent, written here from the layer configuration described for the
public Wav2Lip generator (Prajwal et al., ACM MM 2020): the same convolutions, channel widths,
strides, residual connections and skip concatenations, with random weights. It is not Wav2Lip:
it has no trained weights and is never used to render a face. Its only use is to time the same
per-frame work as the anchor on the same machine, in the same run as our model.

Per frame the generator takes
- a face window ``(B, 6, 96, 96)``: the target frame with its lower half masked, concatenated
  with a reference frame of the same identity, and
- a mel window ``(B, 1, 80, 16)``: 16 mel frames (0.2 s) around the video frame,

and returns the face ``(B, 3, 96, 96)`` in [0, 1]. A face encoder takes the face window down to
1x1x512 in seven stages; an audio encoder takes the mel window to 1x1x512; a decoder upsamples
the audio embedding back to 96x96, concatenating the face encoder's feature map of the same size
after every stage (U-Net skips).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

FACE_SIZE = 96
MEL_BINS = 80
MEL_STEPS = 16
FACE_CHANNELS = 6  # masked target (3) + reference (3)


class ConvBNReLU(nn.Module):
    """Conv2d + BatchNorm + ReLU, with an optional identity residual added before the ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int | tuple[int, int],
        padding: int,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding)
        self.bn = nn.BatchNorm2d(cout)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        if self.residual:
            out = out + x
        return torch.relu(out)


class ConvTBNReLU(nn.Module):
    """ConvTranspose2d + BatchNorm + ReLU (the decoder's upsampling step)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, padding: int, output_padding: int = 0
    ) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, kernel, stride, padding, output_padding)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _res(c: int, n: int) -> list[nn.Module]:
    return [ConvBNReLU(c, c, 3, 1, 1, residual=True) for _ in range(n)]


@dataclass(frozen=True)
class Wav2LipShapes:
    """Input shapes of one batch."""

    batch: int = 1

    @property
    def face(self) -> tuple[int, int, int, int]:
        return (self.batch, FACE_CHANNELS, FACE_SIZE, FACE_SIZE)

    @property
    def mel(self) -> tuple[int, int, int, int]:
        return (self.batch, 1, MEL_BINS, MEL_STEPS)


class Wav2LipEquivalent(nn.Module):
    """Architecture-equivalent of the Wav2Lip generator (random weights, timing only)."""

    def __init__(self) -> None:
        super().__init__()
        # Face encoder: 96 -> 96 -> 48 -> 24 -> 12 -> 6 -> 3 -> 1.
        self.face_encoder = nn.ModuleList(
            [
                nn.Sequential(ConvBNReLU(FACE_CHANNELS, 16, 7, 1, 3)),
                nn.Sequential(ConvBNReLU(16, 32, 3, 2, 1), *_res(32, 2)),
                nn.Sequential(ConvBNReLU(32, 64, 3, 2, 1), *_res(64, 3)),
                nn.Sequential(ConvBNReLU(64, 128, 3, 2, 1), *_res(128, 2)),
                nn.Sequential(ConvBNReLU(128, 256, 3, 2, 1), *_res(256, 2)),
                nn.Sequential(ConvBNReLU(256, 512, 3, 2, 1), *_res(512, 1)),
                nn.Sequential(ConvBNReLU(512, 512, 3, 1, 0), ConvBNReLU(512, 512, 1, 1, 0)),
            ]
        )
        # Audio encoder: (80, 16) -> (80, 16) -> (27, 16) -> (9, 6) -> (3, 3) -> (1, 1).
        self.audio_encoder = nn.Sequential(
            ConvBNReLU(1, 32, 3, 1, 1),
            *_res(32, 2),
            ConvBNReLU(32, 64, 3, (3, 1), 1),
            *_res(64, 2),
            ConvBNReLU(64, 128, 3, 3, 1),
            *_res(128, 2),
            ConvBNReLU(128, 256, 3, (3, 2), 1),
            *_res(256, 1),
            ConvBNReLU(256, 512, 3, 1, 0),
            ConvBNReLU(512, 512, 1, 1, 0),
        )
        # Decoder: each stage's input is the previous output concatenated with the face
        # encoder's feature map of the same size (hence the summed input widths).
        self.face_decoder = nn.ModuleList(
            [
                nn.Sequential(ConvBNReLU(512, 512, 1, 1, 0)),  # 1
                nn.Sequential(ConvTBNReLU(1024, 512, 3, 1, 0), *_res(512, 1)),  # 3
                nn.Sequential(ConvTBNReLU(1024, 512, 3, 2, 1, 1), *_res(512, 2)),  # 6
                nn.Sequential(ConvTBNReLU(768, 384, 3, 2, 1, 1), *_res(384, 2)),  # 12
                nn.Sequential(ConvTBNReLU(512, 256, 3, 2, 1, 1), *_res(256, 2)),  # 24
                nn.Sequential(ConvTBNReLU(320, 128, 3, 2, 1, 1), *_res(128, 2)),  # 48
                nn.Sequential(ConvTBNReLU(160, 64, 3, 2, 1, 1), *_res(64, 2)),  # 96
            ]
        )
        self.output_block = nn.Sequential(
            ConvBNReLU(80, 32, 3, 1, 1), nn.Conv2d(32, 3, 1, 1, 0), nn.Sigmoid()
        )

    def forward(self, mel: Tensor, face: Tensor) -> Tensor:
        """``mel`` (B, 1, 80, 16), ``face`` (B, 6, 96, 96) -> (B, 3, 96, 96) in [0, 1]."""
        audio = self.audio_encoder(mel)  # (B, 512, 1, 1)
        feats = []
        x = face
        for block in self.face_encoder:
            x = block(x)
            feats.append(x)  # (B, 16, 96, 96) ... (B, 512, 1, 1)
        x = audio
        for block in self.face_decoder:
            x = block(x)
            x = torch.cat((x, feats.pop()), dim=1)  # skip from the encoder, same size
        return self.output_block(x)  # (B, 3, 96, 96)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
