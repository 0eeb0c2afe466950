"""Audio2Lip: one 16-frame mel window (0.2 s) -> 20 mouth coefficients."""

from __future__ import annotations

import torch
from torch import nn


class Conv2d(nn.Module):
    """Conv + BatchNorm (+ residual) + ReLU, the Wav2Lip audio-encoder block."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride, padding: int, residual: bool = False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return torch.relu(out)


class Audio2Lip(nn.Module):
    """``mel windows [T,1,80,16] -> mouth coefficients [T,lip_dim]``."""

    def __init__(self, lip_dim: int = 20):
        super().__init__()
        self.audio_encoder = nn.Sequential(
            Conv2d(1, 32, 3, 1, 1),
            Conv2d(32, 32, 3, 1, 1, residual=True),
            Conv2d(32, 32, 3, 1, 1, residual=True),
            Conv2d(32, 64, 3, (3, 1), 1),
            Conv2d(64, 64, 3, 1, 1, residual=True),
            Conv2d(64, 64, 3, 1, 1, residual=True),
            Conv2d(64, 128, 3, 3, 1),
            Conv2d(128, 128, 3, 1, 1, residual=True),
            Conv2d(128, 128, 3, 1, 1, residual=True),
            Conv2d(128, 256, 3, (3, 2), 1),
            Conv2d(256, 256, 3, 1, 1, residual=True),
            Conv2d(256, 512, 3, 1, 0),
            Conv2d(512, 512, 1, 1, 0),
        )
        self.mapping = nn.Linear(512, lip_dim)

    def forward(self, mel_windows: torch.Tensor) -> torch.Tensor:
        return self.mapping(self.audio_encoder(mel_windows).flatten(1))
