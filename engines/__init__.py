"""Inference engines: one :class:`Renderer` interface, backends chosen by name.

    renderer = engines.create_renderer("onnxruntime", model=model)
    avatar = renderer.prepare_expression(renderer.prepare_source(image), exp)
    frames = renderer.render(avatar, lip, pose)          # uint8 [B,S,S,3]
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edtalk_live.edtalk.errors import EDTalkError
from edtalk_live.edtalk.model import EDTalkModel
from edtalk_live.engines.base import Avatar, PreparedSource, Renderer, to_frames, to_uint8_numpy, to_uint8_torch

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")

__all__ = ["Avatar", "BACKENDS", "PreparedSource", "Renderer", "available_backends", "cache_dir", "create_renderer",
           "default_backend", "ensure_onnx", "to_frames", "to_uint8_numpy", "to_uint8_torch"]


def cache_dir() -> Path:
    """Where exports and engines are cached: ``$EDTALK_LIVE_CACHE`` or ``~/.cache/edtalk-live``."""
    env = os.environ.get("EDTALK_LIVE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edtalk-live"


def default_backend(device: str | None = None) -> str:
    """The backend a server uses when none is named: ``torch`` on a CUDA device (fp16, CUDA graphs), else
    ``onnxruntime`` when it is installed (on a CPU it renders the 64² test model in a third of torch's time
    and spends less CPU per frame; its graphs are exported into the cache on first use), else ``torch``."""
    import importlib.util

    import torch

    if (device or "").startswith("cuda") or (device is None and torch.cuda.is_available()):
        return "torch"
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") else "torch"


def available_backends() -> dict[str, str]:
    """Backend name -> "" when usable here, else the reason it is not."""
    import importlib.util

    import torch

    out = {"torch": ""}
    out["onnxruntime"] = "" if importlib.util.find_spec("onnxruntime") else "onnxruntime not installed"
    if importlib.util.find_spec("tensorrt") is None:
        out["tensorrt"] = "tensorrt not installed (pip install 'edtalk-live[tensorrt]')"
    elif not torch.cuda.is_available():
        out["tensorrt"] = "no CUDA GPU"
    else:
        out["tensorrt"] = ""
    return out


def ensure_onnx(model: EDTalkModel, onnx_dir: str | Path | None = None, verify: bool = True) -> Path:
    """Return an ONNX export directory for ``model``, exporting into the cache (key: its weights hash) when none
    exists yet. The export works on a copy (``model`` stays as it is, on its device); ``verify=False`` skips the
    exporter's parity check (the benchmarks' random 256² weights are too chaotic for its tolerance)."""
    import copy

    from edtalk_live.export.manifest import manifest_path
    from edtalk_live.export.onnx import export_model

    if onnx_dir is not None:
        return Path(onnx_dir)
    out = cache_dir() / "onnx" / model.weights_id
    if manifest_path(out).is_file():
        logger.info("using cached ONNX export %s", out)
        return out
    logger.info("exporting ONNX graphs to %s (once per weights)", out)
    export_model(copy.deepcopy(model), out, verify=verify)
    return out


def create_renderer(backend: str, model: EDTalkModel | None = None, onnx_dir: str | Path | None = None,
                    device: str | None = None, **options) -> Renderer:
    """Build the renderer called ``backend``.

    ``torch`` needs ``model``; ``onnxruntime`` and ``tensorrt`` take ``onnx_dir`` or export
    ``model`` into the cache first. ``device`` defaults to CUDA when available (cpu for ORT's
    CPU provider). Extra ``options`` go to the backend's constructor.
    """
    import torch

    if backend not in BACKENDS:
        raise EDTalkError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        if model is None:
            raise EDTalkError("the torch backend needs a loaded model")
        from edtalk_live.engines.torch_backend import TorchRenderer

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return TorchRenderer(model, device=dev, **options)
    if onnx_dir is None and model is None:
        raise EDTalkError(f"the {backend} backend needs an ONNX export directory or a loaded model")
    onnx_path = ensure_onnx(model, onnx_dir) if onnx_dir is None else Path(onnx_dir)
    if backend == "onnxruntime":
        from edtalk_live.engines.onnxruntime_backend import OnnxRuntimeRenderer

        return OnnxRuntimeRenderer(onnx_path, **options)
    reason = available_backends()["tensorrt"]
    if reason:
        raise EDTalkError(f"the tensorrt backend is not available: {reason}")
    from edtalk_live.engines.tensorrt_backend import TensorRTRenderer

    return TensorRTRenderer(onnx_path, device=device or "cuda", **options)
