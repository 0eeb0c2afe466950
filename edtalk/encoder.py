"""Source encoder: a face image -> a 512-d code and the feature maps the decoder warps."""

from __future__ import annotations

import torch
from torch import nn

from edtalk_live.edtalk.config import ModelConfig
from edtalk_live.edtalk.layers import ConvLayer, EqualConv2d, ResBlock


class EncoderApp(nn.Module):
    """``[B,3,S,S] -> (code [B,D], feats)``; ``feats`` are the maps at 8x8 ... SxS, coarse to fine."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        ch = config.channels
        self.convs = nn.ModuleList([ConvLayer(3, ch[config.size], 1)])
        in_ch = ch[config.size]
        for i in range(config.log_size, 2, -1):
            out_ch = ch[2 ** (i - 1)]
            self.convs.append(ResBlock(in_ch, out_ch))
            in_ch = out_ch
        self.convs.append(EqualConv2d(in_ch, config.style_dim, 4, padding=0, bias=False))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        res = []
        for conv in self.convs:
            x = conv(x)
            res.append(x)
        code = res[-1].flatten(1)
        return code, res[::-1][2:]


class Encoder(nn.Module):
    """Wrapper kept for the checkpoint layout (``enc.net_app.*``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.net_app = EncoderApp(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.net_app(x)
