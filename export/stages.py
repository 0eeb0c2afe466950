"""The per-stage graphs of the EDTalk pipeline, as plain ``nn.Module`` wrappers ready for ONNX export.

Each stage takes and returns named tensors with batch as the only dynamic axis:

| stage        | inputs                                   | outputs                          | runs           |
| ------------ | ---------------------------------------- | -------------------------------- | -------------- |
| `encoder`    | image [B,3,S,S]                          | wa [B,D], feat0..featN-1         | once per image |
| `motion`     | image [B,3,S,S]                          | lip [B,20], pose [B,6], (exp)    | once per clip  |
| `audio2lip`  | mel [B,1,80,16]                          | lip [B,20]                       | every frame    |
| `expression` | feat0..featN-1, exp [B,E]                | mfeat0..mfeatN-1                 | per expression |
| `decoder`    | wa, feat0..featN-1, lip, pose, (exp)     | image [B,3,S,S] (raw)            | every frame    |

The decoder folds the fixed orthonormal bases ``Q`` in as a constant: no QR in any graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edtalk_live.edtalk.config import ModelConfig
from edtalk_live.edtalk.generator import Generator
from edtalk_live.edtalk.model import EDTalkModel

STAGES = ("encoder", "motion", "audio2lip", "expression", "decoder")


def feat_shapes(config: ModelConfig) -> list[tuple[int, int, int]]:
    """``(C,H,W)`` of the source feature maps, coarse (8x8) to fine (SxS)."""
    ch = config.channels
    return [(ch[2**i], 2**i, 2**i) for i in range(3, config.log_size + 1)]


class EncoderStage(nn.Module):
    def __init__(self, gen: Generator):
        super().__init__()
        self.enc = gen.enc

    def forward(self, image: torch.Tensor):
        wa, feats = self.enc(image)
        return (wa, *feats)


class MotionStage(nn.Module):
    def __init__(self, gen: Generator):
        super().__init__()
        self.gen = gen

    def forward(self, image: torch.Tensor):
        code, _ = self.gen.enc(image)
        m = self.gen.read(code)
        return (m.lip, m.pose) if m.exp is None else (m.lip, m.pose, m.exp)


class Audio2LipStage(nn.Module):
    def __init__(self, model: EDTalkModel):
        super().__init__()
        self.net = model.audio2lip

    def forward(self, mel: torch.Tensor):
        return self.net(mel)


class ExpressionStage(nn.Module):
    def __init__(self, gen: Generator):
        super().__init__()
        self.dec = gen.dec
        start = gen.config.lip_dim + gen.config.pose_dim
        self.register_buffer("q_exp", gen.Q[:, start:].detach().clone())

    def forward(self, *inputs: torch.Tensor):
        *feats, exp = inputs
        z = exp @ self.q_exp.T
        return tuple(self.dec.modulate(feats, z))


class DecoderStage(nn.Module):
    def __init__(self, gen: Generator):
        super().__init__()
        self.dec = gen.dec
        self.n_feats = len(feat_shapes(gen.config))
        self.register_buffer("q", gen.Q.detach().clone())

    def forward(self, wa: torch.Tensor, *rest: torch.Tensor):
        feats = rest[: self.n_feats]
        alpha = torch.cat(rest[self.n_feats:], dim=1)
        latent = wa + alpha @ self.q[:, : alpha.shape[1]].T
        return self.dec(latent, feats)


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: nn.Module
    inputs: dict[str, tuple[int, ...]]    # name -> shape without the batch axis
    outputs: list[str]
    #: inputs whose batch is a separate axis ("src_batch") that may be 1 and is broadcast to the frame batch
    broadcast: tuple[str, ...] = ()


def stage_specs(model: EDTalkModel) -> list[StageSpec]:
    """The graphs to export for ``model`` (no expression stage for the lip_pose family; no audio2lip without it)."""
    cfg = model.config
    gen = model.generator
    s = cfg.size
    shapes = feat_shapes(cfg)
    feat_in = {f"feat{i}": sh for i, sh in enumerate(shapes)}
    coeffs = {"lip": (cfg.lip_dim,), "pose": (cfg.pose_dim,)}
    if cfg.has_expression:
        coeffs["exp"] = (cfg.exp_dim,)
    specs = [
        StageSpec("encoder", EncoderStage(gen), {"image": (3, s, s)}, ["wa", *feat_in]),
        StageSpec("motion", MotionStage(gen), {"image": (3, s, s)}, list(coeffs)),
    ]
    if model.audio2lip is not None:
        specs.append(StageSpec("audio2lip", Audio2LipStage(model), {"mel": (1, 80, 16)}, ["lip"]))
    if cfg.has_expression:
        specs.append(StageSpec("expression", ExpressionStage(gen), {**feat_in, "exp": (cfg.exp_dim,)},
                               [f"mfeat{i}" for i in range(len(shapes))]))
    specs.append(StageSpec("decoder", DecoderStage(gen), {"wa": (cfg.style_dim,), **feat_in, **coeffs}, ["image"],
                           broadcast=("wa", *feat_in)))
    for spec in specs:
        spec.module.eval()
    return specs
