"""Reading official checkpoints: inferring the configuration from tensor shapes and validating them."""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from edtalk_live.edtalk.config import ModelConfig
from edtalk_live.edtalk.errors import CheckpointError

logger = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]


def read_checkpoint(source: str | Path | Mapping, top_key: str, what: str) -> tuple[dict, str]:
    """Load ``source`` (a path or an already loaded dict) and return ``(state_dict, name)``.

    Accepts ``{top_key: state_dict}`` (the official layout) or a bare state dict. Raises
    :class:`CheckpointError` with a one-line message naming the file on any problem.
    """
    if isinstance(source, Mapping):
        name = f"<{what} dict>"
        obj = source
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise CheckpointError(f"{name}: {what} checkpoint not found")
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{name}: cannot read {what} checkpoint (damaged or not a PyTorch file: "
                                  f"{msg[:160]})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: expected a dict of tensors, found {type(obj).__name__}")
    if top_key in obj and isinstance(obj[top_key], Mapping):
        obj = obj[top_key]
    elif not any(torch.is_tensor(v) for v in obj.values()):
        known = {"gen": "an EDTalk generator", "audio2lip": "an Audio2Lip"}
        for other, kind in known.items():
            if other != top_key and other in obj:
                raise CheckpointError(f"{name}: this is {kind} checkpoint, not {what}")
        keys = ", ".join(sorted(map(str, obj))[:5])
        raise CheckpointError(f"{name}: no '{top_key}' entry in this checkpoint (top-level keys: {keys}); "
                              f"is it the {what} file?")
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not sd:
        raise CheckpointError(f"{name}: holds no tensors")
    return sd, name


def _shape(sd: StateDict, key: str, name: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{name}: missing tensor '{key}' (not an EDTalk generator checkpoint?)")
    return tuple(sd[key].shape)


def infer_config(sd: StateDict, name: str = "<checkpoint>") -> ModelConfig:
    """Infer family, size, channel widths and dimensions of a generator from its tensors."""
    if "audio_encoder.0.conv_block.0.weight" in sd:
        raise CheckpointError(f"{name}: this is an Audio2Lip checkpoint, not an EDTalk generator")
    enc_idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"enc\.net_app\.convs\.(\d+)\.", k))})
    if not enc_idx or enc_idx != list(range(len(enc_idx))):
        raise CheckpointError(f"{name}: missing or incomplete encoder tensors 'enc.net_app.convs.*'")
    log_size = len(enc_idx)
    if log_size < 3:
        raise CheckpointError(f"{name}: encoder too shallow ({log_size} stages)")
    size = 2**log_size
    channels = {size: _shape(sd, "enc.net_app.convs.0.0.weight", name)[0]}
    for k in range(1, log_size - 1):
        channels[size >> k] = _shape(sd, f"enc.net_app.convs.{k}.conv2.1.weight", name)[0]
    style_dim = _shape(sd, "fc.0.weight", name)[0]
    lip_dim = _shape(sd, "lip_fc.2.weight", name)[0]
    pose_dim = _shape(sd, "pose_fc.2.weight", name)[0]
    has_exp = "direction_exp.weight" in sd
    exp_dim = _shape(sd, "direction_exp.weight", name)[1] if has_exp else 0
    hidden = _shape(sd, "dec.fineadainresblock.0.norm1.mlp_shared.0.weight", name)[0] if has_exp else 128
    widths = tuple(channels[4 * 2**i] for i in range(log_size - 1))
    try:
        return ModelConfig(family="edtalk" if has_exp else "lip_pose", size=size, widths=widths,
                           style_dim=style_dim, lip_dim=lip_dim, pose_dim=pose_dim, exp_dim=exp_dim,
                           eem_hidden=hidden)
    except ValueError as e:
        raise CheckpointError(f"{name}: inconsistent tensors ({e})") from None


def check_state_dict(expected: StateDict, found: StateDict, name: str) -> None:
    """Raise :class:`CheckpointError` naming the first tensor that is missing, extra, misshapen or not finite."""
    for key, ref in expected.items():
        if key not in found:
            raise CheckpointError(f"{name}: missing tensor '{key}'")
        got = found[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(f"{name}: tensor '{key}' has shape {list(got.shape)}, "
                                  f"expected {list(ref.shape)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"{name}: tensor '{key}' contains NaN or Inf (damaged file)")
    extra = [k for k in found if k not in expected]
    if extra:
        raise CheckpointError(f"{name}: unexpected tensor '{extra[0]}' ({len(extra)} in all)")


def weights_hash(sd: StateDict, length: int = 16) -> str:
    """Stable short hash of a state dict's names, shapes and values (for caches and metadata)."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]


