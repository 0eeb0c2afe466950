"""One Renderer interface for every backend.

The life cycle mirrors what is expensive and what is not:

    renderer = engines.create_renderer("torch", model=model)        # or "onnxruntime", "tensorrt"
    source = renderer.prepare_source(image)                         # once per image: encoder
    avatar = renderer.prepare_expression(source, exp)               # once per expression: EEM blocks
    frames = renderer.render(avatar, lip, pose)                     # every frame: decoder only -> uint8

``render`` accepts one avatar for the whole batch or one avatar per frame (frames of several
sessions batched into one call). Frames come back as ``np.uint8 [B,S,S,3]`` RGB; on a GPU the
conversion to uint8 happens on the device before the copy back.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edtalk_live.edtalk.config import ModelConfig
from edtalk_live.edtalk.errors import InputError
from edtalk_live.edtalk.motion import Motion

logger = logging.getLogger(__name__)

#: prepared expressions kept per source (least recently used dropped first)
EXPRESSION_CACHE_SIZE = 32


@dataclass(eq=False)
class PreparedSource:
    """Backend-native encoding of one identity image: ``wa [1,D]``, ``feats`` coarse to fine (batch 1)."""

    wa: Any
    feats: tuple
    backend: str
    cache: dict = field(default_factory=dict, repr=False)


@dataclass(eq=False)
class Avatar:
    """A source with an expression applied: what the per-frame decoder consumes.

    ``exp`` is the expression coefficients ``[1,E]`` (torch, CPU) or ``None`` (no expression).
    ``feats`` are the EEM-modulated feature maps for that expression (the source's own maps
    when ``exp`` is None).
    """

    source: PreparedSource
    wa: Any
    feats: tuple
    exp: torch.Tensor | None
    backend: str
    cache: dict = field(default_factory=dict, repr=False)   # backend-private derived tensors


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def to_uint8_torch(raw: torch.Tensor) -> torch.Tensor:
    """Raw frames ``[B,3,S,S]`` (about [-1,1]) -> ``uint8 [B,S,S,3]`` on the same device (clamp, no min/max)."""
    x = (raw.float().clamp(-1, 1) + 1) * 127.5
    return x.round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_uint8_numpy(raw: np.ndarray) -> np.ndarray:
    x = (np.clip(raw.astype(np.float32, copy=False), -1, 1) + 1) * 127.5
    return np.ascontiguousarray(np.rint(x).astype(np.uint8).transpose(0, 2, 3, 1))


class Renderer(abc.ABC):
    """Runs the EDTalk stages on one backend. Subclasses implement the ``_``-prefixed hooks."""

    #: backend name, as given to ``--backend``
    name: str = ""

    def __init__(self, config: ModelConfig):
        self.config = config

    # ------------------------------------------------------------ validation helpers
    def _image(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(images, dtype=torch.float32)
        s = self.config.size
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or tuple(t.shape[1:]) != (3, s, s):
            raise InputError(f"images must be [B,3,{s},{s}] in [-1,1], got {list(t.shape)}")
        return t

    def _coeffs(self, t, dim: int, what: str, batch: int | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).detach().cpu()
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2 or t.shape[1] != dim or (batch is not None and t.shape[0] != batch):
            want = f"[{batch if batch is not None else 'B'},{dim}]"
            raise InputError(f"{what} coefficients must be {want}, got {list(t.shape)}")
        return t

    # ------------------------------------------------------------ public API
    def prepare_source(self, image: torch.Tensor | np.ndarray) -> PreparedSource:
        """Encode one identity image ``[1,3,S,S]`` in [-1,1] (once per avatar)."""
        img = self._image(image)
        if img.shape[0] != 1:
            raise InputError(f"prepare_source takes one image, got a batch of {img.shape[0]}")
        return self._prepare_source(img)

    def prepare_expression(self, source: PreparedSource, exp: torch.Tensor | None = None) -> Avatar:
        """Apply expression coefficients ``[1,E]`` (or ``None``) to a source (once per expression, cached)."""
        if exp is None:
            return Avatar(source, source.wa, source.feats, None, self.name)
        if not self.config.has_expression:
            raise InputError("this model (lip_pose family) has no expression; use exp=None")
        exp = self._coeffs(exp, self.config.exp_dim, "expression", batch=1)
        key = exp.numpy().tobytes()
        cache = source.cache            # least recently used first (dicts keep insertion order)
        if key in cache:
            cache[key] = cache.pop(key)
            return cache[key]
        while len(cache) >= EXPRESSION_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = Avatar(source, source.wa, self._expression_feats(source, exp), exp, self.name)
        return cache[key]

    def render(self, avatar: Avatar | Sequence[Avatar], lip, pose, raw: bool = False) -> np.ndarray:
        """Render ``B`` frames from mouth ``[B,lip_dim]`` and pose ``[B,pose_dim]`` coefficients.

        ``avatar`` is one :class:`Avatar` for every frame or a sequence of B avatars (one per
        frame, e.g. frames of different sessions). Returns ``uint8 [B,S,S,3]`` RGB, or with
        ``raw=True`` the network output ``float32 [B,3,S,S]``.
        """
        lip = self._coeffs(lip, self.config.lip_dim, "mouth")
        b = lip.shape[0]
        pose = self._coeffs(pose, self.config.pose_dim, "pose", batch=b)
        avatars = [avatar] if isinstance(avatar, Avatar) else list(avatar)
        if len(avatars) not in (1, b):
            raise InputError(f"got {len(avatars)} avatars for {b} frames (give 1 or {b})")
        for a in avatars:
            if a.backend != self.name:
                raise InputError(f"avatar was prepared by backend '{a.backend}', not '{self.name}'")
        if b == 0:
            s = self.config.size
            return np.zeros((0, 3, s, s), np.float32) if raw else np.zeros((0, s, s, 3), np.uint8)
        exp = None
        if self.config.has_expression:
            exp = torch.cat([a.exp if a.exp is not None else torch.zeros(1, self.config.exp_dim) for a in avatars])
            exp = exp.expand(b, -1) if exp.shape[0] == 1 else exp
        return self._render(avatars, lip, pose, exp, raw)

    def read_motion(self, images: torch.Tensor | np.ndarray, batch_size: int = 16) -> Motion:
        """Motion coefficients (CPU tensors) of driving images ``[B,3,S,S]`` (pose and expression clips)."""
        img = self._image(images)
        parts = [self._read_motion(img[i: i + batch_size]) for i in range(0, img.shape[0], batch_size)]
        if not parts:
            raise InputError("read_motion got no images")
        exp = torch.cat([p.exp for p in parts]) if parts[0].exp is not None else None
        return Motion(torch.cat([p.lip for p in parts]), torch.cat([p.pose for p in parts]), exp)

    def audio_to_lip(self, mel_windows: torch.Tensor | np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """Mel windows ``[T,1,80,16]`` -> raw mouth coefficients ``[T,lip_dim]`` (CPU tensor)."""
        mel = torch.as_tensor(mel_windows, dtype=torch.float32)
        if mel.ndim != 4 or tuple(mel.shape[1:]) != (1, 80, 16):
            raise InputError(f"mel windows must be [T,1,80,16], got {list(mel.shape)}")
        if mel.shape[0] == 0:
            return torch.zeros(0, self.config.lip_dim)
        return torch.cat([self._audio_to_lip(mel[i: i + batch_size]) for i in range(0, mel.shape[0], batch_size)])

    # ------------------------------------------------------------ persistence of prepared sources
    def export_source(self, source: PreparedSource) -> dict[str, np.ndarray]:
        """A prepared source as float32 host arrays ``{"wa": [1,D], "feat0": ..., ...}`` (to cache on disk)."""
        if source.backend != self.name:
            raise InputError(f"source was prepared by backend '{source.backend}', not '{self.name}'")
        arrays = {"wa": source.wa, **{f"feat{k}": f for k, f in enumerate(source.feats)}}
        return {k: np.ascontiguousarray(_to_numpy(v), dtype=np.float32) for k, v in arrays.items()}

    def import_source(self, arrays: dict[str, np.ndarray]) -> PreparedSource:
        """Inverse of :meth:`export_source`: host arrays -> a source of this backend (shapes checked)."""
        n = len([k for k in arrays if k.startswith("feat")])
        s = self.config.size
        want = [(self.config.channels[2**i], 2**i, 2**i) for i in range(3, self.config.log_size + 1)]
        if "wa" not in arrays or n != len(want) or tuple(arrays["wa"].shape) != (1, self.config.style_dim):
            raise InputError(f"cached source does not fit this {s}px model")
        for k, shape in enumerate(want):
            if tuple(arrays[f"feat{k}"].shape) != (1, *shape):
                raise InputError(f"cached source feature {k} has shape {list(arrays[f'feat{k}'].shape)}, "
                                 f"expected {[1, *shape]}")
        wa = self._from_numpy(arrays["wa"])
        return PreparedSource(wa, tuple(self._from_numpy(arrays[f"feat{k}"]) for k in range(n)), self.name)

    def _from_numpy(self, array: np.ndarray) -> Any:
        """Host array -> the backend's native tensor type (numpy for ONNX Runtime; overridden elsewhere)."""
        return np.ascontiguousarray(array, dtype=np.float32)

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release device memory and sessions."""

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        return self.name

    # ------------------------------------------------------------ backend hooks
    @abc.abstractmethod
    def _prepare_source(self, image: torch.Tensor) -> PreparedSource: ...

    @abc.abstractmethod
    def _expression_feats(self, source: PreparedSource, exp: torch.Tensor) -> tuple: ...

    @abc.abstractmethod
    def _render(self, avatars: list[Avatar], lip: torch.Tensor, pose: torch.Tensor, exp: torch.Tensor | None,
                raw: bool) -> np.ndarray: ...

    @abc.abstractmethod
    def _read_motion(self, images: torch.Tensor) -> Motion: ...

    @abc.abstractmethod
    def _audio_to_lip(self, mel: torch.Tensor) -> torch.Tensor: ...
