"""ONNX Runtime backend: runs the exported per-stage graphs (CPU provider; CUDA/TensorRT providers when installed)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edtalk_live.edtalk.errors import EDTalkError
from edtalk_live.edtalk.motion import Motion
from edtalk_live.engines.base import PreparedSource, Renderer
from edtalk_live.export.manifest import read_manifest

#: execution providers whose outputs are computed on a CUDA device
CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")

logger = logging.getLogger(__name__)


def default_providers() -> list[str]:
    """CUDA when ONNX Runtime has it, else CPU. TensorRT EP only on request (it builds engines at start)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def provider_device(providers: list) -> torch.device:
    """Where a session with these providers (first = preferred) computes: ``cuda:<device_id>`` or ``cpu``.

    Providers are names or ``(name, options)`` pairs as ONNX Runtime takes them; a CUDA provider
    counts only when torch sees a CUDA device too (the device is for torch follow-up work).
    """
    if not providers:
        return torch.device("cpu")
    first = providers[0]
    name, options = (first[0], dict(first[1] or {})) if isinstance(first, tuple | list) else (first, {})
    if name in CUDA_PROVIDERS and torch.cuda.is_available():
        return torch.device("cuda", int(options.get("device_id", 0)))
    return torch.device("cpu")


def _provider_name(provider: Any) -> str:
    return str(provider[0] if isinstance(provider, tuple | list) else provider)


class OnnxRuntimeRenderer(Renderer):
    """Runs the graphs of an ONNX export directory (see :func:`edtalk_live.export.onnx.export_model`)."""

    name = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 spin: bool = True):
        try:
            import onnxruntime as ort
        except ImportError:
            raise EDTalkError("onnxruntime is not installed: pip install 'edtalk-live[onnx]'") from None
        self.onnx_dir = Path(onnx_dir)
        self.manifest = read_manifest(self.onnx_dir)
        self.providers = providers or default_providers()
        super().__init__(self.manifest.model_config(), provider_device(self.providers))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads or os.environ.get("EDTALK_ORT_THREADS"):
            opts.intra_op_num_threads = int(threads or os.environ["EDTALK_ORT_THREADS"])
        if not spin:        # a server's renderer waits between small calls: idle threads must sleep, not spin
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._opts = opts
        self._sessions: dict[str, object] = {}

    def describe(self) -> str:
        names = (_provider_name(p).removesuffix("ExecutionProvider") for p in self.providers)
        return f"onnxruntime ({', '.join(names)})"

    def _session(self, stage: str):
        if stage not in self._sessions:
            import onnxruntime as ort

            path = self.manifest.graph_path(stage)
            self._sessions[stage] = ort.InferenceSession(str(path), self._opts, providers=self.providers)
        return self._sessions[stage]

    def _run(self, stage: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        sess = self._session(stage)
        feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        return sess.run(None, feeds)

    def _from_numpy(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array, dtype=np.float32)

    def _prepare_source(self, image: torch.Tensor) -> PreparedSource:
        wa, *feats = self._run("encoder", {"image": image.numpy()})
        return PreparedSource(wa, tuple(feats), self.name)

    def _expression_feats(self, source: PreparedSource, exp: torch.Tensor) -> tuple:
        feeds = dict(zip(self.manifest.feat_names("expression"), source.feats, strict=True))
        feeds["exp"] = exp.numpy()
        return tuple(self._run("expression", feeds))

    def _read_motion(self, images: torch.Tensor) -> Motion:
        return self._motion(self._run("motion", {"image": images.numpy()}))

    def _audio_to_lip(self, mel: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run("audio2lip", {"mel": mel.numpy()})[0])

    def _render(self, wa: np.ndarray, feats: tuple, lip: torch.Tensor, pose: torch.Tensor,
                exp: torch.Tensor | None, raw: bool) -> np.ndarray:
        feeds = {"wa": wa, **dict(zip(self.manifest.feat_names("decoder"), feats, strict=True)), "lip": lip.numpy(),
                 "pose": pose.numpy()}
        if exp is not None:
            feeds["exp"] = exp.contiguous().numpy()
        return self._run("decoder", feeds)[0]

    def close(self) -> None:
        self._sessions.clear()
