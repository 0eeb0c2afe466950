"""Decoder (``Synthesis``): latent + source feature maps -> image, by coarse-to-fine flow warping."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edtalk_live.edtalk.config import ModelConfig
from edtalk_live.edtalk.layers import EEM, ConstantInput, StyledConv, ToFlow, ToRGB


class Synthesis(nn.Module):
    """StyleGAN2-style generator whose every layer is modulated by the same latent.

    At each resolution from 8 up to ``size`` it predicts a flow field and a mask that warp the
    source feature map of that resolution, and accumulates an RGB image.
    ``forward(latent [B,D], feats)`` -> raw image ``[B,3,S,S]`` (about [-1,1], not clamped);
    ``feats`` are the (possibly expression-modulated) source maps, coarse to fine, batch B or 1.
    The EEM blocks (``fineadainresblock``, edtalk family only) are applied by :meth:`modulate`,
    once per expression, not per frame.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        ch = config.channels
        d = config.style_dim
        self.size = config.size
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, d)
        self.to_rgb1 = ToRGB(ch[4], upsample=False)   # in the published layout; unused by the forward pass
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.to_flows = nn.ModuleList()
        if config.has_expression:
            self.fineadainresblock = nn.ModuleList()
        in_ch = ch[4]
        for i in range(3, config.log_size + 1):
            res = 2**i
            out_ch = ch[res]
            self.convs.append(StyledConv(in_ch, out_ch, 3, d, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, 3, d))
            self.to_rgbs.append(ToRGB(out_ch))
            self.to_flows.append(ToFlow(out_ch, d, res))
            if config.has_expression:
                self.fineadainresblock.append(EEM(out_ch, d, config.eem_hidden))
            in_ch = out_ch

    def modulate(self, feats: Sequence[torch.Tensor], exp_latent: torch.Tensor) -> list[torch.Tensor]:
        """Apply the EEM blocks: source maps + expression latent ``[B,D]`` -> modulated maps."""
        return [eem(f, exp_latent) for eem, f in zip(self.fineadainresblock, feats, strict=True)]

    def forward(self, latent: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.conv1(self.input(latent.shape[0]), latent)
        skip = skip_flow = None
        for k, feat in enumerate(feats):
            out = self.convs[2 * k](out, latent)
            out = self.convs[2 * k + 1](out, latent)
            warped, out, skip_flow = self.to_flows[k](out, latent, feat, skip_flow)
            skip = self.to_rgbs[k](warped, skip)
        return skip
