"""PyTorch -> ONNX: one graph per stage, checked, simplified, verified against PyTorch, with metadata."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edtalk_live.edtalk.errors import EDTalkError
from edtalk_live.edtalk.model import EDTalkModel
from edtalk_live.export.manifest import MANIFEST as MANIFEST  # noqa: F401 - re-exported (callers import it here)
from edtalk_live.export.manifest import graph_entry, write_manifest
from edtalk_live.export.stages import StageSpec, stage_specs

logger = logging.getLogger(__name__)

OPSET = 17
#: tolerance of the ORT-vs-PyTorch check, by output kind (fp32, CPU), relative to the output's largest magnitude
#: when that is above 1 (random weights at 128² and up give raw images beyond [-1, 1], and the decoder's
#: float error grows with them)
VERIFY_TOL = {"image": 1e-3, "default": 1e-4}


class ExportError(EDTalkError):
    """An exported graph failed a check (onnx.checker, TensorRT compatibility, or parity)."""


@dataclass
class ExportedGraph:
    stage: str
    path: Path
    inputs: dict[str, list[int]]
    outputs: list[str]
    max_error: dict[int, float] = field(default_factory=dict)   # batch -> max abs error vs PyTorch
    simplified: bool = False

    @property
    def size_mb(self) -> float:
        return self.path.stat().st_size / 2**20


def _example(spec: StageSpec, batch: int, gen: torch.Generator, src_batch: int | None = None
             ) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in spec.inputs.items():
        b = src_batch if (src_batch is not None and name in spec.broadcast) else batch
        t = torch.randn((b, *shape), generator=gen)
        if name == "image":
            t = t.clamp(-1, 1)
        elif name in ("lip", "pose", "exp"):
            t = t * 0.5
        out[name] = t
    return out


def _export_one(spec: StageSpec, path: Path, opset: int) -> None:
    # trace broadcast inputs with batch 1 so that the graph expands them to the frame batch
    example = _example(spec, 2, torch.Generator().manual_seed(0), src_batch=1 if spec.broadcast else None)
    dyn = {name: {0: "src_batch" if name in spec.broadcast else "batch"} for name in [*spec.inputs, *spec.outputs]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.module, tuple(example.values()), str(path), input_names=list(spec.inputs),
                          output_names=spec.outputs, dynamic_axes=dyn, opset_version=opset,
                          do_constant_folding=True, dynamo=False)


def _simplify(path: Path) -> bool:
    try:
        import onnxslim
    except ImportError:
        logger.info("onnxslim not installed; graphs are left as exported")
        return False
    import onnx

    model = onnx.load(str(path))
    before = len(model.graph.node)
    try:
        slim = onnxslim.slim(model)
    except Exception as e:  # noqa: BLE001 - the simplifier is an optimisation; never fail export on it
        logger.warning("%s: simplification skipped (%s)", path.name, e)
        return False
    if slim is None or len(slim.graph.node) > before:
        return False
    onnx.save(slim, str(path))
    logger.info("%s: %d -> %d nodes after simplification", path.name, before, len(slim.graph.node))
    return True


def name_batch_axes(path: Path, spec: StageSpec) -> None:
    """(Re)name axis 0 of every input and output: ``src_batch`` for broadcast inputs, else ``batch``.

    Simplifiers may merge or rename symbolic dimensions; TensorRT treats equally named axes as
    equal at run time, so the names must say exactly which batches are tied together.
    """
    import onnx

    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "src_batch" if value.name in spec.broadcast else "batch"
    onnx.save(model, str(path))


def set_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=str(v))
    onnx.save(model, str(path))


def read_metadata(path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def verify_graph(spec: StageSpec, path: Path, batches=(1, 3, 8), seed: int = 0) -> dict[int, float]:
    """Run the graph with ONNX Runtime (CPU) and PyTorch on the same inputs; return max abs error per batch."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    errors = {}
    cases = [(b, sb) for b in batches for sb in ((1, b) if spec.broadcast else (None,))]
    for b, sb in cases:
        example = _example(spec, b, gen, src_batch=sb)
        with torch.no_grad():
            ref = spec.module(*example.values())
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run(spec.outputs, {k: v.numpy() for k, v in example.items()})
        err = 0.0
        for name, r, g in zip(spec.outputs, ref, got, strict=True):
            if tuple(g.shape) != tuple(r.shape):
                raise ExportError(f"{path.name}: output '{name}' has shape {list(g.shape)}, expected {list(r.shape)}")
            e = float(np.abs(g - r.numpy()).max()) if g.size else 0.0
            scale = max(1.0, float(r.abs().max())) if r.numel() else 1.0
            tol = VERIFY_TOL.get(name, VERIFY_TOL["default"]) * scale
            if not e <= tol:
                raise ExportError(f"{path.name}: output '{name}' differs from PyTorch by {e:.2e} at batch {b} "
                                  f"(tolerance {tol:.1e})")
            err = max(err, e)
        errors[b] = max(err, errors.get(b, 0.0))
    return errors


def export_model(model: EDTalkModel, out_dir: str | Path, opset: int = OPSET, simplify: bool = True,
                 verify: bool = True, progress: Callable | None = None) -> list[ExportedGraph]:
    """Export every stage of ``model`` to ``out_dir/<stage>.onnx`` and write ``manifest.json``
    (:mod:`edtalk_live.export.manifest`).

    Each graph is checked with ``onnx.checker``, optionally simplified, checked against the
    TensorRT operator set (:func:`edtalk_live.export.trt_compat.check_graph`), verified against PyTorch with
    ONNX Runtime at batch 1, 3 and 8, and stamped with metadata (family, size, weights hash, opset).
    ``progress(stage_name)`` is called before each stage.
    """
    import onnx

    from edtalk_live.export.trt_compat import check_graph

    model = model.float().cpu().eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    meta = {"edtalk.family": cfg.family, "edtalk.size": cfg.size, "edtalk.config": json.dumps(cfg.to_dict()),
            "edtalk.weights": model.weights_id, "edtalk.opset": opset, "producer": "edtalk-live"}
    results = []
    for spec in stage_specs(model):
        if progress:
            progress(spec.name)
        path = out / f"{spec.name}.onnx"
        tmp = path.with_suffix(".onnx.tmp")
        try:
            _export_one(spec, tmp, opset)
            simplified = _simplify(tmp) if simplify else False
            name_batch_axes(tmp, spec)
            set_metadata(tmp, {**meta, "edtalk.stage": spec.name})
            onnx.checker.check_model(str(tmp), full_check=True)
            problems = check_graph(tmp)
            if problems:
                raise ExportError(f"{spec.name}.onnx is not TensorRT-compatible: {problems[0]}")
            errors = verify_graph(spec, tmp) if verify else {}
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        g = ExportedGraph(spec.name, path, {k: [-1, *v] for k, v in spec.inputs.items()}, spec.outputs,
                          errors, simplified)
        logger.info("wrote %s (%.1f MB, max error %s)", path, g.size_mb, errors)
        results.append(g)
    write_manifest(out, cfg, {g.stage: graph_entry(g.path.name, g.inputs, g.outputs) for g in results},
                   weights=model.weights_id, opset=opset)
    return results
