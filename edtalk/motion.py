"""Motion latent space: orthonormal bases (mouth, pose, expression) and the coefficient reader."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edtalk_live.edtalk.layers import EqualLinear


@dataclass(frozen=True)
class Motion:
    """Motion coefficients: ``lip [B,lip_dim]``, ``pose [B,pose_dim]``, ``exp [B,exp_dim]`` or ``None``."""

    lip: torch.Tensor
    pose: torch.Tensor
    exp: torch.Tensor | None = None


class Direction(nn.Module):
    """Learned, non-orthogonal basis vectors ``weight [D,n]``; orthonormalised by :func:`orthonormal_bases`."""

    def __init__(self, style_dim: int, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(style_dim, n))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"


def orthonormal_bases(*weights: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR decomposition of ``concat(weights) + 1e-8``: ``[D, n_total]``.

    The published networks take this QR on every forward pass; it depends on the weights only, so
    here it is computed once at load time (in float64 for accuracy, returned in float32).
    """
    w = torch.cat([t.detach().double() for t in weights], dim=-1) + 1e-8
    q, _ = torch.linalg.qr(w, mode="reduced")
    return q.float()


def mlp(style_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    """``depth`` equalised linear layers without activation (as published)."""
    layers = [EqualLinear(style_dim, style_dim) for _ in range(depth - 1)]
    layers.append(EqualLinear(style_dim, out_dim))
    return nn.Sequential(*layers)
