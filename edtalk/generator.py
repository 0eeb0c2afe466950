"""The EDTalk generator with the published parameter layout (``EDTalk.pt`` / ``EDTalk_lip_pose.pt``)."""

from __future__ import annotations

import torch
from torch import nn

from edtalk_live.edtalk.config import ModelConfig
from edtalk_live.edtalk.decoder import Synthesis
from edtalk_live.edtalk.encoder import Encoder
from edtalk_live.edtalk.motion import Direction, Motion, mlp, orthonormal_bases


class Generator(nn.Module):
    """Encoder, motion reader, motion bases and decoder.

    ``state_dict()`` has exactly the tensor names and shapes of the official checkpoint of the
    configured family. The orthonormal bases ``Q [D, motion_dim]`` are a non-persistent buffer,
    recomputed whenever weights are loaded (never per frame).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.style_dim
        self.enc = Encoder(config)
        self.dec = Synthesis(config)
        self.direction_lipnonlip = Direction(d, config.lip_dim + config.pose_dim)
        if config.has_expression:
            self.direction_exp = Direction(d, config.exp_dim)
        self.fc = mlp(d, d, 4)
        self.lip_fc = mlp(d, config.lip_dim, 3)
        self.pose_fc = mlp(d, config.pose_dim, 3)
        if config.has_expression:
            self.exp_fc = mlp(d, config.exp_dim, 3)
        self.register_buffer("Q", torch.zeros(d, config.motion_dim), persistent=False)
        self.refresh_bases()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_bases())

    @torch.no_grad()
    def refresh_bases(self) -> None:
        """Recompute ``Q`` from the direction weights (call after changing them by hand)."""
        weights = [self.direction_lipnonlip.weight]
        if self.config.has_expression:
            weights.append(self.direction_exp.weight)
        self.Q.copy_(orthonormal_bases(*weights).to(self.Q.device, self.Q.dtype))

    def read(self, code: torch.Tensor) -> Motion:
        """Motion coefficients from encoder codes ``[B,D]``."""
        h = self.fc(code)
        exp = self.exp_fc(h) if self.config.has_expression else None
        return Motion(lip=self.lip_fc(h), pose=self.pose_fc(h), exp=exp)

    def latent(self, wa: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """``wa [B|1,D] + Q[:, :n] @ alpha [B,n]`` -> ``[B,D]`` (n = mouth + pose [+ expression])."""
        q = self.Q[:, : alpha.shape[1]].to(alpha.dtype)
        return wa + alpha @ q.T

    def exp_latent(self, exp: torch.Tensor) -> torch.Tensor:
        """Expression coefficients ``[B,exp_dim]`` -> expression latent ``[B,D]`` (input of the EEM blocks)."""
        start = self.config.lip_dim + self.config.pose_dim
        return exp @ self.Q[:, start:].to(exp.dtype).T
