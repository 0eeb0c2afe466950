"""One Renderer interface for every backend.

The life cycle mirrors what is expensive and what is not:

    renderer = engines.create_renderer("torch", model=model)        # or "onnxruntime", "tensorrt"
    source = renderer.prepare_source(image)                         # once per image: encoder
    avatar = renderer.prepare_expression(source, exp)               # once per expression: EEM blocks
    frames = renderer.render(avatar, lip, pose)                     # every frame: decoder only -> uint8

``render`` accepts one avatar for the whole batch or one avatar per frame (frames of several
sessions batched into one call). Frames come back as ``np.uint8 [B,S,S,3]`` RGB; on a GPU the
conversion to uint8 happens on the device before the copy back. ``renderer.device`` is the
``torch.device`` the frames are computed on (where to run follow-up work such as the paste-back).

What every backend shares lives here, once: input validation, the expression cache, gathering the
avatars of a batch into decoder inputs (:meth:`Renderer.gather`), and the conversion of decoder
output to frames (:func:`to_frames`). A backend implements the ``_``-prefixed hooks on batched,
validated tensors.
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
from edtalk_live.export.stages import feat_shapes

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


def concat(parts: Sequence[Any]) -> Any:
    """Concatenate backend-native arrays along the batch axis (torch tensors with torch, anything else with numpy)."""
    if torch.is_tensor(parts[0]):
        return torch.cat(list(parts))
    return np.concatenate(parts)


def take(x: Any, index: Sequence[int]) -> Any:
    """Rows ``index`` of a backend-native array (a copy, in that order)."""
    if torch.is_tensor(x):
        return x.index_select(0, torch.as_tensor(index, dtype=torch.long, device=x.device))
    return np.take(x, index, axis=0)


def to_uint8_torch(raw: torch.Tensor) -> torch.Tensor:
    """Raw frames ``[B,3,S,S]`` (about [-1,1]) -> ``uint8 [B,S,S,3]`` on the same device (clamp, no min/max)."""
    x = (raw.float().clamp(-1, 1) + 1) * 127.5
    return x.round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_uint8_numpy(raw: np.ndarray) -> np.ndarray:
    """:func:`to_uint8_torch` for numpy arrays."""
    x = (np.clip(raw.astype(np.float32, copy=False), -1, 1) + 1) * 127.5
    return np.ascontiguousarray(np.rint(x).astype(np.uint8).transpose(0, 2, 3, 1))


def to_frames(out: torch.Tensor | np.ndarray, raw: bool = False) -> np.ndarray:
    """Decoder output -> what :meth:`Renderer.render` returns, as a host numpy array.

    ``out`` is the raw output ``[B,3,S,S]`` (any float dtype; a torch tensor on any device, or numpy):
    ``raw`` gives it as ``float32 [B,3,S,S]``, else it becomes ``uint8 [B,S,S,3]`` (converted on the
    tensor's device, so only uint8 crosses back from a GPU). Frames already converted to ``uint8
    [B,S,S,3]`` (e.g. inside a CUDA graph) are only copied to the host.
    """
    if torch.is_tensor(out):
        if out.dtype == torch.uint8:
            return out.cpu().numpy()
        return (out.float() if raw else to_uint8_torch(out)).cpu().numpy()
    if out.dtype == np.uint8:
        return np.ascontiguousarray(out)
    return out.astype(np.float32, copy=False) if raw else to_uint8_numpy(out)


class Renderer(abc.ABC):
    """Runs the EDTalk stages on one backend. Subclasses implement the ``_``-prefixed hooks.

    ``device`` is where the backend computes (and where its native tensors live): the torch
    backend's device, ``cpu`` for ONNX Runtime's CPU provider, the CUDA device for TensorRT.
    """

    #: backend name, as given to ``--backend``
    name: str = ""

    def __init__(self, config: ModelConfig, device: str | torch.device):
        self.config = config
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())
        self._device = dev

    @property
    def device(self) -> torch.device:
        """The ``torch.device`` the frames are computed on (run paste-back and other follow-up work there)."""
        return self._device

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
        avatars = self._avatars(avatar, b)
        if b == 0:
            s = self.config.size
            return np.zeros((0, 3, s, s), np.float32) if raw else np.zeros((0, s, s, 3), np.uint8)
        wa, feats, exp = self.gather(avatars, b)
        return to_frames(self._render(wa, feats, lip, pose, exp, raw), raw)

    def _avatars(self, avatar: Avatar | Sequence[Avatar], b: int) -> list[Avatar]:
        """``avatar`` as a list of 1 or ``b`` avatars of this backend (raises :class:`InputError` otherwise)."""
        avatars = [avatar] if isinstance(avatar, Avatar) else list(avatar)
        if len(avatars) not in (1, b):
            raise InputError(f"got {len(avatars)} avatars for {b} frames (give 1 or {b})")
        for a in avatars:
            if not isinstance(a, Avatar):
                raise InputError(f"expected Avatar objects (from prepare_expression), got {type(a).__name__}")
            if a.backend != self.name:
                raise InputError(f"avatar was prepared by backend '{a.backend}', not '{self.name}'")
        return avatars

    def gather(self, avatars: Sequence[Avatar], b: int) -> tuple[Any, tuple, torch.Tensor | None]:
        """The decoder's source inputs for ``b`` frames of ``avatars`` (1 for every frame, or one per frame).

        Returns ``(wa, feats, exp)``: when every frame has the same avatar, ``wa [1,D]`` and
        ``feats`` (each ``[1,C,H,W]``) once, for the decoder to broadcast over the frames (converted
        by :meth:`_decoder_feats` once and kept in the avatar's cache); else the avatars are grouped
        (each distinct avatar stacked once) and their codes and maps spread to batch ``b`` in frame
        order. ``exp`` is ``[b,E]`` CPU float32 (zeros for avatars without expression; a broadcast
        view for one avatar) or ``None`` for the lip_pose family. ``wa`` and ``feats`` are the
        backend's native arrays.
        """
        first = avatars[0]
        groups: dict[int, int] = {}                        # id(avatar) -> row in the stack of distinct avatars
        distinct: list[Avatar] = []
        rows = []
        for a in avatars:
            if id(a) not in groups:
                groups[id(a)] = len(distinct)
                distinct.append(a)
            rows.append(groups[id(a)])
        if len(distinct) == 1:
            feats = first.cache.get("decoder_feats")
            if feats is None:
                feats = first.cache["decoder_feats"] = self._decoder_feats(tuple(first.feats))
            wa = first.wa
        else:
            def spread(parts: list) -> Any:
                stacked = concat(parts)
                return stacked if rows == list(range(b)) else take(stacked, rows)

            wa = spread([a.wa for a in distinct])
            feats = self._decoder_feats(tuple(spread([a.feats[k] for a in distinct]) for k in range(len(first.feats))))
        exp = None
        if self.config.has_expression:
            zeros = torch.zeros(1, self.config.exp_dim)
            exp = torch.cat([a.exp if a.exp is not None else zeros for a in avatars])
            exp = exp.expand(b, -1) if exp.shape[0] == 1 else exp
        return wa, feats, exp

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
        want = feat_shapes(self.config)
        if "wa" not in arrays or n != len(want) or tuple(arrays["wa"].shape) != (1, self.config.style_dim):
            raise InputError(f"cached source does not fit this {s}px model")
        for k, shape in enumerate(want):
            if tuple(arrays[f"feat{k}"].shape) != (1, *shape):
                raise InputError(f"cached source feature {k} has shape {list(arrays[f'feat{k}'].shape)}, "
                                 f"expected {[1, *shape]}")
        wa = self._from_numpy(arrays["wa"])
        return PreparedSource(wa, tuple(self._from_numpy(arrays[f"feat{k}"]) for k in range(n)), self.name)

    def _from_numpy(self, array: np.ndarray) -> Any:
        """Host array -> the backend's native tensor type: a float32 torch tensor on :attr:`device` (numpy for ORT)."""
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    @staticmethod
    def _motion(outputs: Sequence[Any]) -> Motion:
        """Motion outputs ``(lip, pose[, exp])`` (torch on any device, or numpy) -> CPU float32 :class:`Motion`."""
        t = [o.float().cpu() if torch.is_tensor(o) else torch.from_numpy(np.asarray(o, np.float32)) for o in outputs]
        return Motion(t[0], t[1], t[2] if len(t) > 2 else None)

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

    def _decoder_feats(self, feats: tuple) -> tuple:
        """Source feature maps -> the form the decoder hook takes (e.g. dtype, memory format); identity by default.

        Called once per shared avatar (the result is cached on it) or once per stacked batch.
        """
        return feats

    @abc.abstractmethod
    def _render(self, wa: Any, feats: tuple, lip: torch.Tensor, pose: torch.Tensor, exp: torch.Tensor | None,
                raw: bool) -> torch.Tensor | np.ndarray:
        """Run the decoder on ``B >= 1`` frames (inputs from :meth:`gather`).

        ``wa [1|B,D]`` and ``feats`` (each ``[1|B,C,H,W]``, batch 1 = broadcast over the frames) are
        native arrays; ``lip [B,L]``, ``pose [B,P]`` and ``exp [B,E]`` (or None) CPU float32 tensors.
        Returns the raw output ``[B,3,S,S]`` (torch on any device, or numpy), or, when not ``raw``,
        possibly frames already converted to ``uint8 [B,S,S,3]``; :func:`to_frames` makes the result.
        """

    @abc.abstractmethod
    def _read_motion(self, images: torch.Tensor) -> Motion: ...

    @abc.abstractmethod
    def _audio_to_lip(self, mel: torch.Tensor) -> torch.Tensor: ...
