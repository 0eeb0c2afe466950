"""Locate the official EDTalk weight files in a folder and read the emotion presets.

The official release (Hugging Face Hub ``tanhshuai0219/EDTalk``, or the reference repository's
``ckpts/`` folder) holds::

    EDTalk.pt                      generator with expression (family "edtalk")
    EDTalk_lip_pose.pt             generator with mouth + pose only (family "lip_pose")
    Audio2Lip.pt                   audio -> mouth coefficients
    predefined_exp_weights/*.npy   emotion presets, [1,10] expression coefficients each

:func:`find_weights` accepts the folder itself or a folder with a ``ckpts/`` subfolder (a checkout
of the reference layout), and prefers ``EDTalk.pt`` when both generators are present. Without a
folder it looks in :func:`default_weights_dir`, where ``edtalk-live weights download`` puts them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edtalk_live.edtalk.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

__all__ = [
    "AUDIO2LIP_FILE",
    "EDTALK_FILE",
    "LIP_POSE_FILE",
    "PRESET_DIR",
    "WEIGHTS_ENV",
    "WeightFiles",
    "default_weights_dir",
    "find_weights",
    "load_preset",
]

EDTALK_FILE = "EDTalk.pt"
LIP_POSE_FILE = "EDTalk_lip_pose.pt"
AUDIO2LIP_FILE = "Audio2Lip.pt"
PRESET_DIR = "predefined_exp_weights"
WEIGHTS_ENV = "EDTALK_LIVE_WEIGHTS"
_SUBFOLDERS = ("", "ckpts")
_EXPECTED = f"{EDTALK_FILE} or {LIP_POSE_FILE}, {AUDIO2LIP_FILE}, {PRESET_DIR}/*.npy"


@dataclass(frozen=True)
class WeightFiles:
    """The official weight files found in one folder.

    Attributes:
        gen: the generator checkpoint (``EDTalk.pt`` or ``EDTalk_lip_pose.pt``).
        family_hint: ``"edtalk"`` or ``"lip_pose"``, from the file name (the loaded model's
            ``config.family`` is authoritative).
        audio2lip: ``Audio2Lip.pt``, or None when absent.
        presets: emotion name -> ``.npy`` path, sorted by name (empty when there are none).
    """

    gen: Path
    family_hint: str
    audio2lip: Path | None
    presets: Mapping[str, Path] = field(default_factory=dict)

    def require_audio2lip(self) -> Path:
        """The Audio2Lip path, or a :class:`CheckpointError` naming the folder it is missing from."""
        if self.audio2lip is None:
            raise CheckpointError(
                f"{AUDIO2LIP_FILE} not found next to {self.gen.name} in {self.gen.parent} "
                "(needed to drive the mouth from audio)"
            )
        return self.audio2lip

    def preset(self, name: str) -> Path:
        """The preset file of emotion ``name``, or an :class:`InputError` listing the available ones."""
        try:
            return self.presets[name]
        except KeyError:
            available = ", ".join(self.presets) or f"none: no {PRESET_DIR}/*.npy found"
            raise InputError(f"unknown emotion {name!r} (available: {available})") from None


def _first(root: Path, relative: str) -> Path | None:
    for sub in _SUBFOLDERS:
        candidate = root / sub / relative
        if candidate.exists():
            return candidate
    return None


def default_weights_dir() -> Path:
    """The default weights folder: ``$EDTALK_LIVE_WEIGHTS`` when set, else the per-user cache folder.

    The cache folder is ``$XDG_CACHE_HOME/edtalk-live/weights`` (``~/.cache/edtalk-live/weights``
    when ``XDG_CACHE_HOME`` is unset). The folder may not exist yet.
    """
    override = os.environ.get(WEIGHTS_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(cache).expanduser() if cache else Path.home() / ".cache") / "edtalk-live" / "weights"


def find_weights(folder: str | os.PathLike[str] | None = None) -> WeightFiles:
    """Find the official weight files in ``folder`` (or its ``ckpts/`` subfolder).

    ``folder=None`` looks in :func:`default_weights_dir`.

    Raises:
        CheckpointError: the folder does not exist, or holds neither generator checkpoint.
    """
    if folder is None:
        root = default_weights_dir()
        if not (root.is_dir() and any(_first(root, name) for name in (EDTALK_FILE, LIP_POSE_FILE))):
            raise CheckpointError(
                f"no EDTalk weights in the default folder {root}: run `edtalk-live weights download`, "
                f"or pass --weights DIR (or set {WEIGHTS_ENV}) to a folder with {_EXPECTED}"
            )
    else:
        root = Path(folder).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"weights folder not found: {root} (expected {_EXPECTED})")
    edtalk_gen, lip_pose_gen = _first(root, EDTALK_FILE), _first(root, LIP_POSE_FILE)
    if edtalk_gen is not None:
        gen, family = edtalk_gen, "edtalk"
        if lip_pose_gen is not None:
            logger.info("both %s and %s in %s: using %s", EDTALK_FILE, LIP_POSE_FILE, root, EDTALK_FILE)
    elif lip_pose_gen is not None:
        gen, family = lip_pose_gen, "lip_pose"
    else:
        raise CheckpointError(
            f"no {EDTALK_FILE} or {LIP_POSE_FILE} in weights folder {root} (expected {_EXPECTED})"
        )
    if not gen.is_file():
        raise CheckpointError(f"not a file: {gen}")
    audio2lip = _first(root, AUDIO2LIP_FILE)
    if audio2lip is not None and not audio2lip.is_file():
        raise CheckpointError(f"not a file: {audio2lip}")
    presets: dict[str, Path] = {}
    preset_dir = _first(root, PRESET_DIR)
    if preset_dir is not None and preset_dir.is_dir():
        presets = {p.stem: p for p in sorted(preset_dir.glob("*.npy")) if p.is_file()}
    logger.debug("weights in %s: gen=%s audio2lip=%s presets=%s", root, gen, audio2lip, list(presets))
    return WeightFiles(gen=gen, family_hint=family, audio2lip=audio2lip, presets=presets)


def load_preset(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an emotion preset ``.npy`` -> float32 expression coefficients ``[1,10]``.

    Accepts ``[1,10]`` or ``[10]`` arrays of finite numbers; anything else is a
    :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CheckpointError(f"emotion preset not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"not a NumPy .npy preset: {path} ({exc})") from exc
    if array.shape not in ((1, 10), (10,)):
        raise CheckpointError(f"emotion preset {path} has shape {tuple(array.shape)}, expected [1,10]")
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise CheckpointError(f"emotion preset {path} must hold 10 finite numbers")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(1, 10))
