"""The manifest of an ONNX export directory: which graph file holds which stage, with its inputs and outputs.

An export directory (see :func:`edtalk_live.export.onnx.export_model`) holds one ``<stage>.onnx`` per stage and
``manifest.json``:

    {
      "format": 1,
      "config": {...},                      # edtalk.config.ModelConfig.to_dict()
      "weights": "<weights hash>",
      "opset": 17,
      "graphs": {
        "decoder": {"file": "decoder.onnx",
                    "inputs": {"wa": [-1, 512], "feat0": [-1, 512, 8, 8], ...},   # -1: the batch axis
                    "outputs": ["image"]},
        ...
      }
    }

The backends (ONNX Runtime, TensorRT) and the engine builder read it with :func:`read_manifest`;
the exporter writes it with :func:`write_manifest`. Both validate the layout, so a broken or
foreign file fails with one line naming the file, not later with a ``KeyError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edtalk_live.edtalk.config import ModelConfig
from edtalk_live.edtalk.errors import EDTalkError

__all__ = ["MANIFEST", "MANIFEST_FORMAT", "GraphEntry", "Manifest", "ManifestError", "graph_entry", "manifest_path",
           "parse_manifest", "read_manifest", "write_manifest"]

#: file name of the manifest inside an export directory
MANIFEST = "manifest.json"
#: layout version written by :func:`write_manifest`; manifests without ``format`` are version 1
MANIFEST_FORMAT = 1
#: prefix of the source feature-map inputs (``feat0`` coarse .. ``featN-1`` fine)
FEAT_PREFIX = "feat"

_EXPORT_HINT = "run `edtalk-live export --weights DIR --out DIR`"


class ManifestError(EDTalkError):
    """An export directory has no manifest, or one that cannot be read or does not have the expected layout."""


@dataclass(frozen=True)
class GraphEntry:
    """One stage's graph: its file (relative to the export directory), input shapes (-1 = batch), output names."""

    file: str
    inputs: dict[str, list[int]]
    outputs: list[str]

    def to_dict(self) -> dict:
        return {"file": self.file, "inputs": {k: list(v) for k, v in self.inputs.items()},
                "outputs": list(self.outputs)}


def graph_entry(file: str, inputs: Mapping[str, Sequence[int]], outputs: Sequence[str]) -> GraphEntry:
    """A :class:`GraphEntry` from any shapes and names (copied to plain lists)."""
    return GraphEntry(file, {k: [int(d) for d in v] for k, v in inputs.items()}, [str(o) for o in outputs])


@dataclass(frozen=True)
class Manifest:
    """A validated manifest of the export directory ``directory``."""

    directory: Path
    config: dict
    graphs: dict[str, GraphEntry]
    weights: str | None = None
    opset: int | None = None
    format: int = MANIFEST_FORMAT

    @property
    def path(self) -> Path:
        """The manifest file."""
        return manifest_path(self.directory)

    def model_config(self) -> ModelConfig:
        """The :class:`ModelConfig` the graphs were exported for."""
        try:
            return ModelConfig.from_dict(self.config)
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{self.path}: the model config does not fit this version ({e!r}); "
                                f"re-export ({_EXPORT_HINT})") from None

    def graph(self, stage: str) -> GraphEntry:
        if stage not in self.graphs:
            raise ManifestError(f"{self.directory}: the export has no '{stage}' graph")
        return self.graphs[stage]

    def graph_path(self, stage: str, must_exist: bool = True) -> Path:
        """The ``.onnx`` file of ``stage`` (checked to exist unless ``must_exist`` is False)."""
        path = self.directory / self.graph(stage).file
        if must_exist and not path.is_file():
            raise ManifestError(f"{path}: missing ONNX graph (listed in {self.path})")
        return path

    def input_names(self, stage: str) -> list[str]:
        return list(self.graph(stage).inputs)

    def output_names(self, stage: str) -> list[str]:
        return list(self.graph(stage).outputs)

    def feat_names(self, stage: str = "decoder") -> list[str]:
        """The feature-map inputs of ``stage`` (``feat0``..), in graph order."""
        return [n for n in self.input_names(stage) if n.startswith(FEAT_PREFIX)]

    def to_dict(self) -> dict:
        """The JSON layout (what :func:`write_manifest` writes)."""
        out: dict = {"format": self.format, "config": self.config}
        if self.weights is not None:
            out["weights"] = self.weights
        if self.opset is not None:
            out["opset"] = self.opset
        out["graphs"] = {stage: g.to_dict() for stage, g in self.graphs.items()}
        return out


def manifest_path(onnx_dir: str | Path) -> Path:
    """``<onnx_dir>/manifest.json``."""
    return Path(onnx_dir) / MANIFEST


def _graph_entry(path: Path, stage: object, entry: object) -> GraphEntry:
    where = f"{path}: graph {stage!r}"
    if not isinstance(stage, str) or not stage or not isinstance(entry, dict):
        raise ManifestError(f"{where} is not a stage name with an object")
    file, inputs, outputs = entry.get("file"), entry.get("inputs"), entry.get("outputs")
    if not isinstance(file, str) or not file or Path(file).name != file:
        raise ManifestError(f"{where}: 'file' must be a file name inside the export directory, got {file!r}")
    if not isinstance(inputs, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(d, int) for d in v)
            for k, v in inputs.items()):
        raise ManifestError(f"{where}: 'inputs' must map input names to shapes (lists of integers)")
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise ManifestError(f"{where}: 'outputs' must be a list of output names")
    return GraphEntry(file, {k: list(v) for k, v in inputs.items()}, list(outputs))


def parse_manifest(data: object, onnx_dir: str | Path) -> Manifest:
    """Validate the decoded JSON of a manifest (``onnx_dir`` only names the files in errors and paths)."""
    directory = Path(onnx_dir)
    path = manifest_path(directory)
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: not a manifest (expected a JSON object)")
    fmt = data.get("format", 1)
    if not isinstance(fmt, int) or fmt < 1:
        raise ManifestError(f"{path}: bad manifest format {fmt!r}")
    if fmt > MANIFEST_FORMAT:
        raise ManifestError(f"{path}: manifest format {fmt} is newer than this version reads ({MANIFEST_FORMAT}); "
                            f"upgrade edtalk-live or re-export ({_EXPORT_HINT})")
    config, graphs = data.get("config"), data.get("graphs")
    if not isinstance(config, dict):
        raise ManifestError(f"{path}: 'config' must be an object")
    if not isinstance(graphs, dict) or not graphs:
        raise ManifestError(f"{path}: 'graphs' must list at least one stage")
    weights, opset = data.get("weights"), data.get("opset")
    if weights is not None and not isinstance(weights, str):
        raise ManifestError(f"{path}: 'weights' must be a string")
    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool)):
        raise ManifestError(f"{path}: 'opset' must be an integer")
    entries = {stage: _graph_entry(path, stage, entry) for stage, entry in graphs.items()}
    return Manifest(directory, dict(config), entries, weights, opset, fmt)


def read_manifest(onnx_dir: str | Path) -> Manifest:
    """Read and validate ``<onnx_dir>/manifest.json``; raises :class:`ManifestError` (an ``EDTalkError``)."""
    path = manifest_path(onnx_dir)
    if not path.is_file():
        raise ManifestError(f"{path}: no ONNX export manifest here ({_EXPORT_HINT})")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: unreadable manifest ({e})") from None
    return parse_manifest(data, onnx_dir)


def write_manifest(onnx_dir: str | Path, config: ModelConfig, graphs: Mapping[str, GraphEntry],
                   weights: str | None = None, opset: int | None = None) -> Path:
    """Write the manifest of an export directory (validated as :func:`read_manifest` would); return its path."""
    manifest = Manifest(Path(onnx_dir), config.to_dict(), dict(graphs), weights, opset)
    data = manifest.to_dict()
    parse_manifest(json.loads(json.dumps(data)), onnx_dir)      # what we write must read back
    path = manifest_path(onnx_dir)
    path.write_text(json.dumps(data, indent=2))
    return path

