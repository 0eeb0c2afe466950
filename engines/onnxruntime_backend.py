"""ONNX Runtime backend: runs the exported per-stage graphs (CPU provider; CUDA/TensorRT providers when installed)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from edtalk_live.edtalk.config import ModelConfig
from edtalk_live.edtalk.errors import EDTalkError
from edtalk_live.edtalk.motion import Motion
from edtalk_live.engines.base import Avatar, PreparedSource, Renderer, to_uint8_numpy

logger = logging.getLogger(__name__)


def default_providers() -> list[str]:
    """CUDA when ONNX Runtime has it, else CPU. TensorRT EP only on request (it builds engines at start)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def read_manifest(onnx_dir: str | Path) -> dict:
    path = Path(onnx_dir) / "manifest.json"
    if not path.is_file():
        raise EDTalkError(f"{path}: no ONNX export manifest here (run `edtalk-live export --weights DIR --out DIR`)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EDTalkError(f"{path}: unreadable manifest ({e})") from None


class OnnxRuntimeRenderer(Renderer):
    """Runs the graphs of an ONNX export directory (see :func:`export.onnx.export_model`)."""

    name = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, providers: list[str] | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise EDTalkError("onnxruntime is not installed: pip install 'edtalk-live[onnx]'") from None
        self.onnx_dir = Path(onnx_dir)
        self.manifest = read_manifest(self.onnx_dir)
        super().__init__(ModelConfig.from_dict(self.manifest["config"]))
        self.providers = providers or default_providers()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads or os.environ.get("EDTALK_ORT_THREADS"):
            opts.intra_op_num_threads = int(threads or os.environ["EDTALK_ORT_THREADS"])
        self._opts = opts
        self._sessions: dict[str, object] = {}

    def describe(self) -> str:
        return f"onnxruntime ({', '.join(p.removesuffix('ExecutionProvider') for p in self.providers)})"

    def _session(self, stage: str):
        if stage not in self._sessions:
            import onnxruntime as ort

            graphs = self.manifest["graphs"]
            if stage not in graphs:
                raise EDTalkError(f"{self.onnx_dir}: the export has no '{stage}' graph")
            path = self.onnx_dir / graphs[stage]["file"]
            if not path.is_file():
                raise EDTalkError(f"{path}: missing ONNX graph")
            self._sessions[stage] = ort.InferenceSession(str(path), self._opts, providers=self.providers)
        return self._sessions[stage]

    def _run(self, stage: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        sess = self._session(stage)
        feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        return sess.run(None, feeds)

    def _feat_names(self) -> list[str]:
        return [n for n in self.manifest["graphs"]["decoder"]["inputs"] if n.startswith("feat")]

    def _prepare_source(self, image: torch.Tensor) -> PreparedSource:
        wa, *feats = self._run("encoder", {"image": image.numpy()})
        return PreparedSource(wa, tuple(feats), self.name)

    def _expression_feats(self, source: PreparedSource, exp: torch.Tensor) -> tuple:
        names = self._feat_names()
        feeds = dict(zip(names, source.feats, strict=True))
        feeds["exp"] = exp.numpy()
        return tuple(self._run("expression", feeds))

    def _read_motion(self, images: torch.Tensor) -> Motion:
        outs = [torch.from_numpy(o) for o in self._run("motion", {"image": images.numpy()})]
        return Motion(outs[0], outs[1], outs[2] if len(outs) > 2 else None)

    def _audio_to_lip(self, mel: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run("audio2lip", {"mel": mel.numpy()})[0])

    def _render(self, avatars: list[Avatar], lip: torch.Tensor, pose: torch.Tensor, exp: torch.Tensor | None,
                raw: bool) -> np.ndarray:
        first = avatars[0]
        if all(a is first for a in avatars):
            wa, feats = first.wa, first.feats
        else:
            wa = np.concatenate([a.wa for a in avatars])
            feats = tuple(np.concatenate([a.feats[k] for a in avatars]) for k in range(len(first.feats)))
        feeds = {"wa": wa, **dict(zip(self._feat_names(), feats, strict=True)), "lip": lip.numpy(),
                 "pose": pose.numpy()}
        if exp is not None:
            feeds["exp"] = exp.contiguous().numpy()
        out = self._run("decoder", feeds)[0]
        return out if raw else to_uint8_numpy(out)

    def close(self) -> None:
        self._sessions.clear()
