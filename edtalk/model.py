"""The public model object: load the official checkpoints, encode, read motion, render, audio -> mouth."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from edtalk_live.edtalk.audio2lip import Audio2Lip
from edtalk_live.edtalk.checkpoint import check_state_dict, infer_config, read_checkpoint, weights_hash
from edtalk_live.edtalk.config import ModelConfig
from edtalk_live.edtalk.errors import CheckpointError, InputError
from edtalk_live.edtalk.generator import Generator
from edtalk_live.edtalk.motion import Motion

logger = logging.getLogger(__name__)

_EXP_CACHE_SIZE = 16


@dataclass(frozen=True, eq=False)
class Source:
    """An encoded identity image: ``wa [B,D]`` and the feature maps ``feats`` (8x8 ... SxS, coarse to fine).

    Expression-modulated feature maps are cached on the object, one entry per distinct
    expression, so they are computed once per expression and reused for every frame.
    """

    wa: torch.Tensor
    feats: tuple[torch.Tensor, ...]
    _exp_cache: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def batch(self) -> int:
        return self.wa.shape[0]

    def to(self, device=None, dtype=None) -> Source:
        return Source(self.wa.to(device, dtype), tuple(f.to(device, dtype) for f in self.feats))


class EDTalkModel(nn.Module):
    """EDTalk generator (+ optional Audio2Lip), with the per-frame path reduced to the decoder.

    Images are ``[B,3,S,S]`` float in [-1,1]. ``Q`` (the orthonormal motion bases) is computed
    when weights load; the source encoding is done once by :meth:`encode`; EEM-modulated features
    are computed once per expression (see :class:`Source`).
    """

    def __init__(self, config: ModelConfig, with_audio2lip: bool = True):
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.audio2lip = Audio2Lip(config.lip_dim) if with_audio2lip else None
        self.weights_id = ""

    # ----------------------------------------------------------------- properties
    @property
    def has_expression(self) -> bool:
        return self.config.has_expression

    @property
    def Q(self) -> torch.Tensor:  # noqa: N802 - paper notation
        """Orthonormal motion bases ``[D, motion_dim]``: mouth, then pose, then expression."""
        return self.generator.Q

    @property
    def device(self) -> torch.device:
        return self.generator.Q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.dec.input.input.dtype

    # ----------------------------------------------------------------- checks
    def _check_images(self, images: torch.Tensor, what: str = "images") -> torch.Tensor:
        s = self.config.size
        if not torch.is_tensor(images) or images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            shape = list(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise InputError(f"{what} must be a [B,3,{s},{s}] tensor in [-1,1], got {shape}")
        return images.to(self.device, self.dtype)

    def _check_coeffs(self, t: torch.Tensor | None, dim: int, what: str) -> torch.Tensor:
        if t is None or not torch.is_tensor(t):
            raise InputError(f"{what} coefficients must be a tensor [B,{dim}], got {type(t).__name__}")
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2 or t.shape[1] != dim:
            raise InputError(f"{what} coefficients must be [B,{dim}], got {list(t.shape)}")
        return t.to(self.device, self.dtype)

    # ----------------------------------------------------------------- once per image
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> Source:
        """Encode identity images ``[B,3,S,S]`` -> :class:`Source`."""
        wa, feats = self.generator.enc(self._check_images(images))
        return Source(wa, tuple(feats))

    @torch.no_grad()
    def read_motion(self, images: torch.Tensor) -> Motion:
        """Motion coefficients of driving images ``[B,3,S,S]`` -> :class:`Motion`."""
        code, _ = self.generator.enc(self._check_images(images))
        return self.generator.read(code)

    # ----------------------------------------------------------------- once per expression
    @torch.no_grad()
    def expression_feats(self, src: Source, exp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """EEM-modulated source feature maps for expression coefficients ``exp [B|1,exp_dim]``.

        Cached on ``src`` by value, so repeated calls with the same expression cost nothing.
        """
        if not self.has_expression:
            raise InputError("this model (lip_pose family) has no expression; pass exp=None")
        exp = self._check_coeffs(exp, self.config.exp_dim, "expression")
        key = (exp.dtype, exp.device, tuple(exp.shape), exp.detach().cpu().numpy().tobytes())
        cache = src._exp_cache
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        z = self.generator.exp_latent(exp)
        feats = tuple(self.generator.dec.modulate(src.feats, z))
        cache[key] = feats
        while len(cache) > _EXP_CACHE_SIZE:
            cache.popitem(last=False)
        return feats

    # ----------------------------------------------------------------- every frame
    @torch.no_grad()
    def render(self, src: Source, lip: torch.Tensor, pose: torch.Tensor,
               exp: torch.Tensor | None = None) -> torch.Tensor:
        """Coefficients -> raw images ``[B,3,S,S]`` (about [-1,1], not clamped).

        ``lip [B,lip_dim]``, ``pose [B,pose_dim]``, ``exp [B|1,exp_dim]`` or ``None`` (no
        expression: the EEM blocks and expression bases are left out, as in the published code
        when no expression is given; always ``None`` for the lip_pose family). A source of batch 1
        is broadcast over B frames; an expression of batch 1 is broadcast too and its modulated
        features are computed once and cached.
        """
        cfg = self.config
        lip = self._check_coeffs(lip, cfg.lip_dim, "mouth")
        pose = self._check_coeffs(pose, cfg.pose_dim, "pose")
        b = lip.shape[0]
        if pose.shape[0] != b:
            raise InputError(f"mouth and pose batches differ: {b} vs {pose.shape[0]}")
        if src.batch not in (1, b):
            raise InputError(f"source batch {src.batch} cannot be broadcast to {b} frames")
        feats = src.feats
        alpha = torch.cat([lip, pose], dim=1)
        if exp is not None:
            exp = self._check_coeffs(exp, cfg.exp_dim, "expression") if self.has_expression else None
            if exp is None:
                raise InputError("this model (lip_pose family) has no expression; pass exp=None")
            if exp.shape[0] not in (1, b):
                raise InputError(f"expression batch {exp.shape[0]} cannot be broadcast to {b} frames")
            if exp.shape[0] == b and b > 1 and bool((exp == exp[:1]).all()):
                exp = exp[:1]
            feats = self.expression_feats(src, exp)
            alpha = torch.cat([alpha, exp.expand(b, -1)], dim=1)
        latent = self.generator.latent(src.wa, alpha)
        return self.generator.dec(latent, feats)

    # ----------------------------------------------------------------- audio
    @torch.no_grad()
    def audio_to_lip(self, mel_windows: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Mel windows ``[T,1,80,16]`` -> raw mouth coefficients ``[T,lip_dim]`` (smooth with ``audio.smooth``)."""
        if self.audio2lip is None:
            raise InputError("no Audio2Lip weights loaded: pass audio2lip= to load_model")
        if not torch.is_tensor(mel_windows) or mel_windows.ndim != 4 or tuple(mel_windows.shape[1:]) != (1, 80, 16):
            shape = list(mel_windows.shape) if torch.is_tensor(mel_windows) else type(mel_windows).__name__
            raise InputError(f"mel windows must be [T,1,80,16], got {shape}")
        x = mel_windows.to(self.device, self.dtype)
        outs = [self.audio2lip(x[i: i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        return torch.cat(outs) if outs else x.new_zeros(0, self.config.lip_dim)


def load_model(gen: str | Path | Mapping, audio2lip: str | Path | Mapping | None = None,
               device: str | torch.device = "cpu") -> EDTalkModel:
    """Build a model from official checkpoints (paths or loaded dicts), configuration inferred from the tensors.

    Raises :class:`CheckpointError` with a one-line message naming the file and the first
    mismatching tensor when a file is wrong or damaged.
    """
    sd, name = read_checkpoint(gen, "gen", "EDTalk generator")
    config = infer_config(sd, name)
    model = EDTalkModel(config, with_audio2lip=audio2lip is not None)
    check_state_dict(model.generator.state_dict(), sd, name)
    model.generator.load_state_dict(sd, strict=True)
    ids = [weights_hash(sd)]
    if audio2lip is not None:
        asd, aname = read_checkpoint(audio2lip, "audio2lip", "Audio2Lip")
        if "enc.net_app.convs.0.0.weight" in asd:
            raise CheckpointError(f"{aname}: this is an EDTalk generator checkpoint, not Audio2Lip")
        lip_key = "mapping.weight"
        if lip_key in asd and asd[lip_key].shape[0] != config.lip_dim:
            raise CheckpointError(f"{aname}: tensor '{lip_key}' has shape {list(asd[lip_key].shape)}, "
                                  f"expected [{config.lip_dim}, 512] to match {name}")
        check_state_dict(model.audio2lip.state_dict(), asd, aname)
        model.audio2lip.load_state_dict(asd, strict=True)
        ids.append(weights_hash(asd))
    model.weights_id = "-".join(ids)
    logger.info("loaded %s: family=%s size=%d widths=%s", name, config.family, config.size, config.widths)
    return model.eval().to(device)
